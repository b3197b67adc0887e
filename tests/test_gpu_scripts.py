"""benchmarks/device_wheels.sh and benchmarks/gpu_session.sh, without a GPU or network.

A GPU session has 15 device minutes and no package registry: these check, here, what would otherwise
fail only there: the scripts' syntax, the wheel list against uv.lock, the documented `run` calls (size,
carry, time limit, what fits in 15 minutes) and that every command a part runs takes the flags it is given.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from bench_helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "benchmarks" / "device_wheels.sh"
SESSION = ROOT / "benchmarks" / "gpu_session.sh"
PARTS = ("all", "check", "bench", "epoch", "search")
DEVICE_MINUTES = 15  # all of a task's device time: the machine's start, idle waits and reruns included
REFERENCE_MODELS = {"smoothnet", "resnet9_scalenorm", "wrn16_4"}


def documented_calls() -> list[dict]:
    """The `# run: {...}` lines at the top of gpu_session.sh: the tool calls a session copies."""
    calls = [json.loads(line.split(":", 1)[1]) for line in SESSION.read_text().splitlines() if line.startswith("# run: ")]
    assert calls, "gpu_session.sh documents no `# run: {...}` calls"
    return calls


def part_budget(part: str) -> int:
    """The part's default time budget (DPNAS_PART_BUDGET_S unset), as the script computes it."""
    env = {k: v for k, v in os.environ.items() if k != "DPNAS_PART_BUDGET_S"} | {"DPNAS_DRY_RUN": "1"}
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run(["bash", str(SESSION), part, out], capture_output=True, text=True, env=env)
    return int(re.search(r"budget (\d+) s", result.stdout).group(1))


def part_of(call: dict) -> str:
    words = shlex.split(call["command"])
    return words[words.index("benchmarks/gpu_session.sh") + 1]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("script", [WHEELS, SESSION], ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_wheel_list_is_pinned_to_uv_lock():
    result = subprocess.run(["bash", str(WHEELS), "--list"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    pins = [line.split("==") for line in result.stdout.split()]
    names = [normalise(name) for name, _ in pins]
    assert len(names) == len(set(names)), f"a package listed twice: {names}"  # two versions break the install there
    locked: dict[str, set[str]] = {}
    for package in tomllib.loads((ROOT / "uv.lock").read_text())["package"]:
        locked.setdefault(normalise(package["name"]), set()).add(package["version"])
    for name, version in pins:
        assert version in locked.get(normalise(name), set()), f"{name}=={version} is not uv.lock's {locked.get(normalise(name))}"
    # what dpnas imports and the device lacks; and nothing the device image already has (torch, numpy ...)
    assert {"opacus", "optuna", "optuna-dashboard", "sqlalchemy", "alembic"} <= set(names)
    assert not {"torch", "torchvision", "numpy", "scipy", "pandas", "tqdm", "scikit-learn", "pytest"} & set(names)


def test_documented_run_calls_fit_the_device_tool():
    calls = documented_calls()
    for call in calls:
        assert len(call["command"]) <= 2000, call["command"]
        assert call["carry"] == [".whl"]  # the wheels, or Opacus and Optuna are missing there
        assert 1 <= call["timeout_s"] <= 600
        assert call.get("kind", "nvidia-h200") in ("nvidia-h200", "nvidia-h100-x1")
        assert set(call) <= {"command", "carry", "timeout_s", "kind"}  # the run tool's arguments
        assert part_of(call) in PARTS
        assert part_budget(part_of(call)) < call["timeout_s"], "a part must stop before the call's time limit"
    # the whole table in one call that leaves, after a machine's start (up to 2 minutes), the time to rerun it
    assert [part_of(c) for c in calls] == ["all"]
    assert 2 * 60 + 2 * calls[0]["timeout_s"] <= DEVICE_MINUTES * 60


def test_unknown_part_is_refused(tmp_path):
    result = subprocess.run(["bash", str(SESSION), "benchmark", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_outputs_and_wheels_stay_out_of_git():
    # whatever is not ignored travels to the device with every call (64 MiB in all)
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    for path in ("benchmarks/gpu_out/h200_bench_smoothnet.json", ".whl/opacus-1.6.0-py3-none-any.whl"):
        assert subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path]).returncode == 0, path


def load_script(name: str):
    return load_benchmark(name)


class _Parsed(Exception):
    pass


def argument_error(argv: list[str], monkeypatch) -> str | None:
    """Parse one command of a part as its program would; None if accepted, else argparse's message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if argv[:3] == ["python3", "-m", "dpnas"]:
                from dpnas.cli import make_parser

                make_parser().parse_args(argv[3:])
            elif argv[:2] == ["python3", "benchmarks/search_throughput.py"]:
                load_script("search_throughput").parse_args(argv[2:])  # also checks the trials fit its grid
            elif argv[:2] == ["python3", "benchmarks/epoch_throughput.py"]:
                module = load_script("epoch_throughput")

                def parsed(*args, **kwargs):  # main() loads the data right after parsing: stop there
                    raise _Parsed

                monkeypatch.setattr(module, "load_dataset", parsed)
                with pytest.raises(_Parsed):
                    module.main(argv[2:])
            elif argv[:3] == ["python3", "-m", "pytest"]:
                pass
            else:
                return f"unknown command: {shlex.join(argv)}"
    except SystemExit:
        return stderr.getvalue().strip() or "exited"
    return None


# the documented call, and each full-size part a rerun may use
PART_COMMANDS = [c["command"] for c in documented_calls()] + [
    f"bash benchmarks/gpu_session.sh {part}" for part in PARTS if part != "all"] + [
    "DPNAS_REHEARSAL=1 DPNAS_DEVICE=cpu bash benchmarks/gpu_session.sh all"]


@pytest.mark.parametrize("command", PART_COMMANDS)
def test_each_part_runs_commands_that_take_their_flags(command, tmp_path, monkeypatch):
    env = {**os.environ, "DPNAS_DRY_RUN": "1", "OUT": str(tmp_path)}
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [shlex.split(line.removeprefix("DRY-RUN: ")) for line in result.stdout.splitlines()
                if line.startswith("DRY-RUN: ")]
    assert commands, result.stdout
    outputs = set()
    for argv in commands:
        for flag in ("--json", "--out", "--junitxml"):
            for i, word in enumerate(argv):
                if word == flag or word.startswith(flag + "="):
                    path = Path(argv[i + 1] if word == flag else word.split("=", 1)[1])
                    assert path.parent == tmp_path, f"{path}: not directly in $OUT, so it would not come back"
                    outputs.add(path.name)
    assert len(outputs) + 1 <= 8, f"the device returns at most 8 files: {sorted(outputs)} and the log"

    errors = [(argv, error) for argv in commands if (error := argument_error(argv, monkeypatch))]
    assert not errors, errors


def dry_run_commands(command: str, out: Path) -> list[list[str]]:
    """The commands a documented call would run, as the script prints them with DPNAS_DRY_RUN=1."""
    env = {**os.environ, "DPNAS_DRY_RUN": "1", "OUT": str(out)}
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return [shlex.split(line.removeprefix("DRY-RUN: ")) for line in result.stdout.splitlines()
            if line.startswith("DRY-RUN: ")]


def flag_values(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_the_one_call_measures_everything_goal_7_asks_for(tmp_path):
    """Issue 17's GPU table: DP step against non-private and Opacus for the three reference models, bf16 and
    channels-last (each alone and together) for one of them, epochs against Opacus's, trials sharing the GPU
    against one after another, and the GPU tests; the checks first, and the CUDA device everywhere."""
    (call,) = documented_calls()
    commands = dry_run_commands(call["command"], tmp_path)
    benches = [argv for argv in commands if argv[:4] == ["python3", "-m", "dpnas", "bench"]]
    assert {flag_values(argv, "--models") for argv in benches} == REFERENCE_MODELS
    for argv in benches:
        assert set(flag_values(argv, "--modes").split(",")) >= {"nonprivate", "opacus", "dpnas"}
        assert {"fp32", "bf16+channels_last"} <= set(flag_values(argv, "--variants").split(","))
    assert any({"bf16", "channels_last"} <= set(flag_values(argv, "--variants").split(",")) for argv in benches)
    (epoch,) = [argv for argv in commands if argv[1] == "benchmarks/epoch_throughput.py"]
    assert set(flag_values(epoch, "--model").split(",")) == REFERENCE_MODELS
    (search,) = [argv for argv in commands if argv[1] == "benchmarks/search_throughput.py"]
    workers = [int(w) for w in flag_values(search, "--workers").split(",")]
    assert 1 in workers and max(workers) >= 2
    assert commands[0][:3] == ["python3", "-m", "pytest"] and "tests/test_gpu.py" in commands[0]
    for argv in commands[1:]:
        assert flag_values(argv, "--device") == "cuda", argv


def test_every_step_of_the_one_call_has_a_cap_and_the_budget_orders_them(tmp_path):
    """`all` names each step's cap, and a step is only started with at least 30 s of the part's budget left:
    a budget that ran out skips the rest (exit 3, named) instead of overrunning the call."""
    (call,) = documented_calls()
    env = {**os.environ, "DPNAS_DRY_RUN": "1", "OUT": str(tmp_path)}
    result = subprocess.run(["bash", "-c", call["command"]], capture_output=True, text=True, cwd=ROOT, env=env)
    caps = [int(m) for m in re.findall(r"at most (\d+) s", result.stdout)]
    assert len(caps) == len(dry_run_commands(call["command"], tmp_path)) and max(caps) <= part_budget("all")
    short = subprocess.run(["bash", "-c", call["command"]], capture_output=True, text=True, cwd=ROOT,
                           env={**env, "DPNAS_PART_BUDGET_S": "20"})
    assert short.returncode == 3 and "OUT OF TIME, not started: test_gpu smoke_train" in short.stdout

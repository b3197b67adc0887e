"""benchmarks/device_wheels.sh and benchmarks/gpu_session.sh, without a GPU or network.

A GPU session has 30 device minutes and no package registry: these check, here, what would otherwise
fail only there: the scripts' syntax, the wheel list against uv.lock, the documented `run` calls (size,
carry, time limit) and that every command a part runs takes the flags it is given.
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
import tomllib
from pathlib import Path

import pytest
from bench_helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "benchmarks" / "device_wheels.sh"
SESSION = ROOT / "benchmarks" / "gpu_session.sh"
PARTS = ("check", "bench", "epoch", "search")
REFERENCE_MODELS = {"smoothnet", "resnet9_scalenorm", "wrn16_4"}


def documented_calls() -> list[dict]:
    """The `# run: {...}` lines at the top of gpu_session.sh: the tool calls a session copies."""
    calls = [json.loads(line.split(":", 1)[1]) for line in SESSION.read_text().splitlines() if line.startswith("# run: ")]
    assert calls, "gpu_session.sh documents no `# run: {...}` calls"
    return calls


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
        assert part_of(call) in PARTS
    assert {part_of(c) for c in calls} == set(PARTS)
    budget = int(re.search(r"DPNAS_PART_BUDGET_S:-(\d+)", SESSION.read_text()).group(1))
    assert budget < min(c["timeout_s"] for c in calls), "a part must stop before the call's time limit"


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


@pytest.mark.parametrize("call", documented_calls(), ids=lambda c: c["command"])
def test_each_part_runs_commands_that_take_their_flags(call, tmp_path, monkeypatch):
    env = {**os.environ, "DPNAS_DRY_RUN": "1", "OUT": str(tmp_path)}
    result = subprocess.run(["bash", "-c", call["command"]], capture_output=True, text=True, cwd=ROOT, env=env)
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


def test_bench_calls_cover_the_reference_models():
    models = set()
    for call in documented_calls():
        if part_of(call) == "bench":
            env = dict(word.split("=", 1) for word in shlex.split(call["command"]) if re.match(r"^[A-Z_]+=", word))
            models |= set(env.get("DPNAS_MODELS", ",".join(REFERENCE_MODELS)).split(","))
    assert models == REFERENCE_MODELS

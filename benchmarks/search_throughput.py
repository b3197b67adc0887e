"""Search throughput: trials per hour of `dpnas search` with several worker processes sharing one device.

A short-budget version of studies/smoothnet_cifar10.toml (its privacy budget, recipe and base architecture;
`--epochs` per trial; a grid of small SmoothNet points; no pruning) runs once per arm through dpnas's own
`dpnas.search.runner.search(spec, workers=N, device=...)`: workers=1 takes the trials one after another, workers=N
starts N processes that share the device. Every arm runs the same trials (the first `--trials` points of the
same grid) in a fresh journal in a temp dir. Wall time is the whole search call, as a user waits for it:
worker start-up and data loading included. Prints a table and writes JSON (compare the ratio, measured in
the same run, not absolute numbers across machines).

    uv run python benchmarks/search_throughput.py --trials 6 --epochs 1 --workers 1,2
    uv run python benchmarks/search_throughput.py --device cuda --synthetic-size 50000 --trials 16 --workers 1,2,4
    uv run python benchmarks/search_throughput.py --dataset cifar10 --data-dir ~/data --device cuda --workers 1,4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from dpnas import __version__ as dpnas_version
from dpnas.data.datasets import DEFAULT_SYNTHETIC_SIZE, load_dataset
from dpnas.dp.recipe_file import toml_value
from dpnas.search.runner import search
from dpnas.search.study_file import load_study_file

DEFAULT_STUDY = Path(__file__).resolve().parents[1] / "studies" / "smoothnet_cifar10.toml"
# Two components of the study's space at its smallest widths and depths: cheap trials that still differ.
GRID_COMPONENTS = {"activation": ["selu", "relu"], "pool": ["max_smooth", "none"]}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_list(kind):  # noqa: ANN001, ANN201
    """A comma-separated list of positive numbers, e.g. "1,2,4"."""

    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
        return list(dict.fromkeys(values))  # in order, without repeats

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study file to derive the short study from")
    parser.add_argument("--trials", type=positive_int, default=8, help="trials per arm (default 8)")
    parser.add_argument("--epochs", type=positive_int, default=1, help="epochs per trial (default 1)")
    parser.add_argument("--workers", type=positive_list(int), default=[1, 2],
                        help="worker counts to compare, e.g. 1,2,4 (the 1-worker arm always runs, first)")
    parser.add_argument("--widths", type=positive_list(float), default=[1.0, 2.0], help="grid of width multipliers")
    parser.add_argument("--depths", type=positive_list(float), default=[1.0, 2.0], help="grid of depth multipliers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", choices=("synthetic", "cifar10"), default="synthetic")
    parser.add_argument("--data-dir", help="where cifar10 is (or is downloaded to)")
    parser.add_argument("--synthetic-size", type=positive_int,
                        help=f"samples of the synthetic CIFAR-shaped data (default {DEFAULT_SYNTHETIC_SIZE}; CIFAR-10 has 50000)")
    parser.add_argument("--image-size", type=positive_int, help="resize images (default: the dataset's 32)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/search_throughput.json"))
    args = parser.parse_args(argv)
    if args.data_dir and args.dataset != "cifar10":
        parser.error("--data-dir is only for --dataset cifar10")
    if args.synthetic_size and args.dataset != "synthetic":
        parser.error("--synthetic-size is only for --dataset synthetic")
    if args.dataset == "synthetic":
        args.synthetic_size = args.synthetic_size or DEFAULT_SYNTHETIC_SIZE
    grid_size = math.prod(len(v) for v in GRID_COMPONENTS.values()) * len(args.widths) * len(args.depths)
    if args.trials > grid_size:
        # beyond the grid Optuna re-runs random points, and the arms would no longer run the same trials
        parser.error(f"--trials {args.trials} exceeds the grid of {grid_size} points; give more --widths or --depths")
    if not args.study.is_file():
        parser.error(f"--study {args.study}: no such file")
    args.workers = [1] + [w for w in args.workers if w != 1]  # the sequential baseline first
    return args


def derive_study(args: argparse.Namespace, directory: Path) -> Path:
    """The short-budget study file: the source study's privacy and recipe, a small fixed grid, no pruning."""
    document = tomllib.loads(args.study.read_text())
    study = document.setdefault("study", {})
    study.update(
        name=f"{study.get('name', args.study.stem)}_throughput",
        description=f"short-budget copy of {args.study.name} for benchmarks/search_throughput.py",
        # grid: trial k is grid point k in every arm; no pruning: a trial's cost must not depend on which
        # trials happened to finish before it (that order differs between arms)
        sampler="grid", pruner="none", n_trials=args.trials,
    )
    data = document.setdefault("data", {})
    data["dataset"] = args.dataset
    for key in ("data_dir", "synthetic_size", "image_size"):
        data.pop(key, None)
    if args.dataset == "cifar10" and args.data_dir:
        data["data_dir"] = str(Path(args.data_dir).expanduser())
    if args.dataset == "synthetic":
        data["synthetic_size"] = args.synthetic_size
    if args.image_size:
        data["image_size"] = args.image_size
    document.setdefault("train", {})["epochs"] = args.epochs
    document["search"] = {**GRID_COMPONENTS, "width": args.widths, "depth": args.depths}
    path = directory / "study.toml"
    path.write_text(to_toml(document))
    load_study_file(path)  # checked here, with the file's own error messages, before any arm starts
    return path


def to_toml(document: dict) -> str:
    lines = []
    for section, table in document.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if isinstance(value, dict):
                raise ValueError(f"[{section}] {key}: tables are not written here")
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


@contextlib.contextmanager
def stdout_to_stderr():
    """Trial lines go to stderr, with the progress, so that stdout holds only the table.

    At the file-descriptor level too: the spawned worker processes inherit fd 1 and print there.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_arm(study_path: Path, workers: int, device: str) -> dict:
    spec = load_study_file(study_path)
    with tempfile.TemporaryDirectory(prefix=f"search-throughput-w{workers}-") as directory:
        url = str(Path(directory) / "study.journal")  # a fresh storage: no trial of another arm is reused
        start = time.perf_counter()
        with stdout_to_stderr():
            study = search(spec, storage_url=url, workers=workers, device=device, progress=True)
        wall = time.perf_counter() - start
        trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    return {
        "arm": "sequential" if workers == 1 else f"{workers} workers",
        "workers": workers,
        "trials": len(complete),
        "states": states,
        "wall_s": wall,
        "trials_per_hour": len(complete) / wall * 3600,
        # the busy time inside the trials, without start-up, data loading and waiting for the study lock
        "mean_trial_s": sum(t.user_attrs["wall_seconds"] for t in complete) / len(complete) if complete else None,
        "configs": sorted(json.dumps(t.params, sort_keys=True) for t in trials),
    }


def device_info(device: str) -> dict:
    info = {"device": device, "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["device_name"] = cpu_name()
    return info


def cpu_name() -> str:
    # platform.processor() is empty on many Linux systems; /proc/cpuinfo names the model
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # dpnas prints one line per trial already
    if args.dataset == "cifar10":
        # once, here: a missing download fails with one message instead of in every worker, and the
        # workers do not race to download into the same directory
        load_dataset("cifar10", data_dir=args.data_dir, image_size=args.image_size, progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="search-throughput-") as directory:
        study_path = derive_study(args, Path(directory))
        study_text = study_path.read_text()
        for index, workers in enumerate(args.workers, 1):
            print(f"[{index}/{len(args.workers)}] {workers} worker(s) on {args.device}: {args.trials} trials of "
                  f"{args.epochs} epoch(s), {args.dataset} data", file=sys.stderr, flush=True)
            row = run_arm(study_path, workers, args.device)
            print(f"[{index}/{len(args.workers)}] {row['trials']} trials in {row['wall_s']:.1f} s",
                  file=sys.stderr, flush=True)
            rows.append(row)
    sequential = rows[0]["trials_per_hour"]
    for row in rows:
        row["x_sequential"] = row["trials_per_hour"] / sequential if sequential else None

    print(f"{args.trials} trials x {args.epochs} epoch(s), {args.dataset} data, device {args.device}")
    print(f"{'arm':<12} {'workers':>7} {'trials':>6} {'wall s':>8} {'trials/hour':>11} {'x sequential':>12}")
    for row in rows:
        ratio = f"{row['x_sequential']:.2f}" if row["x_sequential"] is not None else "-"
        print(f"{row['arm']:<12} {row['workers']:>7} {row['trials']:>6} {row['wall_s']:>8.1f} "
              f"{row['trials_per_hour']:>11.1f} {ratio:>12}")
    for row in rows:
        if row["trials"] != args.trials:
            print(f"warning: arm {row['arm']!r} completed {row['trials']} of {args.trials} trials "
                  f"(states {row['states']}); see the trial lines above", file=sys.stderr)
        if row["configs"] != rows[0]["configs"]:
            print(f"warning: arm {row['arm']!r} ran other trials than the sequential arm", file=sys.stderr)

    argv = sys.argv[1:] if argv is None else argv
    result = {
        "benchmark": "search_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/search_throughput.py", *argv]),
        "machine": {"host": platform.node(), "platform": platform.platform(), **device_info(args.device)},
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "dpnas": dpnas_version,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "study": study_text,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    outcome = main()
    # a failed or missing trial makes the numbers incomparable: say so in the exit status too
    sys.exit(0 if all(row["trials"] == outcome["args"]["trials"] for row in outcome["rows"]) else 1)

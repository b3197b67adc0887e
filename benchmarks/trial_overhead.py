"""Where a search trial's time goes besides its DP-SGD steps: the per-trial fixed cost, measured.

Runs a study (default: the quickstart, as the README runs it) once, sequentially, in a fresh journal under
cProfile, and splits each trial's time by the functions that do the work:

* ``steps``: DP-SGD steps (:meth:`DPSGDEngine.step`) less the per-layer method tuning inside the first ones;
* ``method tuning``: timing the per-sample methods once per layer shape (:func:`dpnas.dp.per_sample._fastest`);
* ``evaluation``: validation and test passes (:func:`dpnas.dp.train.count_correct`);
* ``model build``, ``noise calibration`` (:func:`dpnas.dp.privacy.plan_privacy`), ``data to device``;
* ``storage``: Optuna's ask / tell / report / attributes and dpnas's slot lock, weights and bookkeeping: the
  rest of the trial loop outside :func:`dpnas.dp.train.train`.

The search's one-off start (loading the data, the study checks, creating the study) is reported apart. cProfile
slows Python-heavy code more than tensor kernels, so the fixed parts read somewhat high: an upper bound.

    uv run python benchmarks/trial_overhead.py                       # the quickstart, about 2 minutes on 2 cores
    uv run python benchmarks/trial_overhead.py --study studies/quickstart.toml --trials 3 --epochs 2

Prints a table and writes JSON (`--json`, default benchmarks/trial_overhead.json).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from dpnas.results import write_json

REPO = Path(__file__).resolve().parents[1]
# part -> (module file suffix, function name) whose cumulative time it is
PARTS = {
    "trial": ("dpnas/search/runner.py", "run_trial"),
    "train": ("dpnas/dp/train.py", "train"),
    "steps": ("dpnas/dp/engine.py", "step"),
    "method tuning": ("dpnas/dp/per_sample.py", "_fastest"),
    "evaluation": ("dpnas/dp/train.py", "count_correct"),
    "model build": ("dpnas/arch/models.py", "build_model"),
    "noise calibration": ("dpnas/dp/privacy.py", "plan_privacy"),
    "data to device": ("dpnas/data/datasets.py", "to"),
    "worker loop": ("dpnas/search/runner.py", "run_worker"),
    "search": ("dpnas/search/runner.py", "search"),
    "start: checks and data": ("dpnas/search/runner.py", "check_search"),
}


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> tuple[float, int]:
    """(cumulative seconds, primitive calls) of one function, 0 when it never ran."""
    for (filename, _, function), (primitive, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if function == name and filename.replace("\\", "/").endswith(suffix):
            return cum, primitive
    return 0.0, 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "quickstart.toml")
    parser.add_argument("--n-trials", type=int, help="trials to run (default: the study's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", type=Path, help="also keep the raw cProfile stats here (for pstats / snakeviz)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "trial_overhead.json")
    args = parser.parse_args(argv)
    if not args.study.is_file():
        parser.error(f"--study {args.study}: no such file")
    if args.n_trials is not None and args.n_trials < 1:
        parser.error("--n-trials must be >= 1")

    from dpnas.search.runner import search
    from dpnas.search.study_file import load_study_file

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_study_file(args.study)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="trial-overhead-") as directory:
        url = str(Path(directory) / "study.journal")
        start = time.perf_counter()
        profiler.enable()
        study = search(spec, storage_url=url, n_trials=args.n_trials, device=args.device, progress=False)
        profiler.disable()
        wall = time.perf_counter() - start
        trials = len(study.get_trials(deepcopy=False))
    stats = pstats.Stats(profiler)
    if args.profile:
        stats.dump_stats(args.profile)
    seconds = {part: cumulative(stats, *where)[0] for part, where in PARTS.items()}
    calls = {part: cumulative(stats, *where)[1] for part, where in PARTS.items()}
    n = max(calls["trial"], 1)
    per_trial = {
        "steps": seconds["steps"] - seconds["method tuning"],
        "method tuning": seconds["method tuning"],
        "evaluation": seconds["evaluation"],
        "model build": seconds["model build"],
        "noise calibration": seconds["noise calibration"],
        "data to device": seconds["data to device"],
        "rest of train()": seconds["train"] - seconds["steps"] - seconds["evaluation"] - seconds["model build"]
        - seconds["noise calibration"] - seconds["data to device"],
        "storage and bookkeeping": seconds["trial"] - seconds["train"],
        "between trials (ask, propose, locks)": seconds["worker loop"] - seconds["trial"],
    }
    per_trial = {k: v / n for k, v in per_trial.items()}
    trial_seconds = sum(per_trial.values())
    fixed = trial_seconds - per_trial["steps"]
    rows = [{"part": k, "seconds_per_trial": v, "share": v / trial_seconds} for k, v in per_trial.items()]

    print(f"{args.study.name}: {n} trials ({trials} in the study), {wall:.1f} s in all, device {args.device}")
    print(f"{'part':<38} {'s / trial':>9} {'share':>7}")
    for row in rows:
        print(f"{row['part']:<38} {row['seconds_per_trial']:>9.3f} {row['share']:>6.1%}")
    print(f"{'fixed cost (all but steps)':<38} {fixed:>9.3f} {fixed / trial_seconds:>6.1%}")
    start_seconds = seconds["search"] - seconds["worker loop"]
    print(f"once per search, before the first trial: {start_seconds:.1f} s "
          f"(checks and data {seconds['start: checks and data']:.1f} s)")
    result = {
        "benchmark": "trial_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/trial_overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "cpu_count": torch.get_num_threads()},
        "torch": torch.__version__,
        "study": str(args.study),
        "trials": n,
        "wall_s": wall,
        "rows": rows,
        "fixed_seconds_per_trial": fixed,
        "fixed_share": fixed / trial_seconds,
        "search_start_s": start_seconds,
    }
    write_json(args.json, result)
    print(f"written to {args.json}")
    return result


if __name__ == "__main__":
    main()

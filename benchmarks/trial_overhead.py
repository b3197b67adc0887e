"""Where a search trial's time goes besides its DP-SGD steps: the per-trial fixed cost, measured.

Runs a study (default: the quickstart, as the README runs it) once, sequentially, in a fresh journal under
cProfile, and splits each trial's time by the functions that do the work:

* ``steps``: DP-SGD steps (:meth:`DPSGDEngine.step`) less the per-layer method tuning inside the first ones;
* ``method tuning``: timing the per-sample methods once per layer shape (:func:`dpnas.dp.per_sample._fastest`);
* ``evaluation``: validation and test passes (:func:`dpnas.dp.train.count_correct`);
* ``model build``, ``noise calibration`` (:func:`dpnas.dp.privacy.plan_privacy`), ``data to device``;
* ``storage``: Optuna's ask / tell / report / attributes and dpnas's slot lock, weights and bookkeeping: the
  rest of the trial loop outside :func:`dpnas.dp.train.train`.

The search's one-off start (loading the data, the study checks, creating the study) is reported apart.

By default each of those functions is wrapped in a wall-clock timer (``--timer wall``: the trial runs at its
real speed, and the wrappers add microseconds per call). ``--timer cprofile`` runs the search under cProfile
instead, which slows Python-heavy code more than tensor kernels, so its fixed parts read high: an upper bound.

    uv run python benchmarks/trial_overhead.py                       # the quickstart, under a minute on 2 cores
    uv run python benchmarks/trial_overhead.py --timer cprofile --profile quickstart.prof

Prints a table and writes JSON (`--json`, default benchmarks/trial_overhead.json).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import functools
import importlib
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


# part -> (module, owner of the attribute in that module or "", attribute): where the wall-clock timer wraps the
# same function as PARTS names, at the place its callers look it up
CALL_SITES = {
    "trial": ("dpnas.search.runner", "", "run_trial"),
    "train": ("dpnas.search.runner", "", "train"),
    "steps": ("dpnas.dp.engine", "DPSGDEngine", "step"),
    "method tuning": ("dpnas.dp.per_sample", "", "_fastest"),
    "evaluation": ("dpnas.dp.train", "", "count_correct"),
    "model build": ("dpnas.dp.train", "", "build_model"),
    "noise calibration": ("dpnas.dp.train", "", "plan_privacy"),
    "data to device": ("dpnas.data.datasets", "DatasetSplits", "to"),
    "worker loop": ("dpnas.search.runner", "", "run_worker"),
    "start: checks and data": ("dpnas.search.runner", "", "check_search"),
}


# parts that are split out of train(): their calls elsewhere (the preflight's one step before the first trial,
# the study checks) belong to the search's start, not to a trial
INSIDE_TRAIN = {"steps", "method tuning", "evaluation", "model build", "noise calibration", "data to device"}


@contextlib.contextmanager
def wall_timers(seconds: dict[str, float], calls: dict[str, int]):
    """Wrap each CALL_SITES function so that its outermost calls add their wall time to `seconds[part]`."""
    patched = []
    depth = {part: 0 for part in CALL_SITES}

    def timed(part: str, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if part in INSIDE_TRAIN and depth["train"] == 0:
                return function(*args, **kwargs)
            depth[part] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[part] -= 1
                if depth[part] == 0:  # a recursive or re-entrant call is inside its caller's time already
                    seconds[part] += time.perf_counter() - start
                    calls[part] += 1
        return wrapper

    try:
        for part, (module_name, owner_name, attribute) in CALL_SITES.items():
            owner = importlib.import_module(module_name)
            if owner_name:
                owner = getattr(owner, owner_name)
            original = owner.__dict__[attribute]
            patched.append((owner, attribute, original))
            seconds[part], calls[part] = 0.0, 0
            setattr(owner, attribute, timed(part, original))
        yield
    finally:
        for owner, attribute, original in reversed(patched):
            setattr(owner, attribute, original)


def preflight_steps(stats: pstats.Stats) -> float:
    """Cumulative seconds of DPSGDEngine.step called by the preflight (the search's start, not a trial)."""
    suffix, name = PARTS["steps"]
    for (filename, _, function), (*_, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if function == name and filename.replace("\\", "/").endswith(suffix):
            return sum(timing[3] for (caller_file, _, caller), timing in callers.items()
                       if caller == "preflight" and caller_file.replace("\\", "/").endswith("dpnas/dp/preflight.py"))
    return 0.0


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
    parser.add_argument("--timer", choices=("wall", "cprofile"), default="wall",
                        help="wall-clock wrappers around each part (default) or cProfile (an upper bound on the fixed parts)")
    parser.add_argument("--profile", type=Path, help="with --timer cprofile: keep the raw stats here (pstats / snakeviz)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "trial_overhead.json")
    args = parser.parse_args(argv)
    if not args.study.is_file():
        parser.error(f"--study {args.study}: no such file")
    if args.n_trials is not None and args.n_trials < 1:
        parser.error("--n-trials must be >= 1")
    if args.profile and args.timer != "cprofile":
        parser.error("--profile needs --timer cprofile")

    from dpnas.search.runner import search
    from dpnas.search.study_file import load_study_file

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_study_file(args.study)
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    profiler = cProfile.Profile() if args.timer == "cprofile" else None
    with tempfile.TemporaryDirectory(prefix="trial-overhead-") as directory:
        url = str(Path(directory) / "study.journal")
        with contextlib.nullcontext() if profiler else wall_timers(seconds, calls):
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            study = search(spec, storage_url=url, n_trials=args.n_trials, device=args.device, progress=False)
            if profiler:
                profiler.disable()
            wall = time.perf_counter() - start
        trials = len(study.get_trials(deepcopy=False))
    if profiler:
        stats = pstats.Stats(profiler)
        if args.profile:
            stats.dump_stats(args.profile)
        seconds = {part: cumulative(stats, *where)[0] for part, where in PARTS.items()}
        calls = {part: cumulative(stats, *where)[1] for part, where in PARTS.items()}
        seconds["steps"] -= preflight_steps(stats)
    else:
        seconds["search"] = wall
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

    print(f"{args.study.name}: {n} trials ({trials} in the study), {wall:.1f} s in all, device {args.device}, "
          f"timer {args.timer}")
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
        "timer": args.timer,
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

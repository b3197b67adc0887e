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
    uv run python benchmarks/trial_overhead.py --n-trials 12 --validations 4   # 4 validation releases a trial

Prints a table and writes JSON (`--json`, default benchmarks/trial_overhead.json).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
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

from dpnas.results import writable_file, write_json

REPO = Path(__file__).resolve().parents[1]
# part -> (module, owner of the attribute in that module or "", attribute): the function whose time it is, named
# where its callers look it up, which is where the wall-clock timer wraps it (cProfile finds it by its code)
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


def call_site(part: str):
    """(owner, attribute, function) of one part."""
    module_name, owner_name, attribute = CALL_SITES[part]
    owner = importlib.import_module(module_name)
    if owner_name:
        owner = getattr(owner, owner_name)
    return owner, attribute, owner.__dict__[attribute]


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
        for part in CALL_SITES:
            owner, attribute, original = call_site(part)
            patched.append((owner, attribute, original))
            seconds[part], calls[part] = 0.0, 0
            setattr(owner, attribute, timed(part, original))
        yield
    finally:
        for owner, attribute, original in reversed(patched):
            setattr(owner, attribute, original)


def _key(function) -> tuple[str, int, str]:
    """cProfile's key for a function: its code's file, first line and name."""
    code = function.__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def cumulative(stats: pstats.Stats, part: str) -> tuple[float, int]:
    """(cumulative seconds, primitive calls) of one part's function, 0 when it never ran."""
    primitive, _, _, cum, _ = stats.stats.get(_key(call_site(part)[2]), (0, 0, 0.0, 0.0, {}))  # type: ignore[attr-defined]
    return cum, primitive


def preflight_steps(stats: pstats.Stats) -> float:
    """Cumulative seconds of DPSGDEngine.step called by the preflight (the search's start, not a trial)."""
    from dpnas.dp.preflight import preflight

    *_, callers = stats.stats.get(_key(call_site("steps")[2]), (0, 0, 0.0, 0.0, {}))  # type: ignore[attr-defined]
    timing = callers.get(_key(preflight))
    return timing[3] if timing else 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "quickstart.toml")
    parser.add_argument("--n-trials", type=int, help="trials to run (default: the study's own)")
    parser.add_argument("--validations", type=int, metavar="K",
                        help="the study with [fidelity] validations = K (K validation releases a trial, not one "
                             "an epoch)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timer", choices=("wall", "cprofile"), default="wall",
                        help="wall-clock wrappers around each part (default) or cProfile (an upper bound on the fixed parts)")
    parser.add_argument("--profile", type=Path, help="with --timer cprofile: keep the raw stats here (pstats / snakeviz)")
    parser.add_argument("--json", type=writable_file, default=REPO / "benchmarks" / "trial_overhead.json")
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
    if args.validations is not None:
        spec = dataclasses.replace(spec, fidelity=dataclasses.replace(spec.fidelity, validations=args.validations))
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
        seconds = {part: cumulative(stats, part)[0] for part in CALL_SITES}
        calls = {part: cumulative(stats, part)[1] for part in CALL_SITES}
        seconds["steps"] -= preflight_steps(stats)
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
    start_seconds = wall - seconds["worker loop"]
    print(f"once per search, before the first trial: {start_seconds:.1f} s "
          f"(checks and data {seconds['start: checks and data']:.1f} s)")
    result = {
        "benchmark": "trial_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/trial_overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "cpu_count": torch.get_num_threads()},
        "torch": torch.__version__,
        "study": str(args.study),
        "validations": args.validations,
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

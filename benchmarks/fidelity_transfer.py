"""Do cheap trials rank like expensive ones? The same sampled points at full fidelity and under each proxy.

K distinct random points of a study's space (default: the quickstart's, on digits) are each trained R times at the
study's own fidelity ("full", R = --full-repeats, each run a fresh draw of DP-SGD's secret noise) and once under each
proxy of `[fidelity]` (dpnas.search.fidelity): a TAN batch, a data fraction, fewer epochs, a lower resolution, and
combinations. The expensive ranking is the points' mean over the R full runs (one private run is itself a noisy
measurement: the row "one full run" ranks a single full run against the mean of the other R - 1, the most any
single trial can be expected to agree; with R >= 4 the row "mean of R/2 full runs" ranks the mean of half of them
against the other half, what even R/2 times a full run's compute reaches against a reference that noisy). Every run
is configured exactly as a trial of a study with that `[fidelity]` table would be: the study's total ε calibrated
for that study's run shape and training split, then the proxy's scaling. The score is each run's released (noisy)
validation accuracy, what a search reads.

For each proxy: Kendall τ between its ranking of the K points and the full one (and against the full runs' test
accuracy), the top-3 overlap, and the compute per trial, relative to the full runs of the same session: "work",
the sample-gradient pixels (steps x batch x pixels, the work a step does); "total", that work counted as 3 forwards
a sample plus the evaluation forwards (the validation records at each release, the test records once); and the
measured wall seconds. `validations=k` arms release k validation scores instead of one per epoch.

    uv run python benchmarks/fidelity_transfer.py                         # 20 points, about 15 minutes on 2 cores
    uv run python benchmarks/fidelity_transfer.py --points 24 --arms full,tan_batch=16,tan_batch=16+validations=1
    uv run python benchmarks/fidelity_transfer.py --cost-dataset synthetic --points 3   # CIFAR shapes, cost only
    uv run python benchmarks/fidelity_transfer.py --summarise benchmarks/fidelity_transfer_r6.json  # table again

Prints a table and writes JSON (`--json`, default benchmarks/fidelity_transfer.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import optuna
import torch
from scipy.stats import kendalltau

from dpnas.arch.models import check_image_size
from dpnas.arch.space import ConfigError
from dpnas.data.datasets import DEFAULT_IMAGE_SIZE
from dpnas.dp.train import train
from dpnas.results import writable_file, write_json
from dpnas.search.calibration import calibrate_study
from dpnas.search.fidelity import Fidelity, load_search_data, search_trial
from dpnas.search.sampling import config_key, suggest
from dpnas.search.study_file import load_study_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARMS = ("full,tan_batch=32,tan_batch=16,data_fraction=0.5,data_fraction=0.25,epochs=2,image_size=8,"
                "tan_batch=32+image_size=8,data_fraction=0.5+tan_batch=32,data_fraction=0.25+image_size=8")


def parse_arm(text: str) -> Fidelity | None:
    """``full`` (None) or ``key=value+key=value`` of [fidelity] settings."""
    if text == "full":
        return None
    values = {}
    for part in text.split("+"):
        key, _, value = part.partition("=")
        values[key] = float(value) if key == "data_fraction" else int(value)
    return Fidelity(**values)


def sample_points(spec, n: int, seed: int, sizes: list[int]) -> list:
    """`n` distinct valid points of the study's space that every arm's resolution can take."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points, seen = [], set()
    for _ in range(50 * n):
        if len(points) == n:
            break
        trial = study.ask()
        try:
            configs = suggest(trial, spec)
            for size in sizes:
                check_image_size(configs[0], size)
        except ConfigError:
            continue
        finally:
            study.tell(trial, 0.0)
        key = config_key(configs)
        if key not in seen:
            seen.add(key)
            points.append((configs, dict(trial.params)))
    return points


class Arm:
    """One fidelity: its study (the base study with this [fidelity] table), data and per-run privacy."""

    def __init__(self, name: str, spec, fidelity: Fidelity | None):
        self.name = name
        self.spec = dataclasses.replace(spec, fidelity=fidelity or Fidelity(), public_data=True)
        self.data = load_search_data(self.spec)
        self.calibration = None
        if spec.total_epsilon is not None:
            self.calibration = calibrate_study(self.spec, runs=spec.n_trials if spec.trial_count == "fixed" else None,
                                                 train_size=len(self.data.train))

    def run(self, configs, device: str) -> dict:
        arch, target_train, target_privacy = configs
        scaled = search_trial(self.spec, target_train, target_privacy, calibration=self.calibration,
                              train_size=len(self.data.train), full_train_size=self.data.full_train_size)
        start = time.perf_counter()
        result = train(arch, self.data, train_cfg=scaled.train, privacy=scaled.privacy, device=device,
                       progress=False, steps=scaled.steps, validations=scaled.validations)
        wall = time.perf_counter() - start
        pixels = self.data.image_size ** 2
        return {"val_accuracy": result["val_accuracy"], "test_accuracy": result["test_accuracy"],
                "steps": result["steps"], "batch_size": scaled.train.batch_size, "image_size": self.data.image_size,
                "train_size": len(self.data.train), "noise_multiplier": result["noise_multiplier"],
                "epsilon_spent": result["epsilon_spent"], "val_size": result["val_size"],
                "val_releases": result["val_releases"], "test_size": result["test_size"],
                "work": result["steps"] * result["expected_batch_size"] * pixels, "wall_seconds": wall}


# A training sample costs a forward, a backward and the per-sample norms: about 3 to 3.5 forwards (issue 6's step
# against a no-gradient pass). 3 is the low end: it weighs the evaluation forwards, which proxies shrink least, most.
TRAIN_FORWARDS = 3


def total_work(run: dict) -> float | None:
    """A run's training and evaluation work in forward pixels: TRAIN_FORWARDS x the sample gradients' pixels, plus
    a forward of every validation record at each release and of every test record once (None for runs recorded
    before these counts were). Several runs together carry their sum as `total_work`."""
    if "total_work" in run:
        return run["total_work"]
    if "val_releases" not in run:
        return None
    pixels = run["image_size"] ** 2
    return TRAIN_FORWARDS * run["work"] + (run["val_size"] * run["val_releases"] + run["test_size"]) * pixels


def top_overlap(a: list[float], b: list[float], k: int = 3) -> float:
    top = lambda scores: set(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])  # noqa: E731
    return len(top(a) & top(b)) / k


def mean_scores(repeats: list[list[dict]], key: str) -> list[float]:
    """Each point's mean `key` over several runs (lists of per-point records)."""
    return [statistics.fmean(runs[i][key] for runs in repeats) for i in range(len(repeats[0]))]


def summarise(name: str, runs: list[dict], full: list[list[dict]], *, ranking: bool) -> dict:
    """One proxy's row: its cost against a full run's, and its ranking against the mean of the full runs."""
    every_full = [r for repeat in full for r in repeat]
    row = {"arm": name,
           "work_ratio": statistics.fmean(r["work"] for r in runs) / statistics.fmean(r["work"] for r in every_full),
           "total_work_ratio": _total_ratio(runs, every_full),
           "wall_ratio": (statistics.fmean(r["wall_seconds"] for r in runs)
                          / statistics.fmean(r["wall_seconds"] for r in every_full)),
           "seconds_per_trial": statistics.fmean(r["wall_seconds"] for r in runs),
           "mean_val_accuracy": statistics.fmean(r["val_accuracy"] for r in runs),
           "noise_multiplier": statistics.fmean(r["noise_multiplier"] for r in runs),
           "epsilon_per_run": statistics.fmean(r["epsilon_spent"] for r in runs)}
    if ranking:
        val = [r["val_accuracy"] for r in runs]
        reference, test = mean_scores(full, "val_accuracy"), mean_scores(full, "test_accuracy")
        row["kendall_tau_val"] = float(kendalltau(val, reference).statistic)
        row["kendall_tau_test"] = float(kendalltau(val, test).statistic)
        row["top3_overlap"] = top_overlap(val, reference)
    return row


def _total_ratio(runs: list[dict], full: list[dict]) -> float | None:
    totals, full_totals = [total_work(r) for r in runs], [total_work(r) for r in full]
    if None in totals or None in full_totals:
        return None
    return statistics.fmean(totals) / statistics.fmean(full_totals)


def one_full_run(full: list[list[dict]]) -> dict:
    """A single full run against the mean of the other full runs, averaged over which run is left out."""
    rows = [summarise("one full run", full[r], full[:r] + full[r + 1:], ranking=True) for r in range(len(full))]
    return _mean_row("one full run", rows)


def half_against_half(full: list[list[dict]]) -> dict | None:
    """The mean of half the full runs (R/2 times a full run's work) against the mean of the other half, averaged
    over every split: how well even a proxy dearer than one full run can agree with a reference this noisy.
    None below 4 full runs."""
    half = len(full) // 2
    if half < 2:
        return None
    name = f"mean of {half} full runs"
    rows = []
    for chosen in itertools.combinations(range(len(full)), half):
        ours = [full[r] for r in chosen]
        rest = [full[r] for r in range(len(full)) if r not in chosen][:half]
        averaged = [{"val_accuracy": statistics.fmean(runs[i]["val_accuracy"] for runs in ours),
                     **{key: sum(runs[i][key] for runs in ours) for key in ("work", "wall_seconds")},
                     **{key: ours[0][i][key] for key in ("noise_multiplier", "epsilon_spent")},
                     "total_work": _sum_or_none(total_work(runs[i]) for runs in ours)}
                    for i in range(len(full[0]))]
        rows.append(summarise(name, averaged, rest, ranking=True))
    return _mean_row(name, rows)


def _sum_or_none(values) -> float | None:
    values = list(values)
    return None if None in values else sum(values)


def _mean_row(name: str, rows: list[dict]) -> dict:
    return {"arm": name, **{k: None if any(row[k] is None for row in rows) else statistics.fmean(row[k] for row in rows)
                            for k in rows[0] if k != "arm"}}


def table_rows(full: list[list[dict]], runs: dict[str, list[dict]], *, ranking: bool) -> list[dict]:
    """The table: the full runs' cost, the ceilings a noisy reference allows (ranking only), then each proxy."""
    rows = [summarise(f"full (mean of {len(full)})", [r for repeat in full for r in repeat], full, ranking=False)]
    if ranking:
        rows += [row for row in (one_full_run(full), half_against_half(full)) if row is not None]
    return rows + [summarise(name, arm_runs, full, ranking=ranking) for name, arm_runs in runs.items()]


def print_table(title: str, rows: list[dict]) -> None:
    ranking = any("kendall_tau_val" in row for row in rows)
    width = max(34, *(len(row["arm"]) + 2 for row in rows))
    header = f"{'arm':<{width}}{'work':>8}{'total':>8}{'wall':>8}{'s/trial':>9}{'val acc':>9}{'sigma':>8}"
    if ranking:
        header += f"{'tau val':>9}{'tau test':>9}{'top-3':>7}"
    print(f"\n{title}")
    print(header)
    for row in rows:
        total = row.get("total_work_ratio")
        line = (f"{row['arm']:<{width}}{row['work_ratio']:>8.3f}{'-' if total is None else f'{total:.3f}':>8}"
                f"{row['wall_ratio']:>8.3f}{row['seconds_per_trial']:>9.2f}"
                f"{row['mean_val_accuracy']:>9.3f}{row['noise_multiplier']:>8.3f}")
        if "kendall_tau_val" in row:
            line += f"{row['kendall_tau_val']:>9.2f}{row['kendall_tau_test']:>9.2f}{row['top3_overlap']:>7.2f}"
        print(line)


def resummarise(path: str) -> dict:
    """The table again from a written JSON's runs (after a change to what the table reports), written back."""
    result = json.loads(Path(path).read_text())
    full = result["runs"]["full"]
    proxies = {name: runs for name, runs in result["runs"].items() if name != "full"}
    result["rows"] = table_rows(full, proxies, ranking=result.get("ranking", result["points"] >= 3))
    print_table(f"{result['study']} on {result['dataset']}, {result['points']} points (from {path})", result["rows"])
    write_json(path, result)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=str(REPO / "studies" / "quickstart.toml"))
    parser.add_argument("--points", type=int, default=24, help="sampled points (default 24)")
    parser.add_argument("--full-repeats", type=int, default=3, metavar="R",
                        help="full-fidelity runs per point, whose mean is the expensive ranking (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled points")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated (default {DEFAULT_ARMS})")
    parser.add_argument("--cost-dataset", help="measure cost only, on this dataset instead (e.g. synthetic: the "
                                               "CIFAR-10 shape, 3 x 32 x 32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=writable_file, default=str(REPO / "benchmarks" / "fidelity_transfer.json"))
    parser.add_argument("--summarise", metavar="JSON", help="only rebuild the table from a written JSON's runs")
    args = parser.parse_args(argv)
    if args.summarise:
        return resummarise(args.summarise)

    spec = load_study_file(args.study)
    if args.cost_dataset:
        spec = dataclasses.replace(spec, dataset=args.cost_dataset, image_size=None)
    names = args.arms.split(",")
    if names[0] != "full":
        parser.error("--arms must start with full (the ranking every proxy is compared with)")
    fidelities = {name: parse_arm(name) for name in names}
    target_size = spec.image_size or DEFAULT_IMAGE_SIZE[spec.dataset]
    sizes = sorted({f.image_size for f in fidelities.values() if f and f.image_size} | {target_size})
    points = sample_points(spec, args.points, args.seed, sizes)
    arms = {name: Arm(name, spec, fidelity) for name, fidelity in fidelities.items()}
    if args.full_repeats < 1 or (args.full_repeats < 2 and not args.cost_dataset):
        parser.error("--full-repeats: at least 2 (the ranking's reference is their mean), or 1 with --cost-dataset")
    full: list[list[dict]] = [[] for _ in range(args.full_repeats)]
    runs: dict[str, list[dict]] = {name: [] for name in names[1:]}
    started = time.perf_counter()
    for i, (configs, params) in enumerate(points):
        # every arm of one point in a row: machine drift hits them alike
        for repeat in full:
            repeat.append({**arms["full"].run(configs, args.device), "point": i, "params": params})
        for name in names[1:]:
            runs[name].append({**arms[name].run(configs, args.device), "point": i, "params": params})
        print(f"point {i + 1}/{len(points)} done ({time.perf_counter() - started:.0f} s): full " + ", ".join(
            f"{r[-1]['val_accuracy']:.3f}" for r in full) + "; " + ", ".join(
            f"{n} {runs[n][-1]['val_accuracy']:.3f}" for n in names[1:]), flush=True)

    ranking = not args.cost_dataset and len(points) >= 3
    rows = table_rows(full, runs, ranking=ranking)
    print_table(f"{spec.name} on {spec.dataset}, {len(points)} points; work and wall relative to full", rows)
    result = {
        "benchmark": "fidelity_transfer", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "study": str(Path(args.study).resolve().relative_to(REPO)) if Path(args.study).resolve().is_relative_to(REPO)
        else args.study,
        "dataset": spec.dataset, "points": len(points), "seed": args.seed, "device": args.device,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "full_repeats": len(full), "ranking": ranking, "total_seconds": time.perf_counter() - started, "rows": rows,
        "runs": {"full": full, **runs},
        "score": "each run's released (noisy) validation accuracy; tau test ranks against the full runs' test "
                 "accuracy",
    }
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

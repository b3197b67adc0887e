"""The quickstart at 8, 16 and 32 px: accuracy and speed of each resolution, measured in one run.

scikit-learn's digits are 8x8 images; the quickstart upsamples them to 32x32 (the CIFAR shape the reference
networks were built for), 16 times the pixels of the data. Here the same study runs once per `image_size`, each
with `dpnas search` in a fresh process and a fresh journal (nothing cached by one run helps another), and reports
for each: the wall time of the whole search (as a user waits for it), trials per hour, the best trial's noisy
validation score (what selected it) and its test accuracy (the released model's, as `dpnas evaluate` prints it),
and the mean test accuracy of all completed trials. The whole search is private at the study's total ε at every
resolution.

    uv run python benchmarks/digits_resolution.py                       # about 4 minutes on 2 cores
    uv run python benchmarks/digits_resolution.py --sizes 8,16,32 --study studies/quickstart.toml

Prints a table and writes JSON (`--json`, default benchmarks/digits_resolution.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from dpnas.results import writable_file, write_json

REPO = Path(__file__).resolve().parents[1]


def with_image_size(study_text: str, size: int) -> str:
    """The study file's text with `image_size = size` in its [data] table (replacing any given)."""
    text = re.sub(r"(?m)^image_size\s*=.*\n", "", study_text)
    if not re.search(r"(?m)^\[data\]\s*$", text):
        return text + f"\n[data]\nimage_size = {size}\n"
    return re.sub(r"(?m)^\[data\]\s*$", f"[data]\nimage_size = {size}", text, count=1)


def run_size(study: Path, size: int, directory: Path, device: str) -> dict:
    path = directory / f"{study.stem}_{size}px.toml"
    path.write_text(with_image_size(study.read_text(), size))
    url = str(directory / f"{size}px.journal")
    start = time.perf_counter()
    # stdout to stderr: this script's stdout holds only the table
    done = subprocess.run([sys.executable, "-m", "dpnas", "search", str(path), "--storage", url, "--device", device],
                          stdout=sys.stderr, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the search at {size} px failed (exit status {done.returncode}; its output is above)")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    trials = optuna.load_study(study_name=None, storage=storage).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    return {
        "image_size": size,
        "wall_s": wall,
        "trials": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_per_hour": len(trials) / wall * 3600,
        "mean_trial_s": statistics.mean(t.user_attrs["wall_seconds"] for t in complete),
        "best_trial": best.number,
        "best_val_accuracy_noisy": best.value,
        "best_test_accuracy": best.user_attrs["test_accuracy"],
        "mean_test_accuracy": statistics.mean(t.user_attrs["test_accuracy"] for t in complete),
        "best_params": best.params,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "quickstart.toml")
    parser.add_argument("--sizes", default="8,16,32", help="comma-separated image sizes (default 8,16,32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=writable_file, default=REPO / "benchmarks" / "digits_resolution.json")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated whole numbers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        parser.error("--sizes: expected positive sizes")
    if not args.study.is_file():
        parser.error(f"--study {args.study}: no such file")
    rows = []
    with tempfile.TemporaryDirectory(prefix="digits-resolution-") as directory:
        for size in sizes:
            print(f"=== {args.study.name} at {size} px", file=sys.stderr, flush=True)
            rows.append(run_size(args.study, size, Path(directory), args.device))
    print(f"{args.study.name} on {args.device}, one search per resolution")
    print(f"{'px':>4} {'wall s':>7} {'trials/h':>8} {'s/trial':>7} {'best val (noisy)':>16} {'best test':>9} "
          f"{'mean test':>9}")
    for r in rows:
        print(f"{r['image_size']:>4} {r['wall_s']:>7.1f} {r['trials_per_hour']:>8.1f} {r['mean_trial_s']:>7.2f} "
              f"{r['best_val_accuracy_noisy']:>16.3f} {r['best_test_accuracy']:>9.3f} {r['mean_test_accuracy']:>9.3f}")
    result = {
        "benchmark": "digits_resolution",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/digits_resolution.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "study": str(args.study),
        "rows": rows,
    }
    write_json(args.json, result)
    print(f"written to {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

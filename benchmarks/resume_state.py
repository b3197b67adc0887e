"""What keeping a run's resume state costs: one write of the model and its optimiser after each epoch.

`dpnas train` and `dpnas reproduce` write :mod:`dpnas.dp.resume`'s state after every epoch (and when a run
stops), so a stopped run continues as the same run. This times that write (:func:`dpnas.dp.resume.save_state` of
the model's and the NAdam optimiser's state, as a run holds them after a step) for the reference networks and
the quickstart's `tiny`, into `--dir` (default: a temporary folder; name the disk the runs write to).

    uv run python benchmarks/resume_state.py

Prints a table and writes JSON (`--json`, default benchmarks/resume_state.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dpnas import MODELS, build_model, count_parameters
from dpnas.dp.config import TrainConfig
from dpnas.dp.resume import save_state
from dpnas.dp.train import make_optimizer
from dpnas.results import writable_file, write_json

NETWORKS = ("tiny", "resnet9_scalenorm", "wrn16_4", "smoothnet")


def measure(name: str, folder: Path, repeats: int) -> dict:
    model = build_model(MODELS[name].arch, num_classes=10, in_channels=3)
    optimizer = make_optimizer(model, TrainConfig(optimizer="nadam"))
    for parameter in model.parameters():  # one step, so the optimiser holds its moments as a run's does
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    path = folder / f"{name}.resume.pt"
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        save_state({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        seconds.append(time.perf_counter() - start)
    return {"network": name, "params": count_parameters(model), "megabytes": path.stat().st_size / 1e6,
            "median_ms": 1000 * statistics.median(seconds), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="writes per network (the median reported)")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", type=writable_file, default="benchmarks/resume_state.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows = [measure(name, Path(folder), args.repeats) for name in NETWORKS]
    print(f"{'network':20} {'parameters':>11} {'MB':>7} {'ms a write':>11}")
    for row in rows:
        print(f"{row['network']:20} {row['params']:>11,} {row['megabytes']:>7.2f} {row['median_ms']:>11.1f}")
    write_json(args.json, {"benchmark": "resume_state", "date": datetime.date.today().isoformat(),
                           "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
                           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "rows": rows})
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

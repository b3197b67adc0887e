"""A total-ε study's noise calibration: how many RDP curves it computes and how long it takes.

Each evaluation of the root finder (:func:`dpnas.search.calibration._smallest`) is one run's RDP curve, Opacus's
``compute_rdp``, whose per-order series is pure Python; everything else in the calibration is negligible. Two
cases, each from cold caches in this process: the quickstart (one run shape, 6 trials at a total ε = 8) and a study
that searches 3 batch sizes x 2 epoch counts (6 shapes calibrated together, 20 trials). To compare two versions,
run this script with ``PYTHONPATH=<other checkout>``: it uses only :func:`dpnas.search.calibration.calibrate`.

    uv run python benchmarks/calibration_speed.py

Prints a table and writes JSON (`--json`, default benchmarks/calibration_speed.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import dpnas.dp.privacy as dp_privacy
from dpnas.results import writable_file, write_json
from dpnas.search import calibration

# the quickstart's training split (digits, val_fraction 0.2, seed 0); any size gives the same count of evaluations
TRAIN_SIZE = 1150
CASES = {
    "quickstart: 1 shape, 6 trials": dict(runs=6, shapes=[(256, 8)]),
    "6 shapes (batch 64/128/256 x 4/8 epochs), 20 trials": dict(runs=20, shapes=[(b, e) for b in (64, 128, 256)
                                                                                   for e in (4, 8)]),
}


def measure(case: dict, repeats: int) -> dict:
    calls = []
    opacus_compute_rdp = dp_privacy.compute_rdp

    def counted(**kwargs):
        calls.append(kwargs["noise_multiplier"])
        return opacus_compute_rdp(**kwargs)

    dp_privacy.compute_rdp = counted
    try:
        seconds = []
        for _ in range(repeats):
            calibration.clear_cache()
            dp_privacy.forget_step_rdp()
            calls.clear()
            start = time.perf_counter()
            result = calibration.calibrate(8.0, 1e-5, mode="fixed", train_size=TRAIN_SIZE, **case)
            seconds.append(time.perf_counter() - start)
    finally:
        dp_privacy.compute_rdp = opacus_compute_rdp
    return {"rdp_curves": len(calls), "seconds": min(seconds), "noise_multipliers": result.noise_multipliers,
            "training_epsilon": result.training_epsilon, "validation_epsilon": result.validation_epsilon}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cold calibrations per case (the fastest reported)")
    parser.add_argument("--json", type=writable_file, default="benchmarks/calibration_speed.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows = [{"case": name, **measure(case, args.repeats)} for name, case in CASES.items()]
    print(f"{'case':55} {'RDP curves':>10} {'seconds':>8} {'training ε':>11}  σ")
    for row in rows:
        sigmas = ", ".join(f"{s:.4f}" for s in row["noise_multipliers"].values())
        print(f"{row['case']:55} {row['rdp_curves']:>10} {row['seconds']:>8.2f} {row['training_epsilon']:>11.4f}  "
              f"{sigmas}")
    write_json(args.json, {"benchmark": "calibration_speed", "date": datetime.date.today().isoformat(),
                           "command": " ".join(sys.argv), "calibration_module": calibration.__file__,
                           "machine": platform.processor() or platform.machine(), "args": vars(args), "rows": rows})
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

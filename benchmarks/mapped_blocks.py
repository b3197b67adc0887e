"""Large blocks from mmap or from the heap: dpnas's step and a non-private one, both ways in one process.

glibc serves a block above its mmap threshold with a fresh mapping, which the OS zero-fills page by page on first
touch, and unmaps it when freed. `dpnas.dp.host_memory` raises that threshold to its largest, 32 MiB; larger
blocks are still mapped, every time. Allowing no mapped blocks at all (``mallopt(M_MMAP_MAX, 0)``) serves them
from the heap too, and they are reused step after step. Which blocks exceed 32 MiB depends on the shapes: a
batch's unfolded patches (32 x 161 x 9 x 16 x 16 floats in SmoothNet, 45 MB), a grouped convolution's per-sample
weight gradients, a wide dense block's activations. Issue 17's eighth pass measured this lever and did not keep
it: the reference networks' DP steps got 4-8 % faster, and dpnas's peak memory moved by -1 to +13 % (SmoothNet's
above Opacus's in one of two runs), as the heap fragments around blocks of many sizes (benchmarks/RESULTS.md).

For each model this times `step_breakdown.breakdown` (a non-private forward + backward and dpnas's forward,
backward, norms and clipped sums, taking turns step by step) with large blocks mapped (M_MMAP_MAX at glibc's
default, 65536) and from the heap (0), the two settings taking turns for `--rounds` rounds in one process, and
reports the medians. Everything else is dpnas's own setting (32 MiB threshold, 1 GiB trim), and the process
leaves with glibc's default M_MMAP_MAX, which dpnas keeps.

    uv run python benchmarks/mapped_blocks.py --models smoothnet,resnet9_scalenorm,wrn16_4 --batch-size 32
    uv run python benchmarks/mapped_blocks.py --models "" --points studies/quickstart.toml --n 5

Prints a table and writes JSON (`--json`, default benchmarks/mapped_blocks.json).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.util
import platform
import statistics
import sys
from pathlib import Path

import torch

from dpnas.bench import add_model_options, models_from_options
from dpnas.dp.host_memory import keep_freed_host_memory
from dpnas.results import writable_file, write_json

M_MMAP_MAX = -4  # mallopt's parameter number (glibc's malloc.h)
GLIBC_DEFAULT_MMAP_MAX = 65536
SETTINGS = {"mapped": GLIBC_DEFAULT_MMAP_MAX, "heap": 0}
PARTS = ("nonprivate_forward_backward_ms", "dpnas_forward_backward_ms", "dpnas_norms_and_sums_ms")


def load_step_breakdown():
    spec = importlib.util.spec_from_file_location("step_breakdown", Path(__file__).with_name("step_breakdown.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_mmap_max(value: int) -> None:
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not mallopt(M_MMAP_MAX, value):
        raise RuntimeError(f"mallopt(M_MMAP_MAX, {value}) failed")


def compare(model, *, batch_size: int, steps: int, rounds: int, device: str, breakdown) -> dict:  # noqa: ANN001
    """Medians over `rounds` of each part's median ms, per setting; the settings take turns (which goes first
    alternates from round to round)."""
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_ in range(rounds):
        order = list(SETTINGS) if round_ % 2 == 0 else list(reversed(SETTINGS))
        for name in order:
            set_mmap_max(SETTINGS[name])
            runs[name].append(breakdown(model, batch_size=batch_size, steps=steps, device=device))
    set_mmap_max(GLIBC_DEFAULT_MMAP_MAX)  # back to dpnas's own setting
    row: dict = {"model": model.label, "batch_size": model.batch_size or batch_size, "rounds": rounds}
    for name, results in runs.items():
        for part in PARTS:
            row[f"{name}_{part}"] = statistics.median(r[part] for r in results)
        row[f"{name}_dpnas_ms"] = row[f"{name}_dpnas_forward_backward_ms"] + row[f"{name}_dpnas_norms_and_sums_ms"]
        row[f"{name}_dpnas_vs_nonprivate"] = row[f"{name}_dpnas_ms"] / row[f"{name}_nonprivate_forward_backward_ms"]
    for what in ("nonprivate_forward_backward_ms", "dpnas_ms"):
        row[f"{what}_mapped_over_heap"] = row[f"mapped_{what}"] / row[f"heap_{what}"]
    return row


def format_table(rows: list[dict]) -> str:
    header = (f"{'model':<24} {'batch':>5} {'nonprivate ms mapped/heap':>26} {'x':>5} {'dpnas ms mapped/heap':>21} "
              f"{'x':>5} {'dpnas/nonpriv mapped/heap':>26}")
    lines = [header, "-" * len(header)]
    for r in rows:
        nonprivate = f"{r['mapped_nonprivate_forward_backward_ms']:.1f} / {r['heap_nonprivate_forward_backward_ms']:.1f}"
        dpnas = f"{r['mapped_dpnas_ms']:.1f} / {r['heap_dpnas_ms']:.1f}"
        ratio = f"{r['mapped_dpnas_vs_nonprivate']:.2f} / {r['heap_dpnas_vs_nonprivate']:.2f}"
        lines.append(f"{r['model']:<24} {r['batch_size']:>5} {nonprivate:>26} "
                     f"{r['nonprivate_forward_backward_ms_mapped_over_heap']:>5.2f} {dpnas:>21} "
                     f"{r['dpnas_ms_mapped_over_heap']:>5.2f} {ratio:>26}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, default="smoothnet,resnet9_scalenorm,wrn16_4")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per breakdown (median)")
    parser.add_argument("--rounds", type=int, default=4, help="breakdowns per setting, taking turns (median)")
    parser.add_argument("--json", type=writable_file, default="benchmarks/mapped_blocks.json")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.rounds) < 1:
        parser.error("--batch-size, --steps and --rounds must be >= 1")
    if not keep_freed_host_memory():
        parser.error("needs glibc's malloc, with DPNAS_KEEP_FREED_MEMORY unset (the setting this compares against)")
    models = models_from_options(parser, args)  # unknown names fail before any model runs
    breakdown = load_step_breakdown().breakdown
    rows = []
    for model in models:
        print(f"  {model.label} ...", file=sys.stderr, flush=True)
        rows.append(compare(model, batch_size=args.batch_size, steps=args.steps, rounds=args.rounds, device="cpu",
                            breakdown=breakdown))
        write_json(args.json, {"benchmark": "mapped_blocks", "date": datetime.date.today().isoformat(),
                               "command": " ".join(["python", "benchmarks/mapped_blocks.py", *(argv or sys.argv[1:])]),
                               "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
                               "torch": torch.__version__, "args": vars(args), "rows": rows})
    print(format_table(rows))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The 3x3 stride-1 smoothing pool: PyTorch's NCHW kernels against the formulations dpnas could use instead.

Two tables, each measured in one process with the candidates taking turns (drift on a shared machine hits all):

* the pool alone, forward + backward, at the shapes SmoothNet and the quickstart's points give it:
  ``nn.MaxPool2d(3, 1, 1)`` (NCHW), the channels-last kernel dpnas uses (:class:`dpnas.arch.layers.SmoothingMaxPool`),
  two separable 1-D pools, and the same three for ``nn.AvgPool2d(3, 1, 1)`` (dpnas keeps PyTorch's there);
* a whole non-private step (forward + backward) of each model with PyTorch's max pool and with dpnas's: the
  "before" and "after" of the change, on SmoothNet W80D50 and on seeded random points of the quickstart's space
  that use max smoothing;
* the max pool without a gradient (a validation or test pass), at the quickstart's validation shapes: the NCHW
  and channels-last kernels against the maximum of shifted views, out of place and as dpnas computes it.

    uv run python benchmarks/pool_smoothing.py                      # about 3 minutes on 2 cores

Prints both tables and writes JSON (`--json`, default benchmarks/pool_smoothing.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dpnas.arch.layers import SmoothingMaxPool, shifted_max3
from dpnas.arch.models import build_model
from dpnas.arch.space import ArchConfig
from dpnas.bench import BenchModel, resolve_model, study_points
from dpnas.results import write_json

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(64, 3, 32, 32), (256, 16, 32, 32), (256, 32, 16, 16), (32, 80, 32, 32), (32, 80, 16, 16)]


def separable_max(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(F.max_pool2d(x, (1, 3), 1, (0, 1)), (3, 1), 1, (1, 0))


def separable_avg(x: torch.Tensor) -> torch.Tensor:  # equal to AvgPool2d(3, 1, 1) up to rounding
    return F.avg_pool2d(F.avg_pool2d(x, (1, 3), 1, (0, 1)), (3, 1), 1, (1, 0))


def channels_last_avg(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 1, 1).contiguous()


POOLS = {
    "max: nn.MaxPool2d (NCHW)": nn.MaxPool2d(3, 1, 1),
    "max: channels-last (dpnas)": SmoothingMaxPool(),
    "max: separable 1-D": separable_max,
    "avg: nn.AvgPool2d (NCHW, dpnas)": nn.AvgPool2d(3, 1, 1),
    "avg: channels-last": channels_last_avg,
    "avg: separable 1-D": separable_avg,
}


def best_of_turns(functions: dict, rounds: int) -> dict[str, float]:
    """The median seconds of each function over `rounds` rounds in which they take turns (after one warm-up)."""
    for fn in functions.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def pool_rows(rounds: int) -> list[dict]:
    rows = []
    for shape in SHAPES:
        x = torch.randn(*shape)
        upstream = torch.randn(*shape)

        def fwd_bwd(pool):  # noqa: ANN001, ANN202
            def run() -> None:
                leaf = x.detach().requires_grad_()
                pool(leaf).backward(upstream)
            return run

        seconds = best_of_turns({name: fwd_bwd(pool) for name, pool in POOLS.items()}, rounds)
        for name, s in seconds.items():
            reference = seconds["max: nn.MaxPool2d (NCHW)" if name.startswith("max") else "avg: nn.AvgPool2d (NCHW, dpnas)"]
            rows.append({"shape": list(shape), "pool": name, "ms": s * 1e3, "speedup_vs_pytorch": reference / s})
    return rows


NO_GRAD_SHAPES = [(262, 4, 16, 16), (262, 8, 16, 16), (262, 16, 16, 16), (262, 32, 8, 8), (512, 24, 16, 16)]


def shifted_max_out_of_place(x: torch.Tensor) -> torch.Tensor:
    """The shifted views' maximum with every maximum in a fresh tensor (dpnas's first version of it)."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(padded[..., 0:width], padded[..., 1:width + 1]), padded[..., 2:width + 2])
    return torch.maximum(torch.maximum(rows[..., 0:height, :], rows[..., 1:height + 1, :]), rows[..., 2:height + 2, :])


NO_GRAD_POOLS = {
    "nn.MaxPool2d (NCHW)": nn.MaxPool2d(3, 1, 1),
    "channels-last kernel": lambda x: F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 1, 1)
    .contiguous(),
    "shifted views, out of place": shifted_max_out_of_place,
    "shifted views (dpnas)": shifted_max3,
}


def no_grad_rows(rounds: int) -> list[dict]:
    rows = []
    for shape in NO_GRAD_SHAPES:
        x = torch.randn(*shape)

        def forward(pool):  # noqa: ANN001, ANN202
            def run() -> None:
                with torch.no_grad():
                    pool(x)
            return run

        seconds = best_of_turns({name: forward(pool) for name, pool in NO_GRAD_POOLS.items()}, 4 * rounds)
        for name, sec in seconds.items():
            rows.append({"shape": list(shape), "pool": name, "ms": sec * 1e3,
                         "speedup_vs_pytorch": seconds["nn.MaxPool2d (NCHW)"] / sec})
    return rows


def with_pytorch_pools(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, SmoothingMaxPool):
                setattr(parent, name, nn.MaxPool2d(3, 1, 1))
    return model


def step_rows(models: list[BenchModel], rounds: int, batch_size: int) -> list[dict]:
    rows = []
    for spec in models:
        torch.manual_seed(0)
        after = build_model(ArchConfig.from_dict(spec.arch), num_classes=10, in_channels=spec.in_channels)
        before = with_pytorch_pools(after)
        batch = spec.batch_size or batch_size
        x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size)
        y = torch.randint(0, 10, (batch,))

        def step(model):  # noqa: ANN001, ANN202
            def run() -> None:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
            return run

        print(f"  {spec.label} ...", file=sys.stderr, flush=True)
        seconds = best_of_turns({"before": step(before), "after": step(after)}, rounds)
        rows.append({"model": spec.label, "batch_size": batch, "before_ms": seconds["before"] * 1e3,
                     "after_ms": seconds["after"] * 1e3, "speedup": seconds["before"] / seconds["after"]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smoothnet", help="named models or files (default smoothnet)")
    parser.add_argument("--points", type=Path, default=REPO / "studies" / "quickstart.toml")
    parser.add_argument("--n", type=int, default=3, help="max-smoothing points of --points (default 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="of named models; points use their study's")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "pool_smoothing.json")
    args = parser.parse_args(argv)
    models = [resolve_model(m) for m in args.models.split(",") if m.strip()]
    if args.n:
        points = [p for p in study_points(args.points, 8 * args.n) if p.arch["pool"] == "max_smooth"][: args.n]
        models += points
    pools = pool_rows(args.rounds)
    steps = step_rows(models, args.rounds, args.batch_size)
    no_grad = no_grad_rows(args.rounds)
    print(f"{'shape':<18} {'pool':<32} {'fwd+bwd ms':>10} {'x PyTorch':>9}")
    for r in pools:
        print(f"{'x'.join(map(str, r['shape'])):<18} {r['pool']:<32} {r['ms']:>10.2f} {r['speedup_vs_pytorch']:>9.2f}")
    print(f"\n{'model':<16} {'batch':>5} {'step ms, nn.MaxPool2d':>21} {'step ms, dpnas':>14} {'speed-up':>8}")
    for r in steps:
        print(f"{r['model']:<16} {r['batch_size']:>5} {r['before_ms']:>21.1f} {r['after_ms']:>14.1f} {r['speedup']:>8.2f}")
    print(f"\n{'shape':<18} {'max pool, no gradient':<32} {'fwd ms':>10} {'x PyTorch':>9}")
    for r in no_grad:
        print(f"{'x'.join(map(str, r['shape'])):<18} {r['pool']:<32} {r['ms']:>10.3f} {r['speedup_vs_pytorch']:>9.2f}")
    result = {"benchmark": "pool_smoothing",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/pool_smoothing.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
              "torch": torch.__version__, "pools": pools, "steps": steps, "no_grad": no_grad}
    write_json(args.json, result)
    print(f"written to {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

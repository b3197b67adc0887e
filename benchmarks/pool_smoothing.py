"""The pools of the search space: PyTorch's NCHW kernels against the formulations dpnas uses instead.

Four tables, each measured in one process with the candidates taking turns (drift on a shared machine hits all):

* the 3x3 stride-1 smoothing pool alone, forward + backward, at the shapes SmoothNet and the quickstart's points
  give it: ``nn.MaxPool2d(3, 1, 1)`` (NCHW), the channels-last kernel with both passes converted, dpnas's
  (:class:`dpnas.arch.pools.SmoothingMaxPool`: that forward, an NCHW scatter backward) and two separable 1-D pools; for ``nn.AvgPool2d(3, 1, 1)`` the
  channels-last kernel, the separable pools and dpnas's shifted views (:class:`dpnas.arch.pools.SmoothingAvgPool`);
* the average pools that downsample (``nn.AvgPool2d(2, 2)`` against :class:`dpnas.arch.pools.HalvingAvgPool`) and
  the head's pool where it is an identity (``nn.AdaptiveAvgPool2d`` against :class:`dpnas.arch.pools.HeadAvgPool`),
  forward alone and forward + backward;
* a whole non-private step (forward + backward) of each model with PyTorch's pools, with dpnas's max smoothing
  pool only and with all of dpnas's pools, on SmoothNet W80D50 and on seeded
  random points of the quickstart's space, both with the smoothing pool `--smoothing` names (max_smooth by
  default; avg_smooth puts average smoothing into the points and SmoothNet);
* the max pool without a gradient (a validation or test pass), at the quickstart's validation shapes: the NCHW
  and channels-last kernels against the maximum of shifted views, out of place and as dpnas computes it.

    uv run python benchmarks/pool_smoothing.py                      # about 3 minutes on 2 cores

Prints the tables and writes JSON (`--json`, default benchmarks/pool_smoothing.json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dpnas.arch.models import build_model
from dpnas.arch.pools import HalvingAvgPool, HeadAvgPool, SmoothingAvgPool, SmoothingMaxPool, shifted_max3
from dpnas.arch.space import ArchConfig
from dpnas.bench import BenchModel, resolve_model, study_points
from dpnas.results import writable_file, write_json

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(64, 3, 32, 32), (256, 16, 32, 32), (256, 32, 16, 16), (32, 80, 32, 32), (32, 80, 16, 16)]


def separable_max(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(F.max_pool2d(x, (1, 3), 1, (0, 1)), (3, 1), 1, (1, 0))


def separable_avg(x: torch.Tensor) -> torch.Tensor:  # equal to AvgPool2d(3, 1, 1) up to rounding
    return F.avg_pool2d(F.avg_pool2d(x, (1, 3), 1, (0, 1)), (3, 1), 1, (1, 0))


def channels_last_avg(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 1, 1).contiguous()


def channels_last_max(x: torch.Tensor) -> torch.Tensor:
    """PyTorch's channels-last kernel with the input converted in and the output back (both passes, with a
    gradient: dpnas's training pool before its NCHW scatter backward)."""
    return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 1, 1).contiguous()


POOLS = {
    "max: nn.MaxPool2d (NCHW)": nn.MaxPool2d(3, 1, 1),
    "max: channels-last both ways": channels_last_max,
    "max: channels-last, NCHW scatter backward (dpnas)": SmoothingMaxPool(),
    "max: separable 1-D": separable_max,
    "avg: nn.AvgPool2d (NCHW)": nn.AvgPool2d(3, 1, 1),
    "avg: shifted views (dpnas)": SmoothingAvgPool(),
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
            reference = seconds["max: nn.MaxPool2d (NCHW)" if name.startswith("max") else "avg: nn.AvgPool2d (NCHW)"]
            rows.append({"shape": list(shape), "pool": name, "ms": s * 1e3, "speedup_vs_pytorch": reference / s})
    return rows


# (shape, PyTorch's module, dpnas's): the quickstart's points at 16 px (transitions at 16 and 8 px, the head's
# 4 x 4 features at batch 256), and SmoothNet W80D50's transitions at batch 32
AVERAGE_POOL_CASES = [
    ((256, 17, 16, 16), nn.AvgPool2d(2, stride=2), HalvingAvgPool()),
    ((256, 40, 8, 8), nn.AvgPool2d(2, stride=2), HalvingAvgPool()),
    ((32, 323, 32, 32), nn.AvgPool2d(2, stride=2), HalvingAvgPool()),
    ((32, 683, 16, 16), nn.AvgPool2d(2, stride=2), HalvingAvgPool()),
    ((256, 32, 4, 4), nn.AdaptiveAvgPool2d(4), HeadAvgPool(4)),
]


def average_pool_rows(rounds: int) -> list[dict]:
    rows = []
    for shape, pytorch, dpnas in AVERAGE_POOL_CASES:
        x = torch.randn(*shape)
        upstream = pytorch(x)

        def forward(pool):  # noqa: ANN001, ANN202
            return lambda: pool(x)

        def fwd_bwd(pool):  # noqa: ANN001, ANN202
            def run() -> None:
                leaf = x.detach().requires_grad_()
                pool(leaf).backward(upstream)
            return run

        seconds = best_of_turns({"forward, PyTorch": forward(pytorch), "forward, dpnas": forward(dpnas),
                                 "fwd+bwd, PyTorch": fwd_bwd(pytorch), "fwd+bwd, dpnas": fwd_bwd(dpnas)}, 4 * rounds)
        rows.append({"shape": list(shape), "pool": type(pytorch).__name__,
                     **{f"{part}_ms".replace(", ", "_").replace("+", "_").lower(): sec * 1e3
                        for part, sec in seconds.items()},
                     "forward_speedup": seconds["forward, PyTorch"] / seconds["forward, dpnas"],
                     "fwd_bwd_speedup": seconds["fwd+bwd, PyTorch"] / seconds["fwd+bwd, dpnas"]})
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
    "channels-last kernel": channels_last_max,
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


def with_pytorch_pools(model: nn.Module, *, keep_max_smoothing: bool = False) -> nn.Module:
    """A copy of `model` with PyTorch's pools for dpnas's (`keep_max_smoothing`: all but the max smoothing pool)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, SmoothingMaxPool) and not keep_max_smoothing:
                setattr(parent, name, nn.MaxPool2d(3, 1, 1))
            elif isinstance(child, SmoothingAvgPool):
                setattr(parent, name, nn.AvgPool2d(3, 1, 1))
            elif isinstance(child, HalvingAvgPool):
                setattr(parent, name, nn.AvgPool2d(2, stride=2))
            elif isinstance(child, HeadAvgPool):
                setattr(parent, name, nn.AdaptiveAvgPool2d(child.output_size))
    return model


STEP_VARIANTS = ("pytorch_pools", "max_smoothing_only", "dpnas_pools")


def step_rows(models: list[BenchModel], rounds: int, batch_size: int) -> list[dict]:
    rows = []
    for spec in models:
        torch.manual_seed(0)
        dpnas_pools = build_model(ArchConfig.from_dict(spec.arch), num_classes=10, in_channels=spec.in_channels,
                                  image_size=spec.image_size)
        variants = {"pytorch_pools": with_pytorch_pools(dpnas_pools),
                    "max_smoothing_only": with_pytorch_pools(dpnas_pools, keep_max_smoothing=True),
                    "dpnas_pools": dpnas_pools}
        batch = spec.batch_size or batch_size
        x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size)
        y = torch.randint(0, 10, (batch,))

        def step(model):  # noqa: ANN001, ANN202
            def run() -> None:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
            return run

        print(f"  {spec.label} ...", file=sys.stderr, flush=True)
        seconds = best_of_turns({name: step(model) for name, model in variants.items()}, rounds)
        rows.append({"model": spec.label, "batch_size": batch, **{f"{v}_ms": seconds[v] * 1e3 for v in STEP_VARIANTS},
                     # before / after: all of PyTorch's pools against all of dpnas's; and this average-pool lever alone
                     "speedup": seconds["pytorch_pools"] / seconds["dpnas_pools"],
                     "average_pools_speedup": seconds["max_smoothing_only"] / seconds["dpnas_pools"]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smoothnet", help="named models or files (default smoothnet)")
    parser.add_argument("--points", type=Path, default=REPO / "studies" / "quickstart.toml")
    parser.add_argument("--n", type=int, default=3, help="points of --points, with --smoothing (default 3)")
    parser.add_argument("--smoothing", choices=("max_smooth", "avg_smooth"), default="max_smooth",
                        help="the smoothing pool of the models and points in the step table")
    parser.add_argument("--batch-size", type=int, default=32, help="of named models; points use their study's")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=writable_file, default=REPO / "benchmarks" / "pool_smoothing.json")
    args = parser.parse_args(argv)
    models = [resolve_model(m) for m in args.models.split(",") if m.strip()]
    if args.n:
        # the points that smooth at all (a seeded draw, so the same ones each run), with the pool asked for
        points = [p for p in study_points(args.points, 8 * args.n) if p.arch["pool"] != "none"][: args.n]
        models += points
    models = [dataclasses.replace(m, arch={**m.arch, "pool": args.smoothing}) for m in models]
    pools = pool_rows(args.rounds)
    average_pools = average_pool_rows(args.rounds)
    steps = step_rows(models, args.rounds, args.batch_size)
    no_grad = no_grad_rows(args.rounds)
    print(f"{'shape':<18} {'pool':<50} {'fwd+bwd ms':>10} {'x PyTorch':>9}")
    for r in pools:
        print(f"{'x'.join(map(str, r['shape'])):<18} {r['pool']:<50} {r['ms']:>10.2f} {r['speedup_vs_pytorch']:>9.2f}")
    print(f"\n{'shape':<18} {'PyTorch pool':<18} {'fwd ms':>7} {'dpnas':>7} {'x':>5} {'fwd+bwd ms':>10} {'dpnas':>7} "
          f"{'x':>5}")
    for r in average_pools:
        print(f"{'x'.join(map(str, r['shape'])):<18} {r['pool']:<18} {r['forward_pytorch_ms']:>7.3f} "
              f"{r['forward_dpnas_ms']:>7.3f} {r['forward_speedup']:>5.2f} {r['fwd_bwd_pytorch_ms']:>10.3f} "
              f"{r['fwd_bwd_dpnas_ms']:>7.3f} {r['fwd_bwd_speedup']:>5.2f}")
    print(f"\n{'model':<16} {'batch':>5} {'step ms: PyTorch pools':>22} {'dpnas max smoothing only':>24} "
          f"{'dpnas pools':>11} {'speed-up':>8} {'avg pools':>9}")
    for r in steps:
        print(f"{r['model']:<16} {r['batch_size']:>5} {r['pytorch_pools_ms']:>22.1f} {r['max_smoothing_only_ms']:>24.1f} "
              f"{r['dpnas_pools_ms']:>11.1f} {r['speedup']:>8.2f} {r['average_pools_speedup']:>9.2f}")
    print(f"\n{'shape':<18} {'max pool, no gradient':<32} {'fwd ms':>10} {'x PyTorch':>9}")
    for r in no_grad:
        print(f"{'x'.join(map(str, r['shape'])):<18} {r['pool']:<32} {r['ms']:>10.3f} {r['speedup_vs_pytorch']:>9.2f}")
    result = {"benchmark": "pool_smoothing",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/pool_smoothing.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
              "torch": torch.__version__, "smoothing": args.smoothing, "pools": pools, "average_pools": average_pools, "steps": steps,
              "no_grad": no_grad}
    write_json(args.json, result)
    print(f"written to {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

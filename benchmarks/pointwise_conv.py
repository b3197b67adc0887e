"""A 1x1 convolution on the CPU: oneDNN's kernels against one matrix product per sample, for the three gradients a
training step can ask of it.

* ``input grad``: forward and the input's gradient only, what dpnas's per-sample backward asks (no weight requires
  a gradient there): oneDNN's convolution against :mod:`dpnas.dp.pointwise`'s products (kept);
* ``both grads``: forward, the input's and the weight's gradient, what a non-private step and Opacus's hooks ask:
  against products with the weight gradient as a batched product summed over the batch (not kept);
* ``forward``: no gradient, what an evaluation asks: against the product alone (not kept).

Each candidate is checked against the convolution's values first; the two take turns in one process (median of
``--rounds``). The shapes are the quickstart's transitions (16 px digits, batch 256), the throughput grid's wider
ones, SmoothNet's transitions and WRN-16-4's stride-1 shortcut (batch 32).

``--eval-points STUDY --n K`` also times whole evaluation passes (no gradient, ``--eval-rows`` rows: the quickstart's
validation split) of K seeded points of a study's space, with their 1x1 convolutions as oneDNN's or as products,
in turn: whether the forward's gain survives inside a model.

    uv run python benchmarks/pointwise_conv.py
    uv run python benchmarks/pointwise_conv.py --eval-points studies/quickstart.toml --n 5

Prints a table and writes JSON (`--json`, default benchmarks/pointwise_conv.json).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from dpnas.arch.models import build_model
from dpnas.arch.space import ArchConfig
from dpnas.bench import BenchModel, bench_models
from dpnas.dp.pointwise import _PointwiseProduct, is_pointwise
from dpnas.results import writable_file, write_json

# (batch, input channels, output channels, height = width)
CASES = [(256, 11, 5, 16), (256, 12, 6, 16), (256, 16, 8, 16), (256, 32, 16, 16), (256, 64, 32, 16),
         (32, 67, 33, 32), (32, 323, 161, 32), (32, 16, 64, 32)]


def _product_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The product alone (what :mod:`dpnas.dp.pointwise` computes forward)."""
    n, c, h, w = x.shape
    return torch.matmul(weight.view(-1, c), x.view(n, c, h * w)).view(n, -1, h, w)


class _ProductWithWeightGrad(torch.autograd.Function):
    """The product for both gradients: the weight's as ``sum_n g_n x_n^T`` (one batched product, then a sum)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _product_forward(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        g = grad.reshape(n, -1, h * w)
        x_grad = torch.matmul(weight.view(-1, c).t(), g).view(n, c, h, w)
        return x_grad, torch.bmm(g, x.view(n, c, h * w).transpose(1, 2)).sum(0).view_as(weight)


def _runs(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> dict[str, dict]:
    """Per case: what each candidate computes, as a function that returns the tensors it is checked on."""
    frozen = weight.detach()
    with_grad = weight.detach().requires_grad_(True)

    def forward(fn):
        def run():
            with torch.no_grad():
                return (fn(x, frozen),)
        return run

    return {
        "input grad": {"oneDNN": lambda: torch.autograd.grad(F.conv2d(x, frozen), x, grad),
                       "products": lambda: torch.autograd.grad(_PointwiseProduct.apply(x, frozen), x, grad)},
        "both grads": {"oneDNN": lambda: torch.autograd.grad(F.conv2d(x, with_grad), (x, with_grad), grad),
                       "products": lambda: torch.autograd.grad(_ProductWithWeightGrad.apply(x, with_grad),
                                                               (x, with_grad), grad)},
        "forward": {"oneDNN": forward(F.conv2d), "products": forward(_product_forward)},
    }


def time_case(case: tuple[int, int, int, int], rounds: int) -> dict:
    n, c_in, c_out, size = case
    torch.manual_seed(0)
    x = torch.randn(n, c_in, size, size, requires_grad=True)
    weight = torch.randn(c_out, c_in, 1, 1) / c_in**0.5
    grad = torch.randn(n, c_out, size, size)
    row = {"case": list(case)}
    for task, candidates in _runs(x, weight, grad).items():
        expected = candidates["oneDNN"]()
        for got, want in zip(candidates["products"](), expected):  # the same values, and a warm-up
            if (got - want).norm() > 1e-5 * want.norm():  # float32 sums in another order
                raise AssertionError(f"products differ from oneDNN's convolution on {case} ({task})")
        seconds = {name: [] for name in candidates}
        for r in range(rounds):
            for name in (list(candidates) if r % 2 else list(candidates)[::-1]):
                start = time.perf_counter()
                candidates[name]()
                seconds[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(s) * 1e3 for name, s in seconds.items()}
        row[task] = {**ms, "oneDNN_over_products": ms["oneDNN"] / ms["products"]}
    return row


@contextlib.contextmanager
def _forward_as_products(convs: list[nn.Conv2d]):
    """The lever not kept: every call of `convs` as the product, gradient or not (biasless 1x1 convolutions)."""
    for conv in convs:
        conv.forward = functools.partial(_product_forward, weight=conv.weight)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


def time_eval_passes(model: BenchModel, rows: int, rounds: int) -> dict:
    """Median ms of a no-gradient pass over `rows` rows with oneDNN's 1x1 convolutions and with products, in turn."""
    torch.manual_seed(0)
    net = build_model(ArchConfig.from_dict(model.arch), num_classes=10, in_channels=model.in_channels).eval()
    convs = [m for m in net.modules() if is_pointwise(m) and m.bias is None]
    x = torch.randn(rows, model.in_channels, model.image_size, model.image_size)
    with torch.no_grad():
        expected = net(x)
        with _forward_as_products(convs):
            if (net(x) - expected).norm() > 1e-5 * expected.norm():
                raise AssertionError(f"products change {model.label}'s logits")
        seconds: dict[str, list[float]] = {"oneDNN": [], "products": []}
        for r in range(rounds):
            for name in (("oneDNN", "products") if r % 2 else ("products", "oneDNN")):
                with _forward_as_products(convs if name == "products" else []):
                    start = time.perf_counter()
                    net(x)
                    seconds[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(s) * 1e3 for name, s in seconds.items()}
    return {"model": model.label, "arch": model.arch, "rows": rows, "pointwise_convs": len(convs), **ms,
            "oneDNN_over_products": ms["oneDNN"] / ms["products"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per candidate (median reported)")
    parser.add_argument("--json", type=writable_file, default="benchmarks/pointwise_conv.json")
    parser.add_argument("--eval-points", metavar="STUDY_FILE", help="also time evaluation passes of --n points")
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--eval-rows", type=int, default=262, help="rows of an evaluation pass (digits' validation)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.n < 1 or args.eval_rows < 1:
        parser.error("--rounds, --n and --eval-rows must be at least 1")
    try:  # a missing or broken study file fails before anything is timed
        points = bench_models("", args.eval_points, args.n) if args.eval_points else []
    except (ValueError, OSError) as err:
        parser.error(str(err))
    rows = [time_case(case, args.rounds) for case in CASES]
    tasks = ("input grad", "both grads", "forward")
    print(f"{'batch x in -> out @ size':26} " + " ".join(f"{t + ' oneDNN / products ms':>34}" for t in tasks))
    for row in rows:
        n, c_in, c_out, size = row["case"]
        cells = [f"{row[t]['oneDNN']:8.2f} / {row[t]['products']:6.2f} = {row[t]['oneDNN_over_products']:4.2f}x"
                 for t in tasks]
        print(f"{f'{n} x {c_in} -> {c_out} @ {size}':26} " + " ".join(f"{c:>34}" for c in cells))
    eval_rows = [time_eval_passes(point, args.eval_rows, 2 * args.rounds) for point in points]
    for row in eval_rows:
        print(f"{row['model']:<18} evaluation pass of {row['rows']} rows, {row['pointwise_convs']} 1x1 conv(s): "
              f"oneDNN {row['oneDNN']:.2f} ms, products {row['products']:.2f} ms = {row['oneDNN_over_products']:.2f}x")
    write_json(args.json, {"benchmark": "pointwise_conv", "date": datetime.date.today().isoformat(),
                           "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
                           "rows": rows, "eval_rows": eval_rows})
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

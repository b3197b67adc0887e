"""SELU and Mish: PyTorch's kernels against the obvious rewrites, forward and forward + backward.

SmoothNet's activation (SELU) and ResNet-9's (Mish) cost far more than ReLU on a CPU: 0.8 and 2.1 ms against 0.06
for 1 M floats forward (issue 17's thirteenth pass). Both sides of every comparison in issue 17 pay them (a DP step
and a non-private one, dpnas and the user's loop build the same model), so no goal's ratio moves with them, but a
faster exact activation would make every step of such a point cheaper. This times, on tensors of a quickstart
layer's and a SmoothNet layer's shape, each activation as PyTorch computes it (`F.selu`, `F.mish`), as an
`autograd.Function` that saves only what its derivative needs (SELU's output; Mish's input), and as composed
elementwise operations under autograd; it checks that the values and input gradients agree (to float rounding) and reports medians.

    uv run python benchmarks/activation_kernels.py
    uv run python benchmarks/activation_kernels.py --shapes 256x16x16x16 --repeats 50

Prints a table and writes JSON (`--json`, default benchmarks/activation_kernels.json); compare ratios within a run.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dpnas.dp.host_memory import keep_freed_host_memory
from dpnas.results import writable_file, write_json

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


class SeluSavingOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.where(x > 0, x, torch.expm1(x) * SELU_ALPHA) * SELU_SCALE
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * torch.where(y > 0, SELU_SCALE, y + SELU_ALPHA * SELU_SCALE)


class MishSavingInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.tanh(F.softplus(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        t = torch.tanh(F.softplus(x))
        return grad * (t + x * torch.sigmoid(x) * (1 - t * t))


VARIANTS = {
    "selu": {"pytorch": F.selu, "function": SeluSavingOutput.apply,
             "composed": lambda x: torch.where(x > 0, x, torch.expm1(x) * SELU_ALPHA) * SELU_SCALE},
    "mish": {"pytorch": F.mish, "function": MishSavingInput.apply,
             "composed": lambda x: x * torch.tanh(F.softplus(x))},
}


def median_ms(run, repeats: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(shape: tuple[int, ...], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    x, grad = torch.randn(shape), torch.randn(shape)
    rows = []
    def input_grad(fn) -> torch.Tensor:
        leaf = x.clone().requires_grad_()
        fn(leaf).backward(grad)
        return leaf.grad

    for activation, variants in VARIANTS.items():
        reference, reference_grad = variants["pytorch"](x), input_grad(variants["pytorch"])
        for name, fn in variants.items():
            def forward_backward(fn=fn) -> None:
                leaf = x.clone().requires_grad_()
                fn(leaf).backward(grad)

            max_diff = float((fn(x) - reference).abs().max())
            grad_diff = float((input_grad(fn) - reference_grad).abs().max())
            rows.append({"shape": list(shape), "activation": activation, "variant": name,
                         "forward_ms": median_ms(lambda fn=fn: fn(x), repeats),
                         "forward_backward_ms": median_ms(forward_backward, repeats), "max_abs_diff": max_diff,
                         "max_abs_grad_diff": grad_diff})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="256x16x16x16,32x80x32x32",
                        help="comma-separated NxCxHxW (default: a quickstart layer's, a SmoothNet layer's)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=writable_file, default="benchmarks/activation_kernels.json")
    args = parser.parse_args(argv)
    keep_freed_host_memory()  # dpnas's heap setting, as in every dpnas process
    rows = []
    for text in args.shapes.split(","):
        rows += measure(tuple(int(n) for n in text.split("x")), args.repeats)
    print(f"{'shape':<16} {'activation':<10} {'variant':<9} {'fwd ms':>8} {'fwd+bwd ms':>10} {'x pytorch':>9} "
          f"{'max diff':>9}")
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["activation"] == row["activation"]
                    and r["variant"] == "pytorch")
        row["x_pytorch_forward_backward"] = row["forward_backward_ms"] / base["forward_backward_ms"]
        print(f"{'x'.join(map(str, row['shape'])):<16} {row['activation']:<10} {row['variant']:<9} "
              f"{row['forward_ms']:8.2f} {row['forward_backward_ms']:10.2f} {row['x_pytorch_forward_backward']:9.2f} "
              f"{row['max_abs_diff']:9.1e}")
    result = {"benchmark": "activation_kernels", "date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
              "torch": torch.__version__, "args": vars(args), "rows": rows}
    write_json(args.json, result)
    print(f"written to {args.json}")
    return result


if __name__ == "__main__":
    main()

"""Where a DP step's time goes: dpnas's forward + backward and its norms + clipped sums, against a non-private
forward + backward of the same model, with the steps of the two taking turns in one process (which goes first
alternating from step to step).

`dpnas bench` times whole steps, each mode in its own process; on a shared machine a process's speed drifts,
and a ratio then moves by 20-40 % from run to run. Here both models live in one process and alternate step by
step, so drift hits both alike; that makes this the instrument for the per-sample arithmetic itself. Every step
takes the same fixed batch. The optimizer step and the noise (the same for every per-sample method; about
12 ms for WRN-16-4 on the 2-core CPU) are left out.

    uv run python benchmarks/step_breakdown.py --models smoothnet,resnet9_scalenorm,wrn16_4 --batch-size 32 --steps 10
    uv run python benchmarks/step_breakdown.py --models "" --points studies/quickstart.toml --n 5 --steps 5
    uv run python benchmarks/step_breakdown.py --models "" --points studies/quickstart.toml --n 5 --steps 40 \
        --images-grad
    uv run python benchmarks/step_breakdown.py --models "" --points studies/quickstart.toml --n 5 --steps 30 \
        --stock-pointwise
    uv run python benchmarks/step_breakdown.py --models "" --points studies/scalenorm_cifar10.toml --n 2 --steps 4 \
        --whole-batch-sums

Models are what `dpnas bench --models` takes (names, ArchConfig or recipe files) and `--points STUDY --n K`
seeded random points of a study's space, at the study's input shape and physical batch size.

Prints a table and writes JSON (`--json`, default benchmarks/step_breakdown.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dpnas.arch.models import build_model
from dpnas.arch.space import ArchConfig
from dpnas.bench import BenchModel, add_model_options, models_from_options, synchronize
from dpnas.dp.host_memory import keep_freed_host_memory
from dpnas.dp.per_sample import PerSampleClipper
from dpnas.results import writable_file, write_json


def breakdown(model: BenchModel, *, batch_size: int, steps: int, device: str, warmup: int = 2,
              images_grad: bool = False, stock_pointwise: bool = False, whole_batch_sums: bool = False) -> dict:
    """Median milliseconds of each part over `steps` alternating steps (after `warmup` untimed ones).
    `images_grad`: also time dpnas's forward + backward with the images requiring a gradient, as it was before
    the first layers' outputs started the graph (the lever's before and after, in one process).
    `stock_pointwise`: also time it with oneDNN's 1x1 convolutions instead of dpnas's products
    (:mod:`dpnas.dp.pointwise`), likewise. `whole_batch_sums`: also time the norms and sums with the whole batch at
    once instead of in chunks of samples (:func:`dpnas.dp.per_sample.sample_chunks`), likewise."""
    dev = torch.device(device)
    torch.manual_seed(0)
    arch = ArchConfig.from_dict(model.arch)
    batch_size = model.batch_size or batch_size
    nonprivate = build_model(arch, num_classes=10, in_channels=model.in_channels).to(dev)
    private = build_model(arch, num_classes=10, in_channels=model.in_channels).to(dev)
    images = torch.randn(batch_size, model.in_channels, model.image_size, model.image_size, device=dev)
    labels = torch.randint(0, 10, (batch_size,), device=dev)
    clipper = PerSampleClipper(private)

    def timed(fn) -> float:
        synchronize(dev)
        start = time.perf_counter()
        fn()
        synchronize(dev)
        return (time.perf_counter() - start) * 1e3

    def nonprivate_step() -> None:
        nonprivate.zero_grad(set_to_none=True)
        F.cross_entropy(nonprivate(images), labels).backward()

    def with_images_grad(x: torch.Tensor) -> torch.Tensor:
        return private(x.detach().requires_grad_(True))

    parts: dict[str, list[float]] = {"nonprivate_forward_backward": [], "dpnas_forward_backward": [],
                                     "dpnas_norms_and_sums": []}
    if images_grad:
        parts["dpnas_images_grad_forward_backward"] = []
    if stock_pointwise:
        parts["dpnas_stock_pointwise_forward_backward"] = []
    if whole_batch_sums:
        parts["dpnas_whole_batch_norms_and_sums"] = []

    def stock_pointwise_backward() -> None:
        clipper.pointwise_products = False
        try:
            clipper.backward(private, images, labels)
        finally:
            clipper.pointwise_products = True

    def whole_batch_norms_and_sums() -> float:
        clipper.backward(private, images, labels)  # captures the layers' inputs and gradients (untimed)
        clipper.chunked_sums = False
        try:
            return timed(lambda: clipper.clipped_sum(1.0))
        finally:
            clipper.chunked_sums = True

    def dpnas_parts() -> tuple[float, ...]:
        times = (timed(lambda: clipper.backward(private, images, labels)), timed(lambda: clipper.clipped_sum(1.0)))
        for wanted, variant in ((images_grad, lambda: clipper.backward(with_images_grad, images, labels)),
                                (stock_pointwise, stock_pointwise_backward)):
            if wanted:
                times += (timed(variant),)
                clipper.clipped_sum(1.0)  # consumes what that backward captured (untimed)
        if whole_batch_sums:
            times += (whole_batch_norms_and_sums(),)
        return times

    for step in range(warmup + steps):  # the first clipped sum also times each layer's methods (not counted)
        # which model goes first alternates: the second one of a pair ran measurably slower (cache state)
        if step % 2:
            dpnas_times = dpnas_parts()
            times = (timed(nonprivate_step), *dpnas_times)
        else:
            nonprivate_ms = timed(nonprivate_step)
            times = (nonprivate_ms, *dpnas_parts())
        if step >= warmup:
            for part, ms in zip(parts, times):
                parts[part].append(ms)
    clipper.close()
    row = {"model": model.label, "arch": model.arch, "batch_size": batch_size, "device": str(dev), "steps": steps,
           **{f"{part}_ms": statistics.median(values) for part, values in parts.items()},
           "per_sample_methods": clipper.method_counts()}
    dpnas_ms = row["dpnas_forward_backward_ms"] + row["dpnas_norms_and_sums_ms"]
    row["dpnas_vs_nonprivate"] = dpnas_ms / row["nonprivate_forward_backward_ms"]
    for variant in ("images_grad", "stock_pointwise"):
        if f"dpnas_{variant}_forward_backward_ms" in row:
            row[f"{variant}_vs_nonprivate"] = ((row[f"dpnas_{variant}_forward_backward_ms"]
                                                + row["dpnas_norms_and_sums_ms"]) / row["nonprivate_forward_backward_ms"])
    if whole_batch_sums:
        row["whole_batch_sums_vs_nonprivate"] = ((row["dpnas_forward_backward_ms"]
                                                  + row["dpnas_whole_batch_norms_and_sums_ms"])
                                                 / row["nonprivate_forward_backward_ms"])
    return row


def format_table(rows: list[dict]) -> str:
    header = f"{'model':<18} {'batch':>5} {'nonprivate ms':>14} {'dpnas fwd+bwd ms':>17} {'norms+sums ms':>14} {'x nonpriv':>9}"
    # (ratio key, the part it swaps in, column title)
    variants = [(variant, part, title) for variant, part, title in (
        ("images_grad", "dpnas_images_grad_forward_backward_ms", "with images grad ms"),
        ("stock_pointwise", "dpnas_stock_pointwise_forward_backward_ms", "oneDNN 1x1 fwd+bwd ms"),
        ("whole_batch_sums", "dpnas_whole_batch_norms_and_sums_ms", "whole-batch sums ms"))
        if any(f"{variant}_vs_nonprivate" in r for r in rows)]
    for _, _, title in variants:
        header += f" {title:>21} {'x nonpriv':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (f"{r['model']:<18} {r['batch_size']:>5} {r['nonprivate_forward_backward_ms']:>14.1f} "
                f"{r['dpnas_forward_backward_ms']:>17.1f} {r['dpnas_norms_and_sums_ms']:>14.1f} "
                f"{r['dpnas_vs_nonprivate']:>9.2f}")
        for variant, part, _ in variants:
            line += f" {r[part]:>21.1f} {r[f'{variant}_vs_nonprivate']:>9.2f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, default="smoothnet,resnet9_scalenorm,wrn16_4")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images-grad", action="store_true",
                        help="also time dpnas's forward + backward with a gradient for the images (as before)")
    parser.add_argument("--stock-pointwise", action="store_true",
                        help="also time dpnas's forward + backward with oneDNN's 1x1 convolutions (as before)")
    parser.add_argument("--whole-batch-sums", action="store_true",
                        help="also time dpnas's norms and sums with the whole batch at once (as before), not in "
                             "chunks of samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=writable_file, default="benchmarks/step_breakdown.json", help="where the rows go, with the machine and command")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--batch-size, --steps and --warmup must be >= 1 (the first step times the methods)")
    models = models_from_options(parser, args)  # unknown names fail before any model runs
    # as dpnas's training engine does, for both models (DPNAS_KEEP_FREED_MEMORY=0: glibc's default, to compare)
    kept = keep_freed_host_memory()
    rows = []
    for model in models:
        print(f"  {model.label} ...", file=sys.stderr, flush=True)
        rows.append(breakdown(model, batch_size=args.batch_size, steps=args.steps, device=args.device,
                              warmup=args.warmup, images_grad=args.images_grad,
                              stock_pointwise=args.stock_pointwise, whole_batch_sums=args.whole_batch_sums))
    print(format_table(rows))
    write_json(args.json, {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                           "machine": platform.machine(), "torch": torch.__version__, "args": vars(args),
                           "keep_freed_host_memory": kept, "rows": rows})
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

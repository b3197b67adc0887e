"""Where the norms and clipped sums of a DP step go, layer by layer: each per-sample method on each layer.

For every layer with trainable parameters, the input and output gradient are captured from one real dpnas
backward pass (so their memory layouts are the ones training produces: a channels-last gradient behind the NHWC
smoothing pool, for example), and then each exact method that dpnas has for that layer (``unfold``, ``grouped``
and ``ghost`` for a convolution; one for the others) computes that layer's per-sample squared norms and its
clipped sum, the methods taking turns in one process (median of ``--rounds``). The method the tuner picked for
the step is marked. Comparing this table across two checkouts (``PYTHONPATH=<checkout>``) measures a change to
one method on the layers that use it.

    uv run python benchmarks/per_sample_layers.py --models "" --points studies/quickstart.toml --n 5
    uv run python benchmarks/per_sample_layers.py --models smoothnet,wrn16_4 --batch-size 32 --rounds 5

Prints a table and writes JSON (`--json`, default benchmarks/per_sample_layers.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch

from dpnas.arch.models import build_model
from dpnas.arch.space import ArchConfig
from dpnas.bench import BenchModel, bench_models
from dpnas.dp.host_memory import keep_freed_host_memory
from dpnas.dp.per_sample import PerSampleClipper
from dpnas.dp.per_sample_layers import clipped_sum, layer_norms, methods_for
from dpnas.results import write_json

HEAVY_GHOST_MS = 50.0  # a ghost norm this slow on a layer is never picked; one timing of it is enough


def layout(t: torch.Tensor) -> str:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return "NHWC"
    return "NCHW" if t.dim() == 4 else "flat"


def layer_rows(model: BenchModel, *, batch_size: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    net = build_model(ArchConfig.from_dict(model.arch), num_classes=10, in_channels=model.in_channels)
    batch = model.batch_size or batch_size
    images = torch.randn(batch, model.in_channels, model.image_size, model.image_size)
    labels = torch.randint(0, 10, (batch,))
    clipper = PerSampleClipper(net)
    clipper.backward(net, images, labels)
    clipper.clipped_sum(1.0)  # the tuner picks each layer's method (recorded in clipper.chosen)
    clipper.backward(net, images, labels)
    factor = torch.rand(batch)
    rows = []
    for index, layer in enumerate(clipper.layers):
        a, g, out = clipper._inputs[layer], clipper._grads[layer], clipper._outputs.get(layer)

        def run(method: str, layer=layer, a=a, g=g, out=out) -> float:  # noqa: ANN001
            start = time.perf_counter()
            clipped_sum(layer, layer_norms(layer, method, a, g, k=1, output=out), a, g, factor, 1)
            return (time.perf_counter() - start) * 1e3

        methods = methods_for(layer)
        times: dict[str, list[float]] = {m: [run(m)] for m in methods}  # the first call warms each method up
        timed = [m for m in methods if times[m][0] < HEAVY_GHOST_MS or len(methods) == 1]
        for _ in range(rounds):
            for method in timed:
                times[method].append(run(method))
        rows.append({"model": model.label, "layer": index, "type": type(layer).__name__,
                     "input": list(a.shape[1:]), "output_grad": list(g.shape[1:]),
                     "input_layout": layout(a), "grad_layout": layout(g), "chosen": clipper.chosen[layer],
                     "ms": {m: statistics.median(t[1:] if len(t) > 1 else t) for m, t in times.items()}})
    clipper.close()
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<18} {'#':>2} {'layer':<10} {'input':<14} {'grad':<14} {'layouts':<10} methods, ms "
             "(* = the tuner's pick)"]
    for r in rows:
        methods = "  ".join(f"{m}{'*' if m == r['chosen'] else ''} {ms:.2f}" for m, ms in r["ms"].items())
        lines.append(f"{r['model']:<18} {r['layer']:>2} {r['type']:<10} {'x'.join(map(str, r['input'])):<14} "
                     f"{'x'.join(map(str, r['output_grad'])):<14} {r['input_layout'] + '/' + r['grad_layout']:<10} "
                     f"{methods}")
    totals: dict[str, float] = {}
    for r in rows:
        totals[r["model"]] = totals.get(r["model"], 0.0) + r["ms"][r["chosen"]]
    lines += [f"{model}: the picked methods together {ms:.2f} ms" for model, ms in totals.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny", help="names, ArchConfig or recipe files (default tiny)")
    parser.add_argument("--points", metavar="STUDY_FILE", help="also --n seeded random points of this study's space")
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="of named models; points use their study's")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per method (median reported)")
    parser.add_argument("--json", default="benchmarks/per_sample_layers.json")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.rounds < 1:
        parser.error("--batch-size and --rounds must be >= 1")
    try:  # unknown names fail before any model runs
        models = bench_models(args.models, args.points, args.n)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    kept = keep_freed_host_memory()  # as dpnas's training engine does (DPNAS_KEEP_FREED_MEMORY=0: glibc's default)
    rows = []
    for model in models:
        print(f"  {model.label} ...", file=sys.stderr, flush=True)
        rows += layer_rows(model, batch_size=args.batch_size, rounds=args.rounds)
    print(format_table(rows))
    write_json(args.json, {"benchmark": "per_sample_layers", "date": datetime.date.today().isoformat(),
                           "command": " ".join(["python", "benchmarks/per_sample_layers.py", *(argv or sys.argv[1:])]),
                           "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
                           "torch": torch.__version__, "args": vars(args), "keep_freed_host_memory": kept,
                           "rows": rows})
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

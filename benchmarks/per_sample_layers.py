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
    uv run python benchmarks/per_sample_layers.py --models resnet9_scalenorm --candidate shifted

``--tuner-repeats R`` also runs the tuner's choice R times on each layer with several candidates, both as dpnas
does it (the methods close on a 32-sample batch timed again on the whole batch) and on the 32 samples alone (as
before issue 17's eighth pass), and sums the whole-batch times of what each picked: the cost of a wrong pick.

    uv run python benchmarks/per_sample_layers.py --models "" --points studies/quickstart.toml --n 5 --tuner-repeats 3

``--one-piece`` also times each method with no bound on its temporaries (unfolded patches and squares in one
piece, as before issue 17's eighth pass), the two taking turns, in the JSON's ``ms_one_piece``.

``--candidate shifted`` also times a method dpnas does not have, on every stride-1 convolution: each sample's
weight gradient as a sum over the kernel's offsets of one batched product of the output gradient with a shifted
view of the padded input (no unfold copy; the padded rows' extra columns meet zeros in the gradient), followed by
dpnas's materialised norms and clipped sum. It is checked against ``unfold`` before it is timed.

Prints a table and writes JSON (`--json`, default benchmarks/per_sample_layers.json).
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

from dpnas.arch.layers import WSConv2d
from dpnas.arch.models import build_model
from dpnas.arch.space import ArchConfig
from dpnas.bench import BenchModel, add_model_options, models_from_options
from dpnas.dp.host_memory import keep_freed_host_memory
import dpnas.dp.per_sample as per_sample
import dpnas.dp.per_sample_layers as per_sample_layers
from dpnas.dp.per_sample import PerSampleClipper, worth_timing
from dpnas.dp.per_sample_layers import (
    _materialised,
    _standardisation,
    _standardised_materialised,
    clipped_sum,
    layer_norms,
    methods_for,
)
from dpnas.results import writable_file, write_json

HEAVY_GHOST_MS = 50.0  # a ghost norm this slow on a layer is never picked; one timing of it is enough


def layout(t: torch.Tensor) -> str:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return "NHWC"
    return "NCHW" if t.dim() == 4 else "flat"


SHIFTED = "shifted (not in dpnas)"


def takes_shifted(layer: torch.nn.Module) -> bool:
    return (isinstance(layer, torch.nn.Conv2d) and layer.stride == (1, 1) and layer.dilation == (1, 1)
            and layer.groups == 1 and not isinstance(layer.padding, str))


def shifted_per_sample(conv: torch.nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each sample's weight gradient (N, C_out, C_in * kh * kw) as kh * kw batched products of the output gradient
    with shifted views of the padded input, flattened with its padded row width."""
    n, c_in, h, w = a.shape
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    width = w + 2 * pw
    flat = F.pad(a, (pw, pw, ph, ph)).reshape(n, c_in, -1)
    ho, wo = g.shape[2:]
    length = (ho - 1) * width + wo  # output position (i, j) reads flat index i * width + j (+ the offset)
    grad = F.pad(g, (0, width - wo)).reshape(n, g.shape[1], -1)[:, :, :length]  # zeros in the padded columns
    out = torch.empty(kh, kw, n, g.shape[1], c_in, dtype=a.dtype, device=a.device)
    for dy in range(kh):
        for dx in range(kw):
            start = dy * width + dx
            torch.bmm(grad, flat[:, :, start:start + length].transpose(1, 2), out=out[dy, dx])
    return out.permute(2, 3, 4, 0, 1).reshape(n, g.shape[1], c_in * kh * kw)


def shifted_clipped_sum(layer: torch.nn.Conv2d, a: torch.Tensor, g: torch.Tensor, factor: torch.Tensor):
    """The candidate's norms and clipped sum, through dpnas's materialised path."""
    a, g = a.float(), g.float()
    grads = {layer.weight: shifted_per_sample(layer, a, g).reshape(a.shape[0], *layer.weight.shape)}
    if layer.bias is not None:
        grads[layer.bias] = g.sum(dim=(2, 3))
    if isinstance(layer, WSConv2d):
        standardisation = _standardisation(layer)
        result = _standardised_materialised(layer, grads, 1, standardisation)
        result.standardisation = standardisation
    else:
        result = _materialised(grads, 1)
    return result.squared, clipped_sum(layer, result, a, g, factor, 1)


def tuner_picks(layer, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None, repeats: int) -> dict[str, list[str]]:  # noqa: ANN001
    """What the tuner picks on this layer, `repeats` times: as dpnas tunes ("whole": the close methods timed again
    on the whole batch) and on the sample alone ("sample": no method is close enough to be timed again)."""
    candidates = methods_for(layer)
    if len(candidates) > 1:
        candidates = worth_timing(layer, candidates, a, g)
    if len(candidates) < 2:
        return {}
    picks: dict[str, list[str]] = {"sample": [], "whole": []}
    ratio = per_sample.FINALIST_RATIO
    try:
        for _ in range(repeats):
            for mode, finalist_ratio in (("sample", 1.0), ("whole", ratio)):
                per_sample.FINALIST_RATIO = finalist_ratio
                picks[mode].append(per_sample._fastest(layer, candidates, a, g, out, 1))
    finally:
        per_sample.FINALIST_RATIO = ratio
    return picks


@contextlib.contextmanager
def unbounded_temporaries():
    """dpnas's per-sample arithmetic as before issue 17's eighth pass: every temporary in one piece."""
    saved = per_sample_layers._TEMPORARY_BYTES
    per_sample_layers._TEMPORARY_BYTES = 2**62
    try:
        yield
    finally:
        per_sample_layers._TEMPORARY_BYTES = saved


def layer_rows(model: BenchModel, *, batch_size: int, rounds: int, candidate: str | None = None,
               tuner_repeats: int = 0, one_piece_ab: bool = False) -> list[dict]:
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

        def run_shifted(layer=layer, a=a, g=g) -> float:  # noqa: ANN001
            start = time.perf_counter()
            shifted_clipped_sum(layer, a, g, factor)
            return (time.perf_counter() - start) * 1e3

        methods = methods_for(layer)
        times: dict[str, list[float]] = {m: [run(m)] for m in methods}  # the first call warms each method up
        timed = [m for m in methods if times[m][0] < HEAVY_GHOST_MS or len(methods) == 1]
        runs = {m: functools.partial(run, m) for m in timed}
        if candidate == "shifted" and takes_shifted(layer):
            # exact before it is timed: the same norms and sums as unfold's, to rounding
            norms, sums = shifted_clipped_sum(layer, a, g, factor)
            reference = layer_norms(layer, "unfold", a, g, k=1, output=out)
            torch.testing.assert_close(norms, reference.squared, rtol=1e-4, atol=1e-6)
            for param, value in clipped_sum(layer, reference, a, g, factor, 1).items():
                torch.testing.assert_close(sums[param], value, rtol=1e-4, atol=1e-5)
            times[SHIFTED] = [run_shifted()]
            runs[SHIFTED] = run_shifted
        one_piece: dict[str, list[float]] = {m: [] for m in runs if m != SHIFTED} if one_piece_ab else {}
        for round_ in range(rounds):
            for method, timing in runs.items():
                times[method].append(timing())
            if one_piece_ab:  # the same methods with no bound on a temporary, taking turns with the bounded ones
                with unbounded_temporaries():
                    for method in one_piece:
                        one_piece[method].append(runs[method]())
        rows.append({"model": model.label, "layer": index, "type": type(layer).__name__,
                     "input": list(a.shape[1:]), "output_grad": list(g.shape[1:]),
                     "input_layout": layout(a), "grad_layout": layout(g), "chosen": clipper.chosen[layer],
                     "ms": {m: statistics.median(t[1:] if len(t) > 1 else t) for m, t in times.items()}})
        if one_piece_ab:
            rows[-1]["ms_one_piece"] = {m: statistics.median(t) for m, t in one_piece.items()}
        if tuner_repeats:
            rows[-1]["tuner_picks"] = tuner_picks(layer, a, g, out, tuner_repeats)
    clipper.close()
    return rows


def tuner_cost(rows: list[dict]) -> dict[str, float]:
    """Per mode, the mean over the tuner's repeats of the summed whole-batch ms of what it picked (every layer;
    a layer with one candidate adds that method's time to both)."""
    if not any(r.get("tuner_picks") is not None for r in rows):
        return {}
    cost = {"sample": 0.0, "whole": 0.0}
    for r in rows:
        timed = {m: ms for m, ms in r["ms"].items() if m != SHIFTED}
        for mode in cost:
            picks = (r.get("tuner_picks") or {}).get(mode)
            cost[mode] += statistics.mean(timed[p] for p in picks) if picks else timed[r["chosen"]]
    return cost


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<18} {'#':>2} {'layer':<10} {'input':<14} {'grad':<14} {'layouts':<10} methods, ms "
             "(* = the tuner's pick)"]
    for r in rows:
        one_piece = r.get("ms_one_piece", {})
        methods = "  ".join(f"{m}{'*' if m == r['chosen'] else ''} {ms:.2f}"
                            + (f" ({one_piece[m]:.2f} one piece)" if m in one_piece else "") for m, ms in r["ms"].items())
        lines.append(f"{r['model']:<18} {r['layer']:>2} {r['type']:<10} {'x'.join(map(str, r['input'])):<14} "
                     f"{'x'.join(map(str, r['output_grad'])):<14} {r['input_layout'] + '/' + r['grad_layout']:<10} "
                     f"{methods}")
    totals: dict[str, float] = {}
    with_candidate: dict[str, float] = {}
    for r in rows:
        totals[r["model"]] = totals.get(r["model"], 0.0) + r["ms"][r["chosen"]]
        with_candidate[r["model"]] = with_candidate.get(r["model"], 0.0) + min(r["ms"][r["chosen"]],
                                                                              r["ms"].get(SHIFTED, float("inf")))
    fastest: dict[str, float] = {}  # each layer's fastest method on the whole batch, as timed here
    for r in rows:
        fastest[r["model"]] = fastest.get(r["model"], 0.0) + min(ms for m, ms in r["ms"].items() if m != SHIFTED)
    lines += [f"{model}: the picked methods together {ms:.2f} ms (each layer's fastest here: {fastest[model]:.2f} ms)"
              for model, ms in totals.items()]
    for model in totals:
        mean_picks = tuner_cost([r for r in rows if r["model"] == model])
        if mean_picks:
            lines.append(f"{model}: the tuner's picks, mean over its repeats: {mean_picks['whole']:.2f} ms as dpnas "
                         f"tunes, {mean_picks['sample']:.2f} ms tuned on 32 samples alone")
    if any(SHIFTED in r["ms"] for r in rows):
        lines += [f"{model}: with the candidate where it is faster {ms:.2f} ms" for model, ms in with_candidate.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, default="tiny")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per method (median reported)")
    parser.add_argument("--candidate", choices=("shifted",),
                        help="also time a method dpnas does not have (see the module's docstring)")
    parser.add_argument("--tuner-repeats", type=int, default=0, metavar="R",
                        help="also run the tuner R times per layer, with and without its whole-batch timings")
    parser.add_argument("--one-piece", action="store_true",
                        help="also time each method with every temporary in one piece (no 8 MiB bound), in turn")
    parser.add_argument("--json", type=writable_file, default="benchmarks/per_sample_layers.json")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.rounds < 1 or args.tuner_repeats < 0:
        parser.error("--batch-size and --rounds must be >= 1, --tuner-repeats >= 0")
    models = models_from_options(parser, args)  # unknown names fail before any model runs
    kept = keep_freed_host_memory()  # as dpnas's training engine does (DPNAS_KEEP_FREED_MEMORY=0: glibc's default)
    rows = []
    for model in models:
        print(f"  {model.label} ...", file=sys.stderr, flush=True)
        rows += layer_rows(model, batch_size=args.batch_size, rounds=args.rounds, candidate=args.candidate,
                           tuner_repeats=args.tuner_repeats, one_piece_ab=args.one_piece)
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

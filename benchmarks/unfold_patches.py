"""A convolution's patches for the per-sample gradient: F.unfold, stacked shifted slices, and dpnas's strided view.

`unfold` method of :mod:`dpnas.dp.per_sample_layers` needs each sample's patches, ``F.unfold(a)``'s values in its
order. Three ways to get them, each checked to give exactly F.unfold's tensor and timed in one process, the
candidates taking turns (drift on a shared machine hits all alike; median of ``--rounds``):

* ``F.unfold``: PyTorch's im2col;
* stacked slices: kh * kw shifted slices of the padded input stacked (dpnas before issue 17's fourth pass; stride 1
  only, so a strided convolution fell back to F.unfold);
* strided view (dpnas): one ``as_strided`` view of the padded input, copied once by the reshape.

The shapes are those of the quickstart's points (16 px digits, batch 256; NHWC where a layer sits behind the
channels-last smoothing pool) and of the reference networks at batch 32, stride 1 and 2.

    uv run python benchmarks/unfold_patches.py

Prints a table and writes JSON (`--json`, default benchmarks/unfold_patches.json).
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
from torch import nn

from dpnas.dp.per_sample_layers import unfold
from dpnas.results import writable_file, write_json

# (batch, channels, height, width), layout, stride: a 3x3 convolution with padding 1 reads this input
CASES = [
    ((256, 1, 16, 16), "NHWC", 1), ((256, 4, 8, 8), "NCHW", 1), ((256, 4, 8, 8), "NHWC", 1),
    ((256, 8, 8, 8), "NCHW", 1), ((256, 8, 16, 16), "NCHW", 1), ((64, 3, 32, 32), "NCHW", 1),
    ((32, 64, 32, 32), "NCHW", 1), ((256, 16, 16, 16), "NCHW", 2), ((32, 64, 32, 32), "NCHW", 2),
]


def stacked_slices(conv: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """dpnas's patches before the strided view: kh * kw shifted slices, stacked (F.unfold for a strided conv)."""
    n, c_in = a.shape[:2]
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if (sh, sw) != (1, 1):
        return F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    ho, wo = a.shape[2] + 2 * ph - dh * (kh - 1), a.shape[3] + 2 * pw - dw * (kw - 1)
    padded = F.pad(a, (pw, pw, ph, ph))
    shifted = [padded[:, :, i * dh:i * dh + ho, j * dw:j * dw + wo] for i in range(kh) for j in range(kw)]
    return torch.stack(shifted, dim=2).reshape(n, c_in * kh * kw, ho * wo)


CANDIDATES = {
    "F.unfold": lambda conv, a: F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                         stride=conv.stride),
    "stacked slices": stacked_slices,
    "strided view (dpnas)": unfold,
}


def time_case(shape, layout: str, stride: int, rounds: int) -> dict:
    torch.manual_seed(0)
    a = torch.randn(shape)
    if layout == "NHWC":
        a = a.contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(shape[1], 8, 3, padding=1, stride=stride)
    expected = CANDIDATES["F.unfold"](conv, a)
    for name, candidate in CANDIDATES.items():  # exactly F.unfold's values, and a warm-up
        if not torch.equal(candidate(conv, a), expected):
            raise AssertionError(f"{name} differs from F.unfold on {shape} {layout} stride {stride}")
    seconds = {name: [] for name in CANDIDATES}
    for r in range(rounds):
        order = list(CANDIDATES.items())
        for name, candidate in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            candidate(conv, a)
            seconds[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(s) * 1e3 for name, s in seconds.items()}
    return {"shape": list(shape), "layout": layout, "stride": stride, "ms": ms,
            "stacked_over_dpnas": ms["stacked slices"] / ms["strided view (dpnas)"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per candidate (median reported)")
    parser.add_argument("--json", type=writable_file, default="benchmarks/unfold_patches.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rows = [time_case(shape, layout, stride, args.rounds) for shape, layout, stride in CASES]
    names = list(CANDIDATES)
    print(f"{'input':22} {'layout':6} {'stride':>6} " + " ".join(f"{n + ' ms':>24}" for n in names)
          + "  stacked / dpnas")
    for row in rows:
        print(f"{'x'.join(map(str, row['shape'])):22} {row['layout']:6} {row['stride']:>6} "
              + " ".join(f"{row['ms'][n]:>24.3f}" for n in names) + f"  {row['stacked_over_dpnas']:.2f}")
    write_json(args.json, {"benchmark": "unfold_patches", "date": datetime.date.today().isoformat(),
                           "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
                           "rows": rows})
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

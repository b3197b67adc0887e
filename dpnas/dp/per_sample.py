"""dpnas's own per-sample gradients: clipped sums without the batch gradient Opacus computes and discards.

Opacus's GradSampleModule lets autograd compute every parameter's ordinary ``.grad`` and then
builds per-sample gradients from hooks; DP-SGD never uses that ``.grad``.  Here the parameters
stop requiring gradients during the backward pass. The output of each trainable layer that nothing
before it makes require one (the first conv, for these networks) is made an autograd leaf instead,
so autograd still carries gradients through every layer but computes none for the images (and, on the CPU,
1x1 convolutions run as matrix products then, :mod:`dpnas.dp.pointwise`).  Hooks
capture each layer's input and output gradient.  From those, :mod:`dpnas.dp.per_sample_layers` gives
each layer's per-sample squared norms by the fastest exact method for that layer's shape, which this
module finds by timing the candidates once per layer shape (like cuDNN's autotuner); the clipped sum
then comes either from the materialised per-sample gradients or from one batched weight gradient
weighted by the clip factors. On the CPU a large batch's norms and sums go chunk of samples by chunk of samples
(:func:`sample_chunks`), so that their temporaries stay small.

Supported layers: Conv2d (groups = 1, zero padding given as numbers) and its weight-standardised
variant, Linear on flat inputs, GroupNorm.  :func:`supports` says whether a model is covered;
otherwise use Opacus's path.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from dpnas.arch.layers import WSConv2d
from dpnas.arch.space import ConfigError
from dpnas.dp.host_memory import MMAP_THRESHOLD
from dpnas.dp.per_sample_layers import (
    CONV_METHODS,
    LayerNorms,
    estimated_cost,
    ghost_memory_bounded,
    layer_norms,
    methods_for,
)
from dpnas.dp.per_sample_layers import clipped_sum as layer_clipped_sum
from dpnas.dp.pointwise import is_pointwise, pointwise_as_products

METHODS = ("auto", *CONV_METHODS)
# the fastest method per layer shape and device, found once per process (see PerSampleClipper._method)
_TUNED: dict[tuple, str] = {}
TUNING_SAMPLES = 32
# methods that the sample's timings put within this factor of the fastest are timed again on the whole batch
FINALIST_RATIO = 1.5
# on the CPU, clipped sums in chunks of samples whose per-sample temporaries stay under glibc's mmap threshold
CHUNK_BYTES = MMAP_THRESHOLD
MIN_CHUNK_SAMPLES = 32
MIN_CHUNKS = 4


@contextlib.contextmanager
def full_fp32():
    """Full fp32 while norms and clipped sums are formed: no TF32 in cuDNN convolutions or matrix products,
    and no bf16 inside fp32 matrix products on CPU (``torch.set_float32_matmul_precision("medium")``).

    A ghost norm and the book-keeping sum it scales come from different kernels; in TF32 (10-bit
    mantissa, cuDNN's default for convolutions) they would disagree by about 1e-3, and a clipped
    contribution could exceed C by as much.  In fp32 they agree to rounding.  The model's own forward
    and backward passes keep whatever precision the user chose.
    """
    try:
        saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:  # the user set torch's per-backend precisions (its newer API), which the old getter refuses
        with _per_backend_ieee():
            yield
        return
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


_PER_BACKEND_PRECISIONS = ("cuda.matmul", "cudnn.conv", "mkldnn.matmul", "mkldnn.conv")


@contextlib.contextmanager
def _per_backend_ieee():
    """full_fp32 with torch's per-backend settings (``torch.backends.<backend>.<op>.fp32_precision``): "ieee" for
    every matrix product and convolution, then what the user had."""
    settings = []
    for name in _PER_BACKEND_PRECISIONS:
        backend = torch.backends
        for part in name.split("."):
            backend = getattr(backend, part, None)
        if backend is not None and hasattr(backend, "fp32_precision"):
            settings.append((backend, backend.fp32_precision))
    for backend, _ in settings:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in settings:
            backend.fp32_precision = value


def _trainable_leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def supports(model: nn.Module) -> bool:
    """True when every trainable layer is one this module computes per-sample gradients for, all of its
    parameters trainable (a frozen one would count in the clip norms: Opacus's hooks leave it out)."""
    for module in _trainable_leaves(model):
        if type(module) not in (nn.Conv2d, WSConv2d, nn.Linear, nn.GroupNorm):
            return False
        if not all(p.requires_grad for p in module.parameters(recurse=False)):
            return False
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            return False
    return True


class PerSampleClipper:
    """Hooks on a model that turn one backward pass into clipped, summed per-sample gradients.

    ``method`` is ``"auto"`` (per layer, the fastest of the exact methods, timed on first use) or one
    convolution method of :data:`dpnas.dp.per_sample_layers.CONV_METHODS` for every convolution, which
    benchmarks use to measure each one. ``pointwise_products``: during the backward pass, 1x1 convolutions on the
    CPU run as matrix products (:mod:`dpnas.dp.pointwise`); False keeps oneDNN's, for benchmarks.
    ``chunked_sums``: on the CPU, large batches' clipped sums are formed in chunks of samples (:func:`sample_chunks`);
    False takes the whole batch at once, for benchmarks.
    """

    def __init__(self, model: nn.Module, *, method: str = "auto", pointwise_products: bool = True,
                 chunked_sums: bool = True) -> None:
        if not supports(model):
            raise ValueError("model has layers without a dpnas per-sample gradient; use Opacus's path")
        if method not in METHODS:
            raise ValueError(f"unknown per-sample method {method!r}; expected one of: {', '.join(METHODS)}")
        self.model = model
        self.method = method
        self.layers = _trainable_leaves(model)
        self.params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        self._pointwise = [m for m in self.layers if is_pointwise(m)]
        self.pointwise_products = pointwise_products
        self.chunked_sums = chunked_sums
        self.chosen: dict[nn.Module, str] = {}  # what each layer used last, for reports
        self._inputs: dict[nn.Module, torch.Tensor] = {}
        self._outputs: dict[nn.Module, torch.Tensor] = {}
        self._grads: dict[nn.Module, torch.Tensor] = {}
        self._leaves: list[torch.Tensor] = []  # the layer outputs that start the backward pass (_save_input)
        self._handles = []
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._save_input))
        self._capturing = False

    def _save_input(self, module, inputs, output) -> None:
        if self._capturing:
            if module in self._inputs:  # one input and one output gradient per layer: a second call's would mix
                raise ConfigError(f"per_sample: a {type(module).__name__} is called twice in one forward pass "
                                  "(shared weights); dpnas's per-sample path takes one call per layer: use "
                                  "per_sample = 'opacus'")
            self._inputs[module] = inputs[0].detach()
            if isinstance(module, WSConv2d):  # the ghost norm of a standardised conv uses its output
                self._outputs[module] = output.detach()
            if not output.requires_grad and output.grad_fn is None:
                # A layer that nothing before it makes require a gradient (the first conv): its output starts
                # the backward pass. Letting the images require one instead would also compute the gradient
                # with respect to the images, which nothing uses: 0.9-1.9 ms of the quickstart's 9-21 ms DP
                # steps on 2 CPU cores (benchmarks/step_breakdown.py --images-grad).
                output.requires_grad_(True)
                self._leaves.append(output)
            # A hook on the output tensor receives the gradient w.r.t. the layer's output, which is what a full
            # backward hook's grad_output[0] is; it skips the identity autograd nodes that full backward hooks
            # wrap around every layer's inputs and outputs (5-15 % of a small model's backward on CPU).
            if output.requires_grad:
                output.register_hook(lambda grad, module=module: self._save_grad(module, grad))

    def _save_grad(self, module: nn.Module, grad: torch.Tensor) -> None:
        self._grads[module] = grad.detach()

    def backward(self, logits_fn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward without parameter gradients; returns the summed per-row loss."""
        for p in self.params:
            p.requires_grad_(False)
        self._inputs.clear()  # what an interrupted step left
        self._outputs.clear()
        self._grads.clear()
        self._capturing = True
        try:
            # no gradient for the images: the first layers' outputs start the graph (_save_input)
            # no weight needs a gradient here: 1x1 convolutions run as products (dpnas.dp.pointwise)
            with pointwise_as_products(self._pointwise if self.pointwise_products else []):
                per_row = F.cross_entropy(logits_fn(images.detach()).float(), labels, reduction="none")
            # Summed: each sample's output gradient is its own. The hooks capture every gradient; asking autograd
            # for the leaves' gradients instead of calling backward() leaves no .grad on them, which autograd
            # would otherwise store, copying it first where its layout differs from the leaf's (a max smoothing
            # pool hands back an NHWC gradient).
            if self._leaves:
                torch.autograd.grad(per_row.sum(), self._leaves, allow_unused=True)
            else:  # the graph starts elsewhere: a logits_fn that makes its input require a gradient (benchmarks)
                per_row.sum().backward()
        finally:
            self._leaves.clear()
            self._capturing = False
            for p in self.params:
                p.requires_grad_(True)
        return per_row.detach().sum()

    def clipped_sum(self, max_grad_norm: float, *, aug_multiplicity: int = 1) -> dict[nn.Parameter, torch.Tensor]:
        """Per-sample gradients (averaged over augmentations), clipped to `max_grad_norm`, summed."""
        with full_fp32():
            return self._clipped_sum(max_grad_norm, aug_multiplicity)

    def _clipped_sum(self, max_grad_norm: float, k: int) -> dict[nn.Parameter, torch.Tensor]:
        captured = [(layer, self._inputs.pop(layer), self._grads.pop(layer), self._outputs.pop(layer, None))
                    for layer in self.layers]
        chunks = sample_chunks(captured, k) if self.chunked_sums else [slice(None)]
        if len(chunks) == 1:  # the whole batch: no slices, no sums to add up
            return self._chunk_clipped_sum(captured, max_grad_norm, k)
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for rows in chunks:
            chunk = [(layer, a[rows], g[rows], None if out is None else out[rows]) for layer, a, g, out in captured]
            for p, chunk_sum in self._chunk_clipped_sum(chunk, max_grad_norm, k).items():
                sums[p] = chunk_sum if p not in sums else sums[p] + chunk_sum
        return sums

    def _chunk_clipped_sum(self, captured: list, max_grad_norm: float, k: int) -> dict[nn.Parameter, torch.Tensor]:
        """The clipped sum over the samples of `captured`: every layer's norms, each sample's clip factor from all
        of them, then every layer's sum."""
        norms: list[LayerNorms] = []
        for layer, a, g, out in captured:
            method = self._method(layer, a, g, out, k)
            self.chosen[layer] = method
            norms.append(layer_norms(layer, method, a, g, k=k, output=out))
        squared = torch.stack([n.squared for n in norms], dim=1).sum(1)
        # the same clip factor as Opacus's DPOptimizer, so both paths agree to rounding
        factor = (max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for (layer, a, g, _), layer_result in zip(captured, norms):
            sums.update(layer_clipped_sum(layer, layer_result, a, g, factor, k))
        return sums

    def _method(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None, k: int) -> str:
        candidates = methods_for(layer)
        if len(candidates) == 1:
            return candidates[0]
        if self.method != "auto":
            return self.method
        key = (type(layer), tuple(a.shape[1:]), tuple(g.shape[1:]), layer.kernel_size, layer.stride, layer.padding,
               layer.dilation, layer.bias is not None, k, a.device, a.dtype,
               a.is_contiguous(memory_format=torch.channels_last))  # NHWC can change which method is fastest
        if key not in _TUNED:
            _TUNED[key] = _fastest(layer, worth_timing(layer, candidates, a, g), a, g, out, k)
        return _TUNED[key]

    def method_counts(self) -> dict[str, int]:
        """How many layers used each method in the last step (for results and benchmarks)."""
        return dict(Counter(self.chosen.values()))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def sample_chunks(captured: list, k: int) -> list[slice]:
    """The row ranges whose clipped sums are formed one after another: the whole batch, or on the CPU, where a
    layer's per-sample temporaries for the whole batch would pass CHUNK_BYTES, chunks of whole samples (K rows
    each) that keep them under it, of at least MIN_CHUNK_SAMPLES samples, and at least MIN_CHUNKS of them.

    Each sample's clip factor needs its norms in every layer, so a chunk takes every layer's norms of its samples,
    their factors and every layer's sum, and the chunks' sums add up: the same clipped sum, to rounding. On the CPU,
    glibc maps a block of 32 MiB or more afresh on every allocation (zero-filled pages, :mod:`dpnas.dp.host_memory`),
    and a whole batch's materialised per-sample gradients outgrow the caches: ResNet-9's 128-channel layers at
    256 samples hold 151 MB each. In chunks of 32 samples the norms and sums of the scalenorm study's ResNet-9
    points at batch 256 take 1.19-1.21 s against 1.76-1.81 s, and ResNet-9 ScaleNorm's and WRN-16-4's at batch 128
    0.55 and 0.91 s against 0.77 and 0.98 s; a batch of 64 in two chunks gained on ResNet-9 (0.31 against 0.34 s)
    but lost on WRN-16-4 and SmoothNet points (3-15 % slower), hence MIN_CHUNKS (benchmarks/RESULTS.md, issue 17's
    tenth pass). Smaller chunks would pay each layer's fixed dispatch cost too often; the GPU keeps the whole batch.
    """
    a = captured[0][1]
    n = a.shape[0] // k
    if a.device.type != "cpu" or n < MIN_CHUNKS * MIN_CHUNK_SAMPLES:
        return [slice(None)]
    # per sample: its rows' activations and output gradients (GroupNorm's normalised input, a grouped convolution's
    # padded input) and its gradient of the layer's parameters where it may be materialised (a Linear layer's norms
    # are always ghost norms, from its input and output gradient alone)
    per_sample = k * a.element_size() * max(
        max(inputs.numel(), grads.numel()) // len(inputs)
        + (0 if isinstance(layer, nn.Linear) else sum(p.numel() for p in layer.parameters(recurse=False)))
        for layer, inputs, grads, _ in captured)
    if n * per_sample <= CHUNK_BYTES:
        return [slice(None)]
    samples = max(MIN_CHUNK_SAMPLES, CHUNK_BYTES // per_sample)
    if math.ceil(n / samples) < MIN_CHUNKS:
        return [slice(None)]
    return [slice(start * k, min(start + samples, n) * k) for start in range(0, n, samples)]


def worth_timing(layer: nn.Module, candidates: list[str], a: torch.Tensor, g: torch.Tensor) -> list[str]:
    """The methods worth timing on this layer: within 3x of the cheapest estimate, and a ghost norm only where its
    scratch memory is bounded."""
    costs = {m: estimated_cost(layer, m, a, g) for m in candidates}
    return [m for m in candidates
            if costs[m] <= 3 * min(costs.values()) and (m != "ghost" or ghost_memory_bounded(layer, a))]


def _fastest(layer: nn.Module, methods: list[str], a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None,
             k: int) -> str:
    """The fastest of `methods` on this layer: timed on a sample of the batch, then the close ones on all of it.

    Every method is timed on the first TUNING_SAMPLES samples (a warm-up, then the best of three rounds):
    unfolding a whole batch of 256 can take seconds on the CPU, once per layer shape, i.e. once per trial of a
    search that varies widths. A sample's ranking does not always hold for the whole batch, though: where a
    method's working set leaves the cache, or a block grows past glibc's 32 MiB mmap threshold and is mapped
    and zero-filled anew on every call, its time grows faster than the batch (unfolding a 17-channel 16x16 map
    writes 5 MB for 32 samples and 40 MB for 256: in one piece, as dpnas did then, it took 4.4x the sample's time
    scaled to the batch, 3x the grouped convolution's, which the sample had put 14 % behind; benchmarks/RESULTS.md).
    So the methods within FINALIST_RATIO of the fastest on the sample are timed again on the whole batch (best of
    two rounds, the first of which also allocates), and the fastest there is kept. A lone candidate is not timed.
    """
    if len(methods) == 1:
        return methods[0]
    rows = min(a.shape[0], TUNING_SAMPLES * k)
    sample = _best_seconds(layer, methods, a[:rows], g[:rows], None if out is None else out[:rows], k, rounds=3,
                           warm_up=True)
    finalists = [m for m in methods if sample[m] <= FINALIST_RATIO * min(sample.values())]
    if len(finalists) == 1 or rows == a.shape[0]:
        return min(finalists, key=sample.__getitem__)
    whole = _best_seconds(layer, finalists, a, g, out, k, rounds=2, warm_up=False)
    return min(finalists, key=whole.__getitem__)


def _best_seconds(layer: nn.Module, methods: list[str], a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None,
                  k: int, *, rounds: int, warm_up: bool) -> dict[str, float]:
    """Each method's best time over `rounds` rounds in which the methods take turns, so that a shared machine's
    drift reaches all of them alike (timed one after another, WRN-16-4's 16x16 layers got ghost norms in one run
    and the slower grouped ones in the next). A method that runs out of GPU memory is never the fastest."""
    best = dict.fromkeys(methods, math.inf)
    out_of_memory: set[str] = set()
    for round_ in range(rounds + warm_up):
        for method in methods:
            if method in out_of_memory:
                continue
            try:
                seconds = _seconds(layer, method, a, g, out, k)
            except torch.cuda.OutOfMemoryError:
                out_of_memory.add(method)
                torch.cuda.empty_cache()
                continue
            if round_ >= warm_up:  # the warm-up round sets up kernels and caches
                best[method] = min(best[method], seconds)
    return best


def _seconds(layer: nn.Module, method: str, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None, k: int) -> float:
    """Time of one run of a method's norms and clipped sum on this layer."""
    factors = torch.ones(a.shape[0] // k, device=a.device)
    start = time.perf_counter()
    layer_clipped_sum(layer, layer_norms(layer, method, a, g, k=k, output=out), a, g, factors, k)
    if a.is_cuda:
        torch.cuda.synchronize(a.device)
    return time.perf_counter() - start

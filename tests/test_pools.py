"""dpnas's average pools are PyTorch's, bit for bit: values and gradients, on every input, and the DP step around them.

SmoothingAvgPool (3x3 stride-1 smoothing), HalvingAvgPool (the 2x2 downsampling) and HeadAvgPool (the head's pool
where it is an identity) compute on the CPU with shifted or strided additions instead of PyTorch's kernels. These tests compare bits (the sign of zero and every NaN
position included), not closeness, on random shapes, dtypes, layouts and special values; then whole networks.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_opacus_property import small_arch
from test_per_sample import one_step
from torch import nn

from dpnas import MODELS, ArchConfig, ConfigError, build_model
from dpnas.arch import pools
from dpnas.arch.pools import HalvingAvgPool, HeadAvgPool, SmoothingAvgPool, SmoothingMaxPool


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal as bit patterns, except that any NaN equals any NaN (a NaN's payload is not part of the value)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert actual.stride() == expected.stride(), "the layout changed"
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    int_type = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[actual.dtype]
    bits = actual.contiguous().view(int_type)[~nan.contiguous()]
    assert torch.equal(bits, expected.contiguous().view(int_type)[~nan.contiguous()])


def special_values(shape, dtype, kind: str, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    if kind == "zeros":  # signed zeros, and windows of nothing but -0.0
        x = torch.where(torch.rand(shape, generator=generator) < 0.5, torch.tensor(-0.0, dtype=dtype),
                        torch.tensor(0.0, dtype=dtype))
        x[torch.rand(shape, generator=generator) < 0.2] = 1.0
    elif kind == "special":
        pick = torch.rand(shape, generator=generator)
        x[pick < 0.1] = float("nan")
        x[(pick >= 0.1) & (pick < 0.2)] = float("inf")
        x[(pick >= 0.2) & (pick < 0.3)] = float("-inf")
        x[(pick >= 0.3) & (pick < 0.4)] = -0.0
    elif kind == "tiny":  # subnormals: a quarter of one rounds
        x = x * torch.finfo(dtype).tiny * 3
    elif kind == "cancel":  # sums that cancel exactly, and large magnitudes
        x = torch.randint(-2, 3, shape, generator=generator).to(dtype) * 1e30
    return x


SHAPES = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 10), st.integers(1, 10))
KINDS = st.sampled_from(["normal", "zeros", "special", "tiny", "cancel"])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
LAYOUTS = st.sampled_from(["nchw", "channels_last", "sliced", "last_channels", "transposed"])


def arrange(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "last_channels":  # the MLP head's input: the last channels of a dense block's concatenation
        return torch.cat([torch.zeros_like(x), x], dim=1)[:, x.shape[1]:]
    if layout == "transposed":  # height and width swapped in memory: the kernels decide the output's layout
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":  # a view with a storage offset and gaps
        wider = torch.zeros(x.shape[0], x.shape[1] + 1, x.shape[2], x.shape[3] + 2, dtype=x.dtype)
        wider[:, 1:, :, 1:-1] = x
        return wider[:, 1:, :, 1:-1]
    return x


def forward_backward(pool: nn.Module, x: torch.Tensor, upstream_kind: str, seed: int, grad: bool):
    leaf = x.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = pool(leaf)
    if not grad:
        return out, None
    upstream = special_values(out.shape, out.dtype, upstream_kind, torch.Generator().manual_seed(seed))
    out.backward(upstream)
    return out, leaf.grad


@settings(max_examples=120, deadline=None, derandomize=True)
@given(shape=SHAPES, kind=KINDS, upstream=KINDS, dtype=DTYPES, layout=LAYOUTS, grad=st.booleans())
def test_halving_pool_is_nn_avgpool2d_bit_for_bit(shape, kind, upstream, dtype, layout, grad):
    seed = hash((shape, kind, upstream)) % 2**31
    x = arrange(special_values(shape, dtype, kind, torch.Generator().manual_seed(seed)), layout)
    if shape[2] < 2 or shape[3] < 2:  # no complete window: both refuse
        with pytest.raises(RuntimeError):
            nn.AvgPool2d(2, stride=2)(x)
        with pytest.raises(RuntimeError):
            HalvingAvgPool()(x)
        return
    out, grad_in = forward_backward(HalvingAvgPool(), x, upstream, seed, grad)
    expected, expected_grad = forward_backward(nn.AvgPool2d(2, stride=2), x, upstream, seed, grad)
    assert_same_bits(out, expected)
    if grad:
        assert_same_bits(grad_in, expected_grad)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(shape=SHAPES, kind=KINDS, upstream=KINDS, dtype=DTYPES, layout=LAYOUTS, grad=st.booleans())
def test_smoothing_avg_pool_is_nn_avgpool2d_3x3_bit_for_bit(shape, kind, upstream, dtype, layout, grad):
    seed = hash((shape, kind, upstream, "smoothing")) % 2**31
    x = arrange(special_values(shape, dtype, kind, torch.Generator().manual_seed(seed)), layout)
    out, grad_in = forward_backward(SmoothingAvgPool(), x, upstream, seed, grad)
    expected, expected_grad = forward_backward(nn.AvgPool2d(3, stride=1, padding=1), x, upstream, seed, grad)
    assert_same_bits(out, expected)
    if grad:
        assert_same_bits(grad_in, expected_grad)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(shape=SHAPES, size=st.sampled_from(["input", "input, None", "None, input", 1, 2, 3, 4, (4, None)]),
       kind=KINDS, upstream=KINDS, dtype=DTYPES, layout=LAYOUTS, grad=st.booleans())
def test_head_pool_is_nn_adaptiveavgpool2d_bit_for_bit(shape, size, kind, upstream, dtype, layout, grad):
    seed = hash((shape, kind, upstream, str(size))) % 2**31
    # "input": the features already have the pool's size (the identity path), half of the cases
    size = {"input": shape[2:], "input, None": (shape[2], None), "None, input": (None, shape[3])}.get(size, size)
    x = arrange(special_values(shape, dtype, kind, torch.Generator().manual_seed(seed)), layout)
    out, grad_in = forward_backward(HeadAvgPool(size), x, upstream, seed, grad)
    expected, expected_grad = forward_backward(nn.AdaptiveAvgPool2d(size), x, upstream, seed, grad)
    assert_same_bits(out, expected)
    if grad:
        assert_same_bits(grad_in, expected_grad)


@pytest.mark.parametrize("kind", ["normal", "zeros", "special", "tiny"])
def test_the_identity_head_pool_returns_a_new_tensor_with_the_kernels_bits(kind):
    x = special_values((3, 5, 4, 4), torch.float32, kind, torch.Generator().manual_seed(0)).requires_grad_()
    reference = x.detach().clone().requires_grad_()
    out, expected = HeadAvgPool(4)(x), nn.AdaptiveAvgPool2d(4)(reference)
    assert out.data_ptr() != x.data_ptr()  # in-place changes downstream cannot reach the features
    assert_same_bits(out, expected)
    upstream = special_values(out.shape, out.dtype, kind, torch.Generator().manual_seed(1))
    out.backward(upstream)
    expected.backward(upstream)
    assert_same_bits(x.grad, reference.grad)


def test_the_fast_paths_run_where_promised_and_nowhere_else(monkeypatch):
    calls = []
    for name in ("_SmoothingMean3x3", "_WindowMean2x2", "_PlusZero"):
        function = getattr(pools, name)
        monkeypatch.setattr(function, "apply", lambda x, apply=function.apply, n=name: calls.append(n) or apply(x))
    x = torch.randn(2, 3, 8, 8)
    SmoothingAvgPool()(x)
    HalvingAvgPool()(x)
    HeadAvgPool(8)(x)
    assert calls == ["_SmoothingMean3x3", "_WindowMean2x2", "_PlusZero"]
    for pool in (SmoothingAvgPool(), HalvingAvgPool(), HeadAvgPool(8)):  # a channel slice keeps NCHW order
        pool(x[:, 1:])
    assert calls == ["_SmoothingMean3x3", "_WindowMean2x2", "_PlusZero"] * 2
    calls.clear()
    for other in (x.contiguous(memory_format=torch.channels_last), x.bfloat16(),
                  x.transpose(2, 3).contiguous().transpose(2, 3)):
        SmoothingAvgPool()(other)
        HalvingAvgPool()(other)
        HeadAvgPool(tuple(other.shape[-2:]))(other)
    HalvingAvgPool()(x[..., :7, :7])  # odd sizes: the kernel drops the last row and column
    HeadAvgPool(4)(x)  # a real pool: 8 x 8 to 4 x 4
    assert calls == []


def with_pytorch_pools(model: nn.Module) -> nn.Module:
    """A copy of `model` with each dpnas pool replaced by the PyTorch module it subclasses."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, SmoothingMaxPool):
                setattr(parent, name, nn.MaxPool2d(3, stride=1, padding=1))
            elif isinstance(child, SmoothingAvgPool):
                setattr(parent, name, nn.AvgPool2d(3, stride=1, padding=1))
            elif isinstance(child, HalvingAvgPool):
                setattr(parent, name, nn.AvgPool2d(2, stride=2))
            elif isinstance(child, HeadAvgPool):
                setattr(parent, name, nn.AdaptiveAvgPool2d(child.output_size))
    return model


def count_fast_pools(model: nn.Module) -> int:
    return sum(isinstance(m, (SmoothingAvgPool, HalvingAvgPool, HeadAvgPool)) for m in model.modules())


@pytest.mark.parametrize("name", ["tiny", "smoothnet_w80d10", "wrn16_4"])
@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("pool", ["avg_smooth", None])
def test_a_training_step_through_the_pools_has_pytorchs_bits(name, image_size, pool):
    """Non-private forward + backward of whole networks: the same loss and every gradient, bit for bit."""
    torch.manual_seed(0)
    arch = MODELS[name].arch.replace(pool=pool) if pool else MODELS[name].arch
    model = build_model(arch, num_classes=4, in_channels=3, image_size=image_size)
    reference = with_pytorch_pools(model)
    assert count_fast_pools(model) > 0 and count_fast_pools(reference) == 0
    x, y = torch.randn(6, 3, image_size, image_size), torch.randint(0, 4, (6,))
    losses = [nn.functional.cross_entropy(m(x), y) for m in (model, reference)]
    for loss in losses:
        loss.backward()
    assert_same_bits(losses[0], losses[1])
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_same_bits(p.grad, q.grad)


def assert_dp_step_matches_opacus_on_pytorch_pools(model: nn.Module, image_size: int, *, sigma: float, C: float):
    torch.manual_seed(1)
    x, y = torch.randn(5, 3, image_size, image_size), torch.randint(0, 4, (5,))
    fast = one_step(model, "dpnas", x, y, sigma=sigma, C=C)
    reference = one_step(with_pytorch_pools(model), "opacus", x, y, sigma=sigma, C=C)
    error = (fast[0] - reference[0]).norm() / reference[0].norm()
    assert error < 1e-4, f"relative difference {error:.2e}"
    assert fast[1] == reference[1]


@pytest.mark.parametrize("name", ["tiny", "smoothnet_w80d10", "wrn16_4"])
def test_dp_step_equals_opacus_hooks_with_pytorchs_pools(name):
    torch.manual_seed(0)
    model = build_model(MODELS[name].arch.replace(pool="avg_smooth"), num_classes=4, in_channels=3, image_size=16)
    assert count_fast_pools(model) > 0
    assert_dp_step_matches_opacus_on_pytorch_pools(model, 16, sigma=0.0, C=1.0)
    assert_dp_step_matches_opacus_on_pytorch_pools(model, 16, sigma=1.1, C=1e-3)  # noise, every sample clipped


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(arch=small_arch(), image_size=st.sampled_from([8, 16, 32]))
def test_random_points_dp_step_equals_opacus_hooks_with_pytorchs_pools(arch, image_size):
    torch.manual_seed(0)
    try:  # average pools wherever the point allows them
        arch = arch.replace(pool="avg_smooth", downsample="avg", head_pool="avg")
    except ConfigError:
        arch = arch.replace(pool="avg_smooth", head_pool="avg")
    try:
        model = build_model(arch, num_classes=4, in_channels=3, image_size=image_size)
    except ConfigError:  # too many downsamplings for this image size
        assume(False)
    assert count_fast_pools(model) > 0
    assert_dp_step_matches_opacus_on_pytorch_pools(model, image_size, sigma=0.0, C=1.0)


@pytest.mark.parametrize("skip", ["dense", "residual"])
def test_the_quickstart_networks_take_the_fast_paths(monkeypatch, skip):
    """At 16 px a quickstart network reaches the head at 4 x 4 (the identity path), behind the dense head's
    last-channels slice where skips are dense; its transitions and head downsample through the halving pool."""
    calls = []
    for name in ("_SmoothingMean3x3", "_WindowMean2x2", "_PlusZero"):
        function = getattr(pools, name)
        monkeypatch.setattr(function, "apply", lambda x, apply=function.apply, n=name: calls.append(n) or apply(x))
    arch = MODELS["tiny"].arch.replace(skip=skip, pool="avg_smooth")
    model = build_model(arch, num_classes=10, in_channels=1, image_size=16)
    nn.functional.cross_entropy(model(torch.randn(4, 1, 16, 16)), torch.arange(4)).backward()
    halvings = sum(type(m) is HalvingAvgPool for m in model.modules())
    smoothings = sum(type(m) is SmoothingAvgPool for m in model.modules())
    assert halvings >= 2 and smoothings >= 2
    assert sorted(calls) == sorted(["_WindowMean2x2"] * halvings + ["_SmoothingMean3x3"] * smoothings + ["_PlusZero"])


def test_the_pool_benchmark_compares_each_average_pool_with_pytorchs(monkeypatch):
    """benchmarks/pool_smoothing.py's average-pool and step tables: the same pools, each candidate timed."""
    from bench_helpers import load_benchmark

    bench = load_benchmark("pool_smoothing")
    for shape, pytorch, dpnas in bench.AVERAGE_POOL_CASES:
        assert isinstance(dpnas, type(pytorch))
        x = torch.randn(2, *shape[1:])
        assert_same_bits(dpnas(x), pytorch(x))
    monkeypatch.setattr(bench, "AVERAGE_POOL_CASES", [((2, 3, 8, 8), nn.AvgPool2d(2, stride=2), HalvingAvgPool())])
    (row,) = bench.average_pool_rows(rounds=1)
    assert row["shape"] == [2, 3, 8, 8] and row["pool"] == "AvgPool2d"
    assert all(row[k] > 0 for k in ("forward_pytorch_ms", "forward_dpnas_ms", "fwd_bwd_pytorch_ms", "fwd_bwd_dpnas_ms"))
    model = build_model(MODELS["tiny"].arch.replace(pool="max_smooth"), num_classes=4, in_channels=1, image_size=16)
    kinds = (SmoothingMaxPool, HalvingAvgPool, HeadAvgPool)
    assert [sum(isinstance(m, kind) for m in bench.with_pytorch_pools(model).modules()) for kind in kinds] == [0, 0, 0]
    kept = bench.with_pytorch_pools(model, keep_max_smoothing=True)
    assert [sum(isinstance(m, kind) for m in kept.modules()) > 0 for kind in kinds] == [True, False, False]
    averaging = build_model(MODELS["tiny"].arch.replace(pool="avg_smooth"), num_classes=4, in_channels=1)
    assert not any(isinstance(m, SmoothingAvgPool) for m in bench.with_pytorch_pools(averaging).modules())
    assert bench.POOLS["avg: shifted views (dpnas)"] is not None


@pytest.mark.parametrize("kind", ["normal", "zeros", "special", "tiny", "cancel"])
@pytest.mark.parametrize("channels", [SmoothingMaxPool.MIN_CHANNELS, 20])
def test_the_training_max_pool_scatters_its_gradient_with_the_kernels_bits(monkeypatch, kind, channels):
    """fp32 / fp64 training passes from 8 channels take the channels-last kernel forward and an NCHW scatter
    backward; its gradient is nn.MaxPool2d's, bit for bit, ties, infinities and NaN included."""
    calls = []
    monkeypatch.setattr(pools._ChannelsLastMax3x3, "apply",
                        lambda x, apply=pools._ChannelsLastMax3x3.apply: calls.append(x.dtype) or apply(x))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        generator = torch.Generator().manual_seed(channels)
        x = special_values((3, channels, 7, 9), dtype, kind, generator)
        if kind == "normal":  # ties everywhere
            x = torch.randint(-2, 3, x.shape, generator=generator).to(dtype)
        out, grad_in = forward_backward(SmoothingMaxPool(), x, kind, channels, True)
        expected, expected_grad = forward_backward(nn.MaxPool2d(3, stride=1, padding=1), x, kind, channels, True)
        assert_same_bits(out, expected)
        assert_same_bits(grad_in, expected_grad)
    assert calls == [torch.float32, torch.float64]  # bf16 keeps the channels-last backward kernel

"""The channels-last smoothing max-pool is nn.MaxPool2d(3, 1, 1): same values, same gradients, same DP step."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_opacus_property import small_arch
from test_per_sample import one_step
from test_pools import with_pytorch_pools
from torch import nn

from dpnas import MODELS, build_model
from dpnas.arch.pools import SmoothingMaxPool

REFERENCE = nn.MaxPool2d(3, stride=1, padding=1)


def with_reference_pools(model: nn.Module) -> nn.Module:
    """A copy of `model` whose pools are PyTorch's own (nn.MaxPool2d(3, 1, 1) for the smoothing max pool)."""
    return with_pytorch_pools(model)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 11), w=st.integers(1, 11),
       ties=st.booleans(), channels_last=st.booleans())
def test_values_gradients_and_layout_equal_nn_maxpool(n, c, h, w, ties, channels_last):
    torch.manual_seed(n * 1000 + c * 100 + h * 10 + w)
    x = torch.randn(n, c, h, w)
    if ties:  # few distinct values: many windows hold their maximum more than once
        x = torch.randint(-2, 3, x.shape).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = SmoothingMaxPool()(ours), REFERENCE(reference)
    assert torch.equal(out, expected)
    # the result keeps the layout it came in, so the next layer sees what it would have seen
    assert out.is_contiguous() == expected.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last) == expected.is_contiguous(
        memory_format=torch.channels_last)
    upstream = torch.randn_like(expected)
    out.backward(upstream)
    expected.backward(upstream)
    assert torch.equal(ours.grad, reference.grad)  # ties included: the gradient goes to the same element


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 11), w=st.integers(1, 11),
       values=st.sampled_from(["normal", "ties", "infinite", "nan"]), mode=st.sampled_from(["no_grad", "inference",
                                                                                            "no_requires_grad"]))
def test_without_a_gradient_the_shifted_maximum_is_nn_maxpool_bit_for_bit(n, c, h, w, values, mode):
    """A validation pass takes the shifted-views path: it must give exactly the pool's values, whatever they are."""
    torch.manual_seed(n * 1000 + c * 100 + h * 10 + w)
    x = torch.randn(n, c, h, w)
    if values == "ties":
        x = torch.randint(-2, 3, x.shape).float()
    elif values in ("infinite", "nan"):
        special = torch.tensor(float("nan") if values == "nan" else float("-inf"))
        x = torch.where(torch.rand(x.shape) < 0.3, special, x)
        x[torch.rand(x.shape) < 0.1] = float("inf")
    context = {"no_grad": torch.no_grad, "inference": torch.inference_mode}.get(mode, torch.enable_grad)
    with context():
        out, expected = SmoothingMaxPool()(x), REFERENCE(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert out.is_contiguous()


def test_a_validation_pass_uses_the_shifted_maximum_and_training_the_kernel(monkeypatch):
    from dpnas.arch import pools

    calls = []
    monkeypatch.setattr(pools, "shifted_max3", lambda x: calls.append(x.shape) or REFERENCE(x))
    pool = SmoothingMaxPool()
    with torch.no_grad():
        pool(torch.randn(2, 20, 5, 5))
    assert calls == [torch.Size([2, 20, 5, 5])]
    pool(torch.randn(2, 20, 5, 5, requires_grad=True))
    assert len(calls) == 1  # a pass that backpropagates keeps the kernel whose gradient is tested above


def test_the_space_builds_it_and_it_is_still_a_maxpool():
    model = build_model(MODELS["smoothnet"].arch, num_classes=10, in_channels=3)
    pools = [m for m in model.modules() if isinstance(m, SmoothingMaxPool)]
    assert pools and all(isinstance(m, nn.MaxPool2d) and (m.kernel_size, m.stride, m.padding) == (3, 1, 1)
                         for m in pools)
    assert not any(type(m) is nn.MaxPool2d and m.kernel_size == 3 for m in model.modules())


def assert_same_as_reference_pools(model, *, sigma=0.0, C=1.0):
    """dpnas's DP step on `model` equals Opacus's hooks on the same model with nn.MaxPool2d (1e-4)."""
    torch.manual_seed(1)
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 4, (5,))
    fast = one_step(model, "dpnas", x, y, sigma=sigma, C=C)
    reference = one_step(with_reference_pools(model), "opacus", x, y, sigma=sigma, C=C)
    error = (fast[0] - reference[0]).norm() / reference[0].norm()
    assert error < 1e-4, f"relative difference {error:.2e}"
    assert fast[1] == reference[1]
    # Opacus's hooks accept the new pool too (it has no parameters of its own) and agree
    hooks = one_step(model, "opacus", x, y, sigma=sigma, C=C)
    assert (hooks[0] - reference[0]).norm() / reference[0].norm() < 1e-5


@pytest.mark.parametrize("name", ["tiny", "smoothnet_w80d10"])
def test_dp_step_around_the_pool_equals_opacus_with_nn_maxpool(name):
    torch.manual_seed(0)
    arch = MODELS[name].arch.replace(pool="max_smooth")
    model = build_model(arch, num_classes=4, in_channels=3)
    assert any(isinstance(m, SmoothingMaxPool) for m in model.modules())
    assert_same_as_reference_pools(model)
    assert_same_as_reference_pools(model, sigma=1.1, C=1e-3)  # noise, and every sample clipped


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(arch=small_arch())
def test_random_points_with_max_smoothing_equal_opacus_with_nn_maxpool(arch):
    torch.manual_seed(0)
    assert_same_as_reference_pools(build_model(arch.replace(pool="max_smooth"), num_classes=4, in_channels=3))


@pytest.mark.parametrize("channels", [3, SmoothingMaxPool.MIN_CHANNELS, 48])
def test_both_kernels_narrow_and_wide_equal_nn_maxpool(channels):
    torch.manual_seed(channels)
    x = torch.randint(-3, 4, (4, channels, 9, 7)).float().requires_grad_()  # ties everywhere
    reference = x.detach().clone().requires_grad_()
    out, expected = SmoothingMaxPool()(x), REFERENCE(reference)
    assert torch.equal(out, expected) and out.is_contiguous()
    upstream = torch.randn_like(expected)
    out.backward(upstream)
    expected.backward(upstream)
    assert torch.equal(x.grad, reference.grad)


def test_the_pool_benchmark_times_equal_pools_without_a_gradient(monkeypatch):
    """benchmarks/pool_smoothing.py's no-gradient table: every candidate is the same pool, and each row is timed."""
    from bench_helpers import load_benchmark

    bench = load_benchmark("pool_smoothing")
    x = torch.randn(3, 5, 7, 6)
    x[0, 0, :2, :2] = float("-inf")
    for name, pool in bench.NO_GRAD_POOLS.items():
        assert torch.equal(pool(x), nn.MaxPool2d(3, 1, 1)(x)), name
    monkeypatch.setattr(bench, "NO_GRAD_SHAPES", [(2, 8, 4, 4)])
    rows = bench.no_grad_rows(rounds=1)
    assert [r["pool"] for r in rows] == list(bench.NO_GRAD_POOLS)
    assert all(r["ms"] > 0 and r["shape"] == [2, 8, 4, 4] for r in rows)
    assert rows[0]["speedup_vs_pytorch"] == 1.0

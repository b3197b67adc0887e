"""Every point of the space builds into a model Opacus accepts and can train privately."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from dpnas import MODELS, ArchConfig, ConfigError, build_model
from dpnas.arch.compat import dp_problems
from dpnas.arch.space import (
    ACTIVATIONS,
    DOWNSAMPLES,
    HEAD_POOLS,
    HEADS,
    INITS,
    NORMS,
    SCALENORMS,
    SHORTCUTS,
    SKIPS,
    SMOOTHING_POOLS,
    TRANSITIONS,
)


@st.composite
def small_arch(draw):
    """Any point of the space, kept small enough for a CPU backward pass."""
    stages = draw(st.integers(1, 3))
    fields = dict(
        norm=draw(st.sampled_from(NORMS)),
        groups=draw(st.sampled_from([1, 2, 4, 8, 16, 32])),
        scalenorm=draw(st.sampled_from(SCALENORMS)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        pool=draw(st.sampled_from(SMOOTHING_POOLS)),
        downsample=draw(st.sampled_from(DOWNSAMPLES)),
        skip=draw(st.sampled_from(SKIPS)),
        width=draw(st.sampled_from([0.25, 0.5, 1.0])),
        depth=draw(st.sampled_from([1.0, 1.5, 2.0])),
        stages=stages,
        block_convs=draw(st.integers(1, 2)),
        preact=draw(st.booleans()),
        stem_channels=draw(st.sampled_from([0, 4, 8])),
        transition=draw(st.sampled_from(TRANSITIONS)),
        shortcut=draw(st.sampled_from(SHORTCUTS)),
        head=draw(st.sampled_from(HEADS)),
        head_pool=draw(st.sampled_from(HEAD_POOLS)),
        head_pool_size=draw(st.integers(1, 2)),
        head_hidden=(draw(st.integers(4, 16)),),
        conv_bias=draw(st.booleans()),
        weight_std=draw(st.booleans()),
        init=draw(st.sampled_from(INITS)),
    )
    try:
        arch = ArchConfig(**fields)
        # zero-padded shortcuts cannot narrow the 3 input channels; build_model refuses that
        # (it depends on in_channels, which only the builder knows)
        build_model(arch, num_classes=4, in_channels=3, image_size=32)
    except ConfigError:
        assume(False)
    return arch


def assert_per_sample_gradients(model: nn.Module, image_size: int, batch: int = 3) -> None:
    """One DP backward pass: every trainable parameter gets a per-sample gradient that sums to .grad."""
    ModuleValidator.validate(model, strict=True)
    assert dp_problems(model) == []
    # float64: GroupNorm makes some weights' gradients tiny differences of large terms, which
    # float32 rounding would blur; in float64 the identity below holds to 1e-9
    model = model.double()
    gsm = GradSampleModule(model, loss_reduction="sum")
    x = torch.randn(batch, 3, image_size, image_size, dtype=torch.float64)
    y = torch.randint(0, 4, (batch,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about full backward hooks on some layers
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, f"{name} has no per-sample gradient"
        assert p.grad_sample.shape == (batch, *p.shape), name
        # with a summed loss, the per-sample gradients add up to the ordinary gradient
        error = (p.grad_sample.sum(0) - p.grad).norm()
        scale = p.grad_sample.flatten(1).norm(dim=1).sum()
        assert error <= 1e-7 * scale + 1e-12, f"{name}: per-sample gradients sum off by {error} (scale {scale})"
    gsm._close()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(arch=small_arch())
def test_random_points_at_32px_are_opacus_compatible(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4, in_channels=3, image_size=32)
    assert_per_sample_gradients(model, 32)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(arch=small_arch())
def test_random_points_at_224px_are_opacus_compatible(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4, in_channels=3, image_size=224)
    assert_per_sample_gradients(model, 224, batch=2)


@pytest.mark.parametrize("name", ["tiny", "resnet9_scalenorm", "wrn16_4", "smoothnet_w80d10"])
def test_reference_models_produce_per_sample_gradients(name):
    assert_per_sample_gradients(build_model(MODELS[name].arch, num_classes=4, in_channels=3), 32, batch=2)


def test_dp_problems_name_the_offending_submodule():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    problems = dp_problems(model)
    assert any(p.startswith("1.1: ") and "BatchNorm" in p for p in problems), problems
    model.eval()
    assert any("training mode" in p for p in dp_problems(model))

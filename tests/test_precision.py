"""bf16 autocast and channels-last: faster layouts and precisions that leave the clipping exact.

Both run on CPU here (autocast on CPU uses the same bf16 rules as on the GPU), so the suite checks the code
path a GPU run takes.
"""

import copy

import pytest
import torch
from opacus import GradSampleModule

from dpnas import MODELS, build_model
from dpnas.arch.space import ConfigError
from dpnas.dp.engine import DPSGDEngine
from dpnas.dp.per_sample import METHODS
from dpnas.dp.privacy import PrivacyPlan

PLAN = PrivacyPlan(sample_rate=0.05, steps=1, noise_multiplier=0.0, expected_batch_size=1.0, dataset_size=20)


def engine_for(model, max_grad_norm=1.0, **options):
    return DPSGDEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), plan=PLAN, max_grad_norm=max_grad_norm,
                       private=True, accountant=None, physical_batch_size=4, **options)


def update(model, x, y, **options):
    """The gradient one noise-free step applies: the clipped sum divided by the expected batch size (1).

    Read from DPOptimizer's step hook rather than from the change in the weights, whose fp32 rounding
    would swallow the smallest entries.
    """
    engine = engine_for(copy.deepcopy(model), **options)
    applied = []
    engine.optimizer.attach_step_hook(lambda opt: applied.append(torch.cat([p.grad.flatten() for p in opt.params])))
    engine.step(x, y)
    return applied[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["tiny", "resnet9_scalenorm", "wrn16_4"])
def test_channels_last_gives_the_same_clipped_sum(name, method):
    torch.manual_seed(0)
    model = build_model(MODELS[name].arch, num_classes=4, in_channels=3)
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 4, (5,))
    # (NCHW on this path equals Opacus's hooks: tests/test_per_sample.py)
    nchw = update(model, x, y, per_sample="dpnas", per_sample_method=method)
    nhwc = update(model, x, y, per_sample="dpnas", per_sample_method=method, channels_last=True)
    assert ((nhwc - nchw).norm() / nchw.norm()) < 1e-5


def test_channels_last_is_refused_where_opacus_hooks_would_compute_the_gradients():
    # Opacus's conv grad sampler reads NHWC tensors as if they were NCHW: its per-sample gradients are wrong
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(3, 4, 8, 8)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = GradSampleModule(torch.nn.Sequential(copy.deepcopy(conv)).to(memory_format=layout))
        model(x.contiguous(memory_format=layout)).pow(2).sum().backward()
        grads.append(model._module[0].weight.grad_sample)
    assert not torch.allclose(grads[0], grads[1], atol=1e-3)
    # so dpnas refuses channels-last on that path instead of training on wrong gradients
    model = build_model(MODELS["tiny"].arch, num_classes=4, in_channels=3)
    with pytest.raises(ConfigError, match="channels_last"):
        engine_for(model, per_sample="opacus", channels_last=True)


def test_amp_runs_the_forward_pass_in_bf16():
    model = build_model(MODELS["tiny"].arch, num_classes=4, in_channels=3)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 4, (3,))
    for amp in (False, True):
        update(model, x, y, autocast=amp)
    assert seen == [torch.float32, torch.bfloat16]


def clipped_contribution_norms(model, **options):
    """Norms of single samples' clipped contributions (C = 1); these samples' gradients are far above C."""
    torch.manual_seed(0)
    norms = []
    for _ in range(3):
        x, y = torch.randn(1, 3, 32, 32) * 3, torch.randint(0, 4, (1,))
        # expected batch 1: the update is the sum; in double, as torch's fp32 .norm() of 2M entries is off by 1e-4
        norms.append(update(model, x, y, **options).double().norm().item())
    return norms


@pytest.mark.parametrize("name", ["tiny", "resnet9_scalenorm"])
def test_amp_clips_each_sample_to_exactly_the_bound(name):
    """Under bf16 a sample's clipped contribution still has norm C: the norm and the sum come from the same fp32 numbers."""
    torch.manual_seed(0)
    model = build_model(MODELS[name].arch, num_classes=4, in_channels=3)
    assert clipped_contribution_norms(model, autocast=True, per_sample="dpnas") == pytest.approx([1.0] * 3, rel=1e-5)


def test_amp_is_refused_where_opacus_hooks_would_clip_in_bf16(monkeypatch):
    model = build_model(MODELS["tiny"].arch, num_classes=4, in_channels=3)
    with pytest.raises(ConfigError, match="amp"):
        engine_for(model, per_sample="opacus", autocast=True)
    # what the refusal prevents: Opacus's norms and sums in bf16 let a contribution exceed C
    monkeypatch.setattr(DPSGDEngine, "_autocast", lambda self, device: torch.autocast(device.type, dtype=torch.bfloat16))
    assert max(clipped_contribution_norms(model, per_sample="opacus")) > 1.001


@pytest.mark.parametrize("name", ["tiny", "resnet9_scalenorm"])
def test_amp_unclipped_sum_is_the_gradient_of_the_bf16_forward_pass(name):
    """With C too large to clip, the step applies autograd's batch gradient of the same bf16 forward pass."""
    torch.manual_seed(0)
    model = build_model(MODELS[name].arch, num_classes=4, in_channels=3)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = reference(x)
    torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()]).double()
    applied = update(model, x, y, autocast=True, max_grad_norm=1e6).double()
    assert ((applied - expected).norm() / expected.norm()) < 1e-2


def test_norms_and_clipped_sums_are_formed_in_full_fp32(monkeypatch):
    """On GPU, TF32 would let a ghost norm and its book-keeping sum disagree by 1e-3 (on CPU, "medium" matmul
    precision would run them in bf16): both run in full fp32, whatever the user set for the model."""
    import dpnas.dp.per_sample as per_sample

    settings = []

    def recording(function):
        def wrapped(*args, **kwargs):
            settings.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                             torch.backends.cudnn.allow_tf32))
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(per_sample, "layer_norms", recording(per_sample.layer_norms))
    monkeypatch.setattr(per_sample, "layer_clipped_sum", recording(per_sample.layer_clipped_sum))
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32  # (these reject monkeypatch)
    torch.set_float32_matmul_precision("medium")  # what a user may have set: TF32 on GPU, bf16 on CPU
    torch.backends.cudnn.allow_tf32 = True
    try:
        model = build_model(MODELS["tiny"].arch, num_classes=4, in_channels=3)
        update(model, torch.randn(3, 3, 32, 32), torch.randint(0, 4, (3,)), per_sample="dpnas")
        assert settings and set(settings) == {("highest", False, False)}
        # and the user's settings are back afterwards
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]

"""The same properties on a CUDA device: skipped where there is none (CI has none; `benchmarks/gpu_session.sh check` runs it).

On the GPU, cuDNN picks its own kernels, TF32 is on by default for convolutions, and bf16 autocast uses tensor
cores, so the CPU tests do not cover what a GPU run computes.
"""

import copy
import os

import pytest
import torch

from dpnas import MODELS, build_model
from dpnas.data.datasets import load_dataset
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.engine import DPSGDEngine
from dpnas.dp.per_sample import METHODS
from dpnas.dp.privacy import PrivacyPlan, poisson_sample
from dpnas.dp.train import train

# DPNAS_TEST_DEVICE=cpu runs this file's logic on the CPU (to rehearse it before a GPU session)
CUDA = torch.device(os.environ.get("DPNAS_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
REFERENCE_MODELS = ["tiny", "smoothnet", "resnet9_scalenorm", "wrn16_4"]


def applied_gradient(model, x, y, *, max_grad_norm=1.0, expected_batch=4.0, **options):
    """The gradient one noise-free step applies (clipped sum / expected batch), read from DPOptimizer's step hook."""
    model = copy.deepcopy(model).to(CUDA)
    plan = PrivacyPlan(sample_rate=0.05, steps=1, noise_multiplier=0.0, expected_batch_size=expected_batch,
                       dataset_size=80)
    engine = DPSGDEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), plan=plan, max_grad_norm=max_grad_norm,
                         private=True, accountant=None, physical_batch_size=3, **options)
    applied = []
    engine.optimizer.attach_step_hook(lambda opt: applied.append(torch.cat([p.grad.flatten() for p in opt.params])))
    engine.step(x.to(CUDA), y.to(CUDA))
    return applied[0].double().cpu()


@pytest.fixture
def exact_fp32():
    """cuDNN and cuBLAS in full fp32 and deterministic, to compare two paths number for number."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic = saved


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_clipped_sum_equals_opacus_on_cuda(name, method, exact_fp32):
    torch.manual_seed(0)
    model = build_model(MODELS[name].arch, num_classes=4, in_channels=3)
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 4, (5,))
    fast = applied_gradient(model, x, y, per_sample="dpnas", per_sample_method=method)
    reference = applied_gradient(model, x, y, per_sample="opacus")
    assert ((fast - reference).norm() / reference.norm()) < 1e-4


@pytest.mark.parametrize("options", [{}, {"autocast": True}, {"channels_last": True},
                                     {"autocast": True, "channels_last": True}])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["smoothnet", "resnet9_scalenorm", "wrn16_4"])
def test_each_clipped_contribution_has_norm_c_with_gpu_defaults(name, method, options):
    """With cuDNN's defaults (TF32 convolutions), bf16 and NHWC: a clipped sample contributes exactly C."""
    torch.manual_seed(0)
    model = build_model(MODELS[name].arch, num_classes=4, in_channels=3)
    for _ in range(2):
        x, y = torch.randn(1, 3, 32, 32) * 3, torch.randint(0, 4, (1,))
        contribution = applied_gradient(model, x, y, expected_batch=1.0, per_sample="dpnas", per_sample_method=method,
                                        **options)
        assert contribution.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_poisson_batches_are_drawn_on_the_device():
    generator = torch.Generator(CUDA).manual_seed(0)
    sizes = []
    for _ in range(200):
        idx = poisson_sample(10_000, 0.01, generator=generator, device=CUDA)
        assert idx.device.type == CUDA.type
        sizes.append(len(idx))
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 100) < 4 * (100 * 0.99 / len(sizes)) ** 0.5  # Binomial(10000, 0.01) mean, 4 standard errors


@pytest.mark.parametrize("options", [{}, {"amp": True, "channels_last": True}])
def test_training_on_cuda_meets_the_budget(options):
    data = load_dataset("synthetic", val_fraction=0.2, seed=0, synthetic_size=512)
    cfg = TrainConfig(epochs=1, batch_size=64, physical_batch_size=32, optimizer="nadam", lr=2e-3, **options)
    result = train(MODELS["tiny"].arch, data, train_cfg=cfg, privacy=PrivacyConfig(epsilon=4.0), device=CUDA,
                   progress=False)
    assert result["device"].startswith(CUDA.type) and result["per_sample"] == "dpnas"
    assert 0.99 * 4.0 <= result["epsilon_spent"] <= 4.0 and result["steps"] == result["planned_steps"]

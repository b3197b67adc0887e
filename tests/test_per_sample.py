"""dpnas's per-sample path gives Opacus's clipped sums, noise and accounting, on every reference model."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_opacus_property import small_arch

from dpnas import MODELS, build_model
from dpnas.arch.space import ConfigError
from dpnas.dp.config import PrivacyConfig
from dpnas.dp.engine import DPSGDEngine
from dpnas.dp.per_sample import METHODS, supports
from dpnas.dp.per_sample_layers import CONV_METHODS
from dpnas.dp.privacy import PrivacyPlan, make_accountant


def one_step(model, mode, x, y, *, sigma, C=1.0, physical=3, k=1, augment=None, method="auto"):
    model = copy.deepcopy(model)
    accountant = make_accountant(PrivacyConfig())
    plan = PrivacyPlan(sample_rate=0.05, steps=1, noise_multiplier=sigma, expected_batch_size=4.0, dataset_size=80)
    engine = DPSGDEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), plan=plan, max_grad_norm=C,
                         private=True, accountant=accountant, physical_batch_size=physical, aug_multiplicity=k,
                         noise_generator=torch.Generator().manual_seed(7), per_sample=mode,
                         per_sample_method=method)
    if engine.clipper is not None:
        # oneDNN's 1x1 convolutions on both sides. dpnas's products (dpnas.dp.pointwise) add their terms in another
        # order, and behind dozens of max-smoothing pools a last-bit difference flips a near-tied maximum: SmoothNet
        # W80D50's step then moved by 2.6e-3 on an AVX2 CPU (not on AVX-512), with every per-sample method alike.
        # The products are checked against the convolution in tests/test_pointwise.py.
        engine.clipper.pointwise_products = False
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    loss = engine.step(x, y, augment=augment)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return before - after, accountant.history, float(loss)


def assert_same_step(model, *, image_size=32, sigma=0.0, k=1, method="auto", C=1.0):
    torch.manual_seed(1)
    x = torch.randn(5, 3, image_size, image_size)
    y = torch.randint(0, 4, (5,))
    augment = (lambda rows: rows * 1.5 + 0.1) if k > 1 else None
    fast = one_step(model, "dpnas", x, y, sigma=sigma, k=k, augment=augment, method=method, C=C)
    reference = one_step(model, "opacus", x, y, sigma=sigma, k=k, augment=augment, C=C)
    error = (fast[0] - reference[0]).norm() / reference[0].norm()
    assert error < 1e-4, f"relative difference {error:.2e}"
    assert fast[1] == reference[1]  # the accountant heard the same steps
    assert fast[2] == pytest.approx(reference[2], rel=1e-5)


REFERENCE_CASES = [(name, method) for name in ["tiny", "smoothnet", "smoothnet_w80d10", "resnet9", "resnet9_scalenorm",
                                                 "wrn16_4"] for method in METHODS
                   # W80D50 with every fixed method repeats W80D10's layer types at 5x the depth (and the suite's
                   # time): it keeps the default, per-layer choice; W80D10 runs every method
                   if name != "smoothnet" or method == "auto"]


@pytest.mark.parametrize(("name", "method"), REFERENCE_CASES)
def test_reference_models_clipped_sum_equals_opacus(name, method):
    torch.manual_seed(0)
    model = build_model(MODELS[name].arch, num_classes=4, in_channels=3)
    assert supports(model)
    assert_same_step(model, method=method)


@pytest.mark.parametrize("method", CONV_METHODS)
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(arch=small_arch())
def test_random_points_clipped_sum_equals_opacus(arch, method):
    torch.manual_seed(0)
    assert_same_step(build_model(arch, num_classes=4, in_channels=3), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_noise_and_augmentation_multiplicity_match_opacus(method):
    torch.manual_seed(0)
    model = build_model(MODELS["tiny"].arch, num_classes=4, in_channels=3)
    assert_same_step(model, sigma=1.3, method=method)  # the same generator draws the same noise on both paths
    assert_same_step(model, k=2, method=method)
    # weight standardisation, conv biases and strided convolutions, with K = 2 augmentations
    wrn_like = build_model(MODELS["wrn16_4"].arch.replace(width=0.25, conv_bias=True), num_classes=4, in_channels=3)
    assert_same_step(wrn_like, k=2, method=method, image_size=16, C=1e-3)  # every sample clipped


def test_modes_and_fallback():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, groups=1), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    assert supports(model)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    assert not supports(grouped)
    plan = PrivacyPlan(sample_rate=0.1, steps=1, noise_multiplier=1.0, expected_batch_size=2.0, dataset_size=20)
    kwargs = dict(plan=plan, max_grad_norm=1.0, private=True, accountant=None, physical_batch_size=2)
    engine = DPSGDEngine(grouped, torch.optim.SGD(grouped.parameters(), lr=0.1), **kwargs)  # auto falls back
    assert engine.clipper is None
    with pytest.raises(ConfigError, match="does not cover every layer"):
        DPSGDEngine(grouped, torch.optim.SGD(grouped.parameters(), lr=0.1), per_sample="dpnas", **kwargs)
    with pytest.raises(ConfigError, match="per_sample: unknown value"):
        DPSGDEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), per_sample="fast", **kwargs)


def test_tuner_times_only_plausible_methods_and_remembers_the_choice(monkeypatch):
    import dpnas.dp.per_sample as per_sample
    from dpnas.dp.per_sample import PerSampleClipper

    timed = []
    seconds = {"unfold": 2.0, "grouped": 1.0, "ghost": 3.0}
    monkeypatch.setattr(per_sample, "_TUNED", {})
    monkeypatch.setattr(per_sample, "_seconds", lambda layer, method, *rest: timed.append(method) or seconds[method])

    def tuned(model, image_shape):
        clipper = PerSampleClipper(model)
        for _ in range(2):  # the second step reuses the first step's choice
            clipper.backward(model, torch.randn(3, *image_shape), torch.tensor([0, 1, 0]))
            clipper.clipped_sum(1.0)
        return clipper.chosen[model[0]]

    # a 64x64 map with few channels: the ghost Gram matrix would be 16x the input and far more work
    big_map = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 64 * 64, 2))
    assert tuned(big_map, (4, 64, 64)) == "grouped"
    assert timed == ["unfold", "grouped"] * 4  # a warm-up, then three rounds taking turns
    timed.clear()
    # a 4x4 map with many channels: materialising per-sample gradients is 5x the multiply-adds of the ghost norm
    small_map = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(64 * 16, 2))
    assert tuned(small_map, (64, 4, 4)) == "ghost"
    assert timed == []  # the only candidate: nothing to time


def test_tuner_times_the_close_methods_again_on_the_whole_batch(monkeypatch):
    """A sample's ranking need not hold for the whole batch (a working set that leaves the cache): the methods
    close on the sample are timed on the whole batch, and the fastest there is kept."""
    import dpnas.dp.per_sample as per_sample

    timed = []
    # unfold wins on the 32-sample tuning batch and loses on all 96 rows; ghost is far behind on the sample
    seconds = {(32, "unfold"): 1.0, (32, "grouped"): 1.2, (32, "ghost"): 5.0, (96, "unfold"): 9.0, (96, "grouped"): 3.6}

    def fake_seconds(layer, method, a, *rest):
        timed.append((a.shape[0], method))
        return seconds[a.shape[0], method]

    monkeypatch.setattr(per_sample, "_seconds", fake_seconds)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    a, g = torch.randn(96, 2, 6, 6), torch.randn(96, 2, 6, 6)
    assert per_sample._fastest(conv, ["unfold", "grouped", "ghost"], a, g, None, 1) == "grouped"
    # a warm-up and three rounds on the sample, then two rounds of the finalists on every row; ghost is not one
    assert timed == [(32, m) for m in ("unfold", "grouped", "ghost")] * 4 + [(96, "unfold"), (96, "grouped")] * 2
    # where the sample's ranking holds, the sample's fastest is kept
    seconds[96, "unfold"] = 3.0
    assert per_sample._fastest(conv, ["unfold", "grouped", "ghost"], a, g, None, 1) == "unfold"


def test_tuner_never_picks_a_method_that_ran_out_of_gpu_memory(monkeypatch):
    import dpnas.dp.per_sample as per_sample

    calls = []

    def fake_seconds(layer, method, a, *rest):
        calls.append((a.shape[0], method))
        if method == "grouped" and a.shape[0] > 32:  # fits the sample, not the whole batch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"unfold": 1.2, "grouped": 1.0}[method]

    monkeypatch.setattr(per_sample, "_seconds", fake_seconds)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    a, g = torch.randn(64, 2, 6, 6), torch.randn(64, 2, 6, 6)
    assert per_sample._fastest(conv, ["unfold", "grouped"], a, g, None, 1) == "unfold"
    # the method that failed is not run again, and the cache it left is freed
    assert calls.count((64, "grouped")) == 1 and "empty_cache" in calls and calls.count((64, "unfold")) == 2


class _TwoStems(torch.nn.Module):
    """Two trainable layers that both read the images, then one that reads both."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 4, 1)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))

    def forward(self, x):
        return self.head(self.a(x) + torch.relu(self.b(x)))


def test_no_gradient_for_the_images_and_every_stem_still_gets_its_own():
    """The images never require a gradient (nothing uses it, and it costs a conv's input gradient); every layer
    that reads them directly starts the graph instead, so each one's per-sample gradients are still exact:
    unclipped, their sum is the ordinary gradient of the summed loss."""
    from dpnas.dp.per_sample import PerSampleClipper

    torch.manual_seed(0)
    model = _TwoStems()
    x, y = torch.randn(6, 3, 6, 6), torch.randint(0, 3, (6,))
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    expected = {p: p.grad.clone() for p in model.parameters()}
    model.zero_grad(set_to_none=True)

    seen = []

    def logits(images):
        seen.append(images.requires_grad)
        return model(images)

    stem_outputs = []
    for stem in (model.a, model.b):
        stem.register_forward_hook(lambda module, inputs, output: stem_outputs.append(output))
    clipper = PerSampleClipper(model)
    clipper.backward(logits, x.requires_grad_(True), y)
    sums = clipper.clipped_sum(1e9)
    assert seen == [False]
    # the stems' outputs start the graph, and autograd stores no .grad on them (the hooks have the gradients)
    assert len(stem_outputs) == 2 and all(o.requires_grad and o.is_leaf and o.grad is None for o in stem_outputs)
    assert set(sums) == set(expected)
    for p, total in sums.items():
        torch.testing.assert_close(total, expected[p], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mode", ["dpnas", "opacus"])
def test_a_step_trains_every_module_whatever_mode_it_was_left_in(mode):
    """A validation pass leaves the model in eval mode only if it fails half-way; whichever modules are in eval
    mode, the next step puts all of them back in training mode (a step checks instead of calling train())."""
    torch.manual_seed(0)
    model = build_model(MODELS["tiny"].arch, num_classes=4)
    plan = PrivacyPlan(sample_rate=0.05, steps=1, noise_multiplier=1.0, expected_batch_size=4.0, dataset_size=80)
    engine = DPSGDEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), plan=plan, max_grad_norm=1.0,
                         private=True, accountant=None, physical_batch_size=4, per_sample=mode)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    for leave in (lambda: model.eval(), lambda: list(model.modules())[-1].eval()):
        leave()
        engine.step(x, y)
        assert all(m.training for m in model.modules())


@pytest.mark.parametrize(("name", "method"), [("tiny", "auto"), ("resnet9_scalenorm", "auto"), ("wrn16_4", "ghost"),
                                              ("smoothnet_w80d10", "grouped"), ("tiny", "unfold")])
def test_clipped_sums_in_chunks_of_samples_equal_opacus(name, method, monkeypatch):
    """Norms and sums formed chunk by chunk (here one or two samples at a time, with K = 1 and K = 2 rows each)
    still clip each sample by its norm over every layer: the step equals Opacus's whole-batch one."""
    from dpnas.dp import per_sample

    monkeypatch.setattr(per_sample, "CHUNK_BYTES", 1)
    monkeypatch.setattr(per_sample, "MIN_CHUNKS", 1)
    monkeypatch.setattr(per_sample, "MIN_CHUNK_SAMPLES", 1 if name == "tiny" else 2)
    chunked = []  # (samples, their chunks) per clipped sum
    sample_chunks = per_sample.sample_chunks

    def recorded(captured, k):
        chunked.append((len(captured[0][1]) // k, sample_chunks(captured, k)))
        return chunked[-1][1]

    monkeypatch.setattr(per_sample, "sample_chunks", recorded)
    torch.manual_seed(0)
    model = build_model(MODELS[name].arch, num_classes=4, in_channels=3)
    assert_same_step(model, method=method, C=0.05)  # C small enough that every sample is clipped
    for k in (1, 2) if name == "tiny" else ():
        assert_same_step(model, method=method, k=k, sigma=0.7)
    samples = 1 if name == "tiny" else 2
    # batch 5 in physical batches of 3 and 2 samples
    assert [(n, len(chunks)) for n, chunks in chunked[:2]] == [(3, -(-3 // samples)), (2, -(-2 // samples))]


def test_sample_chunks_keep_large_batches_temporaries_small_on_the_cpu():
    """Chunks of whole samples only where a whole CPU batch's per-sample temporaries would pass 32 MiB and make at
    least four chunks; they cover every row once, in order, K rows per sample."""
    from dpnas.dp.per_sample import sample_chunks

    def captured(model, n, size, k=1, device="cpu"):
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.Linear))]
        # expanded tensors: the shapes of a batch of n * k rows without its memory
        return [(layer, torch.empty(1, 64, size, size, device=device).expand(n * k, -1, -1, -1),
                 torch.empty(1, 64, size, size, device=device).expand(n * k, -1, -1, -1), None) for layer in layers]

    resnet9 = build_model(MODELS["resnet9_scalenorm"].arch, num_classes=10)
    tiny = build_model(MODELS["tiny"].arch, num_classes=10)
    whole = [slice(None)]
    chunks = sample_chunks(captured(resnet9, 256, 32), 1)
    assert [(c.start, c.stop) for c in chunks] == [(i, i + 32) for i in range(0, 256, 32)]
    chunks = sample_chunks(captured(resnet9, 130, 32, k=2), 2)  # a Poisson batch: the last chunk is smaller
    assert [(c.start, c.stop) for c in chunks] == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 260)]
    assert sample_chunks(captured(resnet9, 96, 32), 1) == whole  # three chunks: not worth it
    assert sample_chunks(captured(tiny, 256, 4), 1) == whole  # small temporaries
    # a Linear layer's norms are ghost norms: its 4 M weights are no per-sample temporary
    wide_head = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8192, 512))
    assert sample_chunks(captured(wide_head, 256, 4), 1) == whole
    assert sample_chunks(captured(resnet9, 256, 32, device="meta"), 1) == whole  # not the CPU


def test_a_layer_with_a_frozen_parameter_goes_to_opacus_s_hooks():
    """dpnas's path formed a frozen parameter's per-sample gradient too: it counted in every sample's clip norm
    (the trainable ones clipped too hard: 2e-2 off) and its sum piled up on the parameter. Opacus leaves it out."""
    model = build_model(MODELS["tiny"].arch, num_classes=4, in_channels=3, image_size=16)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    last.weight.requires_grad_(False)
    assert not supports(model)
    torch.manual_seed(1)
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 4, (5,))
    auto, reference = one_step(model, "auto", x, y, sigma=0.0), one_step(model, "opacus", x, y, sigma=0.0)
    assert torch.equal(auto[0], reference[0])


def test_a_layer_called_twice_in_a_forward_pass_is_refused_not_mixed_up():
    """Shared weights: the hooks kept one input and one output gradient per layer, from different calls, and the
    clipped step was about 50 % off, silently."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.fc = torch.nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))

    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    with pytest.raises(ConfigError, match="called twice in one forward pass"):
        one_step(Tied(), "auto", x, y, sigma=0.0)
    one_step(Tied(), "opacus", x, y, sigma=0.0)  # Opacus's hooks sum the calls


def test_torch_s_per_backend_precision_settings_are_honoured_and_restored():
    """After `torch.backends.cuda.matmul.fp32_precision = "tf32"` (torch's newer API), the old getter that the
    norms' fp32 guard called raises: every dpnas DP step crashed. In a fresh process: the setting sticks."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from dpnas.dp.per_sample import full_fp32\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "torch.backends.mkldnn.conv.fp32_precision = 'bf16'\n"
        "with full_fp32():\n"
        "    assert torch.backends.cuda.matmul.fp32_precision == 'ieee'\n"
        "    assert torch.backends.mkldnn.conv.fp32_precision == 'ieee'\n"
        "assert torch.backends.cuda.matmul.fp32_precision == 'tf32'\n"
        "assert torch.backends.mkldnn.conv.fp32_precision == 'bf16'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]

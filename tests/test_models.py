import pytest
import torch
from torch import nn

from dpnas import MODELS, ArchConfig, ConfigError, build_model, count_parameters
from dpnas.arch.layers import TemperedSigmoid, WSConv2d
from dpnas.arch.models import DenseBlock, LastChannels, ResidualBlock
from dpnas.arch.pools import HalvingAvgPool, HeadAvgPool, SmoothingMaxPool


def params(name, num_classes=10):
    return count_parameters(build_model(MODELS[name].arch, num_classes=num_classes, in_channels=3))


@pytest.mark.parametrize(
    "name,expected",
    [("smoothnet", 3_391_853), ("resnet9", 2_447_946), ("resnet9_scalenorm", 2_448_714)],
)
def test_reference_parameter_counts_are_exact(name, expected):
    assert params(name) == expected


def test_named_variants_match_the_papers_sizes():
    assert round(params("smoothnet_w80d10"), -3) == 601_000
    assert round(params("smoothnet_w80d80"), -5) == 8_200_000
    assert 2_700_000 <= params("wrn16_4") <= 2_800_000


def test_smoothnet_is_the_default_point():
    assert MODELS["smoothnet"].arch == ArchConfig()


def test_smoothnet_layer_order_matches_the_paper():
    model = build_model(ArchConfig(), num_classes=10, in_channels=3)
    stage0 = model.features.stage0
    assert len(stage0) == 5 and all(isinstance(b, DenseBlock) for b in stage0)
    unit = stage0[0].body[0]
    assert [type(m) for m in unit] == [nn.Conv2d, SmoothingMaxPool, nn.GroupNorm, nn.SELU]
    conv, pool, norm = unit.conv, unit.pool, unit.norm
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (3, 64, (3, 3), None)
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 1)
    assert (norm.num_groups, norm.num_channels) == (8, 64)
    assert [b.body[0].conv.in_channels for b in stage0] == [3, 67, 131, 195, 259]
    transition = model.features.transition1
    assert (transition.conv.in_channels, transition.conv.out_channels, transition.conv.kernel_size) == (323, 161, (1, 1))
    assert type(transition.downsample) is HalvingAvgPool and isinstance(transition.downsample, nn.AvgPool2d)
    assert [b.body[0].conv.in_channels for b in model.features.stage1] == [161, 289, 417, 545, 673]
    head = model.head
    assert [type(m) for m in head] == [
        HalvingAvgPool, LastChannels, HeadAvgPool, nn.Flatten,
        nn.Linear, nn.SELU, nn.Linear, nn.SELU, nn.Linear,
    ]
    assert isinstance(head.pool, nn.AdaptiveAvgPool2d) and isinstance(head.downsample, nn.AvgPool2d)
    assert (head.downsample.kernel_size, head.downsample.stride) == (2, 2)
    assert head.last_block.n == 128 and head.pool.output_size == 4
    assert (head.fc1.in_features, head.fc1.out_features, head.fc3.out_features) == (2048, 256, 10)


def test_dense_head_keeps_exactly_the_last_blocks_output():
    torch.manual_seed(0)
    model = build_model(ArchConfig(width=1.0, depth=2.0, head_hidden=(8,)), num_classes=3, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    stage1_input = model.features.transition1(model.features.stage0(x))
    last_block = model.features.stage1[1]
    block_input = model.features.stage1[0](stage1_input)
    expected = last_block.body(block_input)  # what the last block itself computed
    pooled = model.head.last_block(model.head.downsample(last_block(block_input)))
    assert torch.allclose(pooled, model.head.downsample(expected))


def test_selu_xavier_init_uses_selu_gain():
    torch.manual_seed(0)
    model = build_model(ArchConfig(), num_classes=10, in_channels=3)
    w = model.head.fc1.weight
    bound = nn.init.calculate_gain("selu") * (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_resnet9_scalenorm_follows_the_residual_addition():
    model = build_model(MODELS["resnet9_scalenorm"].arch, num_classes=10, in_channels=3).eval()
    block = model.features.stage0[0]
    assert isinstance(block, ResidualBlock) and isinstance(block.scalenorm, nn.GroupNorm)
    assert isinstance(block.act, nn.Identity)  # no activation after ScaleNorm
    x = torch.randn(2, 128, 16, 16)
    assert torch.allclose(block(x), block.scalenorm(block.body(x) + x))
    assert isinstance(model.head.pool, nn.AdaptiveMaxPool2d) and model.head.fc.in_features == 1024


def test_before_act_scalenorm_puts_the_activation_after_the_norm():
    arch = ArchConfig(skip="residual", scalenorm="before_act", activation="relu", width=1.0, depth=2.0)
    block = build_model(arch, num_classes=2, in_channels=3).features.stage1[1]
    assert "act" not in dict(block.body[-1].named_children())
    x = torch.randn(2, 16, 16, 16)
    expected = torch.relu(block.scalenorm(block.body(x) + block.shortcut(x)))
    assert torch.allclose(block(x), expected)


def test_wrn_is_preactivation_with_weight_standardisation():
    model = build_model(MODELS["wrn16_4"].arch, num_classes=10, in_channels=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, WSConv2d) for m in convs)
    first_unit = model.features.stage0[0].body[0]
    assert list(dict(first_unit.named_children())) == ["act", "norm", "conv"]
    assert model.features.stage1[0].body[0].conv.stride == (2, 2)
    w = model.features.stage0[0].body[0].conv.standardized_weight()
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(w.shape[0]), atol=1e-5)


def test_tempered_sigmoid_defaults_to_tanh():
    x = torch.linspace(-3, 3, 50)
    assert torch.allclose(TemperedSigmoid()(x), torch.tanh(x), atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_named_model_runs_on_224px_inputs(name):
    if name == "smoothnet_w80d80":
        pytest.skip("8 M parameters at 224 px is slow on CPU; W80D10 and W80D50 cover the same path")
    model = build_model(MODELS[name].arch, num_classes=7, in_channels=3, image_size=224)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


def test_smoothnet_spatial_path_serves_224px():
    # 224 -> 112 -> 56 -> adaptive 4x4: the head sees the same 2048 features as at 32 px
    model = build_model(ArchConfig(width=1.0, depth=1.0), num_classes=10, in_channels=3, image_size=224)
    with torch.no_grad():
        features = model.head.flatten(model.head.pool(model.head.last_block(model.head.downsample(
            model.features(torch.randn(1, 3, 224, 224))))))
    assert features.shape == (1, 16 * 4 * 4)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(ArchConfig(), num_classes=0, in_channels=3)
    with pytest.raises(ConfigError, match="in_channels"):
        build_model(ArchConfig(), num_classes=2, in_channels=0)
    with pytest.raises(ConfigError, match="too small for 6 downsamplings"):
        build_model(ArchConfig(stages=6, width=0.25, depth=1.0), num_classes=2, in_channels=3, image_size=32)
    with pytest.raises(TypeError, match="expects an ArchConfig"):
        build_model({"width": 1.0}, num_classes=2, in_channels=3)  # type: ignore[arg-type]

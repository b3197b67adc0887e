"""Points of the space that build the same model have one identity, and a point the space admits builds."""

from pathlib import Path

import pytest
import torch

from dpnas.arch.conditions import ARCH_VALUE_RULES, value_allowed
from dpnas.arch.models import build_model
from dpnas.arch.registry import get_arch
from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.search.sampling import config_key, grid_points, space_size
from dpnas.search.study_file import load_study_file

STUDIES = Path(__file__).parent.parent / "studies"


def _key(arch: ArchConfig) -> str:
    return config_key((arch, TrainConfig(), PrivacyConfig()))


def _same_model(a: ArchConfig, b: ArchConfig) -> bool:
    torch.manual_seed(0)
    first = build_model(a, num_classes=10, in_channels=3)
    torch.manual_seed(0)
    second = build_model(b, num_classes=10, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    return repr(first) == repr(second) and torch.equal(first(x), second(x))


@pytest.mark.parametrize("width, other", [
    (1.0, {"norm": "group", "groups": 32}),   # widths 8, 16: 32 groups are one per channel everywhere
    (1.0, {"norm": "group", "groups": 16}),
    (2.0, {"norm": "group", "groups": 32}),   # widths 16, 32
    (8.0, {"norm": "group", "groups": 1}),    # one group: LayerNorm
])
def test_norms_that_build_the_same_layers_are_one_point(width, other):
    """smoothnet_cifar10.toml searches norm x groups: GroupNorm with a group per channel is InstanceNorm."""
    kind = "layer" if other["groups"] == 1 else "instance"
    plain = get_arch("smoothnet").replace(width=width, depth=1.0, norm=kind)
    grouped = plain.replace(**other)
    assert _same_model(plain, grouped)
    assert _key(plain) == _key(grouped)


def test_norms_that_build_different_layers_stay_distinct():
    base = get_arch("smoothnet").replace(depth=1.0)  # widths 64, 128
    keys = {_key(base.replace(norm="group", groups=g)) for g in (4, 8, 16, 32, 64)}
    keys |= {_key(base.replace(norm=n)) for n in ("instance", "layer", "none")}
    assert len(keys) == 8
    # tiny's 8-channel block norms: 8 groups are per channel, 4 are not
    dense = get_arch("tiny").replace(scalenorm="after_add")
    assert _key(dense.replace(groups=8)) != _key(dense.replace(groups=4))


def test_a_grid_over_norm_and_groups_counts_each_model_once(tmp_path):
    text = (STUDIES / "smoothnet_cifar10.toml").read_text()
    search = text.index("[search]")
    text = text[:search] + ('[search]\nnorm = ["group", "instance"]\ngroups = [16, 32]\n'
                            'width = [1.0]\ndepth = [1.0]\n')
    text = text.replace('sampler = "tpe"', 'sampler = "grid"').replace('pruner = "hyperband"', 'pruner = "none"')
    path = tmp_path / "grid.toml"
    path.write_text(text)
    spec = load_study_file(path)
    # widths 8 and 16: group/16, group/32 and instance build one model
    assert space_size(spec) == 1
    assert len(grid_points(spec)) == 1


def test_xavier_is_not_offered_next_to_selu_where_it_is_selu_xavier():
    values = {"activation": "selu"}
    assert not value_allowed(ARCH_VALUE_RULES, "init", "xavier", values)
    assert value_allowed(ARCH_VALUE_RULES, "init", "xavier", {"activation": "relu"})
    assert _same_model(ArchConfig(width=1.0, depth=1.0, init="xavier"),
                       ArchConfig(width=1.0, depth=1.0, init="selu_xavier"))


def test_transition_and_downsample_do_not_distinguish_a_network_without_transitions():
    one_stage = ArchConfig(width=1.0, depth=1.0, stages=1, skip="residual", shortcut="conv")
    block = one_stage.replace(transition="block", downsample="conv")
    assert _same_model(one_stage, block)
    assert _key(one_stage) == _key(block)
    stem_block = ArchConfig(width=2.0, depth=1.0, stages=1, stem_channels=8, skip="residual", transition="block")
    assert _key(stem_block.replace(downsample="conv")) == _key(stem_block.replace(downsample="max"))


@pytest.mark.parametrize("arch", [
    lambda: get_arch("wrn16_4").replace(width=1.0, shortcut="pad"),          # stem 16 into a stage of 8
    lambda: get_arch("resnet9").replace(transition="compress", width=2.0),   # stem 64 compressed to 32, stage 16
    lambda: get_arch("tiny").replace(stem_channels=16, skip="residual", transition="block", downsample="conv"),
])
def test_a_pad_shortcut_that_would_narrow_the_stem_is_refused_before_building(arch):
    with pytest.raises(ConfigError, match="narrower stem"):
        arch()


def test_the_space_does_not_offer_a_pad_shortcut_that_cannot_build():
    values = get_arch("wrn16_4").replace(width=1.0).to_dict()
    assert not value_allowed(ARCH_VALUE_RULES, "shortcut", "pad", values)
    wider = get_arch("wrn16_4").replace(width=2.0)
    assert value_allowed(ARCH_VALUE_RULES, "shortcut", "pad", wider.to_dict())
    build_model(wider.replace(shortcut="pad"), num_classes=10)  # 16 into 16: builds

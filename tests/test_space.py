import json

import pytest

from dpnas import ArchConfig, ConfigError, load_arch_file
from dpnas.arch.space import ACTIVATIONS, parse_assignment


def test_defaults_are_smoothnet_w80d50():
    arch = ArchConfig()
    assert (arch.norm, arch.groups, arch.activation, arch.pool, arch.skip) == ("group", 8, "selu", "max_smooth", "dense")
    assert arch.stage_widths == (64, 128)
    assert arch.stage_depths == (5, 5)


def test_one_field_changed_is_a_valid_point():
    arch = ArchConfig(activation="relu")
    assert arch.activation == "relu" and arch.skip == "dense"


@pytest.mark.parametrize(
    "field,value",
    [("norm", "batch"), ("activation", "selu2"), ("pool", "max"), ("skip", "highway"),
     ("scalenorm", "after"), ("downsample", "stride"), ("head", "conv"), ("init", "orthogonal")],
)
def test_unknown_choice_names_field_value_and_allowed(field, value):
    with pytest.raises(ConfigError) as err:
        ArchConfig(**{field: value})
    message = str(err.value)
    assert field in message and repr(value) in message and "expected one of" in message


def test_batchnorm_is_not_offered():
    with pytest.raises(ConfigError, match="group, layer, instance, none"):
        ArchConfig(norm="batch")


def test_every_activation_is_allowed():
    for name in ACTIVATIONS:
        assert ArchConfig(activation=name).activation == name


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"width": 0}, "width: must be a positive"),
        ({"depth": -1.0}, "depth: must be a positive"),
        ({"groups": 0}, "groups: must be a positive"),
        ({"width": float("nan")}, "width: must be a positive finite"),
        ({"groups": 2.5}, "groups: expected an integer"),
        ({"groups": True}, "groups: expected an integer"),
        ({"weight_std": "yes"}, "weight_std: expected true or false"),
        ({"activation": 3}, "activation: expected a string"),
        ({"width": 0.05}, "stage 0 would have 0 channels"),
        ({"depth": 0.5}, "every stage would have 0 blocks"),
        ({"width_bases": (8,)}, "width_bases: has 1 entries but stages=2"),
        ({"stem_channels": -1}, "stem_channels"),
    ],
)
def test_impossible_values_are_refused_at_creation(changes, match):
    with pytest.raises(ConfigError, match=match):
        ArchConfig(**changes)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"skip": "none", "scalenorm": "after_add"}, "scalenorm: 'after_add' normalises after a skip merge"),
        ({"norm": "none", "scalenorm": "after_add"}, "needs a normalisation layer"),
        ({"skip": "residual", "preact": True, "scalenorm": "before_act"}, "pre-activation"),
        ({"skip": "dense", "scalenorm": "before_act"}, "dense merge"),
        ({"skip": "dense", "transition": "block"}, "transition: 'block'"),
        ({"skip": "residual", "transition": "block", "downsample": "avg"}, "downsample='conv'"),
        ({"skip": "residual", "width_bases": (16, 8)}, "zero-padding cannot narrow"),
        ({"head": "mlp", "head_hidden": ()}, "head_hidden"),
    ],
)
def test_invalid_combinations_are_refused_at_creation(changes, match):
    with pytest.raises(ConfigError, match=match):
        ArchConfig(**changes)


def test_config_is_frozen_and_hashable():
    arch = ArchConfig()
    with pytest.raises(AttributeError):
        arch.width = 2.0  # type: ignore[misc]
    assert hash(arch) == hash(ArchConfig.from_dict(arch.to_dict()))


def test_groups_are_capped_at_the_channel_count():
    arch = ArchConfig(groups=32)
    assert arch.norm_groups(16) == 16
    assert arch.norm_groups(64) == 32
    assert ArchConfig(norm="layer").norm_groups(64) == 1
    assert ArchConfig(norm="instance").norm_groups(64) == 64
    assert ArchConfig(norm="none").norm_groups(64) == 0
    # GroupNorm needs a divisor: odd dense channel counts take the largest one below the request
    assert ArchConfig(groups=8).norm_groups(323) == 1 and ArchConfig(groups=8).norm_groups(12) == 6


def test_dict_round_trip_and_unknown_fields():
    arch = ArchConfig(activation="mish", width_bases=(8, 16), head_hidden=(64,))
    data = json.loads(json.dumps(arch.to_dict()))
    assert ArchConfig.from_dict(data) == arch
    with pytest.raises(ConfigError, match="unknown field.*colour"):
        ArchConfig.from_dict({**data, "colour": "red"})


def test_load_arch_file_json_and_toml(tmp_path):
    toml_file = tmp_path / "arch.toml"
    toml_file.write_text('activation = "gelu"\nwidth = 2\nwidth_bases = [8, 16]\n')
    arch = load_arch_file(toml_file)
    assert arch == ArchConfig(activation="gelu", width=2.0, width_bases=(8, 16))
    # a describe/train JSON document holds the config under "config"
    json_file = tmp_path / "arch.json"
    json_file.write_text(json.dumps({"params": 1, "config": arch.to_dict()}))
    assert load_arch_file(json_file) == arch


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("missing.toml", None, "cannot read file"),
        ("bad.toml", "activation = ", "not valid TOML"),
        ("bad.json", "{", "not valid JSON"),
        ("arch.yaml", "a: 1", "unknown file type"),
        ("wrong.toml", 'activation = "selu2"', "wrong.toml: activation: unknown value"),
    ],
)
def test_load_arch_file_errors_name_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_arch_file(path)


def test_parse_assignment_types_values():
    assert parse_assignment("activation=relu") == ("activation", "relu")
    assert parse_assignment("width=2.5") == ("width", 2.5)
    assert parse_assignment("weight_std=true") == ("weight_std", True)
    assert parse_assignment("width_bases=[8, 16]") == ("width_bases", [8, 16])
    with pytest.raises(ConfigError, match="expected field=value"):
        parse_assignment("activation")
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        parse_assignment("colour=red")

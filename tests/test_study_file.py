"""Study files: the shipped ones load, and every error names the file, the key and what is allowed."""

from pathlib import Path

import pytest

from dpnas.search.sampling import ablation_points
from dpnas.search.study_file import StudyFileError, load_study_file

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.toml"))

VALID = """
[study]
n_trials = 3
[data]
dataset = "digits"
[privacy]
epsilon = 8.0
[train]
recipe = "quick"
epochs = 1
[arch]
base = "tiny"
[search]
activation = ["selu", "relu"]
width = { low = 0.5, high = 1.5, step = 0.5 }
"""


def write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_shipped_studies_load(path):
    spec = load_study_file(path)
    assert spec.axes and spec.name
    assert spec.privacy.private and spec.privacy.delta <= 1e-5


def test_shipped_studies_are_the_ones_the_issue_names():
    names = {p.name for p in STUDIES}
    assert {"quickstart.toml", "smoothnet_cifar10.toml", "scalenorm_cifar10.toml", "ablation_smoothnet.toml",
            "smoothnet_cifar10_fast.toml"} <= names


def test_reference_studies_search_what_the_papers_searched():
    smooth = load_study_file(Path(__file__).parent.parent / "studies/smoothnet_cifar10.toml")
    assert {"norm", "pool", "activation", "skip", "width", "depth"} <= {a.name for a in smooth.axes}
    assert smooth.privacy.epsilon == 7.0 and smooth.dataset == "cifar10"
    scale = load_study_file(Path(__file__).parent.parent / "studies/scalenorm_cifar10.toml")
    assert {a.name for a in scale.axes} == {"groups", "scalenorm", "activation"}
    assert scale.sampler == "grid" and scale.privacy.epsilon == 8.0 and scale.base_arch_name == "resnet9"
    ablation = load_study_file(Path(__file__).parent.parent / "studies/ablation_smoothnet.toml")
    points = ablation_points(ablation)
    assert ablation.sampler == "ablation" and ablation.base_arch_name == "smoothnet"
    base = points[0]
    # every other point differs from the base in exactly one field
    assert all(sum(p[k] != base[k] for k in base) == 1 for p in points[1:])
    # every move changes something that matters in SmoothNet, so none is dropped as a repeat
    assert len(points) == 1 + sum(len(a.grid_values()) - 1 for a in ablation.axes)


def test_valid_file_builds_configs(tmp_path):
    spec = load_study_file(write(tmp_path, VALID))
    assert spec.name == "study" and spec.n_trials == 3 and spec.objectives == ("val_accuracy",)
    assert spec.arch.width == 1.0 and spec.train.epochs == 1 and spec.privacy.epsilon == 8.0
    width = next(a for a in spec.axes if a.name == "width")
    assert width.grid_values() == [0.5, 1.0, 1.5]
    assert spec.default_storage() == str(tmp_path / "study.journal")


def test_synthetic_size_sets_the_synthetic_data_size(tmp_path):
    spec = load_study_file(write(tmp_path, VALID.replace('dataset = "digits"', 'dataset = "synthetic"\nsynthetic_size = 512')))
    assert spec.dataset == "synthetic" and spec.synthetic_size == 512
    assert load_study_file(write(tmp_path, VALID, name="default.toml")).synthetic_size == 2048


@pytest.mark.parametrize(
    "old,new,needle",
    [
        ("[study]", "[studyy]", "studyy: unknown section; allowed sections"),
        ("n_trials = 3", "n_trials = 3\ncolour = 1", "study.colour: unknown key; allowed keys in [study]"),
        ("n_trials = 3", 'n_trials = "3"', "study.n_trials: expected int"),
        ("n_trials = 3", "n_trials = 0", "study.n_trials: must be >= 1"),
        ("n_trials = 3", "", "study.n_trials: required"),
        ("n_trials = 3", 'n_trials = 3\nsampler = "bayes"', "study.sampler: unknown value 'bayes'; expected one of"),
        ("n_trials = 3", 'n_trials = 3\npruner = "early"', "study.pruner: unknown value 'early'"),
        ("n_trials = 3", 'n_trials = 3\nobjectives = ["accuracy"]', "study.objectives: unknown objective 'accuracy'"),
        ("n_trials = 3", 'n_trials = 3\nobjectives = ["params"]', "the first objective must be val_accuracy"),
        ("n_trials = 3", 'n_trials = 3\nobjectives = ["val_accuracy", "params"]\npruner = "median"', "cannot prune multi-objective"),
        ("n_trials = 3", 'trial_count = "poisson"', "study.mean_trials: trial_count = \"poisson\" needs mean_trials > 0"),
        ("n_trials = 3", 'n_trials = 3\ntrial_count = "poisson"\nmean_trials = 4', "draws the number of trials at random; remove n_trials"),
        ("n_trials = 3", 'trial_count = "truncated_negative_binomial"\ngamma = 0.2', "study.eta"),
        ("n_trials = 3", 'trial_count = "truncated_negative_binomial"\neta = 1\ngamma = 1.5', "study.gamma"),
        ("n_trials = 3", 'trial_count = "geometric"', "study.trial_count: unknown value 'geometric'"),
        ('dataset = "digits"', 'dataset = "mnist"', "data.dataset: unknown value 'mnist'"),
        ('dataset = "digits"', 'dataset = "digits"\nsynthetic_size = 512', "data.synthetic_size: only for dataset = \"synthetic\""),
        ('dataset = "digits"', 'dataset = "synthetic"\nsynthetic_size = 1', "data.synthetic_size: must be >= 2"),
        ('dataset = "digits"', 'dataset = "cifar10"\ndata_dir = ""', "data.data_dir: must not be empty"),
        ("epsilon = 8.0", "epsilon = -1.0", "[privacy] epsilon: must be > 0"),
        ("epsilon = 8.0", "epsilon = 8.0\nnoise = 1.0", "privacy.noise: unknown field; PrivacyConfig fields are"),
        ('recipe = "quick"', 'recipe = "fast"', "train.recipe: unknown recipe 'fast'"),
        ("epochs = 1", "epochs = 0", "[train] epochs: must be >= 1"),
        ('base = "tiny"', 'base = "vgg"', "arch.base: unknown architecture 'vgg'"),
        ('base = "tiny"', 'base = "tiny"\nnorm = "batch"', "[arch] norm: unknown value 'batch'"),
        ('activation = ["selu", "relu"]', 'activation = ["selu", "relu2"]', "search.activation: value 'relu2' is outside the space"),
        ('activation = ["selu", "relu"]', 'colour = ["red"]', "search.colour: not a searchable field"),
        ('activation = ["selu", "relu"]', "activation = []", "search.activation: give at least one choice"),
        ('activation = ["selu", "relu"]', 'activation = ["selu", "selu"]', "choices must be distinct"),
        ('activation = ["selu", "relu"]', "width_bases = [[8, 16]]", "choices must be strings, numbers or booleans"),
        ('activation = ["selu", "relu"]', 'activation = "selu"', "expected a list of choices or a {low, high} table"),
        ("width = { low = 0.5, high = 1.5, step = 0.5 }", "width = { low = 2.0, high = 1.0 }", "low (2.0) must be below high (1.0)"),
        ("width = { low = 0.5, high = 1.5, step = 0.5 }", "width = { low = 0.0, high = 1.0 }", "value 0.0 is outside the space"),
        ("width = { low = 0.5, high = 1.5, step = 0.5 }", "width = { low = 0.5, high = 1.5, by = 0.5 }", "search.width.by: unknown key"),
        ("width = { low = 0.5, high = 1.5, step = 0.5 }", "groups = { low = 1.5, high = 8 }", "groups is an integer field"),
        ("width = { low = 0.5, high = 1.5, step = 0.5 }", "width = { low = 0.5, high = 1.5, log = true, step = 0.5 }", "a log range needs low > 0 and no step"),
        ("width = { low = 0.5, high = 1.5, step = 0.5 }", "norm = { low = 1, high = 2 }", "give a list of choices, not a range"),
        ("n_trials = 3", 'n_trials = 3\nsampler = "grid"', "search.width: sampler 'grid'") ,
        # a value no trial's context makes valid (a wrong type, an unknown name, a negative count) is refused even for
        # a field whose rule reads another searched field: each trial would otherwise take a slot and fail
        ('activation = ["selu", "relu"]', 'norm = ["group", "layer"]\ngroups = ["bogus", 8]',
         "search.groups: value 'bogus' is outside the space"),
        ('activation = ["selu", "relu"]', 'norm = ["group", "layer"]\ngroups = [-4, 8]',
         "search.groups: value -4 is outside the space"),
        ('activation = ["selu", "relu"]', 'skip = ["dense", "residual"]\nshortcut = ["padd"]',
         "search.shortcut: value 'padd' is outside the space"),
        # an axis that matters in no trial would be searched in name only
        ('activation = ["selu", "relu"]', 'activation = ["selu", "relu"]\nts_scale = [1.0, 2.0]',
         "search.ts_scale: never used: it matters only with activation = 'tempered_sigmoid'"),
        ('activation = ["selu", "relu"]', 'activation = ["selu", "relu"]\ngamma = [0.5, 0.9]',
         "search.gamma: never used: it matters only with schedule = 'step'"),
        ("width = { low = 0.5, high = 1.5, step = 0.5 }", "width = { low = 0.5, high = 1.5, step = 1e-9 }",
         "search.width.step: 1e-09 makes 1e+09 values"),
        ("width = { low = 0.5, high = 1.5, step = 0.5 }", "width = { low = 1.0, high = 1e300, step = 1e-300 }",
         "search.width.step"),
        ("width = { low = 0.5, high = 1.5, step = 0.5 }", "epsilon = { low = 1.0, high = inf }",
         "search.epsilon: low and high must be finite"),
    ],
)
def test_errors_name_file_key_and_allowed(tmp_path, old, new, needle):
    text = VALID.replace(old, new, 1)
    assert text != VALID or old == new
    if "search.width: sampler 'grid'" in needle:
        text = text.replace("width = { low = 0.5, high = 1.5, step = 0.5 }", "width = { low = 0.5, high = 1.5 }")
    path = write(tmp_path, text)
    with pytest.raises(StudyFileError) as err:
        load_study_file(path)
    assert str(err.value).startswith(str(path)), err.value
    assert needle in str(err.value), err.value


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(StudyFileError, match="cannot read study file"):
        load_study_file(tmp_path / "missing.toml")
    with pytest.raises(StudyFileError, match="not valid TOML"):
        load_study_file(write(tmp_path, "[study\n"))
    with pytest.raises(StudyFileError, match="search: name at least one searched field"):
        load_study_file(write(tmp_path, "[study]\nn_trials = 1\n"))

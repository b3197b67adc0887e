"""Ablations with repeats: R seeds per point, each a run of its own that the study charges, and effects told apart
from seed noise by intervals over seeds and a paired test against the base point."""

import math

import optuna
import pandas as pd
import pytest

from dpnas.analysis.ablation import ONE_SEED, PAIRED_TEST, ablation_effects, ablation_info, paired_difference
from dpnas.analysis.components import component_effects
from dpnas.analysis.figures import study_figures
from dpnas.analysis.frame import trials_frame
from dpnas.arch.space import ConfigError
from dpnas.search.checks import _trial_count, runs_charged
from dpnas.search.runner import search
from dpnas.search.sampling import ablation_points
from dpnas.search.storage import open_storage
from dpnas.search.study_file import REPEAT_SEED_STRIDE, StudyFileError, load_study_file
from dpnas.search.study_privacy import study_privacy
from dpnas.search.study_state import open_study, trial_budget

ABLATION = """
[study]
name = "ablation"
sampler = "ablation"
pruner = "none"
repeats = 2

[data]
dataset = "digits"

[privacy]
epsilon = 4.0

[train]
recipe = "quick"
epochs = 1
seed = 7
batch_size = 256
physical_batch_size = 256
per_sample = "opacus"  # no per-layer timing of dpnas's methods: most of a one-epoch trial's time on 2 cores

[arch]
base = "tiny"

[search]
activation = ["selu", "relu"]
"""


def write(tmp_path, text, name="ablation.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the study file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("old,new,needle", [
    ("repeats = 2", "repeats = 0", "study.repeats: must be an integer from 1"),
    ("repeats = 2", "repeats = 2.0", "study.repeats: expected int"),
    ("repeats = 2", "repeats = true", "study.repeats: expected int"),
    ('sampler = "ablation"', 'sampler = "tpe"\nn_trials = 4', "study.repeats: only for sampler = \"ablation\""),
    ('sampler = "ablation"', 'sampler = "grid"', "study.repeats: only for sampler = \"ablation\""),
    ('activation = ["selu", "relu"]', 'activation = ["selu", "relu"]\nseed = [7, 8]', "search.seed: repeats = 2"),
    ("seed = 7", "seed = 9223372036854775806", "study.repeats: the last repeat's seed"),
])
def test_bad_repeats_are_refused_when_the_file_loads(tmp_path, old, new, needle):
    path = write(tmp_path, ABLATION.replace(old, new, 1))
    with pytest.raises(StudyFileError) as err:
        load_study_file(path)
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value) and "\n" not in str(err.value)


def test_repeats_default_to_one_and_multiply_the_trial_budget(tmp_path):
    one = load_study_file(write(tmp_path, ABLATION.replace("repeats = 2\n", ""), name="one.toml"))
    spec = load_study_file(write(tmp_path, ABLATION.replace("repeats = 2", "repeats = 3")))
    assert one.repeats == 1 and "repeats" not in one.budget()  # an older study's stored budget still matches
    assert spec.repeats == 3 and spec.budget()["repeats"] == 3
    points = ablation_points(spec)
    assert len(points) == 2
    # the calibration of a total-epsilon study splits its budget over this many runs
    assert _trial_count(spec, None) == 6 and _trial_count(one, None) == 2
    study = open_study(spec, str(tmp_path / "three.journal"))
    assert trial_budget(study)[0] == 6
    waiting = study.get_trials(deepcopy=False)
    assert [t.user_attrs["repeat"] for t in waiting] == [0, 0, 1, 1, 2, 2]  # repeat-major
    assert [t.user_attrs["ablation_axis"] for t in waiting] == ["base", "activation"] * 3
    assert [t.user_attrs["repeat_seed"] for t in waiting] == [7, 7, 7 + REPEAT_SEED_STRIDE, 7 + REPEAT_SEED_STRIDE,
                                                             7 + 2 * REPEAT_SEED_STRIDE, 7 + 2 * REPEAT_SEED_STRIDE]
    assert study.user_attrs["repeats"] == 3
    # the trials were enqueued for 3 seeds: a file asking for 2 is refused, before anything is spent too
    two = load_study_file(write(tmp_path, ABLATION, name="three.toml"))
    with pytest.raises(ConfigError, match="created with repeats = 3"):
        open_study(two, str(tmp_path / "three.journal"))


# --- the statistics, on a frame whose answers are worked out by hand ---------------------------------------

# t quantile 0.975 at 2 degrees of freedom, and the two-sided p of a t statistic there: p = 1 - |t| / sqrt(t² + 2)
T_975_DF2 = 4.302652729911275


def synthetic_frame(base, effect, noise):
    rows = []
    for value, axis, accuracies in (("selu", "base", base), ("relu", "activation", effect),
                                    ("mish", "activation", noise)):
        for repeat, accuracy in enumerate(accuracies):
            rows.append({"number": len(rows), "state": "COMPLETE", "val_accuracy": accuracy, "activation": value,
                         "norm": "group", "ablation_axis": axis, "repeat": repeat})
    return pd.DataFrame(rows)


def test_paired_t_table_matches_hand_computed_values_and_flags_only_the_real_effect():
    # relu moves every seed up by 0.10-0.11 (a real effect); mish moves them by +0.03, -0.02, +0.01 (noise)
    frame = synthetic_frame(base=[0.80, 0.82, 0.84], effect=[0.90, 0.93, 0.95], noise=[0.83, 0.80, 0.85])
    table = component_effects(frame)  # an ablation frame gets the ablation table
    assert table.attrs["method"] == PAIRED_TEST and "paired t-test over seeds" in PAIRED_TEST
    assert list(table["value"]) == ["selu", "relu", "mish"] and list(table["base"]) == [True, False, False]
    base, relu, mish = (table.iloc[i] for i in range(3))
    # base: mean 0.82, sd 0.02, half-width 4.3027 * 0.02 / sqrt(3)
    assert base["mean_val_accuracy"] == pytest.approx(0.82)
    assert base["ci_high"] - 0.82 == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3))
    assert math.isnan(base["p_value"]) and not base["significant"]
    # relu: differences 0.10, 0.11, 0.11: mean 0.32/3, sd sqrt(1/3) / 100, t = 32
    assert relu["difference"] == pytest.approx(0.32 / 3) and relu["paired_seeds"] == 3
    se = math.sqrt(1 / 3) / 100 / math.sqrt(3)
    assert relu["difference_ci_low"] == pytest.approx(0.32 / 3 - T_975_DF2 * se)
    assert relu["p_value"] == pytest.approx(1 - 32 / math.sqrt(32**2 + 2)) and relu["significant"]
    # mish: differences 0.03, -0.02, 0.01: mean 0.02/3, sd sqrt(19/3) / 100
    t = (0.02 / 3) / (math.sqrt(19 / 3) / 100 / math.sqrt(3))
    assert mish["difference"] == pytest.approx(0.02 / 3)
    assert mish["p_value"] == pytest.approx(1 - t / math.sqrt(t**2 + 2)) and not mish["significant"]
    assert mish["difference_ci_low"] < 0 < mish["difference_ci_high"]


def test_the_figure_says_when_a_value_has_fewer_seeds_than_the_others():
    from dpnas.analysis.ablation import ablation_figure

    whole = synthetic_frame(base=[0.80, 0.82, 0.84], effect=[0.90, 0.93, 0.95], noise=[0.83, 0.80, 0.85])
    assert "t-interval over 3 seeds;" in ablation_figure(ablation_info(whole, "activation")).layout.title.text
    short = whole.drop(index=whole.index[-1])  # mish's third repeat pruned or still running
    assert "over 2-3 seeds" in ablation_figure(ablation_info(short, "activation")).layout.title.text


def test_pairs_are_matched_by_repeat_not_by_order():
    # the variant's repeats arrive in another order: repeat 1 of relu is still compared with repeat 1 of the base
    paired = paired_difference({1: 0.93, 0: 0.90, 2: 0.95}, {0: 0.80, 1: 0.82, 2: 0.84})
    assert paired.pairs == 3 and paired.interval.mean == pytest.approx(0.32 / 3)
    missing = paired_difference({0: 0.9}, {0: 0.8, 1: 0.82})  # one shared seed: no spread, no test
    assert missing.pairs == 1 and math.isnan(missing.p_value) and not missing.significant


def test_one_seed_per_point_behaves_as_one_value_each_and_says_so():
    frame = synthetic_frame(base=[0.969], effect=[0.892], noise=[0.969])
    table = ablation_effects(frame)
    assert table.attrs["method"] == ONE_SEED
    assert table["seeds"].tolist() == [1, 1, 1] and not table["significant"].any()
    assert table[["ci_low", "ci_high", "p_value"]].isna().all().all()
    info = ablation_info(frame, "activation")
    assert info.seeds == 1 and info.base_value == "selu"


# --- end to end on digits ---------------------------------------------------------------------------------


def test_tiny_ablation_with_two_repeats_end_to_end(tmp_path):
    path = write(tmp_path, ABLATION)
    spec = load_study_file(path)
    search(spec, progress=False)
    study = optuna.load_study(study_name="ablation", storage=open_storage(spec.default_storage()))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # each repeat trained from its own recorded seed, the same seeds for the base and the variant
    seeds = {(t.params["activation"], t.user_attrs["repeat"]): t.user_attrs["train_config"]["seed"] for t in trials}
    assert seeds == {("selu", 0): 7, ("relu", 0): 7, ("selu", 1): 7 + REPEAT_SEED_STRIDE,
                     ("relu", 1): 7 + REPEAT_SEED_STRIDE}
    assert all(t.user_attrs["repeat_seed"] == t.user_attrs["train_config"]["seed"] for t in trials)
    # the noise stays secret: the seed fixes initialisation only, as for any run not asking to be reproducible
    assert not any(t.user_attrs["privacy_config"]["reproducible"] for t in trials)
    # one split for the study: every repeat is scored on the same records
    assert len({t.user_attrs["data"]["split_seed"] for t in trials}) == 1
    assert runs_charged(study) == 4 and study_privacy(study).runs == 4
    table = component_effects(trials_frame(study))
    assert table["value"].tolist() == ["selu", "relu"] and table["seeds"].tolist() == [2, 2]
    assert table.iloc[1]["paired_seeds"] == 2 and table.attrs["method"] == PAIRED_TEST
    figures = study_figures(study)
    assert "t-interval over 2 seeds" in figures["component_activation"].layout.title.text


def test_a_total_epsilon_ablation_calibrates_its_base_point_off_the_range_s_grid(tmp_path):
    """The base point trains at [train] batch_size = 100; a range stepped 64..192 used to calibrate only 64, 128
    and 192, and the search stopped at its first trial ("not a run shape this study was calibrated for")."""
    from dpnas.search.calibration import run_shapes

    text = (ABLATION.replace("epsilon = 4.0", "total_epsilon = 8.0").replace("batch_size = 256", "batch_size = 100")
            .replace("repeats = 2", "repeats = 1")
            + "batch_size = { low = 64, high = 192, step = 64 }\n")
    spec = load_study_file(write(tmp_path, text))
    assert run_shapes(spec) == [(64, 1), (100, 1), (128, 1), (192, 1)]

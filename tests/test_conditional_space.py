"""The conditional search space: every sampled point is valid, grids and ablations hold distinct points, and a study
never trains one configuration twice (resumed or not)."""

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from search_helpers import unfix, write_study

import dpnas.search.runner as runner
from dpnas.arch.models import build_model
from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.search.runner import exhausted_message, search, trial_budget
from dpnas.search.sampling import ablation_points, axis_distribution, config_key, grid_points, space_size, suggest
from dpnas.search.storage import open_storage
from dpnas.search.study_file import load_study_file
from dpnas.search.study_privacy import study_privacy
from dpnas.search.study_state import sampler_seed

STUDIES = Path(__file__).parent.parent / "studies"


def full_smoothnet_space(tmp_path: Path) -> Path:
    """The SmoothNet study's space plus the axes with the most conditions: tempered sigmoid and ScaleNorm."""
    text = (STUDIES / "smoothnet_cifar10.toml").read_text()
    text = text.replace('activation = ["selu", "relu", "leaky_relu", "mish", "elu", "tanh"]',
                        'activation = ["selu", "relu", "leaky_relu", "mish", "elu", "tanh", "tempered_sigmoid"]\n'
                        'ts_temperature = { low = 0.5, high = 4.0 }\n'
                        'scalenorm = ["none", "after_add", "before_act"]\n'
                        'shortcut = ["pad", "conv"]\n'
                        'preact = [false, true]')
    assert "tempered_sigmoid" in text
    path = tmp_path / "full.toml"
    path.write_text(text)
    return path


def test_every_randomly_sampled_point_of_the_full_space_is_valid(tmp_path):
    spec = load_study_file(full_smoothnet_space(tmp_path))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_restricted = False
    for i in range(300):
        trial = study.ask()
        arch, train_cfg, privacy = suggest(trial, spec)  # raises ConfigError on an invalid point
        params = trial.params
        # a field is suggested only where it matters
        assert ("groups" in params) == (arch.norm == "group")
        assert ("ts_temperature" in params) == (arch.activation == "tempered_sigmoid")
        assert ("shortcut" in params) == (arch.skip == "residual")
        scalenorm_params = [p for p in params if p.startswith("scalenorm")]
        assert bool(scalenorm_params) == (arch.norm != "none" and arch.skip != "none")
        if arch.scalenorm == "before_act":
            assert arch.skip == "residual" and not arch.preact
        seen_restricted |= any(p.startswith("scalenorm[") for p in params)
        if i < 40:  # the model builds too (on the meta device: no memory, no time)
            with torch.device("meta"):
                build_model(arch, num_classes=10, in_channels=3, image_size=32)
        study.tell(trial, 0.5)
    assert seen_restricted  # dense or pre-activation contexts offered scalenorm without before_act


def test_a_naive_independent_sampler_would_have_drawn_invalid_points(tmp_path):
    # the same space sampled field by field without the conditions: many points are refused by ArchConfig
    spec = load_study_file(full_smoothnet_space(tmp_path))
    rng = __import__("random").Random(0)
    invalid = 0
    for _ in range(100):
        changes = {a.name: rng.choice(a.grid_values()) if a.categorical or a.step else a.low
                   for a in spec.axes if a.target == "arch"}
        try:
            spec.arch.replace(**changes)
        except Exception:  # noqa: BLE001
            invalid += 1
    assert invalid > 10


def test_grid_holds_each_valid_distinct_point_once(tmp_path):
    path = write_study(tmp_path, sampler="grid")
    text = path.read_text().replace('activation = ["selu", "relu", "mish"]\nwidth = { low = 0.5, high = 1.0, step = 0.5 }',
                                    'norm = ["group", "layer", "none"]\ngroups = [2, 4]\n'
                                    'skip = ["dense", "residual"]\nscalenorm = ["none", "after_add", "before_act"]')
    path.write_text(text)
    spec = load_study_file(path)
    points = grid_points(spec)
    keys = []
    for params in points:
        study = optuna.create_study()
        study.enqueue_trial(params)
        keys.append(config_key(suggest(study.ask(), spec)))
    assert len(keys) == len(set(keys))
    # group: 2 groups x (dense: none/after_add + residual: 3) = 10; layer: 5; none: 2 merges, no scalenorm = 2
    assert len(points) == 17 == space_size(spec)
    assert all("groups" not in p for p in points if p["norm"] != "group")


def test_scalenorm_grid_is_the_papers_thirty_points():
    spec = load_study_file(STUDIES / "scalenorm_cifar10.toml")
    assert len(grid_points(spec)) == 30


def test_ablation_points_are_valid_and_distinct(tmp_path):
    path = write_study(tmp_path, sampler="ablation")
    text = path.read_text().replace('base = "tiny"', 'base = "tiny"\nskip = "residual"\nscalenorm = "after_add"')
    text = text.replace('activation = ["selu", "relu", "mish"]\nwidth = { low = 0.5, high = 1.0, step = 0.5 }',
                        'norm = ["group", "layer", "none"]\ngroups = [2, 8]\nscalenorm = ["none", "after_add"]')
    path.write_text(text)
    spec = load_study_file(path)
    points = ablation_points(spec)
    keys = set()
    for params in points:
        study = optuna.create_study()
        study.enqueue_trial(params)
        arch, _, _ = suggest(study.ask(), spec)
        keys.add(config_key((arch, spec.train, spec.privacy)))
        if arch.norm == "none":
            assert arch.scalenorm == "none"  # neutralised: ScaleNorm has no norm to place
    # base, norm=layer, norm=none, groups=2 (groups=8 with norm=group is the base), scalenorm=none
    assert len(points) == len(keys) == 5


def test_fields_that_do_not_matter_do_not_make_points_distinct():
    arch = ArchConfig(norm="layer", groups=4)
    train_cfg, privacy = TrainConfig(optimizer="nadam", momentum=0.5), PrivacyConfig()
    same = (ArchConfig(norm="layer", groups=16), TrainConfig(optimizer="nadam", momentum=0.0), PrivacyConfig())
    assert config_key((arch, train_cfg, privacy)) == config_key(same)
    assert config_key((arch, train_cfg, privacy)) != config_key((arch, train_cfg.replace(lr=1e-2), privacy))
    assert config_key((arch, train_cfg, privacy)) != config_key((arch, train_cfg.replace(seed=1), privacy))
    non_private = PrivacyConfig(epsilon=float("inf"), max_grad_norm=3.0)
    assert config_key((arch, train_cfg, non_private)) == config_key((arch, train_cfg, non_private.replace(max_grad_norm=1.0)))


def _quick_train(calls):
    """A stand-in for DP-SGD training that returns at once: these tests are about proposals, not training."""

    def fake(arch, data, *, train_cfg, privacy, on_plan=None, on_trained=None, **kwargs):
        from dpnas.dp.privacy import PrivacyPlan

        calls.append((arch, train_cfg, privacy))
        if on_plan is not None:
            on_plan(PrivacyPlan(noise_multiplier=1.0, sample_rate=0.1, steps=10, expected_batch_size=100,
                                dataset_size=len(data.train), val_noise=2.0, val_releases=1))
        model = build_model(arch, num_classes=data.num_classes, in_channels=data.in_channels)
        if on_trained is not None:
            on_trained(model)
        score = 0.5 + 0.1 * arch.width + 0.01 * len(calls)
        return {"private": True, "epsilon_spent": privacy.epsilon, "noise_multiplier": 1.0, "val_noise": 2.0,
                "sample_rate": 0.1,
                "steps": 10, "params": 1, "samples_per_second": 1.0, "wall_seconds": 1.0, "val_accuracy": score,
                "test_accuracy": score, "device": "cpu", "history": [{"epoch": 1}]}

    return fake


def _load(spec):
    return optuna.load_study(study_name=spec.name, storage=open_storage(spec.default_storage()))


def test_a_resumed_study_proposes_nothing_it_already_trained(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "train", _quick_train(calls))
    path = write_study(tmp_path, n_trials=3, sampler="random")
    text = path.read_text().replace("width = { low = 0.5, high = 1.0, step = 0.5 }",
                                    "width = { low = 0.5, high = 2.0, step = 0.5 }\nlr = { low = 1e-3, high = 1e-2, log = true }")
    path.write_text(text)
    spec = load_study_file(path)
    search(spec, progress=False)
    first = {config_key(c) for c in calls}
    # the same seed would replay the first session's proposals; the resumed sampler continues instead
    assert sampler_seed(spec, 0, 0) != sampler_seed(spec, 0, 3)
    search(spec, n_trials=6, progress=False)
    keys = [config_key(c) for c in calls]
    assert len(keys) == 6 and len(set(keys)) == 6
    assert not first & set(keys[3:])
    study = _load(spec)
    assert [t.state for t in study.get_trials() if "duplicate_of" not in t.user_attrs] == [TrialState.COMPLETE] * 6


def test_repeats_take_no_slot_spend_nothing_and_an_exhausted_space_ends_the_study(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "train", _quick_train(calls))
    spec = load_study_file(write_study(tmp_path, n_trials=10, sampler="random"))  # a space of 3 x 2 points
    search(spec, progress=False)
    study = _load(spec)
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    repeats = [t for t in study.get_trials() if "duplicate_of" in t.user_attrs]
    assert len(done) == len(calls) == 6 and len({t.user_attrs["config_key"] for t in done}) == 6
    assert repeats and all(t.state == TrialState.FAIL and "privacy_plan" not in t.user_attrs for t in repeats)
    assert trial_budget(study)[1] == 6  # repeats used no slot of the budget
    assert "exhausted" in exhausted_message(study) and "6 distinct" in exhausted_message(study)
    # the search's privacy cost counts the six trained runs, not the repeated proposals
    assert study_privacy(study).runs == 6


def test_a_proposal_of_a_point_another_worker_is_training_is_a_repeat(tmp_path):
    """Two workers on a small space (or TPE's constant liar) propose the point a trial still RUNNING elsewhere
    trains: counted as a repeat, it is not trained twice (twice the epsilon, one result wasted)."""
    spec = load_study_file(write_study(tmp_path, n_trials=4, sampler="random"))
    study = runner.open_study(spec, spec.default_storage())
    point = {"activation": "relu", "width": 0.5}
    study.enqueue_trial(point)
    training = study.ask()  # another worker's trial, still training
    configs, repeated = runner._propose(study, spec, training, 8, 1000)
    assert repeated is None
    study.enqueue_trial(point)
    proposal = study.ask()
    assert runner._propose(study, spec, proposal, 8, 1000) == (configs, training.number)


def test_searching_batch_size_recalibrates_the_noise_per_trial(tmp_path):
    path = write_study(tmp_path, sampler="grid", epochs=1)
    text = path.read_text().replace('activation = ["selu", "relu", "mish"]\nwidth = { low = 0.5, high = 1.0, step = 0.5 }',
                                    "batch_size = [64, 256]")
    path.write_text(unfix(text, "batch_size").replace('base = "tiny"', 'base = "tiny"\nwidth = 0.5'))
    spec = load_study_file(path)
    search(spec, progress=False)
    trials = {t.params["batch_size"]: t for t in _load(spec).get_trials() if t.state == TrialState.COMPLETE}
    assert set(trials) == {64, 256}
    small, large = trials[64].user_attrs, trials[256].user_attrs
    assert small["sample_rate"] < large["sample_rate"] and small["steps"] > large["steps"]
    assert small["noise_multiplier"] != large["noise_multiplier"]
    for attrs in (small, large):  # each calibrated to the study's budget, not one noise for all
        assert 0.99 * spec.privacy.epsilon <= attrs["epsilon_spent"] <= spec.privacy.epsilon


@pytest.mark.parametrize("study", sorted(p.name for p in STUDIES.glob("*.toml")))
def test_every_shipped_study_searches_the_learning_rate_and_clip_norm(study):
    spec = load_study_file(STUDIES / study)
    axes = {a.name: a for a in spec.axes}
    if study == "scalenorm_cifar10.toml":  # the paper's own 30-point grid, at the paper's lr and clip norm
        assert len(grid_points(spec)) == 30
        return
    if spec.sampler == "ablation":  # one value at a time: the alternatives are listed
        assert {"lr", "max_grad_norm"} <= set(axes) and len(axes["lr"].choices) > 1
        return
    assert axes["lr"].log and axes["max_grad_norm"].log
    assert axes["lr"].target == "train" and axes["max_grad_norm"].target == "privacy"


@pytest.mark.parametrize("study_file", sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_axis_distribution_is_what_suggest_gives_every_shipped_study(study_file):
    """The resume check (dpnas.search.checks.space_mismatches) compares stored distributions with these."""
    spec = load_study_file(study_file)
    axes = {axis.name: axis for axis in spec.axes}
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = scratch.ask()
        try:
            suggest(trial, spec)
        except ConfigError:
            pass
        for name, distribution in trial.distributions.items():
            if name in axes:
                assert distribution == axis_distribution(axes[name]), name
                seen.add(name)
    assert seen  # every shipped study searches something

"""[fidelity]: cheaper trials for the search (TAN batch, data fraction, resolution, epochs) that export the target.

The properties that matter for privacy are asserted on what the trials really recorded (their privacy plans, read by
the study's accounting), so a broken scaling, a wrong sample rate or a proxy recipe exported as the winner fails here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import optuna
import pytest
import torch

from dpnas.arch.space import ConfigError
from dpnas.cli import main
from dpnas.data.datasets import hash_unit, load_dataset
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.privacy import count_noise_for, count_rdp, plan_privacy, rdp_to_epsilon, run_epsilon, validation_periods
from dpnas.dp.recipe_file import load_recipe_file
from dpnas.dp.train import train
from dpnas.search.calibration import calibrate_study, run_shapes
from dpnas.search.fidelity import Fidelity, check_target, subset_training, trial_fidelity
from dpnas.search.runner import search
from dpnas.search.study_file import StudyFileError, load_study_file
from dpnas.search.study_privacy import study_privacy
from dpnas.search.study_report import export_best, privacy_statement, trial_recipe

STUDY = """
[study]
name = "fid"
n_trials = {n_trials}
sampler = "random"
pruner = "none"
seed = 3

[data]
dataset = "digits"
image_size = 16
{data}

[privacy]
{privacy}

[train]
recipe = "quick"
epochs = 4
batch_size = 128
physical_batch_size = 128

[arch]
base = "tiny"

[search]
activation = ["selu", "relu"]
lr = {{ low = 5e-3, high = 2e-2, log = true }}

[fidelity]
{fidelity}
"""


def write(tmp_path, *, fidelity="", data="public = true", privacy="epsilon = 4.0", n_trials=2, name="fid.toml"):
    path = tmp_path / name
    path.write_text(STUDY.format(fidelity=fidelity, data=data, privacy=privacy, n_trials=n_trials))
    return path


def run(path, **kwargs) -> optuna.Study:
    spec = load_study_file(path)
    return search(spec, storage_url=str(path.with_suffix(".journal")), progress=False, device="cpu", **kwargs)


def trained(study):
    return [t for t in study.get_trials() if "privacy_plan" in t.user_attrs]


# ----------------------------------------------------------------------------------------------- the study file


def test_tan_is_refused_on_private_data_without_the_acknowledgement(tmp_path):
    with pytest.raises(StudyFileError, match="private_data_ok = false") as err:
        load_study_file(write(tmp_path, fidelity="tan_batch = 32", data=""))
    assert "fidelity.tan_batch" in str(err.value) and "not private at the target epsilon" in str(err.value)
    # true would acknowledge nothing
    with pytest.raises(StudyFileError, match="only `false` is accepted"):
        load_study_file(write(tmp_path, fidelity="tan_batch = 32\nprivate_data_ok = true", data=""))
    acknowledged = load_study_file(write(tmp_path, fidelity="tan_batch = 32\nprivate_data_ok = false", data=""))
    assert acknowledged.fidelity.tan_batch == 32 and not acknowledged.public_data
    public = load_study_file(write(tmp_path, fidelity="tan_batch = 32"))
    assert public.public_data and public.fidelity.private_data_ok is None


@pytest.mark.parametrize("fidelity, message", [
    ("tan_batch = 128", "below the target batch"),
    ("tan_batch = 0", "below the target batch"),
    ("data_fraction = 1.0", "must be in \\(0, 1\\)"),
    ("data_fraction = 0", "must be in \\(0, 1\\)"),
    ("epochs = 0", "must be >= 1"),
    ("image_size = 0", "must be >= 1"),
    ("tan_batch = 16.5", "expected int"),
    ("private_data_ok = false", "only for tan_batch"),
    ("resolution = 8", "unknown key"),
])
def test_bad_fidelity_settings_name_the_key(tmp_path, fidelity, message):
    with pytest.raises(StudyFileError, match=message):
        load_study_file(write(tmp_path, fidelity=fidelity))


def test_a_searched_axis_cannot_also_be_a_fidelity_override(tmp_path):
    path = write(tmp_path, fidelity="epochs = 2")
    path.write_text(path.read_text().replace("[search]\n", "[search]\nepochs = [2, 4]\n"))
    with pytest.raises(StudyFileError, match="fidelity.epochs"):
        load_study_file(path)
    path.write_text(path.read_text().replace("epochs = [2, 4]", "batch_size = [64, 128]").replace(
        "epochs = 2", "tan_batch = 16"))
    with pytest.raises(StudyFileError, match="do not search batch_size"):
        load_study_file(path)


# ----------------------------------------------------------------------------------------------- the scalings


def test_plan_with_fixed_steps_keeps_them_and_one_release_per_epoch():
    privacy = PrivacyConfig(epsilon=4.0, delta=1e-5)
    plan = plan_privacy(privacy, dataset_size=1000, batch_size=10, epochs=4, steps=30)
    assert plan.steps == 30 and plan.val_releases == 4 and plan.epoch_steps == 8
    usual = plan_privacy(privacy, dataset_size=1000, batch_size=10, epochs=4)
    assert usual.steps == 400 and usual.val_releases == 4


def test_tan_keeps_the_targets_steps_and_batch_to_noise_ratio(tmp_path):
    spec = load_study_file(write(tmp_path, fidelity="tan_batch = 16"))
    train_cfg, privacy = spec.train, spec.privacy
    target = plan_privacy(privacy, dataset_size=1000, batch_size=128, epochs=4)
    scaled = trial_fidelity(spec, train_cfg, privacy, train_size=1000)
    assert scaled.train.batch_size == 16 and scaled.train.physical_batch_size == 16
    assert scaled.steps == target.steps == 4 * round(1000 / 128)
    # B / sigma is the target's: sigma scaled by b / B
    assert scaled.privacy.noise_multiplier == pytest.approx(target.noise_multiplier * 16 / 128, rel=1e-12)
    assert 128 / target.noise_multiplier == pytest.approx(16 / scaled.privacy.noise_multiplier, rel=1e-12)
    # its ceiling is what the simulated run really costs, far above the target's epsilon
    real = run_epsilon("rdp", scaled.privacy.noise_multiplier, 16 / 1000, target.steps, 1e-5)
    assert scaled.record["simulated_epsilon"] == pytest.approx(real)
    assert real > 2 * privacy.epsilon
    assert scaled.privacy.epsilon >= real and scaled.privacy.val_noise == pytest.approx(target.val_noise)
    plan = plan_privacy(scaled.privacy, dataset_size=1000, batch_size=16, epochs=4, steps=scaled.steps)
    assert plan.noise_multiplier == scaled.privacy.noise_multiplier and plan.sample_rate == 16 / 1000


def test_data_fraction_keeps_each_record_by_its_own_hash():
    data = load_dataset("digits", image_size=8, val_fraction=0.2, seed=0)
    half = subset_training(data, 0.5, seed=0)
    n, m = len(data.train), len(half.train)
    assert half.full_train_size == n and 0.4 * n < m < 0.6 * n
    assert len(half.val) == len(data.val) and len(half.test) == len(data.test)  # scored on the whole split
    expected = data.train_ids[hash_unit(data.train_ids, key="fraction:0") >= 0.5]
    assert torch.equal(half.train_ids, expected)
    # a record's membership does not depend on the other records: drop some, the rest keep their fate
    fewer = subset_training(type(data)(**{**data.__dict__, "train": data.train.subset(torch.arange(100)),
                                          "train_ids": data.train_ids[:100]}), 0.5, seed=0)
    assert set(fewer.train_ids.tolist()) == set(half.train_ids.tolist()) & set(data.train_ids[:100].tolist())
    assert not torch.equal(subset_training(data, 0.5, seed=1).train_ids, half.train_ids)


def test_fidelity_epochs_are_the_calibrated_run_shape(tmp_path):
    spec = load_study_file(write(tmp_path, fidelity="epochs = 2", privacy="total_epsilon = 8.0"))
    assert run_shapes(spec) == [(128, 2)]


# ----------------------------------------------------------------------------------------------- whole searches


def test_data_fraction_trials_are_accounted_at_the_subsets_sample_rate(tmp_path):
    path = write(tmp_path, fidelity="data_fraction = 0.5\nimage_size = 8", data="", n_trials=1)
    study = run(path)
    (trial,) = trained(study)
    plan, m = trial.user_attrs["privacy_plan"], trial.user_attrs["train_size"]
    full = trial.user_attrs["fidelity"]["train_records"]
    assert 0.4 * full < m < 0.6 * full
    assert plan["sample_rate"] == pytest.approx(128 / m)  # B / m, not B / n
    assert plan["steps"] == 4 * round(m / 128)
    # the run's epsilon is the accountant's for that sample rate, at the per-run budget
    eps = run_epsilon("rdp", plan["noise_multiplier"], 128 / m, plan["steps"], 1e-5)
    assert trial.user_attrs["epsilon_spent"] == pytest.approx(eps) and eps <= 4.0 * (1 + 1e-9)
    assert eps > 3.9
    assert trial.user_attrs["data"]["image_size"] == 8 and trial.user_attrs["target_data"]["image_size"] == 16
    report = study_privacy(study)
    assert report.covers[0]["count"] == m
    assert any(f"of {full} training records" in line and f"the other {full - m}" in line for line in report.not_covered)
    assert report.headline() and "proxies" in report.headline()


def test_a_tan_study_records_the_scaled_runs_and_exports_the_target(tmp_path, capsys):
    path = write(tmp_path, fidelity="tan_batch = 32\nepochs = 2\nimage_size = 8")
    study = run(path)
    trials = trained(study)
    assert len(trials) == 2
    for trial in trials:
        plan, record, n = trial.user_attrs["privacy_plan"], trial.user_attrs["fidelity"], trial.user_attrs["train_size"]
        target = plan_privacy(PrivacyConfig(epsilon=4.0, delta=1e-5), dataset_size=n, batch_size=128, epochs=2)
        assert plan["steps"] == target.steps == record["target_steps"]
        assert plan["sample_rate"] == pytest.approx(32 / n)
        assert plan["noise_multiplier"] == pytest.approx(target.noise_multiplier * 32 / 128)
        assert plan["val_releases"] == 2 and trial.user_attrs["train_config"]["batch_size"] == 32
    # the accounting charges what the simulated runs cost, and says that they are not the target's
    report = study_privacy(study)
    assert report.training_epsilon > 4.0
    assert any("TAN simulations at batch 32" in line for line in report.not_covered)
    lines = privacy_statement(study, report)
    assert "spends no private budget" in lines[1] and "--dataset PRIVATE" in lines[1]

    (best,) = export_best(study, tmp_path / "best.toml")
    recipe = load_recipe_file(best)
    assert recipe.train.epochs == 4 and recipe.train.batch_size == 128 and recipe.train.physical_batch_size == 128
    assert recipe.privacy.epsilon == 4.0 and recipe.privacy.noise_multiplier == 0.0
    assert recipe.data.image_size == 16
    assert "proxy" in best.read_text() and recipe.provenance["searched_at"]["tan_batch"] == 32
    searched = study.best_trial.params
    assert recipe.train.lr == pytest.approx(searched["lr"]) and recipe.arch.activation == searched["activation"]

    # the public-proxy flow: the winner trains once on other data, and that run's epsilon is its whole cost
    out = tmp_path / "final.json"
    assert main(["train", str(best), "--dataset", "synthetic", "--image-size", "16", "--quiet",
                 "--device", "cpu", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "trained on public data (digits) and spent no private budget" in said and "synthetic records" in said
    result = json.loads(out.read_text())
    assert result["dataset"] == "synthetic" and result["train_config"]["batch_size"] == 128
    assert result["steps"] == 4 * round(result["train_size"] / 128)
    assert result["epsilon_target"] == 4.0 and 3.9 < result["epsilon_spent"] <= 4.0


def test_a_batch_too_large_for_the_subset_is_refused_before_any_trial(tmp_path):
    path = write(tmp_path, fidelity="data_fraction = 0.1", data="")
    with pytest.raises(ConfigError, match="batch_size: 128 is larger than"):
        run(path)
    _no_trials(path)


def _no_trials(path):
    journal = path.with_suffix(".journal")
    if journal.exists():
        study = optuna.load_study(study_name="fid", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))))
        assert not study.get_trials()


def test_a_searched_batch_too_large_for_the_subset_is_refused_before_any_trial(tmp_path):
    """Only the first sampled point used to be checked: a trial drawing the larger batch failed, taking a slot."""
    path = write(tmp_path, fidelity="data_fraction = 0.1\nimage_size = 8", data="", n_trials=3)
    text = path.read_text().replace("\nbatch_size = 128\n", "\n")
    text = text.replace("[search]\n", "[search]\nbatch_size = [64, 256]\n")
    path.write_text(text.replace("seed = 3", "seed = 2"))  # its first point trains at 64, which the subset takes
    with pytest.raises(ConfigError, match="batch_size: 256 is larger than the .* data_fraction 0.1 of"):
        run(path)
    _no_trials(path)


def test_a_target_resolution_no_point_can_take_is_refused_before_any_trial(tmp_path):
    """The search at [fidelity] image_size = 8, the exported recipe at [data] image_size = 2, which tiny's
    downsamplings cannot take: the check looked at the search's size only, and every trial was pruned after
    taking a slot."""
    path = write(tmp_path, fidelity="image_size = 8", data="", n_trials=2)
    path.write_text(path.read_text().replace("image_size = 16", "image_size = 2", 1))
    with pytest.raises(ConfigError, match="image_size: 2px is too small"):
        run(path)
    _no_trials(path)


def test_a_fixed_noise_the_exported_target_cannot_keep_is_refused_before_any_trial(tmp_path):
    """sigma = 1 meets epsilon = 4 over the search's 1 epoch, not over the target's 4: `dpnas best` would export a
    recipe `dpnas train` refuses, after the search had spent its budget."""
    path = write(tmp_path, fidelity="epochs = 1\nimage_size = 8", data="",
                 privacy="epsilon = 4.0\nnoise_multiplier = 1.0", n_trials=1)
    with pytest.raises(ConfigError, match="the recipe `dpnas best` exports .* 4 epochs on 1152 training records"):
        run(path)
    _no_trials(path)
    # every point is checked as it is proposed, too (a searched noise multiplier): pruned before it touches data
    searched = write(tmp_path, fidelity="epochs = 1\nimage_size = 8", data="", n_trials=3, name="searched.toml")
    searched.write_text(searched.read_text().replace("[search]\n", "[search]\nnoise_multiplier = [2.0, 1.0]\n")
                        .replace("seed = 3", "seed = 2"))  # its first point, at 2.0, passes the checks
    trials = run(searched).get_trials()
    assert {t.params["noise_multiplier"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE} == {2.0}
    refused = [t for t in trials if t.params["noise_multiplier"] == 1.0]
    assert refused and all(t.state == optuna.trial.TrialState.PRUNED and "privacy_plan" not in t.user_attrs
                           and "the recipe `dpnas best` exports" in t.user_attrs["failure_reason"] for t in refused)
    # the target is planned on all the training records at [train] epochs
    spec = load_study_file(path)
    with pytest.raises(ConfigError, match="spends epsilon"):
        check_target(spec, spec.train, spec.privacy, train_size=1152)
    check_target(spec, spec.train, spec.privacy.replace(noise_multiplier=2.0), train_size=1152)
    check_target(dataclasses.replace(spec, fidelity=Fidelity()), spec.train, spec.privacy, train_size=1152)


def test_before_any_run_the_report_says_no_record_is_unprotected_or_left_out(tmp_path):
    """A study no trial has touched yet (just created, or every point pruned as invalid): it used to say that "the
    all training records are not protected" (TAN) and that the search "trained on a seeded random all of the
    training records" (data_fraction), beside its own "no trial has touched the data yet"."""
    from dpnas.search.study_state import open_study

    path = write(tmp_path, fidelity="tan_batch = 32\ndata_fraction = 0.5\nprivate_data_ok = false", data="")
    study = open_study(load_study_file(path), str(path.with_suffix(".journal")))
    report = study_privacy(study)
    assert report.runs == 0 and report.epsilon == 0 and report.not_covered == []
    assert not any("not protected" in line or "trained on" in line for line in privacy_statement(study, report)[2:])


def test_trials_without_fidelity_record_no_target(tmp_path):
    path = write(tmp_path, n_trials=1, data="")
    (trial,) = trained(run(path))
    assert "fidelity" not in trial.user_attrs and "target_train_config" not in trial.user_attrs
    assert trial.user_attrs["privacy_plan"]["sample_rate"] == pytest.approx(128 / trial.user_attrs["train_size"])
    assert not math.isinf(trial.user_attrs["epsilon_spent"])
    assert TrainConfig.from_dict(trial.user_attrs["train_config"]).batch_size == 128


def test_fidelity_is_part_of_the_budget_a_stored_study_keeps(tmp_path):
    proxy = load_study_file(write(tmp_path, fidelity="data_fraction = 0.5"))
    assert proxy.budget()["fidelity"] == {"data_fraction": 0.5} and proxy.budget()["public_data"] is True
    # a study without [fidelity] keeps the budget it always had, so studies created before still match
    plain = load_study_file(write(tmp_path, data="", name="plain.toml"))
    assert "fidelity" not in plain.budget() and "public_data" not in plain.budget()


def test_the_fast_smoothnet_study_is_the_component_study_at_a_cheaper_fidelity():
    studies = Path(__file__).parent.parent / "studies"
    fast, full = (load_study_file(studies / name) for name in ("smoothnet_cifar10_fast.toml", "smoothnet_cifar10.toml"))
    assert fast.axes == full.axes and fast.arch == full.arch and fast.privacy == full.privacy
    assert fast.train == full.train and fast.dataset == full.dataset == "cifar10"  # the target: what `best` exports
    assert fast.fidelity.active and not fast.public_data
    assert fast.fidelity.tan_batch is None  # its data is treated as private: every trial stays DP at eps = 7
    # its expected cost is written at the top of the file
    assert "Expected cost" in (studies / "smoothnet_cifar10_fast.toml").read_text().split("[study]")[0]


def _transfer_module():
    from bench_helpers import load_benchmark

    return load_benchmark("fidelity_transfer")


def test_the_transfer_benchmark_ranks_against_the_mean_of_the_full_runs():
    bench = _transfer_module()
    assert bench.parse_arm("full") is None
    assert bench.parse_arm("data_fraction=0.25+tan_batch=64").to_dict() == {"data_fraction": 0.25, "tan_batch": 64}

    def runs(vals, work=1.0):
        return [{"val_accuracy": v, "test_accuracy": v, "work": work, "wall_seconds": work, "noise_multiplier": 1.0,
                 "epsilon_spent": 1.0} for v in vals]

    full = [runs([0.1, 0.2, 0.3, 0.4, 0.5]), runs([0.12, 0.18, 0.33, 0.41, 0.47])]
    same = bench.summarise("proxy", runs([0.0, 0.1, 0.2, 0.3, 0.4], work=0.25), full, ranking=True)
    assert same["kendall_tau_val"] == pytest.approx(1.0) and same["top3_overlap"] == 1.0
    assert same["work_ratio"] == pytest.approx(0.25)
    reversed_ = bench.summarise("proxy", runs([0.5, 0.4, 0.3, 0.2, 0.1]), full, ranking=True)
    assert reversed_["kendall_tau_val"] == pytest.approx(-1.0) and reversed_["top3_overlap"] == pytest.approx(1 / 3)
    assert bench.one_full_run(full)["kendall_tau_val"] == pytest.approx(1.0)
    assert bench.half_against_half(full) is None  # two runs have no halves of two


def test_the_transfer_benchmark_ranks_half_the_full_runs_against_the_other_half(tmp_path):
    bench = _transfer_module()

    def runs(vals):
        return [{"val_accuracy": v, "test_accuracy": v, "work": 1.0, "wall_seconds": 2.0, "noise_multiplier": 1.0,
                 "epsilon_spent": 1.0} for v in vals]

    # runs 0 and 1 order the points one way, runs 2 and 3 the reverse and more steeply: a half of the two alike
    # disagrees completely with the other (2 of the 6 ordered splits), a mixed half agrees with the other mixed one
    up, down = [0.1, 0.2, 0.3, 0.4, 0.5], [0.9, 0.7, 0.5, 0.3, 0.1]
    full = [runs(up), runs(up), runs(down), runs(down)]
    row = bench.half_against_half(full)
    assert row["arm"] == "mean of 2 full runs" and row["work_ratio"] == pytest.approx(2.0)
    assert row["wall_ratio"] == pytest.approx(2.0)
    assert row["kendall_tau_val"] == pytest.approx((4 * 1 + 2 * -1) / 6)
    agree = bench.half_against_half([runs(up)] * 4)
    assert agree["kendall_tau_val"] == pytest.approx(1.0) and agree["top3_overlap"] == 1.0

    # the table rebuilt from a written JSON holds the same rows the run would have written
    path = tmp_path / "transfer.json"
    proxies = {"epochs=2": runs([0.0, 0.1, 0.2, 0.3, 0.4])}
    path.write_text(json.dumps({"study": "s", "dataset": "digits", "points": 5, "rows": [],
                                "runs": {"full": [runs(up)] * 4, **proxies}}))
    rebuilt = bench.resummarise(str(path))
    assert json.loads(path.read_text())["rows"] == rebuilt["rows"]
    arms = ["full (mean of 4)", "one full run", "mean of 2 full runs", "epochs=2"]
    assert [r["arm"] for r in rebuilt["rows"]] == arms
    assert rebuilt["rows"][-1]["kendall_tau_val"] == pytest.approx(1.0)


def test_tan_scales_a_calibrated_noise_too(tmp_path):
    """In a total-epsilon study the target's sigma comes from the calibration (a fixed noise multiplier)."""
    spec = load_study_file(write(tmp_path, fidelity="tan_batch = 32", privacy="total_epsilon = 8.0"))
    steps = 4 * round(1000 / 128)
    ceiling = run_epsilon("rdp", 3.0, 128 / 1000, steps, 1e-5) * (1 + 1e-6)
    calibrated = spec.privacy.replace(noise_multiplier=3.0, epsilon=ceiling, val_noise=5.0)
    scaled = trial_fidelity(spec, spec.train, calibrated, train_size=1000)
    assert scaled.privacy.noise_multiplier == pytest.approx(3.0 * 32 / 128) and scaled.steps == steps
    assert scaled.privacy.val_noise == 5.0 and scaled.record["target_noise_multiplier"] == 3.0


def test_the_broad_benchmark_study_is_the_quickstart_on_a_wider_space():
    """benchmarks/quickstart_broad.toml: the same data, privacy and training as the quickstart; every axis of the
    quickstart's space is in it, with norm "none" and smaller learning rates added."""
    repo = Path(__file__).resolve().parents[1]
    broad, quick = (load_study_file(path) for path in (repo / "benchmarks" / "quickstart_broad.toml",
                                                      repo / "studies" / "quickstart.toml"))
    assert (broad.dataset, broad.image_size, broad.privacy, broad.train, broad.arch) == (
        quick.dataset, quick.image_size, quick.privacy, quick.train, quick.arch)
    axes = {axis.name: axis for axis in broad.axes}
    assert {axis.name for axis in quick.axes} == set(axes)
    narrow = {axis.name: axis for axis in quick.axes}
    assert set(narrow["norm"].choices) < set(axes["norm"].choices) and "none" in axes["norm"].choices
    assert axes["lr"].low == 1e-3 < narrow["lr"].low and axes["lr"].high == narrow["lr"].high


# ----------------------------------------------------------------------------------------------- fewer validations


def test_fewer_validations_are_spaced_to_the_end_and_their_noise_is_calibrated_for_them():
    privacy = PrivacyConfig(epsilon=4.0, delta=1e-5)
    every = plan_privacy(privacy, dataset_size=1000, batch_size=10, epochs=8)
    two = plan_privacy(privacy, dataset_size=1000, batch_size=10, epochs=8, releases=2)
    one = plan_privacy(privacy, dataset_size=1000, batch_size=10, epochs=8, releases=1)
    assert every.validated_periods() == set(range(1, 9)) and every.val_releases == 8
    assert two.validated_periods() == {4, 8} and one.validated_periods() == {8}
    assert validation_periods(8, 3) == {3, 6, 8}
    # the training is the same run; the validation noise is the smallest that 2 (or 1) releases afford at epsilon
    assert (two.steps, two.noise_multiplier) == (every.steps, every.noise_multiplier)
    assert two.val_noise == pytest.approx(count_noise_for(4.0, 1e-5, 2)) and two.val_releases == 2
    assert one.val_noise < two.val_noise < every.val_noise
    assert rdp_to_epsilon(count_rdp(two.val_noise, 2), 1e-5) <= 4.0 < rdp_to_epsilon(count_rdp(two.val_noise, 3), 1e-5)
    # a TAN run's periods are its pseudo-epochs of ceil(S / epochs) steps
    tan = plan_privacy(privacy, dataset_size=1000, batch_size=10, epochs=4, steps=30, releases=2)
    assert tan.periods == 4 and tan.validated_periods() == {2, 4}
    for bad in (0, 9):
        with pytest.raises(ConfigError, match="validations: must be from 1 to the run's 8 epochs"):
            plan_privacy(privacy, dataset_size=1000, batch_size=10, epochs=8, releases=bad)


def test_a_run_with_fewer_validations_scores_and_records_only_those_epochs(monkeypatch):
    import dpnas.dp.train as train_module
    from dpnas import MODELS

    data = load_dataset("digits", image_size=8, val_fraction=0.2, seed=0)
    scored, seen = [], []
    real = train_module.count_correct
    monkeypatch.setattr(train_module, "count_correct", lambda model, split, data, **kw: (
        scored.append("val" if split is data.val else "test"), real(model, split, data, **kw))[1])
    cfg = TrainConfig(epochs=4, batch_size=128, physical_batch_size=128, optimizer="sgd", lr=0.1, schedule="step",
                      step_size=1, gamma=0.5)
    result = train(MODELS["tiny"].arch, data, train_cfg=cfg, privacy=PrivacyConfig(epsilon=4.0), progress=False,
                   validations=2, on_epoch=seen.append)
    assert scored == ["val", "val", "test"]  # two validation passes, not four
    assert [h["epoch"] for h in result["history"]] == [2, 4] and seen == result["history"]
    assert result["val_releases"] == 2 and result["steps"] == 4 * round(len(data.train) / 128)
    # the schedule still steps every epoch, recorded or not: epochs 2 and 4 trained at 0.1 halved once and 3 times
    assert [h["lr"] for h in result["history"]] == pytest.approx([0.1 * 0.5, 0.1 * 0.5**3])
    assert 3.9 < result["epsilon_spent"] <= 4.0
    # plateau reads a score every epoch; refused before a step, and so is plateau on an empty validation split
    for changes, kwargs in (({"schedule": "plateau"}, {"validations": 2}), ({"schedule": "plateau"}, {})):
        split = data if kwargs else dataclasses.replace(data, val=data.val.subset(torch.arange(0)))
        with pytest.raises(ConfigError, match="plateau reads a validation score every epoch"):
            train(MODELS["tiny"].arch, split, train_cfg=cfg.replace(**changes), privacy=PrivacyConfig(epsilon=4.0),
                  progress=False, on_plan=pytest.fail, **kwargs)


@pytest.mark.parametrize("fidelity, study_edit, message", [
    ("validations = 0", None, "from 1 to the search's 4 epochs"),
    ("validations = 5", None, "from 1 to the search's 4 epochs"),
    ("validations = 3\nepochs = 2", None, "from 1 to the search's 2 epochs"),
    ("validations = 1", ('pruner = "none"', 'pruner = "median"'), "median pruner has no intermediate score"),
    ("validations = 2", ('recipe = "quick"', 'recipe = "quick"\nschedule = "plateau"'), "plateau schedule"),
    ("validations = 2", ("[search]\n", '[search]\nschedule = ["constant", "plateau"]\n'), "plateau schedule"),
    ("validations = 2", ("[search]\n", "[search]\nepochs = [2, 4]\n"), "do not search epochs"),
])
def test_bad_validations_are_refused_by_the_study_file(tmp_path, fidelity, study_edit, message):
    path = write(tmp_path, fidelity=fidelity)
    if study_edit:
        path.write_text(path.read_text().replace(*study_edit))
    with pytest.raises(StudyFileError, match=message) as err:
        load_study_file(path)
    assert "fidelity.validations" in str(err.value)
    # a pruner with two validations has something to compare, and plateau with one per epoch is fine
    assert load_study_file(write(tmp_path, fidelity="validations = 2", name="ok.toml")).fidelity.validations == 2


def test_a_total_epsilon_search_with_one_validation_charges_one_release_and_exports_the_target(tmp_path):
    path = write(tmp_path, fidelity="validations = 1", data="", privacy="total_epsilon = 8.0", n_trials=2)
    spec = load_study_file(path)
    every = calibrate_study(dataclasses.replace(spec, fidelity=Fidelity()), runs=2, train_size=1000)
    one = calibrate_study(spec, runs=2, train_size=1000)
    assert (every.val_releases, one.val_releases) == (4, 1)
    assert one.noise_multipliers == every.noise_multipliers and one.val_noise < every.val_noise
    assert one.validation_epsilon <= 8.0

    study = run(path)
    trials = trained(study)
    assert len(trials) == 2
    for trial in trials:
        plan = trial.user_attrs["privacy_plan"]
        assert plan["val_releases"] == 1 and plan["steps"] == 4 * round(trial.user_attrs["train_size"] / 128)
        assert trial.user_attrs["fidelity"] == {"validations": 1}
        assert list(trial.intermediate_values) == [4]  # one score, at the end: the objective
    report = study_privacy(study)
    calibration = calibrate_study(spec, runs=2, train_size=trials[0].user_attrs["train_size"])
    assert all(t.user_attrs["privacy_plan"]["val_noise"] == pytest.approx(calibration.val_noise) for t in trials)
    assert report.budget["val_releases"] == 2  # one per run, not one per epoch
    assert report.validation_epsilon <= 8.0 * (1 + 1e-9) and report.validation_epsilon > 7.5
    # charged as one release, a run's score costs far more at four: the accounting really counts releases
    four = rdp_to_epsilon(2 * count_rdp(calibration.val_noise, 4), 1e-5)
    assert four > 12.0

    # the trials trained the target itself: neither the report nor the recipe calls them proxies
    assert report.headline() is None
    (best,) = export_best(study, tmp_path / "best.toml")
    text = best.read_text()
    assert "proxy" not in text and "scored each trial 1 time(s)" in text
    assert "validations" not in text.split("[train]")[1].split("\n[")[0]
    out = tmp_path / "final.json"
    assert main(["train", str(best), "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    final = json.loads(out.read_text())
    assert final["val_releases"] == 4 and [h["epoch"] for h in final["history"]] == [1, 2, 3, 4]


def test_the_transfer_benchmark_counts_the_validation_passes_in_the_total():
    bench = _transfer_module()
    assert bench.parse_arm("tan_batch=16+validations=1").to_dict() == {"tan_batch": 16, "validations": 1}

    def runs(work, releases, n=3):
        return [{"val_accuracy": 0.1 * i, "test_accuracy": 0.1 * i, "work": work, "wall_seconds": 1.0,
                 "noise_multiplier": 1.0, "epsilon_spent": 1.0, "image_size": 2, "val_size": 10, "test_size": 5,
                 "val_releases": releases} for i in range(n)]

    full = [runs(100, 8), runs(100, 8)]
    # 3 forwards per training pixel, one forward per evaluated pixel: 3 x 100 + (10 x 8 + 5) x 4 = 640 for a full run
    assert bench.total_work(full[0][0]) == 640
    row = bench.summarise("proxy", runs(10, 1), full, ranking=True)
    assert row["work_ratio"] == pytest.approx(0.1) and row["total_work_ratio"] == pytest.approx((30 + 15 * 4) / 640)
    assert bench.half_against_half(full * 2)["total_work_ratio"] == pytest.approx(2.0)
    # runs recorded before the counts were have no total
    old = [{k: v for k, v in r.items() if k != "val_releases"} for r in runs(10, 1)]
    assert bench.summarise("proxy", old, full, ranking=False)["total_work_ratio"] is None


def test_a_total_epsilon_proxy_study_exports_its_target_at_the_per_run_budget(tmp_path):
    """The target's epsilon was the study file's placeholder, the whole total_epsilon: `dpnas train` of the recipe
    spent the whole total again, on the records the search had spent it on, where a study without proxies exports
    its trial's per-run budget. Its provenance called the TAN proxy's epsilon, larger than the target's,
    `epsilon_spent`, as if the file's run had spent it."""
    path = write(tmp_path, fidelity="tan_batch = 32\nepochs = 2\nimage_size = 8\nprivate_data_ok = false", data="",
                 privacy="total_epsilon = 8.0")
    study = run(path)
    (best,) = export_best(study, tmp_path / "best.toml")
    recipe, trial = load_recipe_file(best), study.best_trial
    per_run, simulated = trial.user_attrs["fidelity"]["target_epsilon"], trial.user_attrs["privacy_config"]["epsilon"]
    assert per_run < 8.0 < simulated
    assert trial.user_attrs["target_privacy_config"]["epsilon"] == per_run  # what the trial stands for
    assert recipe.privacy.epsilon == per_run and recipe.privacy.noise_multiplier == 0.0
    assert recipe.privacy.val_noise == "auto" and recipe.train.epochs == 4 and recipe.data.image_size == 16
    assert "epsilon_spent" not in recipe.provenance
    assert recipe.provenance["proxy_epsilon_spent"] == trial.user_attrs["epsilon_spent"] > 8.0
    text = best.read_text()
    assert f"at epsilon {per_run:.4g} (delta 1e-05), the per-run budget the search gave it" in text
    assert "by its search trial (the proxy run below)" in text and "by this run" not in text
    # a study recorded before: its target held the placeholder; the export gives the per-run budget all the same
    old = copy.deepcopy(trial)
    old.user_attrs["target_privacy_config"]["epsilon"] = 8.0
    assert trial_recipe(study, old).privacy.epsilon == per_run
    # `dpnas train` of it trains the target at that budget, its noise derived for it
    out = tmp_path / "final.json"
    assert main(["train", str(best), "--epochs", "1", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    final = json.loads(out.read_text())
    assert final["epsilon_target"] == per_run and 0.99 * per_run < final["epsilon_spent"] <= per_run
    assert final["train_config"]["batch_size"] == 128 and final["train_size"] == trial.user_attrs["train_size"]

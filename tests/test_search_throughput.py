"""benchmarks/search_throughput.py end to end, tiny: both arms run the same trials and the numbers add up."""

import json

import pytest
from bench_helpers import load_benchmark


def load_script():
    return load_benchmark("search_throughput")


def test_both_arms_complete_the_same_trials_and_report_consistent_rates(tmp_path):
    out = tmp_path / "throughput.json"
    # 512 synthetic 16x16 images: enough for the smoothnet recipe's batch of 256; one small grid axis each
    load_script().main(["--trials", "2", "--epochs", "1", "--workers", "1,2", "--device", "cpu",
                        "--synthetic-size", "512", "--image-size", "16", "--widths", "1", "--depths", "1",
                        "--baseline", "--bar", "--json", str(out)])
    result = json.loads(out.read_text())
    rows, baseline = result["rows"][:2], result["rows"][2]
    assert [r["workers"] for r in rows] == [1, 2]
    # the user loop trained the sequential arm's trials, each within the epsilon its dpnas trial was given
    assert baseline["arm"] == "user loop (Opacus)" and baseline["trials"] == 2
    assert baseline["configs"] == rows[0]["configs"]
    targets = [t["privacy_config"]["epsilon"] for t in rows[0]["trial_configs"]]
    assert all(0 < eps <= target * 1.01 for eps, target in zip(baseline["epsilon"], targets))
    assert all(0 <= r["mean_test_accuracy"] <= 1 for r in result["rows"])
    assert "synthetic" in result["study"] and 'sampler = "grid"' in result["study"] and result["torch"]
    for row in rows:
        assert row["trials"] == 2 and row["states"] == {"COMPLETE": 2}
        assert row["trials_per_hour"] == pytest.approx(row["trials"] / row["wall_s"] * 3600)
        assert row["x_sequential"] == pytest.approx(row["trials_per_hour"] / rows[0]["trials_per_hour"])
        # the search's start and its end after the last trial: parts of its wall time, the trials between them
        start, end = row["first_trial_after_s"], row["after_last_trial_s"]
        assert 0 < start and 0 <= end and start + end + row["mean_trial_s"] <= row["wall_s"]
    assert rows[0]["x_sequential"] == 1.0
    # the same two distinct architectures in both arms, so the comparison is not biased by their cost
    assert rows[0]["configs"] == rows[1]["configs"] and len(set(rows[0]["configs"])) == 2


def test_the_floors_train_the_same_trials_without_privacy(tmp_path, capsys):
    """`--floor`: the sequential arm's trials by dpnas's loop at epsilon = inf, with as many steps, and the same
    study searched at epsilon = inf."""
    out = tmp_path / "throughput.json"
    load_script().main(["--trials", "2", "--epochs", "1", "--workers", "1", "--device", "cpu", "--synthetic-size",
                        "512", "--image-size", "16", "--widths", "1", "--depths", "1", "--floor", "--json", str(out)])
    result = json.loads(out.read_text())
    sequential, floor, free = result["rows"]
    assert floor["arm"] == "non-private floor" and floor["trials"] == 2 and floor["private"] == [False, False]
    assert floor["configs"] == sequential["configs"]
    # as many steps as the private trials were planned (the same epochs at the same sample rate)
    assert floor["steps"] == sequential["steps"] and all(steps >= 1 for steps in floor["steps"])
    assert floor["x_sequential"] == pytest.approx(floor["trials_per_hour"] / sequential["trials_per_hour"])
    assert free["arm"] == "non-private search (1 worker)" and free["states"] == {"COMPLETE": 2}
    assert free["configs"] == sequential["configs"] and free["steps"] == sequential["steps"]
    for trial in free["trial_configs"]:  # trained without noise; the private arm's with it
        # epsilon = inf, which the journal stores as null
        assert trial["privacy_config"]["epsilon"] in (None, float("inf"))
        assert trial["privacy_config"]["noise_multiplier"] == 0
    assert all(0 < t["privacy_config"]["epsilon"] < float("inf") for t in sequential["trial_configs"])
    printed = capsys.readouterr().out
    assert "non-private floor / dpnas (sequential)" in printed and "/ user loop" not in printed


def test_bad_arguments_are_refused(capsys):
    module = load_script()
    with pytest.raises(SystemExit):
        module.main(["--workers", "0"])
    assert "--workers: expected positive numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["--trials", "5", "--widths", "1", "--depths", "1"])
    assert "exceeds the grid of 4 points" in capsys.readouterr().err


def test_axes_outside_the_grid_are_fixed_at_their_middle():
    module = load_script()
    assert module.fixed_value(["group", "layer"]) == "group"
    assert module.fixed_value({"low": 5e-3, "high": 3e-2, "log": True}) == pytest.approx(0.01225, rel=1e-3)
    assert module.fixed_value({"low": 0.5, "high": 2.5, "step": 0.5}) == 1.5
    assert module.fixed_value({"low": 1, "high": 4}) in (2, 3)
    assert module._section_of("lr") == "train" and module._section_of("max_grad_norm") == "privacy"
    assert module._section_of("norm") == "arch"


def test_a_run_stopped_after_an_arm_keeps_that_arm_in_its_json(tmp_path, monkeypatch):
    """A GPU session's time limit can stop the benchmark between arms: the JSON holds the arms that finished."""
    module = load_script()
    out = tmp_path / "throughput.json"
    arms = []

    def arm_then_stop(arm):
        if arms:
            raise KeyboardInterrupt  # the time limit, during the second arm
        arms.append(arm)
        return {"arm": "sequential", "workers": 1, "trials": 2, "states": {"COMPLETE": 2}, "wall_s": 4.0,
                "trials_per_hour": 1800.0, "mean_test_accuracy": 0.5, "configs": [], "trial_configs": []}

    monkeypatch.setattr(module, "in_fresh_process", arm_then_stop)
    with pytest.raises(KeyboardInterrupt):
        module.main(["--trials", "2", "--epochs", "1", "--workers", "1,2", "--device", "cpu", "--synthetic-size",
                     "512", "--widths", "1", "--depths", "1", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["workers"] == 1 and row["x_sequential"] == 1.0 and arms[0]["workers"] == 1


def _user_loop(tmp_path, epochs=2):
    """The user loop over one small quickstart trial on the digits at 8 px (1,152 training records, B = 256)."""
    from dpnas.arch.space import ArchConfig
    from dpnas.dp.config import PrivacyConfig, TrainConfig

    module = load_script()
    args = module.parse_args(["--study", "studies/quickstart.toml", "--dataset", "digits", "--image-size", "8",
                              "--epochs", str(epochs), "--trials", "1", "--widths", "1", "--depths", "1"])
    study = module.derive_study(args, tmp_path)
    configs = (ArchConfig(width=0.5, depth=1.0, stages=1),
               TrainConfig(epochs=epochs, batch_size=256, physical_batch_size=320, optimizer="nadam", lr=1e-2),
               PrivacyConfig(epsilon=8.0, delta=1e-5, max_grad_norm=1.0))
    trial = {"config": configs[0].to_dict(), "train_config": configs[1].to_dict(),
             "privacy_config": configs[2].to_dict(), "params": {}}
    return module, configs, module.run_user_loop(study, [trial], "cpu")


def test_the_user_loop_trains_the_dpnas_trials_steps_at_its_sample_rate(tmp_path, monkeypatch):
    """1,152 / 256 = 4.5: dpnas takes round() = 4 steps of 256 an epoch; Opacus's loader from DataLoader(batch_size=256)
    took ceil() = 5 of 230, 25 % more steps for "the same trial"."""
    from opacus.optimizers.optimizer import DPOptimizer

    from dpnas.data.datasets import load_dataset
    from dpnas.dp.privacy import plan_privacy

    steps, rates = [], []  # the user loop's optimizer steps (not its physical chunks), counted from outside
    pre_step = DPOptimizer.pre_step

    def counted(self, closure=None):
        stepped = pre_step(self, closure)
        if stepped:
            steps.append(1)
            rates.append(self.expected_batch_size)
        return stepped

    monkeypatch.setattr(DPOptimizer, "pre_step", counted)
    _, (_, train_cfg, privacy), row = _user_loop(tmp_path)
    data = load_dataset("digits", val_fraction=0.2, seed=0, image_size=8, progress=False)
    plan = plan_privacy(privacy, dataset_size=len(data.train), batch_size=train_cfg.batch_size,
                        epochs=train_cfg.epochs)
    assert len(data.train) == 1152 and plan.steps == 8
    assert len(steps) == plan.steps and row["steps"] == [plan.steps]
    assert set(rates) == {train_cfg.batch_size}  # the noisy sum averaged over B, as dpnas's
    assert 0 < row["epsilon"][0] <= privacy.epsilon * 1.01  # accounted at that rate, within the trial's budget


def test_the_user_loops_mean_trial_time_is_its_training_batches_as_dpnas_arms(tmp_path, monkeypatch):
    """The dpnas arms' mean_trial_s is their trials' wall_seconds (the training batches only); the user loop's was
    its whole trial (model, calibration, validation and test passes), which inflated the per-trial ratio."""
    import time

    import dpnas.data.datasets

    normalise = dpnas.data.datasets.normalise
    pause = 1.0

    def slow_normalise(*args, **kwargs):  # the user loop's evaluation passes (and its one train-set copy)
        time.sleep(pause)
        return normalise(*args, **kwargs)

    monkeypatch.setattr(dpnas.data.datasets, "normalise", slow_normalise)
    _, (_, train_cfg, _), row = _user_loop(tmp_path)
    evaluations = train_cfg.epochs + 1  # one validation pass an epoch, one test pass
    # no evaluation pass in it: all of them (and the copy) lie between the two, whatever the training took (an
    # absolute bound on mean_trial_s failed on a loaded machine, where its training batches alone took 4.7 s)
    assert row["mean_whole_trial_s"] >= row["mean_trial_s"] + (evaluations + 1) * pause

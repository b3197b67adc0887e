"""Privacy properties that a mutation review of the privacy code found untested (2026-12-07).

Each test here failed against at least one single-line change of dpnas that broke privacy while the rest of the suite
passed: training noise 0.9x its scale; Poisson batches at another rate than the accountant's, cut at B or of fixed
size; validation noise 0.8x; a run's validation epsilon one release short; gradient noise seeded from the stored
seed; a plateau schedule stepped on the exact score; validation noise calibrated for the shortest run shape; a
random-count bound charging the cheapest run; pruned runs dropped from the study account, or their recorded plan
one step short or at a smaller sample rate; a fixed noise multiplier that overspends accepted; the result check off.
"""


import optuna
import pytest
import torch
from optuna.trial import TrialState
from search_helpers import write_study
from test_privacy import batch, flat_params, make_engine, small_model

import dpnas.dp.train as train_module
from dpnas import MODELS
from dpnas.data.datasets import load_dataset
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.privacy import count_rdp, rdp_to_epsilon, validation_epsilon
from dpnas.search.calibration import calibrate
from dpnas.search.runner import search
from dpnas.search.storage import open_storage
from dpnas.search.study_file import load_study_file
from dpnas.search.study_privacy import RunPrivacy, account, study_privacy

TINY = MODELS["tiny"].arch
DELTA = 1e-5


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_fraction=0.2, seed=0)


# M01b: noise std * 0.9 ---------------------------------------------------------------------------------------
def test_noise_is_sigma_C_times_the_noise_generator_s_draws_over_B():
    x, y = batch(10)
    sigma, C, B = 2.0, 0.7, 10.0
    quiet, noisy = small_model(), small_model()
    make_engine(quiet, noise_multiplier=0.0, expected_batch_size=B, max_grad_norm=C).step(x, y)
    make_engine(noisy, noise_multiplier=sigma, expected_batch_size=B, max_grad_norm=C, seed=5).step(x, y)
    replay = torch.Generator().manual_seed(5)  # Opacus draws one N(0, (sigma C)^2) tensor per parameter, in order
    expected = torch.cat([(sigma * C * torch.randn(p.shape, generator=replay)).flatten() for p in noisy.parameters()])
    torch.testing.assert_close(flat_params(quiet) - flat_params(noisy), expected / B, rtol=1e-4, atol=1e-6)


# M03a / M03e / M03f: the training loop's batches ---------------------------------------------------------------
def test_training_batches_are_poisson_at_the_rate_the_accountant_is_told(digits, monkeypatch):
    rates, sampled, stepped = [], [], []
    real_sample, real_step = train_module.poisson_sample, train_module.DPSGDEngine.step

    def spy_sample(n, rate, **kwargs):
        rates.append(rate)
        sampled.append(real_sample(n, rate, **kwargs))
        return sampled[-1]

    def spy_step(self, images, labels, **kwargs):
        stepped.append(len(labels))
        return real_step(self, images, labels, **kwargs)

    monkeypatch.setattr(train_module, "poisson_sample", spy_sample)
    monkeypatch.setattr(train_module.DPSGDEngine, "step", spy_step)
    cfg = TrainConfig(epochs=2, batch_size=128, physical_batch_size=64, optimizer="nadam", lr=2e-3)
    result = train_module.train(TINY, digits, train_cfg=cfg, privacy=PrivacyConfig(epsilon=4.0), progress=False)
    assert set(rates) == {result["sample_rate"]} and len(rates) == result["steps"]
    assert stepped == [len(i) for i in sampled]  # every sampled record is trained on, no more, no fewer
    assert max(stepped) > cfg.batch_size and len(set(stepped)) > 3  # Binomial sizes, not fixed ones


# M05b: validation noise * 0.8 --------------------------------------------------------------------------------
def test_released_scores_are_the_exact_count_plus_s_times_the_generator_s_draws():
    data = load_dataset("synthetic", synthetic_size=300, val_fraction=0.5, seed=0, image_size=8)
    s, epochs = 6.0, 4
    privacy = PrivacyConfig(epsilon=8.0, val_noise=s, reproducible=True)
    trained = []
    result = train_module.train(TINY, data, train_cfg=TrainConfig(epochs=epochs, batch_size=50, physical_batch_size=50,
                                                                  optimizer="sgd", lr=1e-12),
                                privacy=privacy, progress=False, on_trained=trained.append)
    exact, _ = train_module.count_correct(trained[0], data.val, data.to("cpu"), batch_size=256)
    replay = torch.Generator().manual_seed(train_module.release_seeds(0, privacy)[2])
    n = len(data.val)
    expected = [min(1.0, max(0.0, (float(exact) + s * torch.randn((), generator=replay, dtype=torch.float64).item()) / n))
                for _ in range(epochs)]
    assert [h["val_accuracy"] for h in result["history"]] == pytest.approx(expected, abs=1e-9)
    # M05d: and the run's validation epsilon counts every release
    assert result["validation_epsilon"] == validation_epsilon(s, epochs, privacy.delta)


# M08a / M08b: the gradient noise from a stored seed ------------------------------------------------------------
def test_gradient_noise_is_secret_even_when_the_batches_are_the_same(digits, monkeypatch):
    monkeypatch.setattr(train_module, "poisson_sample", lambda n, q, *, generator, device: torch.arange(64))
    weights = []
    for _ in range(2):
        train_module.train(TINY, digits, train_cfg=TrainConfig(epochs=1, batch_size=128, physical_batch_size=128),
                           privacy=PrivacyConfig(), progress=False,
                           on_trained=lambda m: weights.append([p.detach().clone() for p in m.parameters()]))
    assert any(not torch.equal(a, b) for a, b in zip(*weights))  # same seed, same batches: only the noise differs


# M09b: plateau reads the exact score -------------------------------------------------------------------------
def test_the_plateau_schedule_reads_the_released_score(digits, monkeypatch):
    seen = []
    real = torch.optim.lr_scheduler.ReduceLROnPlateau.step
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step",
                        lambda self, metrics, *a, **k: (seen.append(metrics), real(self, metrics, *a, **k))[1])
    cfg = TrainConfig(epochs=2, batch_size=128, physical_batch_size=128, schedule="plateau")
    result = train_module.train(TINY, digits, train_cfg=cfg, privacy=PrivacyConfig(val_noise=3.0), progress=False)
    assert seen == [h["val_accuracy"] for h in result["history"]]


# M05f: calibration of the validation noise over several epoch counts -----------------------------------------
def test_validation_noise_is_calibrated_for_the_longest_run_shape():
    c = calibrate(6.0, DELTA, mode="fixed", runs=5, shapes=[(64, 2), (128, 4)], train_size=1000)
    assert c.val_releases == 4
    assert rdp_to_epsilon(5 * count_rdp(c.val_noise, 4), DELTA) <= 6.0


# M11e / M11f: heterogeneous runs under a random count ----------------------------------------------------------
@pytest.mark.parametrize("mode,extra", [("truncated_negative_binomial", {"eta": 1.0, "gamma": 0.2}),
                                        ("poisson", {"mu": 5.0})])
def test_a_random_count_charges_the_most_costly_run(mode, extra):
    strong = RunPrivacy(1.1, 0.05, 200, 5.0, 10)
    weak = RunPrivacy(3.0, 0.01, 50, 50.0, 1)
    both = account([weak, strong], mode=mode, delta=DELTA, **extra)
    alone = account([strong], mode=mode, delta=DELTA, **extra)
    assert both[1:3] == pytest.approx(alone[1:3], rel=1e-9)


# M06a / M04c / M04d: the study account -----------------------------------------------------------------------
def test_a_pruned_run_is_charged_its_recorded_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    spec = load_study_file(write_study(tmp_path, n_trials=2, pruner="median", epochs=2))
    search(spec, progress=False)
    study = optuna.load_study(study_name=spec.name, storage=open_storage(spec.default_storage()))
    trials = study.get_trials()
    assert {t.state for t in trials} == {TrialState.PRUNED}
    report = study_privacy(study)
    assert report.runs == 2
    # every plan is the run its trial trained: its noise, its sample rate, all of its planned steps
    runs = []
    for t in trials:
        cfg, plan = t.user_attrs["train_config"], t.user_attrs["privacy_plan"]
        q = cfg["batch_size"] / t.user_attrs["train_size"]
        steps = cfg["epochs"] * max(1, round(1 / q))
        assert plan["sample_rate"] == q and plan["steps"] == steps
        runs.append(RunPrivacy(plan["noise_multiplier"], q, steps))
    assert report.training_epsilon == pytest.approx(account(runs, mode="fixed", delta=DELTA)[1], rel=1e-9)


# M11h: a fixed noise multiplier over the budget ------------------------------------------------------------------
def test_a_fixed_noise_multiplier_that_overspends_is_refused():
    from dpnas.arch.space import ConfigError
    from dpnas.dp.privacy import plan_privacy

    with pytest.raises(ConfigError, match="noise_multiplier: 0.5 .* spends epsilon"):
        plan_privacy(PrivacyConfig(epsilon=1.0, noise_multiplier=0.5), dataset_size=1000, batch_size=100, epochs=5)
    sigma = plan_privacy(PrivacyConfig(epsilon=1.0), dataset_size=1000, batch_size=100, epochs=5).noise_multiplier
    plan_privacy(PrivacyConfig(epsilon=1.0, noise_multiplier=sigma), dataset_size=1000, batch_size=100, epochs=5)


# M11g: a random-count account with a pruner ----------------------------------------------------------------------
def test_a_random_count_with_a_pruner_is_composed():
    study = optuna.create_study(direction="maximize")
    for key, value in {"sampler": "random", "pruner": "median", "trial_count": "poisson", "mean_trials": 5.0,
                       "delta": DELTA}.items():
        study.set_user_attr(key, value)
    plan = {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 200, "val_noise": 5.0, "val_releases": 10}
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"privacy_plan": plan}))
    assert study_privacy(study).mode == "fixed"


# M12b: a random-count study cut short keeps Papernot & Steinke's bound -----------------------------------------------
def test_a_random_count_cut_short_is_composed():
    from dpnas.search.study_privacy import TRIAL_TARGET_ATTR

    study = optuna.create_study(direction="maximize")
    for key, value in {"sampler": "random", "pruner": "none", "trial_count": "poisson", "mean_trials": 5.0,
                       "delta": DELTA}.items():
        study.set_user_attr(key, value)
    study._storage.set_study_system_attr(study._study_id, TRIAL_TARGET_ATTR, 3)  # K = 3 drawn in secret
    plan = {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 200, "val_noise": 5.0, "val_releases": 10}
    run = RunPrivacy(1.1, 0.05, 200, 5.0, 10)
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"privacy_plan": plan}))
    from dpnas.search.study_report import privacy_statement

    assert ", 1 run touched the data" in privacy_statement(study)[0]  # one run, not "1 runs"
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"privacy_plan": plan}))
    cut_short = study_privacy(study)  # 2 of the 3: the bound for the best of K runs does not cover them
    assert cut_short.mode == "fixed"
    assert cut_short.training_epsilon == pytest.approx(account([run] * 2, mode="fixed", delta=DELTA)[1], rel=1e-9)
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"privacy_plan": plan}))
    assert study_privacy(study).mode == "poisson"  # all 3 run: the best of a random count
    # a 4th run (a failed trial retried) is more than the bound for the best of the K drawn covers: composed
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"privacy_plan": plan}))
    beyond = study_privacy(study)
    assert beyond.mode == "fixed" and any("more trials than that" in note for note in beyond.notes)
    assert beyond.training_epsilon == pytest.approx(account([run] * 4, mode="fixed", delta=DELTA)[1], rel=1e-9)


# M11i: the result's own check -----------------------------------------------------------------------------------
def test_a_result_that_spent_more_than_its_target_is_refused():
    from dpnas.arch.space import ConfigError

    with pytest.raises(ConfigError, match="exceeds the target"):
        train_module.check_result_privacy({"private": True, "epsilon_spent": 4.1, "epsilon_target": 4.0})
    train_module.check_result_privacy({"private": True, "epsilon_spent": 4.0, "epsilon_target": 4.0})

"""Private selection (issue 15): noisy validation scores, their accounting, studies at a total ε, the honest report.

Each test would fail if the property it names broke: noise missing or of the wrong scale, a release not
counted, a calibration above (or far below) its budget, an exact validation score reaching the sampler, the
pruner, the choice of the best or the dashboard, or a budget silently changed on an existing study.
"""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import optuna
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from optuna.trial import TrialState
from scipy.stats import norm
from search_helpers import write_study

import dpnas.dp.train as train_module
import dpnas.search.runner as runner
from dpnas.arch.registry import MODELS
from dpnas.arch.space import ConfigError
from dpnas.cli import main
from dpnas.data.datasets import load_dataset
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.privacy import ORDERS, count_noise_for, count_rdp, noisy_accuracy, plan_privacy, rdp_to_epsilon
from dpnas.dp.recipe_file import load_recipe_file
from dpnas.dp.train import count_correct, train
from dpnas.search.calibration import calibrate, run_shapes
from dpnas.search.runner import best_trials, search
from dpnas.search.storage import open_storage
from dpnas.search.study_file import OBJECTIVES, load_study_file
from dpnas.search.study_privacy import CALIBRATION_ATTR as _CALIBRATION
from dpnas.search.study_privacy import RunPrivacy, account, study_privacy
from dpnas.search.weights import _ARTIFACT

DELTA = 1e-5
TINY = MODELS["tiny"].arch


def load(spec):
    return optuna.load_study(study_name=spec.name, storage=open_storage(spec.default_storage()))


# ------------------------------------------------------------------ the Gaussian mechanism on a count


def test_noisy_accuracy_has_the_stated_noise():
    generator = torch.Generator().manual_seed(0)
    correct, total, s = torch.tensor(120), 400, 6.0
    draws = np.array([noisy_accuracy(correct, total, s, generator=generator) for _ in range(4000)])
    errors = draws * total - 120
    # mean 0 and std s: 4000 draws put the sample mean within 4 s/sqrt(n) and the std within 5 %
    assert abs(errors.mean()) < 4 * s / math.sqrt(len(draws))
    assert errors.std() == pytest.approx(s, rel=0.05)
    assert not np.any(draws == 120 / total)  # never the exact value
    # Gaussian, not some other law of the same variance: its quartiles
    assert np.quantile(errors, 0.75) == pytest.approx(norm.ppf(0.75) * s, rel=0.08)
    assert noisy_accuracy(correct, total, 0.0, generator=generator) == 120 / total  # noise 0: exact (reported so)


def test_count_noise_is_calibrated_to_the_run_budget():
    for epsilon, releases in ((8.0, 8), (3.0, 30), (1.0, 1)):
        s = count_noise_for(epsilon, DELTA, releases)
        assert rdp_to_epsilon(count_rdp(s, releases), DELTA) <= epsilon
        assert rdp_to_epsilon(count_rdp(s * 0.99, releases), DELTA) > epsilon  # the smallest such noise, to 1 %
    plan = plan_privacy(PrivacyConfig(epsilon=3.0), dataset_size=1000, batch_size=100, epochs=5)
    assert plan.val_releases == 5 and plan.val_noise == count_noise_for(3.0, DELTA, 5)
    assert plan_privacy(PrivacyConfig(epsilon=math.inf), dataset_size=1000, batch_size=100, epochs=5).val_noise == 0
    assert plan_privacy(PrivacyConfig(val_noise=2.5), dataset_size=1000, batch_size=100, epochs=5).val_noise == 2.5
    with pytest.raises(ConfigError, match="val_noise"):
        PrivacyConfig(val_noise=-1.0)
    with pytest.raises(ConfigError, match="val_noise"):
        PrivacyConfig(val_noise="loud")


def test_training_releases_only_noisy_validation_scores_of_the_stated_scale():
    """A frozen model (learning rate 1e-12) has one exact validation count for every epoch: the released scores
    scatter around it with the configured std, and the exact loss is withheld."""
    data = load_dataset("synthetic", synthetic_size=600, val_fraction=0.5, seed=0, image_size=8)
    s, epochs = 8.0, 40
    trained = []
    result = train(TINY, data, train_cfg=TrainConfig(epochs=epochs, batch_size=100, physical_batch_size=100,
                                                     optimizer="sgd", lr=1e-12),
                   privacy=PrivacyConfig(epsilon=8.0, val_noise=s), progress=False, on_trained=trained.append)
    exact, _ = count_correct(trained[0], data.val, data.to("cpu"), batch_size=256)
    released = np.array([h["val_accuracy"] for h in result["history"]]) * len(data.val)
    errors = released - float(exact)
    assert len(errors) == epochs == result["val_releases"] and result["val_noise"] == s
    assert not np.any(errors == 0)
    # 40 draws: the sample std lies within [0.6 s, 1.45 s] with probability > 0.999 (chi-square, 39 df)
    assert 0.6 * s < errors.std(ddof=1) < 1.45 * s
    assert abs(errors.mean()) < 4 * s / math.sqrt(epochs)
    assert all(math.isnan(h["val_loss"]) for h in result["history"])  # exact loss: not released


# ------------------------------------------------------------------ the bound, against independent computations


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε of one Gaussian mechanism (sensitivity 1, std sigma) at δ (Balle & Wang 2018), by bisection."""
    def delta_at(eps):
        return norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


def test_the_combined_bound_equals_hand_computed_values():
    runs = [RunPrivacy(noise_multiplier=1.1, sample_rate=0.05, steps=200, val_noise=5.0, val_releases=10)] * 4
    mode, training, validation, per_run, _ = account(runs, mode="fixed", delta=DELTA)
    # training records: Opacus's own RDP of the subsampled Gaussian, composed 4 times, converted by Opacus
    by_hand = get_privacy_spent(orders=ORDERS, rdp=4 * np.array(compute_rdp(q=0.05, noise_multiplier=1.1, steps=200,
                                                                            orders=ORDERS)), delta=DELTA)[0]
    assert training == pytest.approx(by_hand, rel=1e-9)
    # validation records: 40 Gaussian releases of std 5 = one Gaussian of std 5/sqrt(40); RDP λ/(2σ²)
    assert validation == pytest.approx(get_privacy_spent(orders=ORDERS, rdp=40 * ORDERS / 50, delta=DELTA)[0], rel=1e-9)
    # ... which lies between the exact ε of that Gaussian (a lower bound) and the zCDP conversion (an upper bound)
    rho = 40 / (2 * 25)
    assert _analytic_gaussian_epsilon(5 / math.sqrt(40), DELTA) <= validation <= rho + 2 * math.sqrt(rho * math.log(1 / DELTA))
    assert mode == "fixed" and per_run == max(
        get_privacy_spent(orders=ORDERS, rdp=np.array(compute_rdp(q=0.05, noise_multiplier=1.1, steps=200,
                                                                  orders=ORDERS)), delta=DELTA)[0],
        get_privacy_spent(orders=ORDERS, rdp=10 * ORDERS / 50, delta=DELTA)[0])


# Computed once by benchmarks/oracle_dp_accounting.py with Google's dp_accounting 0.6.0 in a throwaway environment.
DP_ACCOUNTING = {
    "fixed": (8.868833024586229, 6.2083564483459375),
    "truncated_negative_binomial": (7.1118549523928, 4.908540272371418),
    "poisson": (6.747734008664397, 4.625802107336709),
}


@pytest.mark.parametrize("mode", DP_ACCOUNTING)
def test_the_combined_bound_matches_dp_accounting(mode):
    """Training and validation parts of 4 runs (fixed) or the best of K with mean 5 (random), against an
    independent implementation of the same bounds: agreement to 0.5 % (the two codes' RDP series differ in the
    last digits)."""
    run = RunPrivacy(noise_multiplier=1.1, sample_rate=0.05, steps=200, val_noise=5.0, val_releases=10)
    runs = [run] * 4 if mode == "fixed" else [run]
    _, training, validation, _, _ = account(runs, mode=mode, delta=DELTA, mu=5.0, eta=1.0, gamma=0.2)
    assert (training, validation) == pytest.approx(DP_ACCOUNTING[mode], rel=5e-3)


@pytest.mark.parametrize("mode,extra", [("fixed", {"runs": 6}),
                                        ("truncated_negative_binomial", {"runs": None, "eta": 1.0, "gamma": 0.2}),
                                        ("poisson", {"runs": None, "mu": 5.0})])
def test_total_epsilon_calibration_meets_the_budget(mode, extra):
    total = 4.0
    c = calibrate(total, DELTA, mode=mode, shapes=[(64, 3), (128, 3)], train_size=1000, **extra)
    for part in (c.training_epsilon, c.validation_epsilon):
        assert 0.97 * total <= part <= total
    # recomputed from scratch: the runs the study will train, with their calibrated σ and the validation noise
    runs = [RunPrivacy(c.noise_multipliers[f"batch_size={b},epochs=3"], b / 1000, 3 * round(1000 / b),
                       c.val_noise, c.val_releases) for b in (64, 128)]
    k = extra.get("runs") or 1
    worst = [runs[0]] * k if mode == "fixed" else runs  # fixed: K runs of either shape; the bound takes the max
    _, training, validation, _, _ = account(worst, mode=mode, delta=DELTA, mu=extra.get("mu"), eta=extra.get("eta"),
                                            gamma=extra.get("gamma"))
    assert training <= total and validation <= total
    if mode == "fixed":  # K runs of the other shape also fit
        _, training, _, _, _ = account([runs[1]] * k, mode=mode, delta=DELTA)
        assert training <= total


def test_an_impossible_total_is_refused_before_any_run():
    with pytest.raises(ConfigError):
        calibrate(4.0, DELTA, mode="fixed", runs=3, shapes=[(2000, 3)], train_size=1000)


# ------------------------------------------------------------------ studies


def _tiny(tmp_path, *, privacy="epsilon = 4.0", n_trials=2, epochs=2, **kwargs):
    path = write_study(tmp_path, n_trials=n_trials, epochs=epochs, **kwargs)
    path.write_text(path.read_text().replace("epsilon = 4.0", privacy))
    return path


def test_every_released_score_is_noisy_and_every_release_is_accounted(tmp_path, monkeypatch):
    """The sampler, the pruner, the dashboard and the choice of the best read trial values, intermediate values and
    user attributes: none of them holds an exact validation score, and the report counts every one released."""
    exact = []
    real = train_module.count_correct

    def spy(model, split, data, **kwargs):
        correct, loss = real(model, split, data, **kwargs)
        if split is data.val:
            exact.append(float(correct) / len(split))
        return correct, loss

    monkeypatch.setattr(train_module, "count_correct", spy)
    spec = load_study_file(_tiny(tmp_path, n_trials=3, epochs=3, pruner="median"))
    search(spec, progress=False)
    study = load(spec)
    released = []
    for t in study.get_trials():
        if "privacy_plan" not in t.user_attrs:
            continue
        released += list(t.intermediate_values.values())
        if t.state == TrialState.COMPLETE:
            assert t.values[0] == t.intermediate_values[max(t.intermediate_values)] == t.user_attrs["val_accuracy"]
            assert len(t.intermediate_values) == t.user_attrs["privacy_plan"]["val_releases"]
        assert len(t.intermediate_values) <= t.user_attrs["privacy_plan"]["val_releases"]  # pruned: charged in full
    assert released and not set(released) & set(exact)
    note = study.user_attrs.get("note", "") + json.dumps([t.user_attrs for t in study.get_trials()])
    # Scores whose repr is short (0, 0.5, 1 of 262 records) are also settings (width 0.5) or the text of longer
    # numbers; the train and search seeds are secret, so such a score turns up in some runs. Every other exact
    # score has a 16-digit repr that can only be found in the note if it leaked.
    assert not any(f"{e!r}" in note for e in exact if len(repr(e)) > 8)
    report = study_privacy(study)
    assert report.budget["val_releases"] == sum(t.user_attrs["privacy_plan"]["val_releases"]
                                                for t in study.get_trials() if "privacy_plan" in t.user_attrs)
    # the best trial is the best *released* score
    best = best_trials(study)[0]
    assert best.values[0] == max(t.values[0] for t in study.get_trials(states=(TrialState.COMPLETE,)))


def test_no_objective_reads_the_test_split():
    assert not any("test" in name for name in OBJECTIVES)


def test_a_test_objective_is_refused(tmp_path):
    path = _tiny(tmp_path)
    path.write_text(path.read_text().replace('seed = 0', 'seed = 0\nobjectives = ["test_accuracy"]'))
    with pytest.raises(ConfigError, match="unknown objective 'test_accuracy'"):
        load_study_file(path)


def test_selection_ignores_the_stored_test_accuracy():
    """The best trial is the best noisy validation score, whatever the stored test accuracies say."""
    study = optuna.create_study(direction="maximize")
    for value, test in ((0.9, 0.1), (0.8, 0.99), (0.85, 0.5)):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"test_accuracy": test,
                                                                           "val_accuracy": value}))
    assert [t.values[0] for t in best_trials(study)] == [0.9]


def test_a_total_epsilon_study_spends_at_most_its_total(tmp_path, capsys):
    path = _tiny(tmp_path, privacy="total_epsilon = 6.0", n_trials=2, epochs=2)
    spec = load_study_file(path)
    assert spec.total_epsilon == 6.0 and run_shapes(spec) == [(256, 2)]
    search(spec, progress=False)
    study = load(spec)
    sigmas = {t.user_attrs["privacy_plan"]["noise_multiplier"] for t in study.get_trials()}
    assert len(sigmas) == 1 and sigmas.pop() > 0
    assert main(["privacy", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("epsilon", "delta", "mode", "runs", "per_run_epsilon", "validation_epsilon", "covers"):
        assert key in report
    assert report["mode"] == "fixed" and report["runs"] == 2
    assert 0.97 * 6.0 <= report["epsilon"] <= 6.0 and report["validation_epsilon"] <= 6.0
    assert runner.exhausted_message(study) is None  # a study that simply finished has nothing to explain
    assert [c["records"] for c in report["covers"]] == ["training", "validation", "dataset (training + validation)"]
    assert report["covers"][1]["count"] == study.get_trials()[0].user_attrs["val_size"]
    assert report["budget"]["total_epsilon"] == 6.0
    with pytest.raises(ConfigError, match="--n-trials"):  # more runs would spend more than the total
        search(spec, n_trials=4, progress=False)
    capsys.readouterr()
    # `search --check` says so too (it said "ready to search"), and so does an edited file, without suggesting
    # the --n-trials that would be refused next
    assert main(["search", str(path), "--n-trials", "4", "--check"]) == 2
    assert "split its total_epsilon = 6 over 2 trials" in capsys.readouterr().err
    path.write_text(path.read_text().replace("n_trials = 2", "n_trials = 4"))
    for argv in (["search", str(path), "--check"], ["search", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "n_trials changed from 2 to 4" in err and "Restore n_trials = 2" in err and "--n-trials 4" not in err
    path.write_text(path.read_text().replace("n_trials = 4", "n_trials = 2"))
    assert sum(t.state == TrialState.COMPLETE for t in load(spec).get_trials()) == 2  # nothing ran
    # the exported recipe trains at the calibrated noise, not at a budget recalibrated from scratch
    out = tmp_path / "best.toml"
    assert main(["best", str(path), "--out", str(out)]) == 0
    recipe = load_recipe_file(out)
    best = best_trials(study)[0]
    assert recipe.privacy.noise_multiplier == best.user_attrs["privacy_plan"]["noise_multiplier"]
    assert recipe.privacy.val_noise == best.user_attrs["privacy_plan"]["val_noise"] > 0


def interrupt_the_first_run_after_its_plan(monkeypatch) -> list[int]:
    """The search's first run records its privacy plan (it has touched the data) and is then stopped by Ctrl-C
    before it writes a resume state: its retry trains afresh. Returns the list of `train` calls."""
    real, calls = runner.train, []

    def interrupted_once(*args, on_plan=None, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            on_plan(plan_privacy(kwargs["privacy"], dataset_size=len(args[1].train), batch_size=256, epochs=1))
            raise KeyboardInterrupt
        return real(*args, on_plan=on_plan, **kwargs)

    monkeypatch.setattr(runner, "train", interrupted_once)
    return calls


def test_a_total_epsilon_study_never_runs_past_its_total(tmp_path, monkeypatch):
    """A run that touched the data and was then interrupted is charged; its retry is one of the K runs, so the
    study ends one trial short instead of spending more than its total."""
    spec = load_study_file(_tiny(tmp_path, privacy="total_epsilon = 6.0", n_trials=2, epochs=1))
    interrupt_the_first_run_after_its_plan(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        search(spec, progress=False)
    search(spec, progress=False)  # resume: the retry trains, then the budget is spent
    study = load(spec)
    assert runner.runs_charged(study) == 2 and "total_epsilon = 6 is spent" in runner.exhausted_message(study)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 1
    assert study_privacy(study).epsilon <= 6.0


def test_a_random_count_study_never_runs_more_runs_than_it_drew(tmp_path, monkeypatch, capsys):
    """Papernot & Steinke bound the best of the K runs drawn in secret, a stopped one among them: a retry that trains
    afresh (no state to continue) would be run K + 1, which the bound does not cover. The study ends with its K runs,
    and its end line does not print K."""
    from dpnas.search.study_privacy import TRIAL_TARGET_ATTR
    from dpnas.search.study_state import open_study

    spec = load_study_file(_tiny(tmp_path, sampler="random", epochs=1, extra='trial_count = "poisson"\n'
                                 'mean_trials = 2.0\nkeep_weights = "none"'))
    study = open_study(spec, spec.default_storage())
    study._storage.set_study_system_attr(study._study_id, TRIAL_TARGET_ATTR, 2)  # as if K = 2 had been drawn
    calls = interrupt_the_first_run_after_its_plan(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        search(spec, progress=False)
    search(spec, progress=False)  # resume: the retry trains afresh (run 2 of 2); no third run
    study = load(spec)
    assert len(calls) == 2 and runner.runs_charged(study) == 2
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 1
    assert "drew in secret" in runner.exhausted_message(study) and "2" not in runner.exhausted_message(study)
    assert study_privacy(study).mode == "poisson"  # the best of the 2 drawn runs, as the bound is about


def test_the_spent_line_counts_the_runs_that_touched_the_data_not_one_about_to():
    """`runs_charged` counts a RUNNING trial that has not recorded its plan yet (another worker must see it); the end
    line counted it too and said "3 runs have touched the data, the 2 the budget was split over"."""
    from dpnas.search.checks import runs_recorded

    study = optuna.create_study(direction="maximize")
    plan = {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 200, "val_noise": 5.0, "val_releases": 10}
    for number in range(2):
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"privacy_plan": {**plan, "trial": number}}))
    study.ask()  # a worker's trial, about to record its plan
    assert runner.runs_charged(study) == 3 and runs_recorded(study) == 2


def test_more_trials_for_a_study_that_spent_nothing_split_its_total_again(tmp_path):
    """A study created (and calibrated) for 2 runs that spent nothing may be resumed with --n-trials 3: its noise
    is derived again for 3 runs. It used to keep the noise for 2 and spend more than its total."""
    from dpnas.search.study_state import open_study, study_calibration

    path = _tiny(tmp_path, privacy="total_epsilon = 6.0", n_trials=2, epochs=1)
    spec = load_study_file(path)
    study = open_study(spec, spec.default_storage())  # created and calibrated, then stopped before any trial
    assert study_calibration(study, spec, 1152).runs == 2
    search(spec, n_trials=3, progress=False)
    study = load(spec)
    assert runner.runs_charged(study) == 3 and len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    assert study_privacy(study).epsilon <= 6.0
    # a stored calibration for another count is derived again while nothing is spent, refused once runs are charged
    assert study_calibration(study, spec, 1152).runs == 3
    runner._set_system_attr(study, _CALIBRATION, {**runner._system_attrs(study)[_CALIBRATION], "runs": 2})
    with pytest.raises(ConfigError, match="over 2 runs and has spent some of it"):
        study_calibration(study, spec, 1152)


def _charged_then_interrupted(spec, monkeypatch) -> None:
    """Trial 0 records its privacy plan (it touched the data), then Ctrl-C: charged, and queued for a retry."""
    real_train = runner.train

    def interrupted(*args, on_plan=None, **kwargs):
        on_plan(plan_privacy(kwargs["privacy"], dataset_size=len(args[1].train), batch_size=256, epochs=1))
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(spec, progress=False)
    monkeypatch.setattr(runner, "train", real_train)


def test_a_second_worker_counts_the_run_another_worker_is_starting(tmp_path, monkeypatch):
    """Once a charged run was retried, the slots no longer count the runs: a worker that took a slot between
    another worker's `ask` and that trial's privacy plan used to start one run too many (4 runs for a total split
    over 3). Two workers are interleaved by hand: B takes its turn right after A asked its trial."""
    spec = load_study_file(_tiny(tmp_path, privacy="total_epsilon = 6.0", n_trials=3, epochs=1))
    real_run_trial = runner.run_trial
    _charged_then_interrupted(spec, monkeypatch)
    search(spec, timeout=0.1, progress=False)  # the retry (trial 1) runs
    assert runner.runs_charged(load(spec)) == 2
    seen = []

    def worker_b_takes_its_turn(study, trial, *args, **kwargs):
        if not seen:
            seen.append(runner.runs_charged(study))
            runner.run_worker(spec, spec.default_storage(), worker_index=1, progress=False)
        return real_run_trial(study, trial, *args, **kwargs)

    monkeypatch.setattr(runner, "run_trial", worker_b_takes_its_turn)
    search(spec, progress=False)
    study = load(spec)
    assert seen == [3]  # A's trial counts before its plan is written
    assert runner.runs_charged(study) == 3 and study_privacy(study).epsilon <= 6.0
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2  # one run was the interrupted one


def test_ctrl_c_while_a_trained_trial_is_recorded_stops_the_search_after_recording_it(tmp_path, monkeypatch):
    """A trial that trained to its end has spent its budget and released its scores: a Ctrl-C landing while its
    weights or state are written used to leave it RUNNING, and the resumed study retrained it as an orphan."""
    import os
    import signal

    spec = load_study_file(_tiny(tmp_path, privacy="total_epsilon = 6.0", n_trials=2, epochs=1))
    real_keep = runner.keep_trial_weights

    def keep_then_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, in the middle of recording
        return real_keep(*args, **kwargs)

    monkeypatch.setattr(runner, "keep_trial_weights", keep_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        search(spec, progress=False)
    trials = load(spec).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] and _ARTIFACT in trials[0].user_attrs
    monkeypatch.setattr(runner, "keep_trial_weights", real_keep)
    search(spec, progress=False)  # resumed: trial 0 is kept, one more trains
    study = load(spec)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2 and runner.runs_charged(study) == 2
    assert study.get_trials()[0].state == TrialState.COMPLETE  # not failed as an orphan
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_retry_whose_worker_died_before_it_trained_is_not_charged(tmp_path, monkeypatch):
    """Optuna's retry of a failed trial carries a copy of the original's privacy plan. A worker killed right after
    it took the retry, before the retry recorded its own plan (it never touched the data), left a FAIL trial that
    was charged as a run: `dpnas privacy` counted the original's run twice, and the total-ε study stopped one run
    short with "total_epsilon is spent"."""
    import os
    import socket

    from dpnas.search.study_state import _recover_orphans

    spec = load_study_file(_tiny(tmp_path, privacy="total_epsilon = 6.0", n_trials=3, epochs=1))
    _charged_then_interrupted(spec, monkeypatch)
    study = load(spec)
    retry = study.ask()  # a worker takes the retry (trial 1) ...
    assert retry.number == 1 and "privacy_plan" in retry.user_attrs  # the original's, copied
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    retry.set_user_attr("worker", f"{socket.gethostname()}:{dead}")  # ... records itself, and is killed
    _recover_orphans(study, spec)
    study = load(spec)
    assert study.get_trials()[1].state == TrialState.FAIL
    assert runner.runs_charged(study) == 1 and study_privacy(study).runs == 1  # trial 0 only
    search(spec, progress=False)
    study = load(spec)
    # the three runs the total was split over: trial 0 (interrupted) and two that completed
    assert runner.runs_charged(study) == 3 and len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert study_privacy(study).runs == 3 and study_privacy(study).epsilon <= 6.0


def test_only_a_plan_copied_from_a_retried_trial_goes_uncharged():
    """A plan is a retry's inherited copy only where it names a trial of that retry's history; one that cannot be
    told apart (an older version's, without a name; numbers changed by copying the study) is charged."""
    from optuna.trial import create_trial

    from dpnas.search.study_privacy import own_privacy_plan

    def trial(number, plan, state=TrialState.FAIL, history=None):
        made = create_trial(state=state, user_attrs={"privacy_plan": plan},
                            system_attrs={} if history is None else {"retry_history": history, "failed_trial": 0})
        made.number = number
        return made

    plan = {"trial": 0, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}
    assert own_privacy_plan(trial(0, plan)) == plan  # the original's own
    assert own_privacy_plan(trial(1, plan, history=[0])) is None  # its retry, killed before it trained
    assert own_privacy_plan(trial(2, plan, history=[0, 1])) is None  # a retry of the retry
    assert own_privacy_plan(trial(1, dict(plan, trial=1), history=[0])) is not None  # the retry's own plan
    assert own_privacy_plan(trial(7, plan)) == plan  # renumbered by a copy: charged, not dropped
    old = {k: v for k, v in plan.items() if k != "trial"}
    assert own_privacy_plan(trial(1, old, history=[0])) == old  # an older version's plan: charged, as before
    assert own_privacy_plan(trial(1, plan, state=TrialState.WAITING, history=[0])) is None  # has not run


def test_a_crash_before_a_better_trial_completes_keeps_the_weights_it_displaces(tmp_path, monkeypatch):
    """The weights a finished trial displaces (keep_weights = "best") were removed before that trial was told
    COMPLETE: a worker killed in between left the study's best finished trial without weights (`dpnas best
    --weights` refused it), while the displacing trial was failed as an orphan and trained again, maybe worse."""
    from dpnas.search.weights import open_store, study_location, weights_available

    spec = load_study_file(_tiny(tmp_path, n_trials=2, epochs=1))
    real_keep = runner.keep_trial_weights

    class Killed(BaseException):
        """The worker's SIGKILL, as far as this process can tell"""

    def better_then_killed(study, trial, checkpoint, *, values, **kwargs):
        if trial.number == 0:
            return real_keep(study, trial, checkpoint, values=values, **kwargs)
        real_keep(study, trial, checkpoint, values=[2.0], **kwargs)  # better than any accuracy
        raise Killed

    monkeypatch.setattr(runner, "keep_trial_weights", better_then_killed)
    with pytest.raises(Killed):
        search(spec, progress=False)
    study = load(spec)
    first, second = study.get_trials()
    assert first.state == TrialState.COMPLETE and second.state == TrialState.RUNNING  # lost, to be retrained
    assert weights_available(study, first)  # the best finished trial still has its weights, file included
    store = open_store(study_location(study, spec.default_storage()))
    with store.open_reader(first.user_attrs[_ARTIFACT]) as reader:
        assert reader.read(1)


def test_validation_noise_off_is_reported_as_unprotected(tmp_path, capsys):
    path = _tiny(tmp_path, privacy="epsilon = 4.0\nval_noise = 0", n_trials=1, epochs=1)
    search(load_study_file(path), progress=False)
    assert main(["privacy", str(path)]) == 0
    out = capsys.readouterr().out
    assert "validation records are not protected" in out
    report = study_privacy(load(load_study_file(path)))
    assert math.isinf(report.validation_epsilon) and math.isinf(report.epsilon)
    assert math.isfinite(report.training_epsilon)


def test_changing_the_budget_of_a_study_is_refused(tmp_path):
    path = _tiny(tmp_path, n_trials=1, epochs=1)
    search(load_study_file(path), progress=False)
    path.write_text(path.read_text().replace("epsilon = 4.0", "epsilon = 8.0"))
    with pytest.raises(ConfigError, match="epsilon 4.0 → 8.0.*would mix budgets"):
        search(load_study_file(path), progress=False)
    path.write_text(path.read_text().replace("epsilon = 8.0", "total_epsilon = 8.0"))
    with pytest.raises(ConfigError, match="total_epsilon None → 8.0.*would mix budgets"):
        search(load_study_file(path), progress=False)


def test_a_budget_may_change_while_nothing_is_spent(tmp_path):
    path = _tiny(tmp_path, privacy="total_epsilon = 0.001", n_trials=1, epochs=1)
    with pytest.raises(ConfigError):  # no noise level reaches it: refused before the study is even created
        search(load_study_file(path), progress=False)
    spec = load_study_file(path)
    assert not path.with_suffix(".journal").exists()
    # created by a worker that calibrates later (as with several workers): still changeable while nothing is spent
    runner.open_study(spec, spec.default_storage())
    assert not load(spec).get_trials()
    path.write_text(path.read_text().replace("total_epsilon = 0.001", "total_epsilon = 5.0"))
    search(load_study_file(path), progress=False)
    assert study_privacy(load(spec)).epsilon <= 5.0


@pytest.mark.parametrize("privacy,search_extra,study_extra,message", [
    ("total_epsilon = 4.0\nepsilon = 2.0", "", "", "privacy.epsilon"),
    ("total_epsilon = 4.0", "epsilon = [1.0, 2.0]", "", "search.epsilon"),
    ("total_epsilon = 4.0\naccountant = \"prv\"", "", "", "privacy.accountant"),
    ("total_epsilon = 4.0\nval_noise = 3.0", "", "", "privacy.val_noise"),
    ("total_epsilon = inf", "", "", "privacy.total_epsilon"),
    ("total_epsilon = 4.0", "", 'trial_count = "poisson"\nmean_trials = 3.0', "study.sampler"),
])
def test_bad_total_epsilon_files_are_refused(tmp_path, privacy, search_extra, study_extra, message):
    path = _tiny(tmp_path, privacy=privacy, extra=study_extra)
    if search_extra:
        path.write_text(path.read_text() + search_extra + "\n")
    with pytest.raises(ConfigError, match=message):
        load_study_file(path)


def test_the_validation_records_of_old_studies_read_as_unprotected():
    """A privacy plan written before scores were noisy has no val_* fields: its scores were exact."""
    from dpnas.search.study_privacy import run_privacy

    run = run_privacy({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10})
    assert run.val_noise == 0 and run.val_releases == 1
    _, training, validation, _, _ = account([run], mode="fixed", delta=DELTA)
    assert math.isfinite(training) and math.isinf(validation)


def test_statistics_of_default_runs_are_not_reproducible_from_the_record(tmp_path):
    """Two default-mode private runs with the same seed release different validation noise."""
    data = load_dataset("synthetic", synthetic_size=300, val_fraction=0.5, seed=0, image_size=8)
    cfg = TrainConfig(epochs=3, batch_size=50, physical_batch_size=50, lr=1e-12)
    a, b = (train(TINY, data, train_cfg=cfg, privacy=PrivacyConfig(epsilon=8.0, val_noise=5.0), progress=False)
            for _ in range(2))
    assert [h["val_accuracy"] for h in a["history"]] != [h["val_accuracy"] for h in b["history"]]
    seeded = [train(TINY, data, train_cfg=cfg, privacy=PrivacyConfig(epsilon=8.0, val_noise=5.0, reproducible=True),
                    progress=False) for _ in range(2)]
    assert statistics.mean(h["val_accuracy"] for h in seeded[0]["history"]) == \
        statistics.mean(h["val_accuracy"] for h in seeded[1]["history"])


def test_a_random_number_of_runs_trains_a_repeated_draw(tmp_path):
    """Papernot & Steinke's bound is for runs drawn independently from one distribution: a random-K search that
    turned repeats away drew its runs without replacement. Two points, K = 3: a repeat must train."""
    from dpnas.search.study_privacy import TRIAL_TARGET_ATTR
    from dpnas.search.study_state import open_study

    path = _tiny(tmp_path, n_trials=2, epochs=1, sampler="random", extra='trial_count = "poisson"\nmean_trials = 2.0')
    path.write_text(path.read_text().replace('activation = ["selu", "relu", "mish"]', 'activation = ["relu"]'))
    spec = load_study_file(path)
    study = open_study(spec, spec.default_storage())
    study._storage.set_study_system_attr(study._study_id, TRIAL_TARGET_ATTR, 3)  # as if K = 3 had been drawn
    search(spec, progress=False)
    trials = load(spec).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 and not any("duplicate_of" in t.user_attrs
                                                                             for t in trials)
    assert len({t.user_attrs["config_key"] for t in trials}) < 3
    assert study_privacy(load(spec)).mode == "poisson"


def test_validations_alone_export_the_run_the_trial_trained(tmp_path):
    """[fidelity] validations alone train the target itself: its recipe is the trained run, at its calibrated noise
    (the placeholder budget with noise 0 used to be exported), its validation noise derived for every epoch."""
    from dpnas.search.study_report import trial_recipe

    path = _tiny(tmp_path, privacy="total_epsilon = 6.0", n_trials=1, epochs=2)
    path.write_text(path.read_text() + "\n[fidelity]\nvalidations = 1\n")
    search(load_study_file(path), progress=False)
    study = load(load_study_file(path))
    trial = study.get_trials()[0]
    recipe = trial_recipe(study, trial)
    assert recipe.privacy.noise_multiplier == trial.user_attrs["privacy_plan"]["noise_multiplier"] > 0
    assert recipe.privacy.epsilon == trial.user_attrs["privacy_config"]["epsilon"] < 6.0
    assert recipe.privacy.val_noise == "auto" and recipe.train.epochs == 2

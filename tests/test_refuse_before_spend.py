"""Refuse before spending (issue 16): what would fail every trial is refused before a trial takes a slot.

Each case runs the real CLI and checks three things: exit status 2, one line on stderr naming the problem, and
nothing spent: no study storage created (or, for an existing study, no new trial).
"""

from __future__ import annotations

import multiprocessing
import os

import optuna
import pytest
from search_helpers import write_study

import dpnas.search.runner as runner
from dpnas.arch.registry import MODELS
from dpnas.arch.space import ConfigError
from dpnas.cli import main
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.preflight import preflight
from dpnas.dp.train import check_device
from dpnas.search.runner import WorkersFailed, check_search, join_workers, search
from dpnas.search.storage import open_storage
from dpnas.search.study_file import load_study_file


def _refused(capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as exit:  # refused by the parser itself, as a bad flag value is
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    return err


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


def test_check_runs_the_checks_and_spends_nothing(tmp_path, capsys):
    path = write_study(tmp_path, n_trials=1)
    assert main(["search", str(path), "--check", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "preflight" in out and "ready to search" in out and "1152 training" in out
    assert not path.with_suffix(".journal").exists()  # no study created, nothing trained


@pytest.mark.parametrize("argv,match", [
    (["--device", "cudaa"], "not a device"),
    (["--study-name", " "], "--study-name"),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"], "--device"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "-5"], "--timeout"),
    (["--n-trials", "0"], "--n-trials"),
    (["--workers", "0"], "--workers"),
])
def test_bad_flags_are_refused_before_a_study_exists(tmp_path, capsys, argv, match):
    path = write_study(tmp_path, n_trials=1)
    _refused(capsys, ["search", str(path), "--quiet", *argv], match)
    assert not path.with_suffix(".journal").exists()


@pytest.mark.parametrize("old,new,match", [
    ("delta = 1e-5", "delta = 0.001", "delta: 0.001 >= 1/n"),  # δ against the real training split (1152 records)
    ("val_fraction = 0.2", "val_fraction = 0.0", "val_fraction"),  # the objective needs a validation split
    ("physical_batch_size = 256", "physical_batch_size = 256\namp = true\nper_sample = \"opacus\"", "preflight"),
    ("physical_batch_size = 256", "physical_batch_size = 256\nchannels_last = true\nper_sample = \"opacus\"",
     "preflight"),
    # a fixed noise multiplier that overspends epsilon (or whose accounting overflows) failed every trial, each
    # taking a slot: the first point is planned before the study exists
    ("delta = 1e-5", "delta = 1e-5\nnoise_multiplier = 0.1", "noise_multiplier: 0.1 over"),
    ("delta = 1e-5", "delta = 1e-5\nnoise_multiplier = 1e308", "noise_multiplier: must be from 0"),
])
def test_what_would_fail_every_trial_is_refused_before_any(tmp_path, capsys, old, new, match):
    path = _edit(write_study(tmp_path, n_trials=2), old, new)
    _refused(capsys, ["search", str(path), "--quiet"], match)
    assert not path.with_suffix(".journal").exists()


def test_editing_data_or_objectives_of_a_study_is_refused(tmp_path, capsys):
    path = write_study(tmp_path, n_trials=1)
    assert main(["search", str(path), "--quiet"]) == 0
    _edit(path, "val_fraction = 0.2", "val_fraction = 0.3")
    _refused(capsys, ["search", str(path), "--quiet", "--n-trials", "2"], "val_fraction 0.2 → 0.3")
    _edit(path, "val_fraction = 0.3", "val_fraction = 0.2")
    _edit(path, "seed = 0", 'seed = 0\nobjectives = ["val_accuracy", "params"]\n')
    _refused(capsys, ["search", str(path), "--quiet", "--n-trials", "2"], "objectives")
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(path.with_suffix(".journal"))))
    assert len(study.get_trials()) == 1  # nothing new was trained


@pytest.mark.parametrize("old,new,match", [
    ("width = { low = 0.5, high = 1.0, step = 0.5 }", "width = [0.5, 1.0]",
     "search.width {low 0.5, high 1, step 0.5} → [0.5, 1.0]"),  # a range became a list
    ('activation = ["selu", "relu", "mish"]', 'activation = ["selu", "relu", "mish", "elu"]',
     "search.activation ['selu', 'relu', 'mish'] → ['selu', 'relu', 'mish', 'elu']"),  # a choice added
    ('activation = ["selu", "relu", "mish"]', 'activation = ["relu", "selu", "mish"]', "search.activation"),
    ("width = { low = 0.5, high = 1.0, step = 0.5 }", "width = { low = 0.5, high = 1.0, log = true }",
     "search.width {low 0.5, high 1, step 0.5} → {low 0.5, high 1, log}"),
])
def test_a_search_space_optuna_cannot_mix_is_refused_before_a_trial_takes_a_slot(tmp_path, capsys, old, new, match):
    """Optuna keeps one distribution per parameter for a whole study; it used to refuse another only when a trial
    suggested it, with a traceback, leaving that trial running in the study."""
    path = write_study(tmp_path, n_trials=1)
    assert main(["search", str(path), "--quiet"]) == 0
    _edit(path, old, new)
    err = _refused(capsys, ["search", str(path), "--quiet", "--n-trials", "2"], match)
    assert "start a new study" in err
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(path.with_suffix(".journal"))))
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE]  # no slot taken


def test_a_search_space_optuna_can_mix_goes_on(tmp_path, capsys):
    """A range's bounds or step may change (Optuna keeps them per trial); an axis may be added or dropped."""
    path = write_study(tmp_path, n_trials=1)
    assert main(["search", str(path), "--quiet"]) == 0
    _edit(path, "width = { low = 0.5, high = 1.0, step = 0.5 }", 'width = { low = 0.5, high = 2.0, step = 0.25 }\n'
          'pool = ["max_smooth", "none"]')
    assert main(["search", str(path), "--quiet", "--n-trials", "2"]) == 0
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(path.with_suffix(".journal"))))
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 2


def _total_epsilon_study(tmp_path, n_trials):
    return _edit(write_study(tmp_path, n_trials=n_trials), "epsilon = 4.0", "total_epsilon = 8.0")


def test_a_run_shape_a_total_epsilon_study_was_not_calibrated_for_is_refused_before_a_trial_takes_a_slot(tmp_path,
                                                                                                      capsys):
    """The noise of a total-ε study is calibrated per (batch_size, epochs) when it is created: a trial of another
    shape used to take a slot and then stop the search ("not a run shape this study was calibrated for")."""
    path = _total_epsilon_study(tmp_path, n_trials=3)
    assert main(["search", str(path), "--quiet", "--timeout", "0.1"]) == 0  # one trial: runs are charged
    journal = str(path.with_suffix(".journal"))
    before = [t.state for t in optuna.load_study(study_name="tiny", storage=open_storage(journal)).get_trials()]
    _edit(path, "epochs = 1", "epochs = 2")
    _refused(capsys, ["search", str(path), "--quiet"],
             "run shapes: (batch_size=256,epochs=1) → (batch_size=256,epochs=2)")
    after = [t.state for t in optuna.load_study(study_name="tiny", storage=open_storage(journal)).get_trials()]
    assert after == before and optuna.trial.TrialState.RUNNING not in after  # no slot taken


def test_a_new_run_shape_is_calibrated_afresh_while_nothing_is_spent(tmp_path):
    from dpnas.search.study_state import open_study, study_calibration

    path = _total_epsilon_study(tmp_path, n_trials=2)
    url = str(path.with_suffix(".journal"))
    study = open_study(load_study_file(path), url)  # created and calibrated (as a worker does), nothing trained
    assert set(study_calibration(study, load_study_file(path), 1152).noise_multipliers) == {"batch_size=256,epochs=1"}
    _edit(path, "epochs = 1", "epochs = 2")
    study = search(load_study_file(path), progress=False)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.user_attrs["train_config"]["epochs"] == 2 for t in study.get_trials())


def test_a_worker_whose_budget_another_host_replaced_before_its_first_trial_trains_nothing(tmp_path, monkeypatch):
    """Two hosts on one storage: host A's worker joined the study and was still loading its data when host B
    joined with another epsilon. Nothing was charged yet, so B's budget replaced A's, and A then trained its trials
    at its own epsilon in B's study: two budgets in one result, the stored one wrong for A's trials."""
    from dpnas.search.study_state import open_study

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = load_study_file(write_study(tmp_path / "a", n_trials=2))
    b = load_study_file(_edit(write_study(tmp_path / "b", n_trials=2), "epsilon = 4.0", "epsilon = 8.0"))
    url = str(tmp_path / "shared.journal")
    load = runner.load_search_data

    def host_b_joins_meanwhile(*args, **kwargs):
        open_study(b, url)  # nothing is charged yet, so B's budget replaces A's
        return load(*args, **kwargs)

    monkeypatch.setattr(runner, "load_search_data", host_b_joins_meanwhile)
    with pytest.raises(ConfigError, match="epsilon 8.0 → 4.0"):
        runner.run_worker(a, url, progress=False)  # host A's worker: it joins, then loads the data
    assert optuna.load_study(study_name="tiny", storage=open_storage(url)).get_trials() == []  # A took no slot


def test_the_preflight_needs_no_data_and_catches_engine_combinations():
    arch = MODELS["tiny"].arch
    preflight(arch, TrainConfig(physical_batch_size=4), PrivacyConfig(), num_classes=10, in_channels=1, image_size=16,
              device="cpu")
    with pytest.raises(ConfigError, match="preflight.*amp"):
        preflight(arch, TrainConfig(physical_batch_size=4, amp=True, per_sample="opacus"), PrivacyConfig(),
                  num_classes=10, in_channels=1, image_size=16, device="cpu")
    with pytest.raises(ConfigError, match="preflight"):  # a shape the model cannot take
        preflight(arch, TrainConfig(physical_batch_size=4), PrivacyConfig(), num_classes=10, in_channels=1,
                  image_size=1, device="cpu")


def test_check_device():
    assert check_device("cpu").type == "cpu"
    for bad in ("cudaa", "tpu", "mps"):
        with pytest.raises(ConfigError, match="--device"):
            check_device(bad)


def test_a_dead_worker_is_reported():
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=os._exit, args=(code,)) for code in (0, 3)]
    for p in processes:
        p.start()
    with pytest.raises(WorkersFailed, match="worker 1 exited with status 3"):
        join_workers(processes)


def test_the_search_command_exits_non_zero_when_a_worker_died(tmp_path, capsys, monkeypatch):
    path = write_study(tmp_path, n_trials=1)

    def one_worker_died(spec, **kwargs):
        search(spec, progress=False, storage_url=kwargs["storage_url"])
        raise WorkersFailed("worker 1 exited with status -9")

    monkeypatch.setattr(runner, "search", one_worker_died)
    assert main(["search", str(path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "worker 1 exited with status -9" in captured.err and "trials finished" in captured.out


def test_more_cpu_workers_than_cores_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's cores; this process may run on 2 of them
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5})
    spec = load_study_file(write_study(tmp_path, n_trials=1))
    with pytest.warns(UserWarning, match="--workers 3 on 2 CPU cores"):
        check_search(spec, str(tmp_path / "x.journal"), workers=3, device="cpu")


def test_an_unwritable_storage_is_one_line(tmp_path, capsys):
    path = write_study(tmp_path, n_trials=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _refused(capsys, ["search", str(path), "--quiet", "--storage", str(blocker / "s.journal")], "cannot write there")


@pytest.mark.parametrize("extra,key", [('trial_count = "poisson"\nmean_trials = 1e9', "study.mean_trials"),
                                       ('trial_count = "truncated_negative_binomial"\neta = 1.0\ngamma = 1e-9',
                                        "study.gamma")])
def test_a_random_trial_count_too_large_to_draw_is_refused(tmp_path, extra, key):
    path = write_study(tmp_path, sampler="random", extra=extra)
    with pytest.raises(ConfigError, match=key):
        load_study_file(path)


def test_n_trials_for_an_ablation_is_refused_before_the_study_is_created(tmp_path, capsys):
    path = write_study(tmp_path, sampler="ablation")
    _refused(capsys, ["search", str(path), "--quiet", "--n-trials", "1"], "--n-trials: an ablation")
    assert not path.with_suffix(".journal").exists()


def test_a_width_whose_layers_overflow_is_refused_in_one_line(tmp_path, capsys):
    path = write_study(tmp_path, n_trials=1)
    _edit(path, "width = { low = 0.5, high = 1.0, step = 0.5 }", "width = { low = 1, high = 9223372036854775807 }")
    _refused(capsys, ["search", str(path), "--quiet"], "overflows 64 bits")
    assert not path.with_suffix(".journal").exists()


def test_the_largest_study_seed_is_checked_without_a_numpy_error(tmp_path, capsys):
    path = _edit(write_study(tmp_path, n_trials=1), "seed = 0", "seed = 9223372036854775807")
    assert main(["search", str(path), "--check", "--quiet"]) == 0, capsys.readouterr().err
    assert not path.with_suffix(".journal").exists()

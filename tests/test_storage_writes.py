"""A trial's attributes reach a journal in a few appends (writes_together), and every one of them lands.

Each journal append takes Optuna's lock, writes and fsyncs (0.4 ms here, far more on a network disk); a trial used to
make some 30 of them. Inside a writes_together block the records are held and written at its end as one append, in
order; a block that raises still writes them, and a value JSON cannot hold is still refused by its own call.
"""

import contextlib
import json

import optuna
import pytest
from optuna.storages.journal import _file as optuna_journal_file
from optuna.trial import TrialState
from search_helpers import write_study

from dpnas.dp import engine as dp_engine
from dpnas.search.runner import search
from dpnas.search.storage import open_storage, writes_together
from dpnas.search.study_file import load_study_file


@pytest.fixture
def appends(monkeypatch):
    """The records of each append (one lock, one write and one fsync) Optuna's journal file backend has made."""
    made = []
    append_logs = optuna_journal_file.JournalFileBackend.append_logs

    def recorded(self, logs):
        made.append(list(logs))
        return append_logs(self, logs)

    monkeypatch.setattr(optuna_journal_file.JournalFileBackend, "append_logs", recorded)
    return made


def _running_trial(path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=open_storage(str(path)))
    return study, study.ask()


def _attrs_on_disk(path, number=0):
    """The trial's user attributes as a new reader of the file sees them."""
    return optuna.load_study(study_name="s", storage=open_storage(str(path), must_exist=True)).trials[number].user_attrs


def test_a_blocks_writes_are_one_append_at_its_end_in_order(tmp_path, appends):
    path = tmp_path / "s.journal"
    study, trial = _running_trial(path)
    before = len(appends)
    with writes_together(study._storage):
        for i in range(10):
            trial.set_user_attr(f"k{i}", {"i": i})
        assert trial.user_attrs["k9"] == {"i": 9}  # the trial's own view has them at once
        assert _attrs_on_disk(path) == {} and len(appends) == before  # nothing written yet
    assert len(appends) == before + 1
    assert _attrs_on_disk(path) == {f"k{i}": {"i": i} for i in range(10)}
    keys = [next(iter(record["user_attr"])) for record in map(json.loads, path.read_text().splitlines())
            if "user_attr" in record and "trial_id" in record]
    assert keys == [f"k{i}" for i in range(10)]  # one record each, in the order they were set
    trial.set_user_attr("after", 1)  # outside a block: written at once, as before
    assert len(appends) == before + 2 and _attrs_on_disk(path)["after"] == 1


def test_a_block_that_raises_still_writes_what_it_held(tmp_path, appends):
    path = tmp_path / "s.journal"
    study, trial = _running_trial(path)
    with pytest.raises(RuntimeError, match="stopped"), writes_together(study._storage):
        trial.set_user_attr("a", 1)
        trial.set_user_attr("b", 2)
        raise RuntimeError("stopped")
    assert _attrs_on_disk(path) == {"a": 1, "b": 2}


def test_a_value_json_cannot_hold_is_refused_by_its_own_call(tmp_path):
    path = tmp_path / "s.journal"
    study, trial = _running_trial(path)
    with writes_together(study._storage):
        trial.set_user_attr("a", 1)
        with pytest.raises(TypeError):
            trial.set_user_attr("bad", object())
        trial.set_user_attr("b", 2)
    assert _attrs_on_disk(path) == {"a": 1, "b": 2}
    json.loads(path.read_text().splitlines()[-1])  # the file stays whole


def test_nested_blocks_write_once_at_the_outer_end(tmp_path, appends):
    path = tmp_path / "s.journal"
    study, trial = _running_trial(path)
    before = len(appends)
    with writes_together(study._storage):
        trial.set_user_attr("a", 1)
        with writes_together(study._storage):
            trial.set_user_attr("b", 2)
        assert _attrs_on_disk(path) == {}
    assert len(appends) == before + 1 and _attrs_on_disk(path) == {"a": 1, "b": 2}


def test_other_storages_write_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    trial = study.ask()
    with writes_together(study._storage):
        trial.set_user_attr("a", 1)
        assert optuna.load_study(study_name="s", storage=open_storage(url)).trials[0].user_attrs == {"a": 1}


def test_a_search_appends_each_trial_in_a_few_writes_and_its_plan_before_the_first_step(tmp_path, appends,
                                                                                         monkeypatch):
    path = write_study(tmp_path, n_trials=2, epochs=2)
    journal = tmp_path / "tiny.journal"
    seen_at_first_step = []
    step = dp_engine.DPSGDEngine.step

    def first_step_reads_the_plan(self, *args, **kwargs):
        if journal.exists() and (not seen_at_first_step or seen_at_first_step[-1] is not self):
            # another process reading the journal now: the run is counted before it touches the data
            study = optuna.load_study(study_name="tiny", storage=open_storage(str(journal), must_exist=True))
            running = study.get_trials(states=(TrialState.RUNNING,))
            if not running:  # the preflight's step, before the first trial
                return step(self, *args, **kwargs)
            assert len(running) == 1
            assert {"privacy_plan", "train_size", "config", "privacy_config", "config_key"} <= set(running[0].user_attrs)
            seen_at_first_step.append(self)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(dp_engine.DPSGDEngine, "step", first_step_reads_the_plan)
    before = len(appends)
    study = search(load_study_file(path), progress=False)
    assert len(seen_at_first_step) == 2  # each trial's first step
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all({"epsilon_spent", "val_accuracy", "test_accuracy", "device"} <= set(t.user_attrs) for t in trials)
    # without the blocks each of a trial's records was an append of its own (about 30 a trial here)
    of_trials = [logs for logs in appends[before:] if all("trial_id" in log or log["op_code"] == 4 for log in logs)]
    records = sum(map(len, of_trials))
    assert records >= 50 and len(of_trials) <= 12 * 2, (len(of_trials), records)


@pytest.mark.parametrize("together", [False, True])
def test_ctrl_c_waits_for_a_journal_append(tmp_path, monkeypatch, together):
    """A Ctrl-C landing between Optuna taking its lock file and the write left the lock file behind: the
    interrupted trial's last records (its failure, its retry) then waited out the lock's 30 s grace period."""
    import os
    import signal
    from pathlib import Path

    from optuna.storages.journal import JournalFileSymlinkLock

    path = str(tmp_path / "s.journal")
    study = optuna.create_study(storage=open_storage(path), study_name="s")
    real = JournalFileSymlinkLock.acquire

    def acquire_then_ctrl_c(self):
        real(self)
        os.kill(os.getpid(), signal.SIGINT)
        return True

    monkeypatch.setattr(JournalFileSymlinkLock, "acquire", acquire_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt), writes_together(study._storage) if together else contextlib.nullcontext():
        study.set_user_attr("x", 1)
    monkeypatch.undo()
    assert not Path(path + ".lock").exists()
    assert optuna.load_study(study_name="s", storage=open_storage(path)).user_attrs["x"] == 1


def test_a_search_on_sqlite_says_nothing_about_optuna_s_heartbeat(tmp_path):
    """Optuna warns at every ask on a heartbeat storage unless optimize() runs the trial; dpnas beats it itself."""
    import warnings

    path = write_study(tmp_path, n_trials=1, epochs=1)
    url = f"sqlite:///{tmp_path / 's.db'}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = search(load_study_file(path), storage_url=url, progress=False)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    assert not [w for w in caught if "supposed to be used with Study.optimize" in str(w.message)]

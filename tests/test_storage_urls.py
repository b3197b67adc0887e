"""Storage URLs: a bare postgresql:// opens with the installed driver, every spelling of a database shares the
trial-slot lock, and a password never reaches what dpnas prints or stores."""

import threading
import time

import pytest

from dpnas.arch.space import ConfigError
from dpnas.search.storage import command_url, dashboard_command, display_url, open_storage, rdb_url, trial_slot_lock


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:sekret@db.example:5432/nas", "postgresql://u:***@db.example:5432/nas"),
    ("postgresql+psycopg2://u:p%40ss@h/nas", "postgresql+psycopg2://u:***@h/nas"),
    ("postgresql://u@h/nas?password=sekret&sslmode=require", "postgresql://u@h/nas?password=***&sslmode=require"),
    ("postgresql://u:sekret@h:notaport/nas", "postgresql://u:***@h:notaport/nas"),  # unparsable: masked all the same
    ("postgresql://u@h/nas", "postgresql://u@h/nas"),
    ("sqlite:///runs/study.db", "sqlite:///runs/study.db"),
    ("studies/quick.journal", "studies/quick.journal"),
])
def test_display_url_masks_the_password_only(url, shown):
    assert display_url(url) == shown


def test_command_url_leaves_the_password_out_and_the_dashboard_names_the_driver():
    assert command_url("postgresql://u:sekret@h/nas?password=x&sslmode=require") == "postgresql://u@h/nas?sslmode=require"
    assert dashboard_command("postgresql://u:sekret@h:5432/nas") == "optuna-dashboard postgresql+psycopg2://u@h:5432/nas"
    assert rdb_url("postgresql://u@h/nas") == "postgresql+psycopg2://u@h/nas"
    assert rdb_url("postgresql+psycopg2://u@h/nas") == "postgresql+psycopg2://u@h/nas"
    assert rdb_url("sqlite:///a.db") == "sqlite:///a.db"


def test_an_unknown_scheme_is_refused_with_the_password_masked():
    with pytest.raises(ConfigError) as err:
        open_storage("postgres://u:sekret-xyz@h/nas")
    assert "sekret-xyz" not in str(err.value) and "u:***@h" in str(err.value)


def test_bare_postgresql_url_opens_and_a_wrong_database_fails_masked(postgres_url):
    bare = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    open_storage(bare)  # SQLAlchemy alone would look for psycopg 3, which is not installed
    wrong = bare.replace("postgres@", "postgres:sekret-xyz@").rsplit("/", 1)[0] + "/no_such_db"
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        open_storage(wrong, must_exist=True)
    assert time.monotonic() - started < 10  # not waited for as a server that restarts
    message = str(err.value)
    assert "sekret-xyz" not in message and "postgres:***@" in message and "no_such_db" in message
    assert "\n" not in message


def test_every_spelling_of_a_database_shares_the_trial_slot_lock(postgres_url):
    spellings = [postgres_url, postgres_url.replace("postgresql+psycopg2://", "postgresql://"),
                 postgres_url.replace("@127.0.0.1:", "@localhost:")]
    storages = [open_storage(url) for url in spellings]
    for other, url in zip(storages[1:], spellings[1:]):
        entered = threading.Event()

        def take(storage=other, url=url):
            with trial_slot_lock(storage, url):
                entered.set()

        with trial_slot_lock(storages[0], spellings[0]):
            thread = threading.Thread(target=take)
            thread.start()
            assert not entered.wait(1.0), f"{url} took the lock that {spellings[0]} holds"
        assert entered.wait(10.0), f"{url} never got the lock once it was free"
        thread.join()


def test_a_heartbeat_that_meets_a_lost_connection_is_tried_again(tmp_path, monkeypatch):
    """Optuna's heartbeat thread ends at its first exception; a server restart between the pool's ping and the beat's
    query must not end it (another worker would then take the running trial for stale and run it twice)."""
    import optuna
    from optuna.storages import RDBStorage

    import dpnas.search.storage as storage_module

    storage = open_storage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1)
    assert isinstance(storage, storage_module.PatientRDBStorage)
    study = optuna.create_study(storage=storage, study_name="hb")
    trial_id = study.ask()._trial_id
    real = RDBStorage.record_heartbeat
    failures = []

    def flaky(self, tid):
        if len(failures) < 2:
            failures.append(tid)
            raise optuna.exceptions.StorageInternalError("server closed the connection unexpectedly")
        return real(self, tid)

    monkeypatch.setattr(RDBStorage, "record_heartbeat", flaky)
    monkeypatch.setattr(storage_module, "HEARTBEAT_RETRY_S", 0.0)
    storage.record_heartbeat(trial_id)  # two failures, then the beat is written
    assert failures == [trial_id, trial_id]
    assert storage._get_stale_trial_ids(study._study_id) == []  # the beat is there: the trial is not stale

    # a server gone for longer than the patience: the error reaches the caller
    failures.clear()
    monkeypatch.setattr(storage_module, "SERVER_PATIENCE_S", 0.0)
    with pytest.raises(optuna.exceptions.StorageInternalError):
        storage.record_heartbeat(trial_id)
    assert failures == [trial_id]


def test_the_heartbeat_thread_outlives_a_server_away_for_longer_than_its_patience(tmp_path, monkeypatch):
    """A server away for longer than SERVER_PATIENCE_S between two of a trial's writes (a long epoch): the trial
    rode it out, but Optuna's heartbeat thread ended at the beat that gave up, so the trial got no beat again;
    another worker failed it as stale and trained it again, and the first run's result was refused at its end."""
    import optuna
    from optuna.storages import RDBStorage

    import dpnas.search.storage as storage_module
    from dpnas.search.storage import heartbeat_thread

    storage = open_storage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1)
    trial_id = optuna.create_study(storage=storage, study_name="hb").ask()._trial_id
    real, beats = RDBStorage.record_heartbeat, []
    back_at = time.monotonic() + 0.5

    def away_for_a_while(self, tid):
        if time.monotonic() < back_at:
            raise optuna.exceptions.StorageInternalError("server closed the connection unexpectedly")
        beats.append(tid)
        return real(self, tid)

    monkeypatch.setattr(RDBStorage, "record_heartbeat", away_for_a_while)
    monkeypatch.setattr(storage_module, "HEARTBEAT_RETRY_S", 0.05)
    monkeypatch.setattr(storage_module, "SERVER_PATIENCE_S", 0.2)  # the first beat gives up before the server is back
    with heartbeat_thread(trial_id, storage):
        time.sleep(1.6)  # the next beat, an interval later, meets the server again
    assert beats and beats[0] == trial_id


def test_a_study_s_own_storage_takes_the_trial_slot_lock_too(postgres_url):
    """The worker loop passes `study._storage`, Optuna's cache around the RDB storage: the advisory lock used to be
    skipped for it, so two workers could both take the last slot (a budget of 1 finished 2 runs)."""
    import optuna

    from dpnas.search.storage import slot_lock_excludes_all

    study = optuna.create_study(storage=open_storage(postgres_url), study_name="cached")
    assert type(study._storage).__name__ == "_CachedStorage"
    assert slot_lock_excludes_all(study._storage, postgres_url)
    other, entered = open_storage(postgres_url), threading.Event()

    def take():
        with trial_slot_lock(other, postgres_url):
            entered.set()

    with trial_slot_lock(study._storage, postgres_url):
        thread = threading.Thread(target=take)
        thread.start()
        assert not entered.wait(1.0), "the lock taken through the study's storage excluded no one"
    assert entered.wait(10.0)
    thread.join()


def _lost_connection() -> Exception:
    import sqlalchemy

    return sqlalchemy.exc.OperationalError("UPDATE ...", {}, Exception("server closed the connection"),
                                           connection_invalidated=True)


def test_a_trial_s_writes_and_reads_ride_out_a_lost_connection_or_a_lock(tmp_path, monkeypatch):
    """A server restart that cut a trial's own statement, or an SQLite file locked past its timeout, used to fail the
    trial (or crash the worker with a trained trial unrecorded, trained and charged again on resume)."""
    import optuna
    import sqlalchemy
    from optuna.storages import RDBStorage

    import dpnas.search.storage as storage_module

    monkeypatch.setattr(storage_module, "HEARTBEAT_RETRY_S", 0.0)
    storage = open_storage(f"sqlite:///{tmp_path / 'w.db'}")
    study = optuna.create_study(storage=storage, study_name="w")
    trial = study.ask()
    locked = sqlalchemy.exc.OperationalError("UPDATE ...", {}, Exception("database is locked"))
    for call, error in (("set_trial_user_attr", _lost_connection()), ("set_trial_intermediate_value", locked),
                        ("get_trial", _lost_connection())):
        real, failures = getattr(RDBStorage, call), []

        def flaky(self, *args, real=real, failures=failures, error=error, **kwargs):
            if len(failures) < 2:
                failures.append(1)
                raise error
            return real(self, *args, **kwargs)

        monkeypatch.setattr(RDBStorage, call, flaky)
    trial.set_user_attr("a", 1)
    trial.report(0.5, 0)
    assert storage.get_trial(trial._trial_id).user_attrs == {"a": 1}
    # an error that is neither reaches the caller at once
    monkeypatch.setattr(RDBStorage, "set_trial_system_attr",
                        lambda *a, **k: (_ for _ in ()).throw(sqlalchemy.exc.OperationalError("x", {}, Exception("no such table"))))
    with pytest.raises(sqlalchemy.exc.OperationalError, match="no such table"):
        storage.set_trial_system_attr(trial._trial_id, "b", 2)


def test_finishing_a_trial_again_after_its_answer_was_lost_is_not_an_error(tmp_path, monkeypatch):
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    import dpnas.search.storage as storage_module

    monkeypatch.setattr(storage_module, "HEARTBEAT_RETRY_S", 0.0)
    storage = open_storage(f"sqlite:///{tmp_path / 'f.db'}")
    study = optuna.create_study(storage=storage, study_name="f")
    trial = study.ask()
    real, calls = RDBStorage.set_trial_state_values, []

    def written_then_lost(self, *args, **kwargs):
        calls.append(1)
        result = real(self, *args, **kwargs)
        if len(calls) == 1:
            raise _lost_connection()  # the commit reached the database; its answer did not
        return result

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", written_then_lost)
    assert storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [0.9]) is True
    assert len(calls) == 2 and storage.get_trial(trial._trial_id).state == TrialState.COMPLETE
    assert storage.get_trial(trial._trial_id).values == [0.9]


def test_a_read_only_sqlite_database_is_refused_in_one_line_before_a_search_writes(tmp_path, monkeypatch):
    import os

    import dpnas.search.storage as storage_module

    db = tmp_path / "ro.db"
    open_storage(f"sqlite:///{db}")  # a real, whole database
    before = db.read_bytes()
    real_access = os.access
    monkeypatch.setattr(storage_module.os, "access",  # root may write anywhere: the check is what is tested
                        lambda path, mode: False if str(path) == str(db) else real_access(path, mode))
    with pytest.raises(ConfigError, match="read-only") as refused:
        open_storage(f"sqlite:///{db}")
    assert "\n" not in str(refused.value) and db.read_bytes() == before
    open_storage(f"sqlite:///{db}", must_exist=True)  # reading it (`dpnas privacy`, `best`) is fine

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

"""Where studies live: explicit storage URLs, and a lock that makes trial budgets exact.

* a path ending in ``.journal`` or ``.log``: Optuna's journal file (the default, next to the study
  file); many processes on one host can share it without "database is locked" failures;
* ``sqlite:///path.db``: an SQLite database (one host, few processes);
* ``postgresql://...`` (or ``mysql://...``): a server that workers on several machines join; trials of
  crashed workers are found by heartbeat and retried.

Anything else is refused, so a mistyped path never silently becomes another backend.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from pathlib import Path
from typing import Iterator

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from dpnas.arch.space import ConfigError

JOURNAL_SUFFIXES = (".journal", ".log")
RDB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "mysql", "mysql+pymysql")


def storage_kind(url: str) -> str:
    if "://" in url:
        scheme = url.split("://", 1)[0]
        if scheme not in RDB_SCHEMES:
            raise ConfigError(f"storage {url!r}: unknown scheme {scheme!r}; expected one of: {', '.join(RDB_SCHEMES)} or a .journal file")
        return "sqlite" if scheme == "sqlite" else "server"
    if Path(url).suffix in JOURNAL_SUFFIXES:
        return "journal"
    raise ConfigError(
        f"storage {url!r}: not a storage URL; use a journal file (*.journal), sqlite:///FILE.db or postgresql://..."
    )


def open_storage(
    url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None, max_retries: int = 2,
    must_exist: bool = False,
) -> BaseStorage:
    """Open (or create) the storage at `url`; with a heartbeat, crashed trials are retried up to `max_retries` times."""
    kind = storage_kind(url)
    if kind == "journal":
        path = Path(url)
        if must_exist and not path.exists():
            raise ConfigError(f"storage {url!r}: no such journal file")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if kind == "sqlite" and must_exist:
        db = Path(url.split("sqlite:///", 1)[-1])
        if not db.exists():
            raise ConfigError(f"storage {url!r}: no such database file")
    kwargs: dict = {}
    if heartbeat_interval:
        kwargs.update(
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period or 2 * heartbeat_interval,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retries),
        )
    if kind == "sqlite":
        # wait for the lock instead of failing at once when several processes write
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        return RDBStorage(url, **kwargs)
    except Exception as err:  # sqlalchemy raises many kinds; all mean "cannot open this storage"
        raise ConfigError(f"storage {url!r}: cannot open it ({type(err).__name__}: {str(err).splitlines()[0]})") from err


@contextlib.contextmanager
def trial_slot_lock(storage: BaseStorage, url: str) -> Iterator[None]:
    """Serialise "is there budget left? then take a trial" across all workers of a study.

    A file lock for journal and SQLite storages (workers on one host), a PostgreSQL advisory lock
    for a server (workers anywhere); MySQL gets none, and may overshoot by a trial or two.
    """
    kind = storage_kind(url)
    if kind in ("journal", "sqlite"):
        path = Path(url.split("sqlite:///", 1)[-1]) if kind == "sqlite" else Path(url)
        lock_path = path.with_name(path.name + ".dpnas-lock")
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha1(url.encode()).digest()[:7], "big")
        with storage.engine.connect() as connection:
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
            try:
                yield
            finally:
                connection.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")
        return
    yield


def dashboard_command(url: str, artifact_dir: str | None = None) -> str:
    """The stock optuna-dashboard command line for a storage (with its artifact directory, so it lists weights)."""
    command = f"optuna-dashboard {url}"
    if artifact_dir and not artifact_dir.startswith("s3://") and Path(artifact_dir).is_dir():
        command += f" --artifact-dir {artifact_dir}"
    return command


def list_study_names(storage: BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]

"""Where studies live: explicit storage URLs, and a lock that makes trial budgets exact.

* a path ending in ``.journal`` or ``.log``: Optuna's journal file (the default, next to the study
  file); many processes on one host can share it without "database is locked" failures;
* ``sqlite:///path.db``: an SQLite database (one host, few processes);
* ``postgresql://...`` (or ``mysql://...``): a server that workers on several machines join; trials of
  crashed workers are found by heartbeat and retried.

Anything else is refused, so a mistyped path never silently becomes another backend.

A damaged file is never written to as it is. A journal's damaged end (a crash or a full disk mid-write) is saved
beside it and cut off before the next record is appended (:mod:`dpnas.search.journal_repair`): opening to write
does it at once, opening an existing study to read (``must_exist``: ``dpnas best``, ``privacy``, ...) leaves the
file as it is, says what is damaged, and reads the whole records before the damage. A damaged SQLite file is
refused in one line, untouched: dpnas cannot tell which of its pages to trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import sqlite3
from pathlib import Path
from typing import Iterator

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback

from dpnas.arch.space import ConfigError
from dpnas.search.journal_repair import WholeJournalFileBackend, report_damage

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
        return JournalStorage(_whole_journal(url, path, repair=not must_exist))
    if kind == "sqlite":
        db = Path(url.split("sqlite:///", 1)[-1])
        if must_exist and not db.exists():
            raise ConfigError(f"storage {url!r}: no such database file")
        _refuse_damaged_sqlite(url, db)
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


def _whole_journal(url: str, path: Path, *, repair: bool) -> WholeJournalFileBackend:
    """The journal's backend, its damaged end cut off first (`repair`) or only reported (reading leaves it as is)."""
    backend = WholeJournalFileBackend(str(path))
    if not repair:
        report_damage(path)
        return backend
    try:
        # dpnas's own lock too, so a repair never runs while another worker holds a trial slot
        with _dpnas_file_lock(path):
            backend.repair()
    except OSError as err:  # the backup could not be written (a full disk?): nothing was cut
        raise ConfigError(f"storage {url!r}: it is damaged and cannot be repaired ({err}); nothing was changed") from err
    return backend


def _refuse_damaged_sqlite(url: str, db: Path) -> None:
    """Refuse a damaged SQLite file before Optuna writes its tables into it; a new (missing) file is fine.

    The check opens the file read-only, so a damaged file is never changed, not even by SQLite's own recovery.
    """
    if not db.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as connection:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as err:
        if not err.sqlite_errorname.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT", "SQLITE_IOERR_SHORT_READ")):
            return  # busy, locked, a crash's journal that only a writer rolls back: not damage, Optuna opens it
        problems = [str(err)]
    if problems != ["ok"]:
        detail = " ".join(str(problems[0]).split()) + (f" and {len(problems) - 1} more problems" if len(problems) > 1 else "")
        raise ConfigError(f"storage {url!r}: the SQLite file is damaged ({detail}); dpnas leaves it untouched: "
                          f"restore it from a backup, or salvage what is left with `sqlite3 {db} .recover`")


@contextlib.contextmanager
def _dpnas_file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on PATH.dpnas-lock, held by one process of this host at a time."""
    lock_path = path.with_name(path.name + ".dpnas-lock")
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def trial_slot_lock(storage: BaseStorage, url: str) -> Iterator[None]:
    """Serialise "is there budget left? then take a trial" across all workers of a study.

    A file lock for journal and SQLite storages (workers on one host), a PostgreSQL advisory lock
    for a server (workers anywhere); MySQL gets none, and may overshoot by a trial or two.
    """
    kind = storage_kind(url)
    if kind in ("journal", "sqlite"):
        path = Path(url.split("sqlite:///", 1)[-1]) if kind == "sqlite" else Path(url)
        with _dpnas_file_lock(path):
            yield
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

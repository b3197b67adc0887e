"""Where studies live: explicit storage URLs, and a lock that makes trial budgets exact.

* a path ending in ``.journal`` or ``.log``: Optuna's journal file (the default, next to the study
  file); many processes on one host can share it without "database is locked" failures;
* ``sqlite:///path.db``: an SQLite database (one host, few processes);
* ``postgresql://...`` (or ``mysql://...``): a server that workers on several machines join; trials of
  crashed workers are found by heartbeat and retried, and a server that restarts is waited for.

Anything else is refused, so a mistyped path never silently becomes another backend.

A damaged file is never written to as it is. A journal's damaged end (a crash or a full disk mid-write) is saved
beside it and cut off before the next record is appended (:mod:`dpnas.search.journal_repair`): opening to write
does it at once, opening an existing study to read (``must_exist``: ``dpnas best``, ``privacy``, ...) leaves the
file as it is, says what is damaged, and reads the whole records before the damage. A damaged SQLite file is
refused in one line, untouched: dpnas cannot tell which of its pages to trust.

A server URL may hold a password: dpnas prints and stores it only through :func:`display_url` (password masked)
or :func:`command_url` (password left out, for commands to copy), never as given.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from sqlalchemy.engine import make_url

from dpnas.arch.space import ConfigError
from dpnas.search.journal_repair import Damage, WholeJournalFileBackend, report_damage

JOURNAL_SUFFIXES = (".journal", ".log")
RDB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "mysql", "mysql+pymysql")
# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which dpnas does not install; psycopg2 is its driver.
_DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg2"}
# How long a worker waits for a server that went away (a restart, a fail-over) before its trial fails.
SERVER_PATIENCE_S = 60.0
HEARTBEAT_RETRY_S = 0.5  # between tries of a heartbeat (or another storage call) that met a lost connection
# How long a worker waits for an SQLite file another process keeps locked (each try already waits 60 s for it)
LOCKED_PATIENCE_S = 15 * 60.0
# The key of the PostgreSQL advisory lock behind trial_slot_lock. Advisory locks are local to a database, so one
# constant serves every study, and workers share the lock however their URLs spell the database (driver, host
# name or address, user, password).
_SLOT_LOCK_KEY = int.from_bytes(hashlib.sha1(b"dpnas:trial-slot").digest()[:7], "big")


def display_url(url: str) -> str:
    """`url` fit to print or store: a server URL with its password as ***; a journal path as it is."""
    if "://" not in url:
        return url
    try:
        parsed = make_url(url)
    except Exception:  # unparsable (a port that is no number...): mask whatever stands between "user:" and "@"
        return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", url)
    if "password" in parsed.query:  # libpq also takes the password as a query parameter
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def command_url(url: str) -> str:
    """`url` for a printed command line: the password left out, so that the command runs where PGPASSWORD or
    ~/.pgpass supplies it (and shows it nowhere)."""
    if "://" not in url:
        return url
    try:
        parsed = make_url(url)
    except Exception:
        return display_url(url)
    return parsed._replace(password=None).difference_update_query(["password"]).render_as_string(hide_password=False)


def rdb_url(url: str) -> str:
    """The URL SQLAlchemy is given: a bare postgresql:// gets the psycopg2 driver dpnas installs."""
    scheme, separator, rest = url.partition("://")
    return _DEFAULT_DRIVERS.get(scheme, scheme) + separator + rest


def storage_file(url: str) -> Path | None:
    """The file a journal or SQLite storage lives in (None for a server)."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None if "://" in url else Path(url)


def storage_kind(url: str) -> str:
    if "://" in url:
        scheme = url.split("://", 1)[0]
        if scheme not in RDB_SCHEMES:
            raise ConfigError(f"storage {display_url(url)!r}: unknown scheme {scheme!r}; expected one of: "
                              f"{', '.join(RDB_SCHEMES)} or a .journal file")
        return "sqlite" if scheme == "sqlite" else "server"
    if Path(url).suffix in JOURNAL_SUFFIXES:
        return "journal"
    raise ConfigError(
        f"storage {display_url(url)!r}: not a storage URL; use a journal file (*.journal), sqlite:///FILE.db or postgresql://..."
    )


def open_storage(
    url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None, max_retries: int = 2,
    must_exist: bool = False, quiet: bool = False,
) -> BaseStorage:
    """Open (or create) the storage at `url`; with a heartbeat, crashed trials are retried up to `max_retries` times."""
    kind = storage_kind(url)
    if kind == "journal":
        path = Path(url)
        if must_exist and not path.exists():
            raise ConfigError(f"storage {url!r}: no such journal file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(_whole_journal(url, path, repair=not must_exist, quiet=quiet))
        except OSError as err:  # a folder that cannot be created, written or read: one line, before any trial
            action = "read it" if must_exist else "write there"
            raise ConfigError(f"storage {url!r}: cannot {action} ({err.strerror or err}: {err.filename})") from err
    if kind == "sqlite":
        db = storage_file(url)
        if must_exist and not db.exists():
            raise ConfigError(f"storage {url!r}: no such database file")
        _refuse_damaged_sqlite(url, db)
        if not must_exist:
            _refuse_read_only_sqlite(url, db)
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
    else:
        # a pooled connection a server restart has closed is replaced before use, not failed on
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    try:
        storage = PatientRDBStorage(rdb_url(url), **kwargs)
    except Exception as err:  # sqlalchemy raises many kinds; all mean "cannot open this storage"
        reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        password = _password(url)
        if password:  # no driver is known to quote it, but an error line is no place to find out
            reason = reason.replace(password, "***")
        raise ConfigError(f"storage {display_url(url)!r}: cannot open it ({reason})") from err
    if kind == "server":
        _wait_for_server(storage.engine, SERVER_PATIENCE_S)
    return storage


class PatientRDBStorage(RDBStorage):
    """Optuna's RDB storage, whose calls ride out a lost connection or a lock held for a while.

    Optuna's heartbeat thread ends at the first exception. A server restart can close a connection between
    `pool_pre_ping`'s check and the heartbeat's query; the thread then dies, and once its grace period passes,
    another worker takes the still-running trial for stale and runs it again. Here a beat that fails that way is
    tried again (with a fresh connection) until the server has been gone for `SERVER_PATIENCE_S`. A heartbeat only
    writes the time, so trying it again changes nothing else.

    A trial's own reads and writes (its attributes, intermediate values, its final state) are tried again the same
    way when the connection was lost (a server restart that cut a statement off) or an SQLite file stayed locked
    past its timeout: failed, a finished trial's results would be lost and it would train (and spend) again.
    Each of those writes sets a value, so a try that did reach the database before its answer was lost is
    harmless. New trials and studies are not tried again: a lost answer to one that was created would make two.
    """

    def _patiently(self, call: Callable[..., Any], *args: Any, any_error: bool = False, **kwargs: Any) -> Any:
        deadline = None
        while True:
            try:
                return call(self, *args, **kwargs)
            except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError) as err:
                patience = _patience(err)
                if patience is None:
                    if not any_error:
                        raise
                    patience = SERVER_PATIENCE_S
                now = time.monotonic()
                deadline = now + patience if deadline is None else deadline
                if now >= deadline:
                    raise
                time.sleep(HEARTBEAT_RETRY_S)

    def record_heartbeat(self, trial_id: int) -> None:
        return self._patiently(RDBStorage.record_heartbeat, trial_id, any_error=True)

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        tries = []

        def call(storage: RDBStorage, *args: Any) -> bool:
            tries.append(None)
            try:
                return RDBStorage.set_trial_state_values(storage, *args)
            except optuna.exceptions.UpdateFinishedTrialError:
                # an earlier try did finish the trial, and only its answer was lost
                if len(tries) > 1 and RDBStorage.get_trial(storage, trial_id).state == state:
                    return True
                raise

        return self._patiently(call, trial_id, state, values)


@contextlib.contextmanager
def heartbeat_thread(trial_id: int, storage: BaseStorage) -> Iterator[None]:
    """Beat the trial's heartbeat every interval while the block runs, as Optuna's heartbeat thread does, but a beat
    that fails once its patience is over (a server away for longer than `SERVER_PATIENCE_S`, between two of the
    trial's own writes) is skipped, and the next one tried: Optuna's thread ended there, so the trial, still
    training, got no beat again; another worker failed it as stale and trained it again, and the first run's result
    was refused at its end (UpdateFinishedTrialError): its epsilon spent twice, a finished trial lost."""
    if not is_heartbeat_enabled(storage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError):
                pass  # the server is still away: the next beat tries again
            if stop.wait(timeout=storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _patient_call(name: str) -> Callable[..., Any]:
    def method(self: PatientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._patiently(getattr(RDBStorage, name), *args, **kwargs)

    method.__name__ = name
    return method


# every call Optuna's cached storage makes of it, but those that create a study or a trial
for _name in ("set_study_user_attr", "set_study_system_attr", "get_study_id_from_name", "get_study_name_from_id",
              "get_study_directions", "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
              "_set_trial_param", "get_trial_id_from_study_id_trial_number", "_get_best_trial_id",
              "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr", "get_trial",
              "_get_trials", "_get_stale_trial_ids"):
    setattr(PatientRDBStorage, _name, _patient_call(_name))


def _patience(err: BaseException) -> float | None:
    """How long to keep trying a call that failed with `err`: a lost connection (nothing, or a value that is set
    again, was written) or an SQLite lock held past its timeout; None for anything else."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError):
            if seen.connection_invalidated:
                return SERVER_PATIENCE_S
            if "database is locked" in str(seen.orig):
                return LOCKED_PATIENCE_S
        seen = seen.__cause__ or seen.__context__
    return None


def _password(url: str) -> str | None:
    try:
        parsed = make_url(url)
    except Exception:
        return None
    return parsed.password or parsed.query.get("password") or None


def _wait_for_server(engine: sqlalchemy.engine.Engine, patience_s: float) -> None:
    """Retry new connections for up to `patience_s` seconds, so that a server restart in the middle of a trial
    stalls its writes (intermediate values, heartbeats) instead of failing them. Added after the storage opened,
    so a wrong database name or password still fails at once."""
    refused = engine.dialect.loaded_dbapi.OperationalError

    @sqlalchemy.event.listens_for(engine, "do_connect")
    def connect_patiently(dialect, connection_record, cargs, cparams):
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except refused:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)


def _whole_journal(url: str, path: Path, *, repair: bool, quiet: bool = False) -> WholeJournalFileBackend:
    """The journal's backend, its damaged end cut off first (`repair`) or only reported (reading leaves it as is;
    `quiet`: a read the same command's repair follows, which says it once)."""
    backend = WholeJournalFileBackend(str(path))
    if not repair:
        if not quiet:
            report_damage(path)
        return backend
    try:
        # dpnas's own lock too, so a repair never runs while another worker holds a trial slot
        with _dpnas_file_lock(path):
            backend.repair()
    except OSError as err:  # the lock, the read, or a damaged file's backup failed (permissions, a full disk)
        damaged = "it is damaged and " if err.errno is None else ""
        raise ConfigError(f"storage {url!r}: {damaged}cannot be locked, read or repaired ({err.strerror or err}: "
                          f"{err.filename or path}); nothing was changed") from err
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


def _refuse_read_only_sqlite(url: str, db: Path) -> None:
    """A search writes the file, SQLite's journal beside it and dpnas's lock file beside it: where it cannot (a
    read-only file, folder or file system), refused in one line before anything is written."""
    if not db.parent.is_dir():
        return  # SQLite says so itself: "unable to open database file"
    for path in (db, db.parent) if db.exists() else (db.parent,):
        if not os.access(path, os.W_OK):
            what = "file" if path == db else "folder"
            raise ConfigError(f"storage {url!r}: the database's {what} {path} is read-only; a search writes there "
                              "(`dpnas privacy` and `dpnas best` read it as it is)")


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


class SlotLock:
    """What :func:`trial_slot_lock` gives the block it guards: a file lock (or none) is held until the block ends."""

    def held(self) -> bool:
        return True


class _AdvisorySlotLock(SlotLock):
    """A PostgreSQL advisory lock, which lives in one server session: a server restart or a killed backend
    (``pg_terminate_backend``) ends the session and the lock with it, while the block still runs on the storage's
    other connections and never hears of it."""

    def __init__(self, connection: sqlalchemy.engine.Connection):
        self.connection = connection

    def held(self) -> bool:
        """Whether this session still holds the lock, so it has held it since it was taken: a session that lost it
        ended, and nothing in this one takes it again."""
        try:
            return bool(self.connection.exec_driver_sql(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                f"pid = pg_backend_pid() AND classid = '{_SLOT_LOCK_KEY >> 32}'::oid AND "
                f"objid = '{_SLOT_LOCK_KEY & 0xFFFFFFFF}'::oid AND objsubid = 1)").scalar())
        except sqlalchemy.exc.DBAPIError as err:
            if not err.connection_invalidated:
                raise
            return False  # the session is gone, and the lock with it


@contextlib.contextmanager
def trial_slot_lock(storage: BaseStorage, url: str) -> Iterator[SlotLock]:
    """Serialise "is there budget left? then take a trial" across all workers of a study.

    A file lock for journal and SQLite storages (workers on one host), a PostgreSQL advisory lock
    for a server (workers anywhere); MySQL gets none, and may overshoot by a trial or two.

    The block gets a :class:`SlotLock`: a server's lock can be lost while the block runs (its session ended: a
    restart, a killed backend), and a block whose work must not outlive it (a trial about to touch the data) asks
    `held()` once that work is recorded, before it acts on it.
    """
    kind = storage_kind(url)
    if kind in ("journal", "sqlite"):
        with _dpnas_file_lock(storage_file(url)):
            yield SlotLock()
        return
    storage = _rdb_backend(storage)
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql":
        with _advisory_lock_session(storage.engine) as connection:
            try:
                yield _AdvisorySlotLock(connection)
            finally:
                try:
                    if not connection.invalidated:  # found closed by `held()`: the lock went with the session
                        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({_SLOT_LOCK_KEY})")
                except sqlalchemy.exc.DBAPIError as err:
                    if not err.connection_invalidated:
                        raise
                    # the server closed the session (a restart), and the lock with it
        return
    yield SlotLock()


def _advisory_lock_session(engine: sqlalchemy.engine.Engine) -> sqlalchemy.engine.Connection:
    """A connection whose session has taken the slot lock. A wait for it that a lost connection cuts off (a server
    restart: the wait, and any lock it got, end with the session) is tried again on a new one, until the server has
    been gone for `SERVER_PATIENCE_S`. A worker waiting there failed ("server closed the connection"); at a trial's
    end (recording a trial that finished training) that would leave the trial running, to be trained again."""
    deadline = time.monotonic() + SERVER_PATIENCE_S
    while True:
        connection = engine.connect()
        try:
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({_SLOT_LOCK_KEY})")
            return connection
        except BaseException as err:  # Ctrl-C during the wait too: the connection goes back to the pool
            connection.close()
            lost = isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated
            if not lost or time.monotonic() >= deadline:
                raise
        time.sleep(HEARTBEAT_RETRY_S)


def journal_damage(storage: BaseStorage) -> Damage | None:
    """A journal storage's damage now (see :mod:`dpnas.search.journal_repair`); None for other storages."""
    backend = getattr(storage, "_backend", None) if isinstance(storage, JournalStorage) else None
    return backend.damage() if isinstance(backend, WholeJournalFileBackend) else None


def slot_lock_excludes_all(storage: BaseStorage, url: str) -> bool:
    """Whether :func:`trial_slot_lock` excludes every other worker of the study (all but MySQL)."""
    storage = _rdb_backend(storage)
    return storage_kind(url) in ("journal", "sqlite") or (
        isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql")


def _rdb_backend(storage: BaseStorage) -> BaseStorage:
    """The storage itself, or the RDB storage behind Optuna's cache: a study's `_storage` wraps its RDBStorage."""
    return storage._backend if isinstance(storage, _CachedStorage) else storage


def writes_together(storage: BaseStorage) -> contextlib.AbstractContextManager:
    """A block whose journal writes reach the file as one append at its end (see
    :meth:`WholeJournalFileBackend.appending_together`); other storages write each at once, as before."""
    backend = getattr(storage, "_backend", None) if isinstance(storage, JournalStorage) else None
    if isinstance(backend, WholeJournalFileBackend):
        return backend.appending_together()
    return contextlib.nullcontext()


def dashboard_command(url: str, artifact_dir: str | None = None) -> str:
    """The stock optuna-dashboard command line for a storage (with its artifact directory, so it lists weights).

    The URL names the psycopg2 driver (optuna-dashboard's SQLAlchemy would look for psycopg 3) and no password;
    each argument is quoted for a shell where it needs it (a path with a space).
    """
    command = f"optuna-dashboard {shlex.quote(command_url(rdb_url(url)))}"
    if artifact_dir and not artifact_dir.startswith("s3://") and Path(artifact_dir).is_dir():
        command += f" --artifact-dir {shlex.quote(artifact_dir)}"
    return command


def list_study_names(storage: BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]

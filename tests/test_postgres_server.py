"""The test PostgreSQL server works for what we need it for: Optuna RDBStorage
with heartbeats, shared by several processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from postgres_server import PostgresServer

HEARTBEAT = dict(heartbeat_interval=1, grace_period=2)

pytestmark = pytest.mark.filterwarnings(
    "ignore::optuna.exceptions.ExperimentalWarning",
    "ignore:Heartbeat of storage is supposed to be used with Study.optimize:UserWarning",
)

# A worker: waits at a file barrier so that both workers optimize at the same
# time, then runs N trials of a trivial objective against the shared study.
WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import optuna
    from optuna.storages import RDBStorage

    url, study_name, n_trials, barrier_dir, n_workers = sys.argv[1:6]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = RDBStorage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name=study_name, storage=storage)

    barrier = Path(barrier_dir)
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 30
    while len(list(barrier.iterdir())) < int(n_workers):
        if time.monotonic() > deadline:
            sys.exit("barrier timeout")
        time.sleep(0.01)

    def objective(trial):
        x = trial.suggest_float("x", -10, 10)
        trial.set_user_attr("pid", os.getpid())
        time.sleep(0.1)
        return x * x

    study.optimize(objective, n_trials=int(n_trials))
    """
)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on `port`, from /proc/net/tcp{,6}."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            if len(addr_hex) == 8:  # IPv4, little-endian
                found.add(".".join(str(int(addr_hex[i : i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add(f"ipv6:{addr_hex}")
    return found


def test_listens_on_loopback_only(postgres_server: PostgresServer):
    conn = postgres_server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW listen_addresses")
            assert cur.fetchone()[0] == "127.0.0.1"
            cur.execute("SHOW fsync")
            assert cur.fetchone()[0] == "off"
            cur.execute("SELECT current_user")
            assert cur.fetchone()[0] == "postgres"
    finally:
        conn.close()
    assert _listening_addresses(postgres_server.port) == {"127.0.0.1"}


def test_databases_are_fresh_per_test(postgres_server: PostgresServer, postgres_url: str):
    assert postgres_url.startswith(f"postgresql+psycopg2://postgres@127.0.0.1:{postgres_server.port}/t_")
    dbname = postgres_url.rsplit("/", 1)[1]
    conn = postgres_server.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
            assert cur.fetchone()[0] == 0
    finally:
        conn.close()


def test_rdbstorage_shared_by_two_processes(postgres_url: str, tmp_path: Path):
    n_workers, n_trials = 2, 5
    storage = RDBStorage(postgres_url, **HEARTBEAT)
    study = optuna.create_study(study_name="two-procs", storage=storage, direction="minimize")

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, postgres_url, study.study_name, str(n_trials), str(barrier), str(n_workers)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(n_workers)
    ]
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out

    trials = study.get_trials(deepcopy=False)
    assert len(trials) == n_workers * n_trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.number for t in trials}) == n_workers * n_trials

    by_pid: dict[int, list] = {}
    for t in trials:
        by_pid.setdefault(t.user_attrs["pid"], []).append(t)
    assert sorted(by_pid) == sorted(p.pid for p in procs)
    assert all(len(ts) == n_trials for ts in by_pid.values())
    # The workers really ran at the same time: their trial time spans overlap.
    (a, b) = by_pid.values()
    span = lambda ts: (min(t.datetime_start for t in ts), max(t.datetime_complete for t in ts))  # noqa: E731
    (a0, a1), (b0, b1) = span(a), span(b)
    assert a0 < b1 and b0 < a1


def test_heartbeat_fails_stale_trials(postgres_url: str):
    storage = RDBStorage(postgres_url, **HEARTBEAT)
    study = optuna.create_study(study_name="stale", storage=storage)
    # A trial whose worker "died": one heartbeat, then silence.
    orphan = study.ask()
    storage.record_heartbeat(orphan._trial_id)
    time.sleep(HEARTBEAT["grace_period"] + 0.5)

    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)

    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {orphan.number: TrialState.FAIL, orphan.number + 1: TrialState.COMPLETE}


def test_stop_is_idempotent_and_cleans_up():
    ok, reason = PostgresServer.available()
    if not ok:
        pytest.skip(reason)
    server = PostgresServer()
    server.start()
    pid, base_dir = server.pid, server.base_dir
    assert base_dir.is_dir()
    server.stop()
    server.stop()
    assert server.pid is None
    assert not base_dir.exists()
    assert not Path(f"/proc/{pid}").exists()


def test_restart_keeps_port_and_data_and_closes_every_session(postgres_server: PostgresServer, postgres_url: str):
    import psycopg2

    dbname = postgres_url.rsplit("/", 1)[1]
    conn = postgres_server.connect(dbname)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (x int)")
        cur.execute("INSERT INTO kept VALUES (7)")
    pid, port = postgres_server.pid, postgres_server.port
    postgres_server.restart()
    assert postgres_server.pid != pid and postgres_server.port == port
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(psycopg2.OperationalError):  # the old session is gone
        conn.cursor().execute("SELECT 1")
    conn.close()
    again = postgres_server.connect(dbname)
    try:
        with again.cursor() as cur:
            cur.execute("SELECT x FROM kept")
            assert cur.fetchall() == [(7,)]
    finally:
        again.close()

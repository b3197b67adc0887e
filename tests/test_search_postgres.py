"""A study on a real PostgreSQL server: a worker killed mid-trial, its trial found by heartbeat and retried; the
server restarted mid-trial; a password in the storage URL that shows up nowhere."""

import datetime
import os
import signal
import subprocess
import sys
import time

import optuna
import optuna_dashboard
import pytest
from optuna.trial import TrialState
from search_helpers import write_study

from dpnas.cli import main
from dpnas.search import runner
from dpnas.search.runner import search, trial_budget
from dpnas.search.storage import open_storage, trial_slot_lock
from dpnas.search.study_file import load_study_file

SECRET = "sekret-xyz"


def bare(url: str) -> str:
    """The README's form: postgresql:// without a driver."""
    return url.replace("postgresql+psycopg2://", "postgresql://")


def wait_for_training_trial(worker: subprocess.Popen, storage, study_name: str, timeout: float = 240):
    """The first RUNNING trial that has recorded its privacy plan: it is training on the data now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"worker ended early: {worker.stderr.read()[-2000:]}"
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            time.sleep(0.2)
            continue
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "privacy_plan" in t.user_attrs]
        if running:
            return running[0]
        time.sleep(0.1)
    raise AssertionError("the worker never started a trial")


def wait_until_idle(server, dbname: str, timeout: float = 10) -> None:
    """Until no session on `dbname` is running a statement, so the restart closes idle connections only (a
    statement cut off mid-flight fails, whatever the client does)."""
    deadline = time.monotonic() + timeout
    conn = server.connect()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            while time.monotonic() < deadline:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
                            "AND state <> 'idle'", (dbname,))
                if cur.fetchone()[0] == 0:
                    return
                time.sleep(0.005)
    finally:
        conn.close()


def test_killed_worker_trial_is_retried_once_and_none_is_lost(tmp_path, postgres_url):
    extra = "heartbeat_interval = 1\ngrace_period = 3\nmax_retries = 2"
    path = write_study(tmp_path, n_trials=3, epochs=3, extra=extra)
    spec = load_study_file(path)
    worker = subprocess.Popen(
        [sys.executable, "-m", "dpnas", "search", str(path), "--storage", postgres_url, "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    storage = open_storage(postgres_url)
    victim = None
    deadline = time.monotonic() + 240
    try:
        while victim is None and time.monotonic() < deadline:
            assert worker.poll() is None, f"worker ended early: {worker.stderr.read()[-2000:]}"
            try:
                study = optuna.load_study(study_name=spec.name, storage=storage)
            except KeyError:
                time.sleep(0.2)
                continue
            running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "privacy_plan" in t.user_attrs]
            if running:  # the trial has started training on the data
                victim = running[0]
                os.kill(worker.pid, signal.SIGKILL)
            time.sleep(0.1)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    assert victim is not None, "the worker never started a trial"

    # a second worker joins the same study: it finds the dead trial by its stale heartbeat and retries it
    search(spec, storage_url=postgres_url, progress=False)

    study = optuna.load_study(study_name=spec.name, storage=open_storage(postgres_url))
    trials = study.get_trials()
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1  # retried exactly once
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == victim.params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3  # the budget, exactly: nothing lost or doubled
    assert trial_budget(study)[:2] == (3, 3)


def test_server_restart_mid_trial_loses_and_doubles_nothing(tmp_path, postgres_server, postgres_url):
    url, dbname = bare(postgres_url), postgres_url.rsplit("/", 1)[1]
    extra = "heartbeat_interval = 1\ngrace_period = 10\nmax_retries = 2"
    path = write_study(tmp_path, n_trials=2, epochs=2, extra=extra)
    spec = load_study_file(path)
    worker = subprocess.Popen(
        [sys.executable, "-m", "dpnas", "search", str(path), "--storage", url, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        victim = wait_for_training_trial(worker, open_storage(url), spec.name)
        postmaster = postgres_server.pid
        wait_until_idle(postgres_server, dbname)
        postgres_server.restart(down_s=1.0)  # every connection of the worker is closed; heartbeats meet no server
        back_at = datetime.datetime.now()
        assert postgres_server.pid != postmaster
        out, err = worker.communicate(timeout=300)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]  # the heartbeat thread too rode it out

    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    trials = study.get_trials()
    survivor = next(t for t in trials if t.number == victim.number)
    # the trial trained through the restart and was finished, every epoch's value kept
    assert survivor.state == TrialState.COMPLETE and survivor.datetime_complete > back_at
    assert sorted(survivor.intermediate_values) == [1, 2]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # nothing failed, retried or doubled
    assert trial_budget(study)[:2] == (2, 2)


def every_row(server, dbname: str) -> str:
    """Every value of every table in the database, as one string."""
    conn = server.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            tables = [row[0] for row in cur.fetchall()]
            rows = []
            for table in tables:
                cur.execute(f'SELECT * FROM "{table}"')
                rows += cur.fetchall()
    finally:
        conn.close()
    assert tables and rows
    return repr(rows)


def test_a_password_in_the_storage_url_shows_up_nowhere(tmp_path, postgres_server, postgres_url, capfd, monkeypatch):
    dbname, port = postgres_url.rsplit("/", 1)[1], postgres_server.port
    role = "pw_" + dbname[-10:]
    postgres_server.create_password_role(role, SECRET, dbname)  # the server checks it (SCRAM), it trusts no one else
    url = f"postgresql://{role}:{SECRET}@127.0.0.1:{port}/{dbname}"
    path = write_study(tmp_path, n_trials=1, epochs=1)
    run = subprocess.run([sys.executable, "-m", "dpnas", "search", str(path), "--storage", url, "--quiet"],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:].replace(SECRET, "<SECRET>")
    printed = [run.stdout, run.stderr]
    # the commands it prints run as they are where PGPASSWORD or ~/.pgpass gives the password
    assert f"open it with: optuna-dashboard postgresql+psycopg2://{role}@127.0.0.1:{port}/{dbname}\n" in run.stdout
    assert f"dpnas best postgresql://{role}@127.0.0.1:{port}/{dbname} " in run.stdout

    for argv in (["best", url, "--out", str(tmp_path / "best.toml")], ["privacy", url], ["privacy", url, "--json"]):
        assert main(argv) == 0
        printed += capfd.readouterr()
    for argv in (["privacy", url.replace(dbname, "no_such_db")],  # the server refuses
                 ["privacy", url.replace("postgresql://", "postgres://")],  # dpnas refuses the scheme
                 ["best", url, "--study-name", "no_such_study"]):  # the storage opens; the study is not there
        assert main(argv) == 2
        out, err = capfd.readouterr()
        printed += [out, err]
        assert err.count("\n") == 1 and f"{role}:***@" in err, err.replace(SECRET, "<SECRET>")
    leaks = [text for text in printed if SECRET in text]
    assert not leaks, [text.replace(SECRET, "<SECRET>") for text in leaks]

    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    note = optuna_dashboard.get_note(study)
    assert "Open with:" in note and SECRET not in note
    attrs = [study.user_attrs, study._storage.get_study_system_attrs(study._study_id)]
    attrs += [(t.user_attrs, t.system_attrs) for t in study.get_trials()]
    assert SECRET not in repr(attrs)
    assert SECRET not in every_row(postgres_server, dbname)

    # the password kept off the command line: libpq reads PGPASSWORD or ~/.pgpass (here PGPASSFILE) for psycopg2
    without = f"postgresql://{role}@127.0.0.1:{port}/{dbname}"
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no.pgpass"))
    assert main(["privacy", without]) == 2  # it is checked
    assert "no password supplied" in capfd.readouterr().err
    monkeypatch.setenv("PGPASSWORD", SECRET)
    assert main(["privacy", without]) == 0
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:{dbname}:{role}:{SECRET}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    assert main(["privacy", without]) == 0


def _terminate_slot_lock_holder(server, dbname: str) -> None:
    """End the session that holds dpnas's advisory slot lock (the lock goes with it), as the server does to every
    session when it restarts, and wait until it is gone."""
    conn = server.connect(dbname)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            # this test's database only: the server is shared by the session's other tests
            cur.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())")
            holders = [row[0] for row in cur.fetchall()]
            assert len(holders) == 1, holders
            cur.execute("SELECT pg_terminate_backend(%s)", (holders[0],))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (holders[0],))
                if cur.fetchone()[0] == 0:
                    return
                time.sleep(0.01)
    finally:
        conn.close()
    raise AssertionError("the slot lock's session did not end")


@pytest.mark.parametrize("loss", ["terminated", "restarted"])
def test_a_worker_whose_slot_lock_was_lost_mid_hold_does_not_train_a_run_too_many(tmp_path, postgres_server,
                                                                                   postgres_url, monkeypatch, loss):
    """The advisory slot lock lives in one server session: a killed backend (pg_terminate_backend) or a server
    restart ends it while the worker is still deciding under it. The worker went on from a budget read that no
    longer held: another worker took the lock, and the last slot with it, and both trained it (2 runs of a budget
    of 1, the study's epsilon statement wrong). The holder now finds its lock gone before its trial touches the
    data, and gives the trial back untrained."""
    dbname = postgres_url.rsplit("/", 1)[1]
    spec = load_study_file(write_study(tmp_path, n_trials=1, epochs=1))
    real_budget = runner.trial_budget
    trained, lost = [], []

    def trained_at_once(study, trial, *args, **kwargs):
        trained.append(trial.number)
        study.tell(trial, 0.5)
        return f"trial {trial.number} done"

    def budget_read_then_lock_lost(study):
        seen = real_budget(study)
        if not lost:  # worker A has read the budget (one slot left) under its lock: now the lock goes
            lost.append(loss)
            if loss == "terminated":
                _terminate_slot_lock_holder(postgres_server, dbname)
            else:
                wait_until_idle(postgres_server, dbname)
                postgres_server.restart()
            # worker B (another host) takes the lock A no longer holds, and the last slot
            runner.run_worker(spec, postgres_url, worker_index=1, progress=False)
            assert trained == [0]
        return seen

    monkeypatch.setattr(runner, "run_trial", trained_at_once)
    monkeypatch.setattr(runner, "trial_budget", budget_read_then_lock_lost)
    runner.run_worker(spec, postgres_url, progress=False)  # worker A

    assert lost and trained == [0]  # one run, the budget's one: A never trained on its stale read
    study = optuna.load_study(study_name=spec.name, storage=open_storage(postgres_url))
    assert trial_budget(study)[:2] == (1, len(study.get_trials(states=(TrialState.WAITING,))) + 1)
    assert not study.get_trials(states=(TrialState.RUNNING,))  # nothing left running


def test_the_slot_lock_says_whether_it_is_still_held_and_a_wait_for_it_outlives_a_restart(postgres_server,
                                                                                          postgres_url):
    """A session's advisory lock ends with the session: `held()` says so. A worker waiting for the lock when the
    server restarted failed with "server closed the connection" (at a trial's end, that would leave its finished
    trial running, to be trained again); it now waits on a new connection and gets the lock the restart released."""
    import threading

    dbname = postgres_url.rsplit("/", 1)[1]
    holder, waiter = open_storage(postgres_url), open_storage(postgres_url)
    with trial_slot_lock(holder, postgres_url) as slot:
        assert slot.held()
        _terminate_slot_lock_holder(postgres_server, dbname)
        assert not slot.held()
    got = []

    def wait_for_the_lock():
        try:
            with trial_slot_lock(waiter, postgres_url) as taken:
                got.append(taken.held())
        except Exception as err:  # noqa: BLE001 - the test says what it was
            got.append(err)

    with trial_slot_lock(holder, postgres_url) as slot:
        thread = threading.Thread(target=wait_for_the_lock)
        thread.start()
        deadline = time.monotonic() + 10
        while not _lock_waiters(postgres_server, dbname) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _lock_waiters(postgres_server, dbname) == 1
        postgres_server.restart(down_s=0.5)
        thread.join(timeout=90)
        assert got == [True]  # the waiter got the lock, and held it
        assert not slot.held()  # the holder's went with its session
    with trial_slot_lock(holder, postgres_url) as slot:  # taken again afterwards, on a new session
        assert slot.held()


def _lock_waiters(server, dbname: str) -> int:
    conn = server.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())")
            return cur.fetchone()[0]
    finally:
        conn.close()

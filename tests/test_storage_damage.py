"""A damaged storage file loses nothing that was whole: a journal is saved aside and cut to its last whole record
before the next write (reads leave it alone); a damaged SQLite file is refused in one line and never written to.

One real study is searched once; every case damages a copy of its journal the way a crash or a full disk would.
"""

import fcntl
import hashlib
import logging
import shutil
import threading
import time

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState
from search_helpers import write_study

from dpnas.arch.space import ConfigError
from dpnas.cli import main
from dpnas.search.runner import search
from dpnas.search.storage import open_storage
from dpnas.search.study_file import load_study_file

REPAIR_LOGGER = "dpnas.search.journal_repair"
USED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished two-trial study: its folder (study file, journal, weights)."""
    directory = tmp_path_factory.mktemp("searched")
    search(load_study_file(write_study(directory, n_trials=2, epochs=1)), progress=False)
    return directory


def _lines(data):
    return data.splitlines(keepends=True)


def _after_first_finished_trial(lines):
    """Index of a line a few records after trial 0's completion: cutting there keeps exactly one finished trial."""
    first_done = next(i for i, line in enumerate(lines) if line.startswith(b'{"op_code":6') and b'"state":1' in line)
    return first_done + 3


def _flip(data, at, count=12):
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + count]) + data[at + count:]


# name -> (damage(journal bytes) -> (damaged bytes, how many of them are whole records), finished trials kept)
def _cut_in_last_line(data):
    """A crash while trial 1's completion was written: its record is the file's last, cut short. (The journal may
    end with the removal of the weights trial 1 displaced, written after its completion: not reached.)"""
    lines = _lines(data)
    last_done = max(i for i, line in enumerate(lines) if line.startswith(b'{"op_code":6') and b'"state":1' in line)
    kept = sum(map(len, lines[:last_done]))
    return data[:kept + len(lines[last_done]) - 40], kept


def _newline_lost(data):
    """A crash after trial 1's completion record was written but before its newline: the line is whole JSON, yet
    the next record appended to it would be glued onto it, one line that is no JSON with records after it (every
    later record unreadable, the journal refused). It is damage like any other cut."""
    lines = _lines(data)
    last_done = max(i for i, line in enumerate(lines) if line.startswith(b'{"op_code":6') and b'"state":1' in line)
    kept = sum(map(len, lines[:last_done]))
    return data[:kept + len(lines[last_done]) - 1], kept


def _cut_at_line_boundary(data):
    kept = sum(map(len, _lines(data)[:_after_first_finished_trial(_lines(data))]))
    return data[:kept], kept


def _cut_inside_a_line(data):
    lines = _lines(data)
    k = _after_first_finished_trial(lines)
    kept = sum(map(len, lines[:k]))
    return data[:kept + len(lines[k]) // 2], kept


def _zeros_appended(data):
    return data + bytes(4096), len(data)


def _half_a_record_appended(data):
    return data + b'{"op_code":6,"worker_id":"0b64feac-1","trial_id":1,"sta\n', len(data)


def _bytes_flipped_mid_file(data):
    lines = _lines(data)
    kept = sum(map(len, lines[:_after_first_finished_trial(lines)]))
    return _flip(data, kept + 20), kept


DAMAGE = {
    "cut_in_last_line": (_cut_in_last_line, 1),  # the last line is trial 1's completion
    "newline_lost": (_newline_lost, 1),
    "cut_at_line_boundary": (_cut_at_line_boundary, 1),  # not damage: fewer records
    "cut_inside_a_line": (_cut_inside_a_line, 1),
    "zeros_appended": (_zeros_appended, 2),
    "half_a_record_appended": (_half_a_record_appended, 2),
}


def _finished(storage):
    study = optuna.load_study(study_name="tiny", storage=storage)
    return {t.number: (t.state, t.values) for t in study.get_trials() if t.state.is_finished()}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_journal_keeps_its_whole_records_and_the_study_goes_on(searched, tmp_path, case, caplog):
    damage, finished_kept = DAMAGE[case]
    shutil.copytree(searched, tmp_path, dirs_exist_ok=True)
    journal = tmp_path / "tiny.journal"
    original = journal.read_bytes()
    damaged, kept = damage(original)
    journal.write_bytes(damaged)
    is_damage = kept < len(damaged)
    # What plain Optuna makes of the whole records alone is what must survive.
    (tmp_path / "prefix.journal").write_bytes(damaged[:kept])
    prefix = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(tmp_path / "prefix.journal"))))
    expected = {t.number: (t.state, t.values) for t in prefix.get_trials() if t.state.is_finished()}
    assert len(expected) == finished_kept and all(state == TrialState.COMPLETE for state, _ in expected.values())
    caplog.set_level(logging.WARNING, logger=REPAIR_LOGGER)

    # Reading leaves the file as it is, and sees the finished trials.
    study_file = str(tmp_path / "tiny.toml")
    assert main(["best", study_file, "--out", str(tmp_path / "best.toml")]) == 0
    assert main(["privacy", study_file]) == 0
    assert journal.read_bytes() == damaged
    assert _finished(open_storage(str(journal), must_exist=True)) == expected
    assert journal.read_bytes() == damaged and not list(tmp_path.glob("tiny.journal.damaged-*"))
    assert bool(caplog.records) == is_damage

    # The next search saves the damaged file aside, cuts it to its whole records and adds a trial.
    caplog.clear()
    used = sum(t.state in USED for t in prefix.get_trials())
    study = search(load_study_file(study_file), n_trials=used + 1, progress=False)
    after = journal.read_bytes()
    assert after.startswith(damaged[:kept]) and len(after) > kept
    backups = list(tmp_path.glob("tiny.journal.damaged-*"))
    if is_damage:
        assert len(backups) == 1 and backups[0].read_bytes() == damaged
        message = " ".join(r.getMessage() for r in caplog.records)
        assert len(caplog.records) == 1 and "\n" not in message
        assert f"damaged at byte {kept} " in message and f"{len(damaged) - kept} bytes" in message
        assert str(backups[0]) in message
    else:
        assert backups == [] and caplog.records == []
    now = _finished(open_storage(str(journal)))
    assert {n: now[n] for n in expected} == expected
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(complete) == finished_kept + 1
    assert main(["best", study_file, "--out", str(tmp_path / "best-after.toml")]) == 0


def test_damage_with_whole_records_after_it_is_refused_not_cut(searched, tmp_path, capsys):
    """Bytes changed in place in the middle: cutting there used to drop the finished trial after it, and the record
    of the privacy it spent (a total-ε study then spent its budget again). The search refuses, the file is left as
    it is, and `dpnas privacy` makes no statement from the records before the damage; `best` still reads them."""
    shutil.copytree(searched, tmp_path, dirs_exist_ok=True)
    journal = tmp_path / "tiny.journal"
    damaged, kept = _bytes_flipped_mid_file(journal.read_bytes())
    journal.write_bytes(damaged)
    study_file = str(tmp_path / "tiny.toml")
    assert main(["best", study_file, "--out", str(tmp_path / "best.toml")]) == 0
    assert "search's epsilon, not stated: the study's storage is damaged" in (tmp_path / "best.toml").read_text()
    assert main(["privacy", study_file]) == 2
    assert "may hold runs that spent privacy" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"damaged at byte {kept} .* does not cut whole records off") as refused:
        search(load_study_file(study_file), n_trials=3, progress=False)
    assert f"truncate -s {kept} " in str(refused.value)
    assert journal.read_bytes() == damaged and not list(tmp_path.glob("tiny.journal.damaged-*"))
    assert main(["search", study_file, "--quiet", "--n-trials", "3"]) == 2  # one line, no traceback
    assert "Traceback" not in capsys.readouterr().err and journal.read_bytes() == damaged


def _small_journal(path, n_trials=3):
    """A real journal written by plain Optuna, without training anything."""
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(path))))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=n_trials)
    return path


def test_every_repair_keeps_its_own_backup(tmp_path):
    journal = _small_journal(tmp_path / "s.journal")
    whole = journal.read_bytes()
    saved = []
    for garbage in (b'{"op_code":4,"wor', bytes(100)):
        journal.write_bytes(whole + garbage)
        open_storage(str(journal))
        saved.append(whole + garbage)
        assert journal.read_bytes() == whole
    backups = sorted(tmp_path.glob("s.journal.damaged-*"), key=lambda p: p.stat().st_mtime_ns)
    assert [b.read_bytes() for b in backups] == saved


def test_damage_that_appears_while_a_study_runs_is_cut_before_the_next_append(tmp_path):
    journal = _small_journal(tmp_path / "s.journal")
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(journal)))
    whole = journal.read_bytes()
    with open(journal, "ab") as handle:  # another worker died mid-write
        handle.write(b'{"op_code":8,"worker_id":"x","trial_id":2,"user_a')
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert journal.read_bytes().startswith(whole)
    fresh = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state for t in fresh.get_trials()] == [TrialState.COMPLETE] * 5
    assert [b.read_bytes()[len(whole):] for b in tmp_path.glob("s.journal.damaged-*")] == [
        b'{"op_code":8,"worker_id":"x","trial_id":2,"user_a']


def _hold_optuna_lock(journal):
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()
    return lock.release


def _hold_dpnas_lock(journal):
    handle = open(journal.with_name(journal.name + ".dpnas-lock"), "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle.close


@pytest.mark.parametrize("hold", [_hold_optuna_lock, _hold_dpnas_lock], ids=["optuna_writers_lock", "dpnas_lock"])
def test_a_repair_waits_for_the_locks_writers_hold(tmp_path, hold):
    journal = _small_journal(tmp_path / "s.journal")
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code":4,"wor')
    release = hold(journal)
    opening = threading.Thread(target=open_storage, args=(str(journal),))
    opening.start()
    time.sleep(0.5)
    assert opening.is_alive() and journal.read_bytes() == whole + b'{"op_code":4,"wor'
    release()
    opening.join(timeout=30)
    assert not opening.is_alive() and journal.read_bytes() == whole


def _small_database(path):
    url = f"sqlite:///{path}"
    storage = open_storage(url)
    optuna.create_study(study_name="tiny", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=10)
    storage.engine.dispose()
    return url


SQLITE_DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage_header": lambda data: bytes(range(7, 107)) + data[100:],
    "not_a_database": lambda data: b"these are not the pages you are looking for\n" * 100,
}


@pytest.mark.parametrize("case", SQLITE_DAMAGE)
def test_a_damaged_sqlite_file_is_refused_in_one_line_and_left_untouched(tmp_path, case, capsys):
    db = tmp_path / "s.db"
    url = _small_database(db)
    db.write_bytes(SQLITE_DAMAGE[case](db.read_bytes()))
    before = _sha(db)
    for must_exist in (False, True):
        with pytest.raises(ConfigError, match="SQLite file is damaged") as refused:
            open_storage(url, must_exist=must_exist)
        assert "\n" not in str(refused.value)
    assert main(["best", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged" in err
    assert _sha(db) == before and [p.name for p in tmp_path.iterdir()] == ["s.db"]


def test_a_whole_or_new_sqlite_file_opens_as_before(tmp_path):
    url = _small_database(tmp_path / "s.db")
    assert len(optuna.load_study(study_name="tiny", storage=open_storage(url, must_exist=True)).trials) == 10
    fresh = tmp_path / "new.db"
    optuna.create_study(study_name="n", storage=open_storage(f"sqlite:///{fresh}"))
    assert fresh.exists()


# --- trials whose worker died, however it died -------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_a_trial_whose_worker_died_before_recording_itself_is_retried(tmp_path, storage):
    """`ask` and the `worker` attribute are two writes: a worker killed between them left a RUNNING trial with no
    owner, which no resume ever failed (the study never reached n_trials; on SQLite the search waited forever for a
    heartbeat that never came). Under the slot lock such a trial can only be an orphan."""
    from dpnas.search.study_state import open_study

    spec = load_study_file(write_study(tmp_path, n_trials=2, epochs=1))
    url = str(tmp_path / "tiny.journal") if storage == "journal" else f"sqlite:///{tmp_path / 'tiny.db'}"
    open_study(spec, url).ask()  # taken, then the worker was killed
    study = search(spec, storage_url=url, progress=False, timeout=120)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["failure_reason"] == "its worker process died before it recorded itself"
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


def test_a_trial_whose_pid_now_runs_another_process_is_retried(tmp_path):
    """A restarted container keeps its host name and reuses pids: a trial whose recorded pid runs a process that
    started later was taken for alive, and held its slot forever."""
    import os

    from dpnas.search.study_state import _recover_orphans, open_study, worker_identity

    spec = load_study_file(write_study(tmp_path, n_trials=2, epochs=1))
    study = open_study(spec, str(tmp_path / "tiny.journal"))
    mine, earlier = study.ask(), study.ask()
    identity = worker_identity()
    if "worker_process" not in identity:
        pytest.skip("no /proc: process start times cannot be read here")
    for trial, started in ((mine, identity["worker_process"]), (earlier, "an earlier boot:0")):
        trial.set_user_attr("worker", identity["worker"])  # this live pid
        trial.set_user_attr("worker_process", started)
    _recover_orphans(study, spec)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[mine.number] == TrialState.RUNNING  # its process is this one: alive
    assert states[earlier.number] == TrialState.FAIL  # the pid runs, but not the process that took the trial
    assert f"worker process {os.getpid()} died" in study.get_trials()[earlier.number].user_attrs["failure_reason"]


def test_a_trial_of_a_worker_whose_pids_are_not_this_host_s_is_left_to_the_heartbeat(tmp_path):
    """Containers with the host's network (one per GPU, say) share its host name but not its pids, and machines can
    share a name: a worker read another's pid in its own /proc, found none (or another process), and failed that
    worker's live trial, which was then trained again (its epsilon spent twice) while the first run's result was
    refused at its end. Where heartbeats find dead workers, such a trial is left to them."""
    import os
    import socket

    from dpnas.search.study_state import _recover_orphans, open_study

    spec = load_study_file(write_study(tmp_path, n_trials=3, epochs=1))
    study = open_study(spec, f"sqlite:///{tmp_path / 'tiny.db'}")  # a heartbeat storage
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    other_namespace, other_boot, here = study.ask(), study.ask(), study.ask()
    for trial, attrs in ((other_namespace, {"worker_pid_namespace": "pid:[1]"}),
                         (other_boot, {"worker_process": "another boot:0"}), (here, {})):
        trial.set_user_attr("worker", f"{socket.gethostname()}:{dead}")  # a pid that is no process here
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    _recover_orphans(study, spec)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[other_namespace.number] == states[other_boot.number] == TrialState.RUNNING
    assert states[here.number] == TrialState.FAIL  # a pid of this host's own: its worker died


def test_a_trial_whose_worker_is_a_zombie_is_retried(tmp_path):
    """A worker of `--workers K` killed (SIGKILL) while the search's process joins another worker stays a zombie
    until it is reaped, and signal 0 still reaches a zombie: its trial was taken for alive, so the other workers
    never retried it; on SQLite they waited out the heartbeat's grace period (182 s for the quickstart)."""
    import os
    import socket

    from dpnas.search.study_state import _process_start, _recover_orphans, open_study

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc: a zombie cannot be told from a running process here")
    spec = load_study_file(write_study(tmp_path, n_trials=2, epochs=1))
    study = open_study(spec, str(tmp_path / "tiny.journal"))
    trial = study.ask()
    pid = os.fork()
    if pid == 0:  # the worker, killed
        os._exit(0)
    try:
        for _ in range(500):  # until it has exited, unreaped
            stat = open(f"/proc/{pid}/stat").read()
            if stat[stat.rindex(")") + 2:].startswith("Z"):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the child did not become a zombie")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{pid}")
        started = _process_start(pid)
        if started is not None:
            trial.set_user_attr("worker_process", started)
        _recover_orphans(study, spec)
    finally:
        os.waitpid(pid, 0)
    recovered = study.get_trials()[trial.number]
    assert recovered.state == TrialState.FAIL
    assert recovered.user_attrs["failure_reason"] == f"worker process {pid} died"
    assert any(t.state == TrialState.WAITING for t in study.get_trials())  # and retried


@pytest.mark.parametrize("max_retries", [0, 1])
def test_a_dead_worker_s_trial_is_run_again_at_most_max_retries_times(tmp_path, max_retries):
    """A trial that kills its worker every time (the kernel's OOM killer) is run max_retries times more, not one
    more: each run touches the data and is charged; max_retries = 0 promises a crashed trial is not retried."""
    import os
    import socket

    from dpnas.search.study_state import _recover_orphans, open_study

    spec = load_study_file(write_study(tmp_path, n_trials=1, epochs=1, extra=f"max_retries = {max_retries}"))
    study = open_study(spec, str(tmp_path / "tiny.journal"))
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    for _ in range(max_retries + 3):
        trial = study.ask()  # the queued retry, while there is one
        trial.set_user_attr("worker", f"{socket.gethostname()}:{dead}")  # then its worker died
        _recover_orphans(study, spec)
        if not any(t.state == TrialState.WAITING for t in study.get_trials()):
            break
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * (max_retries + 1)


def test_a_check_or_a_refused_search_leaves_a_damaged_journal_as_it_is(searched, tmp_path, capsys):
    shutil.copytree(searched, tmp_path, dirs_exist_ok=True)
    journal = tmp_path / "tiny.journal"
    damaged = _cut_in_last_line(journal.read_bytes())[0]
    journal.write_bytes(damaged)
    study_file = tmp_path / "tiny.toml"
    assert main(["search", str(study_file), "--check"]) == 0
    study_file.write_text(study_file.read_text().replace("delta = 1e-5", "delta = 1e-6"))
    assert main(["search", str(study_file), "--quiet"]) == 2  # a changed budget: refused
    capsys.readouterr()
    assert journal.read_bytes() == damaged and not list(tmp_path.glob("tiny.journal.damaged-*"))


def test_a_journal_that_cannot_be_locked_is_not_called_damaged(tmp_path, monkeypatch):
    import errno

    from dpnas.search import journal_repair

    journal = _small_journal(tmp_path / "s.journal")

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(journal) + ".lock")

    monkeypatch.setattr(journal_repair.WholeJournalFileBackend, "repair", denied)
    with pytest.raises(ConfigError, match="cannot be locked, read or repaired") as refused:
        open_storage(str(journal))
    assert "damaged" not in str(refused.value)

"""Ctrl-C as a user presses it: SIGINT to a running command keeps what was finished. SIGTERM (a cluster scheduler's
warning before its SIGKILL, `kill PID`) is the same to a search."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from search_helpers import write_study

from dpnas.dp.interrupts import interrupts_held, terminate_as_interrupt
from dpnas.search.storage import open_storage


def start(argv):
    # A shell starts background jobs with SIGINT ignored, and children inherit that: give the command the
    # disposition a terminal user has, wherever pytest itself was started.
    process = subprocess.Popen([sys.executable, "-m", "dpnas", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []

    def read():  # character by character: a progress bar redraws its line with \r, never ending it
        for char in iter(lambda: process.stderr.read(1), ""):
            seen.append(char)

    threading.Thread(target=read, daemon=True).start()
    return process, seen


def wait_for(predicate, seconds=180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_ctrl_c_during_train_writes_the_finished_epochs(tmp_path):
    out = tmp_path / "result.json"
    # minutes of small steps (a long run at a moderate noise level, whose epsilon is quick to compute):
    # it must still be training when Ctrl-C comes
    process, seen = start(["train", "tiny", "--epochs", "200", "--batch-size", "16", "--out", str(out)])
    try:
        # wait until the progress bar shows an epoch finished, then press Ctrl-C
        assert wait_for(lambda: "epoch=2" in "".join(seen)), "".join(seen)[-2000:]
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
    finally:
        process.kill()  # a no-op when it has exited; never leave a training process behind a failed test
    assert process.returncode == 130, stdout
    result = json.loads(out.read_text())
    assert result["interrupted"] is True
    assert 0 < result["steps"] < result["planned_steps"]
    assert 0 < result["epsilon_spent"] < result["epsilon_target"]
    assert "interrupted after" in stdout


def test_ctrl_c_during_search_leaves_a_resumable_study(tmp_path):
    path = write_study(tmp_path, n_trials=3, epochs=40)
    storage_path = tmp_path / "tiny.journal"
    process, _ = start(["search", str(path), "--quiet"])
    try:
        _interrupt_search(process, storage_path)
    finally:
        process.kill()


def test_sigterm_during_search_leaves_a_resumable_study(tmp_path):
    """A scheduler's SIGTERM ended the search at once (Python's default), its trial left RUNNING: a requeued job on
    another node never took it for an orphan (its pid is not that node's), so its slot was lost for good and the
    study ended a trial short. Now it is Ctrl-C: the trial is failed and its retry queued, for any host to take."""
    path = write_study(tmp_path, n_trials=3, epochs=40)
    storage_path = tmp_path / "tiny.journal"
    process, _ = start(["search", str(path), "--quiet"])
    try:
        _interrupt_search(process, storage_path, signal.SIGTERM)
    finally:
        process.kill()


def test_sigterm_while_a_trial_is_recorded_waits_for_the_record():
    """SIGTERM is held like Ctrl-C while a finished trial is recorded: landing between its results and its COMPLETE
    it left the trial RUNNING, trained again by the resumed study (its epsilon spent twice)."""
    recorded = []
    with terminate_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # a Python signal handler runs between bytecodes: unheld, it raised here
                recorded.append(True)
        assert recorded
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _training(storage_path) -> int:
    """How many trials of the study are training now (0 before its storage or study exists)."""
    if not storage_path.exists():
        return 0
    try:
        study = optuna.load_study(study_name="tiny", storage=open_storage(str(storage_path)))
    except KeyError:
        return 0
    return sum("privacy_plan" in t.user_attrs for t in study.get_trials(states=(TrialState.RUNNING,)))


def _interrupt_search(process, storage_path, signum=signal.SIGINT):
    assert wait_for(lambda: _training(storage_path) > 0), "no trial started training"
    process.send_signal(signum)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "run the same command again to continue" in stdout
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(storage_path)))
    states = [t.state for t in study.get_trials()]
    assert TrialState.RUNNING not in states  # the bookkeeping finished: nothing left dangling
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.WAITING) == 1


def test_sigterm_to_a_search_s_process_alone_stops_its_workers(tmp_path):
    """`kill PID` (or a container's PID 1) signals the search's process, not its workers: it waited for them to
    train every trial. It passes the SIGTERM on: each worker's trial is failed and queued again, as on Ctrl-C."""
    path = write_study(tmp_path, n_trials=4, epochs=40)
    storage_path = tmp_path / "tiny.journal"
    process, _ = start(["search", str(path), "--quiet", "--workers", "2"])

    try:
        assert wait_for(lambda: _training(storage_path) == 2), "the two workers did not both start training"
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(storage_path)))
    states = [t.state for t in study.get_trials()]
    assert TrialState.RUNNING not in states and TrialState.COMPLETE not in states
    assert states.count(TrialState.FAIL) == 2 and states.count(TrialState.WAITING) == 2

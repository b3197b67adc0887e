"""Ctrl-C as a user presses it: SIGINT to a running command keeps what was finished."""

import json
import signal
import subprocess
import sys
import threading
import time

import optuna
from optuna.trial import TrialState
from search_helpers import write_study

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


def _interrupt_search(process, storage_path):

    def training():
        if not storage_path.exists():
            return False
        try:
            study = optuna.load_study(study_name="tiny", storage=open_storage(str(storage_path)))
        except KeyError:
            return False
        return any("privacy_plan" in t.user_attrs for t in study.get_trials(states=(TrialState.RUNNING,)))

    assert wait_for(training), "no trial started training"
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "run the same command again to continue" in stdout
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(storage_path)))
    states = [t.state for t in study.get_trials()]
    assert TrialState.RUNNING not in states  # the bookkeeping finished: nothing left dangling
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.WAITING) == 1

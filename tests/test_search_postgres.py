"""A study on a real PostgreSQL server: a worker killed mid-trial, its trial found by heartbeat and retried."""

import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState
from search_helpers import write_study

from dpnas.search.runner import search, trial_budget
from dpnas.search.storage import open_storage
from dpnas.search.study_file import load_study_file


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

"""Architecture search end to end on tiny real data: trials, budgets, failures, resumption, readers."""

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
from optuna.trial import TrialState
from search_helpers import write_study

import dpnas.search.runner as search_module
from dpnas.arch.space import ConfigError
from dpnas.cli import main
from dpnas.dp.train import DivergedError
from dpnas.search.runner import best_trials, check_search, search, trial_budget
from dpnas.search.storage import open_storage, storage_kind
from dpnas.search.study_file import load_study_file
from dpnas.search.study_privacy import study_privacy

ATTRS = {"epsilon_spent", "noise_multiplier", "params", "samples_per_second", "wall_seconds", "test_accuracy",
         "privacy_plan", "config", "val_accuracy"}


def load(spec):
    return optuna.load_study(study_name=spec.name, storage=open_storage(spec.default_storage()))


def trained(study):
    """The trials that trained: a proposal repeating one of them is recorded untrained, as duplicate_of."""
    return [t for t in study.get_trials() if "duplicate_of" not in t.user_attrs]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One 3-trial study run through the command line, shared by the read-only tests below."""
    directory = tmp_path_factory.mktemp("study")
    path = write_study(directory, n_trials=3, epochs=2, pruner="median")
    assert main(["search", str(path), "--quiet"]) == 0
    spec = load_study_file(path)
    return spec, load(spec)


def test_every_trial_trains_at_the_budget_and_records_its_cost(finished):
    spec, study = finished
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert ATTRS <= set(t.user_attrs)
        assert 0.99 * 4.0 <= t.user_attrs["epsilon_spent"] <= 4.0
        assert set(t.params) == {"activation", "width"}
        assert t.user_attrs["config"]["activation"] == t.params["activation"]
        # selection uses the validation accuracy, never the test accuracy
        assert t.value == t.user_attrs["val_accuracy"]
        assert sorted(t.intermediate_values) == [1, 2]  # learning curve, one point per epoch


def test_study_note_and_metadata_for_the_dashboard(finished):
    spec, study = finished
    assert study.metric_names == ["val_accuracy"]
    assert study.user_attrs["epsilon"] == 4.0 and study.user_attrs["dataset"] == "digits"
    from optuna_dashboard._note import get_note_from_system_attrs

    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    note = get_note_from_system_attrs(system_attrs, None)["body"]
    assert "Privacy cost of the search" in note and "Best architecture" in note and "optuna-dashboard" in note


def test_best_exports_an_architecture_that_describe_and_train_take(finished, tmp_path, capsys):
    spec, study = finished
    out = tmp_path / "best.toml"
    assert main(["best", str(spec.path), "--out", str(out)]) == 0
    best = study.best_trial
    assert main(["describe", str(out), "--json"]) == 0
    described = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert described["config"] == best.user_attrs["config"]


def test_privacy_report_composes_a_fixed_number_of_trials(finished, capsys):
    spec, study = finished
    report = study_privacy(study)
    assert report.mode == "fixed" and report.runs == 3
    assert report.epsilon > report.per_run_epsilon  # three runs cost more than one
    assert main(["privacy", str(spec.path)]) == 0
    out = capsys.readouterr().out
    assert "3 runs touched the data" in out and "releasing the best trial" in out
    assert "validation records" in out and "test records: every trial" in out


def test_running_again_continues_without_redoing_trials(finished):
    spec, study = finished
    assert main(["search", str(spec.path), "--quiet"]) == 0
    assert len(load(spec).get_trials()) == 3  # budget already used: nothing new


def test_more_trials_extend_the_study_exactly(tmp_path):
    path = write_study(tmp_path, n_trials=1)
    spec = load_study_file(path)
    search(spec, progress=False)
    search(spec, n_trials=3, progress=False)
    trials = trained(load(spec))
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)


def _spy_start_method(monkeypatch) -> list:
    import multiprocessing

    used = []
    real = multiprocessing.get_context
    monkeypatch.setattr(search_module.multiprocessing, "get_context", lambda m: used.append(m) or real(m))
    return used


def test_two_worker_processes_share_one_journal_and_finish_exactly(tmp_path, monkeypatch):
    used = _spy_start_method(monkeypatch)
    monkeypatch.setattr(search_module.os, "sched_getaffinity", lambda pid: {0, 1})  # one core per worker, any machine
    spec = load_study_file(write_study(tmp_path, n_trials=4))
    search(spec, workers=2, progress=False)
    assert used == ["fork"]  # on the CPU: the workers start at once, with the data already loaded
    trials = trained(load(spec))
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials


def test_every_trial_is_taken_under_the_study_s_slot_lock(tmp_path, monkeypatch):
    """Budgets are exact across workers only while "is a slot left? then take a trial" runs under the slot lock: a
    worker that asks outside it can take the slot another worker is taking (a trial past n_trials, a run past a
    total-epsilon budget). Two real workers hit that race only by chance; here, while `ask` runs, the lock is held."""
    import fcntl

    spec = load_study_file(write_study(tmp_path, n_trials=2))
    lock = tmp_path / "tiny.journal.dpnas-lock"
    held = []
    real_ask = optuna.Study.ask

    def ask(self, *args, **kwargs):
        if self.study_name == "tiny":  # not the checks' scratch study in memory
            with open(lock, "a+") as handle:  # another open file: its flock conflicts with this process's own
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.append(True)
                else:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    held.append(False)
        return real_ask(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "ask", ask)
    search(spec, progress=False)
    assert held == [True, True]


def test_spawned_workers_as_with_cuda_finish_the_study_too(tmp_path, monkeypatch):
    assert not search_module._can_fork(["cuda:0", "cuda:1"]) and not search_module._can_fork(["cpu", "cuda"])
    used = _spy_start_method(monkeypatch)
    monkeypatch.setattr(search_module, "_can_fork", lambda devices, threads: False)  # what a CUDA machine does
    spec = load_study_file(write_study(tmp_path, n_trials=2))
    search(spec, workers=2, device="cpu", progress=False)
    assert used == ["spawn"]
    trials = trained(load(spec))
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)


CPU_WORKERS_OF_TWO_THREADS = """
import multiprocessing, os, sys
import optuna
import dpnas.search.runner as runner
from dpnas.search.study_file import load_study_file
os.sched_getaffinity = lambda pid: {0, 1, 2, 3}  # two cores per worker: each worker runs 2 threads
used = []
real = multiprocessing.get_context
runner.multiprocessing.get_context = lambda method: used.append(method) or real(method)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # as `dpnas search` does: the workers keep it
runner.search(load_study_file(sys.argv[1]), workers=2, progress=False)
print("start methods:", used)
"""


def test_workers_share_the_cores_this_process_may_run_on(monkeypatch):
    # taskset or a cluster job's cpuset: 2 of the machine's 64 cores, and each of 2 workers gets one thread
    monkeypatch.setattr(search_module.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(search_module.os, "sched_getaffinity", lambda pid: {3, 7})
    assert search_module.usable_cores() == 2
    monkeypatch.delattr(search_module.os, "sched_getaffinity")  # an OS without affinity: the machine's count
    assert search_module.usable_cores() == 64


def test_cpu_workers_of_several_threads_are_spawned_and_finish(tmp_path):
    # Forked after the search's own process has run a team of OpenMP threads (the data, the preflight step), a
    # worker of 2 threads hangs in its first parallel region: they are spawned instead, one-thread workers forked.
    assert search_module._can_fork(["cpu", "cpu"], 1) and search_module._can_fork([None, None]) == (
        not search_module.torch.cuda.is_available())
    assert not search_module._can_fork(["cpu", "cpu"], 2) and not search_module._can_fork([None], 8)
    spec = load_study_file(write_study(tmp_path, n_trials=2))
    # its own interpreter and session, with a deadline: a hung worker fails this test instead of stalling the suite
    search_process = subprocess.Popen([sys.executable, "-c", CPU_WORKERS_OF_TWO_THREADS, str(spec.path)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                      start_new_session=True)
    try:
        out, err = search_process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(search_process.pid, signal.SIGKILL)  # the search and the workers it is waiting for
        raise
    assert search_process.returncode == 0, err[-3000:]
    assert "start methods: ['spawn']" in out
    assert "Using an existing study" not in err  # Optuna's info lines stay off in the spawned workers too
    trials = trained(load(spec))
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2


def test_grid_points_are_enqueued_once_for_every_worker(tmp_path):
    # the grid's points are enqueued when the study is created, so workers share one list: none repeats or skips
    spec = load_study_file(write_study(tmp_path, sampler="grid"))
    study = search_module.open_study(spec, spec.default_storage())
    search_module.open_study(spec, spec.default_storage(), worker_index=1)  # a second worker joins
    fixed = [t.system_attrs["fixed_params"] for t in study.get_trials()]
    # n_trials = 3 of the 6 grid points: exactly those are enqueued, once, whichever worker opened the study
    assert len(fixed) == 3 == trial_budget(study)[0]
    assert len({tuple(sorted(f.items())) for f in fixed}) == 3
    search_module.open_study(spec, spec.default_storage(), n_trials=6)  # a larger budget enqueues the rest
    fixed = [t.system_attrs["fixed_params"] for t in study.get_trials()]
    assert len(fixed) == 6 == len({tuple(sorted(f.items())) for f in fixed}) == trial_budget(study)[0]


@pytest.mark.parametrize("extra, runs", [("", 3), ('keep_weights = "none"', 4)], ids=["continued", "no store"])
def test_interrupted_trial_is_retried_with_the_same_parameters(tmp_path, monkeypatch, extra, runs):
    """The retry continues the interrupted run from the state it left in the study's artifact store: one run,
    charged once. Without a store it trains afresh, and the interrupted run, which touched the data, still
    counts in the search's privacy cost beside it."""
    spec = load_study_file(write_study(tmp_path, n_trials=3, extra=extra))
    real_train = search_module.train
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during the second trial's first epoch

            def stop(record):
                raise KeyboardInterrupt

            kwargs["on_epoch"] = stop
        return real_train(*args, **kwargs)

    monkeypatch.setattr(search_module, "train", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        search(spec, progress=False)
    study = load(spec)
    states = [t.state for t in trained(study)]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    failed = trained(study)[1]
    assert "interrupted" in failed.user_attrs["failure_reason"]
    monkeypatch.setattr(search_module, "train", real_train)
    search(spec, progress=False)  # resume
    trials = trained(load(spec))
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and trial_budget(load(spec))[:2] == (3, 3)
    retried = trials[2]
    assert retried.state == TrialState.COMPLETE and retried.params == failed.params
    assert retried.user_attrs.get("continues_run_of") == (failed.number if runs == 3 else None)
    assert study_privacy(load(spec)).runs == runs


@pytest.mark.parametrize("extra, stops", [("max_retries = 0", 1), ("", 3)])
def test_an_interrupted_trial_is_retried_however_often_it_was_stopped(tmp_path, monkeypatch, extra, stops):
    """max_retries bounds the runs of a trial that crashes its worker; an interrupted one (Ctrl-C, a scheduler's
    SIGTERM at a job's time limit) is retried whenever the study resumes, as its failure reason says. Counted
    against max_retries, with max_retries = 0 (or at the third stop of the same trial) it was failed and never
    retried: it held its slot, and the resumed study ended without training it."""
    spec = load_study_file(write_study(tmp_path, n_trials=1, extra=extra))
    real_train = search_module.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_module, "train", interrupted)
    for _ in range(stops):
        with pytest.raises(KeyboardInterrupt):
            search(spec, progress=False)
    monkeypatch.setattr(search_module, "train", real_train)
    study = search(spec, progress=False)  # resume
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * stops + [TrialState.COMPLETE]


def test_failures_are_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    spec = load_study_file(write_study(tmp_path, n_trials=3))
    real_train = search_module.train
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(calls) == 2:
            raise DivergedError("training loss became nan in epoch 1")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(search_module, "train", flaky)
    search(spec, progress=False)
    trials = load(spec).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    assert "CUDA out of memory" in trials[0].user_attrs["failure_reason"]
    assert "nan" in trials[1].user_attrs["failure_reason"]


def test_invalid_combinations_are_pruned_before_touching_data(tmp_path, monkeypatch):
    # The conditional space proposes only valid points; this is the safety net for a combination no rule covers.
    spec = load_study_file(write_study(tmp_path, n_trials=2))

    def refuse(trial, spec):
        trial.suggest_categorical("activation", ["selu", "relu", "mish"])
        raise ConfigError("stages: an invalid combination no rule covers")

    monkeypatch.setattr(search_module, "suggest", refuse)
    search(spec, progress=False)
    study = load(spec)
    assert all(t.state == TrialState.PRUNED and "invalid combination" in t.user_attrs["failure_reason"]
               and "privacy_plan" not in t.user_attrs for t in study.get_trials())
    assert study_privacy(study).epsilon == 0.0


def test_points_too_deep_for_the_image_size_are_pruned_before_any_epsilon(tmp_path):
    path = write_study(tmp_path, n_trials=2, sampler="grid")
    text = path.read_text().replace('val_fraction = 0.2', 'val_fraction = 0.2\nimage_size = 4')
    path.write_text(text.replace('activation = ["selu", "relu", "mish"]', 'stages = [2, 4]').replace(
        "width = { low = 0.5, high = 1.0, step = 0.5 }", ""))
    spec = load_study_file(path)
    search(spec, progress=False)
    study = load(spec)
    by_stages = {t.params["stages"]: t for t in study.get_trials()}
    assert by_stages[2].state == TrialState.COMPLETE
    deep = by_stages[4]
    assert deep.state == TrialState.PRUNED and "4px is too small" in deep.user_attrs["failure_reason"]
    assert "privacy_plan" not in deep.user_attrs  # never charged: the accounting counts one run
    assert study_privacy(study).runs == 1


def test_a_scalenorm_without_a_merge_is_not_an_invalid_trial(tmp_path):
    # skip = none makes scalenorm irrelevant: in that trial it is neutralised to "none" instead of refused
    from dpnas.search.sampling import suggest

    path = write_study(tmp_path, n_trials=1)
    text = path.read_text()
    path.write_text(text.replace('activation = ["selu", "relu", "mish"]',
                                 'skip = ["none", "residual"]\nscalenorm = ["after_add"]'))
    spec = load_study_file(path)
    study = optuna.create_study()
    study.enqueue_trial({"skip": "none"})
    arch, _, _ = suggest(study.ask(), spec)
    assert arch.skip == "none" and arch.scalenorm == "none"
    # where no trial has a merge, searching scalenorm is searching nothing: refused when the file is read
    path.write_text(text.replace('activation = ["selu", "relu", "mish"]', 'skip = ["none"]\nscalenorm = ["after_add"]'))
    with pytest.raises(ConfigError, match="search.scalenorm: never used"):
        load_study_file(path)


def test_multi_objective_study_reports_the_pareto_set(tmp_path):
    extra = 'objectives = ["val_accuracy", "params"]'
    spec = load_study_file(write_study(tmp_path, n_trials=3, sampler="nsga2", extra=extra))
    search(spec, progress=False)
    study = load(spec)
    front = best_trials(study)
    assert front and all(len(t.values) == 2 for t in front)
    assert study.metric_names == ["val_accuracy", "params"]
    for t in front:  # nothing in the study dominates a Pareto trial
        assert not any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
                       for o in study.get_trials(states=(TrialState.COMPLETE,)))


def test_random_trial_count_uses_papernot_steinke(tmp_path, capsys):
    extra = 'trial_count = "poisson"\nmean_trials = 2.0'
    spec = load_study_file(write_study(tmp_path, sampler="random", extra=extra))
    with pytest.raises(ConfigError, match="draws its number of trials at random"):
        search(spec, n_trials=5, progress=False)
    search(spec, progress=False)
    report = study_privacy(load(spec))
    assert report.mode == "poisson"
    assert main(["privacy", str(spec.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "poisson"


def test_a_random_trial_count_cut_short_is_composed_not_selected(tmp_path, capsys):
    """Papernot & Steinke bound the best of all K runs, K drawn in secret; a search stopped before its K (a
    timeout, Ctrl-C) has no such guarantee, and its runs so far are composed until it finishes."""
    from dpnas.search.study_privacy import TRIAL_TARGET_ATTR

    spec = load_study_file(write_study(tmp_path, sampler="random", extra='trial_count = "poisson"\nmean_trials = 2.0'))
    study = search_module.open_study(spec, spec.default_storage())
    study._storage.set_study_system_attr(study._study_id, TRIAL_TARGET_ATTR, 3)  # as if K = 3 had been drawn
    search(spec, timeout=0.1, progress=False)  # one trial, then the time is up
    study = load(spec)
    report = study_privacy(study)
    assert report.runs == 1 and report.mode == "fixed"
    assert any("has not run them all yet" in note for note in report.notes)
    assert report.budget["trial_count"] == {"distribution": "fixed", "runs": 1}  # composed over the runs done
    # the end lines say it too, and never print the secret count; nor does the progress bar
    import io

    from dpnas.search.progress import SearchProgress

    assert SearchProgress(study, file=io.StringIO())._bar.total is None
    assert main(["search", str(spec.path), "--quiet", "--timeout", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "2 trials finished (0 waiting" in out and "of a budget" not in out
    assert "note: The poisson accounting (Papernot & Steinke) covers the best of all" in out
    study._storage.set_study_system_attr(study._study_id, TRIAL_TARGET_ATTR, 2)  # K = 2: all of them done
    report = study_privacy(load(spec))
    assert report.mode == "poisson" and not any("has not run them all" in note for note in report.notes)


def test_storage_urls_are_explicit():
    assert storage_kind("a/b.journal") == "journal"
    assert storage_kind("sqlite:///x.db") == "sqlite"
    assert storage_kind("postgresql://u@127.0.0.1/db") == "server"
    with pytest.raises(ConfigError, match="not a storage URL"):
        storage_kind("results.db")
    with pytest.raises(ConfigError, match="unknown scheme 'redis'"):
        storage_kind("redis://localhost")


def test_search_cli_user_errors(tmp_path, capsys):
    path = write_study(tmp_path)
    assert main(["search", str(path), "--storage", "oops.db"]) == 2
    assert "not a storage URL" in capsys.readouterr().err
    assert main(["best", str(tmp_path / "none.toml")]) == 2
    assert main(["privacy", str(tmp_path / "x.journal")]) == 2
    assert "no such journal file" in capsys.readouterr().err


def test_stock_optuna_cli_reads_a_dpnas_study(finished):
    spec, study = finished
    optuna_cli = shutil.which("optuna") or str(__import__("pathlib").Path(sys.executable).parent / "optuna")
    out = subprocess.run([optuna_cli, "trials", "--study-name", spec.name, "--storage", spec.default_storage(), "-f", "json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 3 and all(r["state"] == "COMPLETE" for r in rows)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_optuna_dashboard_http_api_reads_a_dpnas_study(finished):
    from optuna_dashboard import wsgi

    spec, study = finished
    server = make_server("127.0.0.1", 0, wsgi(open_storage(spec.default_storage())), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        studies = json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=30))["study_summaries"]
        entry = next(s for s in studies if s["study_name"] == spec.name)
        detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{entry['study_id']}", timeout=30))
    finally:
        server.shutdown()
    assert len(detail["trials"]) == 3 and detail["has_intermediate_values"]
    keys = {a["key"] for a in detail["union_user_attrs"]}
    assert {"epsilon_spent", "noise_multiplier", "params", "test_accuracy"} <= keys
    assert "Privacy cost of the search" in detail["note"]["body"]


@pytest.mark.parametrize("epochs, state", [(1, TrialState.COMPLETE), (2, TrialState.PRUNED)])
def test_a_trial_is_never_pruned_after_its_last_release(tmp_path, monkeypatch, epochs, state):
    """After its last validation release a run has spent its whole budget and has its final score: it used to be
    pruned there (thrown out of the choice of the best, its weights not kept)."""
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    spec = load_study_file(write_study(tmp_path, n_trials=1, pruner="median", epochs=epochs))
    search(spec, progress=False)
    (trial,) = load(spec).get_trials()
    assert trial.state == state
    assert 0 < trial.user_attrs["epsilon_spent"] <= 4.0  # a pruned run's too: what it spent before the stop


# --- what a review of the runner found (2026-12-07) ------------------------------------------------------------

def test_a_lower_trial_count_leaves_queued_grid_points_untrained_and_a_higher_one_is_capped(tmp_path):
    """The grid's queued points all trained after --n-trials lowered the count ("4 trials finished of a budget of
    2"); a count above the grid's size was stored as the target."""
    spec = load_study_file(write_study(tmp_path, n_trials=4, sampler="grid"))
    search(spec, timeout=0.1, progress=False)  # one point trained, three queued
    study = search(spec, n_trials=2, progress=False)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.WAITING) == 2
    search(spec, n_trials=100, progress=False, timeout=0.1)
    assert trial_budget(load(spec))[0] == 6  # the grid: 3 activations x 2 widths


def test_an_ablation_takes_no_trial_count(tmp_path):
    path = write_study(tmp_path, sampler="ablation")
    text = path.read_text()
    path.write_text(text.replace('sampler = "ablation"', 'sampler = "ablation"\nn_trials = 2'))
    with pytest.raises(ConfigError, match="study.n_trials: an ablation trains each of its points once per repeat"):
        load_study_file(path)
    path.write_text(text)
    with pytest.raises(ConfigError, match="--n-trials: an ablation"):
        search(load_study_file(path), n_trials=1, progress=False)


def test_an_edited_trial_count_in_the_file_is_not_ignored(tmp_path):
    path = write_study(tmp_path, n_trials=1)
    search(load_study_file(path), progress=False)
    path.write_text(path.read_text().replace("n_trials = 1", "n_trials = 2"))
    with pytest.raises(ConfigError, match="n_trials changed from 1 to 2.*--n-trials 2"):
        search(load_study_file(path), progress=False)
    with pytest.raises(ConfigError, match="n_trials changed from 1 to 2.*--n-trials 2"):  # what --check runs
        check_search(load_study_file(path), load_study_file(path).default_storage())
    study = search(load_study_file(path), n_trials=2, progress=False)  # applied
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 2
    search(load_study_file(path), progress=False)  # and from then on the file is the study's again


def test_a_retry_forgets_its_original_s_failure_and_the_end_line_counts_slots(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, n_trials=2)
    real, calls = search_module.train, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search_module, "train", interrupted_once)
    assert main(["search", str(path), "--quiet"]) == 130
    assert "0 trials finished of a budget of 2 (1 waiting" in capsys.readouterr().out
    assert main(["search", str(path), "--quiet"]) == 0
    assert "2 trials finished of a budget of 2 (0 waiting" in capsys.readouterr().out
    trials = load(load_study_file(path)).get_trials()
    assert trials[0].state == TrialState.FAIL and trials[1].state == TrialState.COMPLETE
    assert trials[1].user_attrs["failure_reason"] is None


def test_the_end_lines_name_the_study_where_the_storage_may_hold_others(tmp_path, capsys):
    path = write_study(tmp_path, n_trials=1)
    journal = str(tmp_path / "shared.journal")
    assert main(["search", str(path), "--quiet", "--storage", journal, "--study-name", "other"]) == 0
    out = capsys.readouterr().out
    assert f"dpnas privacy {journal} --study-name other` explains" in out
    assert f"dpnas best {journal} --study-name other --out best.toml" in out


def test_the_end_lines_commands_run_as_pasted_where_a_path_or_name_has_a_space(tmp_path, capsys):
    folder = tmp_path / "my studies"
    folder.mkdir()
    path = write_study(folder, n_trials=1)
    assert main(["search", str(path), "--quiet", "--study-name", "my run"]) == 0
    out = capsys.readouterr().out
    best = shlex.split(out.split("export the best recipe and its weights: ")[1].splitlines()[0])
    assert best[:5] == ["dpnas", "best", str(path), "--study-name", "my run"]
    privacy = shlex.split(out.split("`dpnas privacy ")[1].split("` explains")[0])
    assert privacy == [str(path), "--study-name", "my run"]
    dashboard = shlex.split(out.split("open it with: ")[1].splitlines()[0])
    assert dashboard == ["optuna-dashboard", str(folder / "tiny.journal"),
                         "--artifact-dir", str(folder / "tiny.journal.artifacts")]


def test_an_exhausted_space_is_looked_at_again_by_the_next_search(tmp_path):
    from dpnas.search.study_state import _EXHAUSTED, _set_system_attr, open_study

    spec = load_study_file(write_study(tmp_path, n_trials=1))
    _set_system_attr(open_study(spec, spec.default_storage()), _EXHAUSTED, "search space exhausted: (an old one)")
    assert search_module.exhausted_message(search(spec, progress=False)) is None


def test_hyperband_is_sized_for_the_epochs_the_trials_train():
    from dpnas.search.study_state import make_pruner

    spec = load_study_file("studies/smoothnet_cifar10_fast.toml")
    assert spec.pruner == "hyperband" and spec.fidelity.epochs and spec.fidelity.epochs != spec.train.epochs
    assert make_pruner(spec)._max_resource == spec.fidelity.epochs


def test_a_point_the_image_size_cannot_take_takes_one_slot_however_often_it_is_proposed(tmp_path):
    """It was pruned, taking a slot, every time the sampler proposed it again (3 of 4 slots in a review's run)."""
    path = write_study(tmp_path, n_trials=3, sampler="random")
    text = path.read_text().replace('val_fraction = 0.2', 'val_fraction = 0.2\nimage_size = 4')
    path.write_text(text.replace('activation = ["selu", "relu", "mish"]', 'stages = [2, 4]'))
    study = search(load_study_file(path), progress=False)
    pruned = [json.dumps(t.params, sort_keys=True) for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert pruned and all(json.loads(p)["stages"] == 4 for p in pruned)
    assert len(set(pruned)) == len(pruned)  # each deep point pruned once; proposed again, it was a repeat
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 2  # both points that fit trained


def test_a_trial_on_a_heartbeat_storage_beats_before_its_slot_is_released(tmp_path, monkeypatch):
    """A worker killed between taking its trial and its heartbeat thread's first beat left a trial Optuna never
    finds stale (no beat at all), RUNNING for ever on another host, and the search waiting on it."""
    import sqlite3

    path = write_study(tmp_path, n_trials=1, epochs=1)
    db = tmp_path / "hb.db"
    beats = []

    def trial_without_its_thread(study, trial, *args, **kwargs):
        with sqlite3.connect(db) as connection:
            beats.extend(row[0] for row in connection.execute("SELECT trial_id FROM trial_heartbeats"))
        study.tell(trial, 0.5)
        return "done"

    monkeypatch.setattr(search_module, "heartbeat_thread", lambda *args: contextlib.nullcontext())
    monkeypatch.setattr(search_module, "run_trial", trial_without_its_thread)
    study = search(load_study_file(path), storage_url=f"sqlite:///{db}", progress=False)
    assert beats == [study.get_trials()[0]._trial_id]


def test_an_idle_worker_looks_again_soon_then_less_often_and_stops_when_the_trial_elsewhere_ends(tmp_path,
                                                                                                  monkeypatch):
    """2 workers on SQLite: the one left without a trial paused 1 s between looks at the trial running elsewhere,
    so a search ended up to 1 s after its last trial (2 workers completed 0.70-0.79x the trials of one, on 1-s
    trials). Its pauses now start at 0.1 s and grow to 1 s at most; it stops at its first look after the end."""
    from dpnas.search.study_state import open_study, worker_identity

    spec = load_study_file(write_study(tmp_path, n_trials=1, epochs=1))
    url = f"sqlite:///{tmp_path / 'idle.db'}"
    study = open_study(spec, url)
    elsewhere = study.ask()  # the only slot, taken by a live worker (this process) whose heartbeat is fresh
    study._storage.record_heartbeat(elsewhere._trial_id)
    for key, value in worker_identity().items():
        elsewhere.set_user_attr(key, value)
    pauses = []

    def pause(seconds):
        pauses.append(seconds)
        if len(pauses) == 8:
            study.tell(elsewhere, 0.5)  # the trial elsewhere ends

    monkeypatch.setattr(search_module.time, "sleep", pause)
    report = search_module.run_worker(spec, url, worker_index=1, progress=False)
    assert report.trials == 0 and len(pauses) == 8  # it waited, then stopped at its first look after the end
    assert pauses[0] <= 0.1 and max(pauses) == 1.0  # short first; never longer than a second
    assert pauses == sorted(pauses) and pauses[-1] == pauses[-2] == 1.0



def test_a_second_ctrl_c_during_the_first_s_bookkeeping_keeps_the_retry(tmp_path, monkeypatch):
    """Marking an interrupted trial failed and queueing its retry take over 100 ms on SQLite: a second Ctrl-C in
    between left a failed trial that held its slot, never retried."""
    path = write_study(tmp_path, n_trials=1, epochs=1)
    url = f"sqlite:///{tmp_path / 'c.db'}"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real_tell = optuna.Study.tell

    def tell_then_ctrl_c(self, *args, **kwargs):
        result = real_tell(self, *args, **kwargs)
        if kwargs.get("state") == TrialState.FAIL:
            os.kill(os.getpid(), signal.SIGINT)  # the second press, right after the failure is written
        return result

    monkeypatch.setattr(search_module, "train", interrupted)
    monkeypatch.setattr(optuna.Study, "tell", tell_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        search(load_study_file(path), storage_url=url, progress=False)
    states = [t.state for t in optuna.load_study(study_name="tiny", storage=open_storage(url)).get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # the retry is queued: the slot is not lost
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

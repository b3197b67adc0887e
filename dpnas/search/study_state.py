"""The study in its storage: creating or joining it, its recorded budget, and its exact trial slots.

A study is created once (its trial budget, grid or ablation points, budget and data recorded), and joined by every
later worker and session, which must ask for the same budget, data and objectives. ``trial_budget`` counts the
slots that trials hold; ``runs_charged`` the trials that touched the data, whatever became of them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import random
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from dpnas.arch.space import ConfigError
from dpnas.search.calibration import Calibration, calibrate_study
from dpnas.search.checks import (
    BUDGET_ATTR,
    DATA_ATTR,
    objective_mismatch,
    refuse_ablation_trial_count,
    refuse_mismatch,
    refuse_other_repeats,
    runs_charged,
    stored_data,
    stored_mismatches,
)
from dpnas.search.privacy import draw_trial_count
from dpnas.search.sampling import ablation_plan, grid_points, repeat_seed
from dpnas.search.storage import open_storage, trial_slot_lock
from dpnas.search.study_file import StudySpec
from dpnas.search.study_privacy import CALIBRATION_ATTR, TRIAL_TARGET_ATTR

# Study attributes dpnas keeps in the storage (system attributes: not shown as results).
_TARGET = TRIAL_TARGET_ATTR
_FILE_N_TRIALS = "dpnas:file_n_trials"  # the study file's n_trials when the study last took it: a later edit is seen
_INITIALISED = "dpnas:initialised"
_GRID_ENQUEUED = "dpnas:grid_enqueued"
_EXHAUSTED = "dpnas:exhausted"
_USED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def _system_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def _set_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    # Optuna 5 keeps study system attributes in the storage API only
    study._storage.set_study_system_attr(study._study_id, key, value)

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def sampler_seed(spec: StudySpec, worker_index: int, trials_so_far: int) -> int:
    """Workers must not share a seed, or every worker would propose the same first trials; and a resumed study
    (or a worker that joins later) must not replay the proposals of the first session, so the number of trials
    already in the study enters the seed too. A new study with one worker is still reproducible from its seed."""
    return random.Random(f"{spec.seed}:{worker_index}:{trials_so_far}").randrange(2**31)


def make_sampler(spec: StudySpec, worker_index: int = 0, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
    seed = sampler_seed(spec, worker_index, trials_so_far)
    if spec.sampler == "tpe":
        # group=True: TPE models each define-by-run branch of the conditional space on its own
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # random; and grid and ablation, whose points are all enqueued with fixed parameters
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if spec.pruner == "hyperband":  # sized for the epochs the trials train ([fidelity] epochs, where set)
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.fidelity.epochs or spec.train.epochs)
    return optuna.pruners.NopPruner()


# --- the study ------------------------------------------------------------------------------------


def open_study(spec: StudySpec, storage_url: str, *, study_name: str | None = None,
               n_trials: int | None = None, worker_index: int = 0) -> optuna.Study:
    """Create the study on first use (and fix its trial budget), or join it; safe to race."""
    storage = _storage(spec, storage_url)
    name = study_name or spec.name
    with trial_slot_lock(storage, storage_url):
        study = optuna.create_study(
            storage=storage, study_name=name, directions=spec.directions, load_if_exists=True,
            pruner=make_pruner(spec),
        )
        study.sampler = make_sampler(spec, worker_index, len(study.get_trials(deepcopy=False)))
        if not _system_attrs(study).get(_INITIALISED):
            _initialise(study, spec, n_trials)
            return study
        _check_stored(study, spec)
        check_trial_count(study, spec, n_trials)
        if n_trials is not None:
            current = trial_budget(study)[0]
            wanted = _wanted_trials(spec, n_trials)
            if spec.total_epsilon is not None and wanted != current:
                # nothing is charged yet (above): the noise was derived for the old count and is derived again
                _set_system_attr(study, CALIBRATION_ATTR, None)
            if spec.sampler == "grid":
                _enqueue_grid(study, spec, wanted)
            _set_system_attr(study, _TARGET, wanted)
            _set_system_attr(study, _FILE_N_TRIALS, spec.n_trials)  # the file as it is now: seen
    return study


def check_trial_count(study: optuna.Study, spec: StudySpec, n_trials: int | None) -> None:
    """Refuse a trial count this existing study cannot take, reading only: `search --check` says what the search
    would refuse, and :func:`open_study` applies what passes."""
    name = study.study_name
    current = trial_budget(study)[0]
    spent = spec.total_epsilon is not None and runs_charged(study) > 0
    before = _system_attrs(study).get(_FILE_N_TRIALS)
    if n_trials is None and before is not None and spec.n_trials != before:
        if spent and spec.n_trials is not None and _wanted_trials(spec, spec.n_trials) != current:
            # --n-trials would be refused too: do not suggest it
            raise ConfigError(f"the study file's n_trials changed from {before} to {spec.n_trials}; study {name!r} "
                              f"split its total_epsilon = {spec.total_epsilon:g} over {current} trials and has "
                              f"spent some of it. Restore n_trials = {before}, or start a new study (--study-name) "
                              f"for another number of trials")
        raise ConfigError(f"the study file's n_trials changed from {before} to {spec.n_trials}; study {name!r} "
                          f"targets {current} trials. Pass --n-trials {spec.n_trials} to apply it "
                          f"(or restore n_trials = {before})")
    if n_trials is None:
        return
    if spec.trial_count != "fixed":
        raise ConfigError(f"--n-trials: study {name!r} draws its number of trials at random ({spec.trial_count})")
    refuse_ablation_trial_count(spec, n_trials)
    if spent and _wanted_trials(spec, n_trials) != current:
        raise ConfigError(f"--n-trials: study {name!r} split its total_epsilon = {spec.total_epsilon:g} "
                          f"over {current} trials when it was created; more trials would "
                          "spend more than that total. Start a new study (--study-name) for more trials")


def _wanted_trials(spec: StudySpec, n_trials: int) -> int:
    """The target `n_trials` sets: a grid holds at most its points."""
    return min(n_trials, len(grid_points(spec))) if spec.sampler == "grid" else n_trials


def _check_stored(study: optuna.Study, spec: StudySpec) -> None:
    """Refuse a study file whose budget, data or objectives differ from the stored study's (no silent mixing).

    Before any trial has touched the data nothing is spent, and the new budget and data simply replace the old.
    """
    refuse_other_repeats(study, spec)
    problems = stored_mismatches(study, spec)
    if not problems:
        return
    if runs_charged(study) or objective_mismatch(study, spec):
        refuse_mismatch(study, problems)
    _record_budget(study, spec)
    _set_system_attr(study, CALIBRATION_ATTR, None)  # derived again from the new budget


def check_unchanged(study: optuna.Study, spec: StudySpec) -> None:
    """Refuse to go on with a budget, data or objectives the stored study no longer has: another worker (another
    host, say) joined with other settings while nothing was charged yet, and they replaced this worker's
    (:func:`_check_stored`); its trials would mix its own in, at another epsilon or on other data.

    Call under the slot lock, before the calibration and before each trial is taken."""
    problems = stored_mismatches(study, spec)
    if problems:
        refuse_mismatch(study, problems)


def _storage(spec: StudySpec, url: str) -> BaseStorage:
    return open_storage(url, heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
                        max_retries=spec.max_retries)


def _initialise(study: optuna.Study, spec: StudySpec, n_trials: int | None) -> None:
    refuse_ablation_trial_count(spec, n_trials)
    if spec.n_trials is not None:
        _set_system_attr(study, _FILE_N_TRIALS, spec.n_trials)
    if spec.trial_count != "fixed":
        if n_trials is not None:
            raise ConfigError(f"--n-trials: this study draws its number of trials at random ({spec.trial_count})")
        # K must be random and secret for the Papernot-Steinke guarantee: drawn once, from the OS's CSPRNG.
        target = draw_trial_count(mode=spec.trial_count, mu=spec.mean_trials, eta=spec.eta, gamma=spec.gamma)
    elif spec.sampler == "ablation":
        points = ablation_plan(spec)
        # Repeat-major: a study cut short still holds a whole one-at-a-time ablation at the first seeds, and the
        # repeats of one point are spread over time (and workers) like the base point's, which they are paired with.
        for repeat in range(spec.repeats):
            for point in points:
                study.enqueue_trial(point.params, user_attrs={
                    "ablation_axis": point.axis, "repeat": repeat, "repeat_seed": repeat_seed(spec, repeat)})
        target = len(points) * spec.repeats
    elif spec.sampler == "grid":
        requested = n_trials if n_trials is not None else spec.n_trials
        target = _enqueue_grid(study, spec, requested)
    else:
        target = n_trials if n_trials is not None else spec.n_trials
    _set_system_attr(study, _TARGET, int(target))
    study.set_metric_names(list(spec.objectives))
    for key, value in {
        "dataset": spec.dataset,
        "trial_count": spec.trial_count,
        "mean_trials": spec.mean_trials,
        "eta": spec.eta,
        "gamma": spec.gamma,
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "objectives": list(spec.objectives),
        "repeats": spec.repeats,
        # Decoded as load_study_file parsed it (UTF-8, a byte-order mark dropped), not in the locale's encoding,
        # so the report and the budget words parse the recorded text again.
        "study_file": spec.path.read_text(encoding="utf-8-sig"),
        "dpnas_version": _version(),
    }.items():
        study.set_user_attr(key, value)
    _record_budget(study, spec)
    _set_system_attr(study, _INITIALISED, True)


def _record_budget(study: optuna.Study, spec: StudySpec) -> None:
    for key, value in {
        "epsilon": ("derived from total_epsilon" if spec.total_epsilon else
                    spec.privacy.epsilon if spec.privacy.private else "inf (non-private)"),
        "total_epsilon": spec.total_epsilon,
        "val_noise": spec.privacy.val_noise,
        "delta": spec.privacy.delta,
        # what the privacy report must say about the search's data and proxies (dpnas.search.fidelity)
        "fidelity": spec.fidelity.to_dict() or None,
        "public_data": spec.public_data,
    }.items():
        study.set_user_attr(key, value)
    _set_system_attr(study, BUDGET_ATTR, spec.budget())
    _set_system_attr(study, DATA_ATTR, stored_data(spec))


def _enqueue_grid(study: optuna.Study, spec: StudySpec, requested: int | None) -> int:
    """Enqueue the grid's valid, distinct points up to `requested` (all of them by default); returns the target."""
    points = grid_points(spec)
    target = len(points) if requested is None else min(requested, len(points))
    done = int(_system_attrs(study).get(_GRID_ENQUEUED, 0))
    for params in points[done:target]:
        study.enqueue_trial(params)
    _set_system_attr(study, _GRID_ENQUEUED, max(done, target))
    return target


def _version() -> str:
    # From the installed package's metadata: importing the top-level dpnas package here would point upward.
    return importlib.metadata.version("dpnas")


def trial_budget(study: optuna.Study) -> tuple[int, int, int, int]:
    """(target, used, waiting, running): a FAIL trial that was retried gives its slot to its retry."""
    trials = study.get_trials(deepcopy=False)
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    used = sum(1 for t in trials if t.state in _USED_STATES or (t.state == TrialState.FAIL and t.number not in replaced
                                                                and "duplicate_of" not in t.user_attrs))
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return int(_system_attrs(study).get(_TARGET, 0)), used, waiting, running


def study_calibration(study: optuna.Study, spec: StudySpec, train_size: int) -> Calibration | None:
    """A total-epsilon study's noise, derived once (by the first worker, before any trial) and then read back.

    Call under the slot lock. Refuses data whose training split differs from the one the study was calibrated on.
    """
    if spec.total_epsilon is None:
        return None
    stored = _system_attrs(study).get(CALIBRATION_ATTR)
    runs = trial_budget(study)[0] if spec.trial_count == "fixed" else None
    if stored is not None:
        calibration = Calibration.from_dict(stored)
        if calibration.train_size != train_size:
            raise ConfigError(f"study {study.study_name!r} was calibrated for {calibration.train_size} training "
                              f"records; this worker's data has {train_size}. Every worker must see the same data")
        if calibration.runs == runs:
            return calibration
        # The total was split over another number of runs (a target changed by a path that kept the calibration):
        # its noise is too small for more runs. Derived again while nothing is spent; refused after.
        if runs_charged(study):
            raise ConfigError(f"study {study.study_name!r} split its total_epsilon = {calibration.total_epsilon:g} "
                              f"over {calibration.runs} runs and has spent some of it; it now targets {runs}. "
                              "Start a new study (--study-name) for another number of trials")
    calibration = calibrate_study(spec, runs=runs, train_size=train_size)
    _set_system_attr(study, CALIBRATION_ATTR, calibration.to_dict())
    return calibration


def worker_identity() -> dict[str, str]:
    """The user attributes that name this process as a trial's owner: `worker` (host:pid, as shown to users) and
    `worker_process` (when this pid started, where Linux tells: a restarted container reuses its pids) and
    `worker_pid_namespace` (which pids these are: containers with the host's network share its host name)."""
    identity = {"worker": f"{socket.gethostname()}:{os.getpid()}"}
    started = _process_start(os.getpid())
    if started is not None:
        identity["worker_process"] = started
    namespace = _pid_namespace()
    if namespace is not None:
        identity["worker_pid_namespace"] = namespace
    return identity


def _recover_orphans(study: optuna.Study, spec: StudySpec, *, slot_locked: bool = True) -> None:
    """RUNNING trials whose worker process no longer exists: fail them and retry them.

    Call under the slot lock. A trial is an orphan when its worker on this host is gone (its pid is not running,
    or is running a process that started later), or, where the slot lock excludes every other worker
    (`slot_locked`), when it has no owner at all: a worker takes a trial and records itself under that lock, so
    a trial seen without an owner lost its worker in between. Server storages also find orphans by heartbeat.

    Where heartbeats find dead workers, a worker of the same host name whose pids are not this process's to read (a
    container with the host's network, a machine of the same name) is left to them: its pid read here names another
    process or none, and its live trial was failed and trained again (its epsilon spent twice, its result lost).
    Without a heartbeat (a journal), another boot or namespace is this host restarted (a container too): dead.
    """
    host = socket.gethostname()
    heartbeat = is_heartbeat_enabled(study._storage)
    retry = RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retries)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None:
            if not slot_locked:
                continue
            reason = "its worker process died before it recorded itself"
        else:
            worker_host, _, pid = worker.rpartition(":")
            if worker_host != host or not pid.isdigit() or (heartbeat and _elsewhere(t.user_attrs)) \
                    or _owner_alive(int(pid), t.user_attrs.get("worker_process")):
                continue
            reason = f"worker process {pid} died"
        try:
            study._storage.set_trial_user_attr(t._trial_id, "failure_reason", reason)
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        retry(study, study._storage.get_trial(t._trial_id))


def _elsewhere(attrs: dict[str, Any]) -> bool:
    """Whether a trial's worker (its user attributes, of this host name) ran where this process cannot read its
    pid: in another PID namespace, or another boot."""
    namespace, started = attrs.get("worker_pid_namespace"), attrs.get("worker_process")
    if namespace is not None and namespace != _pid_namespace():
        return True
    boot = _boot_id()
    return started is not None and boot is not None and started.split(":")[0] != boot


@functools.cache  # a process's namespace and its machine's boot never change: read once, not per running trial
def _pid_namespace() -> str | None:
    """This process's PID namespace ("pid:[4026531836]"), where Linux tells."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@functools.cache
def _boot_id() -> str | None:
    """This boot's id (Linux), else None."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _owner_alive(pid: int, started: str | None) -> bool:
    """The process `pid` runs, and is the one that started at `started` (when that was recorded and can be read)."""
    if not _process_alive(pid):
        return False
    if started is None:
        return True
    now = _process_start(pid)
    return now is None or now == started


def _process_start(pid: int) -> str | None:
    """This boot's id and the process's start time in clock ticks since boot (Linux), else None."""
    boot = _boot_id()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if boot is None:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the command may hold spaces
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None


def _process_alive(pid: int) -> bool:
    """Whether `pid` is a running process. A zombie is not: a worker of `--workers K` killed while the search's
    process waits on (joins) another one stays a zombie until it is reaped, and signal 0 still reaches it; taken
    for alive, its trial held its slot until the heartbeat's grace period (SQLite: 180 s) or the next resume."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/stat").exists()  # gone just now; or no /proc (not Linux): signal 0 said alive
    except OSError:
        return True
    state = stat[stat.rindex(")") + 2:].split()[:1]
    return state not in (["Z"], ["X"])



"""`dpnas search`: an Optuna study whose every trial trains a sampled architecture with DP-SGD.

The flow: a :class:`~dpnas.search.study_file.StudySpec` -> a persistent Optuna study -> one or more
worker processes, each taking trials until the study's trial budget is used.  Budgets are
exact across workers: taking a trial happens under :func:`dpnas.search.storage.trial_slot_lock`.

Every trial records what it cost (``epsilon_spent``, ``noise_multiplier`` ...) and what it
scored on the *validation* split; the test accuracy is stored for the report only and
never used to select.  A failed trial (an exception, CUDA out of memory) is marked FAIL with
its reason and the study goes on; a diverging one is pruned with its reason.

No configuration is trained twice: a proposal whose effective configs (:func:`dpnas.search.sampling.config_key`)
match a trial already trained or training is recorded as a FAIL marked ``duplicate_of`` before it touches any
data, takes no slot of the budget and costs no ε, and the sampler proposes again. A finite space that has been
covered, or a sampler that keeps repeating itself, ends the study with a line saying so.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import multiprocessing
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial, Trial, TrialState
from tqdm.auto import tqdm

from dpnas.arch.space import ConfigError
from dpnas.data.datasets import DatasetSplits, load_dataset
from dpnas.dp.checkpoint import checkpoint_dict
from dpnas.dp.preflight import parse_device
from dpnas.dp.privacy import PrivacyPlan
from dpnas.dp.train import DivergedError, train
from dpnas.search.calibration import Calibration, calibrate, run_shapes
from dpnas.search.checks import (
    BUDGET_ATTR,
    DATA_ATTR,
    check_study,
    objective_mismatch,
    refuse_mismatch,
    stored_data,
    stored_mismatches,
)
from dpnas.search.privacy import draw_trial_count
from dpnas.search.sampling import Configs, ablation_points, config_key, grid_points, space_size, suggest
from dpnas.search.storage import open_storage, storage_kind, trial_slot_lock
from dpnas.search.study_file import StudySpec, load_study_file
from dpnas.search.study_privacy import CALIBRATION_ATTR
from dpnas.search.weights import default_location, keep_trial_weights, open_store, record_location, study_location

# Study attributes dpnas keeps in the storage (system attributes: not shown as results).
_TARGET = "dpnas:n_trials"
_INITIALISED = "dpnas:initialised"
_GRID_ENQUEUED = "dpnas:grid_enqueued"
_EXHAUSTED = "dpnas:exhausted"
# After this many proposals in a row that repeat trained configurations, a worker stops: the sampler has
# (nearly) run out of new points.
MAX_CONSECUTIVE_DUPLICATES = 50
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
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.train.epochs)
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
        if n_trials is not None:
            if spec.trial_count != "fixed":
                raise ConfigError(f"--n-trials: study {name!r} draws its number of trials at random ({spec.trial_count})")
            if spec.total_epsilon is not None and n_trials != trial_budget(study)[0] and runs_charged(study):
                raise ConfigError(f"--n-trials: study {name!r} split its total_epsilon = {spec.total_epsilon:g} "
                                  f"over {trial_budget(study)[0]} trials when it was created; more trials would "
                                  "spend more than that total. Start a new study (--study-name) for more trials")
            _set_system_attr(study, _TARGET, n_trials)
            if spec.sampler == "grid":
                _enqueue_grid(study, spec, n_trials)
    return study


def _check_stored(study: optuna.Study, spec: StudySpec) -> None:
    """Refuse a study file whose budget, data or objectives differ from the stored study's (no silent mixing).

    Before any trial has touched the data nothing is spent, and the new budget and data simply replace the old.
    """
    problems = stored_mismatches(study, spec)
    if not problems:
        return
    if runs_charged(study) or objective_mismatch(study, spec):
        refuse_mismatch(study, problems)
    _record_budget(study, spec)
    _set_system_attr(study, CALIBRATION_ATTR, None)  # derived again from the new budget


def _storage(spec: StudySpec, url: str) -> BaseStorage:
    return open_storage(url, heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
                        max_retries=spec.max_retries)


def _initialise(study: optuna.Study, spec: StudySpec, n_trials: int | None) -> None:
    if spec.trial_count != "fixed":
        if n_trials is not None:
            raise ConfigError(f"--n-trials: this study draws its number of trials at random ({spec.trial_count})")
        # K must be random and secret for the Papernot-Steinke guarantee: drawn once, from the OS's CSPRNG.
        target = draw_trial_count(mode=spec.trial_count, mu=spec.mean_trials, eta=spec.eta, gamma=spec.gamma)
    elif spec.sampler == "ablation":
        points = ablation_points(spec)
        for params in points:
            study.enqueue_trial(params)
        target = len(points)
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
        "study_file": spec.path.read_text(),
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


def runs_charged(study: optuna.Study) -> int:
    """Trials that recorded a privacy plan, i.e. touched (or were about to touch) the data, whatever became of them."""
    return sum(1 for t in study.get_trials(deepcopy=False) if "privacy_plan" in t.user_attrs)


def study_calibration(study: optuna.Study, spec: StudySpec, train_size: int) -> Calibration | None:
    """A total-epsilon study's noise, derived once (by the first worker, before any trial) and then read back.

    Call under the slot lock. Refuses data whose training split differs from the one the study was calibrated on.
    """
    if spec.total_epsilon is None:
        return None
    stored = _system_attrs(study).get(CALIBRATION_ATTR)
    if stored is not None:
        calibration = Calibration.from_dict(stored)
        if calibration.train_size != train_size:
            raise ConfigError(f"study {study.study_name!r} was calibrated for {calibration.train_size} training "
                              f"records; this worker's data has {train_size}. Every worker must see the same data")
        return calibration
    runs = trial_budget(study)[0] if spec.trial_count == "fixed" else None
    calibration = calibrate(spec.total_epsilon, spec.privacy.delta, mode=spec.trial_count, runs=runs,
                            mu=spec.mean_trials, eta=spec.eta, gamma=spec.gamma, shapes=run_shapes(spec),
                            train_size=train_size, validation_noise=spec.privacy.val_noise != 0)
    _set_system_attr(study, CALIBRATION_ATTR, calibration.to_dict())
    return calibration


def _recover_orphans(study: optuna.Study, spec: StudySpec) -> None:
    """RUNNING trials of a worker process on this host that no longer exists: fail them and retry them.

    (Server storages find such trials by heartbeat instead; this covers the journal file.)
    """
    host = socket.gethostname()
    retry = RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retries)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host == host and pid.isdigit() and not _process_alive(int(pid)):
            try:
                study._storage.set_trial_user_attr(t._trial_id, "failure_reason", f"worker process {pid} died")
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            retry(study, study._storage.get_trial(t._trial_id))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- one worker ----------------------------------------------------------------------------------


@dataclass
class WorkerReport:
    trials: int = 0
    interrupted: bool = False
    exhausted: str | None = None


def _trained_keys(study: optuna.Study, *, exclude: int | None = None) -> dict[str, int]:
    """config key -> trial number, for every trial that trained (or is training) its configuration."""
    keys = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)):
        key = t.user_attrs.get("config_key")
        # A retry (Optuna's stale-trial callback) arrives with its failed original's user attributes, config_key
        # included: it must not count as a repeat of itself.
        if key is not None and t.number != exclude:
            keys.setdefault(key, t.number)
    return keys


def _propose(study: optuna.Study, spec: StudySpec, trial: Trial) -> tuple[Any, int | None]:
    """Sample the trial's configs (under the slot lock, so two workers never take the same new point).

    Returns (configs, the number of the trial it repeats or None); raises ConfigError for an invalid point.
    """
    configs = suggest(trial, spec)
    key = config_key(configs)
    repeated = _trained_keys(study, exclude=trial.number).get(key)
    trial.set_user_attr("config_key", key)
    return configs, repeated


def _prune_invalid(study: optuna.Study, trial: Trial, err: ConfigError) -> str:
    trial.set_user_attr("failure_reason", f"invalid combination: {err}")
    study.tell(trial, state=TrialState.PRUNED)
    return f"trial {trial.number} pruned (invalid combination): {err}"


def _exhausted(study: optuna.Study, size: Callable[[], int | None], consecutive: int) -> str | None:
    distinct = len(_trained_keys(study))
    total = size()
    if total is not None and distinct >= total:
        return f"search space exhausted: all {total} distinct configurations have been trained"
    if consecutive >= MAX_CONSECUTIVE_DUPLICATES:
        return (f"search space exhausted: the last {consecutive} proposals all repeated trained configurations "
                f"({distinct} distinct ones trained)")
    return None


def run_worker(
    spec: StudySpec, storage_url: str, *, study_name: str | None = None, worker_index: int = 0,
    device: str | None = None, timeout: float | None = None, progress: bool = True,
    artifacts: str | None = None, data: DatasetSplits | None = None,
) -> WorkerReport:
    """Take trials of the study until its budget is used (or `timeout` seconds have passed)."""
    study = open_study(spec, storage_url, study_name=study_name, worker_index=worker_index)
    store = _weights_store(study, spec, storage_url, artifacts)
    if data is None:
        data = load_dataset(spec.dataset, data_dir=spec.data_dir, val_fraction=spec.val_fraction,
                            seed=spec.train.seed, image_size=spec.image_size, synthetic_size=spec.synthetic_size,
                            progress=progress)
    storage = study._storage
    with trial_slot_lock(storage, storage_url):
        calibration = study_calibration(study, spec, len(data.train))  # before any trial: an impossible total stops here
    report = WorkerReport()
    size = functools.cache(lambda: space_size(spec))  # computed once, when a repeat first suggests it
    consecutive_repeats = 0
    started = time.monotonic()
    prefix = f"[worker {worker_index}] " if worker_index else ""
    try:
        while timeout is None or time.monotonic() - started < timeout:
            with trial_slot_lock(storage, storage_url):
                _recover_orphans(study, spec)
                fail_stale_trials(study)
                target, used, waiting, running = trial_budget(study)
                trial, configs, repeated, line = None, None, None, None
                if calibration is not None and runs_charged(study) >= target:
                    # The total was split over `target` runs; a retried failure would be one run too many.
                    report.exhausted = (f"total_epsilon = {spec.total_epsilon:g} is spent: {runs_charged(study)} runs "
                                        f"have touched the data, the {target} the budget was split over")
                    _set_system_attr(study, _EXHAUSTED, report.exhausted)
                    break
                if waiting or used < target:
                    trial = study.ask()
                    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
                    try:
                        configs, repeated = _propose(study, spec, trial)
                    except ConfigError as err:  # a combination no rule covers: pruned before it touches data
                        line = _prune_invalid(study, trial, err)
                    if repeated is not None:
                        trial.set_user_attr("duplicate_of", repeated)
                        trial.set_user_attr("failure_reason", f"repeats trial {repeated}: not trained, no privacy "
                                                              "budget spent, takes no slot")
                        study.tell(trial, state=TrialState.FAIL)
                        consecutive_repeats += 1
                        report.exhausted = _exhausted(study, size, consecutive_repeats)
                        if report.exhausted:
                            _set_system_attr(study, _EXHAUSTED, report.exhausted)
                            break
                        continue
                    consecutive_repeats = 0
            if trial is None:
                if running and is_heartbeat_enabled(storage):
                    # a trial elsewhere may be stale: wait for its heartbeat to lapse, then retry it here
                    time.sleep(spec.heartbeat_interval)
                    continue
                break
            if line is None:
                with get_heartbeat_thread(trial._trial_id, storage):
                    line = run_trial(study, trial, spec, data, configs, device=device, store=store,
                                     storage_url=storage_url, calibration=calibration)
            report.trials += 1
            if progress:
                tqdm.write(f"{prefix}{line}")
    except KeyboardInterrupt:
        report.interrupted = True
    return report


def _weights_store(study: optuna.Study, spec: StudySpec, storage_url: str, artifacts: str | None):
    if spec.keep_weights == "none":
        return None
    location = study_location(study, storage_url, artifacts)
    if location is None:
        warnings.warn(f"{spec.name}: trained weights are not kept: a server storage needs --artifacts DIR "
                      "(a directory every worker can reach) or s3://BUCKET", stacklevel=2)
        return None
    if artifacts or default_location(storage_url) != location:
        record_location(study, location)
    return open_store(location)


def run_trial(study: optuna.Study, trial: Trial, spec: StudySpec, data: DatasetSplits, configs: Configs, *,
              device: str | None, storage_url: str, store: Any = None, calibration: Calibration | None = None) -> str:
    """Train and record one trial (its configs already proposed); returns a one-line summary.

    Every score that leaves the trial (intermediate values for the pruner and the dashboard, the objective, the
    user attributes, the printed line) is the run's noisy validation release; the exact one never exists here.
    """
    arch, train_cfg, privacy = configs
    if calibration is not None:
        privacy = calibration.privacy_for(privacy, train_cfg)
    settings = spec.data_settings()
    trial.set_user_attr("config", arch.to_dict())
    trial.set_user_attr("train_config", train_cfg.to_dict())
    trial.set_user_attr("privacy_config", privacy.to_dict())
    trial.set_user_attr("data", settings.to_dict())
    trial.set_user_attr("epsilon_target", privacy.epsilon if privacy.private else "inf (non-private)")

    def record_plan(plan: PrivacyPlan) -> None:
        # Written before any step touches the data: the search-level accounting counts this run.
        trial.set_user_attr("privacy_plan", {"noise_multiplier": plan.noise_multiplier,
                                             "sample_rate": plan.sample_rate, "steps": plan.steps,
                                             "val_noise": plan.val_noise, "val_releases": plan.val_releases})
        for part in ("train", "val", "test"):
            trial.set_user_attr(f"{part}_size", len(getattr(data, part)))

    def report(record: dict[str, Any]) -> None:
        if spec.multi_objective:  # Optuna cannot prune multi-objective trials
            return
        trial.report(record["val_accuracy"], record["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned by the {spec.pruner} pruner after epoch {record['epoch']} "
                                     f"(val accuracy {record['val_accuracy']:.4f})")

    trained: list[torch.nn.Module] = []
    try:
        result = train(arch, data, train_cfg=train_cfg, privacy=privacy, device=device, progress=False,
                       on_epoch=report, on_plan=record_plan, catch_interrupt=False, on_trained=trained.append)
    except (optuna.TrialPruned, DivergedError) as err:
        trial.set_user_attr("failure_reason" if isinstance(err, DivergedError) else "pruned_reason", str(err))
        study.tell(trial, state=TrialState.PRUNED)
        return f"trial {trial.number} pruned: {err}"
    except KeyboardInterrupt:
        trial.set_user_attr("failure_reason", "interrupted (Ctrl-C); retried when the study resumes")
        study.tell(trial, state=TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retries)(study, study._storage.get_trial(trial._trial_id))
        raise
    except Exception as err:  # the study goes on; the reason is kept with the trial
        if isinstance(err, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        trial.set_user_attr("failure_reason", f"{type(err).__name__}: {err}")
        study.tell(trial, state=TrialState.FAIL)
        return f"trial {trial.number} failed: {type(err).__name__}: {err}"

    epochs = max(len(result["history"]), 1)
    attrs = {
        "epsilon_spent": result["epsilon_spent"] if result["private"] else "inf (non-private)",
        "noise_multiplier": result["noise_multiplier"],
        "val_noise": result["val_noise"],
        "sample_rate": result["sample_rate"],
        "steps": result["steps"],
        "params": result["params"],
        "samples_per_second": result["samples_per_second"],
        "wall_seconds": result["wall_seconds"],
        "epoch_seconds": result["wall_seconds"] / epochs,
        "val_accuracy": result["val_accuracy"],  # the noisy release (exact only where val_noise = 0)
        "test_accuracy": result["test_accuracy"],  # recorded for the report; never used to select
        "device": result["device"],
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    values = [attrs[o] for o in spec.objectives]
    if not all(math.isfinite(v) for v in values):
        trial.set_user_attr("failure_reason", f"objective not finite: {values}")
        study.tell(trial, state=TrialState.FAIL)
        return f"trial {trial.number} failed: objective not finite"
    with trial_slot_lock(study._storage, storage_url):
        if store is not None and trained:
            checkpoint = checkpoint_dict(
                trained[0], arch=arch, train_cfg=train_cfg, privacy=privacy, data=data,
                data_settings=settings, results={k: v for k, v in attrs.items() if k != "device"},
                provenance={"study": study.study_name, "trial": trial.number, "dpnas_version": _version()})
            keep_trial_weights(study, trial, checkpoint, values=values, keep=spec.keep_weights, store=store)
        study.tell(trial, values=values)
    changed = ", ".join(f"{k}={v}" for k, v in trial.params.items())
    return (f"trial {trial.number} done: val accuracy {result['val_accuracy']:.4f}, "
            f"eps {result['epsilon_spent']:.2f}, {result['params']:,} params ({changed})")


# --- the whole search ----------------------------------------------------------------------------


def _worker_process(spec_path: str, storage_url: str, study_name: str, worker_index: int,
                    device: str | None, timeout: float | None, threads: int, artifacts: str | None) -> None:
    spec = load_study_file(spec_path)
    torch.set_num_threads(threads)  # workers share the cores instead of each claiming all of them
    run_worker(spec, storage_url, study_name=study_name, worker_index=worker_index, device=device, timeout=timeout,
               artifacts=artifacts)


def worker_devices(workers: int, device: str | None) -> list[str | None]:
    """One GPU per worker where there are several; otherwise every worker shares the one device."""
    if device is None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


def search(
    spec: StudySpec, *, storage_url: str | None = None, study_name: str | None = None, n_trials: int | None = None,
    timeout: float | None = None, workers: int = 1, device: str | None = None, progress: bool = True,
    artifacts: str | None = None,
) -> optuna.Study:
    """Run (or continue) the study with `workers` processes; returns the study when all have stopped."""
    url = storage_url or spec.default_storage()
    name = study_name or spec.name
    checked = check_search(spec, url, study_name=name, n_trials=n_trials, timeout=timeout, workers=workers,
                           device=device, progress=progress)
    study = open_study(spec, url, study_name=name, n_trials=n_trials)
    if workers == 1:
        report = run_worker(spec, url, study_name=name, device=device, timeout=timeout, progress=progress,
                            artifacts=artifacts, data=checked.data)
        if report.interrupted:
            raise KeyboardInterrupt
        return study
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    processes = [
        context.Process(target=_worker_process, args=(str(spec.path), url, name, i, dev, timeout, threads, artifacts),
                          daemon=False)
        for i, dev in enumerate(worker_devices(workers, device))
    ]
    for p in processes:
        p.start()
    join_workers(processes)
    return study


def join_workers(processes) -> None:
    """Wait for every worker; a worker that died (any non-zero exit status) is reported, not ignored."""
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt:
        for p in processes:  # they got the same Ctrl-C: let them finish their bookkeeping
            p.join()
        raise
    died = [f"worker {i} exited with status {p.exitcode}" for i, p in enumerate(processes) if p.exitcode != 0]
    if died:
        raise WorkersFailed(f"{'; '.join(died)}: a trial it was running is retried when the study resumes "
                            "(its output above says why it stopped)")


class WorkersFailed(RuntimeError):
    """A worker process of `--workers K` died; the others finished."""


def check_search(spec: StudySpec, url: str, *, study_name: str | None = None, n_trials: int | None = None,
                 timeout: float | None = None, workers: int = 1, device: str | None = None, progress: bool = False):
    """Everything that would fail every trial, checked before the study is created or joined (see checks.py)."""
    if workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {workers}")
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise ConfigError(f"--timeout: must be a positive number of seconds, got {timeout}")
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"--n-trials: must be >= 1, got {n_trials}")
    devices = worker_devices(workers, device)
    if workers > (os.cpu_count() or 1) and all(d is None or str(d).startswith("cpu") for d in devices) \
            and not torch.cuda.is_available():
        warnings.warn(f"--workers {workers} on {os.cpu_count()} CPU cores: the workers will share cores and each "
                      "trial will run slower", stacklevel=2)
    for d in sorted(set(map(str, devices)) - {"None"}):
        parse_device(d)
    return check_study(spec, device=devices[0], n_trials=n_trials, stored=existing_study(spec, url, study_name),
                       progress=progress)


def existing_study(spec: StudySpec, url: str, study_name: str | None = None) -> optuna.Study | None:
    """The stored study, without creating a storage or a study that does not exist yet."""
    kind = storage_kind(url)
    if kind in ("journal", "sqlite") and not Path(url.split("sqlite:///", 1)[-1]).exists():
        return None
    try:
        return optuna.load_study(study_name=study_name or spec.name, storage=_storage(spec, url))
    except KeyError:
        return None


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (single objective) or the Pareto set, by validation scores only."""
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not completed:
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def exhausted_message(study: optuna.Study) -> str | None:
    """The line a worker left when the study's space ran out of new configurations, if one did."""
    return _system_attrs(study).get(_EXHAUSTED)

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

import dataclasses
import functools
import math
import multiprocessing
import os
import queue
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, Trial, TrialState
from tqdm.auto import tqdm

from dpnas.arch.models import check_image_size
from dpnas.arch.space import ConfigError
from dpnas.data.datasets import DEFAULT_IMAGE_SIZE, DatasetSplits
from dpnas.dp.checkpoint import checkpoint_dict
from dpnas.dp.interrupts import Terminated, interrupts_held, terminate_as_interrupt
from dpnas.dp.privacy import PrivacyPlan
from dpnas.dp.resume import ResumeError
from dpnas.dp.train import DivergedError, check_device, train
from dpnas.search.calibration import Calibration
from dpnas.search.checks import check_study, refuse_ablation_trial_count, runs_recorded
from dpnas.search.fidelity import check_target, exported_privacy, load_search_data, search_trial
from dpnas.search.progress import SearchProgress, bar_wanted
from dpnas.search.sampling import Configs, config_key, space_size, suggest
from dpnas.search.storage import (
    heartbeat_thread,
    open_storage,
    slot_lock_excludes_all,
    storage_file,
    storage_kind,
    trial_slot_lock,
    writes_together,
)
from dpnas.search.study_file import StudySpec
from dpnas.search.study_state import (
    _EXHAUSTED,
    _recover_orphans,
    _set_system_attr,
    _system_attrs,
    _version,
    check_trial_count,
    check_unchanged,
    open_study,
    runs_charged,
    study_calibration,
    trial_budget,
    worker_identity,
)
from dpnas.search.trial_resume import (
    RunRecord,
    TrialStateKeeper,
    chain_root,
    forget,
    next_retry_continues,
    releases_covered,
    state_id,
    stopped_run,
)
from dpnas.search.weights import (
    absolute_location,
    default_location,
    keep_trial_weights,
    open_store,
    record_location,
    remove_displaced_weights,
    study_location,
)


def idle_waits(first: float = 0.1, most: float = 1.0, growth: float = 1.5) -> Iterator[float]:
    """The pauses of a worker with nothing to take while trials run elsewhere, before it looks again.

    Short at first: the last trial elsewhere often ends soon, and the search ends with it (2 workers on SQLite
    ended 0.07-1.03 s after their last trial with a constant 1 s pause, 0.06-0.11 s with these; benchmarks/
    RESULTS.md, fifteenth pass). Then longer, up to `most`: a look is a few storage reads under the slot lock
    (2.6 ms on SQLite), which the idle workers of a long trial would otherwise take turns at on a shared server.
    """
    wait = first
    while True:
        yield wait
        wait = min(wait * growth, most)


# --- one worker ----------------------------------------------------------------------------------


@dataclass
class WorkerReport:
    trials: int = 0
    interrupted: bool = False
    exhausted: str | None = None


# After this many proposals in a row that repeat trained configurations, a worker stops: the sampler has
# (nearly) run out of new points.
MAX_CONSECUTIVE_DUPLICATES = 50


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


def _propose(study: optuna.Study, spec: StudySpec, trial: Trial, image_size: int,
             train_size: int) -> tuple[Any, int | None]:
    """Sample the trial's configs (under the slot lock, so two workers never take the same new point).

    Returns (configs, the number of the trial it repeats or None); raises ConfigError for an invalid point,
    including one whose downsamplings the study's image size cannot take, or whose exported recipe (the target
    fidelity, on all `train_size` training records) could not be trained (refused before any ε is charged).
    """
    configs = suggest(trial, spec)
    key = config_key(configs)
    # A random number of runs (Papernot & Steinke) needs each run drawn independently from the same distribution:
    # a repeat is a fresh draw and trains; turning it away would make the runs draws without replacement.
    repeated = _trained_keys(study, exclude=trial.number).get(key) if spec.trial_count == "fixed" else None
    # recorded first: a point the image size cannot take is pruned once (one slot); proposed again, it is a
    # repeat (no slot), not pruned again
    trial.set_user_attr("config_key", key)
    if repeated is None:
        check_image_size(configs[0], image_size)
        target_size = spec.image_size or DEFAULT_IMAGE_SIZE[spec.dataset]
        if target_size != image_size:  # a search at another resolution ([fidelity]): the exported recipe must build
            check_image_size(configs[0], target_size)
        check_target(spec, configs[1], configs[2], train_size=train_size)
    return configs, repeated


def _prune_invalid(study: optuna.Study, trial: Trial, err: ConfigError) -> str:
    trial.set_user_attr("failure_reason", f"invalid combination: {err}")
    study.tell(trial, state=TrialState.PRUNED)
    return f"trial {trial.number} pruned (invalid combination): {err}"


def _runs_spent(spec: StudySpec, *, runs: int, target: int) -> str:
    """The line a study prints when its counted runs are spent and a failed trial is not retried. A random count
    stays unprinted: it is secret, as on the progress bar."""
    if spec.trial_count != "fixed":
        spent = f" (total_epsilon = {spec.total_epsilon:g} is spent)" if spec.total_epsilon is not None else ""
        return (f"every run this study drew in secret (trial_count = {spec.trial_count}) has touched the data{spent}: "
                "a failed trial is not retried, as Papernot & Steinke's bound covers the best of the drawn runs only")
    return (f"total_epsilon = {spec.total_epsilon:g} is spent: {runs} runs have touched the data, the {target} the "
            "budget was split over")


def _say_runs_spent(study: optuna.Study, spec: StudySpec) -> str:
    """Leave the study's "spent" line (:func:`_runs_spent`) for its end to print, and return it: said by the worker
    that finds the runs spent, and by a retry let in to continue a stopped run that could not (its FAIL takes the
    chain's slot, so the worker's loop ends without reaching the line itself)."""
    line = _runs_spent(spec, runs=runs_recorded(study), target=trial_budget(study)[0])
    _set_system_attr(study, _EXHAUSTED, line)
    return line


def _exhausted(study: optuna.Study, size: Callable[[], int | None], consecutive: int) -> str | None:
    distinct = len(_trained_keys(study))  # a point the image size cannot take counts: it is covered
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
    artifacts: str | None = None, data: DatasetSplits | None = None, on_line: Callable[[str], None] | None = None,
) -> WorkerReport:
    """Take trials of the study until its budget is used (or `timeout` seconds have passed).

    Each finished trial's line goes to `on_line` (the search's progress bar, or the queue to the process that draws
    it); printed plainly without one.
    """
    study = open_study(spec, storage_url, study_name=study_name, worker_index=worker_index)
    store, weights_location = _weights_store(study, spec, storage_url, artifacts)
    if data is None:
        data = load_search_data(spec, progress=progress)
    storage = study._storage
    slot_locked = slot_lock_excludes_all(storage, storage_url)
    with trial_slot_lock(storage, storage_url):
        check_unchanged(study, spec)  # joined long ago (the data loaded since): still this worker's settings?
        calibration = study_calibration(study, spec, len(data.train))  # before any trial: an impossible total stops here
    report = WorkerReport()
    size = functools.cache(lambda: space_size(spec))  # computed once, when a repeat first suggests it
    consecutive_repeats = 0
    waits = idle_waits()
    started = time.monotonic()
    prefix = f"[worker {worker_index}] " if worker_index else ""
    try:
        while timeout is None or time.monotonic() - started < timeout:
            with trial_slot_lock(storage, storage_url) as slot:
                check_unchanged(study, spec)
                _recover_orphans(study, spec, slot_locked=slot_locked)
                fail_stale_trials(study)
                target, used, waiting, running = trial_budget(study)
                # A slot is left while the trials that are not queued hold fewer than the target: a queued trial
                # beyond it (a grid's, after --n-trials lowered the count) stays queued, untrained
                room = used - waiting < target
                trial, configs, repeated, line = None, None, None, None
                # Runs are counted where a total is split over `target` runs, or a random count (Papernot & Steinke)
                # bounds the best of the `target` runs it drew: a retried failure would be a run more than either
                # covers. A stopped run continued (charged already, not again) is one of them: it goes on.
                spent = ((calibration is not None or spec.trial_count != "fixed") and runs_charged(study) >= target
                         and room)
                continuing = next_retry_continues(study, store) if spent else None
                if spent and continuing is None:
                    report.exhausted = _say_runs_spent(study, spec)
                    break
                if room:
                    with warnings.catch_warnings():
                        # dpnas beats the trial's heartbeat itself (heartbeat_thread below), which Optuna
                        # expects only of optimize(): its warning at every ask on SQLite / PostgreSQL says nothing
                        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                        trial = study.ask() if continuing is None else _ask_waiting(study, continuing)
                    if trial is None:  # taken elsewhere meanwhile (a storage whose slot lock does not exclude all)
                        continue
                    if is_heartbeat_enabled(storage):
                        # its first beat before the slot lock is released: a trial seen running without one lost
                        # its worker under the lock (_recover_orphans); after it, a worker that dies anywhere (on
                        # another host too) leaves a heartbeat that goes stale
                        storage.record_heartbeat(trial._trial_id)
                    # at once: a trial of a worker that died is found by it (_recover_orphans)
                    with writes_together(storage):
                        for key, value in worker_identity().items():
                            trial.set_user_attr(key, value)
                        if trial.user_attrs.get("continues_run_of") is not None:
                            # Optuna's copy of a continued original's mark: this retry has not continued anything
                            # yet, and is counted as a run until it does (runs_charged), or another worker may
                            # start the last run while it trains afresh
                            trial.set_user_attr("continues_run_of", None)
                    try:
                        # its parameters and config key in one append, before the slot is released (the next
                        # worker reads the key)
                        with writes_together(storage):
                            configs, repeated = _propose(study, spec, trial, data.image_size,
                                                         data.full_train_size or len(data.train))
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
                    if not slot.held():  # lost on the way (a server's session ended): the budget read may be stale
                        _give_back(study, trial)
                        continue
            if trial is None:
                if running and is_heartbeat_enabled(storage):
                    # a trial elsewhere may be stale: wait for its heartbeat to lapse, then retry it here. Looked
                    # at again within a second, so a worker stops soon after the last trial running elsewhere
                    # ends, not up to a whole heartbeat interval (60 s) later: 2 workers on SQLite took 64 s for
                    # 4 trials of 1 s (benchmarks/RESULTS.md, thirteenth pass)
                    time.sleep(min(spec.heartbeat_interval, next(waits)))
                    continue
                break
            waits = idle_waits()  # a trial taken: the next idle spell starts with short pauses again
            if line is None:
                with heartbeat_thread(trial._trial_id, storage):
                    line = run_trial(study, trial, spec, data, configs, device=device, store=store,
                                     weights_location=weights_location, storage_url=storage_url,
                                     calibration=calibration, only_continue=spent)
            report.trials += 1
            if progress:
                (on_line or tqdm.write)(f"{prefix}{line}")
    except KeyboardInterrupt:
        report.interrupted = True
    return report


def _ask_waiting(study: optuna.Study, waiting: FrozenTrial) -> Trial | None:
    """`study.ask()` for this WAITING trial, not the lowest-numbered one (None: no longer waiting)."""
    study._thread_local.cached_all_trials = None  # as ask does
    try:
        if not study._storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    return optuna.Trial(study, waiting._trial_id)


def _give_back(study: optuna.Study, trial: Trial) -> None:
    """Give back, untrained, a trial taken under a slot lock that turned out lost (its server session ended: a
    restart, a killed backend): another worker may have taken the lock meanwhile, and on a budget read before this
    trial existed, the last slot (or this trial's point) too. It has not touched the data: failed and queued again,
    as an interrupted trial is, it costs no slot and no epsilon, and the slots are looked at again under the lock."""
    with interrupts_held():  # a Ctrl-C between the FAIL and its retry would leave a failed trial holding a slot
        trial.set_user_attr("failure_reason", "the trial-slot lock was lost (a server restart or a closed session) "
                                              "before the trial trained; queued again")
        study.tell(trial, state=TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback(max_retry=None)(study, study._storage.get_trial(trial._trial_id))


def _weights_store(study: optuna.Study, spec: StudySpec, storage_url: str, artifacts: str | None):
    """The store this worker keeps weights in, and its location where each kept trial records it (None: beside a
    journal or SQLite file, found from the storage wherever the two are moved together)."""
    if spec.keep_weights == "none":
        return None, None
    location = study_location(study, storage_url, artifacts and absolute_location(artifacts))
    if location is None:
        warnings.warn(f"{spec.name}: trained weights are not kept: a server storage needs --artifacts DIR "
                      "(a directory every worker can reach) or s3://BUCKET", stacklevel=2)
        return None, None
    if artifacts or default_location(storage_url) != location:
        record_location(study, location)
        return open_store(location), location
    return open_store(location), None


def run_trial(study: optuna.Study, trial: Trial, spec: StudySpec, data: DatasetSplits, configs: Configs, *,
              device: str | None, storage_url: str, store: Any = None, weights_location: str | None = None,
              calibration: Calibration | None = None, only_continue: bool = False) -> str:
    """Train and record one trial (its configs already proposed); returns a one-line summary.

    Every score that leaves the trial (intermediate values for the pruner and the dashboard, the objective, the
    user attributes, the printed line) is the run's noisy validation release; the exact one never exists here.
    """
    arch, target_train, target_privacy = configs
    try:
        scaled = search_trial(spec, target_train, target_privacy, calibration=calibration, train_size=len(data.train),
                              full_train_size=data.full_train_size)
    except ConfigError as err:  # a study-wide problem (a shape not calibrated): the trial is not left RUNNING
        trial.set_user_attr("failure_reason", str(err))
        study.tell(trial, state=TrialState.FAIL)
        raise
    train_cfg, privacy, steps = scaled.train, scaled.privacy, scaled.steps
    settings = spec.data_settings()
    # A trial's attributes are written in a few groups, each one append to a journal (writes_together)
    with writes_together(study._storage):
        if trial.user_attrs.get("failure_reason") is not None:  # a retry: Optuna copied its original's reason
            trial.set_user_attr("failure_reason", None)
        if spec.fidelity.active:
            # The trial trains at the search's fidelity; what it stands for (and `dpnas best` exports) is the target.
            trial.set_user_attr("fidelity", scaled.record)
            trial.set_user_attr("target_train_config", target_train.to_dict())
            # Validations alone train the target itself: it stands for the run it trained, at its (calibrated)
            # noise, its validation noise derived again for the recipe's one release per epoch.
            stands_for = (exported_privacy(spec, target_train, target_privacy, calibration=calibration)
                          if spec.fidelity.trains_proxy else dataclasses.replace(privacy, val_noise="auto"))
            trial.set_user_attr("target_privacy_config", stands_for.to_dict())
            trial.set_user_attr("target_data", settings.to_dict())
            settings = dataclasses.replace(settings, image_size=data.image_size)
        trial.set_user_attr("config", arch.to_dict())
        trial.set_user_attr("train_config", train_cfg.to_dict())
        trial.set_user_attr("privacy_config", privacy.to_dict())
        trial.set_user_attr("data", settings.to_dict())
        trial.set_user_attr("epsilon_target", privacy.epsilon if privacy.private else "inf (non-private)")

    last_release: list[int] = []  # the epoch of the run's last validation release, once planned
    reported: list[dict[str, Any]] = []  # the last epoch's record: what a pruned run had spent
    # A retry continues the run its chain's first trial started, where that run left its state (trial_resume)
    frozen = study._storage.get_trial(trial._trial_id)
    state_name = state_id(study, chain_root(frozen)) if store is not None else None
    run_record = RunRecord({"arch": arch.to_dict(), "train_config": train_cfg.to_dict(),
                            "privacy_config": privacy.to_dict(), "steps": steps,
                            "validations": scaled.validations}, data)
    resume = (stopped_run(store, state_name, run_record)
              if state_name is not None and frozen.system_attrs.get("retry_history") else None)
    if resume is not None and not releases_covered(study, frozen, resume):
        resume = None  # the stopped run released scores past its state (its worker was killed): not continued
    if only_continue and resume is None:
        # The budget's runs are all spent and this retry was let in to continue a stopped one, whose state turned
        # out not to be this run's: trained afresh it would be a run too many. Failed before it touches the data
        # (no plan, no epsilon) and not retried, so the study ends.
        trial.set_user_attr("failure_reason", "the study's runs are all spent and the stopped run's state is not "
                                              "this run's: not trained (no epsilon spent)")
        study.tell(trial, state=TrialState.FAIL)
        _say_runs_spent(study, spec)
        return f"trial {trial.number} not trained: the study's runs are all spent"

    def record_plan(plan: PrivacyPlan) -> None:
        last_release.append(max(plan.validated_periods(), default=0))
        if resume is not None:
            # The same run as the stopped one, under the plan the trial that started it recorded (copied here by
            # the retry, and so not this trial's own: the run is charged once, as one run).
            inherited = frozen.user_attrs.get("privacy_plan") or {}
            if any(inherited.get(k) != getattr(plan, k) for k in ("noise_multiplier", "sample_rate", "steps",
                                                                  "val_noise", "val_releases")):
                raise ResumeError("the stopped run's recorded plan is not this run's")
            if keeper is not None:  # its states stay the run of the trial that started it
                keeper.run_of = inherited["trial"]
            with writes_together(study._storage):
                trial.set_user_attr("continues_run_of", inherited["trial"])
                for part in ("train", "val", "test"):
                    trial.set_user_attr(f"{part}_size", len(getattr(data, part)))
            for record in resume["progress"]["history"]:  # released before the stop: reported again, not again released
                if not spec.multi_objective:
                    trial.report(record["val_accuracy"], record["epoch"])
                reported[:] = [record]
            return
        if keeper is not None:  # this trial's own run: a later retry continues its states, none older (trial_resume)
            keeper.run_of = trial.number
        # Written (the block's end) before any step touches the data: the search-level accounting counts this run.
        with writes_together(study._storage):
            # named after its trial: a retry's copy of it (Optuna copies the original's attributes) is not its own
            trial.set_user_attr("privacy_plan", {"trial": trial.number, "noise_multiplier": plan.noise_multiplier,
                                                 "sample_rate": plan.sample_rate, "steps": plan.steps,
                                                 "val_noise": plan.val_noise, "val_releases": plan.val_releases})
            for part in ("train", "val", "test"):
                trial.set_user_attr(f"{part}_size", len(getattr(data, part)))

    def report(record: dict[str, Any]) -> None:
        reported[:] = [record]
        if spec.multi_objective:  # Optuna cannot prune multi-objective trials
            return
        trial.report(record["val_accuracy"], record["epoch"])
        # After its last release a run has spent its budget and has its final score: it completes, never pruned
        if record["epoch"] < last_release[-1] and trial.should_prune():
            raise optuna.TrialPruned(f"pruned by the {spec.pruner} pruner after epoch {record['epoch']} "
                                     f"(val accuracy {record['val_accuracy']:.4f})")

    trained: list[torch.nn.Module] = []
    keeper = TrialStateKeeper(store, state_name, run_record) if state_name is not None else None

    def train_run() -> dict[str, Any]:
        nonlocal resume
        kwargs = {"device": device, "progress": False, "on_epoch": report, "on_plan": record_plan,
                  "catch_interrupt": False, "on_trained": trained.append, "steps": steps,
                  "validations": scaled.validations, "keep_state": keeper}
        try:
            return train(arch, data, train_cfg=train_cfg, privacy=privacy, resume=resume, **kwargs)
        except ResumeError:  # refused before any step (another plan): the retry trains its own run, as before
            if only_continue:  # unless the study's runs are all spent: trained afresh it would be a run too many
                _say_runs_spent(study, spec)
                raise
            resume = None
            return train(arch, data, train_cfg=train_cfg, privacy=privacy, **kwargs)

    def forget_state() -> None:  # the run ended (finished, pruned, failed): nothing is left to continue
        if state_name is not None:
            forget(store, state_name)

    try:
        result = train_run()
    except (optuna.TrialPruned, DivergedError) as err:
        forget_state()
        with interrupts_held():
            with writes_together(study._storage):
                trial.set_user_attr("failure_reason" if isinstance(err, DivergedError) else "pruned_reason", str(err))
                if reported:  # what DP-SGD spent before the stop (the search charges the run its whole plan)
                    spent = reported[0]["epsilon_spent"]
                    trial.set_user_attr("epsilon_spent", spent if math.isfinite(spent) else "inf (non-private)")
            study.tell(trial, state=TrialState.PRUNED)
        return f"trial {trial.number} pruned: {err}"
    except KeyboardInterrupt:
        # held: a second Ctrl-C between the FAIL and its retry would leave a failed trial that holds a slot, unretried
        with interrupts_held():
            trial.set_user_attr("failure_reason", "interrupted (Ctrl-C or SIGTERM); retried when the study resumes")
            study.tell(trial, state=TrialState.FAIL)
            # always retried: max_retries bounds the runs of a trial that crashes its worker, not the times a
            # user or a job's time limit stopped it (counted, max_retries = 0 or a third stop lost the slot for good)
            RetryHeartbeatStaleTrialCallback(max_retry=None)(study, study._storage.get_trial(trial._trial_id))
        raise
    except Exception as err:  # the study goes on; the reason is kept with the trial
        forget_state()
        if isinstance(err, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        trial.set_user_attr("failure_reason", f"{type(err).__name__}: {err}")
        study.tell(trial, state=TrialState.FAIL)
        return f"trial {trial.number} failed: {type(err).__name__}: {err}"
    forget_state()

    # Trained to its end: its privacy is spent and its scores released. Recorded whole, whenever Ctrl-C comes.
    with interrupts_held():
        epochs = max(result["history"][-1]["epoch"] if result["history"] else 0, 1)
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
        with writes_together(study._storage):
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
                keep_trial_weights(study, trial, checkpoint, values=values, keep=spec.keep_weights, store=store,
                                   location=weights_location)
            study.tell(trial, values=values)
            if store is not None:  # only now: the files this trial displaces are not removed while it may be lost
                remove_displaced_weights(study, keep=spec.keep_weights, store=store, location=weights_location)
        changed = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        return (f"trial {trial.number} done: val accuracy {result['val_accuracy']:.4f}, "
                f"eps {result['epsilon_spent']:.2f}, {result['params']:,} params ({changed})")


# --- the whole search ----------------------------------------------------------------------------


@terminate_as_interrupt()
def _worker_process(spec: StudySpec, storage_url: str, study_name: str, worker_index: int,
                    device: str | None, timeout: float | None, threads: int, artifacts: str | None,
                    data: DatasetSplits | None, lines: Any = None, optuna_verbosity: int | None = None) -> None:
    """One worker of ``--workers K``: forked, it gets the spec and the loaded data; spawned, the spec (pickled: the
    one the search checked) and Optuna's log level, and it loads the data itself. Either way it opens its own
    storage: inherited connections are never used."""
    if optuna_verbosity is not None:
        optuna.logging.set_verbosity(optuna_verbosity)
    torch.set_num_threads(threads)  # workers share the cores instead of each claiming all of them
    run_worker(spec, storage_url, study_name=study_name, worker_index=worker_index, device=device, timeout=timeout,
               artifacts=artifacts, data=data, on_line=lines.put if lines is not None else None)


def _can_fork(devices: list[str | None], threads: int = 1) -> bool:
    """Fork only CPU workers of one thread each.

    CUDA cannot be used in a child forked from a process that has initialised it. And torch's CPU threads are a
    GNU OpenMP team, which does not survive a fork: in a child forked from a process that has run a team of
    several threads, the first parallel region of several threads waits forever for threads that were never
    forked (GCC bug 60035; pytorch/pytorch#58962). A search's process always has run one (loading the data, the
    preflight step), so a forked worker of 2 threads hung before its first step (tests/test_search.py), where a
    worker of one thread runs no team at all.
    """
    on_cpu = all((d is None and not torch.cuda.is_available()) or str(d).startswith("cpu") for d in devices)
    return (on_cpu and threads == 1 and "fork" in multiprocessing.get_all_start_methods()
            and not torch.cuda.is_initialized())


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity (``taskset``, a cluster job's cpuset), which can be far
    fewer than the machine's ``os.cpu_count()``; that count where the OS has no affinity."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def worker_devices(workers: int, device: str | None) -> list[str | None]:
    """One GPU per worker where there are several; otherwise every worker shares the one device."""
    if device is None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


@terminate_as_interrupt()  # a cluster's SIGTERM before its SIGKILL: the running trial is queued again, as on Ctrl-C
def search(
    spec: StudySpec, *, storage_url: str | None = None, study_name: str | None = None, n_trials: int | None = None,
    timeout: float | None = None, workers: int = 1, device: str | None = None, progress: bool = True,
    artifacts: str | None = None, progress_bar: bool | None = None,
) -> optuna.Study:
    """Run (or continue) the study with `workers` processes; returns the study when all have stopped.

    With `progress`, one line per finished trial and, on a terminal (or with `progress_bar=True`), one bar for the
    whole study above which the lines are printed; `progress_bar=False` or output that is not a terminal keeps the
    plain lines.
    """
    url = storage_url or spec.default_storage()
    name = spec.name if study_name is None else study_name  # a blank name is refused by the checks, not replaced
    checked = check_search(spec, url, study_name=name, n_trials=n_trials, timeout=timeout, workers=workers,
                           device=device, progress=progress)
    study = open_study(spec, url, study_name=name, n_trials=n_trials)
    if exhausted_message(study):  # said by an earlier search; this one looks again (its space may have grown)
        _set_system_attr(study, _EXHAUSTED, None)
    bar = SearchProgress(study) if bar_wanted(progress, progress_bar) else None
    if workers == 1:
        try:
            report = run_worker(spec, url, study_name=name, device=device, timeout=timeout, progress=progress,
                                artifacts=artifacts, data=checked.data, on_line=bar.write if bar else None)
        finally:
            if bar:
                bar.close()
        if report.interrupted:
            raise KeyboardInterrupt
        return study
    devices = worker_devices(workers, device)
    threads = max(1, usable_cores() // workers)
    context = multiprocessing.get_context("fork" if _can_fork(devices, threads) else "spawn")
    # With a bar, the workers send their lines to this process, which prints them above the one bar it draws.
    lines = context.Queue() if bar else None
    # A forked worker starts at once, with torch, Opacus and the data already in memory (shared copy-on-write):
    # a spawned one imports them again and reloads the data, 3.2 s more before the first trials of the quickstart
    # on the 2-core CPU, more than 2 workers gain there (benchmarks/RESULTS.md, issue 17's eleventh pass).
    data = checked.data if context.get_start_method() == "fork" else None
    processes = [context.Process(target=_worker_process, daemon=False,
                                 args=(spec, url, name, i, dev, timeout, threads, artifacts, data, lines,
                                       optuna.logging.get_verbosity()))
                 for i, dev in enumerate(devices)]
    for p in processes:
        p.start()
    if bar:
        try:
            follow_workers(processes, lines, bar)
        except KeyboardInterrupt as err:
            pass_on_termination(processes, err)
            follow_workers(processes, lines, bar)  # they got the same Ctrl-C: show their lines as they finish
            raise
        finally:
            bar.close()
    join_workers(processes)
    return study


# How often the parent redraws the bar from the storage while its workers train (its elapsed time, and trials
# finished by workers elsewhere on a shared server storage); and how long it waits for a worker's line before it
# looks whether the workers are still alive: the search returns that soon after its last worker exits (it waited
# a whole redraw interval before, up to 1 s a search).
PROGRESS_POLL_SECONDS = 1.0
LINE_WAIT_SECONDS = 0.1


def follow_workers(processes, lines, bar: SearchProgress) -> None:
    """Print the workers' lines above the bar and redraw it until every worker has exited and said everything.

    The queue is drained until the end: a process that put lines on it cannot exit before they are read.
    """
    redrawn = time.monotonic()
    while True:
        alive = any(p.is_alive() for p in processes)
        try:
            bar.write(lines.get(timeout=LINE_WAIT_SECONDS))
            continue
        except queue.Empty:
            pass
        if not alive:
            bar.refresh()
            return
        if time.monotonic() - redrawn >= PROGRESS_POLL_SECONDS:
            bar.refresh()
            redrawn = time.monotonic()


def join_workers(processes) -> None:
    """Wait for every worker; a worker that died (any non-zero exit status) is reported, not ignored."""
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt as err:
        pass_on_termination(processes, err)
        for p in processes:  # they got the same Ctrl-C: let them finish their bookkeeping
            p.join()
        raise
    died = [f"worker {i} exited with status {p.exitcode}" for i, p in enumerate(processes) if p.exitcode != 0]
    if died:
        raise WorkersFailed(f"{'; '.join(died)}: a trial it was running is retried when the study resumes, "
                            "unless the study's total_epsilon is spent (its output above says why it stopped)")


def pass_on_termination(processes, interrupt: KeyboardInterrupt) -> None:
    """A SIGTERM sent to the search's process alone (`kill PID`, a container's PID 1) is sent on to its workers,
    which stop as on Ctrl-C (their trials failed and queued again); unsent, the search waited for them to finish
    every trial. A terminal's Ctrl-C already reached them all."""
    if isinstance(interrupt, Terminated):
        for p in processes:
            if p.is_alive():
                p.terminate()


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
    refuse_ablation_trial_count(spec, n_trials)
    if study_name is not None and not study_name.strip():
        raise ConfigError("--study-name: must not be empty")
    devices = worker_devices(workers, device)
    cores = usable_cores()
    if workers > cores and all(d is None or str(d).startswith("cpu") for d in devices) \
            and not torch.cuda.is_available():
        warnings.warn(f"--workers {workers} on {cores} CPU cores: the workers will share cores and each "
                      "trial will run slower", stacklevel=2)
    for d in sorted(set(map(str, devices)) - {"None"}):
        check_device(d)
    stored = existing_study(spec, url, study_name)
    if stored is not None:  # what joining it would refuse, refused before the data or the calibration
        check_trial_count(stored, spec, n_trials)
    return check_study(spec, device=devices[0], n_trials=n_trials, stored=stored, progress=progress)


def existing_study(spec: StudySpec, url: str, study_name: str | None = None) -> optuna.Study | None:
    """The stored study, without creating a storage or a study that does not exist yet."""
    kind = storage_kind(url)
    if kind in ("journal", "sqlite") and not storage_file(url).exists():
        return None
    try:
        # read only: a damaged journal is repaired by the search that goes on, not by a check or a refusal
        storage = open_storage(url, must_exist=True, quiet=True)
        return optuna.load_study(study_name=study_name or spec.name, storage=storage)
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

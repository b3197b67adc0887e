"""A stopped trial's run, continued by its retry instead of trained again.

A trial stopped by Ctrl-C or SIGTERM (a cluster's preemption), or whose worker died, is failed and queued again
(Optuna's retry). Its run had touched the data: the search charges it whatever became of it. Trained again from
the start, the retry was a second run on the same records, charged again (in a total-ε study, one of its runs
wasted). Where the stopped run left its resume state (:mod:`dpnas.dp.resume`) in the study's artifact store, the
retry continues that run instead: the same run, under the privacy plan the original trial recorded, charged once.

When the state is written: when a run stops (Ctrl-C, SIGTERM), and while it trains at most every
:data:`RESUME_EVERY_S` seconds (for a worker that is killed), so a quickstart trial of a second never writes one
unless stopped. Where there is no store (``keep_weights = "none"``, a server storage without ``--artifacts``), a
state that cannot be read, or one of another point, plan or data, the retry trains afresh, as before.
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any

import optuna
import torch
from optuna.artifacts.exceptions import ArtifactNotFound

from dpnas.data.datasets import DatasetSplits
from dpnas.dp.resume import FORMAT, FORMAT_VERSION, data_fingerprint, stamped

RESUME_EVERY_S = 60.0


def chain_root(trial: optuna.trial.FrozenTrial) -> int:
    """The first trial of a chain of retries: the one whose run a retry may continue (its state's name)."""
    history = trial.system_attrs.get("retry_history") or []
    return history[0] if history else trial.number


def state_id(study: optuna.Study, root: int) -> str:
    """The artifact name of a chain's resume state: one store may serve several studies and storages."""
    owner = hashlib.sha1(f"{study.study_name}\0{study._study_id}".encode()).hexdigest()[:12]
    return f"dpnas-resume-{owner}-trial{root}.pt"


class RunRecord:
    """What a state must match to be continued: the point's configs and the records it trains on."""

    def __init__(self, configs: dict[str, Any], data: DatasetSplits):
        self.configs = configs
        self._data = data
        self._fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self._fingerprint is None:  # computed once, only when a state is written or read
            self._fingerprint = data_fingerprint(self._data)
        return {**self.configs, "data_fingerprint": self._fingerprint}


def _read_state(store: Any, name: str) -> dict[str, Any] | None:
    try:
        with store.open_reader(name) as reader:
            state = torch.load(io.BytesIO(reader.read()), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing or damaged (half written by a killed worker): the retry starts afresh
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        return None
    return state


def stopped_run(store: Any, name: str, record: RunRecord) -> dict[str, Any] | None:
    """The state a stopped run of this chain left, or None (none, unreadable, or another run's)."""
    state = _read_state(store, name)
    return state if state is not None and state.get("run") == record.to_dict() else None


def next_retry_continues(study: optuna.Study, store: Any) -> optuna.trial.FrozenTrial | None:
    """The first WAITING retry (by number) whose chain left a state it may continue, or None: a run already charged,
    which a study whose runs are all spent still finishes. Looked for past WAITING trials that cannot train then (a
    killed trial's retry without a state, numbered before a stopped run's retry, would have hidden it: `study.ask()`
    hands out the lowest-numbered one). (The retry checks its state against its point and data as well, and trains
    nothing if that fails.)"""
    if store is None:
        return None
    for trial in sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)),
                        key=lambda t: t.number):
        if not trial.system_attrs.get("retry_history"):
            continue
        state = _read_state(store, state_id(study, chain_root(trial)))
        if state is not None and releases_covered(study, trial, state):
            return trial
    return None


def releases_covered(study: optuna.Study, trial: optuna.trial.FrozenTrial, state: dict[str, Any]) -> bool:
    """Whether every score the stopped run released is in its state's history, as released.

    A worker killed (not stopped) after its last state went on training and reported scores past it; continued from
    the state, the run would train those epochs again and release their scores a second time, from another branch
    of the run than the one its plan charges. Checked over the run's trials: the one that started it (its plan's
    writer) and the retries since; earlier ones were other runs, charged apart.

    The state must also be that run's (``run_of``, the trial that started it): a retry that trained afresh (its
    own plan) and was killed before it wrote a state leaves the chain's older run's state in the store, which the
    check of its own (empty) scores would pass; continued under the newer run's plan, that older run's epochs past
    its state were released again, from another branch."""
    history = {record["epoch"]: record["val_accuracy"] for record in state["progress"]["history"]}
    writer = (trial.user_attrs.get("privacy_plan") or {}).get("trial")
    if writer is None or state.get("run_of") != writer:
        return False
    storage = study._storage
    for number in trial.system_attrs.get("retry_history", []):
        if number < writer:
            continue
        earlier = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
        if any(history.get(step) != value for step, value in earlier.intermediate_values.items()):
            return False
    return True


class TrialStateKeeper:
    """`train`'s `keep_state` for a trial: writes the state when the run stops, and at most every `every_s`
    seconds while it trains."""

    def __init__(self, store: Any, name: str, record: RunRecord, *, every_s: float = RESUME_EVERY_S):
        self.store, self.name, self.record, self.every_s = store, name, record, every_s
        self.last = time.monotonic()
        self.run_of: int | None = None  # the trial that started the run (its plan's writer), set once it is planned

    def __call__(self, state: dict[str, Any]) -> None:
        if not state["stopped"] and time.monotonic() - self.last < self.every_s:
            return
        buffer = io.BytesIO()
        torch.save(stamped({**state, "run": self.record.to_dict(), "run_of": self.run_of}), buffer)
        buffer.seek(0)
        try:
            self.store.write(self.name, buffer)
        except OSError:  # the trial goes on; its retry trains afresh, as without a store
            return
        self.last = time.monotonic()


def forget(store: Any, name: str) -> None:
    """Remove a chain's state once its run ended (finished, pruned, failed): nothing is left to continue."""
    try:
        store.remove(name)
    except (ArtifactNotFound, OSError):
        pass

"""The trained weights of a study's trials, in Optuna's artifact store.

Releasing the best run's *own* output is what Papernot & Steinke's guarantee covers, so the winner's weights
are kept rather than retrained (which would cost another run's ε). Each kept trial's checkpoint
(:mod:`dpnas.dp.checkpoint`) is uploaded with ``optuna.artifacts.upload_artifact`` while the trial is still
running, so it is linked to the trial and optuna-dashboard lists it (``optuna-dashboard --artifact-dir``).

Where: a ``FileSystemArtifactStore`` in ``STORAGE.artifacts/`` beside a journal or SQLite file by default;
for a server storage (PostgreSQL) a directory every worker can reach, or ``s3://bucket/prefix`` (boto3), given
with ``--artifacts`` and recorded in the study.

How many: ``keep_weights`` in ``[study]``: ``"all"``, ``"best"`` (the best trial, or the Pareto set), or K (the
top K by validation accuracy). A trial that drops out of the kept set has its file removed from the store; its
link stays in the trial (Optuna cannot edit a finished trial) and the study records the removal.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts._protocol import ArtifactStore
from optuna.trial import FrozenTrial, TrialState

from dpnas.arch.space import ConfigError
from dpnas.dp.checkpoint import save_checkpoint
from dpnas.search.storage import storage_file

WEIGHTS_FILE = "weights.pt"
_LOCATION = "dpnas:artifacts"
_REMOVED = "dpnas:weights_removed:"
_ARTIFACT = "weights_artifact_id"
_WHERE = "weights_location"  # the store a trial's weights went to, where it is not beside the storage


def default_location(storage_url: str) -> str | None:
    """``STORAGE.artifacts`` beside a journal or SQLite file; None for a server storage."""
    path = storage_file(storage_url)
    return None if path is None else str(path.with_name(path.name + ".artifacts"))


def absolute_location(location: str) -> str:
    """A directory as an absolute path (an S3 bucket as it is), fit to record in the study: a relative one named
    another folder in every working directory, so each host kept its weights in its own, and `dpnas best` run
    anywhere else found none."""
    return location if location.startswith("s3://") else str(Path(location).absolute())


def open_store(location: str, *, create: bool = True) -> ArtifactStore:
    """The artifact store at `location` (a directory, made where `create`; or s3://BUCKET). A reader passes
    create=False: a folder another host wrote to, absent here, is not left behind empty."""
    if location.startswith("s3://"):
        try:
            from optuna.artifacts import Boto3ArtifactStore
        except ImportError as err:  # pragma: no cover - depends on boto3 being installed
            raise ConfigError(f"--artifacts {location}: an S3 store needs boto3 (pip install boto3)") from err
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if not bucket or prefix.strip("/"):
            raise ConfigError(f"--artifacts {location}: an S3 store is a whole bucket: s3://BUCKET")
        return Boto3ArtifactStore(bucket)
    path = Path(location)
    if not create:
        if not path.is_dir():
            raise ConfigError(f"--artifacts {location}: no such directory here (where the weights were kept)")
        return FileSystemArtifactStore(str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--artifacts {location}: cannot create the directory ({err.strerror or err})") from None
    return FileSystemArtifactStore(str(path))


def trial_location(study: optuna.Study, trial: FrozenTrial, storage_url: str,
                   override: str | None = None) -> str | None:
    """Where this trial's weights are: --artifacts, else where its worker kept them, else the study's location."""
    return override or trial.user_attrs.get(_WHERE) or study_location(study, storage_url)


def study_location(study: optuna.Study, storage_url: str, override: str | None = None) -> str | None:
    """Where this study's weights are: --artifacts, else what the study recorded, else beside the storage."""
    if override:
        return override
    recorded = study._storage.get_study_system_attrs(study._study_id).get(_LOCATION)
    return recorded or default_location(storage_url)


def storage_location(storage: optuna.storages.BaseStorage, storage_url: str) -> str | None:
    """Where a storage's weights are, for optuna-dashboard (one artifact store for all its studies): what a study
    recorded (``--artifacts``), else beside the storage."""
    recorded = (s.system_attrs.get(_LOCATION) for s in storage.get_all_studies())
    return next((location for location in recorded if location), None) or default_location(storage_url)


def record_location(study: optuna.Study, location: str) -> None:
    study._storage.set_study_system_attr(study._study_id, _LOCATION, location)


def _ranked(study: optuna.Study, extra: tuple[int, list[float]] | None = None) -> list[tuple[int, list[float]]]:
    done = [(t.number, list(t.values)) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if extra is not None:
        done.append(extra)
    return done


def _kept_numbers(study: optuna.Study, keep: str | int, candidates: list[tuple[int, list[float]]]) -> set[int]:
    if keep == "all":
        return {n for n, _ in candidates}
    directions = [d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions]

    def score(values: list[float]) -> list[float]:
        return [v if up else -v for v, up in zip(values, directions)]

    if keep == "best" and len(directions) > 1:
        scored = [(n, score(v)) for n, v in candidates]
        return {n for n, s in scored
                if not any(all(o >= x for o, x in zip(other, s)) and other != s for _, other in scored)}
    k = 1 if keep == "best" else int(keep)
    # ties: the earlier trial wins, as Optuna's best_trial does
    ordered = sorted(candidates, key=lambda item: ([-x for x in score(item[1])][:1], item[0]))
    return {n for n, _ in ordered[:k]}


def keep_trial_weights(study: optuna.Study, trial: optuna.Trial, checkpoint: dict[str, Any], *, values: list[float],
                       keep: str | int, store: ArtifactStore, location: str | None = None) -> str | None:
    """Upload this (still running) trial's checkpoint if it is among the kept ones (to `store`, at `location`,
    which the trial records: the workers of a study on a server may each have been given their own).

    The files it displaces are removed by :func:`remove_displaced_weights` only once it is COMPLETE: removed before,
    a crash between the two left the finished trials' best without its weights while this one, never completed,
    was failed and trained again (`dpnas best --weights` then failed, and the released model was gone for good).
    Call under the study's trial-slot lock, so two workers do not decide at once.
    """
    kept = _kept_numbers(study, keep, _ranked(study, (trial.number, values)))
    artifact_id = None
    if trial.number in kept:
        with tempfile.TemporaryDirectory(prefix="dpnas-weights-") as folder:
            path = save_checkpoint(checkpoint, Path(folder) / WEIGHTS_FILE)
            artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
        trial.set_user_attr(_ARTIFACT, artifact_id)
        if location is not None:
            trial.set_user_attr(_WHERE, location)
    return artifact_id


def remove_displaced_weights(study: optuna.Study, *, keep: str | int, store: ArtifactStore,
                             location: str | None = None) -> None:
    """Remove the files of the COMPLETE trials that are no longer among the kept ones (after a trial completed).

    Call under the study's trial-slot lock. A crash before it only leaves files behind, which the next call removes.
    `store` is at `location` (None: beside the storage); a file another worker kept elsewhere is removed there, or,
    where that folder is not reachable from here (another host's), left for a worker that reaches it.
    """
    _remove_displaced(study, _kept_numbers(study, keep, _ranked(study)), store, location)


def _remove_displaced(study: optuna.Study, kept: set[int], store: ArtifactStore, location: str | None) -> None:
    removed = {k.removeprefix(_REMOVED) for k in study._storage.get_study_system_attrs(study._study_id)
               if k.startswith(_REMOVED)}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        artifact_id = t.user_attrs.get(_ARTIFACT)
        if artifact_id and t.number not in kept and artifact_id not in removed:
            where = t.user_attrs.get(_WHERE)
            if where is not None and where != location:
                if not (where.startswith("s3://") or Path(where).is_dir()):
                    continue  # marked removed, it would stay on that host's disk for good
                trial_store = open_store(where, create=False)
            else:
                trial_store = store
            try:
                trial_store.remove(artifact_id)
            except Exception:  # noqa: BLE001 - already gone is what we wanted
                pass
            study._storage.set_study_system_attr(study._study_id, _REMOVED + artifact_id, t.number)


def weights_available(study: optuna.Study, trial: FrozenTrial) -> bool:
    artifact_id = trial.user_attrs.get(_ARTIFACT)
    if not artifact_id:
        return False
    return (_REMOVED + artifact_id) not in study._storage.get_study_system_attrs(study._study_id)


def fetch_weights(study: optuna.Study, trial: FrozenTrial, store: ArtifactStore, out: Path,
                  location: str | None = None) -> Path:
    if not weights_available(study, trial):
        raise ConfigError(f"trial {trial.number} of study {study.study_name!r} has no stored weights "
                          "(keep_weights in [study] says which trials keep theirs)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        download_artifact(artifact_store=store, file_path=str(partial), artifact_id=trial.user_attrs[_ARTIFACT])
    except Exception as err:  # noqa: BLE001 - any store error is the same for the user
        where = f" from {location}" if location else ""
        worker = trial.user_attrs.get("worker")
        written = f" (written by worker {worker}; --artifacts DIR names its folder as seen from here)" if worker else ""
        raise ConfigError(f"cannot fetch the weights of trial {trial.number}{where}: {type(err).__name__}: "
                          f"{err}{written}") from None
    partial.replace(out)
    return out

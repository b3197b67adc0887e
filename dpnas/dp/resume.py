"""A private run's resume state: an interrupted `dpnas train` continues the same run instead of starting again.

A run stopped half-way (Ctrl-C, a cluster's SIGTERM, a killed job) has already spent its steps' privacy on its
records; training again from the start spends the budget twice on the same records. Resuming continues the one
run: every step before and after the stop is one step of the same DP-SGD chain, so the run's accounting (the
accountant's history, carried over) covers the model at its end and every state saved on the way.

What the state holds: the model, its EMA copy, the optimiser and schedule, the accountant's history, the run's
progress (steps, the epoch in progress, the released validation scores) and the privacy plan it was calibrated
to. What it never holds for a private run: the Poisson-sampling, gradient-noise and validation-noise generators,
whose seeds are secret (:func:`dpnas.dp.train.release_seeds`); a resumed run draws fresh secret seeds, so its
remaining batches and noise are independent of everything stored, as they were before the stop. A run with
``reproducible = true`` (its seeds are derived from the stored seed anyway) keeps its generators, so its
resumed run is the same run, bit for bit, as one never stopped.

One ``torch.save`` of a plain dict (tensors, numbers, strings, lists), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from dpnas.arch.space import ConfigError
from dpnas.data.datasets import DatasetSplits
from dpnas.dp.privacy import PrivacyPlan

FORMAT = "dpnas-resume"
FORMAT_VERSION = 1
# the plan's fields that fix what the accounting composes and where the epochs end: a resumed run keeps them
PLAN_FIELDS = ("noise_multiplier", "sample_rate", "steps", "val_noise", "val_releases", "epoch_steps", "periods")
# generators whose seeds are secret in a private, non-reproducible run: never stored for one
SECRET_GENERATORS = ("sampling", "noise", "val_noise")


class ResumeError(ConfigError):
    """A file is not a resume state this run can continue from."""


def plan_record(plan: PrivacyPlan) -> dict[str, float | int]:
    return {name: getattr(plan, name) for name in PLAN_FIELDS}


def check_plan(state: dict[str, Any], plan: PrivacyPlan) -> None:
    """Refuse a state whose run was calibrated to another plan: its accountant's history and the steps still to
    take would compose to a guarantee nobody planned (an edited file, another Opacus's calibration)."""
    recorded, now = state["plan"], plan_record(plan)
    changed = [f"{name} {recorded.get(name)!r} -> {now[name]!r}" for name in PLAN_FIELDS
               if recorded.get(name) != now[name]]
    if changed:
        raise ResumeError("the resume state's run was planned with other privacy parameters than this one "
                          f"({'; '.join(changed)}): it cannot be continued as the same run")


def data_fingerprint(data: DatasetSplits) -> str:
    """A digest of every split's images and labels: a resumed run must take its steps on the records its first part
    took them on (a changed dataset folder would make it a run on other records, whose accounting is not this)."""
    digest = hashlib.blake2b(digest_size=16)
    for split in (data.train, data.val, data.test):
        for tensor in (split.images, split.labels):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
            digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def generator_states(generators: dict[str, torch.Generator], *, secret: bool) -> dict[str, torch.Tensor]:
    """The generators' states that may be stored: without the secret ones when the run's seeds are secret."""
    return {name: g.get_state() for name, g in generators.items() if not (secret and name in SECRET_GENERATORS)}


def check_generators(state: dict[str, Any], *, device_type: str, secret: bool) -> None:
    """Refuse, before the run is planned or touches the data, a state whose generators this run cannot continue.

    A reproducible run's state holds its sampling and noise generators (its seed regenerates them anyway): continued
    as a secret run, its batches and noise so far stay regenerable from the seed, and restored, so would the rest,
    while the result said they came from secret seeds (a model fit to release). A reproducible run's generators
    must continue or the run would not be the same run: on another device type that is refused."""
    stored, stored_on = state["generators"], state["device_type"]
    if secret and any(name in stored for name in SECRET_GENERATORS):
        raise ResumeError("the resume state is of a reproducible run (its batches and noise regenerable from its "
                          "seed): it cannot be continued as a run with secret seeds")
    if stored_on != device_type and not secret and any(name in stored for name in SECRET_GENERATORS):
        raise ResumeError(f"this run started on {stored_on} and continues its batches (and noise) from the "
                          f"generators it kept there: resume it on a {stored_on} device (--device)")


def restore_generators(generators: dict[str, torch.Generator], stored: dict[str, torch.Tensor], *,
                       stored_on: str, device_type: str, secret: bool) -> None:
    """Continue the stored generators where they stopped (a generator's state is its device type's own format);
    the secret ones stay freshly seeded (:func:`check_generators` has refused a state that holds them)."""
    if stored_on != device_type:
        return  # augmentation alone: it is not the mechanism, its fresh seed is fine
    for name, state in stored.items():
        if name in generators and not (secret and name in SECRET_GENERATORS):
            generators[name].set_state(state)


def resume_path(out: Path) -> Path:
    """Where a run that writes its result to `out` keeps its resume state."""
    return out.with_name(out.stem + ".resume.pt")


def save_atomically(obj: Any, path: str | Path) -> Path:
    """`torch.save` through a scratch file: a stop while writing leaves the previous file, never half a file (a
    resume state, a checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(obj, partial)
        partial.replace(path)
    finally:  # a stop or a full disk while writing leaves no scratch file behind
        partial.unlink(missing_ok=True)
    return path


def stamped(state: dict[str, Any]) -> dict[str, Any]:
    """A state as it is written: marked as a dpnas resume state of this format version."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **state}


def save_state(state: dict[str, Any], path: str | Path) -> Path:
    return save_atomically(stamped(state), path)


class FileKeeper:
    """`train`'s ``keep_state`` for a run kept in a file: each state written with `run` (what identifies the run)
    added. A write that fails (a full disk, a folder gone) does not stop the run, which only loses its
    resumability: the first failure of a series is said on stderr, and the older state is removed."""

    def __init__(self, path: Path, run: dict[str, Any]):
        self.path, self.run = path, run
        self.failed: list[OSError] = []  # the writes that failed since the last one that did not

    @property
    def current(self) -> bool:
        """Whether the file holds the run's last state (its last write did not fail)."""
        return not self.failed

    def __call__(self, state: dict[str, Any]) -> None:
        try:
            save_state({**state, **self.run}, self.path)
            self.failed.clear()
        except OSError as err:
            if not self.failed:
                print(f"warning: cannot write the resume state {self.path}: {err}", file=sys.stderr)
            self.failed.append(err)
            # The file left is older than the scores this run goes on to show and write: continued, it would train
            # those epochs again and release their scores a second time, from another branch of the run.
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass


def _finished_run(path: Path) -> str | None:
    """What a missing OUT.resume.pt means when the run's result OUT.json is there and finished: continued to its end
    (a second `--resume` of the printed command), since a run removes its state when it finishes."""
    if not path.name.endswith(".resume.pt"):
        return None
    result = path.with_name(path.name[: -len(".resume.pt")] + ".json")
    try:
        finished = json.loads(result.read_text(encoding="utf-8")).get("interrupted") is False
    except (OSError, ValueError, AttributeError):
        return None
    return f"the run finished and removed it: its result is {result}; nothing is left to continue" if finished else None


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"{path}: no such resume state (" + (_finished_run(path) or
                          "an interrupted `dpnas train` names its own") + ")")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # not torch's file (a result JSON, a study's journal) or a pickle of other objects: torch's own message
        # suggests weights_only=False, which would run the file's code and could not make it a resume state
        beside = resume_path(path)
        hint = f"; the run's resume state is {beside}" if path.suffix == ".json" and beside.is_file() else ""
        raise ResumeError(f"{path}: not a readable dpnas resume state{hint}") from err
    except Exception as err:  # torch's reader of a damaged file raises many kinds (KeyError too)
        raise ResumeError(f"{path}: not a readable dpnas resume state ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'damaged'})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path}: not a dpnas resume state")
    if state.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{path}: resume state version {state.get('format_version')!r}; this dpnas reads "
                          f"version {FORMAT_VERSION}")
    missing = [key for key in ("plan", "progress", "model", "optimizer", "accountant", "generators", "device_type")
               if key not in state]
    if missing:
        raise ResumeError(f"{path}: a damaged resume state (no {', '.join(missing)})")
    return state


def progress_record(*, epoch: int, epoch_steps: int, epoch_loss: float, epoch_samples: int, steps: int,
                    samples: int, train_seconds: float, history: list[dict[str, Any]],
                    resumed_at: list[int]) -> dict[str, Any]:
    return {"epoch": epoch, "epoch_steps": epoch_steps, "epoch_loss": float(epoch_loss),
            "epoch_samples": int(epoch_samples), "steps": steps, "samples": samples,
            "train_seconds": float(train_seconds), "resumed_at": list(resumed_at),
            "history": [dict(record) for record in history]}

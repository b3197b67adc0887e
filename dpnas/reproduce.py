"""Reproduce the papers' architectures with their recipes, and compare with the published numbers.

Three reproductions (REFERENCE §1, §2, §3, §5, §6):

* ``smoothnet``: SmoothNet W80D50 with the ``smoothnet`` recipe at ε = 7, δ = 1e-5 on CIFAR-10
  (published 73.5 %) or ImageNette (published 69.2 %);
* ``resnet9-scalenorm``: ResNet-9 with the ``resnet9-scalenorm`` recipe at ε = 8 on CIFAR-10, once with
  ScaleNorm (published 82.5 %) and once without (no published accuracy for it is recorded: "n/a");
* ``de-wrn``: De et al.'s recipe at ε = 8 on CIFAR-10 with WRN-16-4.  The published 81.4 % is De et al.'s
  WRN-40-4, a deeper network; the table says so.

``run_reproduction`` trains every run of a reproduction, writes each full result as JSON and returns one
row per run; ``format_comparison`` prints the rows against the published numbers.

Quick mode (``quick=True``) is a pipeline check that finishes in minutes on a 2-core CPU and is labelled
``QUICK RUN - not comparable to the paper`` everywhere:

* data: the requested dataset if a copy is already in ``data_dir`` (quick mode never downloads), else the
  bundled ``digits`` as a stand-in (announced on stderr and in every row: ``digits (stand-in for
  cifar10)``); then a stratified subset of at most 512 training, 256 validation and 512 test images;
* architecture: the named one scaled down by each run's ``quick_changes``: SmoothNet W10D10 instead of
  W80D50 (width 1, depth 1), ResNet-9 at an eighth of the channels and GroupNorm groups (width 2, stem 8,
  groups 4), WRN-10-0.5 instead of WRN-16-4 (width 1, one block per stage, stem 8, groups 4); the table
  shows the parameter count of the full architecture (the paper comparison) and of the network trained;
* recipe: the same optimiser, learning rate, schedule, clip norm, ε and δ, but at most 2 epochs, logical
  batch ``min(recipe batch, train size // 4)`` (at least 4 steps per epoch; Poisson sampling needs a
  sample rate below 1), and for ``de-wrn`` augmentation multiplicity 2 and EMA decay 0.9 (16 copies and a
  0.9999 average over 8 steps would only measure the initial weights).

Without quick mode the full architecture is trained with the full recipe on the full dataset; a missing
dataset raises :class:`DatasetUnavailableError` saying how to get it and where to put it.

A stopped reproduction (Ctrl-C, SIGTERM, a killed job) continues when the same call runs again: the runs it
finished are taken from their results (``out_dir/reproduce-NAME-DATASET[-quick].progress.json`` lists them), and
the run it stopped resumes from its state (``...-MODEL.resume.pt``, :mod:`dpnas.dp.resume`) as the same run.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dpnas.arch.models import build_model, count_parameters
from dpnas.arch.registry import MODELS
from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.data.datasets import (
    DEFAULT_DATA_DIR,
    DataError,
    DatasetSplits,
    ImageData,
    hash_split,
    load_dataset,
    stratified_split,
)
from dpnas.dp.config import TrainConfig
from dpnas.dp.recipes import RECIPES, Recipe
from dpnas.dp.resume import FileKeeper, ResumeError, data_fingerprint, load_state
from dpnas.results import check_folder, default_result_path, json_safe, write_json

QUICK_LABEL = "QUICK RUN - not comparable to the paper"
QUICK_EPOCHS = 2
QUICK_TRAIN_SIZE = 512
QUICK_VAL_SIZE = 256
QUICK_TEST_SIZE = 512
STAND_IN_DATASET = "digits"


class DatasetUnavailableError(DataError):
    """The dataset a full reproduction needs is not there; the message says how to get it and where to put it."""


@dataclass(frozen=True)
class Published:
    """A published result: test accuracy in percent (None: not published), its budget and parameter count."""

    accuracy: float | None
    epsilon: float
    delta: float
    params: int | None
    source: str
    model: str
    """The network the number was measured on (differs from the trained one for de-wrn)."""
    note: str = ""


@dataclass(frozen=True)
class ReproRun:
    """One network trained in a reproduction."""

    label: str
    model: str
    """A name in :data:`dpnas.arch.registry.MODELS`."""
    published: dict[str, Published]
    """By dataset name."""
    quick_changes: dict[str, Any]
    """ArchConfig changes that scale the network down in quick mode."""
    quick_label: str


@dataclass(frozen=True)
class Reproduction:
    name: str
    title: str
    recipe: str
    """A name in :data:`dpnas.dp.recipes.RECIPES`."""
    datasets: tuple[str, ...]
    """The datasets with published numbers; the first is the default."""
    runs: tuple[ReproRun, ...]
    quick_train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig changes in quick mode, on top of the epochs and batch size every quick run shrinks."""
    notes: tuple[str, ...] = ()

    @property
    def recipe_obj(self) -> Recipe:
        return RECIPES[self.recipe]

    @property
    def default_dataset(self) -> str:
        return self.datasets[0]


_SMOOTHNET_SOURCE = "Remerscheid et al. 2022, SmoothNets (arXiv 2205.04095)"
_SCALENORM_SOURCE = "Klause et al. 2022, ScaleNorm (arXiv 2203.00324)"
_DE_SOURCE = "De et al. 2022, WRN-40-4 with augmentation multiplicity, EMA and weight standardisation"

REPRODUCTIONS: dict[str, Reproduction] = {
    r.name: r
    for r in (
        Reproduction(
            name="smoothnet",
            title="SmoothNet W80D50 with the SmoothNet recipe (SGD 2e-3, StepLR(5, 0.9), B=256, C=6.83, eps=7)",
            recipe="smoothnet",
            datasets=("cifar10", "imagenette"),
            runs=(
                ReproRun(
                    label="SmoothNet W80D50",
                    model="smoothnet",
                    published={
                        "cifar10": Published(73.5, 7.0, 1e-5, 3_391_853, _SMOOTHNET_SOURCE, "SmoothNet W80D50"),
                        "imagenette": Published(
                            69.2, 7.0, 1e-5, 3_391_853, _SMOOTHNET_SOURCE, "SmoothNet W80D50",
                            "ImageNette images at 160 px unless image_size says otherwise (no published input size "
                            "is recorded here); SmoothNet has 3,391,853 parameters at any input size",
                        ),
                    },
                    quick_changes={"width": 1.0, "depth": 1.0},
                    quick_label="SmoothNet W10D10",
                ),
            ),
            notes=(
                "SmoothNet: the recipe trains 90 epochs; the authors' runs used 90-180.",
            ),
        ),
        Reproduction(
            name="resnet9-scalenorm",
            title="ResNet-9 with and without ScaleNorm, ResNet-9 ScaleNorm recipe (NAdam 1e-3, plateau, B=1024, C=1.5, eps=8)",
            recipe="resnet9-scalenorm",
            datasets=("cifar10",),
            runs=(
                ReproRun(
                    label="ResNet-9 + ScaleNorm",
                    model="resnet9_scalenorm",
                    published={"cifar10": Published(82.5, 8.0, 1e-5, 2_448_714, _SCALENORM_SOURCE, "ResNet-9 + ScaleNorm")},
                    quick_changes={"width": 2.0, "stem_channels": 8, "groups": 4},
                    quick_label="ResNet-9 + ScaleNorm at 1/8 width",
                ),
                ReproRun(
                    label="ResNet-9 (no ScaleNorm)",
                    model="resnet9",
                    published={
                        "cifar10": Published(
                            None, 8.0, 1e-5, 2_447_946, _SCALENORM_SOURCE, "ResNet-9",
                            "no published accuracy for ResNet-9 without ScaleNorm is recorded here (n/a)",
                        )
                    },
                    quick_changes={"width": 2.0, "stem_channels": 8, "groups": 4},
                    quick_label="ResNet-9 at 1/8 width",
                ),
            ),
            notes=("ResNet-9: the recipe trains 25 epochs; the authors' runs used 25-90.",),
        ),
        Reproduction(
            name="de-wrn",
            title="De et al.'s recipe (SGD lr 4, cosine, B=4096, augmult 16, EMA 0.9999, C=1, eps=8) on WRN-16-4",
            recipe="de-wrn",
            datasets=("cifar10",),
            runs=(
                ReproRun(
                    label="WRN-16-4",
                    model="wrn16_4",
                    published={
                        "cifar10": Published(
                            81.4, 8.0, 1e-5, None, _DE_SOURCE, "WRN-40-4",
                            "the published 81.4 % is De et al.'s WRN-40-4, a deeper network than the WRN-16-4 "
                            "trained here (no published parameter count for it is recorded here)",
                        )
                    },
                    quick_changes={"width": 1.0, "depth": 1.0, "stem_channels": 8, "groups": 4},
                    quick_label="WRN-10-0.5",
                ),
            ),
            quick_train={"aug_multiplicity": 2, "ema_decay": 0.9},
        ),
    )
}


def get_reproduction(name: str) -> Reproduction:
    try:
        return REPRODUCTIONS[name]
    except KeyError:
        raise ConfigError(f"unknown reproduction {name!r}; expected one of: {', '.join(REPRODUCTIONS)}") from None


def format_reproductions() -> str:
    """One paragraph per reproduction: its name, datasets and the published numbers (for a --list)."""
    lines = []
    for repro in REPRODUCTIONS.values():
        lines.append(f"{repro.name}: {repro.title}")
        lines.append(f"  datasets: {', '.join(repro.datasets)} (default {repro.default_dataset})")
        for run in repro.runs:
            for dataset, pub in run.published.items():
                lines.append(f"  {run.label} on {dataset}: published {_fmt_acc(pub.accuracy)} at eps {pub.epsilon:g} "
                             f"({pub.model}; {pub.source})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def dataset_howto(dataset: str, data_dir: Path) -> str:
    """How to get `dataset` and where to put it so that ``load_dataset(dataset, data_dir=data_dir)`` finds it."""
    if dataset == "cifar10":
        return (
            "To get it: download the python version of CIFAR-10 (cifar-10-python.tar.gz) from the CIFAR-10 page at "
            f"cs.toronto.edu and extract it into {data_dir} (tar -xzf cifar-10-python.tar.gz -C {data_dir}) so that "
            f"{data_dir / 'cifar-10-batches-py'} holds data_batch_1 ... data_batch_5, test_batch and batches.meta; "
            "or run with network access and downloads enabled, and torchvision downloads it there. "
            "(--quick runs offline on the bundled digits stand-in instead; not comparable to the paper.)"
        )
    if dataset == "imagenette":
        return (
            "To get it: download imagenette2-160.tgz from fast.ai's imagenette release (on fast.ai's S3 storage) and "
            f"extract it into {data_dir} (tar -xzf imagenette2-160.tgz -C {data_dir}) so that "
            f"{data_dir / 'imagenette2-160'} holds train/<class>/*.JPEG and val/<class>/*.JPEG "
            "(the 320 px and full-size releases work too). "
            "(--quick runs offline on the bundled digits stand-in instead; not comparable to the paper.)"
        )
    return f"{dataset} is not one of the datasets a reproduction uses."


def _subset(split: ImageData, limit: int, *, seed: int) -> ImageData:
    if len(split) <= limit:
        return split
    _, keep = stratified_split(split.labels, limit / len(split), seed=seed)
    return split.subset(keep)


def _hashed_subset(split: ImageData, ids: torch.Tensor | None, limit: int, *, key: str):
    """About `limit` records of a private split, each kept by a hash of its own id: whether a record is in the
    quick run depends on no other record (a stratified draw of exactly `limit` would), as the privacy of the run
    it trains or scores needs. Returns (records, their ids)."""
    if ids is None or len(split) <= limit:
        return split, ids
    _, keep = hash_split(ids, limit / len(split), key=key)
    return split.subset(keep), ids[keep]


def shrink_splits(data: DatasetSplits, *, seed: int = 0, train: int = QUICK_TRAIN_SIZE, val: int = QUICK_VAL_SIZE,
                  test: int = QUICK_TEST_SIZE) -> DatasetSplits:
    """Quick mode's subsets: about `train` / `val` training and validation records, each kept by a hash of its
    own id, and a stratified, seeded subset of at most `test` test images (the test set steers nothing)."""
    train_split, train_ids = _hashed_subset(data.train, data.train_ids, train, key=f"quick-train:{seed}")
    val_split, val_ids = _hashed_subset(data.val, data.val_ids, val, key=f"quick-val:{seed}")
    return replace(data, train=train_split, train_ids=train_ids, val=val_split, val_ids=val_ids,
                   test=_subset(data.test, test, seed=seed + 2))


@dataclass(frozen=True)
class _Data:
    splits: DatasetSplits
    requested: str
    stand_in_reason: str | None

    @property
    def label(self) -> str:
        if self.stand_in_reason is None:
            return self.splits.name
        return f"{self.splits.name} (stand-in for {self.requested})"


def _load(repro: Reproduction, dataset: str, *, data_dir: Path, quick: bool, download: bool,
          image_size: int | None, progress: bool, given: bool = True) -> _Data:
    """`given`: the user named `data_dir`; else it is the default cache, which a download may create."""
    cfg = repro.recipe_obj.train
    kwargs = dict(data_dir=data_dir if given else None, val_fraction=cfg.val_fraction, seed=cfg.seed,
                  progress=progress)
    if not quick:
        try:
            splits = load_dataset(dataset, image_size=image_size, download=download, **kwargs)
        except DataError as err:
            raise DatasetUnavailableError(
                f"{dataset} is not available in {data_dir}: {err}. {dataset_howto(dataset, data_dir)}"
            ) from err
        return _Data(splits, dataset, None)
    try:  # quick mode never downloads: a copy already there, or the stand-in
        splits = load_dataset(dataset, image_size=image_size, download=False, **kwargs)
        reason = None
    except DataError as err:
        # the loader's advice to allow the download does not apply: quick mode never downloads
        found = str(err).split("; allow the download")[0]
        reason = f"{dataset} not found in {data_dir} ({found}; quick mode never downloads)"
        unused = f"; image_size {image_size} is not used on it" if image_size is not None else ""
        print(f"dpnas reproduce: {dataset} is not available in {data_dir}; QUICK RUN on the bundled "
              f"{STAND_IN_DATASET} data as a stand-in (not comparable to the paper{unused})", file=sys.stderr)
        splits = load_dataset(STAND_IN_DATASET, **kwargs)
    return _Data(shrink_splits(splits, seed=cfg.seed), dataset, reason)


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


def quick_arch(run: ReproRun) -> ArchConfig:
    """The scaled-down network quick mode trains in place of `run`'s named architecture."""
    return MODELS[run.model].arch.replace(**run.quick_changes)


def quick_train_config(repro: Reproduction, train_size: int) -> TrainConfig:
    """The recipe with quick mode's epochs, batch size and per-reproduction changes (see the module docstring)."""
    cfg = repro.recipe_obj.train
    batch = max(1, min(cfg.batch_size, train_size // 4))
    changes = {"epochs": min(cfg.epochs, QUICK_EPOCHS), "batch_size": batch,
               "physical_batch_size": min(cfg.physical_batch_size, batch), **repro.quick_train}
    return cfg.replace(**changes)


def full_params(model: str, *, num_classes: int = 10, in_channels: int = 3) -> int:
    """Parameters of the full named architecture for the paper's data (10 classes, RGB)."""
    return count_parameters(build_model(MODELS[model].arch, num_classes=num_classes, in_channels=in_channels))


def run_reproduction(
    name: str,
    *,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    quick: bool = False,
    device: str | None = None,
    out_dir: str | Path = Path("runs"),
    progress: bool = True,
    download: bool = True,
    image_size: int | None = None,
) -> list[dict[str, Any]]:
    """Train every run of reproduction `name` on `dataset` (default: its first) and return one row per run.

    Each run's full training result (plus a ``reproduction`` section with the row) is written as JSON
    into `out_dir`; the row's ``result_path`` names the file.  `download` lets torchvision fetch
    CIFAR-10 when it is missing (full runs only; quick mode never downloads).  A full run whose dataset
    is missing raises :class:`DatasetUnavailableError`; an unknown name or a dataset the reproduction
    has no published number for raises :class:`ConfigError`.  Ctrl-C stops after the current step: the
    interrupted run is reported (``interrupted: true``) and later runs are skipped.
    """
    from dpnas.dp.train import DivergedError, check_result_privacy, default_device, train

    repro = get_reproduction(name)
    dataset = repro.default_dataset if dataset is None else dataset.strip().lower()
    if dataset not in repro.datasets:
        raise ConfigError(
            f"reproduction {name!r} has published numbers for: {', '.join(repro.datasets)}; got dataset {dataset!r}"
        )
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size: must be a positive integer, got {image_size!r}")
    root = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser()
    out_dir = Path(out_dir)
    # before the data and the first run: a result that cannot be written after training loses the ε it spent
    check_folder(out_dir, what="--out-dir")
    recipe = repro.recipe_obj

    def log(message: str) -> None:
        if progress:
            print(f"dpnas reproduce {name}: {message}", file=sys.stderr)

    data = _load(repro, dataset, data_dir=root, quick=quick, download=download, image_size=image_size,
                 progress=progress, given=data_dir is not None)
    train_cfg = quick_train_config(repro, len(data.splits.train)) if quick else recipe.train
    privacy = recipe.privacy
    if not quick and (torch.device(device) if device else default_device()).type == "cpu":
        log(f"the full recipe ({train_cfg.epochs} epochs on {len(data.splits.train):,} images) takes days on a CPU; "
            "use a GPU, or quick mode for a pipeline check")

    # An interrupted reproduction continues where it stopped when the same command runs again: its finished runs
    # are taken from their results and its stopped run resumes as the same run. Training either afresh would
    # spend its budget on the same records a second time.
    stem = "-".join(part for part in ("reproduce", name, dataset, "quick" if quick else "") if part)
    ledger = StoppedReproduction(out_dir / f"{stem}.progress.json", fingerprint=data_fingerprint(data.splits))
    archs = {run.model: quick_arch(run) if quick else MODELS[run.model].arch for run in repro.runs}
    records = {model: ledger.record(arch, train_cfg, privacy) for model, arch in archs.items()}
    state_paths = {model: out_dir / f"{stem}-{model}.resume.pt" for model in archs}
    # every stopped run is checked before any run trains: one that cannot be continued is refused with nothing spent
    stopped = {model: ledger.stopped_state(state_paths[model], records[model]) for model in archs}
    rows: list[dict[str, Any]] = []
    for run in repro.runs:
        arch, record, state_path = archs[run.model], records[run.model], state_paths[run.model]
        resume = stopped[run.model]
        trained_label = f"{run.quick_label} (quick stand-in for {run.label})" if quick else run.label
        finished = ledger.finished_row(run.model, record)
        if finished is not None:
            state_path.unlink(missing_ok=True)  # left by a stop between the ledger's write and its removal
            log(f"{trained_label}: trained to its end before this reproduction stopped; its result is "
                f"{finished['result_path']}")
            rows.append(finished)
            continue
        log(f"training {trained_label} on {data.label}: {train_cfg.epochs} epochs, batch {train_cfg.batch_size}, "
            f"eps {privacy.epsilon:g}, delta {privacy.delta:g}" + (f" [{QUICK_LABEL}]" if quick else "")
            + (f"; resuming the stopped run at step {resume['progress']['steps']}" if resume else ""))
        error = None
        try:
            result = train(arch, data.splits, train_cfg=train_cfg, privacy=privacy, device=device, progress=progress,
                           resume=resume, keep_state=FileKeeper(state_path, {"run": record}))
            check_result_privacy(result)
        except DivergedError as err:
            error = str(err)
            result = {"config": arch.to_dict(), "train_config": train_cfg.to_dict(), "dataset": data.splits.name,
                      "diverged": error}
        row = _row(repro, run, data=data, quick=quick, result=result, error=error, train_cfg=train_cfg,
                   trained_label=trained_label)
        # a continued run replaces its stopped part's result: one file a run, not a stale "interrupted" beside it
        path = ledger.stopped_result(run.model) if resume else None
        path = path or default_result_path("reproduce", name, run.model, data.splits.name, "quick" if quick else "",
                                           runs_dir=out_dir)
        row["result_path"] = str(path)
        write_json(path, {**result, "recipe": recipe.name, "reproduction": row})
        log(f"result written to {path}")
        rows.append(row)
        if row["interrupted"]:
            ledger.stop(run.model, path)
            log(f"interrupted: the remaining runs are skipped; the same command continues this run from "
                f"{state_path} (the same run: its finished steps are not spent again)")
            return rows
        ledger.finish(run.model, record, path)
        state_path.unlink(missing_ok=True)
    ledger.path.unlink(missing_ok=True)  # the whole reproduction finished: the same command runs a new one
    return rows


class StoppedReproduction:
    """What an interrupted reproduction leaves for the same command to continue: a ledger of its finished runs
    (their results) and each stopped run's resume state (:mod:`dpnas.dp.resume`), both tied to the run's
    settings and the records it trained on."""

    def __init__(self, path: Path, *, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        try:
            ledger = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"finished": {}}
            self.finished = ledger["finished"]
            self.stopped = ledger.get("stopped", {})  # model -> the result its stopped part wrote
            if not isinstance(self.finished, dict) or not isinstance(self.stopped, dict):
                raise TypeError("finished")
        except (OSError, ValueError, KeyError, TypeError) as err:
            # refused, not read as empty: its finished runs would train again and spend their ε a second time
            raise ResumeError(f"{path}: a damaged progress file of a stopped reproduction ({type(err).__name__}): "
                              "restore it to keep its finished runs, or remove it to train them afresh (their "
                              "epsilon is spent already)") from None

    def record(self, arch: ArchConfig, train_cfg: TrainConfig, privacy) -> dict[str, Any]:
        return {"arch": arch.to_dict(), "train_config": train_cfg.to_dict(), "privacy_config": privacy.to_dict(),
                "data_fingerprint": self.fingerprint}

    def finished_row(self, model: str, record: dict[str, Any]) -> dict[str, Any] | None:
        entry = self.finished.get(model)
        if not entry or json_safe(entry.get("record")) != json_safe(record):
            return None
        try:
            # in the progress file's folder, where the run wrote it: the recorded path is relative to the cwd of
            # the run that wrote it, and the same --out-dir may be named from another folder
            path = self._beside(entry["result_path"])
            row = json.loads(path.read_text(encoding="utf-8"))["reproduction"]
            return {**row, "result_path": str(path)}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def stopped_state(self, state_path: Path, record: dict[str, Any]) -> dict[str, Any] | None:
        if not state_path.exists():
            return None
        state = load_state(state_path)
        if json_safe(state.get("run")) != json_safe(record):
            raise ResumeError(f"{state_path} holds a stopped run of this reproduction with other settings or data: "
                              "run it with the flags it started with to continue it, or remove the file to train "
                              "afresh (the stopped run's epsilon is spent already)")
        return state

    def stopped_result(self, model: str) -> Path | None:
        """Where the stopped part of `model`'s run wrote its result (in the ledger's folder, as for a finished run)."""
        name = self.stopped.get(model)
        return self._beside(name) if isinstance(name, str) and name else None

    def _beside(self, recorded: str) -> Path:
        return self.path.parent / Path(recorded).name

    def stop(self, model: str, result_path: Path) -> None:
        self.stopped[model] = str(result_path)
        self._write()

    def finish(self, model: str, record: dict[str, Any], result_path: Path) -> None:
        self.finished[model] = {"record": json_safe(record), "result_path": str(result_path)}
        self.stopped.pop(model, None)
        self._write()

    def _write(self) -> None:
        write_json(self.path, {"finished": self.finished, "stopped": self.stopped})


def _row(repro: Reproduction, run: ReproRun, *, data: _Data, quick: bool, result: dict[str, Any],
         error: str | None, train_cfg: TrainConfig, trained_label: str) -> dict[str, Any]:
    pub = run.published[data.requested]
    accuracy = result.get("test_accuracy")
    interrupted = bool(result.get("interrupted", False))
    status = "diverged" if error else "interrupted" if interrupted else "finished"
    notes = [n for n in (pub.note,) if n]
    if data.stand_in_reason:
        notes.append(f"{STAND_IN_DATASET} stand-in: {data.stand_in_reason}")
    if quick:
        changes = ", ".join(f"{k}={v}" for k, v in run.quick_changes.items())
        notes.append(f"{QUICK_LABEL}: trained {trained_label} ({changes}), about {QUICK_TRAIN_SIZE} training "
                     f"images, {train_cfg.epochs} epochs, batch {train_cfg.batch_size}")
    if error:
        notes.append(f"diverged: {error}")
    return {
        "reproduction": repro.name,
        "run": run.label,
        "model": run.model,
        "trained": trained_label,
        "quick": quick,
        "label": QUICK_LABEL if quick else "",
        "comparable": not quick and data.stand_in_reason is None and status == "finished",
        "status": status,
        "interrupted": interrupted,
        "dataset": data.label,
        "dataset_used": data.splits.name,
        "dataset_requested": data.requested,
        "stand_in": data.stand_in_reason is not None,
        "train_size": len(data.splits.train),
        "accuracy_percent": None if accuracy is None or not math.isfinite(accuracy) else 100 * accuracy,
        "val_accuracy_percent": _percent(result.get("val_accuracy")),
        "published_accuracy_percent": pub.accuracy,
        "published_model": pub.model,
        "published_source": pub.source,
        "epsilon_spent": result.get("epsilon_spent"),
        "epsilon": repro.recipe_obj.privacy.epsilon,
        "published_epsilon": pub.epsilon,
        "delta": repro.recipe_obj.privacy.delta,
        "published_delta": pub.delta,
        "params_trained": result.get("params"),
        "params_full": full_params(run.model),
        "params_paper": pub.params,
        "epochs": len(result.get("history", [])),
        "epochs_planned": train_cfg.epochs,
        "epochs_recipe": repro.recipe_obj.train.epochs,
        "wall_seconds": result.get("wall_seconds"),
        "notes": notes,
        "reproduction_notes": list(repro.notes),
    }


def _percent(value: Any) -> float | None:
    return None if value is None or not math.isfinite(value) else 100 * value


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------


def _fmt_acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} %"


def _fmt_int(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of `rows` (from :func:`run_reproduction`) against the published numbers."""
    if not rows:
        return "no runs"
    out: list[str] = []
    for name in dict.fromkeys(r["reproduction"] for r in rows):
        group = [r for r in rows if r["reproduction"] == name]
        repro = REPRODUCTIONS.get(name)
        out.append(f"reproduction {name}" + (f": {repro.title}" if repro else ""))
        if any(r["quick"] for r in group):
            banner = f"*** {QUICK_LABEL} ***"
            out += [banner, "    (scaled-down networks, a few hundred images, 2 epochs: a pipeline check only)"]
        header = ["run", "trained", "dataset", "test acc (this run)", "published", "eps spent / eps", "delta",
                  "params trained", "params full", "params paper", "epochs (run/recipe)", "status"]
        table = [header]
        for r in group:
            published = _fmt_acc(r["published_accuracy_percent"])
            if r["published_model"] != r["run"]:
                published += f" ({r['published_model']})"
            eps = "n/a" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3f}"
            table.append([
                r["run"],
                r["trained"] if r["trained"] != r["run"] else "same",
                r["dataset"],
                _fmt_acc(r["accuracy_percent"]),
                published,
                f"{eps} / {r['epsilon']:g}",
                f"{r['delta']:g}",
                _fmt_int(r["params_trained"]),
                _fmt_int(r["params_full"]),
                _fmt_int(r["params_paper"]),
                f"{r['epochs']}/{r['epochs_recipe']}",
                r["status"] + (" QUICK" if r["quick"] else ""),
            ])
        widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
        for i, line in enumerate(table):
            out.append("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        notes = list(dict.fromkeys(n for r in group for n in [*r["notes"], *r.get("reproduction_notes", [])]))
        if notes:
            out.append("notes:")
            out += [f"- {n}" for n in notes]
        paths = [r.get("result_path") for r in group if r.get("result_path")]
        if paths:
            out.append("results: " + ", ".join(paths))
        out.append("")
    return "\n".join(out).rstrip() + "\n"

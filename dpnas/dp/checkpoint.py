"""dpnas checkpoints: a trained model's weights with everything needed to build, score and describe it.

One ``torch.save`` of a plain dict (tensors, numbers, strings, lists), so loading uses
``torch.load(..., weights_only=True)`` and never unpickles code. A file that is not a dpnas checkpoint is
refused with one clear error.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpnas.arch.models import build_model, count_parameters
from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.data.datasets import DATASET_CHANNELS, DataError, DatasetSplits, dataset_key, load_dataset
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.recipe_file import DataSettings
from dpnas.dp.resume import save_atomically
from dpnas.dp.train import check_device, evaluate  # the training loop's own evaluation, so the numbers agree

FORMAT = "dpnas-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ConfigError):
    """A file is not a readable dpnas checkpoint."""


def checkpoint_dict(model: nn.Module, *, arch: ArchConfig, train_cfg: TrainConfig, privacy: PrivacyConfig,
                    data: DatasetSplits, data_settings: DataSettings, results: dict[str, Any],
                    provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return float(value) if isinstance(value, float) else value

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": arch.to_dict(),
        "train_config": train_cfg.to_dict(),
        "privacy_config": privacy.to_dict(),
        "data": data_settings.to_dict(),
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "results": {k: plain(v) for k, v in results.items()},
        "provenance": dict(provenance or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    return save_atomically(checkpoint, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except (OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as err:
        # torch's own message suggests weights_only=False, which would run whatever code the file holds
        raise CheckpointError(f"{path}: not a dpnas checkpoint (torch.load(weights_only=True) cannot read it as "
                              f"tensors and plain data: {type(err).__name__})") from None
    damaged = _damaged_entry(path)
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged ({damaged} does not match its checksum); fetch or train it again")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dpnas checkpoint (no '{FORMAT}' marker); "
                              "weights come from `dpnas best --weights FILE`")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: dpnas checkpoint format {checkpoint.get('format_version')!r}; this dpnas "
                              f"reads format {FORMAT_VERSION}")
    problem = _malformed(checkpoint)
    if problem is not None:  # an edited file: one line, not a KeyError or TypeError from deep in the model
        raise CheckpointError(f"{path}: not a whole dpnas checkpoint ({problem}); fetch or train it again")
    return checkpoint


# what `checkpoint_dict` writes, and what building, scoring and describing a model reads (the last three: where present)
_ENTRIES = {"config": dict, "data": dict, "num_classes": int, "in_channels": int, "image_size": int, "results": dict,
            "state_dict": dict, "train_config": dict, "privacy_config": dict, "provenance": dict}
_OPTIONAL = ("train_config", "privacy_config", "provenance")


def _malformed(checkpoint: dict[str, Any]) -> str | None:
    for key, kind in _ENTRIES.items():
        if key not in checkpoint:
            if key in _OPTIONAL:
                continue
            return f"no {key!r}"
        value = checkpoint[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"{key!r} is {type(value).__name__}, expected {kind.__name__}"
    if not all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values()):
        return "'state_dict' holds something other than tensors"
    unknown = sorted(set(checkpoint["data"]) - set(DataSettings.__dataclass_fields__))
    if unknown:
        return f"'data' has unknown key(s) {', '.join(map(str, unknown))}"
    return None


def _damaged_entry(path: Path) -> str | None:
    """The first entry of a torch zip file whose bytes fail their CRC-32 (torch.load does not check them: flipped
    bytes inside a tensor load as other weights)."""
    if not zipfile.is_zipfile(path):  # torch's legacy format: no checksums to check
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        return f"the archive ({type(err).__name__})"


def model_from_checkpoint(checkpoint: dict[str, Any], *, source: str = "checkpoint") -> nn.Module:
    arch = ArchConfig.from_dict(checkpoint["config"], source=source)
    model = build_model(arch, num_classes=checkpoint["num_classes"], in_channels=checkpoint["in_channels"],
                        image_size=checkpoint["image_size"])
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: the weights do not fit the recorded architecture: "
                              f"{str(err).splitlines()[0]}") from None
    return model


def evaluate_checkpoint(path: str | Path, *, dataset: str | None = None, data_dir: str | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """Score a checkpoint on the test split of its dataset (split as it was during training)."""
    device = check_device(device)  # before the data is loaded
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, source=str(path))
    settings = DataSettings(**checkpoint["data"])
    name = dataset or settings.dataset
    if data_dir and dataset_key(name) in ("digits", "synthetic"):  # as `dpnas train` refuses it: never ignored
        raise DataError(f"--data-dir: {name} needs no files (bundled with scikit-learn, or generated); --data-dir "
                        "is for cifar10 and imagenette")
    channels = DATASET_CHANNELS.get(dataset_key(name))
    if channels is not None and channels != checkpoint["in_channels"]:  # refused before the data is loaded
        raise CheckpointError(f"{path}: the model takes {checkpoint['in_channels']}-channel images, but {name} has "
                              f"{channels} channels")
    data = load_dataset(name, data_dir=data_dir or settings.data_dir, val_fraction=settings.val_fraction,
                        seed=settings.split_seed, image_size=checkpoint["image_size"],
                        synthetic_size=settings.synthetic_size, progress=False)
    if (data.num_classes, data.in_channels) != (checkpoint["num_classes"], checkpoint["in_channels"]):
        raise CheckpointError(f"{path}: the model takes {checkpoint['in_channels']}-channel images in "
                              f"{checkpoint['num_classes']} classes, but {name} has {data.in_channels} channels and "
                              f"{data.num_classes} classes")
    data = data.to(device)
    model.to(device)
    accuracy, loss = evaluate(model, data.test, data, batch_size=256)
    return {
        "test_accuracy": accuracy,
        "test_loss": loss,
        "test_size": len(data.test),
        "dataset": name,
        "params": count_parameters(model),
        "config": checkpoint["config"],
        "epsilon_spent": checkpoint["results"].get("epsilon_spent", math.nan),
        "recorded_test_accuracy": checkpoint["results"].get("test_accuracy", math.nan),
        # batches and noise seeded from the recorded seed: whoever has it can regenerate them (not releasable)
        "reproducible": bool((checkpoint.get("privacy_config") or {}).get("reproducible"))
        and math.isfinite((checkpoint.get("privacy_config") or {}).get("epsilon", math.inf)),
        "provenance": checkpoint.get("provenance", {}),
    }

"""Recipe files: everything needed to train one architecture again, in one TOML file.

    # provenance comments (study, trial, objective values, epsilon spent, dpnas version)
    # (a proxy trial's run, `dpnas best` of a [fidelity] study: proxy_epsilon_spent, not this file's)
    [arch]        every ArchConfig field
    [train]       every TrainConfig field
    [privacy]     every PrivacyConfig field
    [data]        dataset, val_fraction, split_seed, image_size, synthetic_size, data_dir
    [provenance]  the same facts as the header, machine-readable (ignored when training)

``dpnas best`` writes one per best trial; ``dpnas train RECIPE`` and ``dpnas describe RECIPE`` read it. A file
with only ArchConfig fields (or only ``[arch]``) is an architecture alone, as before: the named recipe fills in
the rest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpnas.arch.space import ArchConfig, ConfigError, read_config_document
from dpnas.data.datasets import DATASETS, DEFAULT_SYNTHETIC_SIZE
from dpnas.dp.config import PrivacyConfig, TrainConfig, check_seed
from dpnas.dp.privacy import validation_epsilon

DATA_KEYS = {"dataset": str, "val_fraction": (int, float), "split_seed": int, "image_size": int,
             "synthetic_size": int, "data_dir": str}
SECTIONS = ("arch", "train", "privacy", "data", "provenance")


@dataclass(frozen=True)
class DataSettings:
    """How the data of a run was loaded and split (so that a retrain sees the same validation and test split)."""

    dataset: str = "digits"
    val_fraction: float = 0.2
    split_seed: int = 0
    image_size: int | None = None
    synthetic_size: int = DEFAULT_SYNTHETIC_SIZE
    data_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def retrain_data_settings(recorded: DataSettings | None, *, dataset: str | None, train_seed: int, val_fraction: float,
                          keep_split_seed: bool, keep_val_fraction: bool, image_size: int | None,
                          data_dir: str | None) -> DataSettings:
    """The data a new run of a recipe sees: the recorded split on the recorded dataset, unless told otherwise.

    Keeping the study's split (its seed and validation fraction) scores the retrained model on the same
    validation and test records as the trial was. Without a recorded split (or on another dataset), the run's
    own seed and validation fraction split the data, as for any `dpnas train`.
    """
    name = dataset or (recorded.dataset if recorded else "digits")
    same = recorded is not None and name == recorded.dataset
    return DataSettings(
        dataset=name,
        val_fraction=recorded.val_fraction if same and keep_val_fraction else val_fraction,
        split_seed=recorded.split_seed if same and keep_split_seed else train_seed,
        image_size=image_size or (recorded.image_size if same else None),
        synthetic_size=recorded.synthetic_size if same else DEFAULT_SYNTHETIC_SIZE,
        data_dir=data_dir or (recorded.data_dir if same else None),
    )


@dataclass(frozen=True)
class RecipeFile:
    arch: ArchConfig
    train: TrainConfig | None = None
    privacy: PrivacyConfig | None = None
    data: DataSettings | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.train is not None and self.privacy is not None


def check_recipe_budget(recipe: PrivacyConfig, privacy: PrivacyConfig, changes: dict[str, Any], *, epochs: int,
                        recipe_epochs: int) -> None:
    """Refuse, before any data is touched, a run whose fixed noise would not give the budget it asks for.

    A recipe exported from a total-ε study fixes the noise its study derived (`noise_multiplier`, `val_noise`):
    a new epsilon or delta would leave that noise in place, and a `val_noise` derived for the recipe's number of
    validation releases (one per epoch), spread over more epochs, can cost the validation records more than the
    run's epsilon.
    """
    if not privacy.private:
        return
    budget_changed = any(k in changes and changes[k] != getattr(recipe, k) for k in ("epsilon", "delta"))
    if recipe.noise_multiplier > 0 and "noise_multiplier" not in changes and budget_changed:
        raise ConfigError(f"the recipe fixes noise_multiplier = {recipe.noise_multiplier:g} (the noise its study "
                          f"derived), which a new epsilon or delta does not change; add --set noise_multiplier=0 "
                          f"--set val_noise=auto to derive the noise for epsilon = {privacy.epsilon:g}")
    # a new epsilon or delta leaves the recipe's val_noise (derived for the recipe's budget) in place, as it does the
    # noise multiplier: the validation records' cost must then meet the new budget
    kept_noise = budget_changed and "val_noise" not in changes
    if privacy.val_noise != "auto" and float(privacy.val_noise) > 0 and (epochs > recipe_epochs or kept_noise):
        noise = float(privacy.val_noise)
        cost, recorded = validation_epsilon(noise, epochs, privacy.delta), validation_epsilon(noise, recipe_epochs,
                                                                                                privacy.delta)
        if cost > (privacy.epsilon if kept_noise else max(privacy.epsilon, recorded)) * (1 + 1e-9):
            raise ConfigError(f"val_noise: {noise:g} on the correct count over {epochs} validation releases (one "
                              f"per epoch; the recipe's {recipe_epochs} cost {recorded:.4g}) costs the validation "
                              f"records epsilon {cost:.4g} > epsilon = {privacy.epsilon:g}; --set val_noise=auto "
                              "derives it for the budget")


def toml_value(value: Any) -> str:
    """One TOML value for a config field (bool, number, string, or a list of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _table(name: str, values: dict[str, Any]) -> list[str]:
    return [f"[{name}]"] + [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None] + [""]


def recipe_to_toml(recipe: RecipeFile, *, header: str = "") -> str:
    lines = [f"# {line}" for line in header.splitlines()]
    if lines:
        lines.append("")
    lines += _table("arch", recipe.arch.to_dict())
    if recipe.train is not None:
        lines += _table("train", recipe.train.to_dict())
    if recipe.privacy is not None:
        lines += _table("privacy", recipe.privacy.to_dict())
    if recipe.data is not None:
        lines += _table("data", recipe.data.to_dict())
    if recipe.provenance:
        lines += _table("provenance", recipe.provenance)
    return "\n".join(lines).rstrip() + "\n"


def write_recipe(recipe: RecipeFile, path: Path, *, header: str = "") -> Path:
    """Write a .toml (or .json) recipe atomically."""
    path = Path(path)
    if path.suffix == ".toml":
        text = recipe_to_toml(recipe, header=header)
    elif path.suffix == ".json":
        document = {"note": header, "arch": recipe.arch.to_dict()}
        for name in ("train", "privacy", "data"):
            part = getattr(recipe, name)
            if part is not None:
                document[name] = part.to_dict()
        if recipe.provenance:
            document["provenance"] = recipe.provenance
        text = json.dumps(document, indent=2, default=str) + "\n"
    else:
        raise ConfigError(f"--out {path}: expected a .toml or .json file")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def _section(path: Path, name: str, cls: Any, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    try:
        return cls.from_dict(table, source=f"{path} [{name}]")
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(path)) else f"{path} [{name}]: {message}") from None


def _data_settings(path: Path, table: Any) -> DataSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [data] must be a table")
    for key, value in table.items():
        if key not in DATA_KEYS:
            raise ConfigError(f"{path}: data.{key}: unknown key; allowed: {', '.join(DATA_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, DATA_KEYS[key]):
            raise ConfigError(f"{path}: data.{key}: unexpected value {value!r}")
    dataset = table.get("dataset", "digits")
    if dataset not in DATASETS:
        raise ConfigError(f"{path}: data.dataset: unknown dataset {table['dataset']!r}; expected one of: "
                          f"{', '.join(DATASETS)}")
    data_dir = table.get("data_dir")
    if data_dir is not None and not data_dir.strip():  # Path("") is the current directory: CIFAR-10 would go there
        raise ConfigError(f"{path}: data.data_dir: must not be empty; leave it out for the default cache")
    if data_dir is not None and dataset in ("digits", "synthetic"):  # as --data-dir: it would be silently unused
        raise ConfigError(f"{path}: data.data_dir: {dataset} needs no files (bundled with scikit-learn, or "
                          "generated); data_dir is for cifar10 and imagenette: remove it")
    try:
        check_seed("split_seed", table.get("split_seed", 0))
    except ConfigError as err:
        raise ConfigError(f"{path}: data.{err}") from None
    # Checked here, naming the file and the key: otherwise TrainConfig or the data loader refuses them later
    # as a bare "val_fraction: ..." that reads like the --val-fraction flag.
    val_fraction = table.get("val_fraction", 0.2)
    if not 0 <= val_fraction < 1:  # NaN fails the comparison too
        raise ConfigError(f"{path}: data.val_fraction: must be in [0, 1), got {val_fraction}")
    for key, minimum in (("image_size", 1), ("synthetic_size", 2)):
        if key in table and table[key] < minimum:
            raise ConfigError(f"{path}: data.{key}: must be >= {minimum}, got {table[key]}")
    return DataSettings(**{**table, "val_fraction": float(table.get("val_fraction", 0.2))})


def _provenance(path: Path, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [provenance] must be a table")
    return dict(table)


def load_recipe_file(path: str | Path) -> RecipeFile:
    """A recipe file, or an architecture-only file (flat ArchConfig fields, ``[arch]`` or ``config``)."""
    path = Path(path)
    document = read_config_document(path)
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a table of ArchConfig fields, got {type(document).__name__}")
    if isinstance(document.get("arch"), dict):
        extra = sorted(k for k in document if k not in SECTIONS and k != "note")
        if extra:
            raise ConfigError(f"{path}: unknown section(s) {', '.join(extra)}; a recipe file has: {', '.join(SECTIONS)}")
        train, data = document.get("train"), document.get("data")
        if isinstance(train, dict) and isinstance(data, dict) and "val_fraction" in train and "val_fraction" in data \
                and train["val_fraction"] != data["val_fraction"]:
            # the run splits the data by [data] (the recorded split), so [train]'s value would be silently unused
            raise ConfigError(f"{path}: train.val_fraction: {train['val_fraction']!r} differs from [data] "
                              f"val_fraction = {data['val_fraction']!r} (the split the run uses); make them equal, "
                              "or use --val-fraction for another split")
        return RecipeFile(
            arch=_section(path, "arch", ArchConfig, document["arch"]),
            train=_section(path, "train", TrainConfig, document["train"]) if "train" in document else None,
            privacy=_section(path, "privacy", PrivacyConfig, document["privacy"]) if "privacy" in document else None,
            data=_data_settings(path, document["data"]) if "data" in document else None,
            provenance=_provenance(path, document.get("provenance", {})),
        )
    if isinstance(document.get("config"), dict):  # `dpnas describe --json` and training results
        document = document["config"]
    return RecipeFile(arch=_section(path, "arch", ArchConfig, document))

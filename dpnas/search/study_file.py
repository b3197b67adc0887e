"""Study files: one TOML file describes a whole architecture search.

    [study]    name, objectives, n_trials, sampler, pruner, seed, trial_count (fixed | poisson | ...),
               repeats (ablation: seeds per point)
    [data]     dataset, data_dir, val_fraction, image_size, synthetic_size (samples of dataset = "synthetic")
    [privacy]  PrivacyConfig fields: the fixed (ε, δ) every trial trains at, clip norm, accountant, val_noise;
               or total_epsilon = E: the whole search at most E (dpnas.search.calibration)
    [train]    recipe = NAME, then TrainConfig fields overriding it
    [arch]     base = NAME (a registered architecture), then ArchConfig fields: the fixed part of the space
    [search]   the searched axes: FIELD = [choices] or FIELD = {low, high, step?, log?}
    [fidelity] tan_batch, data_fraction, image_size, epochs, private_data_ok: cheaper trials for the search only
               (dpnas.search.fidelity); [data] public = true marks data that need no protection (a public proxy)

Everything is checked when the file is loaded; an error names the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpnas.arch.conditions import ARCH_RELEVANCE, ARCH_VALUE_RULES
from dpnas.arch.registry import MODELS
from dpnas.arch.space import ArchConfig, ConfigError, FieldValueError
from dpnas.data.datasets import DATASETS, DEFAULT_IMAGE_SIZE, DEFAULT_SYNTHETIC_SIZE, DataError, check_fits
from dpnas.dp.config import DP_RELEVANCE, MAX_SEED, PrivacyConfig, TrainConfig, check_seed
from dpnas.dp.recipe_file import DataSettings
from dpnas.dp.recipes import DEFAULT_RECIPE, RECIPES
from dpnas.search.fidelity import FIDELITY_KEYS, Fidelity, parse_fidelity
from dpnas.search.privacy import expected_trials_tnb

OBJECTIVES = {"val_accuracy": "maximize", "params": "minimize", "epoch_seconds": "minimize"}
SAMPLERS = ("tpe", "random", "grid", "nsga2", "ablation")
PRUNERS = ("median", "hyperband", "none")
MAX_EXPECTED_TRIALS = 100_000
# A range with a step is a list of values: Optuna and a grid enumerate them, so their number must stay countable.
MAX_RANGE_STEPS = 1_000_000
# A repeat's training seed is the study's seed + REPEAT_SEED_STRIDE * repeat: train() derives its other generators
# from seed + 1 ... seed + 4, so a stride of 5 keeps every repeat's generators apart from every other repeat's.
REPEAT_SEED_STRIDE = 5
TRIAL_COUNTS = ("fixed", "poisson", "truncated_negative_binomial")
SECTIONS = ("study", "data", "privacy", "train", "arch", "search", "fidelity")

_STUDY_KEYS = {
    "name": str, "objectives": list, "n_trials": int, "timeout": (int, float), "seed": int, "sampler": str,
    "pruner": str, "trial_count": str, "mean_trials": (int, float), "eta": (int, float), "gamma": (int, float),
    "max_retries": int, "heartbeat_interval": int, "grace_period": int, "description": str,
    "keep_weights": (str, int), "repeats": int,
}
KEEP_WEIGHTS = ("all", "best", "none")
_DATA_KEYS = {"dataset": str, "data_dir": str, "val_fraction": (int, float), "image_size": int, "synthetic_size": int,
              "public": bool}
_CONFIG_FIELDS = {
    "arch": {f.name for f in dataclasses.fields(ArchConfig)},
    "train": {f.name for f in dataclasses.fields(TrainConfig)},
    "privacy": {f.name for f in dataclasses.fields(PrivacyConfig)},
}


class StudyFileError(ConfigError):
    """A study file is invalid; the message starts with the file and the key."""


@dataclass(frozen=True)
class Axis:
    """One searched field: a list of choices, or a numeric range."""

    name: str
    target: str  # "arch" | "train" | "privacy"
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def categorical(self) -> bool:
        return self.choices is not None

    def grid_values(self) -> list:
        """Every value this axis can take (categorical, or a range with a step)."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise ConfigError(f"search.{self.name}: a grid needs choices or a range with a step")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(round(v)) for v in values] if self.integer else [round(v, 12) for v in values]


@dataclass(frozen=True)
class StudySpec:
    path: Path
    name: str
    objectives: tuple[str, ...]
    n_trials: int | None
    timeout: float | None
    seed: int
    sampler: str
    pruner: str
    trial_count: str
    mean_trials: float | None
    eta: float | None
    gamma: float | None
    max_retries: int
    heartbeat_interval: int
    grace_period: int
    description: str
    dataset: str
    data_dir: str | None
    val_fraction: float
    image_size: int | None
    recipe: str
    base_arch_name: str | None
    arch: ArchConfig
    train: TrainConfig
    privacy: PrivacyConfig
    axes: tuple[Axis, ...] = field(default_factory=tuple)
    synthetic_size: int = DEFAULT_SYNTHETIC_SIZE
    keep_weights: str | int = "best"
    """Whose trained weights the artifact store keeps: all | best | none | K (the top K)."""
    total_epsilon: float | None = None
    """[privacy] total_epsilon: the whole search's ε (None: every run at [privacy] epsilon)."""
    repeats: int = 1
    """[study] repeats (ablation only): each point is trained from this many seeds, one trial (and one run) each."""
    fidelity: Fidelity = field(default_factory=Fidelity)
    """[fidelity]: how the search's trials are cheaper than the recipe it exports (dpnas.search.fidelity)."""
    public_data: bool = False
    """[data] public: the search's data need no protection (a public proxy): it spends no private budget."""

    def data_settings(self) -> DataSettings:
        """How every trial of the study sees the data (one split for the whole study)."""
        return DataSettings(dataset=self.dataset, val_fraction=self.val_fraction, split_seed=self.train.seed,
                            image_size=self.image_size, synthetic_size=self.synthetic_size, data_dir=self.data_dir)

    def budget(self) -> dict[str, Any]:
        """Everything that fixes what the study may spend; an existing study refuses a file that changes it."""
        p = self.privacy
        searched = {a.name: repr(a.choices if a.categorical else (a.low, a.high, a.step, a.log))
                    for a in self.axes if a.target == "privacy" and a.name in ("epsilon", "delta", "val_noise",
                                                                                "noise_multiplier", "accountant")}
        return {"total_epsilon": self.total_epsilon, "epsilon": None if self.total_epsilon else p.epsilon,
                "delta": p.delta, "val_noise": p.val_noise, "noise_multiplier": p.noise_multiplier,
                "accountant": p.accountant, "trial_count": self.trial_count, "mean_trials": self.mean_trials,
                "eta": self.eta, "gamma": self.gamma, "searched": searched,
                # R seeds per ablation point is R times the runs; recorded only when asked for, so a study created
                # before repeats existed still matches a file without the key
                **({"repeats": self.repeats} if self.repeats != 1 else {}),
                **({"fidelity": self.fidelity.to_dict()} if self.fidelity.to_dict() else {}),
                **({"public_data": True} if self.public_data else {})}

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def random_search(self) -> bool:
        """True when runs are i.i.d. draws (random sampler, no pruning): Papernot & Steinke's setting."""
        return self.sampler == "random" and self.pruner == "none"

    def default_storage(self) -> str:
        """An Optuna journal file next to the study file: safe for several processes on one host."""
        return str(self.path.with_suffix(".journal"))


def _fail(path: Path, key: str, message: str) -> StudyFileError:
    return StudyFileError(f"{path}: {key}: {message}")


def _check_keys(path: Path, section: str, table: dict, allowed: dict) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise _fail(path, f"{section}.{key}", f"unknown key; allowed keys in [{section}]: {', '.join(sorted(allowed))}")
        expected = allowed[key]
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            raise _fail(path, f"{section}.{key}", f"expected {names}, got {value!r}")


def _choice(path: Path, key: str, value: Any, allowed: tuple[str, ...] | dict) -> None:
    if not isinstance(value, str):  # a list here would fail `in` with a TypeError, or match nothing silently
        raise _fail(path, key, f"expected a name (a string), got {value!r}; one of: {', '.join(allowed)}")
    if value not in allowed:
        raise _fail(path, key, f"unknown value {value!r}; expected one of: {', '.join(allowed)}")


def load_study_file(path: str | Path) -> StudySpec:
    path = Path(path)
    try:
        # utf-8-sig: Windows editors (Notepad) start a UTF-8 file with a byte-order mark, which TOML's parser
        # refuses as "Invalid statement (at line 1, column 1)"; the mark carries no content, so it is dropped.
        document = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise StudyFileError(f"{path}: not a text file (not UTF-8: byte {err.start} cannot be decoded); a study "
                             "file is TOML, which is UTF-8") from err
    except OSError as err:
        raise StudyFileError(f"{path}: cannot read study file ({err.strerror or err})") from err
    except tomllib.TOMLDecodeError as err:
        raise StudyFileError(f"{path}: not valid TOML: {err}") from err
    for section, table in document.items():
        if section not in SECTIONS:
            raise _fail(path, section, f"unknown section; allowed sections: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise _fail(path, section, "expected a [section] table")

    study = document.get("study", {})
    _check_keys(path, "study", study, _STUDY_KEYS)
    data = document.get("data", {})
    _check_keys(path, "data", data, _DATA_KEYS)

    name = study.get("name", path.stem)
    if not name.strip():
        raise _fail(path, "study.name", "must not be empty; leave it out to name the study after the file "
                                        f"({path.stem!r})")
    if not name.isprintable():  # a NUL or a zero-width space: a name no one can type back after --study-name
        raise _fail(path, "study.name", f"must be printable characters, got {name!r}")
    objectives = tuple(study.get("objectives", ["val_accuracy"]))
    for objective in objectives:
        if not isinstance(objective, str) or objective not in OBJECTIVES:
            raise _fail(path, "study.objectives", f"unknown objective {objective!r}; expected one of: {', '.join(OBJECTIVES)}")
    if not objectives or len(set(objectives)) != len(objectives):
        raise _fail(path, "study.objectives", "give one or more distinct objectives")
    if objectives[0] != "val_accuracy":
        raise _fail(path, "study.objectives", "the first objective must be val_accuracy (the others are traded off against it)")
    sampler = study.get("sampler", "nsga2" if len(objectives) > 1 else "tpe")
    _choice(path, "study.sampler", sampler, SAMPLERS)
    pruner = study.get("pruner", "none" if len(objectives) > 1 or sampler in ("grid", "ablation") else "median")
    _choice(path, "study.pruner", pruner, PRUNERS)
    if len(objectives) > 1 and pruner != "none":
        raise _fail(path, "study.pruner", "Optuna cannot prune multi-objective studies; use pruner = \"none\"")
    trial_count = study.get("trial_count", "fixed")
    _choice(path, "study.trial_count", trial_count, TRIAL_COUNTS)
    n_trials = study.get("n_trials")
    mean_trials, eta, gamma = study.get("mean_trials"), study.get("eta"), study.get("gamma")
    for key, value, mode in (("mean_trials", mean_trials, "poisson"), ("eta", eta, "truncated_negative_binomial"),
                             ("gamma", gamma, "truncated_negative_binomial")):
        if value is None:
            continue
        if trial_count != mode:  # it would be ignored: the study would not be what the file says
            raise _fail(path, f"study.{key}", f"only for trial_count = \"{mode}\" (this file's is {trial_count!r})")
        if not math.isfinite(value):
            raise _fail(path, f"study.{key}", f"must be a finite number, got {value!r}")
    if trial_count == "fixed":
        if sampler not in ("ablation", "grid") and n_trials is None:
            raise _fail(path, "study.n_trials", "required when trial_count = \"fixed\"")
        if sampler == "ablation" and n_trials is not None:
            raise _fail(path, "study.n_trials", "an ablation trains each of its points once per repeat; remove "
                                                "n_trials (repeats and the [search] axes set how many trials)")
        if n_trials is not None and n_trials < 1:
            raise _fail(path, "study.n_trials", f"must be >= 1, got {n_trials}")
    else:
        if n_trials is not None:
            raise _fail(path, "study.n_trials", f"trial_count = {trial_count!r} draws the number of trials at random; remove n_trials")
        if sampler in ("grid", "ablation"):
            raise _fail(path, "study.sampler", f"a random number of trials needs a random or adaptive sampler, not {sampler!r}")
        if trial_count == "poisson" and not (mean_trials and mean_trials > 0):
            raise _fail(path, "study.mean_trials", "trial_count = \"poisson\" needs mean_trials > 0")
        if trial_count == "truncated_negative_binomial":
            if eta is None or eta <= -1:
                raise _fail(path, "study.eta", "truncated_negative_binomial needs eta > -1 (eta = 1: geometric)")
            if gamma is None or not 0 < gamma < 1:
                raise _fail(path, "study.gamma", "truncated_negative_binomial needs 0 < gamma < 1")
        expected = mean_trials if trial_count == "poisson" else expected_trials_tnb(eta, gamma)
        if expected > MAX_EXPECTED_TRIALS:  # drawing K would loop that long, and no study runs that many trials
            key = "study.mean_trials" if trial_count == "poisson" else "study.gamma"
            raise _fail(path, key, f"the expected number of trials is {expected:.3g}; at most {MAX_EXPECTED_TRIALS:,} "
                                   "is supported")
    repeats = study.get("repeats", 1)
    if "repeats" in study and sampler != "ablation":
        raise _fail(path, "study.repeats", f"only for sampler = \"ablation\" (this file's is {sampler!r}); other "
                                           "samplers repeat points by searching the seed, e.g. seed = [0, 1, 2] in [search]")
    if not 1 <= repeats <= MAX_EXPECTED_TRIALS:
        raise _fail(path, "study.repeats", f"must be an integer from 1 to {MAX_EXPECTED_TRIALS:,} (the number of seeds "
                                           f"each ablation point is trained with), got {repeats}")
    keep_weights = study.get("keep_weights", "best")
    if isinstance(keep_weights, str) and keep_weights not in KEEP_WEIGHTS:
        raise _fail(path, "study.keep_weights", f"unknown value {keep_weights!r}; expected one of: "
                                                f"{', '.join(KEEP_WEIGHTS)}, or a number K >= 1 (the top K)")
    if isinstance(keep_weights, int) and keep_weights < 1:
        raise _fail(path, "study.keep_weights", f"K must be >= 1, got {keep_weights}")
    timeout = study.get("timeout")
    if timeout is not None and not (0 < timeout < math.inf):  # NaN fails both comparisons
        raise _fail(path, "study.timeout", f"must be a finite number of seconds > 0, got {timeout} (leave it out "
                                           "for no time limit)")
    seed = study.get("seed", 0)
    try:
        check_seed("seed", seed)
    except ConfigError as err:
        raise _fail(path, "study.seed", str(err).removeprefix("seed: ")) from None
    # Storage settings: the storage would refuse a negative value only when it opens, with Optuna's wording.
    for key, minimum, meaning in (("heartbeat_interval", 0, " (0: no heartbeat)"), ("grace_period", 1, ""),
                                  ("max_retries", 0, " (0: a crashed trial is not retried)")):
        if key in study and study[key] < minimum:
            raise _fail(path, f"study.{key}", f"must be >= {minimum}{meaning}, got {study[key]}")

    dataset = data.get("dataset", "digits")
    _choice(path, "data.dataset", dataset, DATASETS)
    synthetic_size = data.get("synthetic_size", DEFAULT_SYNTHETIC_SIZE)
    if "synthetic_size" in data and dataset != "synthetic":
        raise _fail(path, "data.synthetic_size", f"only for dataset = \"synthetic\", not {dataset!r}")
    if synthetic_size < 2:
        raise _fail(path, "data.synthetic_size", f"must be >= 2, got {synthetic_size}")

    image_size = data.get("image_size")
    if image_size is not None and image_size < 1:
        raise _fail(path, "data.image_size", f"must be >= 1 (pixels), got {image_size}")
    try:
        check_fits(dataset, image_size or DEFAULT_IMAGE_SIZE[dataset], synthetic_size)
    except DataError as err:
        raise _fail(path, "data.image_size", str(err).removeprefix(f"image_size {image_size}: ")) from None
    data_dir = data.get("data_dir")
    if data_dir is not None and not data_dir.strip():  # Path("") is the current directory: CIFAR-10 would go there
        raise _fail(path, "data.data_dir", "must not be empty; leave it out for the default cache")
    if data_dir is not None and dataset in ("digits", "synthetic"):
        raise _fail(path, "data.data_dir", f"{dataset} needs no files (bundled with scikit-learn, or generated); "
                                           "data_dir is for cifar10 and imagenette: remove it")
    if data_dir is not None and dataset in ("cifar10", "imagenette") and not Path(data_dir).expanduser().is_dir():
        raise _fail(path, "data.data_dir", f"{data_dir!r} is not a directory; create it (to download CIFAR-10 into "
                                           "it) or point it at the dataset's folder, or leave it out for the "
                                           "default cache")
    val_fraction = data.get("val_fraction")
    # Checked here, not only when [train] is built from it below, so the message names the key the user wrote.
    if val_fraction is not None and not 0 <= val_fraction < 1:  # NaN fails the comparison too
        raise _fail(path, "data.val_fraction", f"must be in [0, 1) (the share of the training set held out for "
                                               f"validation; 0.2 is customary), got {val_fraction}")

    train_table = dict(document.get("train", {}))
    recipe_name = train_table.pop("recipe", DEFAULT_RECIPE)
    if not isinstance(recipe_name, str) or recipe_name not in RECIPES:
        raise _fail(path, "train.recipe", f"unknown recipe {recipe_name!r}; expected one of: {', '.join(RECIPES)}")
    recipe = RECIPES[recipe_name]
    arch_table = dict(document.get("arch", {}))
    base_name = arch_table.pop("base", None)
    if base_name is not None and (not isinstance(base_name, str) or base_name not in MODELS):
        raise _fail(path, "arch.base", f"unknown architecture {base_name!r}; expected one of: {', '.join(MODELS)}")
    base_arch = MODELS[base_name].arch if base_name else ArchConfig()
    if "val_fraction" in data:
        if "val_fraction" in train_table and train_table["val_fraction"] != data["val_fraction"]:
            raise _fail(path, "train.val_fraction", f"{train_table['val_fraction']!r} differs from [data] val_fraction "
                                                    f"= {data['val_fraction']!r}; set it once, in [data]")
        train_table.setdefault("val_fraction", data["val_fraction"])
    arch = _build(path, "arch", base_arch, arch_table)
    train = _build(path, "train", recipe.train, train_table)
    privacy_table = dict(document.get("privacy", {}))
    total_epsilon = privacy_table.pop("total_epsilon", None)
    if total_epsilon is not None:
        _check_total(path, total_epsilon, privacy_table, document.get("search", {}), trial_count, sampler, pruner)
        # every run's epsilon and noise come from the calibration; this placeholder is never trained at
        privacy_table["epsilon"] = float(total_epsilon)
    privacy = _build(path, "privacy", recipe.privacy, privacy_table)

    searched = set(document.get("search", {}))
    axes = tuple(_axis(path, name, value, {"arch": arch, "train": train, "privacy": privacy}, searched)
                 for name, value in document.get("search", {}).items())
    if not axes:
        raise _fail(path, "search", "name at least one searched field, e.g. activation = [\"selu\", \"relu\"]")
    if sampler == "ablation":
        # the base point is one of the trials, so its value must be a choice of every axis
        configs = {"arch": arch, "train": train, "privacy": privacy}
        axes = tuple(
            dataclasses.replace(a, choices=(getattr(configs[a.target], a.name),) + a.choices)
            if a.categorical and getattr(configs[a.target], a.name) not in a.choices else a
            for a in axes
        )
    for axis in axes:  # an axis that matters in no trial would be silently unused
        rule = _RELEVANCE.get(axis.name)
        if rule is not None and not _can_matter(rule, {"arch": arch, "train": train, "privacy": privacy}, axes):
            raise _fail(path, f"search.{axis.name}", f"never used: it matters only with {rule.text}, which no value "
                                                     f"of {', '.join(rule.parents)} in this file gives; search or set "
                                                     "that too, or remove this axis")
    if repeats > 1:
        if any(a.name == "seed" for a in axes):
            raise _fail(path, "search.seed", f"repeats = {repeats} gives each ablation point its own seeds; do not "
                                             "search the seed as well (remove one of them)")
        last_seed = train.seed + REPEAT_SEED_STRIDE * (repeats - 1)
        if last_seed > MAX_SEED:
            raise _fail(path, "study.repeats", f"the last repeat's seed would be [train] seed {train.seed} + "
                                               f"{REPEAT_SEED_STRIDE} x {repeats - 1} = {last_seed}, above 2**63 - 1; "
                                               "use a smaller [train] seed")
    fidelity_table = document.get("fidelity", {})
    _check_keys(path, "fidelity", fidelity_table, FIDELITY_KEYS)
    searched_schedules = next((set(a.choices) for a in axes if a.name == "schedule"), {train.schedule})
    fidelity = parse_fidelity(fidelity_table, fail=lambda key, message: _fail(path, key, message),
                              public=data.get("public", False), train=train, searched=searched, pruner=pruner,
                              schedules=searched_schedules)
    if fidelity.image_size is not None:
        try:
            check_fits(dataset, fidelity.image_size, synthetic_size)
        except DataError as err:
            raise _fail(path, "fidelity.image_size",
                        str(err).removeprefix(f"image_size {fidelity.image_size}: ")) from None
    if sampler in ("grid", "ablation"):
        for axis in axes:
            try:
                axis.grid_values()
            except ConfigError as err:
                raise _fail(path, f"search.{axis.name}", f"sampler {sampler!r}: {err}") from None

    if sampler != "ablation":  # an ablation's base point is its fixed values; no other sampler reads them
        for section, own in (("arch", "base"), ("train", "recipe"), ("privacy", "total_epsilon")):
            for key in sorted(searched & (set(document.get(section, {})) - {own})):
                raise _fail(path, f"{section}.{key}", f"is searched too ([search] {key}): the fixed value would be "
                                                      f"ignored by sampler {sampler!r} (only an ablation's base point "
                                                      "reads it); remove one of them")

    return StudySpec(
        path=path,
        name=name,
        objectives=objectives,
        n_trials=n_trials,
        timeout=float(timeout) if timeout is not None else None,
        seed=seed,
        sampler=sampler,
        pruner=pruner,
        trial_count=trial_count,
        mean_trials=float(mean_trials) if mean_trials is not None else None,
        eta=float(eta) if eta is not None else None,
        gamma=float(gamma) if gamma is not None else None,
        max_retries=study.get("max_retries", 2),
        heartbeat_interval=study.get("heartbeat_interval", 60),
        grace_period=study.get("grace_period", 180),
        description=study.get("description", ""),
        dataset=dataset,
        data_dir=data_dir,
        val_fraction=train.val_fraction,
        image_size=image_size,
        recipe=recipe_name,
        base_arch_name=base_name,
        arch=arch,
        train=train,
        privacy=privacy,
        axes=axes,
        synthetic_size=synthetic_size,
        keep_weights=keep_weights,
        total_epsilon=float(total_epsilon) if total_epsilon is not None else None,
        repeats=repeats,
        fidelity=fidelity,
        public_data=data.get("public", False),
    )


# What a total-epsilon study derives itself, so a file may not set or search it.
_DERIVED_BY_TOTAL = ("epsilon", "noise_multiplier")
_FIXED_FOR_TOTAL = ("delta", "val_noise", "accountant", "noise_multiplier", "epsilon")


def _check_total(path: Path, total: Any, privacy: dict, search: dict, trial_count: str, sampler: str,
                 pruner: str) -> None:
    if isinstance(total, bool) or not isinstance(total, (int, float)) or not 0 < total < math.inf:
        raise _fail(path, "privacy.total_epsilon", f"must be a positive finite number, got {total!r}")
    for name in _DERIVED_BY_TOTAL:
        if name in privacy:
            raise _fail(path, f"privacy.{name}", "with total_epsilon, each run's epsilon and noise are derived from "
                                                 "the total; remove this key (or total_epsilon for a per-run budget)")
    for name in _FIXED_FOR_TOTAL:
        if name in search:
            raise _fail(path, f"search.{name}", "with total_epsilon the budget is one for the whole study; "
                                                "this field cannot be searched")
    if privacy.get("accountant", "rdp") != "rdp":
        raise _fail(path, "privacy.accountant", "total_epsilon is accounted in Rényi DP (the study's bounds); "
                                                "use accountant = \"rdp\"")
    val_noise = privacy.get("val_noise", "auto")
    if val_noise not in ("auto", 0):
        raise _fail(path, "privacy.val_noise", "with total_epsilon the validation noise is derived from the total: "
                                               "use \"auto\" (default), or 0 for exact scores (validation records "
                                               "then unprotected)")
    if trial_count != "fixed" and not (sampler == "random" and pruner == "none"):
        raise _fail(path, "study.sampler", f"trial_count = {trial_count!r} at a total epsilon uses Papernot & "
                                           "Steinke's bound, which holds for random search only: use sampler = "
                                           "\"random\" and pruner = \"none\" (or trial_count = \"fixed\", any sampler)")


def _build(path: Path, section: str, base: Any, table: dict) -> Any:
    unknown = sorted(set(table) - _CONFIG_FIELDS[section])
    if unknown:
        raise _fail(path, f"{section}.{unknown[0]}", f"unknown field; {type(base).__name__} fields are: {', '.join(sorted(_CONFIG_FIELDS[section]))}")
    try:
        return base.replace(**table)
    except ConfigError as err:
        raise StudyFileError(f"{path}: [{section}] {err}") from None


# Every rule of the conditional space, as (the field it governs, the rule).
_RELEVANCE = {**ARCH_RELEVANCE, **DP_RELEVANCE}  # when each field matters
_RULES = [*_RELEVANCE.items(), *((f, rule) for (f, _), rule in ARCH_VALUE_RULES.items())]


def _depends_on_searched(name: str, value: Any, searched: set[str]) -> bool:
    """Whether a value the base refuses can still be valid in some trial's context (which then decides).

    Either its own rule reads another searched field (``before_act`` next to a dense base, with ``skip``
    searched too), or another field's rule reads this one and that field is searched or has a neutral value
    that the sampler sets (``skip = "none"`` next to a ScaleNorm base: scalenorm becomes "none").
    """
    own = [r for r in (ARCH_RELEVANCE.get(name), DP_RELEVANCE.get(name), _value_rule(name, value)) if r is not None]
    if any(set(rule.parents) & (searched - {name}) for rule in own):
        return True
    return any(name in rule.parents and (field_name in searched or rule.has_neutral)
               for field_name, rule in _RULES if field_name != name)


def _can_matter(rule: Any, configs: dict[str, Any], axes: tuple[Axis, ...]) -> bool:
    """Whether a field's rule holds for some values of its parents: their searched choices, else their fixed values."""
    fixed = {k: v for config in configs.values() for k, v in config.to_dict().items()}
    options = []
    for parent in rule.parents:
        axis = next((a for a in axes if a.name == parent), None)
        if axis is not None and not axis.categorical:
            return True  # a range parent: some value may well make it matter
        values = list(axis.choices) if axis is not None else [fixed[parent]]
        parent_rule = _RELEVANCE.get(parent)
        if parent_rule is not None and parent_rule.has_neutral:  # where the parent does not matter, it is neutral
            values.append(parent_rule.neutral)
        options.append(values)
    return any(rule.holds({**fixed, **dict(zip(rule.parents, combo))}) for combo in itertools.product(*options))


def _value_rule(name: str, value: Any):
    try:
        return ARCH_VALUE_RULES.get((name, value))
    except TypeError:  # an unhashable value (a list) has no rule
        return None


def _choice_key(value: Any) -> Any:
    """What makes two choices the same: equal numbers are (1 and 1.0 build the same config), but true is not 1."""
    return ("bool", value) if isinstance(value, bool) else value


def _axis(path: Path, name: str, spec: Any, configs: dict[str, Any], searched: set[str] = frozenset()) -> Axis:
    key = f"search.{name}"
    if name == "val_fraction":
        raise _fail(path, key, "the validation split is fixed for a whole study (every trial is scored on the same "
                               "records); set [data] val_fraction instead")
    target = next((t for t, fields in _CONFIG_FIELDS.items() if name in fields), None)
    if target is None:
        known = sorted(set().union(*_CONFIG_FIELDS.values()))
        raise _fail(path, key, f"not a searchable field; fields are: {', '.join(known)}")
    base = configs[target]
    current = getattr(base, name)

    def check(value: Any) -> None:
        try:
            base.replace(**{name: value})
        except ConfigError as err:
            # only a value that some other searched field can make valid is left to each trial's context
            if not isinstance(err, FieldValueError) and _depends_on_searched(name, value, searched):
                return
            raise _fail(path, key, f"value {value!r} is outside the space: {err}") from None

    if isinstance(spec, list):
        if not spec:
            raise _fail(path, key, "give at least one choice")
        for value in spec:
            if not isinstance(value, (str, int, float, bool)):
                raise _fail(path, key, f"choices must be strings, numbers or booleans, got {value!r}")
            check(value)
        if len(set(map(_choice_key, spec))) != len(spec):
            raise _fail(path, key, "choices must be distinct (1 and 1.0 are the same number)")
        return Axis(name=name, target=target, choices=tuple(spec))
    if isinstance(spec, dict):
        allowed = {"low", "high", "step", "log"}
        extra = sorted(set(spec) - allowed)
        if extra:
            raise _fail(path, f"{key}.{extra[0]}", f"unknown key; a range takes: {', '.join(sorted(allowed))}")
        if "low" not in spec or "high" not in spec:
            raise _fail(path, key, "a range needs low and high")
        low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
        for what, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise _fail(path, f"{key}.{what}", f"expected a number, got {value!r}")
        if not isinstance(log, bool):
            raise _fail(path, f"{key}.log", f"expected true or false, got {log!r}")
        if not (math.isfinite(low) and math.isfinite(high)):
            raise _fail(path, key, f"low and high must be finite numbers, got {low} and {high}")
        if not low < high:
            raise _fail(path, key, f"low ({low}) must be below high ({high})")
        if step is not None and step <= 0:
            raise _fail(path, f"{key}.step", "must be > 0")
        if step is not None and (high - low) / step >= MAX_RANGE_STEPS:
            raise _fail(path, f"{key}.step", f"{step} makes {(high - low) / step:.3g} values from low to high; at most "
                                             f"{MAX_RANGE_STEPS:,} are supported (leave the step out for a continuous "
                                             "range)")
        if log and (low <= 0 or step is not None):
            raise _fail(path, f"{key}.log", "a log range needs low > 0 and no step")
        integer = isinstance(current, int) and not isinstance(current, bool)
        if integer and not all(isinstance(v, int) for v in (low, high) + ((step,) if step is not None else ())):
            raise _fail(path, key, f"{name} is an integer field: low, high and step must be integers")
        if isinstance(current, (str, bool)):
            raise _fail(path, key, f"{name} takes {type(current).__name__} values: give a list of choices, not a range")
        check(low)
        check(high)
        return Axis(name=name, target=target, low=low, high=high, step=step, log=log, integer=integer)
    raise _fail(path, key, f"expected a list of choices or a {{low, high}} table, got {spec!r}")

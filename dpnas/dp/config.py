"""How a model is trained (TrainConfig) and what privacy it must keep (PrivacyConfig).

Frozen dataclasses that check themselves when created, like :class:`dpnas.ArchConfig`.
Their field names never collide with ArchConfig's, so one ``--set field=value`` on the
command line can reach any of the three.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from dpnas.arch.conditions import When
from dpnas.arch.space import ConfigError, FieldValueError, check_choice, check_field_types

OPTIMIZERS = ("sgd", "nadam", "adam")
SCHEDULES = ("constant", "step", "plateau", "cosine")
ACCOUNTANTS = ("rdp", "prv")
PER_SAMPLE_MODES = ("auto", "dpnas", "opacus")


# Seeds are integers in [0, 2**63): Optuna's and NumPy's generators refuse negative seeds, and torch maps a negative
# one to 2**64 + seed without a word; 2**63 - 1 is TOML's largest integer, and the training loop adds up to 4 to the
# seed for its other generators, which torch's 64-bit seeds still hold.
MAX_SEED = 2**63 - 1


def check_seed(name: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name}: must be an integer from 0 to 2**63 - 1, got {value}")


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise FieldValueError(f"{name}: must be a positive finite number, got {value!r}")


class _FromDict:
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config"):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; {cls.__name__} fields are: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self, **changes: Any):
        return self.from_dict({**self.to_dict(), **changes})


# Bounds past which the accounting's numbers break down (Opacus's noise search loops for ever, a variance
# overflows); far beyond any meaningful value: a budget of 1e6 or a count noise of 1e9 already protect nothing /
# say nothing.
MAX_FINITE_EPSILON = 1e6
MAX_VAL_NOISE = 1e9
# Opacus's RDP analysis squares the noise multiplier (an OverflowError past ~1e154); sigma = 1e6 times the clip norm
# already drowns every gradient.
MAX_NOISE_MULTIPLIER = 1e6


@dataclass(frozen=True)
class PrivacyConfig(_FromDict):
    """The (ε, δ) budget of one training run, its clip norm C and accountant.

    ``epsilon = inf`` trains without clipping or noise on the same code path, so the DP gap
    can be measured.
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    """rdp (Opacus's RDP accountant, the papers' choice) | prv (tighter numerical accountant)."""
    val_noise: str | float = field(default="auto", metadata={"types": (str, int, float),
                                                            "what": '"auto" or a number >= 0'})
    """Std s of the Gaussian noise added to each validation score's correct-prediction count (sensitivity 1 under
    add/remove of one record) before the score leaves the run. "auto" (default): for a private run, the smallest s
    at which the run's validation releases (one per epoch) cost at most `epsilon` at `delta`, so validation records
    get the same per-run guarantee as training records; 0 for a non-private run. 0: exact scores, and the report
    says the validation records are not protected."""
    noise_multiplier: float = 0.0
    """0 (default): calibrated from `epsilon`. > 0: DP-SGD uses exactly this sigma (a study at a total epsilon sets
    it) and `epsilon` is the ceiling the run is checked against before it starts."""
    reproducible: bool = False
    """false (default): a private run's Poisson batches and noise come from generators seeded by the OS's secure
    random source, and that seed is never stored, so nothing recorded regenerates them (DP-SGD's guarantee assumes
    the adversary knows neither). true: seeded from the run's `seed`, for research and tests; whoever has the seed
    can regenerate the noise, so such a model must be retrained without it before release."""

    def __post_init__(self) -> None:
        check_field_types(self)
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise ConfigError(
                f"epsilon: must be > 0, got {self.epsilon!r} (no finite budget is smaller); "
                "use epsilon=inf (--no-dp) for non-private training"
            )
        if MAX_FINITE_EPSILON < self.epsilon < math.inf:  # Opacus's noise search never ends past ~1e15
            raise ConfigError(f"epsilon: at most {MAX_FINITE_EPSILON:g} (a larger budget protects nothing), got "
                              f"{self.epsilon!r}; use epsilon=inf (--no-dp) for non-private training")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta: must be in (0, 1), got {self.delta!r}")
        _positive("max_grad_norm", self.max_grad_norm)
        if isinstance(self.val_noise, str):
            if self.val_noise != "auto":
                raise ConfigError(f'val_noise: expected "auto" or a number >= 0, got {self.val_noise!r}')
        elif not 0 <= self.val_noise <= MAX_VAL_NOISE:
            raise ConfigError(f"val_noise: must be a number from 0 (exact scores) to {MAX_VAL_NOISE:g}, got "
                              f"{self.val_noise!r}")
        if not 0 <= self.noise_multiplier <= MAX_NOISE_MULTIPLIER:  # NaN fails both comparisons
            raise ConfigError(f"noise_multiplier: must be from 0 (0 = calibrated from epsilon) to "
                              f"{MAX_NOISE_MULTIPLIER:g}, got {self.noise_multiplier!r}")

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)


@dataclass(frozen=True)
class TrainConfig(_FromDict):
    """Optimisation recipe of one training run (see :mod:`dpnas.dp.recipes` for the papers' presets)."""

    epochs: int = 30
    batch_size: int = 256
    """Expected logical batch size B; Poisson sampling draws each sample with rate B / n."""
    physical_batch_size: int = 64
    """Largest chunk that goes through the model at once; does not change the privacy analysis."""
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_size: int = 5
    """StepLR: epochs between decays."""
    gamma: float = 0.9
    """StepLR decay factor."""
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    augment: bool = False
    """Random crop (pad 4) and horizontal flip, on the device."""
    aug_multiplicity: int = 1
    """K augmentations per sample whose gradients are averaged before clipping (De et al.)."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights used for evaluation; 0 turns it off."""
    val_fraction: float = 0.2
    seed: int = 0
    amp: bool = False
    """bf16 autocast of the forward pass (on CPU too, where it is slower without bf16 instructions).
    Per-sample norms and clipped sums are still computed in fp32."""
    channels_last: bool = False
    """NHWC tensors for the convolutions (their tensor-core kernels on GPU); needs dpnas's per-sample path."""
    per_sample: str = "auto"
    """Per-sample gradients: dpnas's own path (no discarded batch gradient) where it covers every layer
    (auto | dpnas), or Opacus's GradSampleModule hooks (opacus)."""

    def __post_init__(self) -> None:
        check_field_types(self)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("per_sample", self.per_sample, PER_SAMPLE_MODES)
        check_seed("seed", self.seed)
        for name in ("epochs", "batch_size", "physical_batch_size", "step_size", "aug_multiplicity"):
            if getattr(self, name) < 1:
                raise FieldValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        _positive("lr", self.lr)
        _positive("gamma", self.gamma)
        _positive("plateau_factor", self.plateau_factor)
        if self.plateau_patience < 0:
            raise ConfigError(f"plateau_patience: must be >= 0, got {self.plateau_patience}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum}")
        if not 0 <= self.weight_decay < math.inf:  # NaN fails it too
            raise ConfigError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1) (0 = off), got {self.ema_decay}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.aug_multiplicity > 1 and not self.augment:
            raise ConfigError("aug_multiplicity: averaging over K > 1 augmentations needs augment=true")


# When a training or privacy field matters (see dpnas.arch.conditions for the rules' form).
DP_RELEVANCE: dict[str, When] = {
    "momentum": When(("optimizer",), lambda v: v["optimizer"] == "sgd", "optimizer = 'sgd'"),
    "step_size": When(("schedule",), lambda v: v["schedule"] == "step", "schedule = 'step'"),
    "gamma": When(("schedule",), lambda v: v["schedule"] == "step", "schedule = 'step'"),
    "plateau_factor": When(("schedule",), lambda v: v["schedule"] == "plateau", "schedule = 'plateau'"),
    "plateau_patience": When(("schedule",), lambda v: v["schedule"] == "plateau", "schedule = 'plateau'"),
    "aug_multiplicity": When(("augment",), lambda v: v["augment"], "augment = true", neutral=1),
    # A non-private run (epsilon = inf) neither clips nor adds noise, nor accounts.
    "max_grad_norm": When(("epsilon",), lambda v: math.isfinite(v["epsilon"]), "a finite epsilon"),
    "delta": When(("epsilon",), lambda v: math.isfinite(v["epsilon"]), "a finite epsilon"),
    "accountant": When(("epsilon",), lambda v: math.isfinite(v["epsilon"]), "a finite epsilon"),
    "noise_multiplier": When(("epsilon",), lambda v: math.isfinite(v["epsilon"]), "a finite epsilon"),
}

"""Cheap trials that rank like expensive ones: a study's ``[fidelity]`` settings.

    [fidelity]
    tan_batch = b         TAN (Sander, Stock & Sablayrolles, ICML 2023): train at batch b with the noise
                          multiplier scaled by b / B and the target's number of steps, so the noise per step
                          relative to the batch (σ/B) stays the target's at a fraction b / B of the compute.
                          The target is the run at batch B that the trial would otherwise be (at the search's
                          epochs and training records when those are set too): its σ0 and steps S, and its
                          validation noise and cadence (one release every S / epochs steps).
                          Such runs are NOT private at the target ε (their σ is smaller): allowed only on data
                          marked public ([data] public = true), or with private_data_ok = false, the
                          acknowledgement that the study's results are not differentially private.
    data_fraction = f     train on a seeded random subset of the training split, each record kept with
                          probability f by a hash of its own index (Koskela & Kulkarni, NeurIPS 2023). Each run
                          is accounted at the subset's sample rate B / m; the records left out are not touched.
    image_size = S        the search's resolution (the target's is [data] image_size)
    epochs = E            the search's epochs (the target's is [train] epochs)
    validations = k       each trial releases k validation scores, evenly spaced over its epochs (TAN: its
                          periods of S / epochs steps) with the last at the end, instead of one per epoch: the
                          search's validation passes shrink with its training, and the validation noise is
                          calibrated (and charged) for k releases. k = 1 leaves a pruner nothing to compare
                          before the end, and the plateau schedule reads a score every epoch: both are refused.

They change how the search's trials train, never the recipe it exports: ``dpnas best`` writes each point at the
*target* fidelity (the study file's [train], [privacy] and [data]), so ``dpnas train`` of the winner runs the real
thing, and that run spends its own ε: the per-run ε the search gave the point (a total-ε study's file holds the
whole total, which is the search's; :func:`exported_privacy`). A point whose target `dpnas train` would refuse (a
fixed noise multiplier that meets ε over the search's fewer epochs, not over the target's) is refused before it
touches the data.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

from dpnas.arch.space import ConfigError
from dpnas.data.datasets import DataError, DatasetSplits, hash_split, load_dataset
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.privacy import plan_privacy, run_epsilon

FIDELITY_KEYS = {"tan_batch": int, "data_fraction": (int, float), "image_size": int, "epochs": int,
                 "validations": int, "private_data_ok": bool}


@dataclass(frozen=True)
class Fidelity:
    """How far a study's trials are from the recipe it exports (None: the target's own value)."""

    tan_batch: int | None = None
    data_fraction: float | None = None
    image_size: int | None = None
    epochs: int | None = None
    validations: int | None = None
    """Validation releases per trial (None: one per epoch)."""
    private_data_ok: bool | None = None
    """False: the user acknowledges that TAN trials on data not marked public are not DP (see the module)."""

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Fidelity:
        """The settings in a trial's or study's recorded fidelity (which may hold more than the settings)."""
        return cls(**{k: record[k] for k in FIDELITY_KEYS if k in record})

    @property
    def active(self) -> bool:
        return self.trains_proxy or self.validations is not None

    @property
    def trains_proxy(self) -> bool:
        """Whether the trials train something other than the target (validations alone change only how often a
        trial is scored: without a plateau schedule, which they refuse, the training is the target's)."""
        return any(v is not None for v in (self.tan_batch, self.data_fraction, self.image_size, self.epochs))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def describe(self) -> str:
        parts = []
        if self.tan_batch is not None:
            parts.append(f"TAN batch {self.tan_batch} (noise scaled by batch / target batch, the target's steps)")
        if self.data_fraction is not None:
            parts.append(f"{self.data_fraction:g} of the training records")
        if self.image_size is not None:
            parts.append(f"{self.image_size} px")
        if self.epochs is not None:
            parts.append(f"{self.epochs} epochs")
        if self.validations is not None:
            parts.append(f"{self.validations} validation release{'s' if self.validations > 1 else ''} per trial")
        return ", ".join(parts) or "the target fidelity"


def parse_fidelity(table: dict, *, fail: Callable[[str, str], Exception], public: bool, train: TrainConfig,
                   searched: set[str], pruner: str, schedules: set[str]) -> Fidelity:
    """The [fidelity] table, its keys and types already checked against FIDELITY_KEYS by the study file:
    `fail(key, message)` makes the study file's error; `searched` names the searched axes, `schedules` the
    learning-rate schedules a trial can take."""
    fidelity = Fidelity(**{k: float(v) if k == "data_fraction" else v for k, v in table.items()})
    if fidelity.private_data_ok is True:
        raise fail("fidelity.private_data_ok", "only `false` is accepted: it acknowledges that TAN-scaled trials "
                                               "on private data are not differentially private; leave it out "
                                               "otherwise")
    b = fidelity.tan_batch
    if b is not None:
        if "batch_size" in searched:
            raise fail("fidelity.tan_batch", "TAN holds the target's batch B and steps fixed and scales the noise "
                                             "by b / B: do not search batch_size as well")
        if not 1 <= b < train.batch_size:
            raise fail("fidelity.tan_batch", f"must be an integer from 1 to below the target batch [train] "
                                             f"batch_size = {train.batch_size}, got {b}")
        if not public and fidelity.private_data_ok is not False:
            raise fail("fidelity.tan_batch", "TAN-scaled trials train with less noise than the target, so they are "
                                             "not private at the target epsilon: use data marked public "
                                             "([data] public = true, e.g. a public proxy of the private data), or "
                                             "acknowledge that this study's results are not DP with "
                                             "[fidelity] private_data_ok = false")
    elif fidelity.private_data_ok is not None:
        raise fail("fidelity.private_data_ok", "only for tan_batch (the one proxy whose trials are not DP)")
    f = fidelity.data_fraction
    if f is not None and not (0 < f < 1):
        raise fail("fidelity.data_fraction", f"must be in (0, 1) (the share of training records the search "
                                             f"trains on), got {f:g}")
    if fidelity.image_size is not None and fidelity.image_size < 1:
        raise fail("fidelity.image_size", f"must be >= 1 (pixels), got {fidelity.image_size}")
    if fidelity.epochs is not None:
        if fidelity.epochs < 1:
            raise fail("fidelity.epochs", f"must be >= 1, got {fidelity.epochs}")
        if "epochs" in searched:
            raise fail("fidelity.epochs", "the search's epochs are fixed here: do not search epochs as well")
    k = fidelity.validations
    if k is not None:
        _check_validations(k, fail=fail, epochs=fidelity.epochs or train.epochs, searched=searched, pruner=pruner,
                           schedules=schedules)
    return fidelity


def _check_validations(k: int, *, fail, epochs: int, searched: set[str], pruner: str, schedules: set[str]) -> None:
    if "epochs" in searched:
        raise fail("fidelity.validations", "the validations are spread over a fixed number of epochs: do not "
                                           "search epochs as well (set [fidelity] epochs instead)")
    if not 1 <= k <= epochs:
        raise fail("fidelity.validations", f"must be from 1 to the search's {epochs} epochs (one release per "
                                           f"epoch at most), got {k}")
    if "plateau" in schedules and k < epochs:
        raise fail("fidelity.validations", "the plateau schedule reads a validation score every epoch: use "
                                           "another [train] schedule (and do not search plateau), or leave "
                                           "validations out")
    if k == 1 and pruner != "none":
        raise fail("fidelity.validations", f"with one validation, at the end, the {pruner} pruner has no "
                                           f"intermediate score to stop a trial on: set [study] pruner = \"none\" "
                                           f"or validations >= 2")


def search_image_size(spec) -> int | None:
    return spec.fidelity.image_size or spec.image_size


def load_search_data(spec, *, progress: bool = False) -> DatasetSplits:
    """The data every trial of the study trains and is scored on: at the search's resolution, and the seeded
    training subset of a data_fraction."""
    data = load_dataset(spec.dataset, data_dir=spec.data_dir, val_fraction=spec.val_fraction, seed=spec.train.seed,
                        image_size=search_image_size(spec), synthetic_size=spec.synthetic_size, progress=progress)
    return subset_training(data, spec.fidelity.data_fraction, seed=spec.train.seed)


def subset_training(data: DatasetSplits, fraction: float | None, *, seed: int) -> DatasetSplits:
    """Keep each training record with probability `fraction`, by a hash of its own index (so whether a record
    is kept depends on nothing else: the records left out are untouched by the search). Validation and test
    records stay as they are: every trial is still scored on the whole validation split."""
    if fraction is None:
        return data
    kept, _ = hash_split(data.train_ids, 1 - fraction, key=f"fraction:{seed}")
    if len(kept) == 0:
        raise DataError(f"[fidelity] data_fraction {fraction:g} kept none of the {len(data.train)} training records; "
                        "use a larger fraction")
    return dataclasses.replace(data, train=data.train.subset(kept), train_ids=data.train_ids[kept],
                               full_train_size=len(data.train))


@dataclass(frozen=True)
class TrialFidelity:
    """One trial's configs at the search's fidelity, and what it stands for."""

    train: TrainConfig
    privacy: PrivacyConfig
    steps: int | None
    """The TAN run's fixed step count (None: epochs x passes, as usual)."""
    validations: int | None
    """The run's validation releases (None: one per epoch)."""
    record: dict[str, Any]
    """What the trial records about its fidelity (the target's batch, noise and steps for TAN)."""


def trial_fidelity(spec, train_cfg: TrainConfig, privacy: PrivacyConfig, *, train_size: int,
                   full_train_size: int | None = None) -> TrialFidelity:
    """The trial's configs at the search's fidelity. `privacy` is the trial's own (calibrated for a total-ε study);
    `train_cfg` carries the search's epochs already (:func:`search_train`)."""
    fidelity = spec.fidelity
    record: dict[str, Any] = fidelity.to_dict()
    if fidelity.data_fraction is not None:
        record.update(subset_records=train_size, train_records=full_train_size)
    k = fidelity.validations
    if fidelity.tan_batch is None:
        return TrialFidelity(train_cfg, privacy, None, k, record)
    # The target run: batch B, its steps S and noise σ0 on this data; the simulation keeps S and σ/B (and the
    # target's validation noise, for the search's releases).
    target = plan_privacy(privacy, dataset_size=train_size, batch_size=train_cfg.batch_size, epochs=train_cfg.epochs,
                          releases=k)
    b = fidelity.tan_batch
    sigma = target.noise_multiplier * b / train_cfg.batch_size
    tan_train = train_cfg.replace(batch_size=b, physical_batch_size=min(train_cfg.physical_batch_size, b))
    tan_privacy = privacy
    simulated = math.inf
    if privacy.private:
        simulated = run_epsilon(privacy.accountant, sigma, b / train_size, target.steps, privacy.delta)
        # The run's real ε is its ceiling: it is what the accounting charges (and says), not the target's.
        ceiling = simulated * (1 + 1e-6) if math.isfinite(simulated) else sys.float_info.max
        tan_privacy = privacy.replace(noise_multiplier=sigma, epsilon=ceiling, val_noise=target.val_noise)
    record.update(target_batch_size=train_cfg.batch_size, target_noise_multiplier=target.noise_multiplier,
                  target_steps=target.steps, target_epsilon=privacy.epsilon if privacy.private else math.inf,
                  noise_multiplier=sigma, simulated_epsilon=simulated)
    return TrialFidelity(tan_train, tan_privacy, target.steps, k, record)


def check_target(spec, train_cfg: TrainConfig, privacy: PrivacyConfig, *, train_size: int) -> None:
    """Refuse (ConfigError) a point whose exported recipe, the target, `dpnas train` could not train: a fixed
    noise multiplier that meets epsilon over the search's fewer epochs but not over the target's (`train_cfg`,
    `privacy`: the point at the target fidelity; `train_size`: all the training records). A noise derived for
    the budget (noise_multiplier = 0, as in a total-epsilon study's target) always meets it."""
    if not spec.fidelity.trains_proxy or not privacy.private or privacy.noise_multiplier <= 0:
        return
    try:
        plan_privacy(privacy, dataset_size=train_size, batch_size=train_cfg.batch_size, epochs=train_cfg.epochs)
    except ConfigError as err:
        raise ConfigError(f"the recipe `dpnas best` exports (the target fidelity: {train_cfg.epochs} epochs on "
                          f"{train_size} training records) could not be trained: {err}") from None


def search_train(spec, train_cfg: TrainConfig) -> TrainConfig:
    """A point's training config at the search's epochs."""
    return train_cfg.replace(epochs=spec.fidelity.epochs) if spec.fidelity.epochs is not None else train_cfg


def search_trial(spec, train_cfg: TrainConfig, privacy: PrivacyConfig, *, calibration: Any, train_size: int,
                 full_train_size: int | None = None) -> TrialFidelity:
    """A sampled point's configs (at the target fidelity) as its trial trains them: at the search's epochs, with
    a total-ε study's calibrated noise (`calibration`, None for a per-run ε), then the proxy's scaling."""
    train_cfg = search_train(spec, train_cfg)
    if calibration is not None:
        privacy = calibration.privacy_for(privacy, train_cfg)
    if not spec.fidelity.active:
        return TrialFidelity(train_cfg, privacy, None, None, {})
    return trial_fidelity(spec, train_cfg, privacy, train_size=train_size, full_train_size=full_train_size)


def exported_privacy(spec, train_cfg: TrainConfig, privacy: PrivacyConfig, *, calibration: Any) -> PrivacyConfig:
    """The privacy of the point at the target fidelity (what `dpnas best` exports for a proxy trial), from the
    point's own `privacy` (the study file's, searched fields set) and `train_cfg` (at the target's epochs).

    A per-run study's is the point's own. A total-ε study's file holds the whole total as its epsilon, a placeholder
    never trained at: exported as it was, the recipe's run alone spent the whole total again on the records the
    search had spent it on. Its target is the point at the per-run ε its trial was given (its shape's at the search's
    epochs, before any TAN scaling, as the trial's recorded target_epsilon), the noise derived afresh for the
    target's epochs and records; another budget (the whole total for a final model, say) is `dpnas train --epsilon`.
    """
    if calibration is None or not privacy.private:
        return privacy
    return privacy.replace(epsilon=calibration.privacy_for(privacy, search_train(spec, train_cfg)).epsilon)

"""A study at a total ε: the noise of every run, derived so that the whole search costs at most E.

``[privacy] total_epsilon = E`` (with ``delta``) asks for one guarantee covering everything the search releases:
every trial's training (DP-SGD), every noisy validation score (each epoch's, which the sampler, the pruner, the
dashboard and the choice of the best read), and the best trial's model, recipe and score. dpnas derives:

* each run's noise multiplier σ, per run shape (batch size, epochs: what fixes its sample rate and steps), so
  that the training records' bound is at most E;
* the std s of the Gaussian noise on each validation count, so that the validation records' bound is at most E.

Training and validation records are disjoint parts assigned record by record (:func:`dpnas.data.datasets.hash_split`),
so by parallel composition each part may use the whole E and the dataset is covered at E.

The bound is the study's own accounting (:func:`dpnas.search.privacy.part_curve`):

* ``fixed`` (K = the study's trial budget, any sampler, pruners included): K runs composed, each charged the
  pointwise maximum of its shapes' curves, so the bound holds whichever shapes the sampler picks;
* ``poisson`` / ``truncated_negative_binomial`` (random search): Papernot & Steinke's bound for the best of a
  random number of runs, with the same maximum curve.

σ is found to within 0.2 % (by interpolating log σ against log ε, safeguarded by bisection), so the bound lands
within about 1 % below E.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from dpnas.arch.space import ConfigError
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.privacy import count_rdp, rdp_to_epsilon, remember_step_rdp, step_rdp_curves
from dpnas.search.forked import ForkedCall
from dpnas.search.privacy import RunPrivacy, part_curve, rdp_curve

# A study may search batch_size and epochs; each combination is a run shape with its own σ.
MAX_SHAPES = 64
_SIGMA_TOLERANCE = 1.002


def shape_key(batch_size: int, epochs: int) -> str:
    return f"batch_size={batch_size},epochs={epochs}"


@dataclass(frozen=True)
class Calibration:
    """What a total-ε study derived from its budget before any trial touched the data."""

    total_epsilon: float
    delta: float
    mode: str
    runs: int | None
    """K for a fixed number of runs; None when K is drawn at random (its distribution is below)."""
    mu: float | None
    eta: float | None
    gamma: float | None
    train_size: int
    noise_multipliers: dict[str, float]
    """shape_key(batch_size, epochs) -> σ."""
    run_epsilon: dict[str, float]
    """shape_key -> one run's training ε at δ: the ceiling each run is checked against."""
    val_noise: float
    """Std of the noise on each validation count; 0 = exact scores (validation records not covered)."""
    val_releases: int
    """Validation releases charged per run (its epochs, or the search's [fidelity] validations)."""
    training_epsilon: float
    validation_epsilon: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)

    def privacy_for(self, privacy: PrivacyConfig, train_cfg: TrainConfig) -> PrivacyConfig:
        """The trial's privacy settings: its shape's σ, that σ's per-run ε as the ceiling, the study's s."""
        key = shape_key(train_cfg.batch_size, train_cfg.epochs)
        if key not in self.noise_multipliers:
            raise ConfigError(f"{key}: not a run shape this study was calibrated for "
                              f"({', '.join(self.noise_multipliers)})")
        return privacy.replace(epsilon=self.run_epsilon[key] * (1 + 1e-6), noise_multiplier=self.noise_multipliers[key],
                               val_noise=self.val_noise, delta=self.delta, accountant="rdp")


def _bound(curve: np.ndarray, *, mode: str, runs: int | None, mu, eta, gamma, delta: float) -> float:
    """ε at δ of the whole search for one part when every run has (at most) this per-run curve."""
    rows = curve[None, :] * (runs if mode == "fixed" else 1)
    return rdp_to_epsilon(part_curve(rows, mode=mode, mu=mu, eta=eta, gamma=gamma), delta)


def _smallest(evaluate, target: float, *, start: float, tolerance: float) -> float:
    """The smallest x, to a factor `tolerance`, with evaluate(x) <= target, for evaluate decreasing in x.

    Returns x with evaluate(x) <= target < evaluate(x / tolerance): the bracket [low, high] keeps
    evaluate(low) > target >= evaluate(high) throughout and closes to a ratio of `tolerance`. Each evaluation here
    is a run's RDP curve, Opacus's per-order series in pure Python (about 0.05 s on 2 CPU cores), so the bracket
    is closed by interpolating log x against log evaluate(x), on which a subsampled Gaussian's ε is nearly a
    straight line (through the last three points, else the bracket's ends): two probes, a factor sqrt(tolerance)
    either side of the estimate, usually close it at once (5 evaluations for the quickstart instead of the 12
    of bisection). A round that does not halve the bracket is followed by a bisection.
    """
    points: list[tuple[float, float]] = []  # (x, evaluate(x)), in the order evaluated

    def at(x: float) -> float:
        points.append((x, evaluate(x)))
        return points[-1][1]

    high, f_high = start, at(start)
    low = f_low = None
    while f_high > target:
        low, f_low = high, f_high
        high *= 2
        if high > 1e6:
            raise ConfigError("no noise level meets this budget")
        f_high = at(high)
    if low is None:
        low, f_low = high / 2, at(high / 2)
        while f_low <= target:
            if low <= 1e-4:
                return low
            high, f_high = low, f_low
            low, f_low = low / 2, at(low / 2)
    bisect = False
    while high / low > tolerance:
        width = math.log(high / low)
        if bisect:
            probes = [math.sqrt(low * high)]
        else:
            estimate = _interpolated(points[-3:], target, (low, f_low), (high, f_high))
            probes = [estimate * math.sqrt(tolerance), estimate / math.sqrt(tolerance)]
        for x in probes:
            if low < x < high:
                value = at(x)
                low, f_low, high, f_high = (x, value, high, f_high) if value > target else (low, f_low, x, value)
        bisect = math.log(high / low) > width / 2
    return high


def _interpolated(points: list[tuple[float, float]], target: float, low: tuple[float, float],
                  high: tuple[float, float]) -> float:
    """Where log x, as a polynomial in log evaluate(x) through `points` (inverse interpolation, as in Brent's
    method), meets log target; with fewer usable points or an estimate outside the bracket, the straight line
    through the bracket's ends `low` and `high` (each (x, evaluate(x))), then its geometric middle (an infinite or
    zero value has no logarithm)."""
    (x0, f0), (x1, f1) = low, high
    usable = [(math.log(x), math.log(f)) for x, f in points if math.isfinite(f) and f > 0]
    u = math.log(target)
    if len(usable) == 3 and len({f for _, f in usable}) == 3:
        log_estimate = sum(v * math.prod((u - f_j) / (f_i - f_j) for j, (_, f_j) in enumerate(usable) if j != i)
                           for i, (v, f_i) in enumerate(usable))
        if math.log(x0) < log_estimate < math.log(x1):
            return math.exp(log_estimate)
    if math.isfinite(f0) and f1 > 0:  # f0 > target >= f1, so the line is not flat
        return x0 * (x1 / x0) ** ((math.log(f0) - u) / (math.log(f0) - math.log(f1)))
    return math.sqrt(x0 * x1)


def calibrate(total_epsilon: float, delta: float, *, mode: str, runs: int | None, mu: float | None = None,
              eta: float | None = None, gamma: float | None = None, shapes: list[tuple[int, int]],
              train_size: int, validation_noise: bool = True, validations: int | None = None) -> Calibration:
    """σ per shape and the validation s so that both parts of the search cost at most `total_epsilon`.

    A pure function of its arguments, remembered per process: the study checks, the first worker and every
    forked worker ask for the same calibration, which takes seconds (12 s for the quickstart on a loaded 2-core
    CPU, benchmarks/trial_overhead.py) and was computed twice per search before.
    """
    key = _calibration_key(total_epsilon, delta, mode, runs, mu, eta, gamma, shapes, train_size, validation_noise,
                           validations)
    if key not in _CALIBRATIONS:
        _CALIBRATIONS[key] = _calibrate(*key)
    return copy.deepcopy(_CALIBRATIONS[key])


# calibrate()'s answers in this process (and, through fork, in its workers), by their arguments
_CALIBRATIONS: dict[tuple, Calibration] = {}


def clear_cache() -> None:
    """Forget the remembered calibrations (benchmarks time them from scratch)."""
    _CALIBRATIONS.clear()


def _calibration_key(total_epsilon, delta, mode, runs, mu, eta, gamma, shapes, train_size, validation_noise,
                     validations) -> tuple:
    return (float(total_epsilon), float(delta), mode, runs, mu, eta, gamma, tuple((int(b), int(e)) for b, e in shapes),
            int(train_size), bool(validation_noise), None if validations is None else int(validations))


def _calibrate(total_epsilon: float, delta: float, mode: str, runs: int | None, mu: float | None,
               eta: float | None, gamma: float | None, shapes: tuple[tuple[int, int], ...], train_size: int,
               validation_noise: bool, validations: int | None) -> Calibration:
    if not (0 < total_epsilon < math.inf):
        raise ConfigError(f"total_epsilon: must be a positive finite number, got {total_epsilon!r}")
    if mode == "fixed" and not (runs and runs >= 1):
        raise ConfigError("total_epsilon with a fixed number of trials needs n_trials >= 1")
    for batch_size, _ in shapes:
        # The same rule as plan_privacy, which trains the run: q = B / n = 1 is Poisson sampling that takes every
        # record (the plain Gaussian mechanism, which Opacus's accountants account for); only q > 1 is no rate.
        if batch_size > train_size:
            raise ConfigError(f"batch_size: {batch_size} is larger than the {train_size} training samples; "
                              "Poisson sampling needs a sample rate of at most 1")
    bound = dict(mode=mode, runs=runs, mu=mu, eta=eta, gamma=gamma, delta=delta)

    def curve(batch_size: int, epochs: int, sigma: float) -> np.ndarray:
        q = batch_size / train_size
        return rdp_curve(RunPrivacy(sigma, q, epochs * max(1, round(1 / q))))

    # Each shape alone gets the largest curve that meets the target; several shapes share the bound through
    # their pointwise maximum, so lower the target until that maximum meets E too.
    target, sigmas = total_epsilon, {}
    for _ in range(12):
        # a later round lowers the target a little: each shape's last σ is where its search starts
        sigmas = {s: _smallest(lambda sigma, s=s: _bound(curve(*s, sigma), **bound), target,
                               start=sigmas.get(s, 1.0), tolerance=_SIGMA_TOLERANCE) for s in shapes}
        worst = np.max([curve(*s, sigmas[s]) for s in shapes], axis=0)
        training_epsilon = _bound(worst, **bound)
        if training_epsilon <= total_epsilon:
            break
        target *= (total_epsilon / training_epsilon) * (1 - 1e-3)
    else:  # pragma: no cover - the maximum of calibrated curves converges in a few rounds
        raise ConfigError("total_epsilon: the run shapes could not be calibrated together; search fewer "
                          "batch sizes or epoch counts")

    # one release per epoch, or the search's `validations` (at most one per epoch)
    releases = max(epochs if validations is None else min(validations, epochs) for _, epochs in shapes)
    notes = []
    if validation_noise:
        val_noise = _smallest(lambda s: _bound(count_rdp(s, releases), **bound), total_epsilon, start=1.0,
                              tolerance=1.001)
    else:
        val_noise = 0.0
        notes.append("val_noise = 0: validation scores are exact, so the validation records are not protected")
    validation_epsilon = _bound(count_rdp(val_noise, releases), **bound)
    run_epsilon = {shape_key(*s): rdp_to_epsilon(curve(*s, sigmas[s]), delta) for s in shapes}
    return Calibration(
        total_epsilon=float(total_epsilon), delta=float(delta), mode=mode, runs=runs if mode == "fixed" else None,
        mu=mu, eta=eta, gamma=gamma, train_size=int(train_size),
        noise_multipliers={shape_key(*s): float(sigmas[s]) for s in shapes}, run_epsilon=run_epsilon,
        val_noise=float(val_noise), val_releases=int(releases), training_epsilon=float(training_epsilon),
        validation_epsilon=float(validation_epsilon), notes=notes)


def _calibrate_with_curves(arguments: dict) -> tuple[Calibration, dict]:
    """:func:`calibrate`'s computation for `arguments`, and the one-step RDP curves of the σ it chose: every trial's
    accounting checks its run's ε on them, and the child that computed them hands them back (0.04-0.1 s on 2 cores
    that the first trial would spend computing them again)."""
    calibrated = _calibrate(*_calibration_key(**arguments))
    runs = [(calibrated.noise_multipliers[shape_key(b, e)], b / calibrated.train_size) for b, e in arguments["shapes"]]
    return calibrated, step_rdp_curves(runs)


def calibrate_study(spec, *, runs: int | None, train_size: int) -> Calibration:
    """A total-ε study's calibration (`runs`: its K for a fixed number of trials) on a training split this size."""
    return calibrate(**_study_arguments(spec, runs, train_size))


def start_study_calibration(spec, *, runs: int | None, train_size: int) -> PendingCalibration:
    """Begin :func:`calibrate_study` in a forked child process (:class:`dpnas.search.forked.ForkedCall`) unless it
    is already remembered. Until :meth:`PendingCalibration.result` this process can do other work that holds the
    GIL (a search imports ``torch._dynamo`` meanwhile); errors (a ConfigError for a budget no noise meets) are
    raised by the result."""
    return PendingCalibration(_study_arguments(spec, runs, train_size))


class PendingCalibration:
    """A calibration being computed in a forked child; :meth:`result` waits for it and remembers it here, exactly
    as :func:`calibrate` would have."""

    def __init__(self, arguments: dict) -> None:
        self._arguments = arguments
        self._key = _calibration_key(**arguments)
        self._call = None if self._key in _CALIBRATIONS else ForkedCall(_calibrate_with_curves, arguments)

    def result(self) -> Calibration:
        if self._call is not None:
            calibrated, curves = self._call.result()
            _CALIBRATIONS[self._key] = calibrated
            remember_step_rdp(curves)
            self._call = None
        return calibrate(**self._arguments)

    def cancel(self) -> None:
        """Nothing more is wanted (the caller was interrupted): end the child."""
        if self._call is not None:
            self._call.cancel()
            self._call = None


def _study_arguments(spec, runs: int | None, train_size: int) -> dict:
    return dict(total_epsilon=spec.total_epsilon, delta=spec.privacy.delta, mode=spec.trial_count, runs=runs,
                mu=spec.mean_trials, eta=spec.eta, gamma=spec.gamma, shapes=run_shapes(spec), train_size=train_size,
                validation_noise=spec.privacy.val_noise != 0, validations=spec.fidelity.validations)


def run_shapes(spec) -> list[tuple[int, int]]:
    """Every (batch_size, epochs) a trial of the study can take: the base values, or the searched ones."""
    # a search at fewer epochs ([fidelity] epochs, never searched then) runs at those
    values = {"batch_size": [spec.train.batch_size], "epochs": [spec.fidelity.epochs or spec.train.epochs]}
    for axis in spec.axes:
        if axis.name not in values:
            continue
        base = values[axis.name]
        if axis.categorical or axis.step is not None:
            values[axis.name] = sorted(set(axis.grid_values()))
        else:
            values[axis.name] = list(range(int(axis.low), int(axis.high) + 1))
        if spec.sampler == "ablation":  # the base point trains at the base value, on the range's grid or not
            values[axis.name] = sorted(set(values[axis.name]) | set(base))
    shapes = [(b, e) for b in values["batch_size"] for e in values["epochs"]]
    if len(shapes) > MAX_SHAPES:
        raise ConfigError(f"total_epsilon: the study searches {len(shapes)} (batch_size, epochs) combinations; "
                          f"each needs its own noise calibration, and at most {MAX_SHAPES} are supported: give "
                          "those axes a list of choices or a step")
    return shapes

"""The privacy side of DP-SGD: budget checks, noise calibration, accounting, Poisson sampling.

The guarantee holds only for Poisson sampling with the sample rate the accountant is told,
per-sample clipping, and Gaussian noise of std sigma * C on the clipped sum; every function
here keeps to exactly that.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from dpnas.arch.space import ConfigError
from dpnas.dp.config import PrivacyConfig

# Opacus's RDP orders stop at 63. Short or low-noise runs attain their bound at larger orders, and the
# search's random-K bounds (dpnas.search.privacy) favour larger orders still, so both use this wider grid.
EXTRA_ORDERS = (64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
ORDERS = np.array(sorted(set(float(a) for a in RDPAccountant.DEFAULT_ALPHAS) | set(map(float, EXTRA_ORDERS))))
"""The RDP orders λ at which every run and every search is accounted."""


@dataclass(frozen=True)
class PrivacyPlan:
    """What a training run will spend: the sampling, the steps, and the calibrated noise."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    """0 for non-private training."""
    expected_batch_size: float
    dataset_size: int
    val_noise: float = 0.0
    """Std of the Gaussian noise on each validation score's correct count; 0 = exact scores."""
    val_releases: int = 0
    """How many validation scores the run may release (one per epoch, or `releases` of them): each is charged,
    finished or not."""
    epoch_steps: int = 0
    """Steps of one period (an epoch: the scheduler's unit, and where a validation may be released); 0: one pass
    over the data, round(1 / q)."""
    periods: int = 0
    """Periods the run trains for (its epochs); 0: as many as val_releases."""

    def validated_periods(self) -> frozenset[int]:
        """The periods (1-based) after which the run releases a validation score: `val_releases` of them evenly
        spaced, the last at the end of training."""
        return validation_periods(self.periods or self.val_releases, self.val_releases)


def validation_periods(periods: int, releases: int) -> frozenset[int]:
    """`releases` of `periods` periods (1-based), evenly spaced and ending with the last: ceil(j P / k)."""
    return frozenset(math.ceil(j * periods / releases) for j in range(1, releases + 1)) if releases else frozenset()


def check_budget(privacy: PrivacyConfig, *, dataset_size: int) -> None:
    """Refuse a δ that would not protect anyone; warn where it is weaker than usual."""
    if not privacy.private:
        return
    if privacy.delta >= 1 / dataset_size:
        raise ConfigError(
            f"delta: {privacy.delta:g} >= 1/n = {1 / dataset_size:.3g} for n = {dataset_size} training samples; "
            "such a delta allows releasing a whole record. Use delta < 1/n (1/(10 n) or less is customary)"
        )
    if privacy.delta > 1 / (10 * dataset_size):
        warnings.warn(
            f"delta = {privacy.delta:g} is above 1/(10 n) = {1 / (10 * dataset_size):.3g} "
            f"for n = {dataset_size}; a smaller delta is customary",
            stacklevel=2,
        )


def plan_privacy(
    privacy: PrivacyConfig, *, dataset_size: int, batch_size: int, epochs: int, steps: int | None = None,
    releases: int | None = None,
) -> PrivacyPlan:
    """Sample rate q = B / n, steps = epochs x round(1 / q), and the smallest noise that meets (ε, δ).

    `steps` fixes the step count instead (a TAN simulation keeps its target's, dpnas.search.fidelity); its periods
    are then ceil(steps / epochs) steps long, `epochs` of them at most. The run releases one validation score per
    period, or `releases` of them (a search's ``[fidelity] validations``, at most one per period), and an "auto"
    validation noise is calibrated for that many.
    """
    if dataset_size < 1:
        raise ConfigError("the training split is empty; use a smaller val_fraction or more data")
    if batch_size > dataset_size:
        raise ConfigError(
            f"batch_size: {batch_size} is larger than the {dataset_size} training samples; "
            "Poisson sampling needs a sample rate of at most 1"
        )
    check_budget(privacy, dataset_size=dataset_size)
    sample_rate = batch_size / dataset_size
    if steps is None:
        epoch_steps = max(1, round(1 / sample_rate))
        steps, periods = epochs * epoch_steps, epochs
    else:
        if steps < 1:
            raise ConfigError(f"steps: must be >= 1, got {steps}")
        epoch_steps = math.ceil(steps / epochs)
        periods = math.ceil(steps / epoch_steps)
    if releases is None:
        releases = periods
    elif not 1 <= releases <= periods:
        raise ConfigError(f"validations: must be from 1 to the run's {periods} epochs, got {releases}")
    noise_multiplier = 0.0
    if privacy.private and privacy.noise_multiplier > 0:
        noise_multiplier = privacy.noise_multiplier
        spent = run_epsilon(privacy.accountant, noise_multiplier, sample_rate, steps, privacy.delta)
        if spent > privacy.epsilon * (1 + 1e-9):
            raise ConfigError(f"noise_multiplier: {noise_multiplier:g} over {steps} steps at sample rate "
                              f"{sample_rate:.3g} spends epsilon {spent:.4g} > epsilon = {privacy.epsilon:g}; "
                              "noise_multiplier = 0 derives the noise for the budget instead")
    elif privacy.private:
        noise_multiplier = _calibrate(privacy, sample_rate=sample_rate, steps=steps)
    return PrivacyPlan(
        sample_rate=sample_rate,
        steps=steps,
        noise_multiplier=noise_multiplier,
        expected_batch_size=sample_rate * dataset_size,
        dataset_size=dataset_size,
        val_noise=validation_noise(privacy, releases=releases),
        val_releases=releases,
        epoch_steps=epoch_steps,
        periods=periods,
    )


# --------------------------------------------------------------- validation scores: the Gaussian mechanism on a count
#
# Neighbouring datasets differ by adding or removing one record (Opacus's relation). A record in the validation part
# changes a correct-prediction count by at most 1, so releasing count + N(0, s^2) is (λ, λ / (2 s^2))-RDP at every
# order λ, and r such releases on the same records compose to r λ / (2 s^2) (Mironov 2017, Prop. 7 and Prop. 1).


def count_rdp(noise: float, releases: int, orders=None) -> np.ndarray:
    """RDP curve of `releases` Gaussian releases (std `noise`) of a sensitivity-1 count: inf if noise is 0."""
    orders = ORDERS if orders is None else np.asarray(orders, dtype=float)
    if releases == 0:
        return np.zeros_like(orders)
    if noise == 0:
        return np.full_like(orders, np.inf)
    return releases * orders / (2 * noise**2)


def rdp_to_epsilon_at(rdp, delta: float, orders=None) -> tuple[float, float]:
    """An RDP curve at :data:`ORDERS` → (ε at δ, the order λ attaining it) with Opacus's conversion (Balle et al.
    2020, Thm 21): ε 0 for a zero curve, inf if all infinite (λ nan for both)."""
    orders = ORDERS if orders is None else np.asarray(orders, dtype=float)
    rdp = np.asarray(rdp, dtype=float)
    if np.all(rdp == 0):
        return 0.0, math.nan
    if not np.isfinite(rdp).any():
        return math.inf, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the optimum at the end of the grid: valid, and the grid reaches 512
        eps, order = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return max(0.0, float(eps)), float(order)


def rdp_to_epsilon(rdp, delta: float, orders=None) -> float:
    """ε at δ of an RDP curve (see :func:`rdp_to_epsilon_at`)."""
    return rdp_to_epsilon_at(rdp, delta, orders)[0]


def validation_epsilon(noise: float, releases: int, delta: float) -> float:
    """ε at δ of `releases` noisy validation counts of std `noise` (0 without releases, inf for exact scores)."""
    return rdp_to_epsilon(count_rdp(noise, releases), delta)


def count_noise_for(epsilon: float, delta: float, releases: int) -> float:
    """The smallest std s (to 0.1 %) at which `releases` noisy counts cost at most `epsilon` at `delta`."""
    if releases == 0:
        return 0.0
    low, high = 1e-3, 1.0
    while rdp_to_epsilon(count_rdp(high, releases), delta) > epsilon:
        low, high = high, high * 2
    while high / low > 1.001:  # ε falls as s grows: keep ε(high) <= epsilon
        mid = math.sqrt(low * high)
        low, high = (mid, high) if rdp_to_epsilon(count_rdp(mid, releases), delta) > epsilon else (low, mid)
    return high


def validation_noise(privacy: PrivacyConfig, *, releases: int) -> float:
    """The count noise a run uses: the configured number, or "auto" (see PrivacyConfig.val_noise)."""
    if privacy.val_noise != "auto":
        return float(privacy.val_noise)
    return count_noise_for(privacy.epsilon, privacy.delta, releases) if privacy.private else 0.0


def noisy_accuracy(correct: torch.Tensor, total: int, noise: float, *, generator: torch.Generator) -> float:
    """Release a correct-prediction count through the Gaussian mechanism, as an accuracy clipped to [0, 1]
    (clipping is post-processing). With noise 0 the exact accuracy comes back."""
    if total == 0:
        return math.nan
    z = torch.randn((), generator=generator, device=generator.device, dtype=torch.float64) if noise else 0.0
    return min(1.0, max(0.0, float(correct.double() + noise * z) / total))


def _calibrate(privacy: PrivacyConfig, *, sample_rate: float, steps: int) -> float:
    try:
        return _noise_multiplier(privacy.epsilon, privacy.delta, privacy.accountant, sample_rate, steps)
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise ConfigError(
            f"epsilon: no noise level reaches epsilon={privacy.epsilon:g} at delta={privacy.delta:g} "
            f"with sample rate {sample_rate:.3g} over {steps} steps ({err}); raise epsilon or train for fewer steps"
        ) from err


# The calibration and the epsilon of a history are pure functions of their arguments and take seconds
# (a binary search over the accountant); the trials of a search all ask the same questions, so one
# answer per worker process is enough.  Cached values are the exact values, not approximations.
@functools.lru_cache(maxsize=256)
def _noise_multiplier(epsilon: float, delta: float, accountant: str, sample_rate: float, steps: int) -> float:
    with _prv_full_batch(accountant):
        return get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            # the binary search stops within this distance below the target: keep it under 0.5 %
            epsilon_tolerance=min(0.01, 0.005 * epsilon),
            **_accountant_options(accountant),
        )


@contextlib.contextmanager
def _prv_full_batch(accountant: str = "prv"):
    """Opacus's PRV density compares against log(1 - q), which is -inf at q = 1 (a batch of the whole split): the
    comparison is then right (every t is above it), but NumPy would print "divide by zero encountered in log".

    Opacus's PRV accountant also sizes its numerical domain with an RDP bound at its default orders, which warns
    "Optimal order is the largest alpha. Please consider expanding the range of alphas" for small noise (a
    calibration's low trials, `--set accountant=prv` on digits): a looser domain bound, not a looser epsilon, and
    nothing a user can act on. The RDP accountant's own warning (`accountant`: "rdp") is left as it is."""
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        if accountant == "prv":
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha",
                                    module="opacus.accountants.analysis.rdp")
        yield


# (σ, q) -> Opacus's one-step RDP curve at ORDERS, read-only (shared by every caller)
_STEP_RDP: dict[tuple[float, float], np.ndarray] = {}
_STEP_RDP_LIMIT = 4096  # curves of 60 floats: a bound on a long process's memory, far above a search's needs


def _step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    key = (noise_multiplier, sample_rate)
    curve = _STEP_RDP.get(key)
    if curve is None:
        curve = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                       orders=_accountant_options("rdp")["alphas"]), dtype=float)
        curve.setflags(write=False)
        if len(_STEP_RDP) >= _STEP_RDP_LIMIT:
            _STEP_RDP.clear()
        _STEP_RDP[key] = curve
    return curve


def step_rdp_curves(runs) -> dict[tuple[float, float], np.ndarray]:
    """The one-step curves of `runs` ((σ, q) pairs) as this process remembers them (computing any it lacks): what
    :func:`remember_step_rdp` takes in another process."""
    return {(float(sigma), float(q)): _step_rdp(float(sigma), float(q)) for sigma, q in runs}


def remember_step_rdp(curves: dict[tuple[float, float], np.ndarray]) -> None:
    """Take one-step curves computed by :func:`step_rdp_curves` elsewhere (a forked child of this process: the same
    code on the same numbers, so the same bits), so that this process does not compute them again."""
    for (sigma, q), curve in curves.items():
        if (float(sigma), float(q)) not in _STEP_RDP:
            kept = np.array(curve, dtype=float)
            kept.setflags(write=False)
            _STEP_RDP[(float(sigma), float(q))] = kept


def forget_step_rdp() -> None:
    """Forget the remembered one-step curves (benchmarks time them from scratch)."""
    _STEP_RDP.clear()


def subsampled_gaussian_rdp(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    """RDP at :data:`ORDERS` of `steps` Poisson-subsampled Gaussian steps: exactly Opacus's ``compute_rdp``.

    Opacus computes the one-step curve and multiplies it by the steps (RDP composes additively), so the one-step
    curve is remembered per (σ, q) and multiplied here: the same floating-point operations, hence the same bits,
    without re-running its per-order series (a third of a second per curve) for every epoch of every trial.
    """
    return _step_rdp(float(noise_multiplier), float(sample_rate)) * steps


@functools.lru_cache(maxsize=4096)
def _epsilon_of_history(mechanism: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if mechanism == "rdp":  # Opacus's RDPAccountant.get_privacy_spent, on the remembered one-step curves
        rdp = sum([subsampled_gaussian_rdp(sigma, q, steps) for sigma, q, steps in history])
        return float(get_privacy_spent(orders=_accountant_options("rdp")["alphas"], rdp=rdp, delta=delta)[0])
    accountant = create_accountant(mechanism)
    accountant.history = list(history)
    with _prv_full_batch():
        return float(accountant.get_epsilon(delta=delta, **_accountant_options(mechanism)))


def make_accountant(privacy: PrivacyConfig) -> IAccountant:
    return create_accountant(privacy.accountant)


def _accountant_options(mechanism: str) -> dict:
    if mechanism == "rdp":
        return {"alphas": [float(a) for a in ORDERS]}
    return {}


def epsilon_spent(accountant: IAccountant, delta: float) -> float:
    """ε spent so far at `delta` (0 before any step; inf for non-private runs, which record no steps)."""
    if not accountant.history:
        return 0.0
    history = tuple((float(sigma), float(q), int(steps)) for sigma, q, steps in accountant.history)
    return _epsilon_of_history(accountant.mechanism(), history, delta)


def poisson_sample(
    dataset_size: int, sample_rate: float, *, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """Indices of one Poisson-sampled batch: every sample joins independently with probability q.

    Drawn on the device as one vectorised mask, so the batch never crosses to the host.
    The batch size varies (Binomial(n, q)) and may be 0; the caller must still take a
    (noise-only) step then, since skipping it would reveal the empty batch.
    """
    uniforms = torch.rand(dataset_size, generator=generator, device=device, dtype=torch.float64)
    mask = uniforms < join_probability(sample_rate)
    return mask.nonzero().squeeze(1)


def join_probability(sample_rate: float) -> float:
    """The exact probability with which :func:`poisson_sample` lets each record join: `sample_rate` rounded down to
    a multiple of 2⁻⁵³, never above the rate the accountant is told (a subsampled Gaussian's RDP grows with it).

    torch draws float64 uniforms as k·2⁻⁵³ on the CPU and (k + ½)·2⁻⁵³ on CUDA, k uniform below 2⁵³; either is below
    m·2⁻⁵³ with probability exactly m·2⁻⁵³. Float32 uniforms (steps of 2⁻²⁴) compared with q rounded to float32
    sampled records up to 2⁻²⁴ more often than q: 7.6e-6 too often, relatively, at CIFAR-10's 256 / 40,000.
    """
    return math.floor(sample_rate * 2.0**53) / 2.0**53


def steps_per_epoch(plan: PrivacyPlan) -> int:
    """Steps between validation releases: the plan's, else one pass over the data."""
    return plan.epoch_steps or max(1, round(1 / plan.sample_rate))


def run_epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at δ of one DP-SGD run of `steps` steps at this noise and sample rate (inf without noise)."""
    if noise_multiplier <= 0:
        return math.inf
    return _epsilon_of_history(accountant, ((float(noise_multiplier), float(sample_rate), int(steps)),), delta)



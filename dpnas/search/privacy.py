"""The privacy cost of a whole architecture search, not just of one trial.

Every trial of a study trains on the private data with DP-SGD, and picking the best
trial looks at all of them, so the study leaks more than any single trial. Three ways
to account for that, in Rényi DP (RDP) throughout:

* ``fixed``: K runs, K chosen in advance (or simply "the runs that happened").
  Composition: the RDP curves add up, ε_K(λ) = Σ_k ε_k(λ). Holds for any search,
  adaptive samplers (TPE, pruners reading other trials) included, and for releasing
  every trial, not only the best.
* ``poisson`` / ``truncated_negative_binomial``: the number of runs K is itself drawn at
  random (and kept secret), the runs are i.i.d. (random search), and only the best run is
  released. Then the cost grows like log E[K] instead of K. This is Papernot & Steinke,
  "Hyperparameter Tuning with Rényi Differential Privacy", ICLR 2022 (arXiv:2110.03620):
  Theorem 2 for the truncated negative binomial family (η = 1 is the geometric
  distribution, η = 0 the logarithmic one) and Theorem 6 for a Poisson number of runs
  (theorem numbers of arXiv v2).

Per-run RDP curves are Opacus's (``compute_rdp`` for the Poisson-subsampled Gaussian) and
the final RDP→(ε, δ) step is Opacus's ``get_privacy_spent``, so a single run reads the
same here as in the training logs.

Orders: Opacus's ``RDPAccountant.DEFAULT_ALPHAS`` (1.1 … 10.9 by 0.1, 12 … 63) extended
with a coarse tail up to 512 (:data:`dpnas.dp.privacy.EXTRA_ORDERS`). The random-K bounds add terms like
log(E[K])/(λ − 1), which favour larger λ than a single run does, and the truncated
negative binomial bound optimises a second order λ̂ that for small per-run RDP lands
well above 63; without the tail the bounds would be needlessly loose.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np

from dpnas.dp.privacy import ORDERS, count_rdp, rdp_to_epsilon_at, subsampled_gaussian_rdp

MODES = ("fixed", "poisson", "truncated_negative_binomial")


# Stop summing a distribution's pmf once the mass left in the tail is below this: drawing
# a k out there has probability < 1e-15, far below anything else in the guarantee.
_TAIL_MASS = 1e-15


@dataclass(frozen=True)
class RunPrivacy:
    """One trial that touched the data: DP-SGD with Poisson sampling on the training part, and noisy validation
    scores (the Gaussian mechanism on the correct count, std ``val_noise``) released ``val_releases`` times."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    val_noise: float = 0.0
    val_releases: int = 0

    def __post_init__(self):
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier: {self.noise_multiplier!r}; must be >= 0 (0 = non-private)")
        if not 0 <= self.sample_rate <= 1:
            raise ValueError(f"sample_rate: {self.sample_rate!r}; must be in [0, 1]")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps: {self.steps!r}; must be a whole number >= 0")
        if not self.val_noise >= 0:
            raise ValueError(f"val_noise: {self.val_noise!r}; must be >= 0 (0 = exact scores)")
        if int(self.val_releases) != self.val_releases or self.val_releases < 0:
            raise ValueError(f"val_releases: {self.val_releases!r}; must be a whole number >= 0")

    @property
    def non_private(self) -> bool:
        return self.noise_multiplier == 0 and self.steps > 0 and self.sample_rate > 0


@dataclass(frozen=True)
class SearchPrivacy:
    """Study-level (ε, δ) for releasing the best trial, with what it covers in plain words."""

    mode: str
    """The accounting actually used: "fixed" | "poisson" | "truncated_negative_binomial"."""
    epsilon: float
    """math.inf if any run was non-private (σ = 0); 0 if no run touched the data."""
    delta: float
    runs: int
    per_run_epsilon: float
    """The largest single-run ε at ``delta``, for comparison."""
    order: float
    """The RDP order λ at which the bound was attained (nan when ε is 0 or inf)."""
    explanation: str

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- curves and conversions


def rdp_curve(run: RunPrivacy) -> np.ndarray:
    """ε(λ) of one DP-SGD run at each of :data:`ORDERS`: inf when non-private, 0 when it saw no data."""
    if run.steps == 0 or run.sample_rate == 0:
        return np.zeros_like(ORDERS)
    if run.noise_multiplier == 0:
        return np.full_like(ORDERS, np.inf)
    return subsampled_gaussian_rdp(run.noise_multiplier, run.sample_rate, int(run.steps))


def validation_curve(run: RunPrivacy, orders=ORDERS) -> np.ndarray:
    """ε(λ) of one run's validation releases for a validation record: r λ / (2 s²); inf if exact, 0 if none."""
    return count_rdp(run.val_noise, run.val_releases, orders)


def part_curve(curves, *, mode: str, mu: float | None = None, eta: float | None = None,
               gamma: float | None = None) -> np.ndarray:
    """The RDP curve of a whole search for the records of one part (training or validation), from the runs'
    per-run curves for that part (one row each): composed (``fixed``) or the best of a random number of runs.

    A part no run released anything about costs 0 (no log E[K] term: nothing about its records left a run);
    a part any run released without noise costs ∞.
    """
    curves = np.asarray(curves, dtype=float).reshape(-1, len(ORDERS))
    if len(curves) == 0 or np.all(curves == 0):
        return np.zeros(len(ORDERS))
    if not np.isfinite(curves).all():
        return np.full(len(ORDERS), np.inf)
    if mode == "fixed":
        return curves.sum(axis=0)
    if mode == "poisson":
        return _poisson_curve(ORDERS, curves, mu=mu)
    if mode == "truncated_negative_binomial":
        return _tnb_curve(ORDERS, curves.max(axis=0), eta=eta, gamma=gamma)[0]
    raise ValueError(f"mode: {mode!r}; must be one of {', '.join(MODES)}")


def _epsilon(orders, rdp, delta: float) -> tuple[float, float]:
    """RDP curve → (ε, λ) at δ with Opacus's conversion; one implementation with dpnas.dp.privacy."""
    return rdp_to_epsilon_at(rdp, delta, orders)


def _delta_at(orders, rdp, eps_hat):
    """δ̂ such that a run with RDP curve ``rdp`` is (ε̂, δ̂)-DP, for each ε̂ in ``eps_hat``.

    The same conversion Opacus uses for ε (Balle et al. 2020, Thm 21; Canonne, Kamath &
    Steinke 2020, Prop. 12), solved for δ instead of ε:
        δ = min_α exp((α − 1)(ε(α) − ε̂)) · (1 − 1/α)^(α−1) / α.
    The extra factor (1 − 1/α)^(α−1)/α ≤ 1, so this is never worse than the textbook
    δ = exp((α − 1)(ε(α) − ε̂)) and is equally valid. For small ε̂ a second bound can be
    better: δ(ε̂) ≤ δ(0) = total variation ≤ sqrt(1 − exp(−KL)) (Bretagnolle–Huber), with
    KL ≤ ε(α) at every α > 1 since Rényi divergences grow with the order. We take the
    smaller of the two, as Google's dp_accounting ``compute_delta`` does.
    """
    a = np.asarray(orders, dtype=float)[None, :]
    r = np.asarray(rdp, dtype=float)[None, :]
    e = np.atleast_1d(np.asarray(eps_hat, dtype=float))[:, None]
    with np.errstate(over="ignore"):
        log_delta = (a - 1) * (r - e) + (a - 1) * np.log1p(-1 / a) - np.log(a)
    conversion = np.exp(np.min(log_delta, axis=1))
    total_variation = math.sqrt(-math.expm1(-float(np.min(rdp))))
    return np.minimum(1.0, np.minimum(conversion, total_variation))


def expected_trials_tnb(eta: float, gamma: float) -> float:
    """E[K] for K ~ truncated negative binomial D_{η,γ} of Papernot & Steinke (2022).

    η(1 − γ) / (γ(1 − γ^η)) for η ≠ 0; (1/γ − 1)/log(1/γ) for η = 0 (logarithmic
    distribution); η = 1 gives the geometric distribution with E[K] = 1/γ.
    """
    _check_tnb(eta, gamma)
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    # 1 − γ^η via expm1 so that small |η| keeps its precision.
    return eta * (1 - gamma) / (gamma * -math.expm1(eta * math.log(gamma)))


def _tnb_curve(orders, rdp, *, eta: float, gamma: float) -> tuple[np.ndarray, float]:
    """Theorem 2 of Papernot & Steinke (2022): RDP of releasing the best of K ~ D_{η,γ} runs.

    If each run is (λ, ε(λ))-RDP and (λ̂, ε(λ̂))-RDP, the whole search is (λ, ε'(λ))-RDP with
        ε'(λ) = ε(λ) + (1 + η)(1 − 1/λ̂) ε(λ̂) + (1 + η) log(1/γ)/λ̂ + log(E[K])/(λ − 1)
    for any λ̂ ≥ 1. We take the best λ̂ in {1} ∪ orders (at λ̂ = 1 the ε(λ̂) term vanishes).
    The λ̂ terms do not involve λ, so one λ̂ serves every λ.
    Returns (ε'(λ) for each λ in orders, the λ̂ used).
    """
    orders = np.asarray(orders, dtype=float)
    rdp = np.asarray(rdp, dtype=float)
    hat = np.concatenate([[1.0], orders])
    # The λ̂ = 1 term is 0 · ε(1); write it as 0 directly (ε(1), the KL bound, is not on the grid).
    rdp_hat_term = np.concatenate([[0.0], (1 - 1 / orders) * rdp])
    extra = (1 + eta) * (rdp_hat_term + math.log(1 / gamma) / hat)
    best = int(np.argmin(extra))
    curve = rdp + extra[best] + math.log(expected_trials_tnb(eta, gamma)) / (orders - 1)
    return curve, float(hat[best])


def _poisson_curve(orders, rdps, *, mu: float) -> np.ndarray:
    """Theorem 6 of Papernot & Steinke (2022): RDP of releasing the best of K ~ Poisson(μ) runs.

    If each run is (λ, ε(λ))-RDP and (ε̂, δ̂)-DP with e^ε̂ ≤ 1 + 1/(λ − 1), the search is
    (λ, ε'(λ))-RDP with ε'(λ) = ε(λ) + μ δ̂ + log(μ)/(λ − 1). δ̂ only shrinks as ε̂ grows,
    so we take ε̂ = log(1 + 1/(λ − 1)) exactly and δ̂ from the run's own RDP curve.
    ``rdps`` holds one curve per run (rows); with several, ε(λ) and δ̂ are their maxima.
    """
    orders = np.asarray(orders, dtype=float)
    rdps = np.atleast_2d(np.asarray(rdps, dtype=float))
    eps_hat = np.log1p(1 / (orders - 1))
    delta_hat = np.max([_delta_at(orders, r, eps_hat) for r in rdps], axis=0)
    return rdps.max(axis=0) + mu * delta_hat + math.log(mu) / (orders - 1)


# ------------------------------------------------------------------------ public bounds


def _per_run(runs, delta) -> tuple[np.ndarray, float]:
    curves = np.array([rdp_curve(r) for r in runs]).reshape(len(runs), len(ORDERS))
    per_run = max((_epsilon(ORDERS, c, delta)[0] for c in curves), default=0.0)
    return curves, per_run


def _trivial(mode, runs, delta, per_run) -> SearchPrivacy | None:
    """The two cases with nothing to compute: no data touched, or a non-private run."""
    if all(r.steps == 0 or r.sample_rate == 0 for r in runs):  # also true for no runs at all
        return SearchPrivacy(mode, 0.0, delta, len(runs), 0.0, math.nan,
                             "No trial trained on the private data, so the search has spent no privacy (ε = 0).")
    if any(r.non_private for r in runs):
        n = sum(r.non_private for r in runs)
        return SearchPrivacy(mode, math.inf, delta, len(runs), per_run, math.nan,
                             f"{n} of the {len(runs)} trials trained without noise (noise multiplier 0), so the "
                             "search gives no differential privacy at all (ε = ∞): releasing its best trial, or "
                             "even which trial was best, may reveal individual training records.")
    return None


def fixed_count_privacy(runs: list[RunPrivacy], *, delta: float) -> SearchPrivacy:
    """All runs composed: ε_K(λ) = Σ_k ε_k(λ), then (ε, δ). Valid for any (adaptive) search."""
    _check_delta(delta)
    runs = list(runs)
    curves, per_run = _per_run(runs, delta)
    if (t := _trivial("fixed", runs, delta, per_run)) is not None:
        return t
    eps, order = _epsilon(ORDERS, curves.sum(axis=0), delta)
    return SearchPrivacy("fixed", eps, delta, len(runs), per_run, order, (
        f"ε = {eps:.3g} at δ = {delta:g} covers all {len(runs)} trials that trained on the data, added up "
        f"(RDP composition); each alone is ε ≤ {per_run:.3g}. It holds however the trials were chosen, "
        "adaptive samplers and pruners included, and even if every trial, not only the best, is published. "
        "It does not cover trials that are not in this count, nor any later use of the data."))


def poisson_privacy(runs: list[RunPrivacy], *, mu: float, delta: float) -> SearchPrivacy:
    """Best of K ~ Poisson(μ) i.i.d. runs (Papernot & Steinke 2022, Thm 6); see :func:`_poisson_curve`."""
    _check_delta(delta)
    _check_mu(mu)
    runs = list(runs)
    curves, per_run = _per_run(runs, delta)
    if (t := _trivial("poisson", runs, delta, per_run)) is not None:
        return t
    eps, order = _epsilon(ORDERS, _poisson_curve(ORDERS, curves, mu=mu), delta)
    return SearchPrivacy("poisson", eps, delta, len(runs), per_run, order, (
        f"ε = {eps:.3g} at δ = {delta:g} covers publishing only the best trial of a random search whose number "
        f"of trials was drawn at random from a Poisson distribution with mean {mu:g} (this study ran "
        f"{len(runs)}); each trial alone is ε ≤ {per_run:.3g}. It assumes the number of trials was drawn in "
        "secret and never revealed, that every trial's hyperparameters were drawn independently from the same "
        "distribution (no adaptive sampler, no pruner that looks at other trials), that the runs listed include "
        "the most privacy-costly settings of the search space, and that nothing but the best trial "
        "(and its score) is published (Papernot & Steinke, ICLR 2022, Theorem 6)."))


def truncated_negative_binomial_privacy(
    runs: list[RunPrivacy], *, eta: float, gamma: float, delta: float
) -> SearchPrivacy:
    """Best of K ~ D_{η,γ} i.i.d. runs (Papernot & Steinke 2022, Thm 2); see :func:`_tnb_curve`."""
    _check_delta(delta)
    _check_tnb(eta, gamma)
    runs = list(runs)
    curves, per_run = _per_run(runs, delta)
    if (t := _trivial("truncated_negative_binomial", runs, delta, per_run)) is not None:
        return t
    # Runs may differ: a bound on each run's RDP is the pointwise maximum of their curves.
    curve, _ = _tnb_curve(ORDERS, curves.max(axis=0), eta=eta, gamma=gamma)
    eps, order = _epsilon(ORDERS, curve, delta)
    ek = expected_trials_tnb(eta, gamma)
    name = "geometric" if eta == 1 else "logarithmic" if eta == 0 else "truncated negative binomial"
    return SearchPrivacy("truncated_negative_binomial", eps, delta, len(runs), per_run, order, (
        f"ε = {eps:.3g} at δ = {delta:g} covers publishing only the best trial of a random search whose number "
        f"of trials was drawn at random from a {name} distribution (η = {eta:g}, γ = {gamma:g}; mean "
        f"{ek:.3g}; this study ran {len(runs)}); each trial alone is ε ≤ {per_run:.3g}. It assumes the number "
        "of trials was drawn in secret and never revealed, that every trial's hyperparameters were drawn "
        "independently from the same distribution (no adaptive sampler, no pruner that looks at other "
        "trials), that the runs listed include the most privacy-costly settings of the search space, and that "
        "nothing but the best trial (and its score) is published (Papernot & Steinke, ICLR 2022, Theorem 2)."))


def search_privacy(runs, *, mode: str, delta: float, mu: float | None = None, eta: float | None = None,
                   gamma: float | None = None, random_search: bool = True) -> SearchPrivacy:
    """Dispatch on ``mode``. With ``random_search=False`` (adaptive sampler or pruner) the
    random-K bounds do not apply and the result falls back to plain composition ("fixed")."""
    _check_delta(delta)
    if mode == "poisson":
        _check_mu(mu)
    elif mode == "truncated_negative_binomial":
        _check_tnb(eta, gamma)
    elif mode != "fixed":
        raise ValueError(f"mode: {mode!r}; must be one of {', '.join(MODES)}")
    runs = list(runs)
    if mode == "fixed":
        return fixed_count_privacy(runs, delta=delta)
    if not random_search:
        fixed = fixed_count_privacy(runs, delta=delta)
        return SearchPrivacy(fixed.mode, fixed.epsilon, fixed.delta, fixed.runs, fixed.per_run_epsilon,
                             fixed.order, (
            f"The {mode.replace('_', ' ')} accounting was asked for, but it only holds for a random search with "
            "independent trials, and this search was adaptive (a sampler or pruner used other trials' "
            "results), so it is not used. Instead: " + fixed.explanation))
    if mode == "poisson":
        return poisson_privacy(runs, mu=mu, delta=delta)
    return truncated_negative_binomial_privacy(runs, eta=eta, gamma=gamma, delta=delta)


# --------------------------------------------------------------- drawing the number K


def draw_trial_count(*, mode: str, mu: float | None = None, eta: float | None = None,
                     gamma: float | None = None, rng=None) -> int:
    """Draw the number of trials K for a random-K search.

    The guarantee needs K to be random and secret, so the default RNG is the operating
    system's (``random.SystemRandom``); pass ``rng`` (anything with ``.random()``) only for tests.
    Poisson(μ) may give K = 0 (run nothing, release nothing); D_{η,γ} gives K ≥ 1.
    Sampling is by inverse CDF, summing the pmf until the mass left is below 1e-15.
    """
    if mode == "poisson":
        _check_mu(mu)
        first, log_p = 0, -mu  # log P[K=0]
        ratio = lambda k: mu / (k + 1)  # noqa: E731  P[k+1]/P[k]
    elif mode == "truncated_negative_binomial":
        _check_tnb(eta, gamma)
        # P[K=k] = (1−γ)^k/(γ^(−η) − 1) · Π_{ℓ<k} (ℓ+η)/(ℓ+1) for η ≠ 0, so P[1] = η(1−γ)/(γ^(−η) − 1);
        # η = 0 is the limit, the logarithmic distribution P[K=k] = (1−γ)^k/(k log(1/γ)).
        first = 1
        if eta == 0:
            log_p = math.log1p(-gamma) - math.log(math.log(1 / gamma))
        else:
            log_p = math.log(abs(eta)) + math.log1p(-gamma) - _log_abs_expm1(-eta * math.log(gamma))
        ratio = lambda k: (1 - gamma) * (k + eta) / (k + 1)  # noqa: E731
    elif mode == "fixed":
        raise ValueError("mode: 'fixed' has no random trial count; choose K yourself, "
                         "or use 'poisson' or 'truncated_negative_binomial'")
    else:
        raise ValueError(f"mode: {mode!r}; must be 'poisson' or 'truncated_negative_binomial'")
    u = (rng or random.SystemRandom()).random()
    # The pmf is carried in log space: for large μ (or extreme η, γ) the first terms underflow.
    k, cdf = first, math.exp(log_p)
    while cdf <= u:
        # Tail bound: every later pmf ratio is ≤ r* (for Poisson and η ≥ 1 the ratios decrease;
        # for η < 1 they increase towards 1 − γ), so the mass beyond k is ≤ P[k] r*/(1 − r*).
        r_star = ratio(k) if mode == "poisson" or eta >= 1 else 1 - gamma
        if r_star < 1 and math.exp(log_p) * r_star / (1 - r_star) < _TAIL_MASS:
            break  # u fell in a tail of negligible mass (or above the rounded total)
        log_p += math.log(ratio(k))
        k += 1
        cdf += math.exp(log_p)
    return k


def _log_abs_expm1(x: float) -> float:
    """log|e^x − 1| without overflow for large x."""
    return x + math.log(-math.expm1(-x)) if x > 0 else math.log(-math.expm1(x))


# -------------------------------------------------------------------------- validation


def _check_delta(delta):
    if delta is None or not 0 < delta < 1:
        raise ValueError(f"delta: {delta!r}; must be in (0, 1), e.g. 1e-5 (below 1/n for n training samples)")


def _check_mu(mu):
    if mu is None or not (0 < mu < math.inf):
        raise ValueError(f"mu: {mu!r}; the Poisson mode needs the expected number of trials mu > 0")


def _check_tnb(eta, gamma):
    if eta is None or not (-1 < eta < math.inf):
        raise ValueError(f"eta: {eta!r}; the truncated negative binomial needs eta > -1 "
                         "(eta = 1: geometric, eta = 0: logarithmic)")
    if gamma is None or not 0 < gamma < 1:
        raise ValueError(f"gamma: {gamma!r}; the truncated negative binomial needs gamma in (0, 1)")

"""Study-level privacy (Papernot & Steinke, ICLR 2022): bounds checked against the paper's
formulas evaluated independently here, against Opacus's own accountant, and the K sampler."""

from __future__ import annotations

import json
import math
import random
import statistics

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from dpnas.search import privacy as sp
from dpnas.search.privacy import (
    MODES,
    ORDERS,
    RunPrivacy,
    SearchPrivacy,
    draw_trial_count,
    expected_trials_tnb,
    fixed_count_privacy,
    poisson_privacy,
    rdp_curve,
    search_privacy,
    truncated_negative_binomial_privacy,
)

DELTA = 1e-5
# A typical DP-SGD run: ε ≈ 2.1 at δ = 1e-5.
RUN = RunPrivacy(noise_multiplier=1.0, sample_rate=0.01, steps=1000)


def _opacus_eps(rdp, delta=DELTA):
    return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0])


# ----------------------------------------------------------------------------- E[K]


def _tnb_pmf(k, eta, gamma):
    """The paper's D_{η,γ}, written out directly (not by recursion as the module does)."""
    if eta == 0:
        return (1 - gamma) ** k / (k * math.log(1 / gamma))
    prod = math.prod((l + eta) / (l + 1) for l in range(k))
    return (1 - gamma) ** k / (gamma ** (-eta) - 1) * prod


@pytest.mark.parametrize("eta,gamma", [(1, 0.1), (0, 0.1), (0.5, 0.05), (2, 0.5), (-0.5, 0.2), (3, 0.3)])
def test_expected_trials_matches_the_distribution(eta, gamma):
    pmf = [_tnb_pmf(k, eta, gamma) for k in range(1, 3000)]
    assert sum(pmf) == pytest.approx(1, abs=1e-9)
    mean = sum(k * p for k, p in zip(range(1, 3000), pmf))
    assert expected_trials_tnb(eta, gamma) == pytest.approx(mean, rel=1e-9)


def test_expected_trials_closed_forms():
    for gamma in (0.5, 0.1, 0.01):
        assert expected_trials_tnb(1, gamma) == pytest.approx(1 / gamma)  # geometric
        assert expected_trials_tnb(0, gamma) == pytest.approx((1 / gamma - 1) / math.log(1 / gamma))
        # η → 0 is continuous with the logarithmic case
        assert expected_trials_tnb(1e-9, gamma) == pytest.approx(expected_trials_tnb(0, gamma), rel=1e-6)
    assert expected_trials_tnb(2, 0.5) == pytest.approx(2 * 0.5 / (0.5 * (1 - 0.25)))


# ------------------------------------------------- the theorems on a hand-made curve


def _tnb_by_hand(orders, rdp, eta, gamma):
    """Theorem 2 evaluated with loops: min over λ̂ ∈ {1} ∪ orders, for every λ."""
    ek = expected_trials_tnb(eta, gamma)
    out = []
    for lam, eps in zip(orders, rdp):
        best = (1 + eta) * math.log(1 / gamma)  # λ̂ = 1
        for lam_hat, eps_hat in zip(orders, rdp):
            best = min(best, (1 + eta) * (1 - 1 / lam_hat) * eps_hat + (1 + eta) * math.log(1 / gamma) / lam_hat)
        out.append(eps + best + math.log(ek) / (lam - 1))
    return np.array(out)


@pytest.mark.parametrize("eta,gamma", [(1, 0.1), (0, 0.1), (0.5, 0.01), (-0.5, 0.2)])
@pytest.mark.parametrize("rho", [0.001, 0.05, 1.0])
def test_tnb_curve_is_theorem_2(eta, gamma, rho):
    rdp = rho * ORDERS  # Gaussian mechanism / ρ-zCDP: ε(λ) = ρλ
    curve, lam_hat = sp._tnb_curve(ORDERS, rdp, eta=eta, gamma=gamma)
    np.testing.assert_allclose(curve, _tnb_by_hand(ORDERS, rdp, eta, gamma), rtol=1e-12)
    assert lam_hat == 1 or lam_hat in ORDERS


def test_tnb_curve_closed_form_for_linear_rdp():
    # With ε(λ) = ρλ the λ̂ part is (1+η)(ρ(λ̂ − 1) + log(1/γ)/λ̂), minimised at
    # λ̂* = sqrt(log(1/γ)/ρ) with value (1+η)(2 sqrt(ρ log(1/γ)) − ρ). A dense grid gets there.
    rho, eta, gamma = 0.01, 1.0, 0.1
    orders = np.linspace(1.001, 100, 200_000)
    curve, lam_hat = sp._tnb_curve(orders, rho * orders, eta=eta, gamma=gamma)
    closed = rho * orders + (1 + eta) * (2 * math.sqrt(rho * math.log(10)) - rho) + math.log(10) / (orders - 1)
    np.testing.assert_allclose(curve, closed, atol=1e-6)
    assert lam_hat == pytest.approx(math.sqrt(math.log(10) / rho), rel=1e-3)


def _delta_by_hand(orders, rdp, eps_hat):
    log_best = 0.5 * math.log(1 - math.exp(-min(rdp)))  # Bretagnolle–Huber via KL ≤ ε(α)
    for a, r in zip(orders, rdp):  # in logs: the exponent overflows at large α
        log_best = min(log_best, (a - 1) * (r - eps_hat) + (a - 1) * math.log(1 - 1 / a) - math.log(a))
    return min(1.0, math.exp(log_best))


@pytest.mark.parametrize("mu", [0.5, 10, 100])
@pytest.mark.parametrize("rho", [0.001, 0.05, 1.0])
def test_poisson_curve_is_theorem_6(mu, rho):
    rdp = rho * ORDERS
    curve = sp._poisson_curve(ORDERS, rdp, mu=mu)
    expected = []
    for lam, eps in zip(ORDERS, rdp):
        eps_hat = math.log(1 + 1 / (lam - 1))
        expected.append(eps + mu * _delta_by_hand(ORDERS, rdp, eps_hat) + math.log(mu) / (lam - 1))
    np.testing.assert_allclose(curve, expected, rtol=1e-10)


def test_poisson_curve_single_order_by_hand():
    # λ = 2, ε(2) = 0.1: ε̂ = log 2, δ̂ = min(e^{0.1 − log 2}·(1/2)/2, sqrt(1 − e^{−0.1})) = e^{0.1}/8.
    curve = sp._poisson_curve(np.array([2.0]), np.array([0.1]), mu=10)
    assert curve[0] == pytest.approx(0.1 + 10 * math.exp(0.1) / 8 + math.log(10))


def test_delta_conversion_never_worse_than_textbook():
    rdp = 0.05 * ORDERS
    for eps_hat in (0.01, 0.1, 0.7, 2.0):
        textbook = min(1.0, math.exp(min((a - 1) * (r - eps_hat) for a, r in zip(ORDERS, rdp))))
        got = float(sp._delta_at(ORDERS, rdp, eps_hat)[0])
        assert got <= textbook
        # and it is (ε̂, δ̂) that Opacus would convert back to at most ε̂
        if got < 1:
            assert _opacus_eps(rdp, delta=got) <= eps_hat + 1e-9


# ------------------------------------------------------------------ the fixed count


def test_fixed_count_is_composition_and_matches_opacus_accountant():
    k = 10
    got = fixed_count_privacy([RUN] * k, delta=DELTA)
    assert got.mode == "fixed" and got.runs == k
    assert got.epsilon == pytest.approx(_opacus_eps(k * rdp_curve(RUN)))

    acc = RDPAccountant()
    for _ in range(k * RUN.steps):
        acc.step(noise_multiplier=RUN.noise_multiplier, sample_rate=RUN.sample_rate)
    assert got.epsilon == pytest.approx(acc.get_epsilon(delta=DELTA, alphas=list(ORDERS)), rel=1e-9)

    single = fixed_count_privacy([RUN], delta=DELTA)
    assert single.epsilon == pytest.approx(got.per_run_epsilon)
    assert 1.5 < single.epsilon < 3  # the "typical run" the comparisons below assume


def test_fixed_count_heterogeneous_runs_add_their_curves():
    other = RunPrivacy(noise_multiplier=2.0, sample_rate=0.02, steps=300)
    got = fixed_count_privacy([RUN, other], delta=DELTA)
    acc = RDPAccountant()
    acc.history = [(RUN.noise_multiplier, RUN.sample_rate, RUN.steps),
                   (other.noise_multiplier, other.sample_rate, other.steps)]
    assert got.epsilon == pytest.approx(acc.get_epsilon(delta=DELTA, alphas=list(ORDERS)), rel=1e-9)
    assert got.per_run_epsilon == pytest.approx(max(_opacus_eps(rdp_curve(RUN)), _opacus_eps(rdp_curve(other))))


def test_rdp_curve_is_opacus():
    np.testing.assert_allclose(rdp_curve(RUN), compute_rdp(q=0.01, noise_multiplier=1.0, steps=1000, orders=ORDERS))
    assert np.all(rdp_curve(RunPrivacy(0.0, 0.01, 10)) == np.inf)
    assert np.all(rdp_curve(RunPrivacy(1.0, 0.01, 0)) == 0)


# ------------------------------------------------------------------- random K vs fixed


def test_random_k_is_cheaper_than_composing_the_expected_number_of_runs():
    single = fixed_count_privacy([RUN], delta=DELTA).epsilon
    fixed = fixed_count_privacy([RUN] * 10, delta=DELTA).epsilon
    poisson = poisson_privacy([RUN], mu=10, delta=DELTA)
    geometric = truncated_negative_binomial_privacy([RUN], eta=1, gamma=0.1, delta=DELTA)  # E[K] = 10
    for got in (poisson, geometric):
        assert single < got.epsilon < fixed, (single, got.epsilon, fixed)
        assert got.per_run_epsilon == pytest.approx(single)
    # and the public functions are the paper's curves pushed through Opacus's conversion
    assert poisson.epsilon == pytest.approx(_opacus_eps(sp._poisson_curve(ORDERS, rdp_curve(RUN), mu=10)))
    assert geometric.epsilon == pytest.approx(_opacus_eps(_tnb_by_hand(ORDERS, rdp_curve(RUN), 1, 0.1)))


def test_tnb_heterogeneous_runs_use_the_pointwise_maximum():
    weak = RunPrivacy(noise_multiplier=3.0, sample_rate=0.01, steps=100)
    both = truncated_negative_binomial_privacy([weak, RUN], eta=1, gamma=0.1, delta=DELTA)
    alone = truncated_negative_binomial_privacy([RUN], eta=1, gamma=0.1, delta=DELTA)
    assert both.epsilon == pytest.approx(alone.epsilon)
    assert both.runs == 2


def test_random_k_bound_does_not_depend_on_how_many_runs_happened():
    one = poisson_privacy([RUN], mu=10, delta=DELTA).epsilon
    many = poisson_privacy([RUN] * 25, mu=10, delta=DELTA).epsilon
    assert one == pytest.approx(many)


# ------------------------------------------------------------------ dispatch, edge cases


def test_non_adaptive_fallback_to_fixed_count():
    runs = [RUN] * 6
    fixed = fixed_count_privacy(runs, delta=DELTA)
    for mode, kw in (("poisson", {"mu": 10}), ("truncated_negative_binomial", {"eta": 1, "gamma": 0.1})):
        got = search_privacy(runs, mode=mode, delta=DELTA, random_search=False, **kw)
        assert got.mode == "fixed"
        assert got.epsilon == pytest.approx(fixed.epsilon)
        assert "adaptive" in got.explanation and mode.replace("_", " ") in got.explanation
        random_k = search_privacy(runs, mode=mode, delta=DELTA, **kw)
        assert random_k.mode == mode and random_k.epsilon < fixed.epsilon


def test_non_private_and_empty():
    noisy_free = RunPrivacy(noise_multiplier=0.0, sample_rate=0.01, steps=100)
    for mode, kw in (("fixed", {}), ("poisson", {"mu": 10}), ("truncated_negative_binomial", {"eta": 1, "gamma": 0.1})):
        got = search_privacy([RUN, noisy_free], mode=mode, delta=DELTA, **kw)
        assert got.epsilon == math.inf and "no differential privacy" in got.explanation
        empty = search_privacy([], mode=mode, delta=DELTA, **kw)
        assert empty.epsilon == 0 and empty.runs == 0


def test_to_dict_round_trips():
    got = search_privacy([RUN], mode="poisson", mu=10, delta=DELTA)
    d = got.to_dict()
    assert set(d) == {"mode", "epsilon", "delta", "runs", "per_run_epsilon", "order", "explanation"}
    assert SearchPrivacy(**json.loads(json.dumps(d))) == got
    assert MODES == ("fixed", "poisson", "truncated_negative_binomial")


@pytest.mark.parametrize("kwargs,name", [
    ({"mode": "poisson", "mu": 0}, "mu"),
    ({"mode": "poisson"}, "mu"),
    ({"mode": "truncated_negative_binomial", "eta": 1, "gamma": 1.0}, "gamma"),
    ({"mode": "truncated_negative_binomial", "eta": 1, "gamma": 0}, "gamma"),
    ({"mode": "truncated_negative_binomial", "eta": -1, "gamma": 0.1}, "eta"),
    ({"mode": "truncated_negative_binomial", "gamma": 0.1}, "eta"),
    ({"mode": "grid"}, "mode"),
    ({"mode": "fixed", "delta": 0}, "delta"),
    ({"mode": "fixed", "delta": 1.0}, "delta"),
])
def test_bad_parameters(kwargs, name):
    kwargs = {"delta": DELTA, **kwargs}
    with pytest.raises(ValueError, match=name):
        search_privacy([RUN], **kwargs)
    if name != "delta":
        with pytest.raises(ValueError, match=name):
            draw_trial_count(**{k: v for k, v in kwargs.items() if k != "delta"})


def test_bad_runs():
    with pytest.raises(ValueError, match="noise_multiplier"):
        RunPrivacy(-1.0, 0.01, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        RunPrivacy(1.0, 1.5, 10)
    with pytest.raises(ValueError, match="steps"):
        RunPrivacy(1.0, 0.01, 2.5)
    with pytest.raises(ValueError, match="fixed"):
        draw_trial_count(mode="fixed")


# ---------------------------------------------------------------------- drawing K


@pytest.mark.parametrize("kwargs", [
    {"mode": "poisson", "mu": 10},
    {"mode": "poisson", "mu": 0.5},
    {"mode": "truncated_negative_binomial", "eta": 1, "gamma": 0.1},
    {"mode": "truncated_negative_binomial", "eta": 0, "gamma": 0.1},
    {"mode": "truncated_negative_binomial", "eta": -0.5, "gamma": 0.05},
    {"mode": "truncated_negative_binomial", "eta": 3, "gamma": 0.2},
])
def test_sampler_mean_matches_expected_trials(kwargs):
    rng = random.Random(1234)
    draws = [draw_trial_count(rng=rng, **kwargs) for _ in range(20_000)]
    if kwargs["mode"] == "poisson":
        mean, low = kwargs["mu"], 0
    else:
        mean, low = expected_trials_tnb(kwargs["eta"], kwargs["gamma"]), 1
    stderr = statistics.pstdev(draws) / math.sqrt(len(draws))
    assert abs(statistics.fmean(draws) - mean) < 5 * stderr
    assert min(draws) >= low
    if kwargs.get("mu") == 0.5:
        assert min(draws) == 0  # P[K = 0] = e^{-1/2}: run nothing, release nothing
    if kwargs["mode"] == "truncated_negative_binomial":  # and the shape, not just the mean
        freq1 = draws.count(1) / len(draws)
        p1 = _tnb_pmf(1, kwargs["eta"], kwargs["gamma"])
        assert abs(freq1 - p1) < 5 * math.sqrt(p1 * (1 - p1) / len(draws))


def test_sampler_defaults_to_the_system_rng(monkeypatch):
    calls = []
    real = random.SystemRandom.random

    def spy(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(random.SystemRandom, "random", spy)
    k = draw_trial_count(mode="truncated_negative_binomial", eta=1, gamma=0.5)
    assert isinstance(k, int) and k >= 1 and calls


def test_sampler_handles_a_huge_poisson_mean():
    k = draw_trial_count(mode="poisson", mu=5000, rng=random.Random(0))
    assert abs(k - 5000) < 6 * math.sqrt(5000)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_study_of_prv_runs_says_that_its_composition_is_rdp(accountant):
    """A trial planned with the PRV accountant prints its own (tighter) ε; the study composes RDP curves, so the
    report says why its one-run ε is higher rather than leave two numbers unexplained."""
    import optuna

    from dpnas.dp.config import PrivacyConfig
    from dpnas.dp.privacy import run_epsilon
    from dpnas.search.study_privacy import study_privacy

    plan = {"noise_multiplier": 0.6665, "sample_rate": 0.2222, "steps": 4, "val_noise": 0.638, "val_releases": 1}
    study = optuna.create_study()
    study.set_user_attr("delta", DELTA)
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={
            "privacy_plan": plan, "privacy_config": PrivacyConfig(epsilon=8.0, accountant=accountant).to_dict()}))
    report = study_privacy(study)
    own = run_epsilon(accountant, plan["noise_multiplier"], plan["sample_rate"], plan["steps"], DELTA)
    notes = [n for n in report.notes if "accountant" in n]
    if accountant == "rdp":
        assert notes == []
        assert report.per_run_epsilon >= own * (1 - 1e-9)
    else:
        assert len(notes) == 1 and "PRV" in notes[0] and f"{report.per_run_epsilon:.4g}" in notes[0]
        assert report.per_run_epsilon > own  # the looser composition the note explains

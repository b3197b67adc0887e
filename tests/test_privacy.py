"""The DP-SGD mechanism, proved on small models: clipping, noise, accounting, sampling."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dpnas.arch.space import ConfigError
from dpnas.dp.config import PrivacyConfig
from dpnas.dp.engine import DPSGDEngine
from dpnas.dp.privacy import PrivacyPlan, epsilon_spent, make_accountant, plan_privacy, poisson_sample


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ELU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def batch(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g) * 3, torch.randint(0, 3, (n,), generator=g)


def per_sample_grads(model, x, y):
    """Brute force: one backward pass per sample."""
    grads = []
    for i in range(len(y)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(grads)


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def make_engine(model, *, noise_multiplier, expected_batch_size, max_grad_norm, private=True, physical=4,
                aug_multiplicity=1, accountant=None, seed=0):
    plan = PrivacyPlan(sample_rate=0.1, steps=1, noise_multiplier=noise_multiplier,
                       expected_batch_size=expected_batch_size, dataset_size=int(expected_batch_size * 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return DPSGDEngine(model, optimizer, plan=plan, max_grad_norm=max_grad_norm, private=private,
                       accountant=accountant, physical_batch_size=physical, aug_multiplicity=aug_multiplicity,
                       noise_generator=torch.Generator().manual_seed(seed))


def test_noise_off_update_is_the_sum_of_clipped_per_sample_gradients_over_B():
    model = small_model()
    x, y = batch(10)
    reference = small_model()
    g = per_sample_grads(reference, x, y)
    C, B = 0.5, 8.0
    norms = g.norm(dim=1)
    assert (norms > C).sum() >= 5, "the test needs gradients that are actually clipped"
    clipped = g * (C / (norms + 1e-6)).clamp(max=1.0)[:, None]
    assert (clipped.norm(dim=1) <= C + 1e-5).all()
    before = flat_params(model)
    # physical chunks of 4 over a logical batch of 10: the clipped sum must span all chunks
    make_engine(model, noise_multiplier=0.0, expected_batch_size=B, max_grad_norm=C).step(x, y)
    update = before - flat_params(model)  # SGD, lr 1
    torch.testing.assert_close(update, clipped.sum(0) / B, rtol=1e-4, atol=1e-6)


def test_augmentation_multiplicity_averages_gradients_before_clipping():
    model = small_model()
    x, y = batch(6)
    shift = torch.tensor([0.0, 1.0]).repeat(6)[:, None, None, None]  # copy k of each sample gets +k

    def augment(rows):
        return rows + shift[: len(rows)]

    reference = small_model()
    g = (per_sample_grads(reference, x, y) + per_sample_grads(reference, x + 1.0, y)) / 2
    C, B = 0.3, 6.0
    clipped = g * (C / (g.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None]
    before = flat_params(model)
    make_engine(model, noise_multiplier=0.0, expected_batch_size=B, max_grad_norm=C, aug_multiplicity=2,
                physical=3).step(x, y, augment=augment)
    torch.testing.assert_close(before - flat_params(model), clipped.sum(0) / B, rtol=1e-4, atol=1e-6)


def test_noise_has_standard_deviation_sigma_C_over_B():
    x, y = batch(10)
    sigma, C, B = 2.0, 0.7, 10.0
    quiet = small_model()
    make_engine(quiet, noise_multiplier=0.0, expected_batch_size=B, max_grad_norm=C).step(x, y)
    noisy = small_model()
    make_engine(noisy, noise_multiplier=sigma, expected_batch_size=B, max_grad_norm=C).step(x, y)
    noise = flat_params(quiet) - flat_params(noisy)  # the clipped part cancels
    n = noise.numel()
    assert n > 400
    expected = sigma * C / B
    # the sample std of n Gaussians is within 4 standard errors (expected / sqrt(2n)) of the truth
    assert abs(noise.std().item() - expected) < 4 * expected / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(n)


def test_non_private_mode_neither_clips_nor_adds_noise():
    model = small_model()
    x, y = batch(10)
    g = per_sample_grads(small_model(), x, y)
    before = flat_params(model)
    make_engine(model, noise_multiplier=0.0, expected_batch_size=10.0, max_grad_norm=1e-3, private=False).step(x, y)
    torch.testing.assert_close(before - flat_params(model), g.sum(0) / 10.0, rtol=1e-4, atol=1e-6)


def test_empty_poisson_batch_still_takes_a_noise_only_step():
    model = small_model()
    accountant = make_accountant(PrivacyConfig())
    engine = make_engine(model, noise_multiplier=1.0, expected_batch_size=4.0, max_grad_norm=1.0, accountant=accountant)
    before = flat_params(model)
    engine.step(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))
    assert not torch.equal(before, flat_params(model))
    assert accountant.history == [(1.0, 0.1, 1)]


def test_every_noisy_step_is_reported_to_the_accountant():
    model = small_model()
    accountant = make_accountant(PrivacyConfig())
    engine = make_engine(model, noise_multiplier=1.3, expected_batch_size=4.0, max_grad_norm=1.0, accountant=accountant)
    x, y = batch(9)
    for _ in range(3):  # 9 samples in chunks of 4: three chunks, but one logical step each time
        engine.step(x, y)
    assert accountant.history == [(1.3, 0.1, 3)]


def test_the_accountant_is_told_the_rate_the_plan_samples_at():
    """q = B / n, not 1 / round(n / B): an accountant told another rate accounts another mechanism. At n = 1150,
    B = 128 the two differ by 0.2 %, too little for any budget check to notice (mutation review 2026-12)."""
    plan = plan_privacy(PrivacyConfig(epsilon=4.0), dataset_size=1150, batch_size=128, epochs=1)
    assert plan.sample_rate == 128 / 1150 != 1 / round(1150 / 128)
    accountant = make_accountant(PrivacyConfig())
    model = small_model()
    engine = DPSGDEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), plan=plan, max_grad_norm=1.0,
                         private=True, accountant=accountant, physical_batch_size=4,
                         noise_generator=torch.Generator().manual_seed(0))
    x, y = batch(9)
    engine.step(x, y)
    engine.step(x[:0], y[:0])  # an empty Poisson batch is a step at the same rate
    assert accountant.history == [(plan.noise_multiplier, 128 / 1150, 2)]


def test_models_opacus_rejects_are_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ConfigError, match="1: .*BatchNorm"):
        make_engine(model, noise_multiplier=1.0, expected_batch_size=4.0, max_grad_norm=1.0)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_calibrated_noise_spends_at_most_the_budget_and_within_one_percent(accountant, epsilon):
    privacy = PrivacyConfig(epsilon=epsilon, delta=1e-5, accountant=accountant)
    plan = plan_privacy(privacy, dataset_size=40_000, batch_size=256, epochs=3)
    acc = make_accountant(privacy)
    for _ in range(plan.steps):
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    spent = epsilon_spent(acc, privacy.delta)
    assert spent <= epsilon
    assert spent >= 0.99 * epsilon
    assert plan.sample_rate == 256 / 40_000 and plan.steps == 3 * round(40_000 / 256)


def test_smoothnet_noise_multipliers_match_the_reference():
    # REFERENCE §5: CIFAR-10, 40 k training images, B = 256, eps 7, delta 1e-5 -> about 0.84 / 0.90 / 1.01
    privacy = PrivacyConfig(epsilon=7.0, delta=1e-5)
    sigmas = [plan_privacy(privacy, dataset_size=40_000, batch_size=256, epochs=e).noise_multiplier for e in (90, 120, 180)]
    assert [round(s, 2) for s in sigmas] == pytest.approx([0.84, 0.90, 1.01], abs=0.011)


def test_budget_checks():
    with pytest.raises(ConfigError, match="epsilon: must be > 0"):
        PrivacyConfig(epsilon=0.0)
    with pytest.raises(ConfigError, match="epsilon: must be > 0"):
        PrivacyConfig(epsilon=-1.0)
    with pytest.raises(ConfigError, match="delta: must be in"):
        PrivacyConfig(delta=1.0)
    with pytest.raises(ConfigError, match=r"delta: 0.001 >= 1/n"):
        plan_privacy(PrivacyConfig(delta=1e-3), dataset_size=1000, batch_size=10, epochs=1)
    with pytest.warns(UserWarning, match="above 1/\\(10 n\\)"):
        plan_privacy(PrivacyConfig(delta=5e-4), dataset_size=1000, batch_size=10, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # Opacus's RDP note
        plan_privacy(PrivacyConfig(delta=1e-5), dataset_size=1000, batch_size=10, epochs=1)
    with pytest.raises(ConfigError, match="batch_size: 2000 is larger"):
        plan_privacy(PrivacyConfig(), dataset_size=1000, batch_size=2000, epochs=1)
    with pytest.raises(ConfigError, match="no noise level reaches"):
        plan_privacy(PrivacyConfig(epsilon=1e-9, delta=1e-9), dataset_size=1000, batch_size=1000, epochs=1)


def test_non_private_plan_has_no_noise():
    plan = plan_privacy(PrivacyConfig(epsilon=math.inf), dataset_size=1000, batch_size=100, epochs=2)
    assert plan.noise_multiplier == 0.0 and plan.steps == 20


def test_poisson_sampler_draws_each_sample_independently_with_rate_q():
    n, q, draws = 200, 0.1, 2000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    sizes = []
    for _ in range(draws):
        idx = poisson_sample(n, q, generator=g, device="cpu")
        assert len(idx.unique()) == len(idx)
        counts[idx] += 1
        sizes.append(len(idx))
    sizes = torch.tensor(sizes, dtype=torch.float)
    # batch sizes vary: Binomial(n, q), mean nq = 20, variance nq(1-q) = 18
    assert len(set(sizes.tolist())) > 10
    assert abs(sizes.mean().item() - n * q) < 4 * math.sqrt(n * q * (1 - q) / draws)
    assert abs(sizes.var().item() - n * q * (1 - q)) < 0.2 * n * q * (1 - q)
    # every sample is included with probability q
    rate = counts / draws
    assert (rate - q).abs().max() < 5 * math.sqrt(q * (1 - q) / draws)


@pytest.mark.parametrize("q", [256 / 40_000, 256 / 1_150, 0.1, 1 / 3, 2.0**-24 * 107_374.2, 1.0])
def test_poisson_sampling_never_joins_a_record_more_often_than_the_accountant_is_told(q):
    """Each record joins when a float64 uniform (k · 2^-53, or (k + 1/2) · 2^-53 on CUDA) falls below q rounded
    down to that grid: probability exactly join_probability(q) <= q. Float32 uniforms (steps of 2^-24) against q
    rounded to float32 joined records up to 2^-24 more often: 7.6e-6 too often, relatively, at 256 / 40,000."""
    from dpnas.dp.privacy import join_probability

    p = join_probability(q)
    assert p <= q and q - p < 2.0**-53 and (p * 2.0**53).is_integer()
    # the mask is exactly `float64 uniform < join_probability(q)`, from the same generator
    g = torch.Generator().manual_seed(1)
    replay = torch.Generator().set_state(g.get_state())
    idx = poisson_sample(5000, q, generator=g, device="cpu")
    expected = (torch.rand(5000, generator=replay, dtype=torch.float64) < p).nonzero().squeeze(1)
    assert torch.equal(idx, expected)
    # what float32 sampling allowed: a probability above q for a q between two float32 grid points
    if q == 2.0**-24 * 107_374.2:
        assert math.ceil(float(torch.tensor(q, dtype=torch.float32)) * 2**24) / 2**24 > q


def test_cached_epsilon_and_calibration_are_the_exact_values():
    from dpnas.dp.privacy import _accountant_options, _noise_multiplier

    for mechanism in ("rdp", "prv"):
        accountant = make_accountant(PrivacyConfig(accountant=mechanism))
        for _ in range(30):
            accountant.step(noise_multiplier=1.1, sample_rate=0.01)
        accountant.step(noise_multiplier=0.9, sample_rate=0.02)  # a second history entry
        direct = accountant.get_epsilon(delta=1e-5, **_accountant_options(mechanism))
        assert epsilon_spent(accountant, 1e-5) == direct
        assert epsilon_spent(accountant, 1e-5) == direct  # the second answer comes from the cache
        for _ in range(7):  # the same (sigma, q) for more steps: RDP's one-step curve is reused, times 37
            accountant.step(noise_multiplier=0.9, sample_rate=0.02)
        assert epsilon_spent(accountant, 1e-5) == accountant.get_epsilon(delta=1e-5, **_accountant_options(mechanism))

    privacy = PrivacyConfig(epsilon=3.0)
    first = plan_privacy(privacy, dataset_size=1000, batch_size=50, epochs=2)
    hits = _noise_multiplier.cache_info().hits
    again = plan_privacy(privacy, dataset_size=1000, batch_size=50, epochs=2)
    assert again == first and _noise_multiplier.cache_info().hits == hits + 1


def test_the_remembered_one_step_rdp_curve_is_opacus_bit_for_bit_and_read_only():
    from opacus.accountants.analysis.rdp import compute_rdp

    from dpnas.dp.privacy import ORDERS, _step_rdp, subsampled_gaussian_rdp

    for sigma, q, steps in [(1.1, 0.01, 1), (2.15, 0.2, 40), (0.6, 0.004, 30_000)]:
        expected = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=[float(a) for a in ORDERS])
        assert np.array_equal(subsampled_gaussian_rdp(sigma, q, steps), expected)
    with pytest.raises(ValueError):  # shared by every caller: nobody may change it in place
        _step_rdp(1.1, 0.01)[0] = 0.0


def test_the_prv_accountant_prints_no_opacus_rdp_order_warning():
    # `dpnas train tiny --set accountant=prv` printed Opacus's "Optimal order is the largest alpha. Please consider
    # expanding the range of alphas": its PRV accountant sizes its domain with an RDP bound, nothing a user can act on
    from dpnas.dp import privacy as privacy_module

    privacy_module._noise_multiplier.cache_clear()
    privacy_module._epsilon_of_history.cache_clear()
    config = PrivacyConfig(epsilon=8.0, delta=1e-5, accountant="prv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_privacy(config, dataset_size=1152, batch_size=256, epochs=1)  # digits' quick recipe, one epoch
    assert plan.noise_multiplier > 0

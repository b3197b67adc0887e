"""The root finder behind a total-ε study's noise (:func:`dpnas.search.calibration._smallest`).

Whatever the function, the σ it returns meets the target and σ / tolerance does not: the smallest noise to within
the stated factor, never above the budget. It also reaches that answer in fewer evaluations than bisection, each
of which is a run's RDP curve (Opacus's per-order series, about 0.05 s).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpnas.arch.space import ConfigError
from dpnas.search.calibration import _bound, _smallest, calibrate
from dpnas.search.privacy import RunPrivacy, rdp_curve

TOLERANCE = 1.002


def counted(function):
    calls = []

    def evaluate(x: float) -> float:
        calls.append(x)
        return function(x)

    return evaluate, calls


def assert_smallest(function, target: float, found: float, tolerance: float = TOLERANCE) -> None:
    assert function(found) <= target, "above the budget"
    assert function(found / tolerance) > target, "not the smallest to within the tolerance"


@settings(max_examples=200, deadline=None)
@given(scale=st.floats(0.01, 1e4), power=st.floats(0.05, 6.0), floor=st.floats(0.0, 0.5),
       target=st.floats(0.6, 50.0), start=st.floats(0.01, 100.0))
def test_the_smallest_x_within_the_tolerance_for_any_decreasing_function(scale, power, floor, target, start):
    def function(x: float) -> float:  # decreasing, from +inf at 0 to `floor` < target
        return floor + scale / x**power

    evaluate, calls = counted(function)
    root = (scale / (target - floor)) ** (1 / power)
    if not 1e-4 < root < 5e5:  # outside the search's range: refused (too large) or the floor (too small)
        return
    found = _smallest(evaluate, target, start=start, tolerance=TOLERANCE)
    assert_smallest(function, target, found)
    assert len(calls) < 60


@pytest.mark.parametrize("shape", ["a step", "infinite below a point", "flat, then a cliff"])
def test_functions_the_interpolation_cannot_model_still_get_the_exact_bracket(shape):
    functions = {
        "a step": lambda x: 10.0 if x < 3.3 else 1.0,
        "infinite below a point": lambda x: math.inf if x < 1.7 else 5.0 / x,
        "flat, then a cliff": lambda x: 9.0 - 1e-9 * x if x < 2.5 else 0.5,
    }
    function = functions[shape]
    found = _smallest(function, 4.0, start=1.0, tolerance=TOLERANCE)
    assert_smallest(function, 4.0, found)


def test_an_impossible_target_is_refused():
    with pytest.raises(ConfigError, match="no noise level"):
        _smallest(lambda x: 10.0, 4.0, start=1.0, tolerance=TOLERANCE)


def quickstart_bound(sigma: float) -> float:
    """The quickstart's training part: 6 runs of 8 epochs at batch 256 of 1,150 records, ε at δ = 1e-5."""
    q = 256 / 1150
    return _bound(rdp_curve(RunPrivacy(sigma, q, 8 * round(1 / q))), mode="fixed", runs=6, mu=None, eta=None,
                  gamma=None, delta=1e-5)


def test_a_real_study_bound_is_calibrated_in_fewer_evaluations_than_bisection():
    evaluate, calls = counted(quickstart_bound)
    found = _smallest(evaluate, 8.0, start=1.0, tolerance=TOLERANCE)
    assert_smallest(quickstart_bound, 8.0, found)
    # bisection from the same bracket [2, 4] to a ratio of 1.002 takes 9 more evaluations after the 3 bracketing
    assert len(calls) <= 6


def test_several_run_shapes_each_meet_the_budget_at_their_smallest_noise():
    total, shapes, n = 6.0, [(64, 2), (128, 2), (128, 4)], 1000
    c = calibrate(total, 1e-5, mode="fixed", runs=5, shapes=shapes, train_size=n)
    assert 0.99 * total <= c.training_epsilon <= total
    for b, e in shapes:
        sigma = c.noise_multipliers[f"batch_size={b},epochs={e}"]

        def alone(s: float, b=b, e=e) -> float:
            return _bound(rdp_curve(RunPrivacy(s, b / n, e * round(n / b))), mode="fixed", runs=5, mu=None, eta=None,
                          gamma=None, delta=1e-5)

        assert alone(sigma) <= total  # each shape within the budget on its own too


def test_a_batch_of_the_whole_training_split_is_calibrated_as_plan_privacy_trains_it():
    # q = B / n = 1 is Poisson sampling that takes every record, which plan_privacy (and Opacus's accountants)
    # accept; the calibration refused it ("is not below"), so such a total-ε study stopped where a fixed-ε one ran.
    from dpnas.dp.config import PrivacyConfig, TrainConfig
    from dpnas.dp.privacy import plan_privacy, run_epsilon

    n = 500
    c = calibrate(4.0, 1e-5, mode="fixed", runs=3, shapes=[(n, 2)], train_size=n)
    assert 0.99 * 4.0 <= c.training_epsilon <= 4.0
    train_cfg = TrainConfig(batch_size=n, epochs=2)
    privacy = c.privacy_for(PrivacyConfig(epsilon=4.0), train_cfg)
    plan = plan_privacy(privacy, dataset_size=n, batch_size=n, epochs=2)  # checks the run's ε within its share
    assert plan.sample_rate == 1.0 and plan.steps == 2 and plan.noise_multiplier == privacy.noise_multiplier
    assert run_epsilon("rdp", plan.noise_multiplier, 1.0, 2, 1e-5) <= privacy.epsilon
    # one record more than the split is no sample rate: both refuse it, naming the key
    for refuse in (lambda: calibrate(4.0, 1e-5, mode="fixed", runs=3, shapes=[(n + 1, 2)], train_size=n),
                   lambda: plan_privacy(PrivacyConfig(epsilon=4.0), dataset_size=n, batch_size=n + 1, epochs=2)):
        with pytest.raises(ConfigError, match=f"batch_size: {n + 1} is larger than the {n} training samples"):
            refuse()


def test_the_prv_accountant_takes_a_batch_of_the_whole_split_quietly():
    import warnings

    from dpnas.dp.privacy import run_epsilon

    with warnings.catch_warnings():
        # Opacus's PRV density takes log(1 - q): NumPy warned "divide by zero encountered in log" at q = 1
        warnings.simplefilter("error", RuntimeWarning)
        at_one = run_epsilon("prv", 1.0, 1.0, 8, 1e-5)
    assert run_epsilon("prv", 1.0, 0.999, 8, 1e-5) <= at_one < math.inf

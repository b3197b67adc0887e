"""A call computed in a forked child (dpnas.search.forked) and the total-ε calibration started that way."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from dpnas.arch.space import ConfigError
from dpnas.search import calibration
from dpnas.search.forked import ForkedCall
from dpnas.search.study_file import load_study_file

QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml"
needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")


def pid_and(value):
    return os.getpid(), value


@needs_fork
def test_the_call_runs_in_another_process_and_its_answer_comes_back():
    pid, value = ForkedCall(pid_and, {"a": [1.5, None]}).result()
    assert pid != os.getpid() and value == {"a": [1.5, None]}


def refuse(message):
    raise ConfigError(message)


def test_what_the_call_raises_is_raised_by_the_wait():
    call = ForkedCall(refuse, "total_epsilon: no noise level meets this budget")
    with pytest.raises(ConfigError, match="no noise level meets this budget"):
        call.result()


def die_in_the_child(parent: int):
    if os.getpid() != parent:
        os._exit(3)  # killed before it answered
    return "computed here"


def unpicklable_in_the_child(parent: int):
    return (lambda: None) if os.getpid() != parent else "computed here"


@needs_fork
@pytest.mark.parametrize("function", [die_in_the_child, unpicklable_in_the_child])
def test_a_child_without_an_answer_leaves_the_call_to_this_process(function):
    assert ForkedCall(function, os.getpid()).result() == "computed here"


def test_without_fork_the_call_runs_here(monkeypatch):
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    pid, value = ForkedCall(pid_and, 7).result()
    assert pid == os.getpid() and value == 7


@needs_fork
def test_a_cancelled_call_leaves_no_child():
    call = ForkedCall(pid_and, 1)
    pid = call._pid
    call.cancel()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@pytest.fixture
def fresh_calibrations():
    calibration.clear_cache()
    yield
    calibration.clear_cache()


@needs_fork
def test_a_study_calibrated_in_a_child_is_the_one_calibrated_here_and_is_remembered(fresh_calibrations, monkeypatch):
    spec = load_study_file(QUICKSTART)
    here = calibration.calibrate_study(spec, runs=6, train_size=1150)
    calibration.clear_cache()
    computed_in = []
    original = calibration._calibrate
    monkeypatch.setattr(calibration, "_calibrate", lambda *key: computed_in.append(os.getpid()) or original(*key))
    forked = calibration.start_study_calibration(spec, runs=6, train_size=1150).result()
    assert forked == here and computed_in == []  # the child's list, not this one, got the call
    monkeypatch.setattr(calibration, "_calibrate", lambda *key: pytest.fail("computed again"))
    assert calibration.calibrate_study(spec, runs=6, train_size=1150) == here  # remembered, as if computed here
    assert calibration.start_study_calibration(spec, runs=6, train_size=1150).result() == here  # no second child


@needs_fork
def test_the_child_hands_back_the_one_step_curves_each_trial_is_checked_on(fresh_calibrations, monkeypatch):
    """The first trial checks its run's ε on the calibrated σ's RDP curve: the child computed it, and hands it over
    bit for bit, so this process does not compute it again."""
    from opacus.accountants.analysis.rdp import compute_rdp

    from dpnas.dp import privacy as dp_privacy
    from dpnas.dp.config import PrivacyConfig, TrainConfig

    spec = load_study_file(QUICKSTART)
    dp_privacy.forget_step_rdp()
    here = os.getpid()

    def compute_in_the_child_only(**kwargs):
        if os.getpid() == here:
            pytest.fail("computed here, not in the child")
        return compute_rdp(**kwargs)

    monkeypatch.setattr(dp_privacy, "compute_rdp", compute_in_the_child_only)
    calibrated = calibration.start_study_calibration(spec, runs=6, train_size=1150).result()
    train_cfg = TrainConfig(batch_size=spec.train.batch_size, epochs=spec.train.epochs)
    trial_privacy = calibrated.privacy_for(PrivacyConfig(epsilon=8.0), train_cfg)
    plan = dp_privacy.plan_privacy(trial_privacy, dataset_size=1150, batch_size=train_cfg.batch_size,
                                   epochs=train_cfg.epochs)  # checks the run's ε on the handed-over curve
    assert plan.noise_multiplier == trial_privacy.noise_multiplier
    monkeypatch.undo()
    handed = dp_privacy.subsampled_gaussian_rdp(plan.noise_multiplier, plan.sample_rate, 1)
    orders = [float(a) for a in dp_privacy.ORDERS]
    assert np.array_equal(handed, compute_rdp(q=plan.sample_rate, noise_multiplier=plan.noise_multiplier, steps=1,
                                              orders=orders))
    dp_privacy.forget_step_rdp()


def test_a_budget_the_child_cannot_meet_is_refused_by_the_wait(fresh_calibrations):
    spec = load_study_file(QUICKSTART)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, batch_size=2000))
    pending = calibration.start_study_calibration(spec, runs=6, train_size=1150)
    with pytest.raises(ConfigError, match="batch_size: 2000 is larger than the 1150 training samples"):
        pending.result()


@needs_fork
def test_an_interrupted_wait_ends_the_child(fresh_calibrations):
    pending = calibration.start_study_calibration(load_study_file(QUICKSTART), runs=6, train_size=1150)
    pid = pending._call._pid
    pending.cancel()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert pending._call is None


class _Finalised:
    """Garbage in a reference cycle whose finaliser leaves a mark: what an old connection object might be."""

    def __init__(self, marks: Path) -> None:
        self.marks, self.cycle = marks, self

    def __del__(self) -> None:
        with open(self.marks, "a") as handle:
            handle.write(f"{os.getpid()}\n")


def allocate_cycles(n: int) -> int:
    import gc

    gc.set_threshold(700)  # the usual threshold: new cycles set off automatic collections wherever gc is enabled
    for _ in range(n):
        a: list = []
        a.append(a)
    return n


@needs_fork
def test_the_child_runs_no_finaliser_of_what_it_inherited(tmp_path):
    import gc

    marks = tmp_path / "marks"
    thresholds = gc.get_threshold()
    gc.set_threshold(10**9)  # this process collects nothing by itself until the end of the test
    try:
        _Finalised(marks)  # unreachable at once, but only a collection frees a cycle
        assert ForkedCall(allocate_cycles, 100_000).result() == 100_000
        assert not marks.exists()  # the child collected nothing inherited
    finally:
        gc.set_threshold(*thresholds)
    gc.collect()
    assert marks.read_text().split() == [str(os.getpid())]  # the parent's own collection still does

"""`dpnas search`'s progress bar: trials done of the budget, the best score and the search's ε from the storage;
plain lines, exactly as before, when the output is not a terminal or --quiet; one bar for K workers."""

import itertools
import queue
import re

import pytest
from search_helpers import write_study

from dpnas.data.datasets import load_dataset
from dpnas.search import runner
from dpnas.search.checks import CheckReport
from dpnas.search.privacy import RunPrivacy
from dpnas.search.study_file import load_study_file
from dpnas.search.study_privacy import account

# Every fake trial records this plan, so the ε after k trials is k of these runs composed.
PLAN = {"noise_multiplier": 1.2, "sample_rate": 0.2, "steps": 5, "val_noise": 3.0, "val_releases": 1}
SCORES = [0.5, 0.9, 0.7, 0.8, 0.6]


def epsilon_after(k):
    _, training, validation, _, _ = account([RunPrivacy(**PLAN)] * k, mode="fixed", delta=1e-5)
    return max(training, validation)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_fraction=0.2, seed=0, progress=False)


@pytest.fixture
def fake_trials(monkeypatch, digits):
    """Trials that record a privacy plan and a score without training (the k-th trained gets SCORES[k]), and no
    preflight: the bar's arithmetic, in milliseconds. (A repeated proposal is skipped before run_trial.)"""
    scores = itertools.count()

    def run_trial(study, trial, spec, data, configs, **_):
        trial.set_user_attr("privacy_plan", PLAN)
        score = SCORES[next(scores)]
        study.tell(trial, values=[score])
        return f"trial done: val accuracy {score:.4f}"

    monkeypatch.setattr(runner, "run_trial", run_trial)
    monkeypatch.setattr(runner, "check_search", lambda *args, **kwargs: CheckReport(data=digits, lines=[]))


def bar_states(stderr):
    """Each drawing of the bar with its postfix: (done, budget, postfix)."""
    return [(int(m[1]), int(m[2]), m[3]) for m in re.finditer(r"(\d+)/(\d+) \[[^\]]*?, (best [^\]]*)\]", stderr)]


def test_bar_counts_best_and_epsilon_and_starts_a_resumed_study_where_it_was(tmp_path, fake_trials, capsys):
    spec = load_study_file(write_study(tmp_path, n_trials=3, sampler="random"))
    runner.search(spec, progress_bar=True)
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"trial done: val accuracy {SCORES[i]:.4f}" for i in range(3)]  # above the bar
    states = bar_states(err)
    assert states[0] == (0, 3, "best -, eps 0.00")
    assert (1, 3, f"best 0.5000, eps {epsilon_after(1):.2f}") in states
    assert (2, 3, f"best 0.9000, eps {epsilon_after(2):.2f}") in states
    assert states[-1] == (3, 3, f"best 0.9000, eps {epsilon_after(3):.2f}")
    assert "trial/s" in err or "s/trial" in err  # tqdm's rate, whence the ETA

    runner.search(spec, n_trials=5, progress_bar=True)  # resume with a larger budget
    out, err = capsys.readouterr()
    states = bar_states(err)
    assert states[0] == (3, 5, f"best 0.9000, eps {epsilon_after(3):.2f}")
    assert states[-1] == (5, 5, f"best 0.9000, eps {epsilon_after(5):.2f}")
    assert out.splitlines() == ["trial done: val accuracy 0.8000", "trial done: val accuracy 0.6000"]


def test_plain_lines_when_not_a_terminal_and_nothing_when_quiet(tmp_path, fake_trials, capsys):
    spec = load_study_file(write_study(tmp_path, n_trials=2, sampler="random"))
    runner.search(spec)  # capsys's stdout is not a terminal: no bar, today's lines
    out, err = capsys.readouterr()
    assert out == "trial done: val accuracy 0.5000\ntrial done: val accuracy 0.9000\n"
    assert "trial/s" not in err and "/2 [" not in err
    runner.search(spec, n_trials=3, progress=False)  # --quiet
    out, err = capsys.readouterr()
    assert out == "" and "/3 [" not in err


class Stream:
    def __init__(self, terminal):
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.mark.parametrize("stdout,stderr,wanted", [(True, True, True), (False, True, False), (True, False, False)])
def test_the_bar_is_drawn_only_on_a_terminal_unless_forced(monkeypatch, stdout, stderr, wanted):
    from dpnas.search.progress import bar_wanted

    monkeypatch.setattr("sys.stdout", Stream(stdout))
    monkeypatch.setattr("sys.stderr", Stream(stderr))
    assert bar_wanted(True, None) is wanted
    assert bar_wanted(True, True) and not bar_wanted(True, False) and not bar_wanted(False, True)  # forced; quiet


class FakeWorker:
    def __init__(self, lines, said):
        self.lines, self.said = lines, list(said)

    def is_alive(self):
        if self.said:  # says one line per poll, then exits
            self.lines.put(self.said.pop(0))
            return True
        return False


class FakeBar:
    def __init__(self):
        self.written, self.refreshes = [], 0

    def write(self, line):
        self.written.append(line)

    def refresh(self):
        self.refreshes += 1


def test_the_parent_prints_every_workers_lines_above_one_bar(monkeypatch):
    monkeypatch.setattr(runner, "PROGRESS_POLL_SECONDS", 0.01)
    lines, bar = queue.Queue(), FakeBar()
    workers = [FakeWorker(lines, ["trial 0 done"]), FakeWorker(lines, ["[worker 1] trial 1 done",
                                                                       "[worker 1] trial 2 done"])]
    runner.follow_workers(workers, lines, bar)
    assert sorted(bar.written) == ["[worker 1] trial 1 done", "[worker 1] trial 2 done", "trial 0 done"]
    assert lines.empty() and bar.refreshes >= 1


def test_the_parent_returns_soon_after_its_last_worker_exits_and_redraws_once_a_second(monkeypatch):
    """It waited a whole redraw interval (1 s) for a line before it looked whether its workers were alive: a
    search with a bar returned up to 1 s after its last worker had exited."""
    clock = [0.0]
    waits = []

    class SilentQueue:  # no worker says anything; a wait passes on the clock
        def get(self, timeout):
            waits.append(timeout)
            clock[0] += timeout
            raise queue.Empty

    class Worker:  # alive for 2.5 s
        def is_alive(self):
            return clock[0] < 2.5

    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    bar = FakeBar()
    runner.follow_workers([Worker()], SilentQueue(), bar)
    assert max(waits) <= 0.1 and clock[0] <= 2.5 + 0.2  # noticed within two short waits of the exit
    assert bar.refreshes == 3  # at 1 s and 2 s, and once at the end: not at every wait

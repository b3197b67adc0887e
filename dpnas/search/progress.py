"""One progress bar over a search's trial budget: trials done of the budget, the best score and the search's ε so far,
elapsed time and ETA, with each finished trial's line printed above it.

The bar reads its numbers from the study's storage, so they are the same whoever ran the trials: this process, the
worker processes of ``--workers K`` (which send their lines here, so that one process owns the terminal), or workers
on other machines sharing a server storage. A resumed study starts the bar at the trials it already holds. The ε is
:func:`dpnas.search.study_privacy.study_privacy`'s, the same figure ``dpnas privacy`` reports.
"""

from __future__ import annotations

import math
import sys
from typing import IO

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from dpnas.search.checks import runs_charged
from dpnas.search.study_privacy import study_privacy
from dpnas.search.study_state import trial_budget


def bar_wanted(progress: bool, progress_bar: bool | None) -> bool:
    """The bar is drawn only on a terminal (unless forced): piped or logged output keeps the plain lines exactly."""
    if not progress:
        return False
    if progress_bar is not None:
        return progress_bar
    return sys.stdout.isatty() and sys.stderr.isatty()


class SearchProgress:
    """The study's one bar; :meth:`write` prints a trial's line above it, :meth:`refresh` redraws it from storage."""

    def __init__(self, study: optuna.Study, *, file: IO[str] | None = None) -> None:
        self._study = study
        self._charged = -1  # runs whose ε the postfix shows; -1: not accounted yet
        self._epsilon = 0.0
        self._total_epsilon = study.user_attrs.get("total_epsilon")
        target, done = self._counts()
        # initial=done: tqdm's rate (and so the ETA) counts only the trials this session finishes
        self._bar = tqdm(total=target, initial=done, unit="trial", dynamic_ncols=True, leave=True, file=file,
                         desc="search")
        self.refresh()

    def _counts(self) -> tuple[int | None, int]:
        target, used, waiting, running = trial_budget(self._study)
        # a random number of trials (Papernot & Steinke) must stay secret: no total on the bar
        secret = self._study.user_attrs.get("trial_count", "fixed") != "fixed"
        return None if secret else target, used - waiting - running

    def _best(self) -> float | None:
        # the first objective is always val_accuracy, maximised (a Pareto study's best score on it)
        scores = [t.values[0] for t in self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return max(scores, default=None)

    def refresh(self) -> None:
        target, done = self._counts()
        charged = runs_charged(self._study)
        if charged != self._charged:  # accounting only when a run was added: cheap to call every poll
            self._epsilon = study_privacy(self._study).epsilon
            self._charged = charged
        best = self._best()
        epsilon = "inf" if math.isinf(self._epsilon) else f"{self._epsilon:.2f}"
        if self._total_epsilon:
            epsilon += f"/{self._total_epsilon:g}"
        self._bar.total = target
        self._bar.n = done
        self._bar.set_postfix_str(f"best {'-' if best is None else f'{best:.4f}'}, eps {epsilon}", refresh=False)
        self._bar.refresh()

    def write(self, line: str) -> None:
        """A finished trial's line, above the bar (on stdout, as without a bar), then the bar with it counted."""
        tqdm.write(line)
        self.refresh()

    def close(self) -> None:
        self._bar.close()

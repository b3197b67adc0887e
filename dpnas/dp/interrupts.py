"""Ctrl-C held back while a finished trial is being recorded, and while a DP-SGD step is being taken.

A trial that trained to its end has spent its privacy and released its scores. If the interrupt lands while its
results, weights or final state are being written, the trial stays RUNNING: the resumed study fails it as an
orphan and trains the same configuration again (in a total-ε study, one of its K runs wasted). Held back for those
few milliseconds, the interrupt stops the search right after the trial is recorded instead.

SIGTERM (what a cluster scheduler or `kill` sends before it kills a job) is Ctrl-C to a search
(:func:`terminate_as_interrupt`): with Python's default it ended the process at once, its trial left RUNNING,
which a resume on another node (a requeued job, a journal on a shared disk) never took for an orphan: the slot
was lost, the study ended a trial short, and a total-epsilon study charged the dead run for good.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_held() -> Iterator[Callable[[], None]]:
    """SIGINT or SIGTERM received inside the block takes effect when the block ends, or where the block calls the
    function it yields (a training loop's step boundaries: one hold for many steps costs one handler swap, not one
    a step). Only the main thread can hold them."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in _HELD}

    def deliver() -> None:
        pending = list(dict.fromkeys(received))  # each once, in the order received
        received.clear()
        for signum in pending:
            handler = previous[signum]
            if callable(handler):  # Python's default SIGINT handler (or terminate_as_interrupt's): KeyboardInterrupt
                handler(signum, None)
            else:  # SIG_DFL or SIG_IGN: what the process would have done with it
                signal.signal(signum, handler)
                signal.raise_signal(signum)

    try:
        yield deliver
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        deliver()


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C: a search's parent passes it on to its workers (`kill PID` reaches it alone, where a
    terminal's Ctrl-C reaches the whole process group)."""


def _interrupt(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM inside the block is Ctrl-C: the running trial is failed and queued for retry, the process exits 130
    (only the main thread can handle it; elsewhere, and where SIGTERM is ignored, nothing changes)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

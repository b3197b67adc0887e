"""Ctrl-C held back while a finished trial is being recorded.

A trial that trained to its end has spent its privacy and released its scores. If the interrupt lands while its
results, weights or final state are being written, the trial stays RUNNING: the resumed study fails it as an
orphan and trains the same configuration again (in a total-ε study, one of its K runs wasted). Held back for those
few milliseconds, the interrupt stops the search right after the trial is recorded instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """SIGINT received inside the block takes effect when the block ends (only the main thread can hold it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):  # Python's default handler: raises KeyboardInterrupt here
                previous(signal.SIGINT, None)
            else:  # SIG_DFL or SIG_IGN: what the process would have done with it
                signal.raise_signal(signal.SIGINT)

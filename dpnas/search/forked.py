"""One function call computed in a forked child process while this process goes on with other work.

A search's start does two slow things that hold the GIL most of the time: the total-ε calibration (Opacus's RDP
series in pure Python) and torch's first optimizer, which imports ``torch._dynamo`` (1.2-1.5 s on 2 CPU cores).
In one process they take the sum of their times; with the calibration in a forked child they take the longer one.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
from collections.abc import Callable
from typing import Any


class ForkedCall:
    """``function(*args)`` started in a forked child; :meth:`result` waits for it and returns it (or raises what it
    raised). Where this platform cannot fork, or the child dies without an answer, the call runs here instead, so
    the result never depends on the child: it only saves time.

    The child only computes and writes its pickled answer to a pipe; it never touches a storage, a file or the
    terminal, collects no garbage, and leaves with ``os._exit`` (no atexit handlers, no finalisers, no flushing of
    buffers it inherited), so the sockets and files it shares with the parent are left as they were.
    """

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self._function, self._args = function, args
        self._pid: int | None = None
        self._read = -1
        if "fork" not in multiprocessing.get_all_start_methods():
            return
        read, write = os.pipe()
        try:
            pid = os.fork()
        except OSError:  # out of processes or memory: compute it here
            os.close(read)
            os.close(write)
            return
        if pid == 0:  # the child
            # no collection of objects inherited from the parent: a finaliser there (an old database connection
            # in a reference cycle, say) could act on something the parent still uses
            gc.disable()
            status = 0
            try:
                os.close(read)
                try:
                    answer = (True, function(*args))
                except BaseException as err:  # noqa: BLE001 - handed to the parent, which raises it
                    answer = (False, err)
                with os.fdopen(write, "wb") as pipe:
                    pickle.dump(answer, pipe)
            except BaseException:  # noqa: BLE001 - e.g. an unpicklable answer: the parent computes it itself
                status = 1
            finally:
                os._exit(status)
        os.close(write)
        self._pid, self._read = pid, read

    def result(self) -> Any:
        if self._pid is None:
            return self._function(*self._args)
        try:
            with os.fdopen(self._read, "rb") as pipe:
                data = pipe.read()
        finally:
            os.waitpid(self._pid, 0)
            self._pid = None
        try:
            ok, value = pickle.loads(data)
        except Exception:  # noqa: BLE001 - the child died before it answered
            return self._function(*self._args)
        if not ok:
            raise value
        return value

    def cancel(self) -> None:
        """Stop waiting: end the child (if any) and reap it."""
        if self._pid is not None:
            try:
                os.kill(self._pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(self._pid, 0)
            os.close(self._read)
            self._pid = None

"""Keep an Optuna journal file whole: damage at its end is cut off (and saved beside it) before anything is appended.

Why: Optuna's ``JournalFileBackend`` appends each record straight after the file's last byte. When a write was cut
short (a crash, a full disk) the next record is glued onto the partial one, that line is no longer JSON, and from
then on every read of the study raises: all its finished trials are lost. (Optuna reads through a partial *last*
line, and through a broken line that nothing follows, but stops with an error at a broken line that has records
after it.)

Damage is the first line that has no newline, is not JSON, or is not a journal record (a dict with a known
``op_code``). Damage at the end (nothing whole after it: a cut write, a zero-filled tail) is cut off; what is cut
stays in the backup, ``NAME.damaged-YYYYmmdd-HHMMSS`` (the original bytes; an earlier backup is never overwritten),
and one log line says what was dropped. Damage with whole records after it (bytes changed in place) is refused,
and the file left as it is: Optuna replays records in order and numbers studies and trials by the order of their
creation records, so skipping the bad line would attach the records after it to the wrong trial, and cutting
there would drop finished trials and the record of the privacy they spent (a total-ε study would spend it again).

Locking: every journal writer appends under Optuna's lock file (``PATH.lock``, a ``JournalFileSymlinkLock``). The
check and the cut happen under that lock, right after it is taken for each append, so no writer appends between
the check and the cut, no record is ever appended to a damaged end, and two processes never repair at once.

Reads never modify the file: they stop quietly at the first damage, so the whole records before it are seen.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Iterator

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.storages.journal._file import BaseJournalFileLock, get_lock_file
from optuna.storages.journal._storage import JournalOperation

from dpnas.arch.space import ConfigError
from dpnas.dp.interrupts import interrupts_held

_logger = logging.getLogger(__name__)
_OP_CODES = frozenset(int(op) for op in JournalOperation)


@dataclass(frozen=True)
class Damage:
    offset: int  # where the first damaged line starts: every byte before it is kept
    line: int  # its line number, from 1
    reason: str
    kept_records: int
    dropped_bytes: int
    dropped_records: int  # whole records after the damaged line: lost with it, since the order matters

    def describe(self) -> str:
        after = f" and the {self.dropped_records} whole records after it" if self.dropped_records else ""
        return (f"damaged at byte {self.offset} (line {self.line}: {self.reason}) after {self.kept_records} whole "
                f"records; {self.dropped_bytes} bytes from there on: the damaged line{after}")


def is_journal_record(value: Any) -> bool:
    return isinstance(value, dict) and value.get("op_code") in _OP_CODES and isinstance(value.get("worker_id"), str)


def _line_problem(line: bytes) -> str | None:
    if not line.endswith(b"\n"):
        return "a partial record, the line has no end"
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        return "not JSON"
    return None if is_journal_record(record) else "JSON but not a journal record"


def find_damage(data: bytes, start: int = 0) -> Damage | None:
    """The first damaged line of journal bytes `data` at or after `start` (a line boundary), or None."""
    lines = list(io.BytesIO(data[start:]))  # split as Optuna splits: on b"\n" only
    kept = data[:start].count(b"\n")
    offset = start
    for index, line in enumerate(lines):
        problem = _line_problem(line)
        if problem is not None:
            later = sum(_line_problem(rest) is None for rest in lines[index + 1:])
            return Damage(offset=offset, line=kept + 1, reason=problem, kept_records=kept,
                          dropped_bytes=len(data) - offset, dropped_records=later)
        offset += len(line)
        kept += 1
    return None


def _save_backup(path: Path, data: bytes) -> Path:
    """Write `data` to a new file beside `path`, durably; a name already taken gets a counter, never overwritten."""
    stem = f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        backup = path.with_name(stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            handle = open(backup, "xb")
        except FileExistsError:
            continue
        try:
            with handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            backup.unlink()  # a partial backup (the disk is full?) must not pass for the original
            raise
        return backup
    raise FileExistsError(f"{stem}: too many backups with this name")


class JournalDamagedInside(ConfigError):
    """Damage with whole records after it: not cut, since they would be lost with it."""

    def __init__(self, path: Path, damage: Damage) -> None:
        super().__init__(
            f"journal {path}: {damage.describe()}. dpnas does not cut whole records off: they may hold finished "
            f"trials and the privacy they spent, and they cannot be replayed without the damaged one. Restore the "
            f"file from a copy; or keep the {damage.kept_records} records before the damage (`cp {path} "
            f"{path}.orig && truncate -s {damage.offset} {path}`) and, for a study with a total_epsilon, go on in a "
            "new study instead, since the spending recorded after the damage would be lost")


class WholeJournalFileBackend(JournalFileBackend):
    """Optuna's journal file backend, except that it cuts damage off before each append and reads stop at damage."""

    def __init__(self, file_path: str) -> None:
        self._writers_lock = JournalFileSymlinkLock(file_path)  # the lock Optuna's own backend takes for appends
        super().__init__(file_path, lock_obj=_CutDamageOnAcquire(self._writers_lock, self))
        self._whole_size = 0  # bytes from the start already found whole: later checks read only what follows
        self._held: list[dict[str, Any]] | None = None  # records of an appending_together() block, not yet written

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self._held is None:
            with interrupts_held():  # see appending_together
                super().append_logs(logs)
            return
        for log in logs:
            json.dumps(log)  # a value JSON cannot hold is refused by the call that set it, as it would be unheld
        self._held.extend(logs)

    @contextlib.contextmanager
    def appending_together(self) -> Iterator[None]:
        """Records appended inside the block are written at its end, in order, as one append: one lock, one write
        and one fsync instead of one each (0.4 ms apiece on a local disk, more on a network one). They are written
        even when the block raises; only a process killed inside the block loses them, as it would the records it
        had not reached yet. Inside the block this process's reads do not see them yet, so use it for writes
        nothing reads back before the block ends (a trial's user attributes)."""
        if self._held is not None:  # nested: the outer block writes them
            yield
            return
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            if held:
                # Ctrl-C waits for the append: landing between Optuna taking its lock file and the write, it left
                # the lock behind, and the interrupted trial's own last records waited out its 30 s grace period
                with interrupts_held():
                    super().append_logs(held)

    def repair(self) -> None:
        """Cut damage off now, under the writers' lock, instead of at the first append."""
        with get_lock_file(self._writers_lock):
            self._cut_damage()

    def _cut_damage(self) -> None:
        """Back up and cut a damaged end; the caller holds the writers' lock."""
        path = Path(self._file_path)
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            start = self._whole_size if self._whole_size <= size else 0  # shorter: someone cut it, check it all
            handle.seek(start)
            if find_damage(handle.read()) is None:
                self._whole_size = size
                return
            handle.seek(0)
            data = handle.read()
        damage = find_damage(data, start)
        assert damage is not None
        if damage.dropped_records:
            raise JournalDamagedInside(path, damage)
        backup = _save_backup(path, data)
        with open(path, "r+b") as handle:
            handle.truncate(damage.offset)
            handle.flush()
            os.fsync(handle.fileno())
        self._whole_size = damage.offset
        # Optuna caches where each record starts; one past the cut would point into the bytes just removed
        self._log_number_offset = {n: at for n, at in self._log_number_offset.items() if at <= damage.offset}
        _logger.warning(f"journal {path}: {damage.describe()}; dropped them (records after a damaged one cannot be "
                        f"replayed without it) and kept the {damage.kept_records} before; the original is in {backup}")

    def damage(self) -> Damage | None:
        """The file's damage now, if any (reads the whole file; changes nothing)."""
        return find_damage(Path(self._file_path).read_bytes())

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        try:
            for record in super().read_logs(log_number_from):
                if not is_journal_record(record):
                    return  # JSON Optuna could not replay: damage like any other
                yield record
        except ValueError:
            return  # Optuna raises at a broken line that has records after it; those before it were all yielded


class _CutDamageOnAcquire(BaseJournalFileLock):
    """Optuna's append takes this lock right before it writes: taking it checks (and cuts) the file's end too."""

    def __init__(self, writers_lock: BaseJournalFileLock, backend: WholeJournalFileBackend) -> None:
        self._writers_lock = writers_lock
        self._backend = backend

    def acquire(self) -> bool:
        self._writers_lock.acquire()
        try:
            self._backend._cut_damage()
        except BaseException:
            self._writers_lock.release()  # nothing is appended after damage that could not be cut
            raise
        return True

    def release(self) -> None:
        self._writers_lock.release()


def report_damage(path: Path) -> Damage | None:
    """Say (without changing the file) that a journal is damaged and what reads of it will see."""
    damage = find_damage(path.read_bytes())
    if damage is not None:
        then = ("the next `dpnas search` refuses it: whole records after the damage cannot be replayed without it"
                if damage.dropped_records else "the next `dpnas search` saves it aside and cuts the damage off")
        _logger.warning(f"journal {path}: {damage.describe()}; reading the {damage.kept_records} records before it and "
                        f"leaving the file as it is ({then})")
    return damage

"""Where results go and how they are written: strict JSON, written atomically."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_RUNS_DIR = Path("runs")


def json_safe(value: Any) -> Any:
    """Non-finite floats become null (strict JSON has no inf/NaN); `private: false` says why ε is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class OutputError(ValueError):
    """A file the user asked for cannot be written there; found before anything is run, so nothing is lost."""


def writable_file(value: str) -> str:
    """An argparse type for a result file that is written after a long run: :func:`check_writable` at parse time,
    so a bad path is a usage error before anything runs, not a traceback that loses the measurements."""
    try:
        return str(check_writable(value, what="file"))
    except OutputError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def check_writable(path: str | Path, *, what: str = "--out") -> Path:
    """Make sure `path` can be written later (its folder is created), by writing a scratch file beside it.

    A run that trains first and only then finds its result file unwritable loses the result and the ε it spent.
    The scratch file is where the atomic writes put theirs, beside the target, and is removed at once.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a directory; give a file name")
    if path.exists() and not path.is_file():  # the atomic write would replace a device or a pipe by a file
        raise OutputError(f"{what} {path}: is not a regular file; give a file name")
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise OutputError(f"{what} {path}: {folder} is a file, not a folder; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=path.parent)
        os.close(handle)
        os.unlink(scratch)
    except OSError as err:
        raise OutputError(f"{what} {path}: cannot write there ({err.strerror or err}); choose another path") from None
    return path


def check_folder(path: str | Path, *, what: str = "--out-dir") -> Path:
    """Make sure `path` is, or can become, a folder to write results in; nothing is created yet."""
    path = Path(path)
    try:
        for p in (path, *path.parents):
            if p.is_symlink() and not p.exists():
                raise OutputError(f"{what} {path}: {p} is a link to nothing; choose another path")
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
    except OSError as err:  # a name too long, a folder that cannot be looked into
        raise OutputError(f"{what} {path}: {err.strerror or err}; choose another path") from None
    if existing is not None and not existing.is_dir():
        raise OutputError(f"{what} {path}: {existing} is a file, not a folder; choose another path")
    if existing is not None and (not os.access(existing, os.W_OK | os.X_OK) or existing.is_relative_to("/proc")):
        raise OutputError(f"{what} {path}: cannot write in {existing}; choose another path")
    return path


def check_distinct(*, inputs: dict[str, str | Path | None] | None = None, **paths: str | Path | None) -> None:
    """Refuse two outputs of one command that name the same file (the later write would replace the earlier), and
    an output that names one of the command's `inputs` (a recipe, a study file, its storage): writing it would
    destroy what the command reads."""
    for source, read in (inputs or {}).items():
        if read is None or not Path(read).is_file():
            continue
        for what, path in paths.items():
            if path is not None and Path(path).resolve() == Path(read).resolve():
                raise OutputError(f"--{what.replace('_', '-')} {path} is the {source} this command reads; writing it "
                                  "would replace it: choose another path")
    seen: dict[Path, str] = {}
    for what, path in paths.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise OutputError(f"--{what.replace('_', '-')} and --{seen[resolved].replace('_', '-')} name the same file "
                              f"({path}); give each its own")
        seen[resolved] = what


def write_json(path: str | Path, record: Any) -> Path:
    """Write `record` to `path` atomically, so an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def default_result_path(kind: str, *names: str, runs_dir: Path = DEFAULT_RUNS_DIR) -> Path:
    slug = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", n) for n in names if n)
    return runs_dir / f"{kind}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"

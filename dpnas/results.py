"""Where results go and how they are written: strict JSON, written atomically."""

from __future__ import annotations

import json
import math
import os
import re
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

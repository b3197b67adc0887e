"""PNG and SVG figures through kaleido >= 1, which drives a Chrome/Chromium installed on this machine.

Kaleido 1.x ships no browser. It starts one through ``choreographer``, which looks at the ``BROWSER_PATH``
environment variable first, then for ``chrome``/``chromium``/``chromium-browser``/``google-chrome``... on PATH and
in the usual install folders, then at the copy that ``plotly_get_chrome`` downloads. :func:`find_browser` asks the
same finder, so dpnas refuses a PNG/SVG request before it writes anything rather than after the HTML. Choreographer
starts the browser with ``--no-sandbox`` unless told otherwise, so it also runs as root in a container.
"""

from __future__ import annotations

import os
from pathlib import Path

import plotly.graph_objects as go

STATIC_FORMATS = ("png", "svg")
INSTALL_HINT = ("install Chromium (Debian/Ubuntu: apt-get install chromium), or download a Chrome for kaleido with "
                "`plotly_get_chrome`, or point BROWSER_PATH at a Chrome/Chromium executable")


class StaticExportError(RuntimeError):
    """PNG/SVG export cannot work on this machine; the message says what to install."""


def _executable(path: str) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def find_browser() -> str | None:
    """The Chrome/Chromium kaleido would start, or None where there is none (or BROWSER_PATH names no program)."""
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:  # pragma: no cover - kaleido (and choreographer) are dpnas dependencies
        return None
    try:
        path = Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - a finder that fails has found nothing
        return None
    return path if path and _executable(path) else None


def check_static_export() -> str:
    """The browser's path; raises StaticExportError with what to install when PNG/SVG cannot be written."""
    try:
        import kaleido  # noqa: F401
    except ImportError as err:  # pragma: no cover - a dependency of dpnas
        raise StaticExportError("PNG/SVG export needs kaleido >= 1.0 (pip install 'kaleido>=1.0')") from err
    browser = find_browser()
    if browser is None:
        where = os.environ.get("BROWSER_PATH")
        found = f"BROWSER_PATH={where!r} is not an executable" if where else "no Chrome/Chromium found"
        raise StaticExportError(f"PNG/SVG export needs a Chrome or Chromium and {found}: {INSTALL_HINT}")
    return browser


def write_static(figures: list[go.Figure], paths: list[Path]) -> None:
    """Write each figure to its path (format from the suffix) with one browser for all of them.

    MathJax is left out: kaleido would fetch it from a CDN, and dpnas's figures have no LaTeX.
    """
    import kaleido
    import plotly.io as pio

    size = {"width": pio.defaults.default_width, "height": pio.defaults.default_height,
            "scale": pio.defaults.default_scale}
    specs = [{"fig": figure.to_dict(), "path": Path(path), "opts": {"format": Path(path).suffix.lstrip("."), **size}}
             for figure, path in zip(figures, paths)]
    if specs:
        kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False})

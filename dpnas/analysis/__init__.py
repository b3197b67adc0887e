"""Analysis of dpnas studies: one tidy DataFrame of trials, and one figure per module.

Flow: arch → data → dp → search → **analysis**. It reads finished studies and draws them; it trains nothing.
May import: dpnas.arch, dpnas.dp, dpnas.search.

Each figure module separates its data (``*_info(df) -> NamedTuple``, what the tests check)
from its drawing (``*_figure(info) -> go.Figure``).
"""

from dpnas.analysis.frame import COMPONENTS, trials_frame

__all__ = ["COMPONENTS", "trials_frame"]

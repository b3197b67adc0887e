"""Width x depth: the best validation accuracy reached at each pair."""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd
import plotly.graph_objects as go

from dpnas.analysis.frame import finished


class HeatmapInfo(NamedTuple):
    widths: list[float]
    depths: list[float]
    best: list[list[float]]  # best[i][j]: depth i, width j (NaN where no trial ran)
    counts: list[list[int]]


def width_depth_info(frame: pd.DataFrame) -> HeatmapInfo:
    done = finished(frame)
    if done.empty:
        return HeatmapInfo([], [], [], [])
    widths = sorted(done["width"].unique().tolist())
    depths = sorted(done["depth"].unique().tolist())
    best = [[math.nan] * len(widths) for _ in depths]
    counts = [[0] * len(widths) for _ in depths]
    for (width, depth), group in done.groupby(["width", "depth"]):
        i, j = depths.index(depth), widths.index(width)
        best[i][j] = float(group["val_accuracy"].max())
        counts[i][j] = len(group)
    return HeatmapInfo(widths, depths, best, counts)


def width_depth_figure(info: HeatmapInfo) -> go.Figure:
    figure = go.Figure(go.Heatmap(
        x=[str(w) for w in info.widths], y=[str(d) for d in info.depths], z=info.best, customdata=info.counts,
        colorscale="Viridis", colorbar={"title": "best val acc"},
        hovertemplate="width %{x}, depth %{y}<br>best %{z:.4f} (%{customdata} trials)<extra></extra>",
    ))
    figure.update_layout(title="Best validation accuracy by width and depth", xaxis_title="width multiplier",
                         yaxis_title="depth multiplier")
    return figure

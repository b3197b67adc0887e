"""Accuracy against the privacy budget, when a study searched several budgets."""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd
import plotly.graph_objects as go

from dpnas.analysis.frame import finished


class BudgetInfo(NamedTuple):
    epsilons: list[float]  # finite targets, ascending (non-private runs are listed separately)
    best: list[float]
    median: list[float]
    nonprivate_best: float  # NaN when no non-private trial


def budget_info(frame: pd.DataFrame) -> BudgetInfo:
    done = finished(frame)
    done = done[done["epsilon_target"].notna()]
    if done.empty:
        return BudgetInfo([], [], [], math.nan)
    private = done[done["epsilon_target"].apply(math.isfinite)]
    stats = private.groupby("epsilon_target")["val_accuracy"].agg(["max", "median"]).sort_index()
    nonprivate = done[~done["epsilon_target"].apply(math.isfinite)]["val_accuracy"]
    return BudgetInfo(stats.index.tolist(), stats["max"].tolist(), stats["median"].tolist(),
                      float(nonprivate.max()) if len(nonprivate) else math.nan)


def budget_figure(info: BudgetInfo) -> go.Figure:
    figure = go.Figure([
        go.Scatter(x=info.epsilons, y=info.best, mode="lines+markers", name="best"),
        go.Scatter(x=info.epsilons, y=info.median, mode="lines+markers", name="median"),
    ])
    if not math.isnan(info.nonprivate_best):
        figure.add_hline(y=info.nonprivate_best, line_dash="dash", annotation_text="non-private best")
    figure.update_layout(title="Validation accuracy against the privacy budget", xaxis_title="target epsilon",
                         yaxis_title="validation accuracy")
    return figure

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


def budget_column(frame: pd.DataFrame) -> str:
    """The column that holds each trial's privacy budget: the searched ``epsilon`` where the study searched it.

    A trial's ``epsilon_target`` is the ε its own run was held to, which is not a budget the user chose in a
    total-ε study (each searched batch size and epoch count gets its own calibrated per-run ε) or under TAN
    (the simulated run's real ε): grouping by it drew a curve of "budgets" that were never searched.
    """
    return "epsilon" if "epsilon" in frame.attrs.get("searched", []) and "epsilon" in frame else "epsilon_target"


def budget_info(frame: pd.DataFrame) -> BudgetInfo:
    done = finished(frame)
    column = budget_column(frame)
    done = done[pd.to_numeric(done[column], errors="coerce").notna()]
    if done.empty:
        return BudgetInfo([], [], [], math.nan)
    budgets = done[column].astype(float)
    private = done[budgets.apply(math.isfinite)]
    stats = private.groupby(budgets[private.index])["val_accuracy"].agg(["max", "median"]).sort_index()
    nonprivate = done[~budgets.apply(math.isfinite)]["val_accuracy"]
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

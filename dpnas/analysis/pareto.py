"""Accuracy against cost (parameters, time per epoch) with the Pareto front."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import plotly.graph_objects as go

from dpnas.analysis.frame import finished


class ParetoInfo(NamedTuple):
    cost: str
    trials: list[int]
    costs: list[float]
    accuracies: list[float]
    front: list[int]  # trial numbers on the front, cheapest first


def pareto_info(frame: pd.DataFrame, cost: str = "params") -> ParetoInfo:
    done = finished(frame)
    done = done[done[cost].notna()].sort_values([cost, "val_accuracy"], ascending=[True, False])
    front, best, best_cost = [], float("-inf"), None
    for _, row in done.iterrows():  # cheapest first: a point is on the front if it beats all cheaper ones
        # or ties the last front point exactly (same cost and accuracy: neither dominates, as in Optuna's
        # best_trials, the Pareto set `dpnas best` exports)
        if row["val_accuracy"] > best or (row["val_accuracy"] == best and row[cost] == best_cost):
            front.append(int(row["number"]))
            best, best_cost = row["val_accuracy"], row[cost]
    return ParetoInfo(cost, done["number"].astype(int).tolist(), done[cost].tolist(),
                      done["val_accuracy"].tolist(), front)


def pareto_figure(info: ParetoInfo) -> go.Figure:
    on_front = [info.trials.index(n) for n in info.front]
    figure = go.Figure([
        go.Scatter(x=info.costs, y=info.accuracies, mode="markers", name="trials", customdata=info.trials,
                   hovertemplate="trial %{customdata}<br>%{x}<br>val accuracy %{y:.4f}<extra></extra>"),
        go.Scatter(x=[info.costs[i] for i in on_front], y=[info.accuracies[i] for i in on_front],
                   mode="lines+markers", name="Pareto front", line={"shape": "hv"}),
    ])
    label = {"params": "parameters", "epoch_seconds": "seconds per epoch"}.get(info.cost, info.cost)
    figure.update_layout(title=f"Validation accuracy against {label}", xaxis_title=label, xaxis_type="log",
                         yaxis_title="validation accuracy")
    return figure

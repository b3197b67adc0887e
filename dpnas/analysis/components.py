"""Accuracy by component value: every trial as a point, the spread as a box, values ordered by median."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import plotly.graph_objects as go

from dpnas.analysis.frame import finished
from dpnas.arch.conditions import ARCH_RELEVANCE, matters


def relevant(done: pd.DataFrame, component: str) -> pd.DataFrame:
    """The trials in which `component` shaped the model: ``groups`` only with GroupNorm, ``scalenorm`` only with a
    norm and a merge (:data:`dpnas.arch.conditions.ARCH_RELEVANCE`). Elsewhere the field keeps its base (or
    neutral) value, which was never searched, so counting those trials under it would show a value and a spread
    that no trial of that value produced."""
    if component not in ARCH_RELEVANCE or done.empty:
        return done

    def holds(row: pd.Series) -> bool:
        try:
            return matters(ARCH_RELEVANCE, component, row)
        except (KeyError, TypeError):  # a row without the fields the rule reads: kept, as before
            return True

    return done[done.apply(holds, axis=1)]


class ComponentInfo(NamedTuple):
    component: str
    order: list[str]  # component values, best median accuracy first
    accuracies: dict[str, list[float]]
    trials: dict[str, list[int]]
    medians: dict[str, float]


def component_info(frame: pd.DataFrame, component: str) -> ComponentInfo:
    done = finished(frame)
    if component in done:
        done = relevant(done, component)
    accuracies: dict[str, list[float]] = {}
    trials: dict[str, list[int]] = {}
    if component in done:
        for value, group in done.groupby(done[component].astype(str)):
            accuracies[value] = group["val_accuracy"].tolist()
            trials[value] = group["number"].tolist()
    medians = {k: float(pd.Series(v).median()) for k, v in accuracies.items()}
    order = sorted(medians, key=lambda k: (-medians[k], k))
    return ComponentInfo(component, order, accuracies, trials, medians)


def component_figure(info: ComponentInfo) -> go.Figure:
    figure = go.Figure()
    for value in info.order:
        figure.add_trace(go.Box(
            y=info.accuracies[value], name=value, boxpoints="all", jitter=0.4, pointpos=0,
            customdata=info.trials[value], hovertemplate="trial %{customdata}<br>val accuracy %{y:.4f}<extra></extra>",
        ))
    figure.update_layout(
        title=f"Validation accuracy by {info.component} (ordered by median)",
        xaxis_title=info.component, yaxis_title="validation accuracy", showlegend=False,
    )
    return figure


def components_to_show(frame: pd.DataFrame, candidates: tuple[str, ...]) -> list[str]:
    """The components that vary among finished trials (a constant one says nothing)."""
    done = finished(frame)
    return [c for c in candidates if c in done and relevant(done, c)[c].astype(str).nunique() > 1]


def component_effects(frame: pd.DataFrame, components: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per (component, value): trials, median and best accuracy, and the median's distance to the best value's.

    An ablation study's table is :func:`dpnas.analysis.ablation.ablation_effects` instead: each value against the
    base point, with intervals over seeds and a paired test (its trials are not a sample of the space, so medians
    over every trial sharing a value would mix in the other axes' moves).
    """
    from dpnas.analysis.ablation import ablation_effects, is_ablation
    from dpnas.analysis.frame import COMPONENTS

    if is_ablation(frame):
        return ablation_effects(frame, components)
    rows = []
    for component in components_to_show(frame, components or COMPONENTS):
        info = component_info(frame, component)
        top = info.medians[info.order[0]]
        for value in info.order:
            accuracies = info.accuracies[value]
            rows.append({"component": component, "value": value, "trials": len(accuracies),
                         "median_val_accuracy": info.medians[value], "best_val_accuracy": max(accuracies),
                         "median_minus_best_median": info.medians[value] - top})
    return pd.DataFrame(rows, columns=["component", "value", "trials", "median_val_accuracy", "best_val_accuracy",
                                       "median_minus_best_median"])

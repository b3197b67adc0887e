"""Write every figure of a study: HTML always (self-contained, opens offline), PNG/SVG where it can."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go

from dpnas.analysis.ablation import ablation_axes, ablation_figure, ablation_info, is_ablation
from dpnas.analysis.budget import budget_figure, budget_info
from dpnas.analysis.components import component_figure, component_info, components_to_show
from dpnas.analysis.dp_gap import dp_gap_figure, dp_gap_info
from dpnas.analysis.frame import COMPONENTS, finished, trials_frame
from dpnas.analysis.heatmap import width_depth_figure, width_depth_info
from dpnas.analysis.pareto import pareto_figure, pareto_info

FORMATS = ("html", "png", "svg")


def _empty(title: str, reason: str) -> go.Figure:
    figure = go.Figure()
    figure.update_layout(title=title, annotations=[{"text": reason, "showarrow": False, "x": 0.5, "y": 0.5,
                                                    "xref": "paper", "yref": "paper"}])
    return figure


def study_figures(study: optuna.Study, frame: pd.DataFrame | None = None) -> dict[str, go.Figure]:
    """Every figure that the study has data for; an empty study gives one empty figure and a warning."""
    frame = trials_frame(study) if frame is None else frame
    done = finished(frame)
    if done.empty:
        warnings.warn(f"study {study.study_name!r} has no completed trial: nothing to plot", stacklevel=2)
        return {"empty": _empty(f"{study.study_name}: no completed trial yet", "run `dpnas search` first")}
    figures: dict[str, go.Figure] = {}
    if is_ablation(frame):  # every ablated axis against the base point, with intervals over seeds
        for component in ablation_axes(frame):
            figures[f"component_{component}"] = ablation_figure(ablation_info(frame, component))
    else:
        for component in components_to_show(frame, COMPONENTS):
            figures[f"component_{component}"] = component_figure(component_info(frame, component))
    if done["width"].nunique() > 1 or done["depth"].nunique() > 1:
        figures["width_depth"] = width_depth_figure(width_depth_info(frame))
    gap = dp_gap_info(frame)
    if gap.labels:
        figures["dp_gap"] = dp_gap_figure(gap)
    for cost in ("params", "epoch_seconds"):
        if done[cost].notna().any():
            figures[f"pareto_{cost}"] = pareto_figure(pareto_info(frame, cost))
    budgets = budget_info(frame)
    if len(budgets.epsilons) > 1 or (budgets.epsilons and not math.isnan(budgets.nonprivate_best)):
        figures["accuracy_vs_epsilon"] = budget_figure(budgets)
    figures.update(_optuna_figures(study))
    return figures


def _optuna_figures(study: optuna.Study) -> dict[str, go.Figure]:
    from optuna import visualization as vis

    single = len(study.directions) == 1
    target = None if single else (lambda t: t.values[0])
    makers = {
        "optuna_history": lambda: vis.plot_optimization_history(study, target=target, target_name="val_accuracy"),
        "optuna_intermediate_values": lambda: vis.plot_intermediate_values(study),
        "optuna_param_importances": lambda: vis.plot_param_importances(study, target=target, target_name="val_accuracy"),
    }
    figures = {}
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figures[name] = make()
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials
            warnings.warn(f"{name} skipped: {err}", stacklevel=2)
    return figures


def write_figures(figures: dict[str, go.Figure], out_dir: Path, *, formats: tuple[str, ...] = ("html",)) -> tuple[list[Path], list[str]]:
    """Write each figure in each format; returns (files written, messages about formats that could not be)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format {unknown[0]!r}; expected some of: {', '.join(FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written, problems = [], []
    for name, figure in figures.items():
        if "html" in formats:
            path = out_dir / f"{name}.html"
            figure.write_html(path, include_plotlyjs=True, full_html=True)  # plotly.js inline: works offline
            written.append(path)
        for fmt in (f for f in formats if f != "html"):
            if problems and fmt in problems[-1]:
                continue
            path = out_dir / f"{name}.{fmt}"
            try:
                figure.write_image(path)
                written.append(path)
            except Exception as err:  # kaleido missing, or its browser: say so once, keep the HTML
                reason = " ".join(str(err).split())[:300] or type(err).__name__
                problems.append(f"{fmt}: static export is not available on this machine ({reason}); "
                                f"kaleido >= 1 and a Chrome/Chromium give {fmt} files. The HTML files have every figure.")
    return written, problems


def attach_to_dashboard(study: optuna.Study, figures: dict[str, go.Figure]) -> int:
    """Save dpnas's own figures into the study so optuna-dashboard shows them (Optuna's it draws itself)."""
    from optuna_dashboard import save_plotly_graph_object

    count = 0
    for name, figure in figures.items():
        if name.startswith("optuna_") or name == "empty":
            continue
        save_plotly_graph_object(study, figure, graph_object_id=f"dpnas-{name}".replace("_", "-"))
        count += 1
    return count

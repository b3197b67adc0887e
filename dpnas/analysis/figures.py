"""Every figure of a study, and writing them: HTML sharing one plotly.js, PNG/SVG through kaleido and a Chromium."""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go

from dpnas.analysis.ablation import ablation_axes, ablation_figure, ablation_info, is_ablation
from dpnas.analysis.budget import budget_column, budget_figure, budget_info
from dpnas.analysis.components import component_figure, component_info, components_to_show
from dpnas.analysis.dp_gap import dp_gap_figure, dp_gap_info
from dpnas.analysis.frame import COMPONENTS, finished, trials_frame
from dpnas.analysis.heatmap import width_depth_figure, width_depth_info
from dpnas.analysis.pareto import pareto_figure, pareto_info
from dpnas.analysis.static import STATIC_FORMATS, StaticExportError, check_static_export, write_static

FORMATS = ("html", "png", "svg")


def _empty(title: str, reason: str) -> go.Figure:
    figure = go.Figure()
    figure.update_layout(title=title, annotations=[{"text": reason, "showarrow": False, "x": 0.5, "y": 0.5,
                                                    "xref": "paper", "yref": "paper"}])
    return figure


def study_figures(study: optuna.Study, frame: pd.DataFrame | None = None,
                  companion: pd.DataFrame | None = None) -> dict[str, go.Figure]:
    """Every figure that the study has data for; an empty study gives one empty figure and a warning.

    `companion`: another study's trials (its numbers kept apart), which join the DP-gap figure only."""
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
    both = frame
    if companion is not None:
        both = pd.concat([frame, companion], ignore_index=True)
        both.attrs = dict(frame.attrs)  # the study's searched axes label the bars
    gap = dp_gap_info(both)
    if gap.labels:
        figures["dp_gap"] = dp_gap_figure(gap)
    for cost in ("params", "epoch_seconds"):
        if done[cost].notna().any():
            figures[f"pareto_{cost}"] = pareto_figure(pareto_info(frame, cost))
    budgets = budget_info(frame)
    searched = budget_column(frame) == "epsilon"  # several budgets only where the study searched ε
    if searched and (len(budgets.epsilons) > 1 or (budgets.epsilons and not math.isnan(budgets.nonprivate_best))):
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
    if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        # nothing reported per epoch (a multi-objective study: Optuna cannot prune it, so nothing is): an empty plot
        del makers["optuna_intermediate_values"]
    figures = {}
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figures[name] = make()
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials
            warnings.warn(f"{name} skipped: {err}", stacklevel=2)
    return figures


def parse_formats(text: str) -> tuple[str, ...]:
    """``"html,png"`` as a tuple of formats; an unknown one is refused (ValueError) before anything is drawn."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown format {unknown[0] if unknown else text!r}; expected some of: {', '.join(FORMATS)} "
                         "(comma-separated)")
    return formats


def default_plot_dir(study: optuna.Study) -> Path:
    """Where `dpnas plot` (and `dpnas report`) write a study's files unless told otherwise: one folder under runs/,
    whatever the name holds (a "/" or ".." in a study name made it a path out of runs/)."""
    return Path("runs") / f"plots-{re.sub(r'[^A-Za-z0-9_.-]+', '_', study.study_name).lstrip('.')}"


def write_figures(figures: dict[str, go.Figure], out_dir: Path, *, formats: tuple[str, ...] = ("html",)) -> list[Path]:
    """Write each figure in each format; returns the files written.

    The HTML files share one ``plotly.min.js`` beside them (they open offline, from that folder). PNG/SVG need a
    Chrome/Chromium (:mod:`dpnas.analysis.static`): without one, StaticExportError is raised before any file is
    written. Everything is drawn in a scratch folder inside `out_dir` and moved into place at the end, so a
    failure leaves no half-written file.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format {unknown[0]!r}; expected some of: {', '.join(FORMATS)}")
    static = [f for f in formats if f in STATIC_FORMATS]
    if static:
        check_static_export()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dpnas-plot-", dir=out_dir) as scratch:
        scratch_dir = Path(scratch)
        drawn: list[Path] = []
        if "html" in formats and figures:
            for name, figure in figures.items():
                figure.write_html(scratch_dir / f"{name}.html", include_plotlyjs="directory", full_html=True)
                drawn.append(scratch_dir / f"{name}.html")
            drawn.append(scratch_dir / "plotly.min.js")  # written by the first figure, shared by all
        images = [(figure, scratch_dir / f"{name}.{fmt}") for fmt in static for name, figure in figures.items()]
        try:
            write_static([f for f, _ in images], [p for _, p in images])
        except Exception as err:  # the browser died or hung: say so in one line; the scratch folder goes with it
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise StaticExportError(f"kaleido could not export the figures ({reason}); nothing was written") from err
        drawn += [p for _, p in images]
        written = []
        for path in drawn:
            target = out_dir / path.name
            os.replace(path, target)
            written.append(target)
    return written


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

"""An ablation's effects told apart from seed noise.

One trial per component value cannot separate a real effect from the run-to-run spread, so an ablation study
trains each point from ``repeats`` seeds (``[study] repeats``). Per component value this shows the mean validation
accuracy with a 95 % t-interval over its seeds, and the difference from the base point by a **paired t-test over
seeds**: repeat r of a value is compared with repeat r of the base point (same seed, so the same initialisation
where the shapes agree, and the same validation records), and a difference is marked when its 95 % interval
excludes 0 (two-sided p < 0.05). With one seed per point there is nothing to estimate the spread from: the values
are shown alone and the table says so.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd
import plotly.graph_objects as go
from scipy import stats

from dpnas.analysis.frame import finished
from dpnas.search.sampling import ABLATION_BASE

CONFIDENCE = 0.95
PAIRED_TEST = ("paired t-test over seeds: repeat r of each value against repeat r of the base point, two-sided, "
               f"marked where p < {1 - CONFIDENCE:.2g} (the {CONFIDENCE:.0%} interval of the difference excludes 0); "
               f"means with {CONFIDENCE:.0%} t-intervals over seeds")
ONE_SEED = ("one seed per point (repeats = 1): no intervals and no test; a difference this size may be seed noise "
            "(set [study] repeats = 3 or more)")


class Interval(NamedTuple):
    mean: float
    low: float
    high: float
    """nan, nan with fewer than two values: a spread needs two."""


class PairedDifference(NamedTuple):
    pairs: int
    interval: Interval
    """Of the differences (value − base), repeat by repeat."""
    p_value: float
    significant: bool


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean and its Student-t interval (nan bounds below two values; a point interval for equal values)."""
    n = len(values)
    mean = float(sum(values) / n) if n else math.nan
    if n < 2:
        return Interval(mean, math.nan, math.nan)
    sd = float(pd.Series(values).std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def paired_difference(variant: dict[int, float], base: dict[int, float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """Variant − base over the repeats both have (repeat index -> accuracy), by a paired t-test."""
    shared = sorted(set(variant) & set(base))
    differences = [variant[r] - base[r] for r in shared]
    interval = t_interval(differences, confidence)
    if len(differences) < 2:
        return PairedDifference(len(differences), interval, math.nan, False)
    sd = float(pd.Series(differences).std(ddof=1))
    if sd == 0:  # every seed moved by exactly the same amount: the t statistic is 0 or infinite
        p_value = 1.0 if interval.mean == 0 else 0.0
    else:
        t_statistic = interval.mean / (sd / math.sqrt(len(differences)))
        p_value = float(2 * stats.t.sf(abs(t_statistic), len(differences) - 1))
    return PairedDifference(len(differences), interval, p_value, p_value < 1 - confidence)


def is_ablation(frame: pd.DataFrame) -> bool:
    """Whether the trials come from an ablation study (each records the axis it moves, or the base).

    Any finished trial that records an axis says so: an ablation whose base point has no finished run (pruned as
    diverged, failed, still running) is still an ablation, not a sample of the space to take medians over."""
    return "ablation_axis" in frame and finished(frame)["ablation_axis"].notna().any()


def ablation_axes(frame: pd.DataFrame) -> list[str]:
    """The axes moved by finished trials, in the study's order."""
    moved = finished(frame)["ablation_axis"].dropna()
    return list(dict.fromkeys(a for a in moved if a != ABLATION_BASE))


class AblationInfo(NamedTuple):
    component: str
    base_value: str
    order: list[str]
    """The base value first, then the others by mean accuracy, best first."""
    accuracies: dict[str, list[float]]
    trials: dict[str, list[int]]
    intervals: dict[str, Interval]
    differences: dict[str, PairedDifference]
    """For every value but the base's."""
    seeds: int
    """The most seeds any value was trained with (1: no intervals, no test)."""


def _by_repeat(rows: pd.DataFrame) -> dict[int, float]:
    return {int(r): float(a) for r, a in zip(rows["repeat"], rows["val_accuracy"])}


def ablation_info(frame: pd.DataFrame, component: str) -> AblationInfo:
    done = finished(frame)
    base_rows = done[done["ablation_axis"] == ABLATION_BASE]
    rows = done[done["ablation_axis"].isin([ABLATION_BASE, component])]
    values = rows[component].astype(str)
    # the base point's value, from its finished runs, else from any of its trials (their configs are recorded
    # before training): without one finished, the base is named but has no accuracies to show or pair with
    every_base = frame[(frame["ablation_axis"] == ABLATION_BASE) & frame[component].notna()]
    base_value = (str(base_rows[component].iloc[0]) if len(base_rows)
                  else str(every_base[component].iloc[0]) if len(every_base) else "")
    accuracies, trials, intervals, differences = {}, {}, {}, {}
    for value, group in rows.groupby(values):
        accuracies[value] = group["val_accuracy"].tolist()
        trials[value] = group["number"].tolist()
        intervals[value] = t_interval(accuracies[value])
        if value != base_value:
            differences[value] = paired_difference(_by_repeat(group), _by_repeat(base_rows))
    others = sorted((v for v in intervals if v != base_value), key=lambda v: (-intervals[v].mean, v))
    order = ([base_value] if base_value in intervals else []) + others
    seeds = max((len(a) for a in accuracies.values()), default=0)
    return AblationInfo(component, base_value, order, accuracies, trials, intervals, differences, seeds)


def _label(info: AblationInfo, value: str) -> str:
    if value == info.base_value:
        return f"{value} (base)"
    difference = info.differences[value]
    return f"{value} *" if difference.significant else value


def ablation_figure(info: AblationInfo) -> go.Figure:
    figure = go.Figure()
    labels = [_label(info, v) for v in info.order]
    for value, label in zip(info.order, labels):
        figure.add_trace(go.Box(
            y=info.accuracies[value], x=[label] * len(info.accuracies[value]), name=label, boxpoints="all",
            jitter=0.4, pointpos=0, customdata=info.trials[value], marker={"opacity": 0.5},
            hovertemplate="trial %{customdata}<br>val accuracy %{y:.4f}<extra></extra>",
        ))
    intervals = [info.intervals[v] for v in info.order]
    figure.add_trace(go.Scatter(
        x=labels, y=[i.mean for i in intervals], mode="markers", name="mean", marker={"symbol": "diamond", "size": 10},
        error_y={"type": "data", "symmetric": False, "array": [i.high - i.mean for i in intervals],
                 "arrayminus": [i.mean - i.low for i in intervals]} if info.seeds > 1 else None,
        hovertemplate="mean %{y:.4f}<extra></extra>",
    ))
    fewest = min((len(a) for a in info.accuracies.values()), default=0)
    over = f"{info.seeds} seeds" if fewest == info.seeds else f"{fewest}-{info.seeds} seeds (a repeat pruned or running)"
    how = (f"mean and {CONFIDENCE:.0%} t-interval over {over}; * differs from the base by a paired "
           f"t-test over seeds (p < {1 - CONFIDENCE:.2g})" if info.seeds > 1 else
           "one seed per value (repeats = 1): no intervals, a difference may be seed noise")
    figure.update_layout(
        title=f"Validation accuracy by {info.component}, ablated around the base point<br><sup>{how}</sup>",
        xaxis_title=info.component, yaxis_title="validation accuracy", showlegend=False,
    )
    return figure


EFFECT_COLUMNS = ["component", "value", "base", "seeds", "mean_val_accuracy", "ci_low", "ci_high", "paired_seeds",
                  "difference", "difference_ci_low", "difference_ci_high", "p_value", "significant"]


def ablation_effects(frame: pd.DataFrame, components: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per (ablated axis, value): its seeds' mean and interval, and its paired difference from the base.

    ``table.attrs["method"]`` names the test (or, with one seed per point, says there is none).
    """
    rows = []
    seeds = 0
    for component in ablation_axes(frame):
        if components is not None and component not in components:
            continue
        info = ablation_info(frame, component)
        seeds = max(seeds, info.seeds)
        for value in info.order:
            interval = info.intervals[value]
            difference = info.differences.get(value)
            rows.append({
                "component": component, "value": value, "base": value == info.base_value,
                "seeds": len(info.accuracies[value]), "mean_val_accuracy": interval.mean,
                "ci_low": interval.low, "ci_high": interval.high,
                "paired_seeds": difference.pairs if difference else math.nan,
                "difference": difference.interval.mean if difference else math.nan,
                "difference_ci_low": difference.interval.low if difference else math.nan,
                "difference_ci_high": difference.interval.high if difference else math.nan,
                "p_value": difference.p_value if difference else math.nan,
                "significant": bool(difference and difference.significant),
            })
    table = pd.DataFrame(rows, columns=EFFECT_COLUMNS)
    table.attrs["method"] = PAIRED_TEST if seeds > 1 else ONE_SEED
    return table

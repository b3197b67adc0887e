"""A study as one tidy pandas DataFrame: a row per trial, a column per ArchConfig field and per result."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pandas as pd

from dpnas.arch.space import ArchConfig
from dpnas.search.fidelity import Fidelity
from dpnas.search.sampling import field_of

# The components whose effect the component figures show, in the papers' order.
COMPONENTS = ("norm", "groups", "scalenorm", "activation", "pool", "skip")

_RESULTS = ("val_accuracy", "test_accuracy", "epsilon_spent", "epsilon_target", "noise_multiplier", "params",
            "epoch_seconds", "wall_seconds", "samples_per_second")


def _number(value: Any) -> float:
    """User attributes store inf as text ("inf (non-private)"); everything else is a number or missing."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.startswith("inf"):
        return math.inf
    return math.nan


def trials_frame(study: optuna.Study, *, states: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Every trial with its full architecture, its searched parameters and its results.

    `df.attrs["searched"]` lists the searched fields, `df.attrs["study"]` the study name. ``fidelity`` names a
    [fidelity] proxy trial's settings (None where the trial trained its point at the study's own fidelity).
    Rows of trials without a recorded architecture (failed before building) keep NaN there.
    """
    rows = []
    searched: list[str] = []
    study_epsilon = _number(study.user_attrs.get("epsilon"))  # the study's fixed budget, where a trial lacks its own
    for t in study.get_trials(deepcopy=False):
        if states is not None and t.state.name not in states:
            continue
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        row.update(t.user_attrs.get("config") or {})
        row["seed"] = (t.user_attrs.get("train_config") or {}).get("seed")  # the training seed (a repeat's own)
        # an ablation trial: the axis it moves ("base" for the base point) and which of the point's seeds it is
        row["ablation_axis"] = t.user_attrs.get("ablation_axis")
        row["repeat"] = t.user_attrs.get("repeat")
        for name, value in t.params.items():
            name = field_of(name)  # a context-restricted parameter such as scalenorm[none,after_add]
            row[name] = value
            if name not in searched:
                searched.append(name)
        for key in _RESULTS:
            row[key] = _number(t.user_attrs.get(key))
        if math.isnan(row["epsilon_target"]):
            row["epsilon_target"] = study_epsilon
        if math.isnan(row["val_accuracy"]) and t.values and t.state.name == "COMPLETE":
            row["val_accuracy"] = float(t.values[0])
        row["private"] = math.isfinite(row["epsilon_target"]) if not math.isnan(row["epsilon_target"]) else None
        row["failure_reason"] = t.user_attrs.get("failure_reason")
        # a [fidelity] proxy's settings (None: the trial trained its point itself), so that a companion study's
        # trials at another fidelity are not compared with these as if they were the same runs
        proxy = Fidelity.from_record(t.user_attrs.get("fidelity") or {})
        row["fidelity"] = proxy.describe() if proxy.trains_proxy else None
        rows.append(row)
    columns = ["number", "state", *(f.name for f in ArchConfig.__dataclass_fields__.values()), *_RESULTS,
               "seed", "ablation_axis", "repeat", "fidelity"]
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = pd.Series(dtype=float)
    frame.attrs["searched"] = searched
    frame.attrs["study"] = study.study_name
    return frame


def finished(frame: pd.DataFrame) -> pd.DataFrame:
    """Trials that finished training with a validation score (COMPLETE)."""
    return frame[(frame["state"] == "COMPLETE") & frame["val_accuracy"].notna()]

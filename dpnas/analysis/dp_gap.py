"""The DP gap: the same architecture trained privately and without privacy."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import plotly.graph_objects as go

from dpnas.analysis.frame import finished
from dpnas.arch.space import ArchConfig

_ARCH_FIELDS = list(ArchConfig.__dataclass_fields__)


class DPGapInfo(NamedTuple):
    labels: list[str]  # one per architecture that has both kinds of run
    private: list[float]  # best private validation accuracy
    nonprivate: list[float]
    gap: list[float]  # nonprivate - private


def dp_gap_info(frame: pd.DataFrame, label_fields: list[str] | None = None) -> DPGapInfo:
    done = finished(frame)
    done = done[done["private"].notna()]
    if done.empty:
        return DPGapInfo([], [], [], [])
    fields = [f for f in _ARCH_FIELDS if f in done]
    shown = label_fields or [f for f in frame.attrs.get("searched", []) if f in fields] or ["activation"]
    labels, private, nonprivate, gap = [], [], [], []
    # a pair is one architecture at one fidelity: a [fidelity] proxy's run (a companion study's, say) is not the
    # same run as the full one, and where both kinds are drawn each bar names its proxy
    proxies = done["fidelity"] if "fidelity" in done else pd.Series(None, index=done.index, dtype=object)
    mixed = proxies.fillna("").nunique() > 1
    key = done[fields].astype(str).agg("|".join, axis=1) + "|" + proxies.fillna("").astype(str)
    for _, group in done.groupby(key):
        kinds = group.groupby("private")["val_accuracy"].max()
        if True in kinds.index and False in kinds.index:
            proxy = group.iloc[0]["fidelity"] if "fidelity" in group else None
            labels.append(", ".join(f"{f}={group.iloc[0][f]}" for f in shown)
                          + (f" (proxy: {proxy})" if mixed and isinstance(proxy, str) else ""))
            private.append(float(kinds[True]))
            nonprivate.append(float(kinds[False]))
            gap.append(float(kinds[False] - kinds[True]))
    order = sorted(range(len(labels)), key=lambda i: gap[i])
    return DPGapInfo([labels[i] for i in order], [private[i] for i in order],
                     [nonprivate[i] for i in order], [gap[i] for i in order])


def dp_gap_figure(info: DPGapInfo) -> go.Figure:
    figure = go.Figure([
        go.Bar(name="non-private", x=info.labels, y=info.nonprivate),
        go.Bar(name="DP-SGD", x=info.labels, y=info.private),
    ])
    figure.update_layout(barmode="group", title="The DP gap per architecture (smallest gap first)",
                         yaxis_title="best validation accuracy")
    return figure

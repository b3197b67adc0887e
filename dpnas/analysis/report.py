"""One page per study: the question, the privacy statement, the best recipe, every trial and every figure.

The page is one self-contained HTML file (plotly.js inline once, no other file or network needed) that a person
opens to see the whole study. It reuses what the other commands compute: the study file the search recorded
(the question), :func:`dpnas.search.study_report.privacy_statement` (the words of `dpnas privacy`), the best
trials and their recipes (`dpnas best`), :func:`dpnas.analysis.figures.study_figures` (`dpnas plot`).

It is attached to the study in Optuna's artifact store (a study-level artifact ``report.html``), so
optuna-dashboard lists it; writing it again replaces the same artifact.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from dpnas.analysis.figures import study_figures
from dpnas.analysis.frame import trials_frame
from dpnas.analysis.report_page import esc, facts, page, sortable_table
from dpnas.arch.space import ConfigError
from dpnas.dp.recipe_file import recipe_to_toml
from dpnas.search.fidelity import Fidelity
from dpnas.search.runner import best_trials
from dpnas.search.storage import command_url
from dpnas.search.study_privacy import TRIAL_TARGET_ATTR
from dpnas.search.study_report import budget_words, privacy_statement, trial_recipe
from dpnas.search.weights import open_store, trial_location, weights_available

REPORT_FILE = "report.html"
_REPORT_ARTIFACT = "dpnas:report_artifact"

# What each figure shows, in one line, by the name study_figures gives it (a prefix for the per-component ones).
_CAPTIONS = {
    "component_": "Validation accuracy of every completed trial by {what}: each point is a trial, the box the spread; "
                  "values ordered by their median.",
    "width_depth": "The best validation accuracy reached at each width × depth multiplier pair.",
    "dp_gap": "The same architecture trained with and without DP-SGD: the accuracy that privacy costs (the DP gap).",
    "pareto_params": "Validation accuracy against parameter count; the Pareto-optimal trials are joined by the front.",
    "pareto_epoch_seconds": "Validation accuracy against training time per epoch, with the Pareto front.",
    "accuracy_vs_epsilon": "Best and median validation accuracy at each privacy budget ε that was searched.",
    "optuna_history": "Optuna's optimisation history: each trial's objective and the best value so far.",
    "optuna_intermediate_values": "Learning curves: each trial's noisy validation accuracy after every epoch "
                                  "(what the pruner saw).",
    "optuna_param_importances": "Optuna's estimate of how much each searched parameter moved validation accuracy.",
    "empty": "The study has no completed trial yet: run `dpnas search` first.",
}


_ABLATION_CAPTION = ("Validation accuracy at each value of {what}, every other axis at the base point: the mean over "
                     "seeds with its 95 % t-interval, the base point first.")


def figure_caption(name: str, figure: go.Figure | None = None) -> str:
    if name.startswith("component_"):
        ablation = figure is not None and _subtitle(figure) is not None
        caption = (_ABLATION_CAPTION if ablation else _CAPTIONS["component_"]).format(
            what=name.removeprefix("component_"))
        return f"{caption} {_subtitle(figure)}." if ablation else caption
    return _CAPTIONS.get(name, name.replace("_", " "))


def figure_title(figure: go.Figure, name: str) -> str:
    """The figure's title as text: its first line, without Plotly's markup (a subtitle goes to the caption)."""
    title = figure.layout.title.text or name.replace("_", " ")
    return _without_markup(title.split("<br>")[0])


# Plotly's text markup: tags such as <sup>, </b>, <br>; a "<" that opens no tag ("p < 0.05") is text
_MARKUP = re.compile(r"</?[A-Za-z][^<>]*>")


def _without_markup(text: str) -> str:
    return _MARKUP.sub("", text).strip()


def _subtitle(figure: go.Figure) -> str | None:
    title = figure.layout.title.text or ""
    return _without_markup(title.split("<br>", 1)[1]) if "<br>" in title else None


def _question(study: optuna.Study) -> str:
    attrs = study.user_attrs
    text = attrs.get("study_file") or ""
    try:
        spec: dict[str, Any] = tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError:
        spec = {}
    section = spec.get("study", {})
    data = spec.get("data", {}) or {"dataset": attrs.get("dataset")}
    items = [("data", ", ".join(f"{k} = {v}" for k, v in data.items())),
             ("privacy budget", f"{budget_words(study)}, δ = {attrs.get('delta')}"),
             ("trials", f"{_trial_count(study, attrs)}, sampler {attrs.get('sampler')}, pruner {attrs.get('pruner')}"),
             ("objectives", ", ".join(attrs.get("objectives") or objective_names(study))),
             ("base", ", ".join(f"{part}: {spec[part].get('base') or spec[part].get('recipe')}"
                                for part in ("arch", "train") if isinstance(spec.get(part), dict)
                                and (spec[part].get("base") or spec[part].get("recipe"))) or "?")]
    if spec.get("fidelity"):
        items.append(("search fidelity", ", ".join(f"{k} = {v}" for k, v in spec["fidelity"].items())
                      + " (the trials' proxy; the best recipe is exported at the target)"))
    space = spec.get("search", {})
    rows = [(name, _describe_axis(value)) for name, value in space.items()]
    html_parts = ["<h2>The question</h2>"]
    if section.get("description"):
        html_parts.append(f"<p>{esc(section['description'])}</p>")
    html_parts.append(facts(items))
    if rows:
        html_parts.append("<h3>Search space</h3>" + facts(rows))
    if text:
        html_parts.append(f"<details><summary>The study file</summary><pre>{esc(text)}</pre></details>")
    return "\n".join(html_parts)


def _trial_count(study: optuna.Study, attrs: dict[str, Any]) -> str:
    mode = attrs.get("trial_count") or "fixed"
    if mode == "fixed":  # the stored target: --n-trials, a grid's or an ablation's count, not only the file's
        target = study._storage.get_study_system_attrs(study._study_id).get(TRIAL_TARGET_ATTR)
        return f"{target if target is not None else '?'} trials"
    shape = ", ".join(f"{k} {attrs[k]}" for k in ("mean_trials", "eta", "gamma") if attrs.get(k) is not None)
    return f"a random number of trials ({mode}{', ' + shape if shape else ''}; drawn once, kept secret)"


def _describe_axis(value: Any) -> str:
    if isinstance(value, list):
        return "one of " + ", ".join(map(str, value))
    if isinstance(value, dict) and "low" in value:
        scale = " (log scale)" if value.get("log") else ""
        step = f" in steps of {value['step']}" if "step" in value else ""
        return f"from {value['low']} to {value['high']}{step}{scale}"
    return str(value)


def _privacy(study: optuna.Study) -> str:
    try:
        lines = privacy_statement(study)
    except ConfigError as err:  # a journal damaged in the middle: no statement from the records before it
        return ("<h2>Privacy</h2>\n<p class=\"headline\"><strong>Not stated: the study's storage is damaged "
                "(`dpnas privacy` says why).</strong></p>\n"
                f'<p class="sub">{esc(err)}</p>')
    headline, rest = lines[1], lines[2:]
    return ("<h2>Privacy</h2>\n"
            f'<p class="headline"><strong>{esc(headline[0].upper() + headline[1:])}</strong></p>\n'
            f'<p class="sub">{esc(lines[0])}</p>\n'
            "<ul>" + "".join(f"<li>{esc(line.strip())}</li>" for line in rest) + "</ul>")


def objective_names(study: optuna.Study) -> list[str]:
    """One name per objective: a study that named none (not written by dpnas) gets one per direction, so a
    second objective's values are not shown under the next column's header."""
    count = len(study.directions)
    return study.metric_names or (["value"] if count == 1 else [f"objective {i}" for i in range(count)])


def _best(study: optuna.Study, storage_url: str | None, where: str | None, artifacts: str | None) -> str:
    trials = best_trials(study)
    if not trials:
        return "<h2>Best recipe</h2><p>No completed trial yet.</p>"
    names = objective_names(study)
    parts = ["<h2>Best recipe" + (" (Pareto set)" if len(trials) > 1 else "") + "</h2>"]
    for trial in trials:
        values = ", ".join(f"{n} = {v:.4g}" for n, v in zip(names, trial.values))  # a params count as 400, not 400.0000
        parts.append(f"<h3>Trial {trial.number}: {esc(values)}</h3>")
        searched = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in trial.params.items())
        proxy = Fidelity.from_record(trial.user_attrs.get("fidelity") or {})
        if proxy.trains_proxy:  # what `dpnas best` says in its header: the run and its weights are the proxy's
            parts.append(f"<p>The search trained a cheaper proxy of this point ([fidelity]: {esc(proxy.describe())}): "
                         "its ε, test accuracy and stored weights below are the proxy run's, not the recipe's, "
                         "which is the point at the target fidelity.</p>")
        parts.append(facts([("searched values", searched),
                            ("parameters", f"{trial.user_attrs.get('params', '?'):,}"
                             if isinstance(trial.user_attrs.get("params"), int) else "?"),
                            ("ε spent by this run", trial.user_attrs.get("epsilon_spent")),
                            ("test accuracy (recorded, never used to select)", trial.user_attrs.get("test_accuracy")),
                            ("weights", _weights_line(study, trial, trial_location(study, trial, storage_url, artifacts)
                                                      if storage_url else artifacts, where))]))
        try:
            recipe = esc(recipe_to_toml(trial_recipe(study, trial)).rstrip())
            parts.append(f"<details><summary>The whole recipe (what `dpnas best` writes; `dpnas train FILE` takes it)"
                         f"</summary><pre>{recipe}</pre></details>")
        except Exception as err:  # noqa: BLE001 - a trial without a recorded recipe still gets its row
            parts.append(f"<p>No recipe recorded: {esc(err)}</p>")
    return "\n".join(parts)


def _weights_line(study: optuna.Study, trial: Any, location: str | None, where: str | None) -> str:
    if not weights_available(study, trial):
        return "not stored (keep_weights in [study] says which trials keep theirs)"
    fetch = f"; `dpnas best {where} --weights best.pt` fetches them" if where else ""
    return (f"stored in the artifact store {location or '(its location was not recorded)'} as artifact "
            f"{trial.user_attrs.get('weights_artifact_id')}{fetch}")


def _trials(study: optuna.Study, frame: pd.DataFrame) -> str:
    searched = list(frame.attrs.get("searched", []))
    names = objective_names(study)
    by_number = frame.set_index("number") if not frame.empty else frame
    # an objective "params" (accuracy against size) is the parameter count: its column, not a second one
    counts = [] if "params" in names else ["params"]
    columns = ["trial", "state", *searched, *names, "ε spent", *counts, "seconds", "failure reason"]
    rows, classes, repeats = [], [], 0
    for t in study.get_trials(deepcopy=False):
        repeats += t.state == TrialState.FAIL and "duplicate_of" in t.user_attrs  # skipped, never trained
        row = by_number.loc[t.number] if t.number in by_number.index else {}
        values = list(t.values) if t.values else [None] * len(names)
        reason = t.user_attrs.get("failure_reason") or t.user_attrs.get("pruned_reason")
        if t.state == TrialState.WAITING and t.system_attrs.get("retry_history"):
            # Optuna's retry carries its original's attributes, reason included, until it runs
            reason = f"retry of trial {t.system_attrs['retry_history'][-1]}: waiting to run"
        rows.append([t.number, t.state.name, *(_cell(row.get(s)) for s in searched), *map(_cell, values),
                     _cell(row.get("epsilon_spent")), *(_cell(row.get(c)) for c in counts),
                     _cell(row.get("wall_seconds")), reason])
        classes.append(f"state-{t.state.name}")
    skipped = (f" ({repeats} of them repeated proposals of a point already trained: recorded as FAIL, not trained, "
               "no ε spent)" if repeats else "")
    return (f"<h2>Trials</h2>\n<p class=\"sub\">{len(rows)} trials{esc(skipped)}; click a column's header to sort "
            "by it.</p>\n"
            + sortable_table(columns, rows, row_classes=classes))


def _cell(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars from the frame
        value = value.item()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return value


def _figures(figures: dict[str, go.Figure]) -> str:
    parts = ["<h2>Figures</h2>"]
    for i, (name, figure) in enumerate(figures.items()):
        untitled = go.Figure(figure).update_layout(title_text=None, margin_t=40)  # the heading above says it
        div = untitled.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{i}", default_height="480px")
        parts.append(f'<figure id="{esc(name)}"><h3>{esc(figure_title(figure, name))}</h3>{div}'
                     f"<figcaption>{esc(figure_caption(name, figure))}</figcaption></figure>")
    return "\n".join(parts)


def report_html(study: optuna.Study, *, storage_url: str | None = None, where: str | None = None,
                artifacts: str | None = None, figures: dict[str, go.Figure] | None = None,
                named: bool = False) -> str:
    """The whole report page as a string. `where` is how commands on the page name the study (a study file
    or a storage URL, printed without its password); `named`: with --study-name (not the file's own study)."""
    frame = trials_frame(study)
    figures = study_figures(study, frame) if figures is None else figures
    where = (shlex.quote(command_url(where)) + (f" --study-name {shlex.quote(study.study_name)}" if named else "")
             if where else None)  # pasted into a shell
    version = study.user_attrs.get("dpnas_version", "?")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([
        f"<h1>dpnas study {esc(study.study_name)}</h1>",
        f'<p class="sub">Report written {esc(stamp)} from the study (dpnas {esc(version)}). Every accuracy that '
        "steers the search is a noisy validation accuracy; test accuracies are recorded for this report only.</p>",
        _question(study), _privacy(study), _best(study, storage_url, where, artifacts), _trials(study, frame),
        _figures(figures),
    ])
    return page(title=f"dpnas study {study.study_name}", plotly_js=get_plotlyjs(), body=body)


def write_report(study: optuna.Study, out: Path, *, storage_url: str | None = None, where: str | None = None,
                 artifacts: str | None = None, named: bool = False) -> Path:
    """Write the report to `out` atomically (a scratch file beside it, renamed at the end)."""
    text = report_html(study, storage_url=storage_url, where=where, artifacts=artifacts, named=named)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        scratch.write_text(text, encoding="utf-8")
        os.replace(scratch, out)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return out


def attach_report(study: optuna.Study, path: Path, *, location: str) -> str:
    """Store the report as the study's artifact ``report.html`` (the same artifact each time); its id."""
    store = open_store(location)
    artifact_id = study._storage.get_study_system_attrs(study._study_id).get(_REPORT_ARTIFACT)
    if artifact_id:
        with open(path, "rb") as f:
            store.write(artifact_id, f)
        return artifact_id
    with tempfile.TemporaryDirectory(prefix="dpnas-report-") as folder:
        named = Path(folder) / REPORT_FILE  # the artifact takes the file's name
        named.write_bytes(Path(path).read_bytes())
        artifact_id = upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study,
                                      mimetype="text/html")
    study._storage.set_study_system_attr(study._study_id, _REPORT_ARTIFACT, artifact_id)
    return artifact_id


def attached_report(study: optuna.Study, *, location: str) -> bytes | None:
    """The report attached to the study, as stored; None when none is."""
    artifact_id = study._storage.get_study_system_attrs(study._study_id).get(_REPORT_ARTIFACT)
    if not artifact_id:
        return None
    with open_store(location, create=False).open_reader(artifact_id) as reader:
        return reader.read()

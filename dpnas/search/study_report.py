"""After a search: find the study, export the best architecture, describe the study for the dashboard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.search.privacy import SearchPrivacy
from dpnas.search.runner import best_trials, study_privacy
from dpnas.search.storage import dashboard_command, list_study_names, open_storage
from dpnas.search.study_file import load_study_file


def resolve_study(study_or_storage: str, study_name: str | None = None) -> tuple[optuna.Study, str]:
    """A study file (its default storage and name) or a storage URL (with --study-name, or its only study)."""
    if study_or_storage.endswith(".toml"):
        spec = load_study_file(study_or_storage)
        url, name = spec.default_storage(), study_name or spec.name
    else:
        url, name = study_or_storage, study_name
    storage = open_storage(url, must_exist=True)
    names = list_study_names(storage)
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"{url}: holds {len(names)} studies ({', '.join(names) or 'none'}); choose one with --study-name")
        name = names[0]
    if name not in names:
        raise ConfigError(f"{url}: no study named {name!r}; it holds: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage), url


def arch_to_toml(arch: ArchConfig, *, header: str = "") -> str:
    # JSON scalars and arrays are valid TOML values for every ArchConfig field type
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key} = {json.dumps(value)}" for key, value in arch.to_dict().items()]
    return "\n".join(lines) + "\n"


def write_arch(arch: ArchConfig, path: Path, *, header: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps({"config": arch.to_dict(), "note": header}, indent=2) + "\n")
    elif path.suffix == ".toml":
        path.write_text(arch_to_toml(arch, header=header))
    else:
        raise ConfigError(f"--out {path}: expected a .toml or .json file")
    return path


def trial_arch(trial: FrozenTrial) -> ArchConfig:
    if "config" not in trial.user_attrs:
        raise ConfigError(f"trial {trial.number} has no recorded architecture (was it written by dpnas?)")
    return ArchConfig.from_dict(trial.user_attrs["config"])


def export_best(study: optuna.Study, out: Path) -> list[Path]:
    """The best architecture (or each Pareto-optimal one) as files `dpnas train` and `describe` take."""
    trials = best_trials(study)
    if not trials:
        raise ConfigError(f"study {study.study_name!r} has no completed trial yet")
    paths = []
    for trial in trials:
        path = out if len(trials) == 1 else out.with_name(f"{out.stem}-trial{trial.number}{out.suffix}")
        header = (f"dpnas: best architecture of study {study.study_name!r}, trial {trial.number}\n"
                  f"validation objectives {dict(zip(study.metric_names or ['value'], trial.values))}, "
                  f"epsilon spent {trial.user_attrs.get('epsilon_spent')}")
        paths.append(write_arch(trial_arch(trial), path, header=header))
    return paths


def study_note(study: optuna.Study, privacy: SearchPrivacy, storage_url: str) -> str:
    """A markdown note for optuna-dashboard: budget, the search's privacy cost, the best architecture."""
    attrs = study.user_attrs
    states = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] += 1
    lines = [
        f"# dpnas study `{study.study_name}`",
        "",
        f"- **Data**: {attrs.get('dataset')} (selection on the validation split; test accuracy recorded, never used to select).",
        f"- **Per-trial budget**: every trial trains with DP-SGD at ε = {attrs.get('epsilon')}, δ = {attrs.get('delta')}.",
        f"- **Trials**: {', '.join(f'{k.lower()} {v}' for k, v in states.items() if v)}; sampler {attrs.get('sampler')}, "
        f"pruner {attrs.get('pruner')}, trial count {attrs.get('trial_count')}.",
        "",
        "## Privacy cost of the search",
        f"Releasing the best trial: **ε = {privacy.epsilon:.3f}, δ = {privacy.delta:g}** "
        f"({privacy.runs} runs touched the data; one run alone: ε = {privacy.per_run_epsilon:.3f}).",
        "",
        privacy.explanation,
        "",
    ]
    best = best_trials(study)
    if best:
        lines.append("## Best architecture" + ("s (Pareto set)" if len(best) > 1 else ""))
        for t in best:
            lines.append(f"- trial {t.number}: values {t.values}, params {t.user_attrs.get('params')}, "
                         f"searched {t.params}")
        lines += ["", "```toml", arch_to_toml(trial_arch(best[0])).rstrip(), "```"]
    lines += ["", f"Open with: `{dashboard_command(storage_url)}`"]
    return "\n".join(lines)


def save_study_note(study: optuna.Study, storage_url: str) -> str:
    from optuna_dashboard import save_note

    note = study_note(study, study_privacy(study), storage_url)
    save_note(study, note)
    return note


def summary_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                     "epsilon_spent": t.user_attrs.get("epsilon_spent"), "reason": t.user_attrs.get("failure_reason")})
    return rows

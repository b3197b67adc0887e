"""After a search: find the study, export the best recipe (and weights), describe the study for the dashboard."""

from __future__ import annotations

import functools
import importlib.util
import math
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.dp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.recipe_file import DataSettings, RecipeFile, recipe_to_toml, write_recipe
from dpnas.search.fidelity import Fidelity
from dpnas.search.runner import best_trials
from dpnas.search.storage import dashboard_command, display_url, list_study_names, open_storage
from dpnas.search.study_file import load_study_file
from dpnas.search.study_privacy import StudyPrivacy, study_privacy
from dpnas.search.weights import fetch_weights, open_store, study_location, trial_location, weights_available


def resolve_study(study_or_storage: str, study_name: str | None = None, *,
                  flag: str = "--study-name") -> tuple[optuna.Study, str]:
    """A study file (its default storage and name) or a storage URL (with --study-name, or its only study);
    `flag`: the option that names it (`plot --companion` has its own)."""
    if study_or_storage.endswith(".toml"):
        spec = load_study_file(study_or_storage)
        url, name = spec.default_storage(), study_name or spec.name
    else:
        url, name = study_or_storage, study_name
    storage = open_storage(url, must_exist=True)
    names = list_study_names(storage)
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"{display_url(url)}: holds {len(names)} studies ({', '.join(names) or 'none'}); choose one with {flag}")
        name = names[0]
    if name not in names:
        raise ConfigError(f"{display_url(url)}: no study named {name!r}; it holds: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage), url


def trial_arch(trial: FrozenTrial) -> ArchConfig:
    if "config" not in trial.user_attrs:
        raise ConfigError(f"trial {trial.number} has no recorded architecture (was it written by dpnas?)")
    return ArchConfig.from_dict(trial.user_attrs["config"])


def trial_recipe(study: optuna.Study, trial: FrozenTrial) -> RecipeFile:
    """Everything the trial stands for: its architecture, training and privacy configs and data split.

    A trial of a study with [fidelity] settings trained a cheaper proxy of its point; its recipe is the point at
    the *target* fidelity (the study file's epochs, batch, budget, resolution and the whole training split), so
    `dpnas train` of it runs the real thing. Trials recorded before dpnas kept the whole recipe give their
    architecture alone.
    """
    attrs = trial.user_attrs
    target = "target_train_config" in attrs
    prefix = "target_" if target else ""
    searched_at = attrs.get("fidelity") or {}
    proxy = target and Fidelity.from_record(searched_at).trains_proxy
    objectives = dict(zip(study.metric_names or ["value"], trial.values or []))
    provenance = {"study": study.study_name, "trial": trial.number, "objectives": objectives,
                  # a proxy trial's run is not this file's (a TAN one's ε is larger than its target's): named so
                  "proxy_epsilon_spent" if proxy else "epsilon_spent": attrs.get("epsilon_spent"),
                  "delta": (attrs.get("privacy_config") or {}).get("delta"),
                  "dpnas_version": study.user_attrs.get("dpnas_version"),
                  "searched_at": attrs.get("fidelity") if target else None,
                  # a public-proxy search spent no private budget: `dpnas train` of the winner says so
                  "searched_on_public_data": study.user_attrs.get("dataset") if study.user_attrs.get("public_data")
                  else None}
    privacy = (PrivacyConfig.from_dict(attrs[f"{prefix}privacy_config"]) if f"{prefix}privacy_config" in attrs
               else None)
    total = study.user_attrs.get("total_epsilon")
    if proxy and total and privacy is not None and privacy.epsilon == total and privacy.noise_multiplier == 0:
        # recorded before the target kept its per-run ε (fidelity.exported_privacy): the file's placeholder, the
        # whole total; the per-run ε its trial was given is its TAN target's, else its run's ceiling
        given = searched_at.get("target_epsilon", (attrs.get("privacy_config") or {}).get("epsilon"))
        privacy = privacy.replace(epsilon=given) if isinstance(given, float) else privacy
    return RecipeFile(
        arch=trial_arch(trial),
        train=TrainConfig.from_dict(attrs[f"{prefix}train_config"]) if f"{prefix}train_config" in attrs else None,
        privacy=privacy,
        data=DataSettings(**attrs[f"{prefix}data"]) if f"{prefix}data" in attrs else None,
        provenance={k: v for k, v in provenance.items() if v is not None},
    )


def _numbered(out: Path, trial: FrozenTrial, several: bool) -> Path:
    return out.with_name(f"{out.stem}-trial{trial.number}{out.suffix}") if several else out


def export_best(study: optuna.Study, out: Path, *, search: dict[str, Any] | None = None) -> list[Path]:
    """The best trial's recipe (or each Pareto-optimal one's) as files `dpnas train` and `describe` take.
    `search`: :func:`search_epsilon` of the study, where the caller has it already."""
    trials = best_trials(study)
    if not trials:
        raise ConfigError(f"study {study.study_name!r} has no completed trial yet")
    paths = []
    search = search_epsilon(study) if search is None else search
    for trial in trials:
        recipe = trial_recipe(study, trial)
        recipe.provenance.update(search)
        what = "recipe" if recipe.complete else "architecture"
        searched_at = Fidelity.from_record(recipe.provenance.get("searched_at") or {})
        proxy = "proxy_epsilon_spent" in recipe.provenance
        header = (f"dpnas: best {what} of study {study.study_name!r}, trial {trial.number}\n"
                  f"validation objectives {recipe.provenance.get('objectives')}, "
                  f"epsilon spent {trial.user_attrs.get('epsilon_spent')} by "
                  f"{'its search trial (the proxy run below)' if proxy else 'this run'}; "
                  f"{search_words(search)}, written by dpnas {recipe.provenance.get('dpnas_version', '?')}\n"
                  f"`dpnas train FILE` trains it {'at the target fidelity' if proxy else 'again'} "
                  f"({_what_a_retrain_is(recipe)}).")
        if proxy:
            budget = ""
            if recipe.privacy is not None and recipe.privacy.private:
                total = study.user_attrs.get("total_epsilon")
                budget = (f", at epsilon {recipe.privacy.epsilon:.4g} (delta {recipe.privacy.delta:g}), "
                          + (f"the per-run budget the search gave it (of its total_epsilon {total:g}, the whole "
                             "search's; --epsilon trains at another)" if total else "the search's per-run budget"))
            header += ("\nThe search trained a cheaper proxy of this point ([fidelity]: "
                       f"{searched_at.describe()}); this file is the point at the target fidelity{budget}."
                       "\nWeights fetched with `dpnas best --weights` are the proxy run's, not this recipe's.")
        elif searched_at.active:
            header += (f"\nThe search scored each trial {searched_at.validations} time(s) ([fidelity] validations); "
                       "this file validates every epoch, as its training is the trial's.")
        paths.append(write_recipe(recipe, _numbered(out, trial, len(trials) > 1), header=header))
    return paths


def export_best_weights(study: optuna.Study, storage_url: str, out: Path, *, artifacts: str | None = None,
                        search: dict[str, Any] | None = None) -> list[Path]:
    """Fetch the best trial's (or each Pareto-optimal trial's) stored weights from the artifact store, with the
    search's ε (`search`, as for :func:`export_best`) added to their provenance."""
    trials = best_trials(study)
    if not trials:
        raise ConfigError(f"study {study.study_name!r} has no completed trial yet")
    where = study_location(study, storage_url, artifacts)
    locations = {t.number: trial_location(study, t, storage_url, artifacts) for t in trials}  # workers may differ
    missing = [t.number for t in trials if not weights_available(study, t)]
    if None in locations.values() or missing:
        raise ConfigError(f"study {study.study_name!r}: no stored weights for trial(s) "
                          f"{', '.join(map(str, missing or [t.number for t in trials]))} "
                          f"(kept where: {where or 'nowhere: a server storage needs --artifacts DIR'}; "
                          "keep_weights in [study] says which trials keep theirs)")
    search = search_epsilon(study) if search is None else search
    paths = []
    for t in trials:
        location = locations[t.number]
        try:
            store = open_store(location, create=False)
        except ConfigError as err:  # kept by a worker on another host: its folder is not here
            worker = t.user_attrs.get("worker")
            raise ConfigError(f"cannot fetch the weights of trial {t.number}: {err}"
                              + (f"; written by worker {worker}" if worker else "")) from None
        path = _numbered(out, t, len(trials) > 1)
        # fetched beside FILE, checked and given the search's ε there: FILE (and a good one already there) is
        # replaced only by the whole checkpoint, never by a damaged download or one without the search's ε
        fetched = fetch_weights(study, t, store, path.with_name(path.name + ".fetched"), location)
        try:
            checkpoint = load_checkpoint(fetched)
        except CheckpointError as err:
            raise ConfigError(f"the stored weights of trial {t.number} ({location}): "
                              f"{str(err).removeprefix(str(fetched) + ': ')}") from None
        finally:
            fetched.unlink(missing_ok=True)
        # the stored checkpoint knows only its run's ε; the released model costs the search's (said by evaluate)
        checkpoint.setdefault("provenance", {}).update(search)
        paths.append(save_checkpoint(checkpoint, path))
    return paths


def search_epsilon(study: optuna.Study) -> dict[str, float]:
    """What releasing the best trial costs, as of now (the provenance of what `dpnas best` exports): a run's own ε
    is not the cost of a model a search chose."""
    try:
        report = study_privacy(study)
    except ConfigError:  # a damaged journal: `best` still exports what it holds, and says the cost is not known
        return {"search_epsilon": "not stated: the study's storage is damaged (`dpnas privacy` says why)"}
    if report.public_data:  # a public proxy's search spent no private budget (`dpnas train` of it says so)
        return {}
    return {"search_epsilon": report.epsilon, "search_delta": report.delta}


def search_words(provenance: dict[str, Any]) -> str:
    """The search's ε in the words `dpnas best` and `dpnas evaluate` print (empty without one)."""
    if "search_epsilon" not in provenance:
        return ""
    if provenance.get("recipe_of_search"):  # `dpnas train` of a recipe `dpnas best` exported: a new run
        cost, delta = provenance["search_epsilon"], provenance.get("search_delta")
        if not isinstance(cost, str):
            delta = f"delta {delta:g}, " if isinstance(delta, float) else ""
            cost = f"epsilon {cost:.3f} ({delta}when exported)"
        return (f"its recipe was chosen by study {provenance.get('study', '?')!r}, whose search cost {cost} on the "
                "same records: this run's epsilon adds to it (`dpnas privacy` says what the search's covers)")
    if isinstance(provenance["search_epsilon"], str):
        return f"releasing it costs its whole search's epsilon, {provenance['search_epsilon']}"
    return (f"releasing it costs its whole search's epsilon {provenance['search_epsilon']:.3f} (delta "
            f"{provenance['search_delta']:g}, when exported; `dpnas privacy` says what it covers)")


def _what_a_retrain_is(recipe: RecipeFile) -> str:
    if recipe.privacy is None:
        return "at the budget `dpnas train` is given"
    if not recipe.privacy.private:
        return "a NON-PRIVATE run: this trial trained without DP-SGD, and so would the retrain"
    if recipe.privacy.reproducible:
        return ("the trial's run again, reproducible = true: its batches and noise come from the recorded seed, so "
                "whoever has it can regenerate them; --set reproducible=false trains a new private run to release")
    if recipe.privacy.val_noise == 0:
        return ("a new private run that spends its own epsilon, its validation scores exact: the validation "
                "records are not protected")
    return "a new private run: it spends its own epsilon"


def runs_count(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def budget_words(study: optuna.Study) -> str:
    """The study's privacy budget in words: a total, one ε for every trial, or the ε values it searched."""
    attrs = study.user_attrs
    if attrs.get("total_epsilon"):
        return f"total ε = {attrs['total_epsilon']:g} for the whole search"
    try:
        searched = tomllib.loads(attrs.get("study_file") or "").get("search", {}).get("epsilon")
    except tomllib.TOMLDecodeError:
        searched = None
    if searched is not None:
        # trials that trained: not a queued retry (a copy of its original's settings) nor a skipped repeat
        nonprivate = sum(1 for t in study.get_trials(deepcopy=False)
                         if (t.user_attrs.get("privacy_config") or {}).get("epsilon") == math.inf
                         and t.state != optuna.trial.TrialState.WAITING and "duplicate_of" not in t.user_attrs)
        return (f"ε searched per trial ({searched}; inf trains without privacy: {nonprivate} trial"
                f"{'s' if nonprivate != 1 else ''} so far)")
    epsilon = attrs.get("epsilon")
    if epsilon == math.inf or (isinstance(epsilon, str) and epsilon.startswith("inf")):
        return "none: every trial trains without DP-SGD (ε = inf, non-private)"
    return f"ε = {epsilon} for every trial (DP-SGD)"


def study_note(study: optuna.Study, privacy: StudyPrivacy, storage_url: str) -> str:
    """A markdown note for optuna-dashboard: budget, the search's privacy cost, the best architecture."""
    attrs = study.user_attrs
    states = {s.name: 0 for s in TrialState}
    repeats = 0  # proposals of a point already trained: FAIL in the dashboard, though nothing failed
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] += 1
        repeats += t.state == TrialState.FAIL and "duplicate_of" in t.user_attrs
    if repeats:
        states["FAIL"] -= repeats
    lines = [
        f"# dpnas study `{study.study_name}`",
        "",
        f"- **Data**: {attrs.get('dataset')} (selection on the validation split; test accuracy recorded, never used to select).",
        f"- **Budget**: {budget_words(study)}, δ = {attrs.get('delta')}.",
        f"- **Trials**: {', '.join(f'{k.lower()} {v}' for k, v in states.items() if v) or 'none yet'}; sampler "
        f"{attrs.get('sampler')}, pruner {attrs.get('pruner')}, trial count {attrs.get('trial_count')}.",
        *([(f"- **Repeated proposals**: {repeats}, shown as FAIL (user attribute `duplicate_of`): the sampler "
            "proposed a point already trained, so it was skipped, not trained: no privacy budget spent, no slot of "
            "the budget taken.")] if repeats else []),
        "",
        "## Privacy cost of the search",
        *([f"**{privacy.headline()}.**", ""] if privacy.headline() else []),
        f"Releasing the best trial: **ε = {privacy.epsilon:.3f}, δ = {privacy.delta:g}** for the whole dataset "
        f"({runs_count(privacy.runs)} touched the data; one run alone: ε = {privacy.per_run_epsilon:.3f}).",
        "",
        *(f"- {c['records']} records ({c['count']}): ε = {c['epsilon']:.3f}" for c in privacy.covers),
        *(f"- **Not covered**: {line}" for line in privacy.not_covered),
        "",
        privacy.explanation,
        *privacy.notes,
        "",
    ]
    best = best_trials(study)
    if best:
        lines.append("## Best architecture" + ("s (Pareto set)" if len(best) > 1 else ""))
        for t in best:
            lines.append(f"- trial {t.number}: values {t.values}, params {t.user_attrs.get('params')}, "
                         f"searched {t.params}")
        lines += ["", "```toml", recipe_to_toml(trial_recipe(study, best[0])).rstrip(), "```"]
    lines += ["", f"Open with: `{dashboard_command(storage_url, study_location(study, storage_url))}`"]
    return "\n".join(lines)


def privacy_statement(study: optuna.Study, report: StudyPrivacy | None = None) -> list[str]:
    """What `dpnas privacy` prints, line by line: the guarantee for releasing the best trial, part by part, how
    the budget was split, what is not covered and why the bound holds. The HTML report says the same words."""
    report = study_privacy(study) if report is None else report
    lines = [f"study {study.study_name!r}: mode {report.mode}, {runs_count(report.runs)} touched the data"]
    if report.headline():
        lines.append(report.headline())
    lines.append(f"releasing the best trial: epsilon = {report.epsilon:.4f}, delta = {report.delta:g} for the whole "
                 f"dataset (one run alone: epsilon = {report.per_run_epsilon:.4f})")
    for part in report.covers:
        count = part["count"] if part["count"] is not None else "?"
        lines.append(f"  {part['records']}: {count} records at epsilon = {part['epsilon']:.4f}")
    budget = report.budget
    lines.append(f"budget: {runs_count(budget['runs'])}, noise multipliers {budget['noise_multipliers']}, validation noise "
                 f"{budget['val_noise']} on the correct count, {budget['val_releases']} validation releases, trial "
                 f"count {budget['trial_count']}" + (f", total_epsilon {budget['total_epsilon']:g}"
                                                     if budget["total_epsilon"] else ""))
    lines += [f"not covered: {line}" for line in report.not_covered]
    lines.append(report.explanation)
    return lines + list(report.notes)


def save_study_note(study: optuna.Study, storage_url: str) -> str:
    note = study_note(study, study_privacy(study), storage_url)
    dashboard_note_module().save_note(study, note)
    return note


@functools.cache
def dashboard_note_module() -> ModuleType:
    """optuna-dashboard's note functions (``save_note``, ``get_note``), loaded without the package's ``__init__``.

    That ``__init__`` imports the dashboard's web app and, through Optuna's importance module, scikit-learn: 0.65-0.75 s
    on the 2-core machine, 6 % of the quickstart's whole `dpnas search`, to write one note. The note module itself
    needs only Optuna, so it is loaded on its own from the installed package (the same code, under a private name);
    where that file is not found (another layout of the package), the package is imported as usual.
    """
    spec = importlib.util.find_spec("optuna_dashboard")  # finds the package without running it
    path = Path(spec.origin).with_name("_note.py") if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        import optuna_dashboard._note

        return optuna_dashboard._note
    module_spec = importlib.util.spec_from_file_location("dpnas._optuna_dashboard_note", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def summary_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                     "epsilon_spent": t.user_attrs.get("epsilon_spent"), "reason": t.user_attrs.get("failure_reason")})
    return rows

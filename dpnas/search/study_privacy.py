"""What a study's releases cost, record by record: the report behind `dpnas privacy`, the dashboard note and the
line a search ends with.

Neighbouring datasets differ by adding or removing one record (Opacus's relation, used throughout). Each record
of the user's data lies in exactly one part, by a hash of its own index (:func:`dpnas.data.datasets.hash_split`):

* a **training** record is seen only by DP-SGD: the study's bound for it composes (or selects among) the runs'
  DP-SGD curves;
* a **validation** record is seen only through the noisy validation scores (the Gaussian mechanism on the
  correct count): its bound composes (or selects among) the runs' count-release curves;
* a **test** record is seen by every trial's exact test accuracy, stored for the report (it steers nothing):
  not covered, and the report says so.

A neighbouring pair differs in one record of one part, so the dataset (training + validation) is covered at the
larger of the two parts' ε (parallel composition).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import optuna

from dpnas.arch.space import ConfigError
from dpnas.dp.privacy import rdp_to_epsilon
from dpnas.search.fidelity import Fidelity
from dpnas.search.privacy import (
    ORDERS,
    RunPrivacy,
    _check_delta,
    expected_trials_tnb,
    part_curve,
    rdp_curve,
    validation_curve,
)
from dpnas.search.storage import journal_damage

CALIBRATION_ATTR = "dpnas:calibration"
TRIAL_TARGET_ATTR = "dpnas:n_trials"
"""The number of trials the study runs; for a random count, the K drawn in secret."""


@dataclass(frozen=True)
class StudyPrivacy:
    """The study-level (ε, δ) of releasing its best trial (model, recipe, noisy score), part by part."""

    epsilon: float
    """The whole dataset (training + validation records): the larger of the two parts' ε."""
    delta: float
    mode: str
    """The accounting used: fixed | poisson | truncated_negative_binomial."""
    runs: int
    per_run_epsilon: float
    """The largest single run's ε (training or validation part), for comparison."""
    training_epsilon: float
    validation_epsilon: float
    covers: list[dict[str, Any]]
    """One entry per part: records, count, epsilon, delta."""
    not_covered: list[str]
    budget: dict[str, Any]
    explanation: str
    notes: list[str] = field(default_factory=list)
    public_data: bool = False
    """The search's data were marked public ([data] public = true): the ε above protects no one's private records."""
    fidelity: dict[str, Any] = field(default_factory=dict)
    """The study's [fidelity] settings (dpnas.search.fidelity)."""
    dataset: str | None = None
    reproducible: list[int] = field(default_factory=list)
    """Private trials whose batches and noise can be regenerated from the recorded seed (``reproducible = true``):
    the ε above does not hold against whoever has it."""

    def headline(self) -> str | None:
        """What budget covers what, for a study that did not search at the target on private data."""
        if self.public_data:
            return (f"the search trained on public data ({self.dataset}, [data] public = true): it spends no "
                    "private budget, and the epsilons below are those of its simulated runs. `dpnas train "
                    "RECIPE --dataset PRIVATE` trains the winner once on the private data: that run's epsilon is "
                    "the whole private cost")
        if Fidelity.from_record(self.fidelity).trains_proxy:
            return ("the search trained cheaper proxies of its points ([fidelity]: "
                    f"{', '.join(f'{k} = {v}' for k, v in self.fidelity.items())}); the epsilons below are what "
                    "its runs cost on these records. `dpnas train` of the exported recipe (the target fidelity) "
                    "spends its own epsilon on top")
        return None

    def protected(self) -> dict[str, bool]:
        """Which parts the ε above protects: a finite ε, and noise no stored seed regenerates."""
        secret = not self.reproducible
        return {"training": math.isfinite(self.training_epsilon) and secret,
                "validation": math.isfinite(self.validation_epsilon) and secret,
                "dataset": math.isfinite(self.epsilon) and secret}

    def to_dict(self) -> dict:
        return asdict(self)


def own_privacy_plan(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    """The privacy plan `trial` recorded itself before touching the data, or None: it has not touched them.

    Optuna's retry of a failed trial arrives with a copy of the original's user attributes, plan included; the
    original is the run that is charged. A retry that has not run (WAITING), or whose worker died or was
    interrupted after taking it and before it recorded its own plan, never touched the data: charging its copy
    counted one run twice, and a total-ε study stopped a run short ("total_epsilon is spent"). A plan names the
    trial that wrote it; it is a copy only where that is a trial this one retries (Optuna's retry history), so a
    plan that cannot be told apart (written by an older version, or its numbers changed by a copy of the study)
    is charged: never fewer runs than ran.
    """
    plan = trial.user_attrs.get("privacy_plan")
    if plan is None or trial.state == optuna.trial.TrialState.WAITING:
        return None
    writer = plan.get("trial")
    inherited = writer is not None and writer != trial.number and writer in trial.system_attrs.get("retry_history", ())
    return None if inherited else plan


def run_privacy(plan: dict[str, Any]) -> RunPrivacy:
    """A trial's recorded privacy plan. Plans written before validation scores were noisy have no ``val_*``
    fields: their scores were exact, which this reads as one noiseless release (validation ε = ∞)."""
    return RunPrivacy(noise_multiplier=plan["noise_multiplier"], sample_rate=plan["sample_rate"], steps=plan["steps"],
                      val_noise=plan.get("val_noise", 0.0), val_releases=plan.get("val_releases", 1))


@functools.lru_cache(maxsize=4096)
def _run_curves(run: RunPrivacy) -> tuple[np.ndarray, np.ndarray]:
    """One run's (training, validation) RDP curves. Opacus's RDP takes about 0.1 s a run, and a study's runs share
    few distinct plans (σ is calibrated per batch size and epoch count), so each plan is computed once: a search's
    progress can then be accounted again after every trial. Read-only, as the cache hands out the same arrays."""
    train, val = rdp_curve(run), validation_curve(run)
    train.setflags(write=False)
    val.setflags(write=False)
    return train, val


def account(runs: list[RunPrivacy], *, mode: str, delta: float, mu=None, eta=None, gamma=None,
            random_search: bool = True, drawn_runs: int | None = None) -> tuple[str, float, float, float, list[str]]:
    """(mode used, training ε, validation ε, per-run ε, notes) for these runs.

    `drawn_runs`: the count a random-count search drew in secret (None: not known, taken as the runs there are).
    """
    _check_delta(delta)
    notes = []
    if mode != "fixed" and not random_search:
        notes.append(f"The {mode.replace('_', ' ')} accounting (Papernot & Steinke) holds only for a random search "
                     "with independent trials; this search was adaptive (a sampler or pruner used other trials' "
                     "results), so its runs are composed instead.")
        mode = "fixed"
    elif mode != "fixed" and drawn_runs is not None and len(runs) < drawn_runs:
        # Stopped early (a timeout, Ctrl-C, a budget), the number of runs is no longer the secret random count the
        # bound is about: the best of fewer runs has no Papernot-Steinke guarantee, so the runs done are composed.
        notes.append(f"The {mode.replace('_', ' ')} accounting (Papernot & Steinke) covers the best of all the "
                     "trials the search drew in secret, and it has not run them all yet, so the runs so far are "
                     "composed instead. Run the same search again to finish it before releasing its best trial.")
        mode = "fixed"
    elif mode != "fixed" and drawn_runs is not None and len(runs) > drawn_runs:
        # More runs than the count drawn (a failed trial retried, by a dpnas that did not stop at the count): the
        # bound is about the best of exactly the drawn runs, so all of them are composed.
        notes.append(f"The {mode.replace('_', ' ')} accounting (Papernot & Steinke) covers the best of the trials "
                     "the search drew in secret, and more trials than that touched the data (a failed trial was "
                     "retried), so all the runs are composed instead.")
        mode = "fixed"
    options = dict(mode=mode, mu=mu, eta=eta, gamma=gamma)
    curves = [_run_curves(r) for r in runs]
    train_curves = np.array([t for t, _ in curves]).reshape(len(runs), len(ORDERS))
    val_curves = np.array([v for _, v in curves]).reshape(len(runs), len(ORDERS))
    training = rdp_to_epsilon(part_curve(train_curves, **options), delta)
    validation = rdp_to_epsilon(part_curve(val_curves, **options), delta)
    per_run = max((max(rdp_to_epsilon(t, delta), rdp_to_epsilon(v, delta)) for t, v in zip(train_curves, val_curves)),
                  default=0.0)
    return mode, training, validation, per_run, notes


def _sizes(trials) -> dict[str, int | None]:
    for t in trials:
        if "train_size" in t.user_attrs:
            return {k: t.user_attrs.get(k) for k in ("train_size", "val_size", "test_size")}
    return {"train_size": None, "val_size": None, "test_size": None}


def _count(n: int | None) -> str:
    return f"{n}" if n is not None else "all"


def _reproducible(charged) -> list[int]:
    """Private trials whose batches and noise were seeded from the recorded seed (``reproducible = true``)."""
    return [t.number for t in charged if (t.user_attrs.get("privacy_config") or {}).get("reproducible")
            and t.user_attrs.get("epsilon_target") != "inf (non-private)"]


def study_privacy(study: optuna.Study) -> StudyPrivacy:
    """The study's guarantee, from the privacy plans its trials recorded before touching the data."""
    damage = journal_damage(study._storage)
    if damage is not None and damage.dropped_records:
        raise ConfigError(f"study {study.study_name!r}: its journal is {damage.describe()}; the records after the "
                          "damage may hold runs that spent privacy, so no statement is made from the records before "
                          "it. Restore the journal from a copy")
    trials = study.get_trials(deepcopy=False)
    charged = [t for t in trials if own_privacy_plan(t) is not None]
    runs = [run_privacy(t.user_attrs["privacy_plan"]) for t in charged]
    attrs = study.user_attrs
    delta = float(attrs.get("delta", 1e-5))
    asked = attrs.get("trial_count", "fixed")
    random_search = attrs.get("sampler") == "random" and attrs.get("pruner") == "none"
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    drawn = system_attrs.get(TRIAL_TARGET_ATTR)
    mode, training, validation, per_run, notes = account(
        runs, mode=asked, delta=delta, mu=attrs.get("mean_trials"), eta=attrs.get("eta"), gamma=attrs.get("gamma"),
        random_search=random_search, drawn_runs=None if drawn is None else int(drawn))
    sizes = _sizes(trials)
    whole = max(training, validation)
    covers = [
        {"records": "training", "count": sizes["train_size"], "epsilon": training, "delta": delta},
        {"records": "validation", "count": sizes["val_size"], "epsilon": validation, "delta": delta},
        {"records": "dataset (training + validation)",
         "count": None if sizes["train_size"] is None else sizes["train_size"] + (sizes["val_size"] or 0),
         "epsilon": whole, "delta": delta},
    ]
    not_covered = []
    if runs and math.isinf(training):
        n = sum(r.noise_multiplier == 0 for r in runs)
        not_covered.append(f"the {_count(sizes['train_size'])} training records are not protected: {n} of the "
                           f"{len(runs)} trials trained without noise (non-private)")
    if runs and math.isinf(validation):
        n = sum(r.val_noise == 0 and r.val_releases > 0 for r in runs)
        not_covered.append(f"the {_count(sizes['val_size'])} validation records are not protected: {n} of the "
                           f"{len(runs)} trials released exact validation scores (val_noise = 0)")
    seeded = _reproducible(charged)
    if seeded:
        not_covered.append(f"the {_count(sizes['train_size'])} training and {_count(sizes['val_size'])} validation "
                           f"records are not protected from whoever has the seed: {len(seeded)} of the {len(runs)} "
                           f"trials ({', '.join(map(str, seeded[:20]))}{', ...' if len(seeded) > 20 else ''}) ran "
                           "with reproducible = true, so their batches and noise can be regenerated from "
                           "the recorded seed (retrain the chosen recipe without it before releasing a model)")
    if runs:
        not_covered.append(f"the {_count(sizes['test_size'])} test records: every trial's exact "
                           "test accuracy is stored for the report (it steers nothing)")
    calibration = system_attrs.get(CALIBRATION_ATTR)
    budget = _budget(runs, mode, attrs, calibration)
    fidelity = attrs.get("fidelity") or {}
    if calibration is not None and whole > calibration["total_epsilon"] * (1 + 1e-9):
        if "tan_batch" in fidelity:
            notes.append(f"total_epsilon = {calibration['total_epsilon']:g} is the budget of the search these TAN "
                         f"trials simulate; the simulated runs themselves cost ε = {whole:.4g}")
        else:
            notes.append(f"ε = {whole:.4g} exceeds the study's total_epsilon = {calibration['total_epsilon']:g}")
    others = sorted({(t.user_attrs.get("privacy_config") or {}).get("accountant", "rdp") for t in charged} - {"rdp"})
    if others:
        # Such a trial planned (and printed) its ε with its own accountant; across runs dpnas composes RDP curves,
        # a looser bound, so a run's ε here is higher than the trial's own: say so rather than leave two numbers.
        notes.append(f"the trials' own ε were accounted with the {' / '.join(a.upper() for a in others)} accountant "
                     f"([privacy] accountant); the search's runs are composed here with RDP, a looser bound, under "
                     f"which one run alone is ε = {per_run:.4g}")
    public = bool(attrs.get("public_data"))
    if runs:  # before any run, no record is unprotected, nor a subset trained on
        not_covered += _fidelity_gaps(trials, fidelity, sizes, public)
    explanation = _explain(mode, runs, delta, training, validation, whole, budget, attrs)
    return StudyPrivacy(epsilon=whole, delta=delta, mode=mode, runs=len(runs), per_run_epsilon=per_run,
                        training_epsilon=training, validation_epsilon=validation, covers=covers,
                        not_covered=not_covered, budget=budget, explanation=explanation, notes=notes,
                        public_data=public, fidelity=fidelity, dataset=attrs.get("dataset"), reproducible=seeded)


def _fidelity_gaps(trials, fidelity: dict[str, Any], sizes: dict[str, int | None], public: bool) -> list[str]:
    """What a study's [fidelity] proxies leave unprotected (or untouched), in words."""
    lines = []
    if "tan_batch" in fidelity:
        recorded = next((t.user_attrs["fidelity"] for t in trials if "target_batch_size" in
                         t.user_attrs.get("fidelity", {})), {})
        target = (f" for the target batch {recorded['target_batch_size']} (noise multiplier "
                  f"{recorded['target_noise_multiplier']:.4g} scaled to {recorded['noise_multiplier']:.4g}, the "
                  f"target's {recorded['target_steps']} steps)") if recorded else ""
        lines.append(f"the {_count(sizes['train_size'])} training records are not protected at the target epsilon: "
                     f"the trials are TAN simulations at batch {fidelity['tan_batch']}{target}, with less noise "
                     "than the target; the epsilon above is what they really cost"
                     + ("" if public else " ([fidelity] private_data_ok = false acknowledged that the results are "
                                          "not DP)"))
    if "data_fraction" in fidelity:
        recorded = next((t.user_attrs["fidelity"] for t in trials if "train_records" in
                         t.user_attrs.get("fidelity", {})), {})
        full = recorded.get("train_records")
        untouched = f"the other {full - sizes['train_size']}" if full and sizes["train_size"] else "the others"
        lines.append(f"untouched: the search trained on a seeded random {_count(sizes['train_size'])} of "
                     f"{full or 'the'} training records ([fidelity] data_fraction = {fidelity['data_fraction']:g}, "
                     f"each kept by a hash of its own index); {untouched} were not seen by any trial (epsilon 0)")
    return lines


def _budget(runs, mode, attrs, calibration) -> dict[str, Any]:
    budget: dict[str, Any] = {
        "runs": len(runs),
        "noise_multipliers": sorted({round(r.noise_multiplier, 6) for r in runs}),
        "val_noise": sorted({round(r.val_noise, 6) for r in runs}),
        "val_releases": sum(r.val_releases for r in runs),
        "total_epsilon": calibration["total_epsilon"] if calibration else None,
    }
    if mode == "poisson":
        budget["trial_count"] = {"distribution": "poisson", "mean": attrs.get("mean_trials")}
    elif mode == "truncated_negative_binomial":
        eta, gamma = attrs.get("eta"), attrs.get("gamma")
        budget["trial_count"] = {"distribution": "truncated_negative_binomial", "eta": eta, "gamma": gamma,
                                 "mean": expected_trials_tnb(eta, gamma)}
    else:
        # a random count cut short is composed over the runs done (its calibration has no fixed count)
        fixed = calibration["runs"] if calibration and calibration.get("runs") is not None else len(runs)
        budget["trial_count"] = {"distribution": "fixed", "runs": fixed}
    if calibration:
        budget["calibration"] = calibration
    return budget


def _explain(mode, runs, delta, training, validation, whole, budget, attrs) -> str:
    if not runs:
        return "No trial has touched the data yet, so the search has spent no privacy (ε = 0)."
    if mode == "fixed":
        how = (f"all {len(runs)} runs that touched the data composed (RDP); it holds however the trials were chosen, "
               "adaptive samplers and pruners included, and even if every trial's model and noisy scores are published")
    else:
        k = budget["trial_count"]
        how = (f"releasing only the best trial of a random search whose number of trials was drawn in secret from a "
               f"{k['distribution'].replace('_', ' ')} distribution (mean {k['mean']:.3g}; this study ran "
               f"{len(runs)}, a count to keep private as well); "
               "it assumes every trial's settings were drawn independently from the same distribution and that "
               "nothing but the best trial (model, recipe and noisy score) is published (Papernot & Steinke, "
               "ICLR 2022)")
    total = budget.get("total_epsilon")
    within = f" The study's total_epsilon is {total:g}." if total else ""
    return (f"ε = {whole:.4g} at δ = {delta:g} for every record of the dataset the search trained and scored on "
            f"(training records ε = {training:.4g}, validation records ε = {validation:.4g}: disjoint parts assigned "
            f"record by record, so each is covered at its own part's ε), for {how}. Each run is charged its planned "
            f"steps and every noisy validation release it planned (one per epoch, or the search's [fidelity] "
            f"validations), finished or not ({budget['val_releases']} releases in all).{within}")

"""Refuse before spending: everything that would fail every trial of a study is checked before the first one.

A study holds a privacy budget that cannot be refunded. An unusable device, a δ that the real training split
makes meaningless, an objective with no validation split to read, an engine flag the model cannot take, or a
study file whose budget, data or objectives differ from the stored study's would each fail (or silently mix)
every trial, some after training fully. :func:`check_study` finds all of them first, in seconds, with one line,
before a trial takes a slot or touches data; ``dpnas search STUDY --check`` runs only these checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, check_distribution_compatibility

from dpnas.arch.models import check_image_size
from dpnas.arch.space import ConfigError
from dpnas.data.datasets import DEFAULT_IMAGE_SIZE, DatasetSplits
from dpnas.dp.memory import check_training_fits
from dpnas.dp.preflight import preflight
from dpnas.dp.privacy import check_budget, plan_privacy
from dpnas.dp.train import check_device
from dpnas.search.calibration import run_shapes, shape_key, start_study_calibration
from dpnas.search.fidelity import check_target, load_search_data, search_trial
from dpnas.search.sampling import ablation_points, axis_distribution, grid_points, suggest
from dpnas.search.study_file import StudySpec
from dpnas.search.study_privacy import CALIBRATION_ATTR, own_privacy_plan

BUDGET_ATTR = "dpnas:budget"
DATA_ATTR = "dpnas:data"


@dataclass
class CheckReport:
    data: DatasetSplits
    lines: list[str]


def stored_mismatches(study: optuna.Study, spec: StudySpec) -> list[str]:
    """What the study file asks for that differs from what the stored study was created with."""
    system = study._storage.get_study_system_attrs(study._study_id)
    problems = objective_mismatch(study, spec)
    for attr, asked, what in ((BUDGET_ATTR, spec.budget(), "privacy budget"),
                              (DATA_ATTR, stored_data(spec), "data")):
        stored = system.get(attr)
        if stored is None:  # a study created before these were recorded: nothing to compare against
            continue
        changed = sorted(k for k in set(stored) | set(asked) if stored.get(k) != asked.get(k))
        if changed:
            problems.append(f"{what}: " + ", ".join(f"{k} {stored.get(k)!r} → {asked.get(k)!r}" for k in changed))
    # A total-epsilon study's noise was calibrated per run shape when it was created; a trial of another shape
    # has no noise that keeps the total (its trial used to fail after taking a slot)
    calibration = system.get(CALIBRATION_ATTR)
    if spec.total_epsilon is not None and calibration is not None:
        calibrated = sorted(calibration["noise_multipliers"])
        asked_shapes = sorted({shape_key(b, e) for b, e in run_shapes(spec)})
        if not set(asked_shapes) <= set(calibrated):
            problems.append(f"run shapes: ({'; '.join(calibrated)}) → ({'; '.join(asked_shapes)})")
    return problems


def runs_charged(study: optuna.Study) -> int:
    """Trials that recorded a privacy plan, i.e. touched (or were about to touch) the data, whatever became of them,
    and RUNNING trials that have not recorded it yet: a worker asked for them and is about to.

    Without the second kind, a worker that takes a slot between another worker's `ask` and its plan would not see
    that run, and two workers could start the last run of a total-ε study's budget (once a failed run was
    retried, the slots no longer count the runs). A RUNNING trial that ends before its plan (its worker died, the
    data did not fit the device) stops counting when it is failed.

    A WAITING trial has not run: when it is Optuna's retry of a failed one, it carries a copy of the original's
    user attributes, privacy plan included, and must not be charged twice; nor when it is failed before it
    records its own plan (:func:`~dpnas.search.study_privacy.own_privacy_plan`). Nor is a RUNNING retry that
    continues a stopped run (``continues_run_of``): that run is charged to the trial that started it. (A retry of
    such a retry arrives with a copy of that mark, which the worker that asks it clears: it is counted until it
    continues.)
    """
    return sum(1 for t in study.get_trials(deepcopy=False)
               if (t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("continues_run_of") is None)
               or own_privacy_plan(t) is not None)


def runs_recorded(study: optuna.Study) -> int:
    """Trials that recorded their own privacy plan: the runs that have touched the data, as a study's end line says
    (:func:`runs_charged` also counts the RUNNING trials about to record one, which the budget must)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if own_privacy_plan(t) is not None)


def refuse_other_repeats(study: optuna.Study, spec: StudySpec) -> None:
    """An ablation's trials are enqueued once, R per point, when the study is created: another R cannot apply to it
    (nor be silently ignored), spent or not."""
    stored = study.user_attrs.get("repeats")  # None: a study from before repeats, or another sampler's
    if spec.sampler == "ablation" and stored is not None and stored != spec.repeats:
        raise ConfigError(f"study {study.study_name!r} was created with repeats = {stored}, and its trials were "
                          f"enqueued then; the study file asks for repeats = {spec.repeats}. Restore repeats = "
                          f"{stored}, or start a new study (--study-name NAME or a new storage)")


def objective_mismatch(study: optuna.Study, spec: StudySpec) -> list[str]:
    """An Optuna study's objectives are fixed when it is created: a file that names others cannot join it."""
    stored = study.user_attrs.get("objectives")
    directions = [d.name.lower() for d in study.directions]
    if (stored is not None and list(stored) != list(spec.objectives)) or directions != list(spec.directions):
        return [f"objectives {list(stored) if stored is not None else directions} became {list(spec.objectives)}"]
    return []


def space_mismatches(study: optuna.Study, spec: StudySpec) -> list[str]:
    """Searched parameters that the study's trials hold with a distribution Optuna cannot mix with the study file's:
    another kind (a range became a list), another log scaling, or other choices (or order) of a list. Optuna
    refuses such a parameter only when a trial suggests it, with a traceback, after the trial took a slot."""
    axes = {axis.name: axis for axis in spec.axes}
    stored: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        for name, distribution in trial.distributions.items():
            stored.setdefault(name, distribution)
    problems = []
    for name, old in sorted(stored.items()):
        axis = axes.get(name)
        if axis is None:  # not searched any more, or FIELD[a,b]: a name that carries its own choices
            continue
        new = axis_distribution(axis)
        try:
            check_distribution_compatibility(old, new)
        except ValueError:
            problems.append(f"search.{name} {_describe(old)} → {_describe(new)}")
    return problems


def _describe(distribution: Any) -> str:
    if isinstance(distribution, CategoricalDistribution):
        return repr(list(distribution.choices))
    log = ", log" if distribution.log else ""
    step = f", step {distribution.step:g}" if distribution.step is not None and not distribution.log else ""
    return f"{{low {distribution.low:g}, high {distribution.high:g}{step}{log}}}"


def refuse_space_change(study: optuna.Study, problems: list[str]) -> None:
    raise ConfigError(f"study {study.study_name!r} holds trials of another search space ({'; '.join(problems)}); "
                      "Optuna cannot keep both in one study. Restore those axes in the study file, or start a new "
                      "study (--study-name NAME or a new storage)")


def stored_data(spec: StudySpec) -> dict[str, Any]:
    """The data settings a study keeps to itself; where the files live (data_dir) may change."""
    return {k: v for k, v in spec.data_settings().to_dict().items() if k != "data_dir"}


def refuse_mismatch(study: optuna.Study, problems: list[str]) -> None:
    raise ConfigError(f"study {study.study_name!r} was created with other settings ({'; '.join(problems)}); "
                      "changing them in an existing study would mix budgets or data in one result. Restore the "
                      "study file, or start a new study (--study-name NAME or a new storage)")


def refuse_ablation_trial_count(spec: StudySpec, n_trials: int | None) -> None:
    """An ablation's count is its points x repeats: `--n-trials` cannot change it (nor be silently ignored)."""
    if n_trials is not None and spec.sampler == "ablation":
        raise ConfigError("--n-trials: an ablation trains each of its points once per repeat; repeats and the "
                          "[search] axes set how many trials")


def _trial_count(spec: StudySpec, n_trials: int | None) -> int | None:
    if spec.trial_count != "fixed":
        return None
    if spec.sampler == "ablation":
        refuse_ablation_trial_count(spec, n_trials)
        return len(ablation_points(spec)) * spec.repeats  # every repeat is a run of its own
    if spec.sampler == "grid":  # capped at the grid's size, as the study's target is
        return min(n_trials or spec.n_trials or math.inf, len(grid_points(spec)))
    return n_trials if n_trials is not None else spec.n_trials


def _privacy_settings(spec: StudySpec) -> list[Any]:
    """Every (ε, δ) a trial can train at: the base, and each searched value."""
    settings = [spec.privacy]
    for axis in spec.axes:
        if axis.name in ("epsilon", "delta") and axis.categorical:
            settings += [spec.privacy.replace(**{axis.name: v}) for v in axis.choices]
        elif axis.name in ("epsilon", "delta"):
            settings += [spec.privacy.replace(**{axis.name: v}) for v in (axis.low, axis.high)]
    return settings


def _largest_batch(spec: StudySpec) -> int:
    """The largest batch size a trial can take: the base, or the largest searched value."""
    axis = next((a for a in spec.axes if a.name == "batch_size"), None)
    if axis is None:
        return spec.train.batch_size
    values = axis.grid_values() if axis.categorical or axis.step is not None else [axis.high]
    return int(max(values + [spec.train.batch_size] if spec.sampler == "ablation" else values))


def first_point(spec: StudySpec, image_size: int | None = None):
    """The first valid point a sampler would propose, drawn in a throwaway in-memory study (with `image_size`, one
    whose downsamplings that size and the exported recipe's ([data] image_size) can take: the others are pruned
    before they touch data, like invalid points)."""
    target_size = spec.image_size or DEFAULT_IMAGE_SIZE[spec.dataset]
    # NumPy's generators take seeds below 2**32; a study's seed may be any up to 2**63 - 1
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.seed % 2**32),
                                  directions=spec.directions)
    last: ConfigError | None = None
    for _ in range(20):
        try:
            configs = suggest(scratch.ask(), spec)
            if image_size is not None:
                check_image_size(configs[0], image_size)
                if target_size != image_size:  # a search at another resolution ([fidelity]), as runner._propose
                    check_image_size(configs[0], target_size)
            return configs
        except ConfigError as err:
            last = err
    raise ConfigError(f"the search space proposed 20 invalid points in a row (last: {last})")


def check_study(spec: StudySpec, *, device: str | None = None, n_trials: int | None = None,
                stored: optuna.Study | None = None, data: DatasetSplits | None = None,
                progress: bool = False) -> CheckReport:
    """Every check that would otherwise fail every trial; raises ConfigError (one line) at the first problem."""
    lines = []
    parsed = check_device(device)
    if stored is not None:
        refuse_other_repeats(stored, spec)
    # Budget and data may still change while nothing is spent (the study adopts them); objectives never can.
    if stored is not None and (problems := stored_mismatches(stored, spec)) and (
            runs_charged(stored) or objective_mismatch(stored, spec)):
        refuse_mismatch(stored, problems)
    if stored is not None and (problems := space_mismatches(stored, spec)):
        refuse_space_change(stored, problems)
    if spec.val_fraction == 0:
        raise ConfigError(f"{spec.path}: data.val_fraction: the objective val_accuracy is read on the validation "
                          "split; set val_fraction > 0 (0.2 is customary)")
    if data is None:
        data = load_search_data(spec, progress=progress)
    lines.append(f"data: {spec.dataset}, {len(data.train)} training, {len(data.val)} validation and "
                 f"{len(data.test)} test records" + (f" (the search's {spec.fidelity.data_fraction:g} of "
                                                     f"{data.full_train_size} training records)"
                                                     if data.full_train_size is not None else ""))
    for privacy in _privacy_settings(spec):
        check_budget(privacy, dataset_size=len(data.train))
    largest = _largest_batch(spec)
    if largest > len(data.train):
        # a searched batch the first point does not take would fail its trials one by one, each taking a slot
        subset = (f" (the search's [fidelity] data_fraction {spec.fidelity.data_fraction:g} of "
                  f"{data.full_train_size})" if data.full_train_size is not None else "")
        raise ConfigError(f"batch_size: {largest} is larger than the {len(data.train)} training records the "
                          f"trials train on{subset}; Poisson sampling needs a sample rate of at most 1: search smaller "
                          "batch sizes" + (" or a larger data_fraction" if subset else ""))
    calibration = None
    if spec.total_epsilon is not None:
        pending = start_study_calibration(spec, runs=_trial_count(spec, n_trials), train_size=len(data.train))
        try:
            # Meanwhile, what the preflight's optimizer would import anyway: every torch optimizer imports
            # torch._dynamo on first use (0.6-1.5 s on 2 CPU cores). Both hold the GIL; side by side (the
            # calibration in a forked child) the search's start takes the longer of the two instead of their sum.
            import torch._dynamo  # noqa: F401

            calibration = pending.result()
        except BaseException:
            pending.cancel()
            raise
        lines.append(f"budget: total epsilon {spec.total_epsilon:g} → noise multipliers "
                     f"{sorted(set(round(s, 4) for s in calibration.noise_multipliers.values()))}, validation "
                     f"noise {calibration.val_noise:.3g}")
    arch, train_cfg, privacy = first_point(spec, data.image_size)
    check_target(spec, train_cfg, privacy, train_size=data.full_train_size or len(data.train))
    scaled = search_trial(spec, train_cfg, privacy, calibration=calibration, train_size=len(data.train))
    train_cfg, privacy = scaled.train, scaled.privacy
    # the trial as it will train: a fixed noise multiplier that overspends epsilon, steps no noise can pay for, a
    # batch too large for a data_fraction's subset, or a TAN target whose noise no epsilon reaches, is refused
    # here, before the first trial takes a slot (each trial used to fail on it after taking one)
    plan_privacy(privacy, dataset_size=len(data.train), batch_size=train_cfg.batch_size,
                 epochs=train_cfg.epochs, steps=scaled.steps, releases=scaled.validations)
    if spec.fidelity.active:
        lines.append(f"fidelity: the search trains at {spec.fidelity.describe()}; `dpnas best` exports the target")
    check_training_fits(arch, train_cfg, dataset=spec.dataset, image_size=data.image_size, device=parsed,
                        synthetic_size=spec.synthetic_size)
    preflight(arch, train_cfg, privacy, num_classes=data.num_classes, in_channels=data.in_channels,
              image_size=data.image_size, device=parsed)
    lines.append(f"preflight: one DP-SGD step of the first sampled point on {parsed} passed (random data, no epsilon)")
    return CheckReport(data=data, lines=lines)

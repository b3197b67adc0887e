"""Turning a study's axes into configs: define-by-run suggestions, grids, ablations, and what counts as a repeat.

Every ``trial.suggest_*`` call of dpnas lives here. An axis is suggested only where its field matters
(:data:`dpnas.arch.conditions.ARCH_RELEVANCE`, :data:`dpnas.dp.config.DP_RELEVANCE`) and offers only the values
allowed in that context, so every sampled point is valid; the axes are visited parents first.

Optuna needs one choice list per parameter name for the whole study. Where a context allows only some of an
axis's choices (``scalenorm`` without ``before_act`` next to a dense merge), the parameter is named
``FIELD[a,b]`` after the choices it offers. Either way a trial's full configs are in its user attributes
(``config``, ``train_config``, ``privacy_config``), and :func:`field_of` maps a parameter name to its field.

Two points are the same when their *effective* configs agree (fields that do not matter dropped);
:func:`config_key` is that identity, and the search trains each key at most once.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from dpnas.arch.conditions import (
    ARCH_RELEVANCE,
    ARCH_VALUE_RULES,
    canonical_norm,
    effective,
    matters,
    neutralise,
    value_allowed,
)
from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.dp.config import DP_RELEVANCE, PrivacyConfig, TrainConfig
from dpnas.search.study_file import REPEAT_SEED_STRIDE, Axis, StudySpec

RELEVANCE = {**ARCH_RELEVANCE, **DP_RELEVANCE}
VALUE_RULES = dict(ARCH_VALUE_RULES)

Configs = tuple[ArchConfig, TrainConfig, PrivacyConfig]
_TARGETS = ("arch", "train", "privacy")


def field_of(param_name: str) -> str:
    """The config field a parameter sets (``scalenorm[none,after_add]`` sets ``scalenorm``)."""
    return param_name.split("[", 1)[0]


def ordered_axes(axes: tuple[Axis, ...]) -> list[Axis]:
    """The axes with every rule's parents before the field it governs (the file's order otherwise)."""
    names = {a.name for a in axes}
    parents = {a.name: set() for a in axes}
    for axis in axes:
        rules = [RELEVANCE.get(axis.name)] + [r for (f, _), r in VALUE_RULES.items() if f == axis.name]
        for rule in filter(None, rules):
            parents[axis.name] |= set(rule.parents) & names - {axis.name}
    ordered: list[Axis] = []
    pending = list(axes)
    while pending:
        ready = [a for a in pending if parents[a.name] <= {o.name for o in ordered}]
        if not ready:  # a cycle cannot arise from the tables, but never loop forever
            ready = pending[:1]
        ordered.append(ready[0])
        pending.remove(ready[0])
    return ordered


def _base_values(spec: StudySpec) -> dict[str, Any]:
    return {**spec.arch.to_dict(), **spec.train.to_dict(), **spec.privacy.to_dict()}


def _choices_here(axis: Axis, values: dict[str, Any]) -> list:
    return [c for c in axis.choices if value_allowed(VALUE_RULES, axis.name, c, values)]


def param_name(axis: Axis, allowed: list) -> str:
    if len(allowed) == len(axis.choices):
        return axis.name
    return f"{axis.name}[{','.join(map(str, allowed))}]"


Chooser = Callable[[Axis, str, list | None], Any]
"""(axis, parameter name, the choices allowed here or None for a range) -> the value."""


def build_point(spec: StudySpec, choose: Chooser) -> tuple[Configs, dict[str, Any]]:
    """Walk the axes parents-first, asking `choose` only for the fields that matter; (configs, params chosen)."""
    values = _base_values(spec)
    params: dict[str, Any] = {}
    for axis in ordered_axes(spec.axes):
        values = neutralise(RELEVANCE, values)
        if not matters(RELEVANCE, axis.name, values):
            continue
        allowed = _choices_here(axis, values) if axis.categorical else None
        if allowed is not None and not allowed:
            raise ConfigError(f"search.{axis.name}: none of {list(axis.choices)} is allowed here "
                              f"({_why_not(axis, values)})")
        name = param_name(axis, allowed) if allowed is not None else axis.name
        value = choose(axis, name, allowed)
        params[name] = value
        values[axis.name] = value
    return configs_from_values(neutralise(RELEVANCE, values)), params


def _why_not(axis: Axis, values: dict[str, Any]) -> str:
    reasons = {VALUE_RULES[(axis.name, c)].text for c in axis.choices if (axis.name, c) in VALUE_RULES
               and not VALUE_RULES[(axis.name, c)].holds(values)}
    return "; ".join(sorted(reasons)) or "no value fits"


def configs_from_values(values: dict[str, Any]) -> Configs:
    fields = {t: {f for f in cls.__dataclass_fields__} for t, cls in zip(_TARGETS, (ArchConfig, TrainConfig, PrivacyConfig))}
    return (
        ArchConfig.from_dict({k: v for k, v in values.items() if k in fields["arch"]}),
        TrainConfig.from_dict({k: v for k, v in values.items() if k in fields["train"]}),
        PrivacyConfig.from_dict({k: v for k, v in values.items() if k in fields["privacy"]}),
    )


def axis_distribution(axis: Axis) -> BaseDistribution:
    """The distribution :func:`suggest` gives the parameter named after the axis (a categorical one where all its
    choices are offered)."""
    if axis.categorical:
        return CategoricalDistribution(list(axis.choices))
    if axis.integer:
        return IntDistribution(int(axis.low), int(axis.high), step=int(axis.step or 1), log=axis.log)
    return FloatDistribution(axis.low, axis.high, step=axis.step, log=axis.log)


def suggest(trial: Any, spec: StudySpec) -> Configs:
    """Every ``suggest_*`` call of a study, define-by-run: a field is suggested only where it matters.

    Raises ConfigError when a point is still invalid (a combination no rule covers); the trial is then
    pruned before it touches any data.
    """

    def choose(axis: Axis, name: str, allowed: list | None) -> Any:
        if allowed is not None:
            return trial.suggest_categorical(name, allowed)
        if axis.integer:
            return trial.suggest_int(name, int(axis.low), int(axis.high), step=int(axis.step or 1), log=axis.log)
        return trial.suggest_float(name, axis.low, axis.high, step=axis.step, log=axis.log)

    configs, _ = build_point(spec, choose)
    seed = trial.user_attrs.get("repeat_seed")
    if seed is not None:  # an ablation repeat: the same point, initialised (and augmented) from its own seed
        arch, train_cfg, privacy = configs
        configs = (arch, train_cfg.replace(seed=seed), privacy)
    return configs


def repeat_seed(spec: StudySpec, repeat: int) -> int:
    """The training seed of an ablation point's repeat: repeat 0 trains at the study's [train] seed.

    It fixes the initialisation and augmentation only; a private run's batches and noise stay secret (drawn from
    the OS) unless ``reproducible = true`` asks for them to follow the seed (see dpnas.dp.train.release_seeds).
    The data split stays the study's, so the repeats of every point are scored on the same validation records.
    """
    return spec.train.seed + REPEAT_SEED_STRIDE * repeat


def config_key(configs: Configs) -> str:
    """The identity of what a trial trains: its effective configs, hashed (norms that build the same layers,
    such as GroupNorm with a group per channel and InstanceNorm, are one identity)."""
    arch, train, privacy = configs
    values = effective(RELEVANCE, {**arch.to_dict(), **canonical_norm(arch), **train.to_dict(), **privacy.to_dict()})
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _enumerate(spec: StudySpec) -> Iterator[tuple[Configs, dict[str, Any]]]:
    """Every point of a finite space (categorical axes, or ranges with a step), as a define-by-run tree."""
    axes = ordered_axes(spec.axes)

    def walk(index: int, values: dict[str, Any], params: dict[str, Any]):
        values = neutralise(RELEVANCE, values)
        if index == len(axes):
            try:
                yield configs_from_values(values), dict(params)
            except ConfigError:
                pass  # a combination no rule covers: not a point of the space
            return
        axis = axes[index]
        if not matters(RELEVANCE, axis.name, values):
            yield from walk(index + 1, values, params)
            return
        options = axis.grid_values()
        if axis.categorical:
            options = _choices_here(axis, values)
            name = param_name(axis, options)
        else:
            name = axis.name
        for value in options:
            yield from walk(index + 1, {**values, axis.name: value}, {**params, name: value})

    yield from walk(0, _base_values(spec), {})


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    """A grid study's valid, distinct points as trial parameters, shuffled with the study's seed.

    The shuffle lets a study cut short (n_trials below the grid's size) cover the grid evenly; every worker
    takes the same enqueued list, so K workers run exactly the grid.
    """
    seen: set[str] = set()
    points = []
    for configs, params in _enumerate(spec):
        key = config_key(configs)
        if key not in seen:
            seen.add(key)
            points.append(params)
    random.Random(spec.seed).shuffle(points)
    return points


ABLATION_BASE = "base"
"""The ``ablation_axis`` of an ablation's base point (every other point names the one axis it moves)."""


class AblationPoint(NamedTuple):
    params: dict[str, Any]
    axis: str
    """The axis this point moves away from the base, or ABLATION_BASE."""


def ablation_plan(spec: StudySpec) -> list[AblationPoint]:
    """The base point, then each axis moved to each of its other values, one at a time.

    A move that makes the point invalid or that changes nothing that matters (``groups`` without GroupNorm)
    is left out, so every enqueued point is a distinct, valid model.
    """
    base = {a.name: _current_value(spec, a) for a in spec.axes}
    candidates = [(dict(base), ABLATION_BASE)]
    for axis in spec.axes:
        for value in axis.grid_values():
            if value != base[axis.name]:
                candidates.append(({**base, axis.name: value}, axis.name))
    seen: set[str] = set()
    points = []
    for candidate, moved in candidates:
        try:
            configs, params = build_point(spec, lambda axis, name, allowed: _fixed(candidate, axis, allowed))
        except (ConfigError, _NotAllowed):
            continue
        key = config_key(configs)
        if key not in seen:
            seen.add(key)
            points.append(AblationPoint(params, moved))
    return points


def ablation_points(spec: StudySpec) -> list[dict[str, Any]]:
    """The distinct points of an ablation (as trial parameters), each trained ``spec.repeats`` times."""
    return [point.params for point in ablation_plan(spec)]


class _NotAllowed(Exception):
    pass


def _fixed(candidate: dict[str, Any], axis: Axis, allowed: list | None) -> Any:
    value = candidate[axis.name]
    if allowed is not None and value not in allowed:
        raise _NotAllowed(axis.name)
    return value


def _current_value(spec: StudySpec, axis: Axis) -> Any:
    config = {"arch": spec.arch, "train": spec.train, "privacy": spec.privacy}[axis.target]
    return getattr(config, axis.name)


def space_size(spec: StudySpec, *, limit: int = 100_000) -> int | None:
    """How many distinct points a finite space has; None for a continuous space or one above `limit` points."""
    if any(not a.categorical and a.step is None for a in spec.axes):
        return None
    if math.prod(len(a.grid_values()) for a in spec.axes) > limit:
        return None
    return len({config_key(configs) for configs, _ in _enumerate(spec)})

"""When a config field matters, and when one of its values is allowed: the conditional structure of the space.

A search that samples every axis independently wastes trials: ``groups`` means nothing without GroupNorm,
``scalenorm`` needs a norm and a merge, ``before_act`` needs a residual block with an activation after the
addition. These tables say so once, as data, and the search's sampler (:mod:`dpnas.search.sampling`) reads
them to suggest a field only where it matters and only the values allowed there, so every sampled point is
valid and two points that differ only in fields that do not matter are the same point.

Each rule names its ``parents`` (the fields it reads), so a sampler can fix those first. A field whose rule
does not hold takes its ``neutral`` value when it has one (the value that builds the same model, e.g.
``scalenorm = "none"`` without a norm), and keeps whatever it had otherwise (``groups`` is simply unused).

Rules read one flat mapping of field names to values: ArchConfig's here, and TrainConfig's and
PrivacyConfig's in :mod:`dpnas.dp.config` (the three share no field name).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dpnas.arch.space import pad_shortcut_problem

_KEEP = object()


@dataclass(frozen=True)
class When:
    """A condition on other fields: ``test(values)`` with the fields it reads, and how to say it."""

    parents: tuple[str, ...]
    test: Callable[[Mapping[str, Any]], bool]
    text: str
    neutral: Any = _KEEP
    """What the field is set to where the condition fails (only for fields whose stray value would be refused)."""

    def holds(self, values: Mapping[str, Any]) -> bool:
        return bool(self.test(values))

    @property
    def has_neutral(self) -> bool:
        return self.neutral is not _KEEP


def _pad_fits(values: Mapping[str, Any]) -> bool:
    return pad_shortcut_problem(dict(values)) is None


ARCH_RELEVANCE: dict[str, When] = {
    "groups": When(("norm",), lambda v: v["norm"] == "group", "norm = 'group'"),
    "scalenorm": When(("norm", "skip"), lambda v: v["norm"] != "none" and v["skip"] != "none",
                      "a norm (norm != 'none') and a merge (skip != 'none')", neutral="none"),
    "ts_scale": When(("activation",), lambda v: v["activation"] == "tempered_sigmoid", "activation = 'tempered_sigmoid'"),
    "ts_temperature": When(("activation",), lambda v: v["activation"] == "tempered_sigmoid",
                           "activation = 'tempered_sigmoid'"),
    "ts_offset": When(("activation",), lambda v: v["activation"] == "tempered_sigmoid", "activation = 'tempered_sigmoid'"),
    "shortcut": When(("skip",), lambda v: v["skip"] == "residual", "skip = 'residual'"),
    "head_hidden": When(("head",), lambda v: v["head"] == "mlp", "head = 'mlp'"),
    # Transitions (and their downsampling) come before every stage but the first, and before the first too
    # when there is a stem; one stage without a stem has none.
    # (transition='block' has no transition layers: its stages from the second on downsample in their first block.)
    "transition": When(("stages", "stem_channels"), lambda v: v["stages"] > 1 or v["stem_channels"] > 0,
                       "a transition (stages > 1 or a stem)", neutral="compress"),
    "downsample": When(("stages", "stem_channels", "transition"),
                       lambda v: v["stages"] > 1 or (v["stem_channels"] > 0 and v["transition"] != "block"),
                       "a downsampling (stages > 1, or a stem with transition != 'block')"),
}
"""Field -> when it matters at all."""

ARCH_VALUE_RULES: dict[tuple[str, Any], When] = {
    ("scalenorm", "before_act"): When(("skip", "preact"), lambda v: v["skip"] == "residual" and not v["preact"],
                                      "a residual merge with an activation after it (skip = 'residual', preact = false)"),
    ("skip", "dense"): When(("transition",), lambda v: v["transition"] != "block", "transition != 'block'"),
    ("downsample", "avg"): When(("transition", "stages"), lambda v: v["transition"] != "block" or v["stages"] == 1,
                                "transition != 'block'"),
    ("downsample", "max"): When(("transition", "stages"), lambda v: v["transition"] != "block" or v["stages"] == 1,
                                "transition != 'block'"),
    # with SELU, xavier's gain is SELU's (layers._activation_gain): the same initialisation as selu_xavier
    ("init", "xavier"): When(("activation",), lambda v: v["activation"] != "selu",
                             "activation != 'selu' (with SELU, 'xavier' is 'selu_xavier')"),
    ("shortcut", "pad"): When(("width", "width_bases", "stages", "stem_channels", "transition", "depth", "depth_bases"),
                              _pad_fits, "non-decreasing stage widths, none narrower than the stem"),
}
"""(field, value) -> when that value is allowed (values not listed are always allowed)."""


def matters(rules: Mapping[str, When], name: str, values: Mapping[str, Any]) -> bool:
    rule = rules.get(name)
    return rule is None or rule.holds(values)


def value_allowed(rules: Mapping[tuple[str, Any], When], name: str, value: Any, values: Mapping[str, Any]) -> bool:
    try:
        rule = rules.get((name, value))
    except TypeError:  # an unhashable value (a list) has no rule
        return True
    return rule is None or rule.holds(values)


def neutralise(rules: Mapping[str, When], values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every field that does not matter set to its neutral value, where it has one."""
    out = dict(values)
    for name, rule in rules.items():
        if name in out and rule.has_neutral and not rule.holds(out):
            out[name] = rule.neutral
    return out


def canonical_norm(arch: Any) -> dict[str, Any]:
    """`arch`'s ``norm`` and ``groups`` as the simplest pair that builds the same normalisation layers.

    A group count is capped per layer (:meth:`ArchConfig.norm_groups`), so ``groups`` at or above every normalised
    layer's width builds InstanceNorm, ``groups = 1`` builds LayerNorm, and two counts can build the same layers:
    such points are one model, and must have one identity (:func:`dpnas.search.sampling.config_key`).
    """
    if arch.norm == "none":
        return {"norm": arch.norm, "groups": arch.groups}
    from dpnas.arch.footprint import norm_channels  # builds (on the meta device): imported only when needed

    channels = sorted(norm_channels(arch))
    layout = [arch.norm_groups(c) for c in channels]
    if all(g == 1 for g in layout):
        return {"norm": "layer", "groups": arch.groups}
    if layout == channels:
        return {"norm": "instance", "groups": arch.groups}
    fewest = next(g for g in range(1, arch.groups + 1)
                  if [arch.replace(groups=g).norm_groups(c) for c in channels] == layout)
    return {"norm": "group", "groups": fewest}


def effective(rules: Mapping[str, When], values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that shape the result: every field that does not matter is dropped.

    Two configs with the same effective fields train the same model the same way.
    """
    out = {}
    for name, value in values.items():
        if not matters(rules, name, values):
            continue
        out[name] = list(value) if isinstance(value, tuple) else value
    return out

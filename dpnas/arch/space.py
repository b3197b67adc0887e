"""The architecture search space: one frozen, self-checking config per point.

Every field of :class:`ArchConfig` is a search axis (or a structural knob that the
reference architectures need), so ``ArchConfig(**trial.params)`` rebuilds any Optuna
trial and a saved config rebuilds the same model.  The defaults are SmoothNet W80D50's
choices, so ``ArchConfig()`` *is* SmoothNet and ``ArchConfig(activation="relu")`` is
SmoothNet with ReLU.

How a point becomes a network (see :mod:`dpnas.arch.models`)::

    [stem conv] -> stage 0 -> transition -> stage 1 -> ... -> head

* stage ``s`` has width (dense: growth) ``int(width_bases[s] * width)`` and
  ``int(depth_bases[s] * depth)`` blocks; by default ``width_bases[s] = 8 * 2**s`` and
  ``depth_bases[s] = 1``, which are SmoothNet's multipliers;
* a block is ``block_convs`` units of conv -> smoothing pool -> norm -> activation
  (``preact``: activation -> norm -> conv), merged with its input by ``skip``;
* a transition (``compress``: 1x1 conv to half the channels, as DenseNet and SmoothNet;
  ``conv``: 3x3 conv + norm + activation, as ResNet-9) precedes every stage but the
  first, and the first too when the network has a stem; each one downsamples.
  With ``transition="block"`` the first block of each stage changes the width itself and
  downsamples from stage 1 on (as wide ResNets do).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NORMS = ("group", "layer", "instance", "none")
SCALENORMS = ("none", "after_add", "before_act")
ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "mish",
    "tanh",
    "tempered_sigmoid",
)
SMOOTHING_POOLS = ("max_smooth", "avg_smooth", "none")
DOWNSAMPLES = ("avg", "max", "conv")
SKIPS = ("none", "residual", "dense")
TRANSITIONS = ("compress", "conv", "block")
SHORTCUTS = ("pad", "conv")
HEADS = ("mlp", "linear")
HEAD_POOLS = ("avg", "max")
INITS = ("selu_xavier", "xavier", "kaiming", "default")

# Bounds on the structure, checked before anything is built: the builder loops over stages and blocks in Python,
# so `depth = 1e6` would otherwise spend hours making modules before any memory check could refuse it.
# Every stage after the first halves the resolution, so 16 stages already need 32768 px inputs; 2000 convolutions
# is more than the deepest CIFAR ResNet (ResNet-1202, 1200).
MAX_STAGES = 16
MAX_CONVS = 2000

# Fields a study may search over; the structural fields below them are usually fixed.
SEARCH_AXES = (
    "norm",
    "groups",
    "scalenorm",
    "activation",
    "pool",
    "downsample",
    "skip",
    "width",
    "depth",
    "stages",
    "head",
    "conv_bias",
    "weight_std",
    "init",
)


def pad_shortcut_problem(values: dict[str, Any]) -> str | None:
    """Why zero-padded residual shortcuts cannot build the point of `values` (ArchConfig fields); None if they can.

    A zero-padding shortcut only widens, so every residual block's input must be at most its width: the stage
    widths must not decrease, and a stem must not be wider than the first stage with blocks that it feeds.
    """
    bases = values["width_bases"] or tuple(8 * 2**s for s in range(values["stages"]))
    widths = [int(b * values["width"]) for b in bases]
    if any(b < a for a, b in zip(widths, widths[1:])):
        return (f"zero-padding cannot narrow the stage widths {widths}; "
                "use shortcut='conv' or non-decreasing width_bases")
    stem = values["stem_channels"]
    if not stem:
        return None
    depth_bases = values["depth_bases"] or (1.0,) * values["stages"]
    channels = stem
    for s, (width, base) in enumerate(zip(widths, depth_bases)):
        # the channels entering stage s: what the builder's transitions make of the stem (models.DPNASNet)
        if values["transition"] == "compress":
            channels = max(1, channels // 2)
        elif values["transition"] == "conv":
            channels = width
        if int(base * values["depth"]) > 0:
            if channels > width:
                return (f"zero-padding cannot narrow the stem's {stem} channels ({channels} entering stage {s}) "
                        f"to the stage's {width}; use shortcut='conv' or a narrower stem")
            return None
    return None


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and what is allowed."""


class FieldValueError(ConfigError):
    """A value that no setting of the other fields makes valid: of the wrong type, not one of the field's choices,
    or outside the field's own bounds."""


def check_choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FieldValueError(
            f"{field_name}: unknown value {value!r}; expected one of: {', '.join(allowed)}"
        )


def check_type(field_name: str, value: Any, expected: type | tuple[type, ...], what: str) -> None:
    # bool is an int subclass, but a flag given where a number is wanted is a mistake.
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise FieldValueError(f"{field_name}: expected {what}, got {value!r}")


def check_field_types(config: Any) -> None:
    """Type-check every field of a config dataclass against the type of its default."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default
        if "types" in f.metadata:  # a field that takes more than one type ("auto" or a number)
            check_type(f.name, value, f.metadata["types"], f.metadata["what"])
        elif isinstance(default, bool):
            check_type(f.name, value, bool, "true or false")
        elif isinstance(default, int):
            check_type(f.name, value, int, "an integer")
        elif isinstance(default, float):
            check_type(f.name, value, (int, float), "a number")
            object.__setattr__(config, f.name, float(value))
        elif isinstance(default, str):
            check_type(f.name, value, str, "a string")
        elif isinstance(default, tuple):
            check_type(f.name, value, tuple, "a list")
            item_type = f.metadata.get("items", (int, float))
            for item in value:
                check_type(f.name, item, item_type, "a list of numbers")


@dataclass(frozen=True)
class ArchConfig:
    """One point of the dpnas search space (defaults: SmoothNet W80D50)."""

    # --- normalisation -------------------------------------------------------------
    norm: str = "group"
    """group | layer (GroupNorm with one group) | instance (one group per channel) | none."""
    groups: int = 8
    """GroupNorm group count for norm='group'; capped per layer at min(groups, channels)."""
    scalenorm: str = "none"
    """none | after_add (norm right after the residual/dense merge, no activation after it)
    | before_act (after the add, before the block's last activation; torchvision style)."""

    # --- activation ------------------------------------------------------------------
    activation: str = "selu"
    ts_scale: float = 2.0
    """Tempered sigmoid s * sigmoid(T * x) - o (Papernot et al.); the defaults equal tanh."""
    ts_temperature: float = 2.0
    ts_offset: float = 1.0

    # --- pooling -----------------------------------------------------------------------
    pool: str = "max_smooth"
    """Smoothing inside each block: max_smooth / avg_smooth (3x3, stride 1) | none."""
    downsample: str = "avg"
    """How transitions halve the resolution: avg-pool, max-pool or a strided conv."""

    # --- topology ----------------------------------------------------------------------
    skip: str = "dense"
    """none | residual (identity, zero-padded or projected when shapes differ) | dense (concat)."""
    width: float = 8.0
    depth: float = 5.0
    stages: int = 2
    width_bases: tuple[int, ...] = field(default=(), metadata={"items": int})
    """Per-stage base widths multiplied by `width`; empty means 8 * 2**s."""
    depth_bases: tuple[float, ...] = ()
    """Per-stage base block counts multiplied by `depth`; empty means 1 per stage."""
    block_convs: int = 1
    """Convolutions per block (2 for ResNet basic blocks)."""
    preact: bool = False
    """Pre-activation blocks (activation -> norm -> conv), as De et al.'s WRN."""
    stem_channels: int = 0
    """Width of a 3x3 stem convolution; 0 means no stem (SmoothNet)."""
    transition: str = "compress"
    shortcut: str = "pad"
    """How a residual skip matches a change of shape: zero-pad channels, or a 1x1 conv."""

    # --- head ------------------------------------------------------------------------------
    head: str = "mlp"
    """mlp: SmoothNet's head (downsample, last dense block only, pool, MLP) | linear."""
    head_pool: str = "avg"
    head_pool_size: int = 4
    head_hidden: tuple[int, ...] = field(default=(256, 128), metadata={"items": int})

    # --- convolutions and init ------------------------------------------------------------
    conv_bias: bool = False
    weight_std: bool = False
    """Weight-standardised convolutions (De et al.)."""
    init: str = "selu_xavier"

    def __post_init__(self) -> None:
        # TOML and JSON give lists; the config is frozen and hashable, so store tuples.
        for name in ("width_bases", "depth_bases", "head_hidden"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        check_field_types(self)
        self._check_choices()
        self._check_values()
        self._check_combinations()

    # ----------------------------------------------------------------------------------------
    def _check_choices(self) -> None:
        check_choice("norm", self.norm, NORMS)
        check_choice("scalenorm", self.scalenorm, SCALENORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("pool", self.pool, SMOOTHING_POOLS)
        check_choice("downsample", self.downsample, DOWNSAMPLES)
        check_choice("skip", self.skip, SKIPS)
        check_choice("transition", self.transition, TRANSITIONS)
        check_choice("shortcut", self.shortcut, SHORTCUTS)
        check_choice("head", self.head, HEADS)
        check_choice("head_pool", self.head_pool, HEAD_POOLS)
        check_choice("init", self.init, INITS)

    def _check_values(self) -> None:
        positive = {
            "groups": self.groups,
            "width": self.width,
            "depth": self.depth,
            "stages": self.stages,
            "block_convs": self.block_convs,
            "head_pool_size": self.head_pool_size,
            "ts_scale": self.ts_scale,
            "ts_temperature": self.ts_temperature,
        }
        for name, value in positive.items():
            if not value > 0 or not math.isfinite(value):
                raise FieldValueError(f"{name}: must be a positive finite number, got {value!r}")
        if self.stages > MAX_STAGES:
            raise ConfigError(f"stages: at most {MAX_STAGES} (each stage after the first halves the resolution), "
                              f"got {self.stages}")
        if self.stem_channels < 0:
            raise ConfigError(f"stem_channels: must be >= 0 (0 = no stem), got {self.stem_channels}")
        for name in ("width_bases", "depth_bases"):
            value = getattr(self, name)
            if value and len(value) != self.stages:
                raise ConfigError(
                    f"{name}: has {len(value)} entries but stages={self.stages}; "
                    "give one per stage or leave it empty for the default pattern"
                )
            if any(v < 0 for v in value):
                raise ConfigError(f"{name}: entries must be >= 0, got {list(value)}")
        if any(h <= 0 for h in self.head_hidden):
            raise ConfigError(f"head_hidden: sizes must be positive, got {list(self.head_hidden)}")
        for s, w in enumerate(self.stage_widths):
            if w < 1:
                raise ConfigError(
                    f"width: stage {s} would have {w} channels "
                    f"(int({self.stage_width_bases[s]} * {self.width})); use a larger width"
                )
        if sum(self.stage_depths) == 0:
            raise ConfigError(
                f"depth: every stage would have 0 blocks "
                f"(int(base * {self.depth})); use a larger depth"
            )
        convs = sum(self.stage_depths) * self.block_convs
        if convs > MAX_CONVS:
            raise ConfigError(
                f"depth: {convs:,} convolutions in the blocks (blocks per stage {list(self.stage_depths)} x "
                f"block_convs {self.block_convs}); dpnas builds at most {MAX_CONVS:,}: use a smaller depth"
            )

    def _check_combinations(self) -> None:
        if self.scalenorm != "none" and self.skip == "none":
            raise ConfigError(
                f"scalenorm: {self.scalenorm!r} normalises after a skip merge, but skip='none'; "
                "use skip='residual' or 'dense', or scalenorm='none'"
            )
        if self.scalenorm != "none" and self.norm == "none":
            raise ConfigError(
                "scalenorm: needs a normalisation layer to place, but norm='none'; "
                f"choose norm from {', '.join(n for n in NORMS if n != 'none')}"
            )
        if self.scalenorm == "before_act" and self.preact:
            raise ConfigError(
                "scalenorm: 'before_act' needs an activation after the addition, which "
                "pre-activation blocks (preact=true) do not have; use 'after_add'"
            )
        if self.head == "mlp" and not self.head_hidden:
            raise ConfigError("head_hidden: head='mlp' needs at least one hidden layer size")
        if self.scalenorm == "before_act" and self.skip == "dense":
            raise ConfigError(
                "scalenorm: 'before_act' moves a residual block's last activation after the "
                "addition; a dense merge keeps its inputs as they are, so use 'after_add'"
            )
        if self.skip == "residual" and self.shortcut == "pad":
            problem = pad_shortcut_problem(self.to_dict())
            if problem:
                raise ConfigError(f"shortcut: {problem}")
        if self.transition == "block" and self.skip == "dense":
            raise ConfigError(
                "transition: 'block' lets the first block change width and resolution, which a "
                "dense stage cannot (it only grows); use 'compress' or 'conv' with skip='dense'"
            )
        if self.transition == "block" and self.downsample != "conv" and self.stages > 1:
            raise ConfigError(
                "downsample: with transition='block' the first block of a stage downsamples "
                "by a strided conv; set downsample='conv'"
            )

    # --- derived structure ------------------------------------------------------------------
    @property
    def stage_width_bases(self) -> tuple[int, ...]:
        return self.width_bases or tuple(8 * 2**s for s in range(self.stages))

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Channels of each block's output in each stage (the growth rate when dense)."""
        return tuple(int(base * self.width) for base in self.stage_width_bases)

    @property
    def stage_depths(self) -> tuple[int, ...]:
        bases = self.depth_bases or (1.0,) * self.stages
        return tuple(int(base * self.depth) for base in bases)

    def norm_groups(self, channels: int) -> int:
        """The group count a norm layer over `channels` gets (0 when there is no norm)."""
        if self.norm == "none":
            return 0
        if self.norm == "layer":
            return 1
        if self.norm == "instance":
            return channels
        # GroupNorm needs the group count to divide the channels; the papers' channel counts
        # are powers of two, but dense stages and compress transitions give odd counts
        # (SmoothNet's 323 -> 161), so take the largest divisor not above the request.
        wanted = min(self.groups, channels)
        return max(g for g in range(1, wanted + 1) if channels % g == 0)

    # --- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name, value in out.items():
            if isinstance(value, tuple):
                out[name] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "ArchConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table of ArchConfig fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(unknown)}; "
                f"ArchConfig fields are: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> "ArchConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def read_config_document(path: Path) -> Any:
    """A .json or .toml config file's contents; every way it can fail is a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is dropped, not a parse error
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read file ({err.strerror or err})") from err
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {err}") from err
    raise ConfigError(f"{path}: unknown file type {path.suffix!r}; expected .json or .toml")


def load_arch_file(path: str | Path) -> ArchConfig:
    """Load an ArchConfig from a .json or .toml file.

    Accepts the config itself, or a document that holds it under ``config`` or ``arch``
    (as ``dpnas describe --json`` and training results write it).
    """
    path = Path(path)
    data = read_config_document(path)
    for key in ("config", "arch"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    try:
        return ArchConfig.from_dict(data, source=str(path))
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from err


def parse_assignment(text: str, *, fields: set[str] | None = None) -> tuple[str, Any]:
    """Parse a command-line ``field=value`` into a typed pair (the value is read as TOML when it can be).

    `fields` are the names allowed (default: ArchConfig's).
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected field=value, e.g. --set activation=relu")
    name, _, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    known = fields if fields is not None else {f.name for f in dataclasses.fields(ArchConfig)}
    if name not in known:
        raise ConfigError(f"--set {text!r}: unknown field {name!r}; known fields are: {', '.join(sorted(known))}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as relu is meant as a string
    if raw in ("inf", "+inf", "-inf", "nan"):
        value = float(raw)
    return name, value

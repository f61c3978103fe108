"""Configuration: TOML validated into dataclasses, with overrides.

A configuration file has one table per component (``[run]``, ``[data]``,
``[model]``, ``[train]``, ``[sampling]``, ``[arms.<name>]``). Every key is
checked against the dataclasses below: unknown keys and wrong types are
errors naming the file, the key path, what was expected and what was found,
with close matches. Plugin tables (``{ name = "unet", ngf = 64 }``) are
checked against the registered factory's signature and type hints, so a
plugin documents its options simply by declaring keyword arguments.

Numbers have one constraint vocabulary, declared where the number is: a
field below or a factory's keyword argument says
``Annotated[int, Interval(1, None)]``, and a factory relating two of its
parameters lists them in ``param_rules`` (``Rule(lambda low, high: low <
high, ...)``). They are checked when the configuration loads, whatever the
plugin kind, so ``bins = 0`` is refused before training, not after it; and
:func:`validate_params` applies the same checks for code (and contract
suites) that builds a plugin itself. A float that is not finite (``nan``,
``inf`` are TOML literals) is refused for every key, unless its
:class:`Interval` says ``infinite=True``.

Overrides (``--set train.epochs=2``) are parsed as TOML literals, falling
back to a bare string (``--set data.source=phantom``), and applied to the
raw tables before validation so they get the same checks.

Profiles are named override tables in the file (``[profiles.<name>]``).
They apply in this order: the file; ``data.fallback_profile`` when
``data.root`` does not exist and neither ``data.root`` nor ``data.source``
was chosen with ``--set`` (so the paper's configuration runs on the
built-in phantom on a fresh clone, and says so); ``--smoke`` (first
:data:`SMOKE_OVERRIDES`, then ``[profiles.smoke]``); and ``--set`` last.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import numbers
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w

from uqsynth.errors import ConfigError, PluginError
from uqsynth.plugins import KINDS, PluginHost, close_matches


# --------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class Interval:
    """The range a number must lie in, declared on the number: ``Annotated[int, Interval(1, None)]``.

    As scikit-learn's ``Interval``: ``None`` leaves a side unbounded and
    ``closed`` says which bounds belong to the range. Why our own and not
    ``sklearn.utils._param_validation``: that module is private (no promise
    it keeps its form), it serves estimators' classes only, while layers,
    networks and datasets are modules or plain functions, and a type hint
    puts the range in the signature that :func:`check_params` already reads,
    with messages naming the configuration file and key.

    Args:
        low: Smallest allowed value, or None.
        high: Largest allowed value, or None.
        closed: Which of ``low`` and ``high`` are allowed themselves.
        infinite: Let ``inf`` and ``-inf`` through (NaN never passes);
            every other float must be finite.
    """

    low: float | None = None
    high: float | None = None
    closed: Literal["both", "left", "right", "neither"] = "both"
    infinite: bool = False

    def problem(self, value: float) -> str | None:
        """What ``value`` breaks (``"must be >= 1"``), or None when it lies in the range."""
        if self.low is not None:
            if self.closed in ("both", "left"):
                if value < self.low:
                    return f"must be >= {self.low}"
            elif value <= self.low:
                return f"must be > {self.low}"
        if self.high is not None:
            if self.closed in ("both", "right"):
                if value > self.high:
                    return f"must be <= {self.high}"
            elif value >= self.high:
                return f"must be < {self.high}"
        return None


@dataclass(frozen=True)
class Rule:
    """A condition relating parameters of one factory, such as conformal's ``low < high``.

    A factory (class, or function) lists its rules in a ``param_rules``
    attribute; ``test`` takes the parameters it relates by name and says
    whether they agree. Rules run after each parameter passed its own
    constraints, with the defaults of the parameters not set.

    Args:
        test: A predicate over named parameters, e.g. ``lambda low, high: low < high``.
        message: What must hold, for the error (``"low must be below high"``).
    """

    test: Callable[..., bool]
    message: str

    def names(self) -> list[str]:
        """The parameters the rule relates (those ``test`` takes)."""
        return list(inspect.signature(self.test).parameters)

    def problem(self, params: Mapping[str, Any]) -> str | None:
        """The message and the values, when ``params`` break the rule; None otherwise."""
        names = self.names()
        if any(name not in params for name in names):  # e.g. an argument uqsynth injects later
            return None
        if self.test(**{name: params[name] for name in names}):
            return None
        return f"{self.message}, found " + ", ".join(f"{name} = {params[name]!r}" for name in names)


#: Seeds every generator uqsynth seeds accepts (numpy's ``np.random.seed`` is the narrowest).
SEEDS = Interval(0, 2**32, closed="left")


@dataclass
class PluginSpec:
    """A plugin chosen by registered name, with the keyword arguments for its factory."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def as_toml(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}


@dataclass
class RunConfig:
    """``[run]``: identity and reproducibility of a run."""

    name: str = field(default="uqsynth", metadata={"doc": "Name shown in logs and the report."})
    seed: Annotated[int, SEEDS] = field(
        default=0, metadata={"doc": "Seed for weights, data order, crops and samples (0 to 2**32 - 1)."}
    )
    device: str = field(default="auto", metadata={"doc": '"auto" (CUDA when present), "cpu" or "cuda[:i]".'})


@dataclass
class DataConfig:
    """``[data]``: which dataset plugin, and the paper's slice preprocessing."""

    source: str = field(default="phantom", metadata={"doc": "Registered dataset plugin name."})
    root: str | None = field(default=None, metadata={"doc": "Data directory, for datasets that read files."})
    image_size: Annotated[int, Interval(8, None)] = field(
        default=256, metadata={"doc": "Side of the square slices the networks see."}
    )
    load_size: Annotated[int | None, Interval(8, None)] = field(
        default=None, metadata={"doc": "Resize before the random training crop; default image_size * 286 / 256."}
    )
    min_brain_fraction: Annotated[float, Interval(0.0, 1.0)] = field(
        default=0.02, metadata={"doc": "Training skips slices with less brain than this."}
    )
    test_fraction: Annotated[float, Interval(0.0, 1.0, closed="neither")] = field(
        default=0.2, metadata={"doc": "Fraction of subjects held out for testing."}
    )
    test_subjects: list[str] = field(default_factory=list, metadata={"doc": "Explicit test ids (overrides test_fraction)."})
    cache_mb: Annotated[int, Interval(0, None)] = field(
        default=2048,
        metadata={"doc": "Memory for the test and calibration subjects, kept after their first read so that "
                         "later stages and arms do not read them again; 0 reads them every time."},
    )
    fallback_profile: str | None = field(
        default=None,
        metadata={"doc": "Profile applied when data.root does not exist (unless data.root/source come from --set)."},
    )
    options: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"doc": "Per-plugin tables [data.<plugin>], passed to that dataset plugin."}
    )


@dataclass
class ModelConfig:
    """``[model]``: the networks and the adversarial loss, each a plugin table."""

    generator: PluginSpec = field(
        default_factory=lambda: PluginSpec("unet", {"ngf": 64}), metadata={"doc": "Generator (backbone) plugin."}
    )
    discriminator: PluginSpec = field(
        default_factory=lambda: PluginSpec("patchgan"), metadata={"doc": "Discriminator plugin."}
    )
    adversarial_loss: PluginSpec = field(
        default_factory=lambda: PluginSpec("vanilla"), metadata={"doc": "Adversarial loss plugin."}
    )


@dataclass
class TrainConfig:
    """``[train]``: optimisation, with the paper's values as defaults."""

    epochs: Annotated[int, Interval(1, None)] = field(default=40, metadata={"doc": "Training epochs per arm."})
    batch_size: Annotated[int, Interval(1, None)] = field(
        default=16, metadata={"doc": "Slices per step (per process under torchrun)."}
    )
    lr: Annotated[float, Interval(0.0, None, closed="neither")] = field(
        default=2e-4, metadata={"doc": "Adam learning rate."}
    )
    lr_decay_epochs: Annotated[int, Interval(0, None)] = field(
        default=0,
        metadata={"doc": "Final epochs over which the learning rate falls linearly towards 0 "
                         "(pix2pix's n_epochs_decay); 0 keeps it fixed (the paper)."},
    )
    ema_decay: Annotated[float, Interval(0.0, 1.0, closed="left")] = field(
        default=0.0,
        metadata={"doc": "Per-step decay of an exponential moving average of the generator's weights, which "
                         "replaces the trained weights at the end; 0 keeps the last weights (the paper)."},
    )
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999], metadata={"doc": "Adam betas."})
    fused_adam: bool = field(
        default=False,
        metadata={"doc": "Adam's fused kernel (torch's fused=True): the same update in one pass over the weights, "
                         "faster (on a 2-core CPU a phantom step took 0.052 s instead of 0.063) but rounded "
                         "differently, and Adam's first steps amplify round-off: the run follows another "
                         "trajectory of the same training (benchmarks/test_training_step.py)."},
    )
    parallel_arms: Annotated[int, Interval(1, None)] = field(
        default=1,
        metadata={"doc": "Arms trained at once, each in a process of its own with an equal share of the CPU "
                         "threads; 1 trains them one after another. Small networks on a CPU: on the 2-core "
                         "Xeon a phantom step took 88 ms on one thread and 71 ms on two, so arms side by side "
                         "train faster. The same training up to the rounding of another thread count."},
    )
    lambda_l1: Annotated[float, Interval(0.0, None)] = field(
        default=100.0, metadata={"doc": "Weight of L1(fake, real)."}
    )
    lambda_kl: Annotated[float, Interval(0.0, None)] = field(
        default=100.0, metadata={"doc": "Weight of the stochastic layers' KL terms."}
    )
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata={"doc": "Mixed precision for training."})
    max_steps_per_epoch: Annotated[int, Interval(0, None)] = field(
        default=0, metadata={"doc": "Cap on steps per epoch; 0 means all."}
    )
    sync_batchnorm: bool = field(
        default=False, metadata={"doc": "Under torchrun on GPUs: BatchNorm statistics over all processes (SyncBatchNorm)."}
    )


@dataclass
class ArmConfig:
    """``[arms.<name>]``: one variant of the model, trained and evaluated separately."""

    stochastic_layer: PluginSpec = field(metadata={"doc": "Stochastic layer plugin table."})
    positions: list[int] = field(
        default_factory=lambda: [2, 3, 4], metadata={"doc": "Where to insert it, counted from the bottleneck."}
    )
    lambda_kl: Annotated[float | None, Interval(0.0, None)] = field(
        default=None, metadata={"doc": "Overrides train.lambda_kl for this arm."}
    )
    likelihood: PluginSpec = field(
        default_factory=lambda: PluginSpec("l1"),
        metadata={"doc": 'Observation model of the generator\'s output: "l1" (the paper), "laplace", "gaussian".'},
    )


@dataclass
class SamplingConfig:
    """``[sampling]``: Monte Carlo posterior sampling at test time."""

    samples: Annotated[int, Interval(2, None)] | Literal["auto"] = field(
        default=20,
        metadata={"doc": 'Forward passes T per slice, or "auto": per slice until the std map\'s estimated relative '
                         "standard error is at most sampling.tolerance (at most sampling.max_samples)."},
    )
    tolerance: Annotated[float, Interval(0.0, 1.0, closed="neither")] = field(
        default=0.05, metadata={"doc": 'Relative standard error of each slice\'s std map that ends sampling (samples = "auto").'}
    )
    max_samples: Annotated[int, Interval(4, None)] = field(
        default=200, metadata={"doc": 'The cap on T with samples = "auto".'}
    )
    variance_reduction: Literal["none", "antithetic", "stratified"] = field(
        default="none",
        metadata={"doc": "How a slice's dropout masks are drawn: independent, in antithetic pairs, or stratified "
                         "(Latin hypercube over its samples)."},
    )
    precision: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32", metadata={"doc": "Autocast for sampling (fp16 needs a GPU)."}
    )
    memory_budget_mb: Annotated[float | None, Interval(0.0, None, closed="neither")] = field(
        default=None, metadata={"doc": "Memory for one batch of slice-samples; default 1024 (CPU), 8192 (GPU)."}
    )
    channels_last: bool = field(default=False, metadata={"doc": "Channels-last memory format."})
    compile: bool = field(default=False, metadata={"doc": "torch.compile the stochastic remainder."})


@dataclass
class CalibrationConfig:
    """``[calibration]``: post-hoc calibrators fitted per arm, and on which subjects."""

    calibrators: list[PluginSpec] = field(
        default_factory=lambda: [PluginSpec("isotonic"), PluginSpec("sigma_scaling"), PluginSpec("conformal")],
        metadata={"doc": "Calibrator plugins (names or tables), each fitted for every arm."},
    )
    subjects: Literal["train", "held_out"] = field(
        default="train",
        metadata={"doc": '"train": the training subjects (the paper); "held_out": a separate calibration split.'},
    )
    held_out_fraction: Annotated[float, Interval(0.0, 1.0, closed="neither")] = field(
        default=0.2, metadata={"doc": 'Fraction of subjects in the calibration split when subjects = "held_out".'}
    )
    max_subjects: Annotated[int, Interval(0, None)] = field(
        default=0, metadata={"doc": "Use at most this many calibration subjects (0: all)."}
    )
    slice_stride: Annotated[int, Interval(1, None)] = field(
        default=1,
        metadata={"doc": "Fit on every k-th axial slice of each calibration subject (1/k of the sampling cost): "
                         "coverage varies more between subjects than between slices, so more subjects at a "
                         "stride beat fewer whole ones for the same time."},
    )


@dataclass
class Config:
    """A whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    arms: dict[str, ArmConfig] = field(default_factory=dict, metadata={"doc": "Named variants; at least one.", "min_len": 1})
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    notes: list[str] = field(default_factory=list, repr=False, compare=False, metadata={"internal": True})
    profiles: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"doc": 'Named sets of overrides, as "dotted.key" = value; [profiles.smoke] extends --smoke.'},
    )


#: What ``--smoke`` sets before a file's own ``[profiles.smoke]``: a tiny, fast run.
SMOKE_OVERRIDES: dict[str, Any] = {
    "data.image_size": 32,
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.max_steps_per_epoch": 3,
    "sampling.samples": 4,
}


# --------------------------------------------------------------------------- loading


class _Origins:
    """Remembers which key paths came from overrides, to name them in errors."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.overrides: dict[str, str] = {}
        self.notes: list[str] = []

    def where(self, path: str) -> str:
        parts = re.sub(r"\[\d+\]", "", path).split(".")  # an array's item comes from where the array does
        for end in range(len(parts), 0, -1):
            origin = self.overrides.get(".".join(parts[:end]))
            if origin:
                return origin
        return self.file


def load_config(
    path: str | Path, *, overrides: Iterable[str] = (), smoke: bool = False, host: PluginHost | None = None
) -> Config:
    """Read, override and validate a configuration file.

    Args:
        path: The TOML file.
        overrides: ``"key.path=value"`` strings, applied after ``--smoke``.
        smoke: Apply :data:`SMOKE_OVERRIDES` and the file's ``[profiles.smoke]``.
        host: When given, it must have no broken plugin, and plugin names and
            parameters are checked against it.

    Raises:
        ConfigError: The file is missing or invalid; the message names the key.
        PluginError: A plugin name is unknown.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return config_from_dict(raw, source=str(path), overrides=overrides, smoke=smoke, host=host)


def config_from_dict(
    raw: Mapping[str, Any],
    *,
    source: str = "<config>",
    overrides: Iterable[str] = (),
    smoke: bool = False,
    host: PluginHost | None = None,
) -> Config:
    """Validate an already parsed TOML document (see :func:`load_config`)."""
    raw = copy.deepcopy(dict(raw))
    origins = _Origins(source)
    parsed = [(item, *parse_override(item)) for item in overrides]
    profiles = raw.get("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise ConfigError(f"{source}: profiles: expected tables [profiles.<name>]")

    def apply_profile(name: str, origin: str) -> None:
        if name not in profiles:
            raise ConfigError(f"{source}: {origin}: no [profiles.{name}] table{close_matches(name, profiles)}")
        for key, value in _flatten(profiles[name]).items():
            _set_path(raw, key, value, origins, origin=f"{source} [profiles.{name}]")

    fallback = _get_path(raw, "data.fallback_profile")
    root = _get_path(raw, "data.root")
    data_chosen = any(key in ("data.root", "data.source") for _, key, _ in parsed)
    if isinstance(fallback, str) and isinstance(root, str) and not data_chosen and not Path(root).exists():
        apply_profile(fallback, "data.fallback_profile")
        origins.notes.append(f"data.root {root} does not exist: applied [profiles.{fallback}] (data.fallback_profile)")
    if smoke:
        for key, value in SMOKE_OVERRIDES.items():
            _set_path(raw, key, value, origins, origin="--smoke")
        # A load size chosen for the full-size slices does not fit the smoke ones: derive it again.
        raw.get("data", {}).pop("load_size", None)
        if "smoke" in profiles:
            apply_profile("smoke", "--smoke")
    for item, key, value in parsed:
        _set_path(raw, key, value, origins, origin=f"--set {item}")
    _lift_data_options(raw)
    config = _convert(raw, Config, "", origins)
    config.notes = list(origins.notes)
    _check_cross_fields(config, origins)
    if host is not None:
        host.check()
        resolve_plugins(config, host, origins)
    return config


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``"a.b=value"``; the value is a TOML literal or else a bare string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: expected key.path=value")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def _set_path(raw: dict, key: str, value: Any, origins: _Origins, *, origin: str) -> None:
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and depth >= 1:
            child = {"name": child}  # a plugin given by name only: turn it into a table
        if child is None:
            child = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(f"{origin}: {prefix} is {_describe(child)}, not a table")
        node[part] = child
        node = child
    node[parts[-1]] = value
    origins.overrides[key] = origin


def _get_path(raw: Mapping[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a ``[smoke]`` table may nest or quote dotted keys."""
    flat = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _lift_data_options(raw: dict) -> None:
    """Move ``[data.<plugin>]`` tables into ``data.options`` (validated later against the plugin)."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    scalar_fields = {f.name for f in dataclasses.fields(DataConfig)}
    options = data.setdefault("options", {})
    if isinstance(options, dict):
        for key in [k for k, v in data.items() if isinstance(v, dict) and k not in scalar_fields]:
            options[key] = data.pop(key)


# --------------------------------------------------------------------------- conversion


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    kind = kinds.get(type(value), type(value).__name__)
    shown = repr(value) if not isinstance(value, (dict, list)) else ""
    return f"{kind} {shown}".strip()


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if annotation is bool:
        return "a boolean"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if annotation is PluginSpec:
        return 'a plugin name or a table with "name"'
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"an array of {plural.get(args[0], _type_name(args[0]))}" if args else "an array"
    if origin is dict or dataclasses.is_dataclass(annotation):
        return "a table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    return getattr(annotation, "__name__", str(annotation))


class _Refused(ConfigError):
    """A value of the right type that its constraints refuse: a union must not try its other types."""


def _convert(value: Any, annotation: Any, path: str, origins: _Origins, *, infinite: bool = False) -> Any:
    """Check ``value`` against ``annotation`` and its constraints; return it converted (e.g. int -> float).

    ``infinite`` lets ``inf``/``-inf`` through, for an :class:`Interval` that allows them.
    """
    where = lambda: f"{origins.where(path)}: {path}"  # noqa: E731 - evaluated only on error
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extras = typing.get_args(annotation)
        intervals = [extra for extra in extras if isinstance(extra, Interval)]
        infinite = infinite or any(interval.infinite for interval in intervals)
        converted = _convert(value, base, path, origins, infinite=infinite)
        _check_intervals(converted, intervals, path, origins)
        return converted
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        for option in options:
            try:
                return _convert(value, option, path, origins, infinite=infinite)
            except _Refused:
                raise
            except ConfigError:
                continue
        raise ConfigError(f"{where()}: expected {_type_name(annotation)}, found {_describe(value)}")
    if annotation is PluginSpec:
        if isinstance(value, str):
            return PluginSpec(value)
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            params = {k: v for k, v in value.items() if k != "name"}
            return PluginSpec(value["name"], params)
        raise ConfigError(f"{where()}: expected {_type_name(annotation)}, found {_describe(value)}")
    if dataclasses.is_dataclass(annotation):
        return _convert_dataclass(value, annotation, path, origins)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices or isinstance(value, bool):
            hint = close_matches(value, choices) if isinstance(value, str) else ""
            raise ConfigError(f"{where()}: expected {_type_name(annotation)}, found {_describe(value)}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where()}: expected {_type_name(annotation)}, found {_describe(value)}")
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        item_type = args[0] if args else Any
        items = [_convert(v, item_type, f"{path}[{i}]", origins, infinite=infinite) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where()}: expected a table, found {_describe(value)}")
        _, value_type = typing.get_args(annotation)
        return {k: _convert(v, value_type, f"{path}.{k}" if path else k, origins) for k, v in value.items()}
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.copysign(math.inf, value)
            if math.isnan(number) or (math.isinf(number) and not infinite):
                raise _Refused(f"{where()} must be a finite number, found {number!r}")
            return number
    elif annotation is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value
    elif annotation in (str, bool):
        if isinstance(value, annotation):
            return value
    elif isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise ConfigError(f"{where()}: expected {_type_name(annotation)}, found {_describe(value)}")


def _check_intervals(value: Any, intervals: list[Interval], path: str, origins: _Origins) -> None:
    """Refuse a number (or an array's item) outside one of ``intervals``; None passes (an unset optional)."""
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_intervals(item, intervals, f"{path}[{index}]", origins)
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return
    for interval in intervals:
        problem = interval.problem(value)
        if problem:
            raise _Refused(f"{origins.where(path)}: {path} {problem}, found {value!r}")


def _refuse_nonfinite(value: Any, path: str, origins: _Origins) -> None:
    """Refuse NaN or infinity anywhere in a value no type hint describes (a plugin's untyped parameter)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused(f"{origins.where(path)}: {path} must be a finite number, found {value!r}")
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _refuse_nonfinite(item, f"{path}[{index}]", origins)
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_nonfinite(item, f"{path}.{key}", origins)


def _convert_dataclass(value: Any, cls: type, path: str, origins: _Origins) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{origins.where(path)}: {path}: expected a table, found {_describe(value)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, item in value.items():
        key_path = f"{path}.{key}" if path else key
        if key not in fields:
            hint = close_matches(key, fields)
            raise ConfigError(f"{origins.where(key_path)}: unknown key {key_path}{hint}")
        if hints[key] is PluginSpec and isinstance(item, dict) and "name" not in item:
            default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else None
            if isinstance(default, PluginSpec):  # e.g. --set model.generator.ngf=8 keeps the default generator
                item = {"name": default.name, **default.params, **item}
        converted = _convert(item, hints[key], key_path, origins)
        if "min_len" in fields[key].metadata and len(converted) < fields[key].metadata["min_len"]:
            raise ConfigError(f"{origins.where(key_path)}: {key_path} needs at least "
                              f"{fields[key].metadata['min_len']} entry, found {len(converted)}")
        kwargs[key] = converted
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{origins.where(path)}: missing key {key_path} ({_type_name(hints[name])})")
        if name not in kwargs and "min_len" in f.metadata:
            raise ConfigError(f"{origins.where(path)}: missing key {key_path} ({f.metadata.get('doc', '')})")
    return cls(**kwargs)


#: Arm names become folder names in the run directory.
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_cross_fields(config: Config, origins: _Origins) -> None:
    for arm in config.arms:
        if not ARM_NAME.fullmatch(arm):
            raise ConfigError(
                f"{origins.where('arms.' + arm)}: arms.{arm}: an arm name becomes a folder name, so it must be "
                "letters, digits, '_', '.' or '-' and start with a letter or digit"
            )
    if config.data.load_size is None:
        config.data.load_size = round(config.data.image_size * 286 / 256)  # the paper's ratio
    if config.data.load_size < config.data.image_size:
        raise ConfigError(
            f"{origins.where('data.load_size')}: data.load_size ({config.data.load_size}) must be >= "
            f"data.image_size ({config.data.image_size})"
        )
    if config.train.lr_decay_epochs > config.train.epochs:
        raise ConfigError(
            f"{origins.where('train.lr_decay_epochs')}: train.lr_decay_epochs ({config.train.lr_decay_epochs}) "
            f"must be at most train.epochs ({config.train.epochs})"
        )
    if len(config.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in config.train.betas):
        raise ConfigError(f"{origins.where('train.betas')}: train.betas must be two numbers in [0, 1), found {config.train.betas}")


# --------------------------------------------------------------------------- plugins

#: Factory arguments uqsynth supplies itself, per kind; a TOML table may not set them (:attr:`Kind.injected`).
INJECTED_PARAMS: dict[str, tuple[str, ...]] = {name: kind.injected for name, kind in KINDS.items()}


def resolve_plugins(config: Config, host: PluginHost, origins: _Origins | None = None) -> None:
    """Check every plugin name and parameter in ``config`` against ``host``'s registries.

    Parameters are converted in place (an integer given for a float becomes a
    float). Stochastic layers are built once, so their own argument checks run
    before any training starts.
    """
    origins = origins or _Origins("<config>")
    specs: list[tuple[str, str, PluginSpec]] = [
        ("generator", "model.generator", config.model.generator),
        ("discriminator", "model.discriminator", config.model.discriminator),
        ("adversarial_loss", "model.adversarial_loss", config.model.adversarial_loss),
    ]
    for arm, arm_config in config.arms.items():
        specs.append(("stochastic_layer", f"arms.{arm}.stochastic_layer", arm_config.stochastic_layer))
        specs.append(("likelihood", f"arms.{arm}.likelihood", arm_config.likelihood))
    names = [spec.name for spec in config.calibration.calibrators]
    for index, spec in enumerate(config.calibration.calibrators):
        if names.count(spec.name) > 1:
            raise ConfigError(f"{origins.where('calibration.calibrators')}: calibration.calibrators names "
                              f"{spec.name!r} twice; each calibrator is saved under its name")
        specs.append(("calibrator", f"calibration.calibrators[{index}]", spec))
    for kind, path, spec in specs:
        try:
            entry = host[kind].get(spec.name)
        except PluginError as exc:
            raise PluginError(f"{origins.where(path)}: {path}: {exc}") from None
        spec.params = check_params(entry.factory, spec.params, path, origins, INJECTED_PARAMS[kind])
    try:
        host["dataset"].get(config.data.source)
    except PluginError as exc:
        raise PluginError(f"{origins.where('data.source')}: data.source: {exc}") from None
    for name, options in config.data.options.items():
        if name not in host["dataset"]:
            raise ConfigError(
                f"{origins.where('data.' + name)}: unknown key data.{name}: not a field of [data] "
                f"and not a registered dataset{close_matches(name, host['dataset'].names())}"
            )
        factory = host["dataset"].get(name).factory
        config.data.options[name] = check_params(factory, options, f"data.{name}", origins, INJECTED_PARAMS["dataset"])
    for arm, arm_config in config.arms.items():
        for kind in ("stochastic_layer", "likelihood"):
            spec = getattr(arm_config, kind)
            path = f"arms.{arm}.{kind}"
            try:
                host[kind].build(spec)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{origins.where(path)}: {path}: {exc}") from None


def check_params(
    factory: Any, params: Mapping[str, Any], path: str, origins: _Origins, injected: Iterable[str] = ()
) -> dict[str, Any]:
    """Validate ``params`` against ``factory``'s keyword parameters, type hints and constraints.

    Whatever the plugin kind: the types and :class:`Interval` ranges of its
    hints, finiteness of floats (of untyped parameters too), then the
    factory's ``param_rules`` (:class:`Rule`) with the defaults filled in.
    A factory declaring nothing is checked for names and finiteness only.
    """
    signature = inspect.signature(factory)
    hints = _hints(factory)
    accepted = {
        name: parameter
        for name, parameter in signature.parameters.items()
        if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    injected = tuple(injected)
    named = lambda key: f"{path}.{key}" if path else key  # noqa: E731
    checked = {}
    for key, value in params.items():
        key_path = named(key)
        if key in injected:
            raise ConfigError(f"{origins.where(key_path)}: {key_path} is set by uqsynth and cannot be configured here")
        if key not in accepted and not takes_any:
            options = [n for n in accepted if n not in injected]
            raise ConfigError(f"{origins.where(key_path)}: unknown key {key_path}{close_matches(key, options)}")
        if hints.get(key, Any) is Any:
            _refuse_nonfinite(value, key_path, origins)
            checked[key] = value
        else:
            checked[key] = _convert(value, hints[key], key_path, origins)
    for name, parameter in accepted.items():
        if parameter.default is parameter.empty and name not in checked and name not in injected:
            raise ConfigError(f"{origins.where(path)}: missing key {named(name)}")
    defaults = {name: p.default for name, p in accepted.items() if p.default is not p.empty}
    for rule in getattr(factory, "param_rules", ()):
        problem = rule.problem({**defaults, **checked})
        if problem:
            origin = next((origins.where(named(n)) for n in rule.names() if n in checked), origins.where(path))
            raise ConfigError(f"{origin}: {path}: {problem}" if path else f"{origin}: {problem}")
    return checked


def _hints(factory: Any) -> dict[str, Any]:
    """The type hints of ``factory``'s parameters, constraints (``Annotated``) kept; {} when unresolvable."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations in a plugin: check names only
        return {}


def validate_params(factory: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`check_params` for code that builds a plugin itself (a contract suite, a calibrator's ``fit``).

    Returns:
        The parameters, converted as a configuration would convert them.

    Raises:
        ValueError: One line naming the factory and the parameter, e.g.
            ``IsotonicCalibrator: bins must be >= 1, found 0``.
    """
    name = getattr(factory, "__qualname__", None) or type(factory).__name__
    try:
        return check_params(factory, params, "", _Origins(name))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def declared_constraints(factory: Any) -> dict[str, list[Interval]]:
    """The :class:`Interval` constraints declared on each of ``factory``'s parameters (those that have any)."""
    declared = {}
    for name, hint in _hints(factory).items():
        if typing.get_origin(hint) is Annotated:
            intervals = [extra for extra in typing.get_args(hint)[1:] if isinstance(extra, Interval)]
            if intervals:
                declared[name] = intervals
    return declared


def declaration_problems(factory: Any) -> list[str]:
    """What is wrong with ``factory``'s declared constraints, for contract suites: [] when nothing is.

    A :class:`Rule` must relate parameters the factory has, and ``param_rules``
    must hold only rules (a misspelt parameter would make it never apply);
    a default must lie in its parameter's declared range.
    """
    parameters = inspect.signature(factory).parameters
    problems = []
    for name, intervals in declared_constraints(factory).items():
        default = parameters[name].default if name in parameters else None
        if not isinstance(default, numbers.Real) or isinstance(default, bool):
            continue  # no default (or None): nothing to check
        for interval in intervals:
            problem = interval.problem(default)
            if problem:
                problems.append(f"the default of {name} breaks its declared range: it {problem}, found {default!r}")
    for rule in getattr(factory, "param_rules", ()):
        if not isinstance(rule, Rule):
            problems.append(f"param_rules holds {rule!r}, which is not a uqsynth.config.Rule")
            continue
        unknown = [name for name in rule.names() if name not in parameters]
        if unknown:
            problems.append(f"rule {rule.message!r} names {', '.join(unknown)}, which the factory does not take")
    return problems


# --------------------------------------------------------------------------- saving


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved configuration as plain TOML-ready tables (``None`` values left out).

    Profiles were applied while resolving, so neither ``[profiles]`` nor
    ``data.fallback_profile`` is kept: reloading the saved file must give
    this configuration, not apply a profile a second time.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, PluginSpec):
            return {k: plain(v) for k, v in value.as_toml().items()}
        if dataclasses.is_dataclass(value):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None and not f.metadata.get("internal")
            }
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    tables = plain(config)
    tables.pop("profiles", None)
    tables["data"].pop("fallback_profile", None)
    data = tables["data"]
    for name, options in data.pop("options").items():
        data[name] = options
    return tables


def dumps_config(config: Config) -> str:
    """The resolved configuration as TOML text (what every run saves)."""
    return tomli_w.dumps(config_to_dict(config))

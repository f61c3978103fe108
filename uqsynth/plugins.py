"""The plugin host: a pluggy manager, one registry per plugin kind, discovery.

Start-up follows pytest: create the manager, add the hook specifications,
register the built-in modules (:data:`DEFAULT_PLUGINS`), then every module
announced in the ``uqsynth`` entry-point group, then collect what each
registration hook registers. Set ``UQSYNTH_DISABLE_PLUGIN_AUTOLOAD=1`` to skip
the entry points (the test suite does, to stay isolated from whatever
happens to be installed).

Problems are collected rather than raised at start-up, so ``uqsynth plugins``
can still list everything that works and mark the rest as broken; commands
that build models call :meth:`PluginHost.check` and refuse to go on.

As in pytest, a module's functions named ``uqsynth_*`` are hook
implementations with or without ``@uqsynth.hookimpl``, and each plugin is
followed by pluggy's ``check_pending()``: a hook name that matches no
specification (``uqsynth_register_calibrator``, a ``specname`` typo) makes
the plugin broken, with the close match and pluggy's own message, instead of
registering nothing without a word.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from uqsynth import hookspecs
from uqsynth.errors import PluginError

ENTRY_POINT_GROUP = "uqsynth"
DISABLE_AUTOLOAD_ENV = "UQSYNTH_DISABLE_PLUGIN_AUTOLOAD"

DEFAULT_PLUGINS = (
    "uqsynth.builtins.stochastic_layers",
    "uqsynth.builtins.networks",
    "uqsynth.builtins.adversarial_losses",
    "uqsynth.builtins.datasets",
    "uqsynth.builtins.calibrators",
    "uqsynth.builtins.likelihoods",
)


@dataclass(frozen=True)
class Kind:
    """Everything uqsynth knows about a plugin kind, in one place.

    Adding a kind is this record, its hook specification in
    :mod:`uqsynth.hookspecs` and its built-ins' registration module; the
    registry, ``uqsynth plugins``, the configuration's parameter checks and
    :meth:`Registry.build` follow from it.

    Attributes:
        name: The public name (``uqsynth plugins`` lists it, errors say it).
        hook: The registration hook, ``uqsynth_register_<plural>``.
        interface_path: ``"module:attribute"`` of the interface, imported on first use.
        injected: Factory arguments uqsynth supplies itself (a TOML table may not set them).
    """

    name: str
    hook: str
    interface_path: str
    injected: tuple[str, ...] = ()

    @functools.cached_property
    def interface(self) -> type:
        module_name, attribute = self.interface_path.split(":")
        return getattr(importlib.import_module(module_name), attribute)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("stochastic_layer", "uqsynth_register_stochastic_layers", "uqsynth.layers.base:StochasticLayer"),
        Kind("generator", "uqsynth_register_generators", "uqsynth.models.base:Generator",
             injected=("image_size", "stochastic_layer", "positions", "in_channels", "out_channels")),
        Kind("discriminator", "uqsynth_register_discriminators", "uqsynth.models.base:Discriminator",
             injected=("in_channels",)),
        Kind("adversarial_loss", "uqsynth_register_adversarial_losses", "uqsynth.losses:AdversarialLoss"),
        Kind("calibrator", "uqsynth_register_calibrators", "uqsynth.calibration.base:Calibrator"),
        Kind("dataset", "uqsynth_register_datasets", "uqsynth.data.base:Dataset", injected=("root",)),
        Kind("likelihood", "uqsynth_register_likelihoods", "uqsynth.likelihoods:Likelihood"),
    )
}


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin module came from."""

    name: str
    distribution: str
    version: str


@dataclass(frozen=True)
class Entry:
    """One registered name: what builds it and which plugin provided it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: PluginInfo

    @property
    def summary(self) -> str:
        """First line of the factory's docstring."""
        doc = inspect.getdoc(self.factory) or ""
        return doc.splitlines()[0] if doc else ""

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "plugin": self.plugin.name,
            "distribution": self.plugin.distribution,
            "version": self.plugin.version,
        }


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded or registered something unusable."""

    plugin: PluginInfo
    message: str


def close_matches(word: str, candidates: Iterable[str]) -> str:
    """Format difflib's close matches as ``' (did you mean "a" or "b"?)'``, or ``''``."""
    matches = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(f'"{m}"' for m in matches) + "?)"


class Registry:
    """The registered names of one plugin kind (like timm's model registry)."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries.values())

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def validate(self, entry: Entry) -> None:
        """Raise :class:`PluginError` unless ``entry`` could be added."""
        if not entry.name or not isinstance(entry.name, str):
            raise PluginError(
                f'plugin "{entry.plugin.name}" registered a {self.kind.name} with an invalid name {entry.name!r}'
            )
        if not callable(entry.factory):
            raise PluginError(
                f'plugin "{entry.plugin.name}" registered {self.kind.name} "{entry.name}" '
                f"as {entry.factory!r}, which is not a class or callable"
            )
        if inspect.isclass(entry.factory) and not issubclass(entry.factory, self.kind.interface):
            raise PluginError(
                f'plugin "{entry.plugin.name}" registered {self.kind.name} "{entry.name}" as '
                f"{entry.factory.__module__}.{entry.factory.__qualname__}, which does not derive from "
                f"{self.kind.interface.__module__}.{self.kind.interface.__qualname__}"
            )
        previous = self._entries.get(entry.name)
        if previous is not None:
            raise PluginError(
                f'{self.kind.name} "{entry.name}" is registered twice: by plugin "{previous.plugin.name}" '
                f'({previous.plugin.distribution}) and by plugin "{entry.plugin.name}" ({entry.plugin.distribution})'
            )

    def add(self, entry: Entry) -> None:
        """Add ``entry``; a name registered twice is an error naming both plugins."""
        self.validate(entry)
        self._entries[entry.name] = entry

    def get(self, name: str) -> Entry:
        """Return the entry for ``name``; an unknown name lists the close matches."""
        try:
            return self._entries[name]
        except KeyError:
            hint = close_matches(name, self._entries)
            raise PluginError(
                f'unknown {self.kind.name} "{name}"{hint}; run `uqsynth plugins` to list them all'
            ) from None

    def build(self, spec: Any, /, **injected: Any) -> Any:
        """Build a configured plugin: ``spec`` (a :class:`~uqsynth.config.PluginSpec`) with what uqsynth supplies.

        ``injected`` must be among the kind's :attr:`Kind.injected` (the
        configuration refuses them in TOML tables, so they never collide).
        """
        unexpected = sorted(set(injected) - set(self.kind.injected))
        if unexpected:
            raise TypeError(f"{self.kind.name} plugins are not given {', '.join(unexpected)} by uqsynth")
        return self.create(spec.name, **injected, **spec.params)

    def create(self, name: str, /, **params: Any) -> Any:
        """Build the plugin registered as ``name`` and check it implements the interface."""
        entry = self.get(name)
        obj = entry.factory(**params)
        if not isinstance(obj, self.kind.interface):
            raise PluginError(
                f'plugin "{entry.plugin.name}" registered {self.kind.name} "{name}", but its factory returned '
                f"{type(obj).__module__}.{type(obj).__qualname__}, which is not a "
                f"{self.kind.interface.__module__}.{self.kind.interface.__qualname__}"
            )
        return obj


class _Manager(pluggy.PluginManager):
    """pluggy's manager, also taking a module's unmarked ``uqsynth_*`` functions as hook implementations.

    Why (pytest does the same for ``pytest_*``): a hook whose marker was
    forgotten would otherwise be ignored without a word, and a misspelt one
    too; taken as implementations, ``check_pending`` reports the misspelt ones.
    """

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if (
            opts is None
            and name.startswith(hookspecs.PROJECT_NAME + "_")
            and inspect.ismodule(plugin)
            and inspect.isfunction(inspect.getattr_static(plugin, name, None))
        ):
            opts = {"wrapper": False, "hookwrapper": False, "optionalhook": False, "tryfirst": False,
                    "trylast": False, "specname": None}
        return opts


class PluginHost:
    """The plugin manager together with the registries it fills."""

    def __init__(self) -> None:
        self.manager = _Manager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self.registries: dict[str, Registry] = {name: Registry(kind) for name, kind in KINDS.items()}
        self.plugins: dict[str, PluginInfo] = {}
        self.broken: list[BrokenPlugin] = []

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]

    def load(self, *, autoload: bool | None = None, modules: Iterable[str | ModuleType] = ()) -> PluginHost:
        """Register built-ins, ``modules`` and (unless disabled) entry points, then collect."""
        import uqsynth

        builtin = PluginInfo("", "uqsynth", uqsynth.__version__)
        for module in (*DEFAULT_PLUGINS, *modules):
            name = module if isinstance(module, str) else module.__name__
            info = PluginInfo(name, builtin.distribution, builtin.version)
            self._add_module(info, lambda module=module: _import(module))
        if autoload is None:
            autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
        if autoload:
            for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = entry_point.dist
                info = PluginInfo(
                    entry_point.name,
                    dist.metadata["Name"] if dist is not None else "unknown",
                    dist.version if dist is not None else "unknown",
                )
                self._add_module(info, entry_point.load)
        for kind in KINDS.values():
            self._collect(kind)
        return self

    def check(self) -> None:
        """Raise :class:`PluginError` for the first broken plugin, if any."""
        if self.broken:
            raise PluginError(self.broken[0].message)

    def _add_module(self, info: PluginInfo, importer: Callable[[], ModuleType]) -> None:
        try:
            module = importer()
        except Exception as exc:  # any failure inside a third-party import
            self.broken.append(BrokenPlugin(info, f'Error importing plugin "{info.name}": {_describe(exc)}'))
            return
        try:
            self.manager.register(module, name=info.name)
        except Exception as exc:  # pluggy's validation (wrong hook arguments) or a name clash
            self.broken.append(BrokenPlugin(info, f'plugin "{info.name}" cannot be registered: {_describe(exc)}'))
            return
        try:
            # Earlier plugins passed (or were unregistered), so what is pending is this plugin's.
            self.manager.check_pending()
        except pluggy.PluginValidationError as exc:
            unknown = [
                name
                for name, caller in vars(self.manager.hook).items()
                if not name.startswith("_") and not caller.has_spec()
                and any(impl.plugin_name == info.name for impl in caller.get_hookimpls())
            ]
            self.manager.unregister(name=info.name)  # all or nothing
            hook = unknown[0] if unknown else "?"
            hint = close_matches(hook, (kind.hook for kind in KINDS.values()))
            self.broken.append(
                BrokenPlugin(info, f'plugin "{info.name}" implements unknown hook {hook}{hint}: {_describe(exc)}')
            )
            return
        self.plugins[info.name] = info

    def _collect(self, kind: Kind) -> None:
        registry = self.registries[kind.name]
        for impl in getattr(self.manager.hook, kind.hook).get_hookimpls():
            info = self.plugins[impl.plugin_name]
            staged: list[Entry] = []

            def register(name: str, factory: Callable[..., Any], *, _info=info, _staged=staged) -> None:
                _staged.append(Entry(kind.name, name, factory, _info))

            try:
                impl.function(register=register)
                # All or nothing: a plugin with one bad registration registers none.
                names = [entry.name for entry in staged]
                for entry in staged:
                    registry.validate(entry)
                    if names.count(entry.name) > 1:
                        raise PluginError(f'plugin "{info.name}" registers {kind.name} "{entry.name}" twice')
                for entry in staged:
                    registry.add(entry)
            except PluginError as exc:
                self.broken.append(BrokenPlugin(info, str(exc)))
            except Exception as exc:
                self.broken.append(BrokenPlugin(info, f'plugin "{info.name}" failed in {kind.hook}: {_describe(exc)}'))


def _import(module: str | ModuleType) -> ModuleType:
    return importlib.import_module(module) if isinstance(module, str) else module


def _describe(exc: BaseException) -> str:
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if isinstance(exc, pluggy.PluginValidationError):
        text = ["; ".join(text)] if text else []  # the whole of it: its first line names no argument
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@functools.cache
def get_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    return PluginHost().load()


def reset_host() -> None:
    """Forget the process-wide host (tests use it after changing the environment)."""
    get_host.cache_clear()


def create(kind: str, name: str, /, **params: Any) -> Any:
    """Build plugin ``name`` of ``kind`` from the process-wide host (like ``timm.create_model``)."""
    return get_host()[kind].create(name, **params)


def list_plugins(kind: str) -> list[str]:
    """Registered names of ``kind`` (like ``timm.list_models``)."""
    return get_host()[kind].names()

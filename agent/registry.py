"""Plugin discovery and loading through entry points.

Discovery (:func:`discover`) lists what is installed without importing any of it. Loading
(:func:`load`) imports only what the config names and wraps every failure in a
:class:`~memagent.errors.PluginLoadError` naming the plugin and its distribution, so one broken
plugin never breaks the others. The built-in backends and sinks are found exactly like
third-party ones: they are entry points of the ``memagent`` distribution.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal

from memagent.contracts import Backend, Sink, SinkContext, protocol_members
from memagent.errors import ConfigError, PluginLoadError
from memagent.options import Options, suggest

Kind = Literal["backend", "sink"]
GROUPS: dict[Kind, str] = {"backend": "memagent.backends", "sink": "memagent.sinks"}
#: What a plugin class must have, straight from the contracts' Protocols.
REQUIRED: dict[Kind, tuple[str, ...]] = {"backend": protocol_members(Backend), "sink": protocol_members(Sink)}


@dataclass(frozen=True)
class PluginSpec:
    """An installed plugin, not yet imported."""

    kind: Kind
    name: str
    value: str
    distribution: str
    version: str
    entry_point: EntryPoint


def discover(kind: Kind) -> list[PluginSpec]:
    """Installed plugins of one kind, sorted by name (then distribution); nothing is imported."""
    specs = []
    for ep in entry_points(group=GROUPS[kind]):
        dist = ep.dist
        specs.append(PluginSpec(kind, ep.name, ep.value, dist.name if dist else "unknown",
                                dist.version if dist else "?", ep))
    return sorted(specs, key=lambda s: (s.name, s.distribution))


def find(kind: Kind, name: str) -> PluginSpec:
    """The one installed plugin called ``name``; ConfigError if none or several."""
    specs = [s for s in discover(kind) if s.name == name]
    if not specs:
        known = [s.name for s in discover(kind)]
        listed = ", ".join(known) or "none installed"
        raise ConfigError("", f"no {kind} plugin named {name!r}{suggest(name, known)} "
                              f"(installed: {listed})")
    if len(specs) > 1:
        dists = ", ".join(s.distribution for s in specs)
        raise ConfigError("", f"{kind} plugin {name!r} is provided by several distributions: "
                              f"{dists}; uninstall all but one")
    return specs[0]


def load(spec: PluginSpec) -> Any:
    """Import a plugin's class; PluginLoadError (naming it) if that fails or it is not runnable."""
    try:
        plugin = spec.entry_point.load()
    except Exception as exc:  # noqa: BLE001 - any import failure of a plugin is reported, not raised
        raise PluginLoadError(spec.kind, spec.name, spec.distribution,
                              f"failed to import {spec.value}: {type(exc).__name__}: {exc}") from exc
    missing = [attr for attr in REQUIRED[spec.kind] if not hasattr(plugin, attr)]
    if missing:
        raise PluginLoadError(spec.kind, spec.name, spec.distribution,
                              f"{spec.value} lacks {', '.join(missing)}")
    if spec.kind == "backend":
        try:
            ok = bool(plugin.available())
        except ImportError as exc:  # a missing dependency: its message says how to install it
            raise PluginLoadError(spec.kind, spec.name, spec.distribution, str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - a broken availability check means not runnable
            raise PluginLoadError(spec.kind, spec.name, spec.distribution,
                                  f"availability check failed: {exc}") from exc
        if not ok:
            raise PluginLoadError(spec.kind, spec.name, spec.distribution,
                                  f"cannot run on this machine ({sys.platform})")
    return plugin


def auto_backend_name() -> str:
    """``linux`` on Linux, ``psutil`` everywhere else."""
    return "linux" if sys.platform.startswith("linux") else "psutil"


def build_backend(name: str, tables: dict[str, dict[str, Any]]) -> Backend:
    """Load the backend called ``name`` (``auto`` resolved) and build it from its table in
    ``[backends.<name>]``. Other backends' tables are validated too when those plugins load
    here, so a config shared by hosts of several OSes still has every key checked."""
    chosen = auto_backend_name() if name == "auto" else name
    try:
        plugin = load(find("backend", chosen))
    except ConfigError as exc:
        raise ConfigError("agent.backend", exc.problem) from None
    for other, table in tables.items():
        if other == chosen:
            continue
        try:
            other_plugin = load(find("backend", other))
        except ConfigError as exc:
            raise ConfigError(f"backends.{other}", exc.problem) from None
        except PluginLoadError:
            continue  # e.g. [backends.linux] on a Mac: kept for the hosts where it runs
        other_plugin.from_options(Options(dict(table), f"backends.{other}")).close()
    backend: Backend = plugin.from_options(Options(dict(tables.get(chosen, {})), f"backends.{chosen}"))
    return backend


def build_sink(kind: str, key: str, options: dict[str, Any], context: SinkContext) -> Sink:
    """Load the sink plugin ``kind`` and let it validate ``options`` (read at dotted ``key``)."""
    try:
        plugin = load(find("sink", kind))
    except ConfigError as exc:
        raise ConfigError(f"{key}.type", exc.problem) from None
    sink: Sink = plugin.from_options(Options(dict(options), key), context)
    return sink

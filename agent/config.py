"""Config: TOML text → validated, frozen :class:`Config`.

Guarantees: every key is checked (unknown keys are errors with a "did you mean"); every error is
a :class:`~memagent.errors.ConfigError` whose message is one line naming the dotted key
(``targets[1].interval: must be a positive duration, got "-1s"``); arrays of tables are counted
from 1, as people count. ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` (POSIX and
docker-compose syntax) are expanded in the raw text before parsing (so they work for numbers
too); ``$${`` is a literal ``${``; an unset variable without a default is an error, and so is any
other ``${...}`` form (never passed through as literal text); lines that are TOML comments are
left alone.

Not checked here: the options of each sink and backend plugin (the plugin validates its own,
see :mod:`memagent.registry`), and whether a selector matches anything (a target may match
nothing yet; it is watched for).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from memagent.alerts import AlertRule, parse_rules
from memagent.errors import ConfigError
from memagent.options import Options, describe, suggest

WHEN_FULL = ("drop_oldest", "drop_newest", "block")
SELECTORS = ("pid", "pidfile", "comm", "exe", "cmdline", "user", "cgroup", "all", "self")
# $${ (a literal "${"), or ${ and whatever follows up to the closing brace; the inside is then
# checked against the forms we support, so a typo is an error instead of literal text
_VARIABLE = re.compile(r"\$\$\{|\$\{([^}\n]*)(\}?)")
_REFERENCE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)(.*))?", re.DOTALL)
_TARGET_NAME = re.compile(r"^[A-Za-z0-9_.:@/-]+$")


@dataclass(frozen=True)
class AgentConfig:
    """The ``[agent]`` table."""

    interval: float = 1.0
    hostname: str = ""
    backend: str = "auto"
    tags: dict[str, str] = field(default_factory=dict)
    rescan: float = 2.0
    stats_interval: float = 60.0
    drain_timeout: float = 10.0


@dataclass(frozen=True)
class TargetConfig:
    """One ``[[targets]]`` table: which processes, how often, how much detail.

    Every selector given must match (they are ANDed); ``children`` adds the descendants of
    what matched. ``comm``, ``exe``, ``user`` and ``cgroup`` are globs; ``cmdline`` is a regex
    searched in the space-joined command line.
    """

    name: str
    interval: float
    pid: int | None = None
    pidfile: str | None = None
    comm: str | None = None
    exe: str | None = None
    cmdline: re.Pattern[str] | None = None
    user: str | None = None
    cgroup: str | None = None
    all: bool = False
    self: bool = False
    children: bool = False
    full: bool = False
    totals: bool = False
    alerts: tuple[AlertRule, ...] = ()
    top: int | None = None  # only the N largest by rss are sampled (re-chosen each rescan)
    min_rss: int | None = None  # only processes at least this large are sampled
    full_every: int = 1  # full (uss/pss/swap) read every Nth tick of the target
    full_max_rss: int | None = None  # no full read above this rss (smaps walks the whole map)


@dataclass(frozen=True)
class SinkConfig:
    """One ``[[sinks]]`` table: the framework's keys, and the plugin's own (``options``)."""

    key: str
    type: str
    name: str
    queue: int
    when_full: str
    batch: int
    targets: tuple[str, ...] | None
    options: dict[str, Any]


@dataclass(frozen=True)
class Config:
    """The whole validated config."""

    agent: AgentConfig
    targets: tuple[TargetConfig, ...]
    sinks: tuple[SinkConfig, ...]
    backends: dict[str, dict[str, Any]]
    source: str


def expand_variables(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` outside comment lines
    (see module docstring)."""
    env = os.environ if environ is None else environ
    lines = []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if line.lstrip().startswith("#"):
            lines.append(line)
            continue

        def substitute(match: re.Match[str], number: int = number) -> str:
            if match.group(0) == "$${":
                return "${"
            return _substitute(match.group(1), match.group(2) == "}", env, f"line {number}")

        lines.append(_VARIABLE.sub(substitute, line))
    return "".join(lines)


def _substitute(inside: str, closed: bool, env: Mapping[str, str], where: str) -> str:
    """The value of one ``${inside}`` reference; ConfigError for an unset variable or a form
    that is not one of ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}``."""
    reference = _REFERENCE.fullmatch(inside) if closed else None
    if reference is None:
        shown = "${" + inside + ("}" if closed else "")
        raise ConfigError(where, f"{shown} is not a supported reference: use ${{VAR}}, "
                                 "${VAR:-default} or ${VAR:?message} ($${ for a literal ${)")
    name, operator, word = reference.groups()
    value = env.get(name)
    if value is not None and (value != "" or operator is None):
        return value
    if operator == ":-":
        return word
    if operator == ":?":
        state = "empty" if value == "" else "not set"
        raise ConfigError(where, f"${{{name}}} is {state}: {word or 'required'}")
    raise ConfigError(where, f"${{{name}}} is not set (set it, or write ${{{name}:-default}})")


def read_config_text(path: str | os.PathLike[str]) -> str:
    """A config file's text; ConfigError (one line naming the path) if it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(str(path), f"cannot read: {reason}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, expand and validate a config file."""
    return parse_config(read_config_text(path), source=str(path))


def default_config_text() -> str:
    """The embedded default: every visible process, every second, to stdout."""
    return resources.files("memagent").joinpath("default.toml").read_text(encoding="utf-8")


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate TOML text; raises ConfigError (one line) for anything wrong."""
    expanded = expand_variables(text)
    try:
        raw = tomllib.loads(expanded)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"not valid TOML: {exc}") from None
    top = Options(raw, "")
    agent = _agent(Options(top.table("agent", {}), "agent"))
    targets_raw = top.raw("targets", None)
    sinks_raw = top.raw("sinks", None)
    backends_raw = top.table("backends", {})
    top.finish()
    targets = _targets(targets_raw, agent)
    sinks = _sinks(sinks_raw, {t.name for t in targets})
    backends = {}
    for name, table in backends_raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"backends.{name}", f"must be a table, got {describe(table)}")
        backends[name] = table
    return Config(agent, targets, sinks, backends, source)


def _agent(opts: Options) -> AgentConfig:
    interval = opts.duration("interval", 1.0)
    hostname = opts.string("hostname", "") or socket.gethostname()
    backend = opts.string("backend", "auto", nonempty=True)
    tags_raw = opts.table("tags", {})
    tags: dict[str, str] = {}
    for key, value in tags_raw.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(opts.key(f"tags.{key}"), f"must be a string, got {describe(value)}")
        tags[key] = str(value)
    config = AgentConfig(
        interval=interval,
        hostname=hostname,
        backend=backend,
        tags=tags,
        rescan=opts.duration("rescan", 2.0),
        stats_interval=opts.duration("stats_interval", 60.0),
        drain_timeout=opts.duration("drain_timeout", 10.0),
    )
    opts.finish()
    return config


def _array_of_tables(value: Any, key: str) -> list[Any]:
    """A non-empty ``[[key]]`` array of tables."""
    if value is None or value == []:
        raise ConfigError(key, f"at least one [[{key}]] table is required")
    if isinstance(value, dict):
        raise ConfigError(key, f"must be an array of tables ([[{key}]]), got a single table")
    if not isinstance(value, list):
        raise ConfigError(key, f"must be an array of tables ([[{key}]]), got {describe(value)}")
    return value


def _targets(raw: Any, agent: AgentConfig) -> tuple[TargetConfig, ...]:
    items = _array_of_tables(raw, "targets")
    targets = []
    seen: set[str] = set()
    for number, item in enumerate(items, start=1):
        target = _target(Options(item, f"targets[{number}]"), agent)
        if target.name in seen:
            raise ConfigError(f"targets[{number}].name", f'"{target.name}" is used by another target')
        seen.add(target.name)
        targets.append(target)
    return tuple(targets)


def _target(opts: Options, agent: AgentConfig) -> TargetConfig:
    name = opts.string("name", nonempty=True)
    if not _TARGET_NAME.match(name):
        raise ConfigError(opts.key("name"), f"may hold only letters, digits and _.:@/-, got {describe(name)}")
    pid = opts.integer("pid", None, minimum=1)
    pattern = opts.string("cmdline", None, nonempty=True)
    cmdline = None
    if pattern is not None:
        try:
            cmdline = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(opts.key("cmdline"), f"not a valid regular expression: {exc}") from None
    user = opts.raw("user", None)
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)
    elif user is not None and not isinstance(user, str):
        raise ConfigError(opts.key("user"), f"must be a user name or uid, got {describe(user)}")
    target = TargetConfig(
        name=name,
        interval=opts.duration("interval", agent.interval),
        pid=pid,
        pidfile=opts.string("pidfile", None, nonempty=True),
        comm=opts.string("comm", None, nonempty=True),
        exe=opts.string("exe", None, nonempty=True),
        cmdline=cmdline,
        user=user,
        cgroup=opts.string("cgroup", None, nonempty=True),
        all=opts.boolean("all", False),
        self=opts.boolean("self", False),
        children=opts.boolean("children", False),
        full=opts.boolean("full", False),
        totals=opts.boolean("totals", False),
        alerts=parse_rules(opts.raw("alerts", None), opts.key("alerts")),
        top=opts.integer("top", None, minimum=1),
        min_rss=opts.size("min_rss", None),
        full_every=opts.integer("full_every", 1, minimum=1),
        full_max_rss=opts.size("full_max_rss", None),
    )
    opts.finish()
    for key in ("full_every", "full_max_rss"):
        if not target.full and getattr(target, key) not in (None, 1):
            raise ConfigError(opts.key(key), "goes with full = true")
    chosen = [s for s in SELECTORS if getattr(target, s) not in (None, False)]
    if not chosen:
        raise ConfigError(opts.path, "needs a selector: one of " + ", ".join(SELECTORS))
    if target.all and len(chosen) > 1:
        others = ", ".join(s for s in chosen if s != "all")
        raise ConfigError(opts.key("all"), f"cannot be combined with {others} (all means every process)")
    return target


def _sinks(raw: Any, target_names: set[str]) -> tuple[SinkConfig, ...]:
    if raw is None:
        raw = [{"type": "stdout"}]
    items = _array_of_tables(raw, "sinks")
    sinks = []
    names: set[str] = set()
    for number, item in enumerate(items, start=1):
        opts = Options(item, f"sinks[{number}]")
        kind = opts.string("type", nonempty=True)
        name = opts.string("name", None, nonempty=True)
        if name is None:
            name = kind if kind not in names else f"{kind}-{number}"
        if name in names:
            raise ConfigError(opts.key("name"), f'"{name}" is used by another sink')
        names.add(name)
        targets = opts.string_list("targets", None)
        for target in targets or ():
            if target not in target_names:
                hint = suggest(target, target_names)
                raise ConfigError(opts.key("targets"), f'no target named "{target}"{hint}')
        sinks.append(SinkConfig(
            key=opts.path,
            type=kind,
            name=name,
            queue=opts.integer("queue", 10_000, minimum=1),
            when_full=opts.choice("when_full", WHEN_FULL, "drop_oldest"),
            batch=opts.integer("batch", 512, minimum=1),
            targets=tuple(targets) if targets is not None else None,
            options=opts.rest(),
        ))
    return tuple(sinks)


# -- memagent relay ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelayConfig:
    """A ``memagent relay`` config: the ``[relay]`` table and the usual ``[[sinks]]``.

    Of ``[relay]`` only ``hostname`` (what sinks are told this machine is; default: the
    system's) and ``drain_timeout`` are the relay's own; the rest (``source``: servers, stream or
    subject, credentials, ...) is validated by the NATS reader, as a sink validates its options.
    A sink's ``targets`` names targets of the agents whose records are relayed, so any valid
    target name is accepted there.
    """

    source: dict[str, Any]
    sinks: tuple[SinkConfig, ...]
    hostname: str
    drain_timeout: float
    path: str


def load_relay_config(path: str | os.PathLike[str]) -> RelayConfig:
    """Read, expand and validate a relay config file."""
    return parse_relay_config(read_config_text(path), source=str(path))


def is_relay_config(path: str | os.PathLike[str]) -> bool:
    """Whether a config file has a ``[relay]`` table (so ``memagent check`` validates it as a
    relay's); False for anything unreadable, which the agent's loader then reports, and for what
    is not a regular file (a FIFO, ``<(...)``, can be read only once)."""
    if not os.path.isfile(path):
        return False
    try:
        raw = tomllib.loads(expand_variables(Path(path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ConfigError, tomllib.TOMLDecodeError):
        return False
    return isinstance(raw.get("relay"), dict)


def parse_relay_config(text: str, source: str = "<config>") -> RelayConfig:
    """Validate a relay config's TOML text; ConfigError (one line) for anything wrong."""
    try:
        raw = tomllib.loads(expand_variables(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"not valid TOML: {exc}") from None
    for key in ("agent", "targets", "backends"):
        if key in raw:
            raise ConfigError(key, "a relay config has no [agent], [[targets]] or [backends]: it relays "
                                   "the records of agents that publish to NATS")
    top = Options(raw, "")
    if "relay" not in raw:
        raise ConfigError("relay", "a [relay] table is required (servers, and stream or subject)")
    relay = Options(top.table("relay"), "relay")
    sinks_raw = top.raw("sinks", None)
    top.finish()
    hostname = relay.string("hostname", "") or socket.gethostname()
    drain_timeout = relay.duration("drain_timeout", 10.0)
    sinks = _sinks(sinks_raw, _relayed_target_names(sinks_raw))
    return RelayConfig(relay.rest(), sinks, hostname, drain_timeout, source)


def _relayed_target_names(raw: Any) -> set[str]:
    """The target names the sinks of a relay config route by (they belong to the agents relayed,
    not to this config): each must look like a target name."""
    names: set[str] = set()
    for number, item in enumerate(raw if isinstance(raw, list) else [], start=1):
        value = item.get("targets") if isinstance(item, dict) else None
        for name in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if isinstance(name, str):
                if not _TARGET_NAME.match(name):
                    raise ConfigError(f"sinks[{number}].targets", "may hold only letters, digits and "
                                                                  f"_.:@/-, got {describe(name)}")
                names.add(name)
    return names

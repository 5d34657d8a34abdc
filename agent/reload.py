"""Reloading the config (SIGHUP): what changes, decided before anything is touched.

:func:`plan_reload` compares the running config with a newly loaded one and builds (validates,
no I/O) the sinks that are new or changed. Everything that can fail fails here, so an invalid
config is refused whole and the running agent is untouched; applying a plan
(:meth:`memagent.runtime.Agent.reload`) cannot fail on the config's account.

What a reload can change, and how:

- targets, by name: added (their processes get ``start`` at the rescan done right after the
  reload), removed (``exit`` with reason ``unwatched``), changed (selectors, interval, ``full``,
  ``totals``: processes that no longer match get ``exit`` reason ``unwatched``);
- sinks, by name: an unchanged sink keeps its queue and its connections (WebSocket clients stay
  connected); a removed one is drained and closed; a changed one is replaced after the old one
  is drained (so a file or a port is never held by two); an added one starts;
- ``[agent]``: hostname, tags, interval (as each target's default), rescan, stats_interval,
  drain_timeout.

Not on reload: ``[agent] backend`` and the ``[backends.*]`` tables (the backend holds open fds for
every process): such a change is refused with a message saying to restart. ``seq`` continues
within the same ``run``: a reload never starts a new run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from memagent.alerts import AlertProcessor
from memagent.config import Config, SinkConfig
from memagent.contracts import SinkContext
from memagent.errors import ConfigError
from memagent.fanout import Outlet
from memagent.pipeline import Processor
from memagent.records import RecordMaker
from memagent.registry import build_sink
from memagent.totals import TotalsProcessor


def build_outlet(config: SinkConfig, hostname: str, run: str) -> Outlet:
    """The sink a ``[[sinks]]`` table names, validated and wrapped in its outlet (not started)."""
    context = SinkContext(name=config.name, hostname=hostname, run=run,
                          log=logging.getLogger(f"memagent.sink.{config.name}"))
    sink = build_sink(config.type, config.key, config.options, context)
    return Outlet(config.name, sink, queue=config.queue, when_full=config.when_full, batch=config.batch,
                  targets=config.targets, extra=context.counters)


def processors_for(config: Config, maker: RecordMaker) -> list[Processor]:
    """The pipeline's processors a config asks for: alert rules (first, so they see every
    sample), then totals for targets with totals = true."""
    processors: list[Processor] = []
    rules = {target.name: target.alerts for target in config.targets if target.alerts}
    if rules:
        processors.append(AlertProcessor(maker, rules))
    totalled = [target.name for target in config.targets if target.totals]
    if totalled:
        processors.append(TotalsProcessor(maker, totalled))
    return processors


@dataclass
class ReloadPlan:
    """What a reload does; :attr:`built` holds the new sinks' outlets, validated, not started."""

    config: Config
    built: dict[str, Outlet] = field(default_factory=dict)  # added or changed sinks
    removed_sinks: list[str] = field(default_factory=list)
    changed_sinks: list[str] = field(default_factory=list)
    targets: tuple[list[str], list[str], list[str]] = ([], [], [])  # added, removed, changed

    def summary(self) -> str:
        """``targets +1 -0 ~1, sinks +0 -1 ~0`` for the log line."""
        added, removed, changed = self.targets
        new_sinks = len(self.built) - len(self.changed_sinks)
        return (f"targets +{len(added)} -{len(removed)} ~{len(changed)}, "
                f"sinks +{new_sinks} -{len(self.removed_sinks)} ~{len(self.changed_sinks)}")


def plan_reload(current: Config, new: Config, run: str,
                build: Callable[[SinkConfig, str, str], Outlet] = build_outlet) -> ReloadPlan:
    """The plan from ``current`` to ``new``; ConfigError (or PluginLoadError) if ``new`` cannot
    be applied, in which case nothing was started and nothing needs undoing."""
    if new.agent.backend != current.agent.backend or new.backends != current.backends:
        raise ConfigError("agent.backend", "the backend and [backends] cannot change on reload; "
                                           "restart memagent to apply that")
    plan = ReloadPlan(new)
    old_targets = {t.name: t for t in current.targets}
    new_targets = {t.name: t for t in new.targets}
    plan.targets = ([n for n in new_targets if n not in old_targets],
                    [n for n in old_targets if n not in new_targets],
                    [n for n, t in new_targets.items() if n in old_targets and old_targets[n] != t])
    old_sinks = {s.name: s for s in current.sinks}
    hostname_changed = new.agent.hostname != current.agent.hostname
    for sink in new.sinks:
        previous = old_sinks.get(sink.name)
        if previous is not None and previous == sink and not hostname_changed:
            continue
        if previous is not None:
            plan.changed_sinks.append(sink.name)
        plan.built[sink.name] = build(sink, new.agent.hostname, run)
    plan.removed_sinks = [name for name in old_sinks if name not in {s.name for s in new.sinks}]
    return plan

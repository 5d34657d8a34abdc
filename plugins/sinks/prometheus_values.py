"""What the ``prometheus`` sink knows now: the latest values the records told it.

:class:`LatestValues` takes every record the sink is given (:meth:`LatestValues.add`) and keeps
only what a scrape shows, so a scrape reads nothing but this memory (no ``/proc``, no I/O):

- per target, its last ``totals`` record (made for targets with ``totals = true``);
- per process, when ``per_process`` is on, its last ``sample``: sizes, its target and name, and a
  pid-free identity (:attr:`ProcessValues.slot`);
- the last ``agent`` record's counters, and the ``error`` records counted by target and kind.

What disappears, so no stale value is ever shown: a process on its ``exit`` record, and — a safety
net for an ``exit`` the sink's queue dropped, or a process that could not be read any more — a
process of a totalled target that was not sampled in the tick its target's ``totals`` closes.
A target whose last totals counted no process keeps only its process count (0).

The per-process series are capped (``max_series``, counted in series: 2 per process, 5 with
``full = true``). A process whose series do not fit is left out whole (never half its sizes),
counted once in :attr:`LatestValues.left_out` (and the sink's ``left_out`` counter), and gets in
on a later sample once enough room is free. Slots: the processes of one (target, name) are
numbered 0, 1, 2, ... in the order they were first sampled; a process that exits frees its number
for the next one, so the slots shown are always 0..n-1 and the series count stays as small as
the most processes that ran at once. A process the cap left out has no slot.

Not done: totals computed from samples (the pipeline's ``totals`` records are the one source,
so every sink shows the same numbers); series for a target that never sent a ``totals`` record
(:meth:`LatestValues.targets_without_totals` names them, so the sink can say why).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The sizes a ``sample`` record carries, in the order they are shown.
PORTABLE_SIZES = ("rss", "vms")
FULL_SIZES = ("uss", "pss", "swap")

ProcessKey = tuple[str, int, str]
"""A watched process: (target, pid, started). A process matched by two targets is two entries."""


@dataclass(slots=True)
class TargetTotals:
    """A target's last ``totals`` record: ``sizes`` has rss and vms, and uss/pss/swap over
    ``full_processes`` of its processes when the target reads them."""

    processes: int
    full_processes: int
    sizes: dict[str, int]


@dataclass(slots=True)
class ProcessValues:
    """One process's last sample. ``series`` is how many per-process series it has now (0: the
    cap left it out, and then it has no ``slot``: -1); ``tick`` is the number of its target's
    ``totals`` records seen before it."""

    target: str
    name: str
    pid: int
    slot: int
    sizes: dict[str, int]
    tick: int
    series: int = 0


@dataclass(slots=True)
class _Slots:
    """The slot numbers of one (target, name): the lowest free one is handed out first."""

    next: int = 0
    free: list[int] = field(default_factory=list)

    def take(self) -> int:
        if self.free:
            return heapq.heappop(self.free)
        self.next += 1
        return self.next - 1

    def give_back(self, slot: int) -> None:
        heapq.heappush(self.free, slot)


class LatestValues:
    """The latest values of the records given to :meth:`add`; see the module docstring.

    ``counters`` is the sink's ``context.counters``: ``left_out`` counts processes the cap left
    out (each once)."""

    def __init__(self, *, per_process: bool, max_series: int, counters: dict[str, int]) -> None:
        self.per_process = per_process
        self.max_series = max_series
        self.counters = counters
        self.targets: dict[str, TargetTotals] = {}
        self.processes: dict[ProcessKey, ProcessValues] = {}
        self.agent: Mapping[str, Any] | None = None  # the last agent record's "agent" object
        self.agent_ts = ""
        self.process_errors: dict[tuple[str, str], int] = {}  # (target, kind) -> error records
        self.series = 0  # per-process series shown now
        self.left_out = 0  # processes the cap left out, each counted once
        self._ticks: dict[str, int] = {}  # target -> totals records seen
        self._by_target: dict[str, dict[ProcessKey, ProcessValues]] = {}
        self._slots: dict[tuple[str, str], _Slots] = {}
        self._ever_left_out: set[ProcessKey] = set()
        self._sampled: set[str] = set()  # targets with samples seen

    def add(self, fields: Mapping[str, Any]) -> None:
        """Take one record (its ``fields``); types the sink does not show are ignored."""
        handler = self._HANDLERS.get(fields.get("type", ""))
        if handler is not None:
            handler(self, fields)

    def targets_without_totals(self) -> list[str]:
        """Targets that sent samples but never a ``totals`` record, sorted."""
        return sorted(self._sampled - self.targets.keys())

    # -- record types ----------------------------------------------------------------------------

    def _totals(self, fields: Mapping[str, Any]) -> None:
        target = fields["target"]
        sizes = {key: fields[key] for key in (*PORTABLE_SIZES, *FULL_SIZES) if key in fields}
        self.targets[target] = TargetTotals(fields["processes"], fields.get("full_processes", 0), sizes)
        tick = self._ticks.get(target, 0)
        stale = [key for key, process in self._by_target.get(target, {}).items() if process.tick != tick]
        for key in stale:
            self._forget(key)
        self._ticks[target] = tick + 1

    def _sample(self, fields: Mapping[str, Any]) -> None:
        target = fields["target"]
        self._sampled.add(target)
        if not self.per_process:
            return
        key = (target, fields["pid"], fields["started"])
        sizes = {k: v for k, v in fields["portable"].items() if k in PORTABLE_SIZES}
        full = fields.get("full")
        if full is not None:
            sizes.update((k, v) for k, v in full.items() if k in FULL_SIZES)
        process = self.processes.get(key)
        if process is None:
            process = ProcessValues(target, fields["name"], fields["pid"], -1, sizes, 0)
            self.processes[key] = process
            self._by_target.setdefault(target, {})[key] = process
        process.sizes = sizes
        process.tick = self._ticks.get(target, 0)
        self._fit(key, process)

    def _fit(self, key: ProcessKey, process: ProcessValues) -> None:
        """Show the process's series if they fit under the cap; else leave it out whole."""
        wanted = len(process.sizes)
        if wanted == process.series:
            return
        if self.series - process.series + wanted <= self.max_series:
            self.series += wanted - process.series
            process.series = wanted
            if process.slot < 0:
                slots = self._slots.get((process.target, process.name))
                if slots is None:
                    slots = self._slots[(process.target, process.name)] = _Slots()
                process.slot = slots.take()
            return
        self._hide(process)
        if key not in self._ever_left_out:
            self._ever_left_out.add(key)
            self.left_out += 1
            self.counters["left_out"] = self.left_out

    def _exit(self, fields: Mapping[str, Any]) -> None:
        key = (fields.get("target", ""), fields.get("pid", 0), fields.get("started", ""))
        if key in self.processes:
            self._forget(key)

    def _forget(self, key: ProcessKey) -> None:
        process = self.processes.pop(key)
        del self._by_target[process.target][key]
        self._hide(process)
        self._ever_left_out.discard(key)

    def _hide(self, process: ProcessValues) -> None:
        """No series for the process any more; its slot is free for the next one."""
        self.series -= process.series
        process.series = 0
        if process.slot >= 0:
            self._slots[(process.target, process.name)].give_back(process.slot)
            process.slot = -1

    def _error(self, fields: Mapping[str, Any]) -> None:
        error = fields.get("error")
        if isinstance(error, Mapping):
            key = (str(fields.get("target", "")), str(error.get("kind", "")))
            self.process_errors[key] = self.process_errors.get(key, 0) + 1

    def _agent(self, fields: Mapping[str, Any]) -> None:
        self.agent = fields["agent"]
        self.agent_ts = fields["ts"]

    _HANDLERS: Mapping[str, Callable[[LatestValues, Mapping[str, Any]], None]] = {
        "totals": _totals, "sample": _sample, "exit": _exit, "error": _error, "agent": _agent,
    }

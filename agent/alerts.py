"""Alert rules: a processor that says when a process's memory crosses a line or keeps growing.

Per target, optional rules (``[[targets.alerts]]``), evaluated per process on every sample:

- ``rss_above = "2GB"``: holds while the process's rss is above the size;
- ``rss_above_limit = "90%"``: holds while the process's rss is above that share of its cgroup's
  limit — the lowest ``memory.max`` of its memory cgroup and their ancestors (``effective_max``
  in ``cgroup`` records, read this tick before its samples). Never holds for a process whose
  cgroup has no limit, or whose backend reads no cgroups (it resolves if the limit goes away);
- ``grows_above = "50MB/h"`` with ``over = "30m"``: holds while the process's rss grows faster than
  the rate, measured as a robust slope (Theil-Sen: the median of the slopes between every pair
  of points) over the last ``over`` of samples — in each half of the window as well as over the
  whole: growth must be steady. No verdict before a process has been watched for a whole window
  (the warm-up: a process filling its caches at start is not a leak), and a process that
  allocates one block and then stays flat never fires (the step lies in one half at most, and
  the other half is flat).

An ``alert`` record is made when a rule starts to hold (``state: "firing"``) and when it stops
(``"resolved"``) — never per tick — with the numbers that made it change: the rss, and for a
growth rule the slope in bytes per hour and the window. A process that exits while firing gets
no ``resolved`` (its ``exit`` record says it is gone). Every sink gets the records; the
text format reads ``api 1234 python alert firing: rss grows 61.2MiB/h > 50MB/h over 30m``.

Cost: a growth rule keeps at most :data:`POINTS` points per process (one kept every
``over / POINTS``), and its slope is computed only when a point is kept: O(POINTS²) then, nothing
on the ticks in between.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from memagent.contracts import MemoryCgroup
from memagent.errors import ConfigError
from memagent.options import Options, parse_duration, parse_size
from memagent.records import Draft, RecordMaker

#: Points a growth window keeps per process (Theil-Sen over 48 points is 1,128 slopes).
POINTS = 48
_MAX_CGROUPS = 100_000  # cgroup limits kept for rss_above_limit (each tick's records refresh them)
_RATE = re.compile(r"^\s*([^/]+?)\s*/\s*(ms|s|m|h|d)\s*$")


@dataclass(frozen=True)
class AlertRule:
    """One ``[[targets.alerts]]`` table. Exactly one of ``rss_above``, ``rss_above_limit``
    (a fraction of the cgroup limit) or ``grows_above``."""

    text: str  # as written, for the records: 'rss > 2GB', 'rss grows > 50MB/h over 30m'
    rss_above: int | None = None
    rss_above_limit: float | None = None
    grows_above: float | None = None  # bytes per second
    over: float = 1800.0


def parse_rate(value: object, key: str) -> float:
    """Bytes per second from ``"50MB/h"`` (a size, a slash, a time unit: ms, s, m, h, d)."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(key, f'must be a growth rate like "50MB/h" or "1MiB/s", got {value!r}')
    return parse_size(match.group(1), key) / parse_duration(f"1{match.group(2)}", key)


def parse_share(value: object, key: str) -> float:
    """A fraction in (0, 1] from ``"90%"`` (a percentage above 0, at most 100)."""
    text = value.strip() if isinstance(value, str) else ""
    try:
        percent = float(text[:-1]) if text.endswith("%") else math.nan
    except ValueError:
        percent = math.nan
    if not 0 < percent <= 100:  # NaN fails too
        raise ConfigError(key, f'must be a percentage of the cgroup limit like "90%", got {value!r}')
    return percent / 100


def parse_rules(raw: Any, key: str) -> tuple[AlertRule, ...]:
    """``targets[N].alerts`` → rules; ConfigError naming the dotted key for anything wrong."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError(key, "must be an array of tables ([[targets.alerts]])")
    rules = []
    for number, item in enumerate(raw, start=1):
        opts = Options(item, f"{key}[{number}]")
        above = opts.raw("rss_above", None)
        above_limit = opts.raw("rss_above_limit", None)
        grows = opts.raw("grows_above", None)
        over = opts.duration("over", None)
        opts.finish()
        if [above, above_limit, grows].count(None) != 2:
            raise ConfigError(opts.path, "needs exactly one of rss_above, rss_above_limit or grows_above")
        if over is not None and grows is None:
            raise ConfigError(opts.key("over"), "goes with grows_above only")
        if above is not None:
            rules.append(AlertRule(text=f"rss > {above}", rss_above=parse_size(above, opts.key("rss_above"))))
        elif above_limit is not None:
            share = parse_share(above_limit, opts.key("rss_above_limit"))
            rules.append(AlertRule(text=f"rss > {above_limit} of cgroup limit", rss_above_limit=share))
        else:
            window = over if over is not None else 1800.0
            rules.append(AlertRule(text=f"rss grows > {grows} over {_human_duration(window)}",
                                   grows_above=parse_rate(grows, opts.key("grows_above")), over=window))
    return tuple(rules)


def _human_duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def theil_sen(points: Sequence[tuple[float, int]]) -> float:
    """The median of the slopes between every pair of points with distinct times (units: the
    points' y per x); 0.0 for fewer than two."""
    slopes = [(y2 - y1) / (t2 - t1) for i, (t1, y1) in enumerate(points)
              for t2, y2 in points[i + 1:] if t2 != t1]
    return statistics.median(slopes) if slopes else 0.0


@dataclass
class _Track:
    """One process under one growth rule: kept points and whether the rule holds."""

    first: float
    points: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=POINTS + 1))
    firing: bool = False


class AlertProcessor:
    """The pipeline processor behind ``[[targets.alerts]]`` (see the module docstring)."""

    name = "alerts"

    def __init__(self, maker: RecordMaker, rules: dict[str, tuple[AlertRule, ...]]) -> None:
        self.maker = maker
        self.rules = {target: tuple(r) for target, r in rules.items() if r}
        self._firing: set[tuple[str, int, float, int]] = set()  # (target, pid, started, rule index)
        self._tracks: dict[tuple[str, int, float, int], _Track] = {}
        # rss_above_limit: each cgroup's effective limit, from this tick's cgroup records
        self._wants_limits = any(r.rss_above_limit is not None for rs in self.rules.values() for r in rs)
        self._limits: dict[MemoryCgroup, int | None] = {}

    def process(self, chunk: list[Draft]) -> list[Draft]:
        """Evaluates every rule on each sample; appends an ``alert`` draft when one changes."""
        made: list[Draft] = []
        for draft in chunk:
            if draft.type == "cgroup":
                if self._wants_limits and draft.memory_cgroup is not None:
                    if len(self._limits) > _MAX_CGROUPS:
                        self._limits.clear()  # bounded; this tick's records refill it
                    self._limits[draft.memory_cgroup] = draft.fields.get("effective_max")
                continue
            rules = self.rules.get(draft.target or "")
            if rules is None:
                continue
            if draft.type == "exit":
                self._forget(draft)
            elif draft.type == "sample":
                for index, rule in enumerate(rules):
                    made.extend(self._evaluate(draft, index, rule))
        return chunk + made if made else chunk

    def end_tick(self, ts: str, targets: Sequence[str]) -> list[Draft]:
        return []

    def _evaluate(self, draft: Draft, index: int, rule: AlertRule) -> list[Draft]:
        info, reading = draft.info, draft.reading  # set on every sample: read without making fields
        assert info is not None and reading is not None and draft.target is not None
        rss = reading.portable["rss"]
        key = (draft.target, info.pid, info.started, index)
        details: dict[str, Any] = {"rss": rss}
        if rule.rss_above is not None:
            holds = rss > rule.rss_above
            details["threshold"] = rule.rss_above
        elif rule.rss_above_limit is not None:
            limit = self._limits.get(draft.memory_cgroup) if draft.memory_cgroup is not None else None
            threshold = int(limit * rule.rss_above_limit) if limit is not None else None
            holds = threshold is not None and rss > threshold
            if limit is not None:
                details.update(threshold=threshold, limit=limit)
        else:
            verdict = self._growth(key, rule, draft.ts, rss)
            if verdict is None:
                return []
            holds, slope = verdict
            details.update(growth_per_hour=round(slope * 3600), window_s=rule.over)
        firing = key in self._firing
        if holds == firing:
            return []
        if holds:
            self._firing.add(key)
        else:
            self._firing.discard(key)
        fields = draft.fields
        alert = {**{k: fields[k] for k in ("target", "pid", "ppid", "name", "started", "os", "backend")},
                 "rule": rule.text, "state": "firing" if holds else "resolved", **details}
        return [self.maker.derived("alert", alert, fields["ts"], target=draft.target, pid=draft.pid)]

    def _growth(self, key: tuple[str, int, float, int], rule: AlertRule, ts: str,
                rss: int) -> tuple[bool, float] | None:
        """(holds, slope in bytes/s) when a point is kept and the window is full, else None."""
        now = _epoch(ts)
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track(first=now)
        step = rule.over / POINTS
        if track.points and now - track.points[-1][0] < step:
            return None  # between two kept points: nothing new to say
        track.points.append((now, rss))
        while track.points and track.points[0][0] < now - rule.over:
            track.points.popleft()
        if now - track.first < rule.over:
            return None  # warm-up: not watched for a whole window yet
        points = list(track.points)
        half = len(points) // 2
        slope = theil_sen(points)
        steady = min(slope, theil_sen(points[:half + 1]), theil_sen(points[half:]))
        assert rule.grows_above is not None
        return steady > rule.grows_above, slope

    def _forget(self, draft: Draft) -> None:
        fields = draft.fields
        for key in [k for k in self._tracks if k[1] == fields["pid"] and k[0] == fields["target"]]:
            del self._tracks[key]
        self._firing = {k for k in self._firing if not (k[1] == fields["pid"] and k[0] == fields["target"])}


def _epoch(ts: str) -> float:
    """Seconds since the epoch of a record's ``ts`` (``2026-11-25T05:00:00.123456Z``)."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()

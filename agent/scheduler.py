"""The sampling loop: who is watched (rescans), when to sample (aligned ticks), what to emit.

Guarantees:

- Ticks fall on multiples of the target's interval on the wall clock (``interval = "1s"`` samples
  at every whole second), without drift, within a fraction of a millisecond of the slot when the
  loop is free (see :data:`WAKE_EARLY`). A tick that cannot start within half an interval of its
  slot — because the previous one overran or the loop was busy — is skipped and counted
  (``ticks_skipped``), never run late in a burst.
- Sampling yields to the event loop every :data:`~memagent.contracts.SAMPLE_CHUNK` processes and
  process listing runs in a worker thread, so the loop is never blocked for long.
- Targets with different intervals tick independently: a 10 ms target's tick runs between the
  chunks of a long all-process tick instead of waiting for it. Only a rescan's change of
  membership is exclusive (it waits for ticks in progress, and new ticks wait for it).
- A process emits ``start`` when a target first matches it, ``exit`` when it is gone (seen by a
  sample or a rescan), and at most one ``error`` per (process, kind) — never one per tick. A
  process that has exited never starts again: a listing taken before a sample saw it gone, and
  applied after, does not bring it back (identities are (pid, start time), so it cannot
  legitimately reappear).
- A backend failure (a bug, not a process's trouble) is logged once per episode of each
  operation (listing, sampling) and counted; the agent keeps running. A backend that returns
  fewer or more results than processes asked for is such a failure: nothing is silently dropped.

Not guaranteed: a process that lives shorter than the rescan period may never be seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from memagent.cgroups import CgroupGroup, group_by_cgroup, publish_cgroups
from memagent.config import TargetConfig
from memagent.contracts import (
    SAMPLE_CHUNK,
    Backend,
    CgroupReading,
    Describing,
    ExitExplaining,
    Failure,
    Gone,
    Identity,
    MemoryCgroup,
    ProcessInfo,
    Reading,
    SampleResult,
)
from memagent.pipeline import Pipeline, Processor
from memagent.records import Draft, iso_utc
from memagent.targets import Selector, described_where_needed
from memagent.volume import full_now, largest, limits_volume, merged, split_full

log = logging.getLogger(__name__)

#: How early a ticker's timer fires before its slot (at most a fifth of its interval); the rest
#: is waited in ``time.sleep``. asyncio's timers fire up to a millisecond late (epoll's timeout
#: is whole milliseconds, rounded up) and then wait for whatever holds the loop (a chunk of
#: another target's tick: under a millisecond); waking this early and sleeping the last stretch
#: puts the tick within a fraction of a millisecond of its slot, for the cost of holding the loop
#: that long (never more than this, once per tick).
WAKE_EARLY = 0.002


@dataclass
class Watch:
    """One target's live state."""

    selector: Selector
    members: dict[Identity, ProcessInfo] = field(default_factory=dict)
    reported: dict[Identity, set[str]] = field(default_factory=dict)
    empty_rescans: int = 0  # consecutive rescans that found no process for it
    ticks: int = 0  # ticks of this target (full_every counts them)
    unsampled: int = 0  # matched at the last rescan but left out by top / min_rss
    last_rss: dict[Identity, int] = field(default_factory=dict)  # only with full_max_rss

    @property
    def name(self) -> str:
        return self.selector.config.name


class Membership:
    """Who may touch target membership: any number of ticks read it at once (each between its
    awaits); a rescan changes it alone, after the ticks in progress, and ticks that start
    meanwhile wait for it (so a rescan is never starved by a fast ticker)."""

    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            async with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writing)
            self._writing = True  # from now on new readers wait
            await self._changed.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            async with self._changed:
                self._writing = False
                self._changed.notify_all()


@dataclass
class Counters:
    ticks: int = 0
    ticks_skipped: int = 0
    rescans: int = 0
    backend_failures: int = 0
    full_skipped: int = 0  # full reads skipped by full_max_rss


class Scheduler:
    """Drives one backend for a set of targets, publishing drafts to the pipeline a chunk at a
    time (a rescan's start/exit records; each backend call's samples), then ending the tick."""

    def __init__(self, backend: Backend, selectors: Sequence[Selector], pipeline: Pipeline) -> None:
        self.backend = backend
        self.watches = [Watch(selector) for selector in selectors]
        self.pipeline = pipeline
        self.maker = pipeline.maker
        self.counters = Counters()
        self._holders: dict[Identity, int] = {}
        self._membership = Membership()
        self._failing: set[str] = set()  # backend operations in a failure episode
        self._listings_begun = 0
        # identity -> how many listings had begun when a sample saw it gone; a listing that
        # began no later than that may still show it (see rescan)
        self._gone: dict[Identity, int] = {}
        self._last_listing: list[ProcessInfo] | None = None  # the listing the last rescan resolved
        self._retargeted = False  # selectors changed since that rescan
        self._member_changes = 0  # members added or released, ever: when to group cgroups anew
        # per ticker (its targets' names): the member changes it was grouped at, and the groups
        self._grouped: dict[tuple[str, ...], tuple[int, dict[MemoryCgroup, CgroupGroup]]] = {}
        self._listing = threading.Lock()

    @property
    def watched(self) -> int:
        """Distinct processes being sampled."""
        return len(self._holders)

    def _hold(self, identity: Identity) -> None:
        self._holders[identity] = self._holders.get(identity, 0) + 1
        self._member_changes += 1

    def _cgroup_groups(self, watches: Sequence[Watch]) -> dict[MemoryCgroup, CgroupGroup]:
        """The cgroups of ``watches``' members, grouped anew only when members changed."""
        names = tuple(watch.name for watch in watches)
        kept = self._grouped.get(names)
        if kept is None or kept[0] != self._member_changes:
            if len(self._grouped) > 64:  # bounded: reloads renaming targets again and again
                self._grouped.clear()
            groups = group_by_cgroup([(watch.name, watch.members) for watch in watches])
            kept = self._grouped[names] = (self._member_changes, groups)
        return kept[1]

    def _release(self, watch: Watch, identity: Identity) -> None:
        self._member_changes += 1
        watch.members.pop(identity, None)
        watch.reported.pop(identity, None)
        watch.last_rss.pop(identity, None)
        left = self._holders.get(identity, 0) - 1
        if left > 0:
            self._holders[identity] = left
            return
        self._holders.pop(identity, None)
        self._forget(identity)

    def _forget(self, identity: Identity) -> None:
        try:
            self.backend.forget(identity)
        except Exception as exc:  # noqa: BLE001 - releasing one process must not stop the agent
            log.debug("backend forget(%s) failed: %s", identity, exc)

    def _backend_trouble(self, what: str, exc: Exception) -> None:
        self.counters.backend_failures += 1
        if what not in self._failing:
            self._failing.add(what)
            log.error("backend %s: %s failed: %s: %s (counted; the agent keeps running)",
                      self.backend.name, what, type(exc).__name__, exc)

    def _backend_fine(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info("backend %s: %s works again", self.backend.name, what)

    def _list(self) -> list[ProcessInfo]:
        """Blocking: re-read pidfiles, list processes, describe those a target may watch (a
        :class:`~memagent.contracts.Describing` backend's). Runs in a worker thread."""
        with self._listing:  # a reload's rescan and the periodic one: never two listings at once
            selectors = [watch.selector for watch in self.watches]
            for selector in selectors:
                selector.refresh()
            processes = self.backend.list_processes()
            if isinstance(self.backend, Describing):
                processes = described_where_needed(processes, selectors, self.backend.describe)
            return processes

    async def rescan(self) -> None:
        """List processes (in a thread) and update every target's members."""
        self._listings_begun += 1
        listing = self._listings_begun
        try:
            processes = await asyncio.to_thread(self._list)
        except Exception as exc:  # noqa: BLE001 - see _backend_trouble
            self._backend_trouble("listing processes", exc)
            return
        self._backend_fine("listing processes")
        async with self._membership.changing():
            # seen gone by a sample after this listing began: the listing is stale for them.
            # Gone before it began: no listing from now on can show them again, forget them.
            stale = {i for i, begun in self._gone.items() if begun >= listing}
            self._gone = {i: self._gone[i] for i in stale}
            # the very listing resolved last time (a backend hands it back while nothing
            # changed), the same selectors, nothing stale: the same members, unless a pidfile
            # moved or the rss ranking of top / min_rss did
            unchanged = processes is self._last_listing and not stale and not self._retargeted
            self._last_listing, self._retargeted = processes, False
            alive: set[Identity] | None = None
            self.counters.rescans += 1
            ts = iso_utc(time.time())
            drafts: list[Draft] = []
            for watch in self.watches:
                config = watch.selector.config
                if unchanged and config.pidfile is None and not limits_volume(config):
                    self._note_matches(watch)
                    continue
                if alive is None:
                    alive = {p.identity for p in processes} - stale
                matched = watch.selector.resolve(p for p in processes if p.identity in alive)
                # not described: matched by selectors a reload brought after the listing began;
                # the next listing describes it, and it starts then, whole
                matched = {i: p for i, p in matched.items() if p.described or i in watch.members}
                if limits_volume(config):
                    matched = await self._largest(watch, matched)
                for identity in [i for i in watch.members if i not in matched]:
                    info = watch.members[identity]
                    gone = identity not in alive
                    drafts.append(self.maker.exit(watch.name, info, ts,
                                                  self._exit_reason(info) if gone else "unwatched"))
                    self._release(watch, identity)
                for identity, info in matched.items():
                    if identity not in watch.members:
                        watch.members[identity] = info
                        self._hold(identity)
                        drafts.append(self.maker.start(watch.name, info, ts))
                self._note_matches(watch)
            await self.pipeline.publish(drafts)

    async def _largest(self, watch: Watch,
                       matched: dict[Identity, ProcessInfo]) -> dict[Identity, ProcessInfo]:
        """``top`` / ``min_rss``: the members to be; the rest counted and their fds released."""
        try:
            chosen = await largest(self.backend, matched, watch.selector.config)
        except Exception as exc:  # noqa: BLE001 - see _backend_trouble; keep the members as they are
            self._backend_trouble("sampling", exc)
            return {i: matched[i] for i in watch.members if i in matched}
        watch.unsampled = len(matched) - len(chosen)
        for identity in matched:
            if identity not in chosen and identity not in self._holders:
                self._forget(identity)
        return chosen

    @property
    def unsampled(self) -> int:
        """Processes matched but left out by ``top`` / ``min_rss`` at the last rescan."""
        return sum(watch.unsampled for watch in self.watches)

    @property
    def unmatched(self) -> int:
        """Targets that matched nothing for at least a whole rescan period (published in
        ``agent`` records as ``targets_unmatched``)."""
        return sum(1 for watch in self.watches if watch.empty_rescans >= 2)

    def _note_matches(self, watch: Watch) -> None:
        """One warning when a target has matched nothing for a whole rescan period (two rescans
        in a row), one line when it matches again; never one per rescan."""
        if watch.members:
            if watch.empty_rescans >= 2:
                log.info("target %s matches %d process(es) again", watch.name, len(watch.members))
            watch.empty_rescans = 0
            return
        watch.empty_rescans += 1
        if watch.empty_rescans == 2:
            log.warning("target %s matches no process (check its selectors); watching for one",
                        watch.name)

    async def sample(self, watches: Sequence[Watch]) -> None:
        """Sample every member of ``watches`` once, publishing each chunk's drafts, then end
        the tick (processors add what they derive from it)."""
        async with self._membership.reading():
            self.counters.ticks += 1
            ts = iso_utc(time.time())
            if isinstance(self.backend, CgroupReading):  # before the samples: see memagent.cgroups
                try:
                    await publish_cgroups(self.backend, self.pipeline, self._cgroup_groups(watches), ts)
                except Exception as exc:  # noqa: BLE001 - see _backend_trouble
                    self._backend_trouble("reading cgroups", exc)
                else:
                    self._backend_fine("reading cgroups")
            for watch in watches:
                config = watch.selector.config
                full = full_now(config, watch.ticks)
                watch.ticks += 1
                identities, infos = list(watch.members), list(watch.members.values())
                for start in range(0, len(identities), SAMPLE_CHUNK):
                    chunk = identities[start:start + SAMPLE_CHUNK]
                    drafts: list[Draft] = []
                    try:
                        results = self._read(watch, chunk, full, ts, drafts)
                    except Exception as exc:  # noqa: BLE001 - see _backend_trouble
                        self._backend_trouble("sampling", exc)
                        continue
                    self._backend_fine("sampling")
                    name, sample = watch.name, self.maker.sample
                    # members change during a tick only by _emit, each for its own process
                    chunk_infos = infos[start:start + SAMPLE_CHUNK]
                    for identity, info, result in zip(chunk, chunk_infos, results, strict=True):
                        if type(result) is Reading and not result.problems:  # the common case, inline
                            drafts.append(sample(name, info, result, ts))
                        else:
                            self._emit(watch, identity, result, ts, drafts)
                    await self.pipeline.publish(drafts)
                    await asyncio.sleep(0)
            await self.pipeline.end_tick(ts, [watch.name for watch in watches])

    def _read(self, watch: Watch, chunk: list[Identity], full: bool, ts: str,
              drafts: list[Draft]) -> list[SampleResult]:
        """The backend's results for ``chunk``, in order; with ``full_max_rss``, the processes
        too large (or not yet measured) are read without full, counted, and noted once each
        (a ``full_skipped`` error draft added to ``drafts``)."""
        config = watch.selector.config
        if full and config.full_max_rss is not None:
            light, heavy = split_full(chunk, config, watch.last_rss)
            results = merged(chunk, [(light, self._checked(light, True)),
                                     (heavy, self._checked(heavy, False))])
            self.counters.full_skipped += len(heavy)
            for identity in heavy:
                info = watch.members.get(identity)
                if info is not None and identity in watch.last_rss:
                    self._report_once(watch, identity, info, "full_skipped",
                                      f"rss above full_max_rss ({config.full_max_rss} bytes): uss/pss/"
                                      "swap not read, as reading smaps would stall the process", ts, drafts)
        else:
            results = self._checked(chunk, full)
        if config.full_max_rss is not None:
            for identity, result in zip(chunk, results, strict=True):
                if type(result) is Reading:
                    watch.last_rss[identity] = result.portable["rss"]
        return results

    def _checked(self, chunk: list[Identity], full: bool) -> list[SampleResult]:
        if not chunk:
            return []
        results = self.backend.sample(chunk, full)
        if len(results) != len(chunk):
            raise ValueError(f"{len(results)} results for {len(chunk)} processes")
        return results

    def _emit(self, watch: Watch, identity: Identity, result: object, ts: str, drafts: list[Draft]) -> None:
        info = watch.members.get(identity)
        if info is None:
            return
        if isinstance(result, Reading):
            for kind, message in result.problems:
                self._report_once(watch, identity, info, kind, message, ts, drafts)
            drafts.append(self.maker.sample(watch.name, info, result, ts))
        elif isinstance(result, Gone):
            self._gone[identity] = self._listings_begun
            drafts.append(self.maker.exit(watch.name, info, ts, self._exit_reason(info)))
            self._release(watch, identity)
        elif isinstance(result, Failure):
            self._report_once(watch, identity, info, result.kind, result.message, ts, drafts)

    def _exit_reason(self, info: ProcessInfo) -> str | None:
        """Why a gone process ended, if the backend can tell (``oom_kill``), else None."""
        if not isinstance(self.backend, ExitExplaining):
            return None
        try:
            return self.backend.exit_reason(info)
        except Exception as exc:  # noqa: BLE001 - see _backend_trouble
            self._backend_trouble("explaining an exit", exc)
            return None

    def _report_once(self, watch: Watch, identity: Identity, info: ProcessInfo, kind: str,
                     message: str, ts: str, drafts: list[Draft]) -> None:
        kinds = watch.reported.setdefault(identity, set())
        if kind not in kinds:
            kinds.add(kind)
            drafts.append(self.maker.error(watch.name, info, kind, message, ts))

    async def retarget(self, targets: Sequence[TargetConfig], processors: Sequence[Processor],
                       change: Callable[[], None] = lambda: None) -> None:
        """Apply a reloaded config's targets (by name: removed ones end their processes with
        ``exit`` reason ``unwatched``; changed ones keep their processes until the next rescan
        says otherwise; added ones start empty) and processors, and ``change()`` whatever else
        must change between two ticks. Waits for ticks in progress; ticks wait for it."""
        async with self._membership.changing():
            ts = iso_utc(time.time())
            current = {watch.name: watch for watch in self.watches}
            wanted = {config.name for config in targets}
            drafts: list[Draft] = []
            for name, watch in current.items():
                if name not in wanted:
                    for identity, info in list(watch.members.items()):
                        drafts.append(self.maker.exit(name, info, ts, "unwatched"))
                        self._release(watch, identity)
            watches = []
            for config in targets:
                kept = current.get(config.name)
                if kept is None:
                    kept = Watch(Selector(config))
                elif kept.selector.config != config:
                    kept.selector = Selector(config)
                watches.append(kept)
            self.watches = watches
            self._retargeted = True
            self.pipeline.processors = list(processors)
            change()
            await self.pipeline.publish(drafts)

    async def tick_forever(self, interval: float, watches: Sequence[Watch], stop: asyncio.Event) -> None:
        """Sample ``watches`` on every aligned slot of ``interval`` until ``stop`` is set."""
        slot = math.floor(time.time() / interval) + 1
        early = min(WAKE_EARLY, interval / 5)
        while not stop.is_set():
            rest = slot * interval - time.time()
            if rest > early:
                try:
                    await asyncio.wait_for(stop.wait(), rest - early)
                    return
                except TimeoutError:
                    if stop.is_set():  # set while the loop was busy: no tick after a stop
                        return
                continue  # read the clock again: the last stretch, if any, is slept below
            if rest > 0:
                time.sleep(rest)  # at most ``early``: see WAKE_EARLY
            late_slot = math.floor(time.time() / interval + 0.5)
            if late_slot > slot:
                self.counters.ticks_skipped += late_slot - slot
                slot = late_slot
                continue
            await self.sample(watches)
            slot += 1

    def groups(self) -> dict[float, list[Watch]]:
        """Watches grouped by interval: one ticker per distinct interval."""
        grouped: dict[float, list[Watch]] = {}
        for watch in self.watches:
            grouped.setdefault(watch.selector.config.interval, []).append(watch)
        return grouped

    async def rescan_forever(self, period: float, stop: asyncio.Event) -> None:
        """Rescan every ``period`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), period)
                return
            except TimeoutError:
                await self.rescan()

"""Scheduler: start/exit/error records once, identities, contiguous seq, aligned ticks."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import memagent.scheduler as scheduler_module
from memagent.config import TargetConfig
from memagent.contracts import ProcessInfo
from memagent.fanout import Fanout, Outlet
from memagent.pipeline import Pipeline
from memagent.records import RecordMaker
from memagent.scheduler import Scheduler
from memagent.targets import Selector
from memagent.testing import FakeBackend, RecordingSink

from cli_helpers import scaled

PORTABLE = {"rss": 8192, "vms": 65536}


def proc(pid: int, started: float = 100.0, ppid: int = 1, name: str = "worker") -> ProcessInfo:
    return ProcessInfo(pid=pid, ppid=ppid, name=name, started=started, cmdline=(name, "--serve"))


def setup(backend: FakeBackend, **target: Any) -> tuple[Scheduler, RecordingSink, Outlet]:
    target.setdefault("all", True)
    config = TargetConfig(name="t", interval=target.pop("interval", 1.0), **target)
    sink = RecordingSink()
    out = Outlet("rec", sink, queue=100_000, when_full="drop_oldest", batch=1000, targets=None)
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={"env": "test"})
    return Scheduler(backend, [Selector(config)],
                          Pipeline(Fanout([out]), maker)), sink, out


async def finish(out: Outlet) -> None:
    await out.drain(time.monotonic() + scaled(5))


async def test_start_then_samples_then_exit(validate_record: Callable[[dict[str, Any]], None]) -> None:
    """A matched process emits start, a sample per tick, and exit when it is gone."""
    backend = FakeBackend([proc(10), proc(11)])
    backend.readings = {10: (PORTABLE, {"shared": 4096}), 11: (PORTABLE, {"shared": 0})}
    scheduler, sink, out = setup(backend)
    await out.start()
    await scheduler.rescan()
    await scheduler.sample(scheduler.watches)
    del backend.readings[11]
    await scheduler.sample(scheduler.watches)
    await scheduler.sample(scheduler.watches)
    await finish(out)
    kinds = [(r.type, r.pid) for r in sink.records]
    assert kinds == [("start", 10), ("start", 11), ("sample", 10), ("sample", 11),
                     ("sample", 10), ("exit", 11), ("sample", 10)]
    assert [r.seq for r in sink.records] == list(range(1, 8))
    for record in sink.records:
        validate_record(dict(record.fields))
    assert backend.forgotten == [(11, 100.0)]


async def test_reused_pid_is_a_new_process() -> None:
    """Same pid, new start time: exit for the old identity, start for the new one."""
    backend = FakeBackend([proc(10, started=100.0)])
    backend.readings = {10: (PORTABLE, {})}
    scheduler, sink, out = setup(backend)
    await out.start()
    await scheduler.rescan()
    backend.processes = [proc(10, started=200.0)]
    await scheduler.rescan()
    await finish(out)
    assert [(r.type, r.fields["started"]) for r in sink.records] == [
        ("start", "1970-01-01T00:01:40.00Z"), ("exit", "1970-01-01T00:01:40.00Z"),
        ("start", "1970-01-01T00:03:20.00Z")]


async def test_access_denied_is_reported_once_not_per_tick() -> None:
    """A process that cannot be read yields one error record, however many ticks pass."""
    backend = FakeBackend([proc(10)])
    backend.denied = {10}
    scheduler, sink, out = setup(backend)
    await out.start()
    await scheduler.rescan()
    for _ in range(5):
        await scheduler.sample(scheduler.watches)
    await finish(out)
    assert [r.type for r in sink.records] == ["start", "error"]
    assert sink.records[1].fields["error"]["kind"] == "access_denied"


async def test_children_selector_follows_descendants() -> None:
    """children=true watches the whole subtree of a matched process."""
    backend = FakeBackend([proc(10, name="api"), proc(11, ppid=10), proc(12, ppid=11), proc(13, ppid=1)])
    scheduler, sink, out = setup(backend, all=False, comm="api", children=True)
    await scheduler.rescan()
    assert sorted(pid for pid, _ in scheduler.watches[0].members) == [10, 11, 12]


async def test_backend_crash_is_counted_not_fatal() -> None:
    """An exception from the backend is counted and logged; the agent keeps ticking."""
    backend = FakeBackend([proc(10)])

    def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    backend.sample = broken  # type: ignore[method-assign]
    scheduler, sink, out = setup(backend)
    await scheduler.rescan()
    await scheduler.sample(scheduler.watches)
    await scheduler.sample(scheduler.watches)
    assert scheduler.counters.backend_failures == 2


class WallClock:
    """Stands in for the ``time`` module in memagent.scheduler: the real clock, remembering its
    last reading. Read from inside sample(), that is the reading tick_forever chose the slot by."""

    def __init__(self) -> None:
        self.last = 0.0

    def time(self) -> float:
        self.last = time.time()
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_ticks_are_aligned_and_overruns_are_skipped_not_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ticks start on interval multiples, never before; a slow tick makes later slots skip (counted),
    never run late in a burst, never two in one slot. Checked on the scheduler's own readings of
    the clock, so a loaded machine (which only delays) cannot fail it."""
    interval = 0.05
    backend = FakeBackend([proc(10)])
    backend.readings = {10: (PORTABLE, {})}
    scheduler, sink, out = setup(backend, interval=interval)
    await scheduler.rescan()
    clock = WallClock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    decided: list[float] = []
    real_sample = scheduler.sample
    stop = asyncio.Event()

    async def slow_sample(watches: Any) -> None:
        decided.append(clock.last)
        await real_sample(watches)
        if len(decided) == 3:
            time.sleep(3.2 * interval)  # block like an overloaded host: the next 2+ slots cannot start
        if len(decided) == 6:
            stop.set()  # no further slot is looked at: every skip so far lies between two samples

    scheduler.sample = slow_sample  # type: ignore[method-assign]
    await asyncio.wait_for(scheduler.tick_forever(interval, scheduler.watches, stop), scaled(20))
    slots = [math.floor(t / interval + 0.5) for t in decided]
    early = [t - s * interval for t, s in zip(decided, slots, strict=True) if t < s * interval]
    assert early == [], "a tick started before its slot"  # the last stretch is slept on the same clock
    assert all(b > a for a, b in itertools.pairwise(slots)), slots  # never two in one slot
    assert slots[3] - slots[2] >= 3, slots  # the overrun's slots were skipped, not run late ...
    assert scheduler.counters.ticks_skipped == sum(b - a - 1 for a, b in itertools.pairwise(slots))
    assert scheduler.counters.ticks == 6  # ... and counted



class SlowListing(FakeBackend):
    """A backend whose listing waits (in its worker thread) until the test lets it finish, so
    a sample can run in between, as it does under churn."""

    def __init__(self, processes: list[ProcessInfo]) -> None:
        super().__init__(processes)
        self.listing_started = threading.Event()
        self.finish_listing = threading.Event()
        self.hold = False

    def list_processes(self) -> list[ProcessInfo]:
        snapshot = list(self.processes)
        if self.hold:
            self.listing_started.set()
            assert self.finish_listing.wait(10)
        return snapshot


async def test_exited_process_never_starts_again_from_a_stale_listing() -> None:
    """A listing taken while the process lived, applied after a sample saw it gone, does not
    bring it back: start, exit, and nothing more for that identity."""
    worker = ProcessInfo(pid=10, ppid=1, name="w", started=100.0)
    backend = SlowListing([worker])
    backend.readings = {10: ({"rss": 1, "vms": 1}, {})}
    sink = RecordingSink()
    out = Outlet("rec", sink, queue=1000, when_full="drop_oldest", batch=100, targets=None)
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    scheduler = Scheduler(backend, [Selector(TargetConfig(name="t", interval=1.0, all=True))],
                          Pipeline(Fanout([out]), maker))
    await out.start()
    await scheduler.rescan()
    backend.hold = True
    rescan = asyncio.create_task(scheduler.rescan())  # lists: the worker is still there
    await asyncio.to_thread(backend.listing_started.wait, 10)
    del backend.readings[10]  # the worker exits and is reaped
    await scheduler.sample(scheduler.watches)  # sees it gone: exit
    backend.finish_listing.set()
    await rescan  # applies the stale listing
    backend.hold = False
    backend.processes = []
    await scheduler.rescan()
    await scheduler.sample(scheduler.watches)
    await out.drain(time.monotonic() + 5)
    assert [(r.type, r.pid) for r in sink.records] == [("start", 10), ("exit", 10)]


class FailingListing(FakeBackend):
    def list_processes(self) -> list[ProcessInfo]:
        raise OSError("procfs unmounted")


async def test_listing_failure_is_logged_once_even_while_sampling_works(
        caplog: pytest.LogCaptureFixture) -> None:
    """Listing fails on every rescan while sampling keeps working: one error line, all counted."""
    backend = FailingListing([])
    sink = RecordingSink()
    out = Outlet("rec", sink, queue=1000, when_full="drop_oldest", batch=100, targets=None)
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    scheduler = Scheduler(backend, [Selector(TargetConfig(name="t", interval=1.0, all=True))],
                          Pipeline(Fanout([out]), maker))
    with caplog.at_level(logging.ERROR, logger="memagent.scheduler"):
        for _ in range(4):
            await scheduler.rescan()
            await scheduler.sample(scheduler.watches)
    assert len([r for r in caplog.records if "listing processes failed" in r.getMessage()]) == 1
    assert scheduler.counters.backend_failures == 4


class ShortChanging(FakeBackend):
    def sample(self, processes: Any, full: bool) -> Any:
        return super().sample(processes, full)[:-1]


async def test_backend_returning_too_few_results_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    """Two processes asked, one result returned: counted and logged, not silently dropped."""
    backend = ShortChanging([ProcessInfo(pid=10, ppid=1, name="a", started=1.0),
                             ProcessInfo(pid=11, ppid=1, name="b", started=1.0)])
    backend.readings = {10: ({"rss": 1, "vms": 1}, {}), 11: ({"rss": 1, "vms": 1}, {})}
    out = Outlet("rec", RecordingSink(), queue=1000, when_full="drop_oldest", batch=100, targets=None)
    scheduler = Scheduler(backend, [Selector(TargetConfig(name="t", interval=1.0, all=True))],
                          Pipeline(Fanout([out]), RecordMaker(host="h", os_name="linux", backend="fake",
                                                              tags={})))
    await scheduler.rescan()
    with caplog.at_level(logging.ERROR, logger="memagent.scheduler"):
        await scheduler.sample(scheduler.watches)
    assert scheduler.counters.backend_failures == 1
    assert "1 results for 2 processes" in caplog.text


async def test_a_fast_target_ticks_between_the_chunks_of_a_slow_one() -> None:
    """A 10 ms target does not wait for a 1 s target's long tick (600 processes, 5 chunks): its
    whole tick runs while the long one is between chunks (before: one lock made it wait)."""
    from memagent.contracts import SAMPLE_CHUNK

    many = [proc(1000 + i) for i in range(600)]
    backend = FakeBackend([*many, proc(10, name="fast")])
    backend.readings = {p.pid: (PORTABLE, {"shared": 0}) for p in backend.processes}
    sink = RecordingSink()
    out = Outlet("rec", sink, queue=100_000, when_full="drop_oldest", batch=100_000, targets=None)
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    slow = Selector(TargetConfig(name="slow", interval=1.0, all=True))
    fast = Selector(TargetConfig(name="fast", interval=0.01, pid=10))
    scheduler = Scheduler(backend, [slow, fast], Pipeline(Fanout([out]), maker))
    await out.start()
    await scheduler.rescan()
    slow_watch, fast_watch = scheduler.watches
    long_tick = asyncio.create_task(scheduler.sample([slow_watch]))
    await asyncio.sleep(0)  # the long tick samples its first chunk and yields
    await scheduler.sample([fast_watch])
    assert not long_tick.done()
    await long_tick
    await out.drain(time.monotonic() + 5)
    order = [r.target for r in sink.records if r.type == "sample"]
    assert order.index("fast") < len(order) - SAMPLE_CHUNK  # before the long tick's last chunk


async def test_a_rescan_waits_for_ticks_in_progress() -> None:
    """A rescan that drops a process waits until a tick in progress is done with it: that tick
    still samples it (a rescan in between would have released it: no sample), then the exit,
    then the backend forgets it (a guard for the shared/exclusive membership lock)."""
    backend = FakeBackend([proc(1000 + i) for i in range(300)])
    backend.readings = {p.pid: (PORTABLE, {"shared": 0}) for p in backend.processes}
    scheduler, sink, out = setup(backend)
    await out.start()
    await scheduler.rescan()
    tick = asyncio.create_task(scheduler.sample(scheduler.watches))
    await asyncio.sleep(0)  # first chunk done, tick in progress
    gone = backend.processes.pop()  # the next listing misses it; the tick in flight still reads it
    rescan = asyncio.create_task(scheduler.rescan())
    await tick
    await rescan
    await finish(out)
    kinds = [(r.type, r.pid) for r in sink.records if r.pid == gone.pid]
    assert kinds == [("start", gone.pid), ("sample", gone.pid), ("exit", gone.pid)]
    assert backend.forgotten == [gone.identity]


async def test_a_target_matching_nothing_is_warned_once_and_once_again_when_it_matches(
        caplog: pytest.LogCaptureFixture) -> None:
    """No process for a whole rescan period: one warning (not one per rescan) and counted;
    when a process appears: one line, and no longer counted."""
    backend = FakeBackend([])
    scheduler, _, _ = setup(backend, all=False, comm="worker")
    with caplog.at_level(logging.INFO, logger="memagent.scheduler"):
        for _ in range(5):
            await scheduler.rescan()
        assert scheduler.unmatched == 1
        backend.processes = [proc(10)]
        backend.readings = {10: (PORTABLE, {"shared": 0})}
        await scheduler.rescan()
        await scheduler.rescan()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "matches no process" in m]) == 1
    assert len([m for m in messages if "matches 1 process(es) again" in m]) == 1
    assert scheduler.unmatched == 0


class SameListing(FakeBackend):
    """Hands back the very list it returned last time until the test changes ``processes`` (as
    the linux backend does while nothing changed), and counts how often a selector resolves."""

    def __init__(self, processes: list[ProcessInfo]) -> None:
        super().__init__(processes)
        self._handed: list[ProcessInfo] | None = None

    def list_processes(self) -> list[ProcessInfo]:
        if self._handed is None or self._handed != self.processes:
            self._handed = list(self.processes)
        return self._handed


async def test_an_unchanged_listing_is_not_matched_again_until_selectors_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same listing object and the same selectors: members stay, no resolve. A new process,
    a reload and a pidfile target are resolved again."""
    resolved: list[str] = []
    real_resolve = Selector.resolve

    def counting(self: Selector, processes: Any) -> Any:
        resolved.append(self.config.name)
        return real_resolve(self, processes)

    monkeypatch.setattr(Selector, "resolve", counting)
    backend = SameListing([proc(10), proc(11)])
    scheduler, sink, out = setup(backend)
    await out.start()
    await scheduler.rescan()
    await scheduler.rescan()
    await scheduler.rescan()
    assert resolved == ["t"] and set(scheduler.watches[0].members) == {(10, 100.0), (11, 100.0)}
    backend.processes = [proc(10)]  # 11 exited: a new listing
    await scheduler.rescan()
    assert resolved == ["t", "t"] and set(scheduler.watches[0].members) == {(10, 100.0)}
    await scheduler.retarget([TargetConfig(name="t", interval=1.0, all=True),
                              TargetConfig(name="u", interval=1.0, pid=10)], [])
    await scheduler.rescan()
    assert resolved == ["t", "t", "t", "u"]  # the same listing, new selectors
    await scheduler.rescan()
    assert resolved == ["t", "t", "t", "u"]
    await finish(out)
    kinds = [(r.type, r.target, r.pid) for r in sink.records]
    assert kinds == [("start", "t", 10), ("start", "t", 11), ("exit", "t", 11), ("start", "u", 10)]


async def test_a_pidfile_target_follows_its_file_over_an_unchanged_listing(tmp_path: Any) -> None:
    pidfile = tmp_path / "daemon.pid"
    pidfile.write_text("10\n")
    backend = SameListing([proc(10), proc(11)])
    scheduler, sink, out = setup(backend, all=False, pidfile=str(pidfile))
    await scheduler.rescan()
    assert set(scheduler.watches[0].members) == {(10, 100.0)}
    pidfile.write_text("11\n")  # the daemon's pid changed, the process listing did not
    await scheduler.rescan()
    assert set(scheduler.watches[0].members) == {(11, 100.0)}

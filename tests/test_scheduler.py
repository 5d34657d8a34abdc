"""Scheduler: start/exit/error records once, identities, contiguous seq, aligned ticks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from memagent.config import TargetConfig
from memagent.contracts import ProcessInfo
from memagent.fanout import Fanout, Outlet
from memagent.records import RecordMaker
from memagent.scheduler import Scheduler
from memagent.targets import Selector
from memagent.testing import FakeBackend, RecordingSink

PORTABLE = {"rss": 8192, "vms": 65536}


def proc(pid: int, started: float = 100.0, ppid: int = 1, name: str = "worker") -> ProcessInfo:
    return ProcessInfo(pid=pid, ppid=ppid, name=name, started=started, cmdline=(name, "--serve"))


def setup(backend: FakeBackend, **target: Any) -> tuple[Scheduler, RecordingSink, Outlet]:
    target.setdefault("all", True)
    config = TargetConfig(name="t", interval=target.pop("interval", 1.0), **target)
    sink = RecordingSink()
    out = Outlet("rec", sink, queue=100_000, when_full="drop_oldest", batch=1000, targets=None)
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={"env": "test"})
    return Scheduler(backend, [Selector(config)], maker, Fanout([out])), sink, out


async def finish(out: Outlet) -> None:
    await out.drain(time.monotonic() + 5)


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


async def test_ticks_are_aligned_and_overruns_are_skipped_not_burst() -> None:
    """Ticks start on interval multiples; a slow tick makes later slots skip, never run twice."""
    backend = FakeBackend([proc(10)])
    backend.readings = {10: (PORTABLE, {})}
    scheduler, sink, out = setup(backend, interval=0.05)
    await scheduler.rescan()
    starts: list[float] = []
    real_sample = scheduler.sample

    async def slow_sample(watches: Any) -> None:
        starts.append(time.time())
        await real_sample(watches)
        if len(starts) == 3:
            time.sleep(0.16)  # block like an overloaded host: slots 4-6 cannot start on time

    scheduler.sample = slow_sample  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(scheduler.tick_forever(0.05, scheduler.watches, stop))
    while len(starts) < 6:
        await asyncio.sleep(0.01)
    stop.set()
    await task
    slots = [round(t / 0.05) for t in starts]
    offsets = [t - s * 0.05 for t, s in zip(starts, slots, strict=True)]
    assert all(-0.001 < o < 0.025 for o in offsets), offsets
    assert slots[3] - slots[2] >= 3  # the overrun's slots were skipped ...
    assert scheduler.counters.ticks_skipped == sum(b - a - 1 for a, b in zip(slots, slots[1:], strict=False))
    assert all(b > a for a, b in zip(slots, slots[1:], strict=False))  # never two in one slot

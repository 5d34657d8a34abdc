"""Sampling 1,000 real processes never blocks the event loop for long."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time

import pytest

from memagent.config import TargetConfig
from memagent.fanout import Fanout, Outlet
from memagent.records import RecordMaker
from memagent.registry import build_backend
from memagent.scheduler import Scheduler
from memagent.targets import Selector
from memagent.testing import RecordingSink

COUNT = 1000
MARKER = "3600.424242"  # sleep's argument doubles as a marker no other process has


@pytest.fixture(scope="module")
def thousand_sleepers() -> list[subprocess.Popen[bytes]]:
    children = [subprocess.Popen(["sleep", MARKER]) for _ in range(COUNT)]
    yield children
    for child in children:
        child.kill()
    for child in children:
        child.wait()


async def test_worst_loop_lag_with_1000_processes(thousand_sleepers: list[subprocess.Popen[bytes]]) -> None:
    """Rescans and 5 Hz ticks over 1,000 processes: the loop's worst lag stays small (printed)."""
    backend = build_backend("auto", {})
    target = TargetConfig(name="sleepers", interval=0.2, cmdline=re.compile(f"^sleep {MARKER}$"))
    sink = RecordingSink()
    outlet = Outlet("rec", sink, queue=100_000, when_full="drop_oldest", batch=2000, targets=None)
    scheduler = Scheduler(backend, [Selector(target)],
                          RecordMaker(host="h", os_name="linux", backend=backend.name, tags={}),
                          Fanout([outlet]))
    await outlet.start()
    stop = asyncio.Event()
    worst = 0.0

    async def watch_lag() -> None:
        nonlocal worst
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)

    monitor = asyncio.create_task(watch_lag())
    await asyncio.sleep(0.05)
    tasks = [asyncio.create_task(scheduler.rescan_forever(0.3, stop)),
             asyncio.create_task(scheduler.tick_forever(0.2, scheduler.watches, stop))]
    await scheduler.rescan()
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*tasks, monitor)
    await outlet.drain(time.monotonic() + 10)
    backend.close()
    samples = [r for r in sink.records if r.type == "sample"]
    ticks = scheduler.counters.ticks
    print(f"\n1,000 processes: {ticks} ticks, {len(samples)} samples, "
          f"{scheduler.counters.rescans} rescans, worst loop lag {worst * 1000:.1f} ms")
    assert len(scheduler.watches[0].members) == COUNT
    assert len(samples) >= COUNT * (ticks - 1)
    assert worst < 0.2, f"event loop blocked for {worst * 1000:.0f} ms"

"""Benchmark: the event loop's worst lag while the agent rescans and ticks over many processes.

    python tests/benchmarks/bench_loop_lag.py [N_PROCESSES] [SECONDS]

Spawns N sleeping children, runs the scheduler's rescan loop (every 0.3 s) and 5 Hz ticks over
all of them for SECONDS, while a monitor task measures how late a 1 ms sleep wakes up. Prints
ticks, samples and the worst lag. Figures, not asserts: a loaded machine stretches them. That the
loop is never blocked (listing off the loop, a yield between sample chunks) is asserted by
tests/test_loop_lag.py, by order and counts.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

from memagent.config import TargetConfig
from memagent.fanout import Fanout, Outlet
from memagent.pipeline import Pipeline
from memagent.records import RecordMaker
from memagent.registry import build_backend
from memagent.scheduler import Scheduler
from memagent.targets import Selector
from memagent.testing import RecordingSink

MARKER = f"3600.{os.getpid()}"  # sleep's argument is the marker: unique to this run of the suite


async def measure(count: int, seconds: float) -> None:
    backend = build_backend("auto", {})
    target = TargetConfig(name="sleepers", interval=0.2, cmdline=re.compile(f"^sleep {MARKER}$"))
    sink = RecordingSink()
    outlet = Outlet("rec", sink, queue=1_000_000, when_full="drop_oldest", batch=2000, targets=None)
    scheduler = Scheduler(backend, [Selector(target)],
                          Pipeline(Fanout([outlet]), RecordMaker(host="bench", os_name=backend.os,
                                                                 backend=backend.name, tags={})))
    await outlet.start()
    stop = asyncio.Event()
    lags: list[float] = []

    async def watch_lag() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - before - 0.001)

    monitor = asyncio.create_task(watch_lag())
    await scheduler.rescan()
    tasks = [asyncio.create_task(scheduler.rescan_forever(0.3, stop)),
             asyncio.create_task(scheduler.tick_forever(0.2, scheduler.watches, stop))]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, monitor)
    await outlet.drain(time.monotonic() + 10)
    backend.close()
    samples = sum(1 for r in sink.records if r.type == "sample")
    lags.sort()
    print(f"{len(scheduler.watches[0].members)} processes watched, {scheduler.counters.ticks} ticks "
          f"({scheduler.counters.ticks_skipped} skipped), {samples} samples, "
          f"{scheduler.counters.rescans} rescans in {seconds:g} s")
    print(f"event-loop lag: median {lags[len(lags) // 2] * 1e3:.2f} ms, "
          f"p99 {lags[int(len(lags) * 0.99)] * 1e3:.2f} ms, worst {lags[-1] * 1e3:.1f} ms")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    children = [subprocess.Popen(["sleep", MARKER]) for _ in range(count)]
    try:
        asyncio.run(measure(count, seconds))
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()


if __name__ == "__main__":
    main()

"""Sampling 1,000 real processes never blocks the event loop: the loop runs while processes are
listed, and between every two chunks of a sample. Checked by order and counts, not milliseconds
(the loop's worst lag, a figure, is printed by tests/benchmarks/bench_loop_lag.py)."""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence

import pytest

from memagent.config import TargetConfig
from memagent.contracts import SAMPLE_CHUNK, Backend, Describing, Identity, ProcessInfo, SampleResult
from memagent.fanout import Fanout, Outlet
from memagent.pipeline import Pipeline
from memagent.records import RecordMaker
from memagent.registry import build_backend
from memagent.scheduler import Scheduler
from memagent.targets import Selector
from memagent.testing import RecordingSink

from cli_helpers import scaled, wait_for

COUNT = 1000
MARKER = f"3600.{os.getpid()}"  # sleep's argument is the marker: unique to this run of the suite
TICKS = 3


@pytest.fixture(scope="module")
def thousand_sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    children = [subprocess.Popen(["sleep", MARKER]) for _ in range(COUNT)]
    yield children
    for child in children:
        child.kill()
    for child in children:
        child.wait()


class Witness:
    """The real backend, with what the event loop did around each call on one timeline: ``chunk``
    (a sample() call, made on the loop) and ``beat`` (the heartbeat task ran; repeats collapsed).
    A listing, made off the loop, records whether the heartbeat advanced after it began."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.name = backend.name
        self.os = backend.os
        self.platform_fields = backend.platform_fields
        self.timeline: list[str] = []
        self.beats = 0
        self.listings: list[str] = []

    def beat(self) -> None:
        self.beats += 1
        if self.timeline[-1:] != ["beat"]:
            self.timeline.append("beat")

    def list_processes(self) -> list[ProcessInfo]:
        beats = self.beats
        listed = self.backend.list_processes()
        try:  # were this called on the loop, no beat could come until it returned
            wait_for(lambda: self.beats > beats, timeout=10, interval=0.001)
            self.listings.append("loop ran")
        except AssertionError:
            self.listings.append("loop blocked")
        return listed

    def describe(self, process: ProcessInfo) -> ProcessInfo | None:
        """The linux backend lists cheaply and describes what a target may watch (in the thread)."""
        assert isinstance(self.backend, Describing)
        return self.backend.describe(process)

    def sample(self, processes: Sequence[Identity], full: bool) -> list[SampleResult]:
        self.timeline.append("chunk")
        return self.backend.sample(processes, full)

    def forget(self, identity: Identity) -> None:
        self.backend.forget(identity)

    def close(self) -> None:
        self.backend.close()


async def test_the_loop_runs_during_listing_and_between_sample_chunks(
        thousand_sleepers: list[subprocess.Popen[bytes]]) -> None:
    """Rescans and ticks over 1,000 real processes: listing leaves the loop free (a heartbeat task
    advances meanwhile) and sampling yields after every chunk (a beat between any two chunks)."""
    backend = Witness(build_backend("auto", {}))
    target = TargetConfig(name="sleepers", interval=0.2, cmdline=re.compile(f"^sleep {MARKER}$"))
    sink = RecordingSink()
    outlet = Outlet("rec", sink, queue=100_000, when_full="drop_oldest", batch=2000, targets=None)
    scheduler = Scheduler(backend, [Selector(target)],
                          Pipeline(Fanout([outlet]), RecordMaker(host="h", os_name="linux",
                                                                 backend=backend.name, tags={})))
    await outlet.start()
    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            backend.beat()
            await asyncio.sleep(0)  # ready again at once: it runs whenever anything else yields

    beating = asyncio.create_task(heartbeat())
    await scheduler.rescan()
    for _ in range(TICKS):
        await scheduler.sample(scheduler.watches)
    await scheduler.rescan()
    stop.set()
    await beating
    await outlet.drain(time.monotonic() + scaled(10))
    backend.close()
    samples = [r for r in sink.records if r.type == "sample"]
    chunks = backend.timeline.count("chunk")
    print(f"\n1,000 processes: {chunks} chunks in {TICKS} ticks, {len(samples)} samples, "
          f"{backend.beats} heartbeats")
    assert len(scheduler.watches[0].members) == COUNT
    assert len(samples) == COUNT * TICKS
    assert chunks == TICKS * math.ceil(COUNT / SAMPLE_CHUNK) > TICKS  # several chunks per tick ...
    assert "chunk,chunk" not in ",".join(backend.timeline), "a sample ran two chunks without yielding"
    assert backend.listings == ["loop ran", "loop ran"]

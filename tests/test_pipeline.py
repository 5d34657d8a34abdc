"""The pipeline: processors see each chunk and each tick's end; seq is assigned after them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from memagent.config import TargetConfig
from memagent.contracts import SAMPLE_CHUNK, ProcessInfo
from memagent.fanout import Fanout, Outlet
from memagent.pipeline import Pipeline, Processor
from memagent.record_types import COUNT, RecordType, register, unregister
from memagent.records import Draft, RecordMaker
from memagent.scheduler import Scheduler
from memagent.targets import Selector
from memagent.testing import FakeBackend, RecordingSink


class TickCounter:
    """Counts the samples of each tick and derives one ``tick_total`` draft at its end; drops
    samples of pid 13, to show a processor may remove drafts too."""

    name = "tick-counter"

    def __init__(self, maker: RecordMaker) -> None:
        self.maker = maker
        self.chunks: list[int] = []
        self.samples = 0

    def process(self, chunk: list[Draft]) -> list[Draft]:
        self.chunks.append(len(chunk))
        self.samples += sum(1 for d in chunk if d.type == "sample")
        return [d for d in chunk if d.pid != 13]

    def end_tick(self, ts: str, targets: Sequence[str]) -> list[Draft]:
        draft = self.maker.derived("tick_total", {"targets": list(targets), "samples": self.samples}, ts)
        self.samples = 0
        return [draft]


class Uppercase:
    """Sees derived drafts too: it runs after TickCounter."""

    name = "uppercase"

    def process(self, chunk: list[Draft]) -> list[Draft]:
        for draft in chunk:
            if draft.type == "tick_total":
                draft.fields["targets"] = [t.upper() for t in draft.fields["targets"]]
        return chunk

    def end_tick(self, ts: str, targets: Sequence[str]) -> list[Draft]:
        return []


@pytest.fixture(autouse=True)
def tick_total_type() -> Iterator[None]:
    """A throwaway record type for derived records, registered for each test only."""
    register(RecordType(name="tick_total", summary="test: samples in one tick",
                        fields={"targets": {"type": "array"}, "samples": COUNT},
                        required=("targets", "samples")))
    yield
    unregister("tick_total")


def test_only_registered_types_can_be_derived() -> None:
    """A processor cannot make a record the schema does not describe."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    with pytest.raises(ValueError, match="'made_up' is not registered"):
        maker.derived("made_up", {}, "2026-11-25T05:00:00Z")


def world(count: int) -> FakeBackend:
    backend = FakeBackend([ProcessInfo(pid=10 + i, ppid=1, name="w", started=1.0) for i in range(count)])
    backend.readings = {10 + i: ({"rss": 4096, "vms": 8192}, {}) for i in range(count)}
    return backend


async def run_ticks(backend: FakeBackend, processors: Callable[[RecordMaker], list[Processor]],
                    ticks: int) -> tuple[RecordingSink, Pipeline]:
    """Rescan once and sample ``ticks`` times through a pipeline of ``processors(maker)``."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    sink = RecordingSink()
    out = Outlet("rec", sink, queue=100_000, when_full="drop_oldest", batch=1000, targets=None)
    pipeline = Pipeline(Fanout([out]), maker, processors(maker))
    scheduler = Scheduler(backend, [Selector(TargetConfig(name="web", interval=1.0, all=True))], pipeline)
    await out.start()
    await scheduler.rescan()
    for _ in range(ticks):
        await scheduler.sample(scheduler.watches)
    await out.drain(time.monotonic() + 5)
    return sink, pipeline


async def test_processors_add_and_drop_and_seq_stays_contiguous() -> None:
    """A processor drops one process's records and derives one per tick; the next one
    sees that derived record; seq is 1..n without a gap in what the sink gets."""
    sink, _ = await run_ticks(world(4), lambda maker: [TickCounter(maker), Uppercase()], ticks=2)
    kinds = [(r.type, r.pid) for r in sink.records]
    assert kinds == [("start", 10), ("start", 11), ("start", 12),
                     ("sample", 10), ("sample", 11), ("sample", 12), ("tick_total", None),
                     ("sample", 10), ("sample", 11), ("sample", 12), ("tick_total", None)]
    assert [r.seq for r in sink.records] == list(range(1, 12))
    totals = [r.fields for r in sink.records if r.type == "tick_total"]
    assert [(t["samples"], t["targets"]) for t in totals] == [(4, ["WEB"]), (4, ["WEB"])]
    assert all(f'"seq":{r.seq},' in r.json.decode() for r in sink.records)


async def test_processors_see_the_tick_a_chunk_at_a_time() -> None:
    """300 processes: each tick reaches the processor as backend-call chunks of at most
    SAMPLE_CHUNK records, and end_tick comes once per tick."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    counter = TickCounter(maker)
    sink = RecordingSink()
    out = Outlet("rec", sink, queue=100_000, when_full="drop_oldest", batch=1000, targets=None)
    scheduler = Scheduler(world(300), [Selector(TargetConfig(name="web", interval=1.0, all=True))],
                          Pipeline(Fanout([out]), maker, [counter]))
    await out.start()
    await scheduler.rescan()
    counter.chunks.clear()
    await scheduler.sample(scheduler.watches)
    await out.drain(time.monotonic() + 5)
    assert counter.chunks == [SAMPLE_CHUNK, SAMPLE_CHUNK, 300 - 2 * SAMPLE_CHUNK]
    assert [r.type for r in sink.records].count("tick_total") == 1


class Broken:
    name = "broken"

    def process(self, chunk: list[Draft]) -> list[Draft]:
        raise KeyError("name")

    def end_tick(self, ts: str, targets: Sequence[str]) -> list[Draft]:
        raise RuntimeError("no totals today")


async def test_a_failing_processor_never_stops_records(caplog: pytest.LogCaptureFixture) -> None:
    """A processor that raises: every record still flows, unprocessed by it; one error line
    per episode, every failure counted."""
    with caplog.at_level(logging.ERROR, logger="memagent.pipeline"):
        sink, pipeline = await run_ticks(world(2), lambda maker: [Broken()], ticks=3)
    assert [r.type for r in sink.records] == ["start"] * 2 + ["sample"] * 6
    assert [r.seq for r in sink.records] == list(range(1, 9))
    assert pipeline.processor_failures == 1 + 3 * 2  # the rescan's chunk, then each tick's chunk and end
    assert len([r for r in caplog.records if "processor broken failed" in r.getMessage()]) == 1

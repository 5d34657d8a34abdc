"""Outlets: bounded queues, drop policies, retries, drain — one sink never hurts another."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import pytest

from memagent.contracts import Record
from memagent.fanout import Fanout, Outlet
from memagent.records import RecordMaker
from memagent.testing import RecordingSink, make_records

from cli_helpers import scaled, until


def outlet(sink: RecordingSink, *, queue: int = 100, when_full: str = "drop_oldest", batch: int = 10,
           targets: list[str] | None = None, name: str = "rec") -> Outlet:
    return Outlet(name, sink, queue=queue, when_full=when_full, batch=batch, targets=targets)


async def test_records_arrive_in_order_in_batches() -> None:
    """Everything offered is written once, in order, in batches no larger than `batch`."""
    sink = RecordingSink()
    out = outlet(sink, batch=7)
    await out.start()
    for record in make_records(50):
        out.offer(record)
    await out.drain(time.monotonic() + scaled(5))
    assert [r.seq for r in sink.records] == list(range(1, 51))
    assert max(len(b) for b in sink.batches) <= 7
    assert sink.calls[0] == "start" and sink.calls[-1] == "close"
    assert out.written == 50 and out.dropped == 0


async def test_drop_oldest_keeps_the_newest_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    """A stalled sink with a full queue loses its oldest records, counted and logged once."""
    sink = RecordingSink()
    sink.gate.clear()
    out = outlet(sink, queue=10, batch=5)
    await out.start()
    records = make_records(40)
    out.offer(records[0])
    await until(lambda: sink.calls.count("write") == 1)  # the first batch (record 1) is in the stalled write
    with caplog.at_level(logging.WARNING):
        for record in records[1:]:
            out.offer(record)
    assert out.dropped == 29
    assert sum("dropping records" in m for m in caplog.messages) == 1
    sink.gate.set()
    await out.drain(time.monotonic() + scaled(5))
    assert [r.seq for r in sink.records] == [1] + list(range(31, 41))


async def test_drop_newest_keeps_the_oldest() -> None:
    """drop_newest refuses new records while the queue is full."""
    sink = RecordingSink()
    sink.gate.clear()
    out = outlet(sink, queue=10, when_full="drop_newest", batch=100)
    await out.start()
    records = make_records(30)
    out.offer(records[0])
    await until(lambda: sink.calls.count("write") == 1)  # record 1 is in the stalled write
    for record in records[1:]:
        out.offer(record)
    sink.gate.set()
    await out.drain(time.monotonic() + scaled(5))
    assert [r.seq for r in sink.records] == list(range(1, 12))
    assert out.dropped == 19


async def test_block_waits_for_room_and_drops_nothing() -> None:
    """With when_full=block the producer waits; every record arrives."""
    sink = RecordingSink()
    out = outlet(sink, queue=3, when_full="block", batch=2)
    fanout = Fanout([out])
    await out.start()
    for record in make_records(100):
        await fanout.publish([record])
        assert out.queued <= 3 + 2
    await fanout.drain(scaled(5))
    assert [r.seq for r in sink.records] == list(range(1, 101))
    assert out.dropped == 0


async def test_failed_batch_is_retried_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    """A failing write is retried with the same batch; one error line and one recovery line."""
    sink = RecordingSink()
    sink.fail_next = 3
    out = outlet(sink, batch=100)
    await out.start()
    with caplog.at_level(logging.INFO):
        for record in make_records(20):
            out.offer(record)
        await out.drain(time.monotonic() + scaled(10))
    assert [r.seq for r in sink.records] == list(range(1, 21))
    assert out.failures == 3 and out.dropped == 0
    assert sum("write failed" in m for m in caplog.messages) == 1
    assert sum("writing again" in m for m in caplog.messages) == 1


async def test_a_sink_closed_for_good_is_not_retried_and_its_records_are_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    """SinkClosed: one write attempt, one error line; that batch, the queue and every later record
    are counted as dropped; the other sink gets everything; every_sink_closed waits for both."""
    gone, healthy = RecordingSink(), RecordingSink()
    gone.gone = True
    fanout = Fanout([outlet(gone, name="gone", batch=5), outlet(healthy, name="ok", batch=5)])
    for out in fanout.outlets:
        await out.start()
    records = make_records(30)
    with caplog.at_level(logging.INFO):
        await _publish_all(fanout, records[:10])
        await asyncio.wait_for(fanout.outlets[0].closed.wait(), scaled(5))
        await _publish_all(fanout, records[10:])
        waiting = asyncio.ensure_future(fanout.every_sink_closed())
        await asyncio.sleep(0.05)  # (a check that something does not happen: any pause will do)
        assert not waiting.done()  # the healthy sink is still open
        waiting.cancel()
        await fanout.drain(scaled(5))
    closed, ok = fanout.outlets
    assert gone.calls.count("write") == 1 and closed.failures == 0 and closed.retries == 0
    assert closed.dropped == 30 and closed.written == 0 and closed.queued == 0
    assert sum("closed for good" in m for m in caplog.messages) == 1
    assert [r.seq for r in healthy.records] == list(range(1, 31)) and ok.dropped == 0
    assert gone.calls[-1] == "close"


async def test_every_sink_closed_says_why() -> None:
    """every_sink_closed returns once the last open sink closes for good; then each one's reason is told."""
    fanout = Fanout([outlet(RecordingSink(), name=name) for name in ("a", "b")])
    for out in fanout.outlets:
        out.sink.gone = True  # type: ignore[attr-defined]
        await out.start()
    assert fanout.why_every_sink_closed() is None  # nothing written yet: both still open
    await _publish_all(fanout, make_records(2))
    await asyncio.wait_for(fanout.every_sink_closed(), scaled(5))
    assert fanout.why_every_sink_closed() == "a: injected: the reader left; b: injected: the reader left"
    await fanout.drain(scaled(5))


async def test_a_stalled_sink_does_not_slow_another() -> None:
    """One sink stuck forever; the other receives everything and the publisher never waits."""
    stuck, healthy = RecordingSink(), RecordingSink()
    stuck.gate.clear()
    fanout = Fanout([outlet(stuck, name="stuck", queue=5), outlet(healthy, name="healthy", queue=1000)])
    for o in fanout.outlets:
        await o.start()
    for record in make_records(500):
        await fanout.publish([record])  # never waits: the stuck sink's queue of 5 drops its oldest
    await until(lambda: len(healthy.records) == 500)
    await fanout.drain(0.2)
    stuck_outlet = fanout.outlets[0]
    assert stuck_outlet.dropped == 500 and stuck.records == []
    assert stuck.calls[-1] == "close"


async def test_drain_deadline_counts_what_could_not_be_delivered(caplog: pytest.LogCaptureFixture) -> None:
    """Records still queued or in flight at the deadline are counted as dropped and logged."""
    sink = RecordingSink()
    sink.fail_next = 1_000_000
    out = outlet(sink, batch=4)
    await out.start()
    for record in make_records(10):
        out.offer(record)
    with caplog.at_level(logging.ERROR):
        await out.drain(time.monotonic() + 0.3)
    assert out.dropped == 10
    assert any("10 queued records not delivered" in m for m in caplog.messages)


async def test_reopen_is_requested_between_writes() -> None:
    """SIGHUP's reopen reaches an idle sink without waiting for a record."""
    sink = RecordingSink()
    out = outlet(sink)
    await out.start()
    out.request_reopen()
    await until(lambda: "reopen" in sink.calls)
    await out.drain(time.monotonic() + scaled(1))


async def test_routing_by_target_keeps_agent_records_everywhere() -> None:
    """A sink with targets=["a"] gets target a and agent records only."""

    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    a, b = make_records(2, target="a", maker=maker), make_records(2, target="b", maker=maker)
    agent_record = maker.seal(maker.agent({"x": 1}, "2026-01-01T00:00:00Z"))
    sink = RecordingSink()
    out = outlet(sink, targets=["a"])
    await out.start()
    fanout = Fanout([out])
    for record in [*a, *b, agent_record]:
        await fanout.publish([record])
    await fanout.drain(scaled(5))
    assert [r.target for r in sink.records] == ["a", "a", None]


async def test_unblock_frees_a_producer_stuck_on_a_block_outlet() -> None:
    """At shutdown a `block` outlet on a stuck sink stops holding the producer; drops are counted."""
    sink = RecordingSink()
    sink.gate.clear()
    out = outlet(sink, queue=2, when_full="block", batch=1)
    fanout = Fanout([out])
    await out.start()
    records = make_records(10)
    producer = asyncio.create_task(_publish_all(fanout, records))
    await asyncio.sleep(0.05)  # (a check that something does not happen: any pause will do)
    assert not producer.done()  # waiting for room, as `block` promises
    fanout.unblock()
    await asyncio.wait_for(producer, scaled(5))
    await fanout.drain(0.1)
    assert out.dropped == 10 - len(sink.records)
    assert out.dropped > 0


async def _publish_all(fanout: Fanout, records: list[Record]) -> None:
    for record in records:
        await fanout.publish([record])



class NameFormattingSink(RecordingSink):
    """A sink with a bug: it indexes ``fields["name"]``, which agent records lack (KeyError)."""

    async def write(self, batch: Sequence[Record]) -> None:
        for record in batch:
            record.fields["name"].upper()
        await super().write(batch)


async def test_poison_record_is_dropped_and_counted_not_retried_forever(
        caplog: pytest.LogCaptureFixture) -> None:
    """A sink that raises KeyError on one record: that batch is dropped after a few attempts,
    counted, logged once, and the next batches are written (before: retried until the drain
    deadline, nothing else got through)."""
    from memagent.fanout import UNEXPECTED_ATTEMPTS

    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    poison = maker.seal(maker.agent({"x": 1}, "2026-01-01T00:00:00Z"))
    good = make_records(3, maker=maker)
    sink = NameFormattingSink()
    outlet = Outlet("buggy", sink, queue=100, when_full="drop_oldest", batch=1, targets=None)
    await outlet.start()
    with caplog.at_level(logging.ERROR, logger="memagent.fanout"):
        for record in (poison, *good):
            outlet.offer(record)
        await outlet.drain(time.monotonic() + 30)
    assert [r.seq for r in sink.records] == [2, 3, 4]
    stats = outlet.stats()
    assert stats["rejected"] == 1 and stats["dropped"] == 1 and stats["written"] == 3
    assert stats["failures"] == UNEXPECTED_ATTEMPTS - 1
    assert len([r for r in caplog.records if "can never be written" in r.getMessage()]) == 1


async def test_sink_rejected_drops_only_that_batch() -> None:
    """A sink raising SinkRejected loses that batch (counted) and nothing else."""
    from memagent.errors import SinkRejected
    from memagent.testing import make_records

    class PickySink(RecordingSink):
        async def write(self, batch: Any) -> None:
            if any(r.seq == 2 for r in batch):
                raise SinkRejected("seq 2 cannot be encoded")
            await super().write(batch)

    sink = PickySink()
    outlet = Outlet("picky", sink, queue=100, when_full="drop_oldest", batch=1, targets=None)
    await outlet.start()
    for record in make_records(4):
        outlet.offer(record)
    await outlet.drain(time.monotonic() + 5)
    assert [r.seq for r in sink.records] == [1, 3, 4]
    assert outlet.stats()["rejected"] == 1 and outlet.stats()["retries"] == 0


async def test_sink_counters_cannot_overwrite_the_framework_ones() -> None:
    """A sink counter named like a framework one is published as sink_<name>; reopens shows."""
    outlet = Outlet("rec", RecordingSink(), queue=10, when_full="drop_oldest", batch=1, targets=None,
                    extra={"dropped": 7, "bytes_written": 5})
    await outlet.start()
    outlet.request_reopen()
    from memagent.testing import make_records

    outlet.offer(make_records(1)[0])
    await outlet.drain(time.monotonic() + 5)
    stats = outlet.stats()
    assert stats["dropped"] == 0 and stats["sink_dropped"] == 7 and stats["bytes_written"] == 5
    assert stats["reopens"] == 1

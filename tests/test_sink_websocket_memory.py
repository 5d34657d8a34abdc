"""The WebSocket sink's memory: replay and client queues bounded in bytes as well as records,
projections shared between clients, control messages (gap, lag) never dropped."""

from __future__ import annotations

import asyncio

from memagent.contracts import Record
from memagent.plugins.sinks.websocket import MIB
from memagent.records import RecordMaker
from memagent.testing import make_records

from ws_helpers import connect, connected, receive, running_sink, stalled_client, url


def big_records(count: int, size: int) -> list[Record]:
    """``count`` sample records, each carrying a ``size``-character tag (as a long command line would)."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={"pad": "x" * size})
    return make_records(count, maker=maker)


async def test_stalled_clients_and_replay_stay_within_the_default_byte_bounds() -> None:
    """Defaults, three stalled clients projecting fields=tags, 30 MB of records: the replay buffer
    holds at most 16 MiB, each client queue at most 4 MiB (drops counted), and the clients share
    one projected copy of each record (was: every record, and a copy per client)."""
    records = big_records(120, 256 * 1024)
    async with running_sink() as sink:
        stalled = [await asyncio.to_thread(stalled_client, sink.port, "/?fields=tags") for _ in range(3)]
        try:
            await connected(sink, 3)
            for start in range(0, len(records), 10):
                await sink.write(records[start:start + 10])
            replay_bytes = sum(len(r.json) for r in sink.replay)
            queues = [list(c.queue) for c in sink.clients]
            dropped = [c.dropped for c in sink.clients]
            drops_counted = sink.context.counters["client_drops"]
        finally:
            for sock in stalled:
                sock.close()
    assert 0 < replay_bytes <= 16 * MIB
    assert all(0 < sum(map(len, queue)) <= 4 * MIB for queue in queues)
    assert len({id(message) for queue in queues for message in queue}) == len(queues[0])
    assert all(d > 0 for d in dropped) and drops_counted == sum(dropped)


async def test_client_queue_bytes_drop_the_oldest_and_are_reported_as_lag() -> None:
    """client_queue_bytes bounds a queue as client_queue does: oldest dropped, counted, then told
    to the client in a lag message before the records it kept."""
    records = big_records(20, 10_000)
    size = len(records[0].json)
    async with running_sink(client_queue_bytes=4 * size + size // 2) as sink, connect(url(sink)) as client:
        await connected(sink, 1)
        [only] = sink.clients
        only.ready.set = lambda: None  # type: ignore[method-assign]  # hold its sender asleep ...
        await sink.write(records)  # ... while 20 records meet a queue with room for 4
        del only.ready.set
        only.ready.set()
        got = await receive(client, 5)
        assert sink.context.counters["client_drops"] == 16
    assert got[0] == {"type": "lag", "dropped": 16, "total_dropped": 16}
    assert [m["seq"] for m in got[1:]] == [17, 18, 19, 20]


async def test_replay_bytes_keeps_the_newest_and_gap_names_the_rest() -> None:
    """replay_bytes bounds the replay buffer; a reconnect from before it gets a gap, then the rest."""
    records = big_records(50, 10_000)
    size = len(records[0].json)
    async with running_sink(replay_bytes=10 * size + size // 2) as sink:
        await sink.write(records)
        assert len(sink.replay) == 10
        async with connect(url(sink, "since=0")) as client:
            got = await receive(client, 11)
    assert got[0] == {"type": "gap", "from": 1, "to": 40}
    assert [m["seq"] for m in got[1:]] == list(range(41, 51))


async def test_empty_replay_still_reports_the_gap() -> None:
    """replay = 0 keeps nothing, so a reconnect with since= is told everything after it is gone."""
    async with running_sink(replay=0) as sink:
        await sink.write(make_records(30))
        async with connect(url(sink, "since=12")) as client:
            [gap] = await receive(client, 1)
    assert gap == {"type": "gap", "from": 13, "to": 30}


async def test_gap_survives_a_replay_as_large_as_the_client_queue() -> None:
    """Defaults (replay = client_queue = 1000), since= older than the buffer: the gap message comes
    first, then the 1,000 buffered records (was: the gap was dropped from the full queue)."""
    async with running_sink() as sink:
        await sink.write(make_records(1500))
        async with connect(url(sink, "since=10")) as client:
            got = await receive(client, 1001)
    assert got[0] == {"type": "gap", "from": 11, "to": 500}
    assert [m["seq"] for m in got[1:]] == list(range(501, 1501))


async def test_gap_and_lag_both_arrive_when_the_queue_is_smaller_than_the_replay() -> None:
    """replay 100, client_queue 10, since=0 after 200 records: gap, then lag for the replayed
    records that did not fit, then the newest 10."""
    async with running_sink(replay=100, client_queue=10) as sink:
        await sink.write(make_records(200))
        async with connect(url(sink, "since=0")) as client:
            got = await receive(client, 12)
    assert got[0] == {"type": "gap", "from": 1, "to": 100}
    assert got[1] == {"type": "lag", "dropped": 90, "total_dropped": 90}
    assert [m["seq"] for m in got[2:]] == list(range(191, 201))

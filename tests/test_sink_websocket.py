"""The WebSocket sink with real clients on loopback: delivery, filters, security, slow clients."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from memagent.contracts import ProcessInfo, Record
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks import websocket
from memagent.plugins.sinks.dashboard_page import dashboard_page
from memagent.plugins.sinks.websocket import WebSocketSink
from memagent.records import RecordMaker
from memagent.testing import make_records, sink_context

from cli_helpers import until
from ws_helpers import connect, connected, receive, running_sink, self_signed_cert, stalled_client, url


async def test_client_receives_every_record_in_order() -> None:
    """A connected client gets each record once, as the shared JSON text, in seq order."""
    async with running_sink() as sink, connect(url(sink)) as client:
        await connected(sink, 1)
        records = make_records(200)
        for start in range(0, 200, 50):
            await sink.write(records[start:start + 50])
        got = await receive(client, 200)
    assert [m["seq"] for m in got] == list(range(1, 201))
    assert got[0] == json.loads(records[0].json)


async def test_filters_by_target_pid_type_and_projection() -> None:
    """Query filters pick target, pid and type; fields= keeps only those (plus seq and type)."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    api = make_records(5, target="api", pid=10, maker=maker)
    db = make_records(5, target="db", pid=20, maker=maker)
    async with running_sink() as sink, \
            connect(url(sink, "target=api&type=sample&fields=portable")) as only_api, \
            connect(url(sink, "pid=20")) as only_db:
        await connected(sink, 2)
        await sink.write([*api, *db])
        got_api, got_db = await receive(only_api, 5), await receive(only_db, 5)
    assert [m["seq"] for m in got_api] == [r.seq for r in api]
    assert set(got_api[0]) == {"seq", "type", "portable"}
    assert {m["pid"] for m in got_db} == {20}


async def test_filter_message_changes_the_subscription() -> None:
    """A JSON filter message from the client applies to the records that follow."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    async with running_sink() as sink, connect(url(sink)) as client:
        await connected(sink, 1)
        await client.send(json.dumps({"target": ["db"]}))
        [server_side] = sink.clients
        await until(lambda: server_side.subscription.targets == {"db"})
        api, db = make_records(3, target="api", maker=maker), make_records(2, target="db", maker=maker)
        await sink.write(api + db)
        got = await receive(client, 2)
    assert [m["target"] for m in got] == ["db", "db"]


@pytest.mark.parametrize(("query", "message", "reason"), [
    ("type=nonsense", None, "type: unknown record type 'nonsense'"),
    ("colour=red", None, "unknown filter 'colour'; use host, target, pid, type, fields, since, cursor"),
    ("cursor=maybe", None, "cursor: expected true or false"),
    ("pid=abc", None, "pid: expected a list of integers"),
    ("", "this is not json", "messages must be JSON filter objects"),
    ("", "[1, 2]", "messages must be JSON filter objects"),
])
async def test_bad_filters_close_with_1008_and_server_carries_on(query: str, message: str | None,
                                                                 reason: str) -> None:
    """Garbage filters close that client with 1008 and a reason; another client is unaffected."""
    async with running_sink() as sink, connect(url(sink)) as good:
        async with connect(url(sink, query)) as bad:
            if message is not None:
                await bad.send(message)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(bad.recv(), 5)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, reason)
        await connected(sink, 1)
        await sink.write(make_records(3))
        assert len(await receive(good, 3)) == 3
        assert sink.context.counters["bad_filters"] == 1


async def test_oversized_message_closes_with_1009() -> None:
    """A client message above max_size is refused with 1009 (message too big)."""
    async with running_sink(max_size=256) as sink, connect(url(sink)) as client:
        await client.send("x" * 10_000)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(client.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_token_is_required_by_header_or_query() -> None:
    """Wrong or missing token → 401; Bearer header or ?token= → connected."""
    async with running_sink(token="s3cret") as sink:
        for bad in ({}, {"Authorization": "Bearer nope"}):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url(sink), additional_headers=bad):
                    pass
            assert refused.value.response.status_code == 401
        async with connect(url(sink), additional_headers={"Authorization": "Bearer s3cret"}):
            pass
        async with connect(url(sink, "token=s3cret")):
            pass
        assert sink.context.counters["rejected_auth"] == 2


async def test_disallowed_origin_gets_403() -> None:
    """With an origins allow-list a browser from elsewhere is refused; a listed origin is not."""
    async with running_sink(origins=["https://dash.example"]) as sink:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url(sink), origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        async with connect(url(sink), origin="https://dash.example"):  # type: ignore[arg-type]
            pass


async def test_max_clients_gives_503() -> None:
    """Past max_clients new connections are refused with 503."""
    async with running_sink(max_clients=2) as sink, connect(url(sink)), connect(url(sink)):
        await connected(sink, 2)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url(sink)):
                pass
        assert refused.value.response.status_code == 503


async def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    """wss:// works with tls_cert/tls_key; the client trusts the test's own certificate."""
    cert, key = self_signed_cert(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    async with running_sink(tls_cert=str(cert), tls_key=str(key)) as sink, \
            connect(url(sink, scheme="wss"), ssl=trust) as client:
        await connected(sink, 1)
        await sink.write(make_records(2))
        assert len(await receive(client, 2)) == 2


async def test_healthz_reports_clients_sent_dropped() -> None:
    """GET /healthz answers JSON without a token or handshake."""
    async with running_sink(token="s3cret") as sink, connect(url(sink, "token=s3cret")) as client:
        await connected(sink, 1)
        await sink.write(make_records(4))
        await receive(client, 4)
        health = json.loads(await asyncio.to_thread(http_get, f"http://127.0.0.1:{sink.port}/healthz"))
    assert health == {"status": "ok", "clients": 1, "sent": 4, "dropped": 0, "replay": 4}


def http_get(address: str) -> bytes:
    with urllib.request.urlopen(address, timeout=5) as response:
        body: bytes = response.read()
        return body


def http_get_with_headers(address: str) -> tuple[bytes, dict[str, str]]:
    with urllib.request.urlopen(address, timeout=5) as response:
        body: bytes = response.read()
        return body, dict(response.headers)


async def test_unknown_path_is_404() -> None:
    """Only the feed path, /healthz, /dashboard and /processes exist."""
    async with running_sink(path="/feed") as sink:
        with pytest.raises(urllib.error.HTTPError) as missing:
            await asyncio.to_thread(http_get, f"http://127.0.0.1:{sink.port}/other")
        missing.value.close()
        assert missing.value.code == 404


async def test_reconnect_with_since_gets_exactly_what_was_missed() -> None:
    """?since=N replays the buffered records after N, then continues live, no gap, no repeat."""
    records = make_records(300)
    async with running_sink(replay=500) as sink:
        async with connect(url(sink)) as first:
            await connected(sink, 1)
            await sink.write(records[:100])
            seen = await receive(first, 100)
        await sink.write(records[100:250])  # missed while disconnected
        async with connect(url(sink, f"since={seen[-1]['seq']}")) as second:
            await connected(sink, 1)
            await sink.write(records[250:])
            rest = await receive(second, 200)
    assert [m["seq"] for m in seen + rest] == list(range(1, 301))


async def test_since_older_than_the_buffer_says_gap() -> None:
    """When the replay buffer no longer holds what was missed, a gap message says which seqs."""
    async with running_sink(replay=50) as sink:
        await sink.write(make_records(200))
        async with connect(url(sink, "since=10")) as client:
            got = await receive(client, 51)
    assert got[0] == {"type": "gap", "from": 11, "to": 150}
    assert [m["seq"] for m in got[1:]] == list(range(151, 201))


RUN = sink_context().run  # the run of every sink the tests start (running_sink)


def at_position(record: Record, seq: int) -> Record:
    """``record`` as a relay hands it on: the same bytes, ``seq`` the feed's position."""
    return Record(seq, record.type, record.target, record.pid, record.fields, record.json)


async def test_since_naming_this_run_resumes_like_a_bare_seq() -> None:
    """?since=<run>:<seq> with the sink's own run: exactly what a bare ?since=<seq> gets."""
    records = make_records(100)
    async with running_sink(replay=500) as sink:
        await sink.write(records)
        async with connect(url(sink, f"since={RUN}:60")) as named, connect(url(sink, "since=60")) as bare:
            got_named, got_bare = await receive(named, 40), await receive(bare, 40)
    assert [m["seq"] for m in got_named] == [m["seq"] for m in got_bare] == list(range(61, 101))


async def test_since_naming_another_run_gets_the_run_change_then_the_whole_buffer() -> None:
    """The agent restarted: a cursor from the old run gets {"type": "run", ...}, then every
    buffered record from seq 1, then the live stream; nothing the sink still holds is lost."""
    async with running_sink(replay=500) as sink:
        records = make_records(300)
        await sink.write(records[:120])
        async with connect(url(sink, "since=9f1c2ab07d3e4f10:5000")) as client:
            await connected(sink, 1)
            await sink.write(records[120:])
            got = await receive(client, 301)
    assert got[0] == {"type": "run", "run": RUN, "previous": "9f1c2ab07d3e4f10"}
    assert [m["seq"] for m in got[1:]] == list(range(1, 301))


async def test_another_run_with_a_trimmed_buffer_also_gets_the_gap_from_1() -> None:
    """After a restart, records of the new run no longer buffered are named in a gap from 1."""
    async with running_sink(replay=50) as sink:
        await sink.write(make_records(200))
        async with connect(url(sink, "since=0123456789abcdee:42")) as client:
            got = await receive(client, 52)
    assert got[0]["type"] == "run" and got[1] == {"type": "gap", "from": 1, "to": 150}
    assert [m["seq"] for m in got[2:]] == list(range(151, 201))


async def test_a_cursor_the_sink_has_not_reached_is_checked_on_the_next_write() -> None:
    """A sink that has seen nothing yet (new since a reload) cannot tell at once; the first
    write says whether records after the cursor were skipped."""
    records = make_records(30)
    async with running_sink() as sink, connect(url(sink, f"since={RUN}:10")) as behind, \
            connect(url(sink, f"since={RUN}:19")) as level:
        await connected(sink, 2)
        await sink.write(records[19:])
        got_behind, got_level = await receive(behind, 12), await receive(level, 11)
    assert got_behind[0] == {"type": "gap", "from": 11, "to": 19}
    assert [m["seq"] for m in got_behind[1:]] == [m["seq"] for m in got_level] == list(range(20, 31))


async def test_cursor_messages_say_where_to_resume_once_caught_up() -> None:
    """cursor=1: after the records of a write (never before them) a cursor message with the feed's
    run and position; resuming from it misses nothing and repeats nothing. A relay's records keep
    their agents' seq: the cursor is the feed's position, not theirs."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={}, run="aaaaaaaaaaaaaaaa")
    relayed = [at_position(record, 1000 + record.seq) for record in make_records(30, maker=maker)]
    async with running_sink() as sink:
        async with connect(url(sink, "cursor=1")) as client, connect(url(sink)) as plain:
            await connected(sink, 2)
            await sink.write(relayed[:10])
            got = await receive(client, 11)
            assert [m["seq"] for m in await receive(plain, 10)] == list(range(1, 11))  # no cursor unasked
        await sink.write(relayed[10:])
        async with connect(url(sink, f"since={got[-1]['since']}&cursor=1")) as resumed:
            rest = await receive(resumed, 21)
    assert [m["seq"] for m in got[:10]] == list(range(1, 11))  # the agents' own seqs, as relayed
    assert got[10] == {"type": "cursor", "since": f"{RUN}:1010"}
    assert [m["seq"] for m in rest[:20]] == list(range(11, 31)) and rest[20]["since"] == f"{RUN}:1030"


async def test_a_cursor_ahead_of_the_sink_skips_what_the_client_already_has() -> None:
    """A client resuming ahead of a sink that starts further back (a relay restarted earlier in its
    stream): records at or before its cursor are not sent again, whichever write brings them; the
    first record after it follows without a gap."""
    records = make_records(30)
    async with running_sink() as sink, connect(url(sink, f"since={RUN}:10")) as client:
        await connected(sink, 1)
        await sink.write(records[:5])
        await sink.write(records[5:])
        got = await receive(client, 20)
    assert [m["seq"] for m in got] == list(range(11, 31))


async def test_host_filters_a_feed_of_many_hosts_and_keeps_same_pids_apart() -> None:
    """?host= keeps those hosts' records (a relay's feed carries many); a filter message with host
    and pid picks one host's process among processes with the same pid on other hosts."""
    makers = {host: RecordMaker(host=host, os_name="linux", backend="fake", tags={}, run=run)
              for host, run in (("web-1", "1111111111111111"), ("web-2", "2222222222222222"))}
    first = [r for host in makers for r in make_records(3, pid=42, maker=makers[host])]
    second = [r for host in makers for r in make_records(3, pid=42, maker=makers[host])]
    async with running_sink() as sink, connect(url(sink, "host=web-2")) as web2, \
            connect(url(sink, "host=web-1,web-2")) as both:
        await connected(sink, 2)
        await sink.write(first)
        got_web2, got_both = await receive(web2, 3), await receive(both, 6)
        await web2.send(json.dumps({"host": ["web-1"], "pid": [42]}))
        [narrowed] = [c for c in sink.clients if c.subscription.hosts == {"web-2"}]
        await until(lambda: narrowed.subscription.hosts == {"web-1"})
        await sink.write(second)
        switched = await receive(web2, 3)
    assert [(m["host"], m["seq"]) for m in got_web2] == [("web-2", 1), ("web-2", 2), ("web-2", 3)]
    assert {m["host"] for m in got_both} == {"web-1", "web-2"}
    assert [(m["host"], m["pid"], m["seq"]) for m in switched] == [("web-1", 42, s) for s in (4, 5, 6)]


async def test_cursor_messages_count_the_filter_messages_applied() -> None:
    """A cursor=1 client that sends a filter message gets a cursor message saying so ("filters": 1)
    once every record queued before it applied is sent: every record after that message is chosen by
    the new filter. A client that never sends one gets cursor messages without "filters"."""
    makers = [RecordMaker(host=host, os_name="linux", backend="fake", tags={}) for host in ("a", "b")]
    made = [r for _ in range(3) for maker in makers for r in make_records(50, maker=maker)]
    relayed = [at_position(record, position) for position, record in enumerate(made, 1)]
    async with running_sink() as sink, connect(url(sink, "cursor=1")) as client:
        await connected(sink, 1)
        await sink.write(relayed[:100])
        before = await receive(client, 101)
        await sink.write(relayed[100:200])  # queued for the whole feed
        await client.send(json.dumps({"host": ["b"], "cursor": True}))
        [server_side] = sink.clients
        await until(lambda: server_side.filters == 1)
        await sink.write(relayed[200:])  # chosen by the new filter
        got: list[dict[str, object]] = []
        while not got or got[-1] != {"type": "cursor", "since": f"{RUN}:300", "filters": 1}:
            got.extend(await receive(client, 1))
    assert before[-1] == {"type": "cursor", "since": f"{RUN}:100"}
    told = next(i for i, m in enumerate(got) if m.get("filters") == 1)
    samples = [(m["host"], m["seq"]) for m in got if m["type"] == "sample"]
    assert samples == [*((h, s) for h in "ab" for s in range(51, 101)), *(("b", s) for s in range(101, 151))]
    assert all(m["type"] == "cursor" or m["host"] == "b" for m in got[told:]), "an old filter's record after"
    queued_before = [i for i, m in enumerate(got) if m["type"] == "sample" and m["seq"] <= 100]
    assert len(queued_before) == 100 and max(queued_before) < told, "the cursor came before old records"


@pytest.mark.parametrize("since", ["abc", "-1", "r!n:3", "1,2", "run:", ":5", "1" * 20, "x" * 65 + ":1"])
async def test_a_malformed_since_closes_with_1008(since: str) -> None:
    """since is <run>:<seq> or <seq>; anything else is refused with a reason saying so."""
    async with running_sink() as sink, connect(url(sink, f"since={since}")) as client:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(client.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "since: expected <run>:<seq> or <seq>, seq >= 0"


async def test_processes_lists_the_start_records_of_live_processes() -> None:
    """GET /processes (behind the token): the start record of each process seen starting and not
    yet exited, with the run and the last seq."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    first, second = (ProcessInfo(pid, 1, "py", 1_700_000_000.0 + pid, cmdline=("python", str(pid)))
                     for pid in (10, 20))
    ts = "2026-01-01T00:00:00Z"
    drafts = [maker.start("t", first, ts), maker.start("t", second, ts), maker.exit("t", first, ts)]
    async with running_sink(token="s3cret") as sink:
        await sink.write([maker.seal(d) for d in drafts])
        address = f"http://127.0.0.1:{sink.port}/processes"
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(http_get, address)
        refused.value.close()
        listed = json.loads(await asyncio.to_thread(http_get, address + "?token=s3cret"))
    assert refused.value.code == 401
    assert (listed["run"], listed["seq"]) == (RUN, 3)
    assert [(p["type"], p["pid"], p["cmdline"]) for p in listed["processes"]] == [
        ("start", 20, ["python", "20"])]


async def test_processes_keeps_at_most_starts_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The start records kept are bounded in bytes: the oldest are forgotten first."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    starts = [maker.seal(maker.start("t", ProcessInfo(pid, 1, "x", 1.0, cmdline=("x" * 1000,)),
                                     "2026-01-01T00:00:00Z")) for pid in range(1, 21)]
    monkeypatch.setattr(websocket, "STARTS_BYTES", 5 * len(starts[0].json) + 10)
    async with running_sink() as sink:
        await sink.write(starts)
        assert [record.pid for record in sink.starts.values()] == [16, 17, 18, 19, 20]


async def test_dashboard_is_one_page_with_a_strict_policy() -> None:
    """GET /dashboard needs no token: one page with uPlot inlined (its license beside it), nothing
    from elsewhere, and a CSP allowing only its own inline script and style (by hash)."""
    async with running_sink(token="s3cret", path="/feed") as sink:
        page, headers = await asyncio.to_thread(http_get_with_headers, f"http://127.0.0.1:{sink.port}/dashboard")
    policy = headers["Content-Security-Policy"]
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.DOTALL)
    static = Path(websocket.__file__).parent / "static"
    assert b"uPlot" in scripts[0] and b'const FEED_PATH = "/feed";' in scripts[1] and b"__UPLOT" not in page
    assert not re.search(rb"<(script|link|img)\b[^>]*\b(src|href)=\"?(https?:)?//", page)
    assert "MIT License" in (static / "uPlot.LICENSE").read_text()
    assert policy.startswith("default-src 'none'; script-src 'sha256-") and "unsafe-inline" not in policy
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
        assert f"'sha256-{digest}'" in policy
    assert headers["Referrer-Policy"] == "no-referrer"


def test_the_feed_path_is_written_into_the_page_as_a_js_string() -> None:
    """A path with quotes or markup cannot end the page's script early."""
    page, _ = dashboard_page('/a"b</script>')
    assert b'const FEED_PATH = "/a\\"b\\u003c/script>";' in page


async def test_batch_mode_sends_arrays() -> None:
    """batch = true: one message per write, a JSON array of records."""
    async with running_sink(batch=True) as sink, connect(url(sink)) as client:
        await connected(sink, 1)
        await sink.write(make_records(10))
        message = json.loads(await asyncio.wait_for(client.recv(), 5))
    assert isinstance(message, list) and [m["seq"] for m in message] == list(range(1, 11))


async def test_stalled_client_loses_oldest_is_told_then_closed_and_others_get_everything() -> None:
    """A client that stops reading: its oldest records are dropped and counted, then it is closed
    (1013); a healthy client receives every record meanwhile and write() never waits."""
    total = 30_000  # ~13 MB: more than the kernel's socket buffers can absorb for the stalled one
    records = make_records(total)
    async with running_sink(client_queue=500, disconnect_after=2000, batch=True) as sink, \
            connect(url(sink)) as healthy:
        stalled = await asyncio.to_thread(stalled_client, sink.port)
        await connected(sink, 2)
        reader = asyncio.create_task(receive(healthy, total, timeout=20))
        slowest_write = 0.0
        for start in range(0, total, 100):
            began = time.perf_counter()
            await sink.write(records[start:start + 100])
            slowest_write = max(slowest_write, time.perf_counter() - began)
            await asyncio.sleep(0.001)
        healthy_got = await reader
        print(f"\nslowest write() with a stalled client: {slowest_write * 1e3:.2f} ms; "
              f"client drops {sink.context.counters['client_drops']}")
        assert sink.context.counters["disconnected_slow"] == 1
        assert len(sink.clients) == 1
        stalled.close()
    assert [m["seq"] for m in healthy_got] == list(range(1, total + 1))
    assert sink.context.counters["client_drops"] > 2000


async def test_lagging_client_is_told_how_many_it_lost() -> None:
    """A client whose queue overflowed gets a lag message with the count before its next record."""
    async with running_sink(client_queue=10) as sink, connect(url(sink)) as client:
        await connected(sink, 1)
        [only] = sink.clients
        only.ready.set = lambda: None  # type: ignore[method-assign]  # hold its sender asleep ...
        await sink.write(make_records(25))  # ... while 25 records meet a queue of 10
        del only.ready.set
        only.ready.set()
        got = await receive(client, 11)
    assert got[0] == {"type": "lag", "dropped": 15, "total_dropped": 15}
    assert [m["seq"] for m in got[1:]] == list(range(16, 26))


async def test_thousand_connect_disconnect_cycles_leak_no_tasks_or_fds() -> None:
    """1,000 clients come and go: open fds and running tasks return to where they were."""
    async with running_sink() as sink:
        async with connect(url(sink)):
            pass  # warm up lazily created objects
        await asyncio.sleep(0.1)
        fds_before = len(os.listdir("/proc/self/fd"))
        tasks_before = len(asyncio.all_tasks())
        for _ in range(1000):
            async with connect(url(sink)):
                pass
        await until(lambda: not sink.clients and len(asyncio.all_tasks()) <= tasks_before, timeout=10)
        fds_after = len(os.listdir("/proc/self/fd"))
        tasks_after = len(asyncio.all_tasks())
        assert sink.context.counters["connections"] == 1001
    assert fds_after <= fds_before + 2 and tasks_after <= tasks_before
    assert sink.clients == set()


@pytest.mark.parametrize(("options", "message"), [
    ({"port": 70000}, "sinks[1].port: must be at most 65535"),
    ({"path": "healthz"}, 'sinks[1].path: must start with "/"'),
    ({"tls_cert": "/nonexistent.pem"}, "sinks[1].tls_key: tls_cert and tls_key go together"),
    ({"tokn": "x"}, "sinks[1].tokn: unknown key; did you mean token?"),
    ({"client_queue": 0}, "sinks[1].client_queue: must be at least 1"),
    ({"client_queue_bytes": 100}, "sinks[1].client_queue_bytes: must be at least 4096 bytes"),
    ({"replay_bytes": "lots"}, "sinks[1].replay_bytes: must be a positive size"),
])
def test_bad_options_name_the_key(options: dict[str, object], message: str) -> None:
    """Bad websocket options are ConfigErrors starting with the dotted key."""
    with pytest.raises(ConfigError) as caught:
        WebSocketSink.from_options(Options(dict(options), "sinks[1]"), sink_context())
    assert str(caught.value).startswith(message)


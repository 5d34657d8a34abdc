"""`memagent relay`: its config, reading a stream or a subject in process, and end to end: three
real agents publish to a real JetStream server, the real relay serves their records on its
WebSocket feed, a real websockets client checks every (host, run, seq) and resumes by the feed's
cursor across a relay restart."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from memagent.config import parse_relay_config
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks.nats import NatsSink
from memagent.plugins.sinks.nats_source import decode
from memagent.relay import Relay, build
from memagent.testing import make_records, sink_context

from cli_helpers import MEMAGENT, REPO, AgentProcess, run_agent, run_cli, scaled, until, wait_for
from nats_helpers import (
    FEED,
    RELAY_TO_WEBSOCKET,
    STREAM,
    NatsServer,
    Stored,
    agent_config,
    file_records,
    lines,
    nats_server_binary,
    read_stream,
    stop_agents,
)
from ws_helpers import feed_port

HOSTS = ("web-1.example.com", "web-2", "db-1")


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ('[[sinks]]\ntype = "stdout"\n', "relay: a [relay] table is required"),
    ('[relay]\nstream = "S"\n[[targets]]\nname = "x"\nself = true\n', "targets: a relay config has no"),
    ('[relay]\nservers = ["nats://127.0.0.1:4222"]\n', "relay: needs stream (a JetStream stream) or subject"),
    ('[relay]\nsubject = "memagent.>"\nconsumer = "d"\n', "relay.consumer: only with stream"),
    ('[relay]\nstream = "S"\nstart = "yesterday"\n', 'relay.start: must be "new", "all"'),
    ('[relay]\nstream = "S"\nstrat = "all"\n', "relay.strat: unknown key; did you mean start?"),
    ('[relay]\nstream = "S"\n[[sinks]]\ntype = "file"\npath = "/tmp/x"\ntargets = ["a b"]\n',
     "sinks[1].targets: may hold only letters"),
    ('[relay]\nstream = "S"\ndrain_timeout = "-1s"\n', "relay.drain_timeout: must be a positive duration"),
])
def test_bad_relay_configs_are_one_line_naming_the_key(text: str, message: str) -> None:
    """Each mistake in a relay config is a ConfigError naming its dotted key."""
    with pytest.raises(ConfigError) as error:
        build(parse_relay_config(text))
    assert str(error.value).startswith(message), str(error.value)


def test_a_sinks_targets_name_the_relayed_agents_targets() -> None:
    """A sink's targets filter names targets of the agents relayed: any valid name is accepted."""
    config = parse_relay_config('[relay]\nstream = "S"\n[[sinks]]\ntype = "stdout"\ntargets = ["api"]\n')
    assert config.sinks[0].targets == ("api",)


def test_check_validates_a_relay_config() -> None:
    """`memagent check` on examples/relay.toml validates it as a relay's: exit 0, one line."""
    result = run_cli("check", str(REPO / "examples/relay.toml"))
    assert result.returncode == 0, result.stderr
    assert "ok: relay from stream MEMAGENT (an ephemeral consumer, start 15m)" in result.stdout


def test_relay_of_a_config_without_relay_table_is_exit_2() -> None:
    """`memagent relay` on an agent's config: exit 2, one line naming [relay]."""
    result = run_cli("relay", str(REPO / "examples/quickstart.toml"))
    assert result.returncode == 2
    assert result.stderr.startswith("memagent: error: agent: a relay config has no [agent]")


def test_run_of_a_relay_config_says_to_use_relay() -> None:
    """`memagent run` on a relay config: exit 2, one line saying which command runs it."""
    result = run_cli("run", str(REPO / "examples/relay.toml"), "--once")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("has a [relay] table: run it with memagent relay")


@pytest.mark.parametrize(("data", "why"), [
    (b"not json", "not JSON"), (b"[1, 2]", "not an object"), (b'{"type": "sample"}', "no host, run, seq"),
    (b'{"type": "sample", "host": "h", "run": "r", "seq": true}', "a bool is not a seq"),
    (b'{"type": "sample", "host": "h", "run": "r", "seq": 1, "target": 5}', "a target is a string"),
])
def test_messages_that_are_not_records_are_refused(data: bytes, why: str) -> None:
    """decode() returns None for anything but a record."""
    assert decode(data, 1) is None, why


def test_a_record_keeps_its_bytes_unless_they_hold_a_line_break() -> None:
    """A record's bytes pass unchanged; one with a line break (between tokens) is re-encoded on one
    line; the feed position is the message's, the record's own seq stays in its fields."""
    one_line = b'{"type":"sample","host":"h","run":"r","seq":7,"target":"t","pid":3}'
    record = decode(one_line, 42)
    assert record is not None and record.json is one_line and record.seq == 42
    assert (record.type, record.target, record.pid, record.fields["seq"]) == ("sample", "t", 3, 7)
    two_lines = b'{"type":"agent","host":"h",\n"run":"r","seq":8}'
    split = decode(two_lines, 43)
    assert split is not None and b"\n" not in split.json
    assert orjson.loads(split.json) == orjson.loads(two_lines)


# -- in process -------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Any:
    nats_server_binary()
    with NatsServer(tmp_path).start() as running:
        yield running


def record_bytes(host: str, seq: int, run: str = "0123456789abcdef") -> bytes:
    return orjson.dumps({"schema": 1, "type": "sample", "seq": seq, "run": run, "ts": "2026-11-25T05:00:00Z",
                         "host": host, "target": "t", "pid": 1})


async def publish(url: str, messages: list[tuple[str, bytes]], stream: str | None = STREAM) -> None:
    client = await nats.connect(url)
    try:
        if stream is None:
            for subject, data in messages:
                await client.publish(subject, data)
            await client.flush()
            return
        js = client.jetstream()
        try:
            await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(name=stream, subjects=["memagent.>"])
        for subject, data in messages:
            await js.publish(subject, data)
    finally:
        await client.close()


@asynccontextmanager
async def relaying(tmp_path: Path, relay_table: str) -> AsyncIterator[tuple[Relay, Path]]:
    """A relay built from ``relay_table`` with a file sink, running in this loop until the block ends."""
    out = tmp_path / f"relayed-{len(list(tmp_path.glob('relayed-*')))}.ndjson"
    relay = build(parse_relay_config(f'{relay_table}\n[[sinks]]\ntype = "file"\npath = "{out}"\n'))
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay, out
    finally:
        stop.set()
        await asyncio.wait_for(task, scaled(20))


async def test_durable_consumer_goes_on_where_it_stopped_and_skips_malformed(server: NatsServer,
                                                                             tmp_path: Path) -> None:
    """A durable consumer: a second relay run relays only what came after the first one's, once
    each; a message that is not a record is skipped and counted; records keep their bytes."""
    table = f'[relay]\nservers = ["{server.url}"]\nstream = "{STREAM}"\nconsumer = "dash"\nstart = "all"'
    first = [record_bytes("a", seq) for seq in range(1, 11)]
    await publish(server.url, [("memagent.a.t.sample", data) for data in first])
    async with relaying(tmp_path, table) as (relay, out):
        await until(lambda: lines(out) == 10, timeout=10)
    assert relay.source.counters["relayed"] == 10
    second = [record_bytes("a", seq) for seq in range(11, 16)]
    subject = "memagent.a.t.sample"
    await publish(server.url, [(subject, b"garbage"), *((subject, data) for data in second)])
    async with relaying(tmp_path, table) as (relay, out):
        await until(lambda: lines(out) == 5, timeout=10)
        await until(lambda: relay.source.counters["malformed"] == 1, timeout=10)
    assert out.read_bytes() == b"".join(data + b"\n" for data in second)
    assert (relay.source.first_seq, relay.source.last_seq) == (12, 16)  # stream seqs: garbage was 11


async def test_an_ephemeral_consumer_deleted_under_the_relay_is_recreated_after_the_last_record(
        server: NatsServer, tmp_path: Path) -> None:
    """The server deletes the relay's ephemeral consumer: the relay creates a new one from the stream
    seq after the last record it relayed, so nothing is skipped and nothing repeated."""
    await publish(server.url, [("memagent.a.t.sample", record_bytes("a", seq)) for seq in range(1, 6)])
    table = f'[relay]\nservers = ["{server.url}"]\nstream = "{STREAM}"\nstart = "all"'
    async with relaying(tmp_path, table) as (relay, out):
        await until(lambda: lines(out) == 5, timeout=10)
        client = await nats.connect(server.url)
        js = client.jetstream()
        [name] = [c.name for c in await js.consumers_info(STREAM)]
        await js.delete_consumer(STREAM, name)
        await publish(server.url, [("memagent.a.t.sample", record_bytes("a", seq)) for seq in range(6, 9)])
        await client.close()
        await until(lambda: lines(out) == 8, timeout=20)
    assert [r["seq"] for r in file_records(out)] == list(range(1, 9))
    assert relay.source.counters["consumers_created"] == 2


async def test_core_subject_relays_what_is_published_while_it_listens(server: NatsServer,
                                                                     tmp_path: Path) -> None:
    """subject without stream: core NATS, live only; the feed position counts this relay's records."""
    table = f'[relay]\nservers = ["{server.url}"]\nsubject = "live.>"'
    async with relaying(tmp_path, table) as (relay, out):
        await until(lambda: relay.fanout is not None, timeout=10)
        await publish(server.url, [(f"live.{h}", record_bytes(h, 1)) for h in ("a", "b", "c")], stream=None)
        await until(lambda: lines(out) == 3, timeout=10)
    assert [r["host"] for r in file_records(out)] == ["a", "b", "c"]
    assert relay.source.last_seq == 3 and len(relay.source.feed) == 16


async def test_the_example_server_config_lets_agents_publish_and_the_relay_read(tmp_path: Path) -> None:
    """examples/nats-server.conf as shipped (ports and store moved to this test's, passwords set):
    the agent user creates the stream and publishes with acks, the relay user reads it through a
    durable consumer: each user's permissions allow all it needs."""
    nats_server_binary()
    server = NatsServer(tmp_path)
    server.text = ((REPO / "examples/nats-server.conf").read_text()
                   .replace('"0.0.0.0:4222"', f'"127.0.0.1:{server.port}"')
                   .replace('"127.0.0.1:8222"', f'"127.0.0.1:{server.http_port}"')
                   .replace('"/var/lib/nats"', f'"{tmp_path / "store"}"')
                   .replace("$MEMAGENT_AGENT_PASSWORD", '"agent-pw-1"')
                   .replace("$MEMAGENT_RELAY_PASSWORD", '"relay-pw-2"'))
    options = {"servers": [server.url], "stream": STREAM, "create_stream": True, "user": "agent",
               "password": "agent-pw-1"}
    agent_sink = NatsSink.from_options(Options(options, "sinks[1]"), sink_context("nats"))
    records = make_records(20)
    with server.start():
        await agent_sink.start()
        try:
            await agent_sink.write(records)
        finally:
            await agent_sink.close()
        table = (f'[relay]\nservers = ["{server.url}"]\nstream = "{STREAM}"\nconsumer = "dash"\n'
                 'start = "all"\nuser = "relay"\npassword = "relay-pw-2"')
        async with relaying(tmp_path, table) as (relay, out):
            await until(lambda: lines(out) == 20, timeout=10)
    assert [r["seq"] for r in file_records(out)] == list(range(1, 21))
    assert relay.source.counters["consumers_created"] == 1


# -- end to end: agents, relay, websockets client ---------------------------------------------------


def healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        health: dict[str, Any] = json.loads(answer.read())
        return health


class Collector:
    """Everything a websockets client receives, records and control messages apart."""

    def __init__(self, client: ClientConnection) -> None:
        self.records: list[dict[str, Any]] = []
        self.control: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._receive(client))

    async def _receive(self, client: ClientConnection) -> None:
        async for message in client:
            data = orjson.loads(message)
            (self.records if "schema" in data else self.control).append(data)


def per_host_run(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[int]]:
    seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
    for record in records:
        seqs[(record["host"], record["run"])].append(record["seq"])
    return seqs


async def test_relay_feeds_every_record_of_three_hosts_to_websocket_clients(
        write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """Three agents publish to JetStream; `memagent relay` serves them on its WebSocket feed while
    they run: a websockets client gets every (host, run, seq) exactly once, in order per host; a
    client with ?host= gets that host's records only. A client resuming from the feed's cursor
    (?since=<feed>:<stream seq>) after the relay restarted gets exactly the records after it."""
    nats_server_binary()
    with NatsServer(tmp_path).start() as server, ExitStack() as stack:
        started = []
        for host in HOSTS:
            file = tmp_path / f"{host}.ndjson"
            config = write_config(agent_config(host, [server.url], file))
            started.append((stack.enter_context(run_agent(config)), file))
        await asyncio.to_thread(wait_for, lambda: all(lines(file) >= 10 for _, file in started), 30)
        config = write_config(RELAY_TO_WEBSOCKET.format(url=server.url, stream=STREAM))
        relay = stack.enter_context(AgentProcess([*MEMAGENT, "relay", str(config)]))
        feed = (await asyncio.to_thread(relay.wait_for_stderr, FEED)).group(1)
        port = await asyncio.to_thread(feed_port, relay)
        base = f"ws://127.0.0.1:{port}/?since={feed}:0"
        async with connect(base) as everyone, connect(base + "&host=db-1") as db_only:
            every, db = Collector(everyone), Collector(db_only)
            await asyncio.to_thread(wait_for, lambda: all(lines(file) >= 60 for _, file in started), 30)
            made = await asyncio.to_thread(stop_agents, started)
            await until(lambda: len(every.records) >= len(made), timeout=30)
            await until(lambda: len(db.records) >= sum(r["host"] == "db-1" for r in made), timeout=30)
        expected = per_host_run(made)
        assert per_host_run(every.records) == expected  # every seq once, in order, per (host, run)
        assert per_host_run(db.records) == {key: seqs for key, seqs in expected.items() if key[0] == "db-1"}
        assert every.control == [] and db.control == []  # no gap, no lag
        stored: list[Stored] = await read_stream([server.url], STREAM)
        assert relay.stop().returncode == 0

        cursor = stored[len(stored) // 2].stream_seq
        again = stack.enter_context(AgentProcess([*MEMAGENT, "relay", str(config)]))
        assert (await asyncio.to_thread(again.wait_for_stderr, FEED)).group(1) == feed
        port = await asyncio.to_thread(feed_port, again)
        await until(lambda: healthz(port)["replay"] == len(stored), timeout=30)
        async with connect(f"ws://127.0.0.1:{port}/?since={feed}:{cursor}") as resumed:
            after = Collector(resumed)
            await until(lambda: len(after.records) >= len(stored) - cursor, timeout=30)
        assert after.records == [s.record for s in stored if s.stream_seq > cursor]
        assert after.control == []  # the same feed: no "run" message, no gap
        assert again.stop().returncode == 0
    print(f"{len(made)} records of {len(expected)} (host, run) pairs relayed to both clients; "
          f"resumed after stream seq {cursor} of {len(stored)}")

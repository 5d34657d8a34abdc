"""The nats sink through its contract (from_options / start / write / close) against real
nats-servers on loopback: options, subjects, JetStream acks and dedupe, core NATS, credentials,
TLS, and the missing extra."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest

from memagent.contracts import Record
from memagent.errors import ConfigError, SinkError, SinkRejected
from memagent.options import Options
from memagent.plugins.sinks.nats import NatsSink
from memagent.plugins.sinks.nats_subjects import SubjectTemplate
from memagent.records import RecordMaker
from memagent.testing import make_records, sink_context

from cli_helpers import REPO, scaled, until
from nats_helpers import NatsServer, nats_server_binary, read_stream
from ws_helpers import self_signed_cert

SECRET = "s3cret-T0ken/with:odd+chars"  # noqa: S105 - a test secret, asserted never to be logged
#: The seed of NATS's documentation (a user nkey); the server is given its public key.
SEED = b"SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY"


def sink(servers: list[str] | str | None = None, **options: Any) -> NatsSink:
    if servers is not None:
        options["servers"] = [servers] if isinstance(servers, str) else servers
    return NatsSink.from_options(Options(options, "sinks[1]"), sink_context("nats"))


@asynccontextmanager
async def started(built: NatsSink) -> AsyncIterator[NatsSink]:
    await built.start()
    try:
        yield built
    finally:
        await built.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream server for the tests that do not stop it (each uses its own stream)."""
    nats_server_binary()
    with NatsServer(tmp_path_factory.mktemp("nats")).start() as running:
        yield running


def logged(built: NatsSink) -> str:
    log = built.context.log
    return "\n".join([*getattr(log, "reports", []), *getattr(log, "infos", [])])


# -- options --------------------------------------------------------------------------------------


def test_sample_config_is_a_valid_sink() -> None:
    """The sample config's uncommented keys build a JetStream sink with the defaults."""
    [table] = tomllib.loads(NatsSink.sample_config)["sinks"]
    assert table.pop("type") == "nats"
    built = sink(**table)
    assert built.stream is not None and built.stream.name == "MEMAGENT" and not built.stream.create
    assert (built.ack_timeout, built.max_inflight) == (5.0, 256)
    assert built.template.template == "memagent.{host}.{target}.{type}"


@pytest.mark.parametrize(("options", "message"), [
    ({"subject": "memagent.{hots}"}, "sinks[1].subject: has an unknown placeholder"),
    ({"subject": "memagent.*.{host}"}, "sinks[1].subject: must not contain wildcards"),
    ({"subject": "memagent..{host}"}, "sinks[1].subject: must not have empty tokens"),
    ({"subject": "$JS.{host}"}, "sinks[1].subject: must not start with $"),
    ({"servers": ["nats://me:pw@127.0.0.1:4222"]}, "sinks[1].servers: a server URL must not carry"),
    ({"servers": ["http://127.0.0.1:4222"]}, "sinks[1].servers: each server must be nats://"),
    ({"create_stream": True}, "sinks[1].create_stream: needs stream"),
    ({"stream": "S", "replicas": 3}, "sinks[1].replicas: only with create_stream = true"),
    ({"ack_timeout": "1s"}, "sinks[1].ack_timeout: only with stream"),
    ({"stream": "a.b"}, "sinks[1].stream: must be a stream name"),
    ({"stream": "S", "create_stream": True, "stream_subjects": ["other.>"]},
     "sinks[1].stream_subjects: other.> would not capture the sink's subjects"),
    ({"token": "abcdef", "user": "me", "password": "pw"}, "sinks[1].user: cannot be combined with token"),
    ({"user": "me"}, "sinks[1].password: user and password go together"),
    ({"nkey": "/nonexistent/seed.nk"}, "sinks[1].nkey: cannot read"),
    ({"strem": "S"}, "sinks[1].strem: unknown key; did you mean stream?"),
])
def test_bad_options_are_one_line_naming_the_key(options: dict[str, Any], message: str) -> None:
    """Each mistake is a ConfigError naming its dotted key."""
    with pytest.raises(ConfigError) as error:
        sink(**options)
    assert str(error.value).startswith(message), str(error.value)


def test_subject_tokens_are_sanitized() -> None:
    """Values become one safe token each: dots, wildcards and spaces turn into _; an agent record
    (no target) gets the fixed token _."""
    template = SubjectTemplate("memagent.{host}.{target}.{type}")
    assert template.render({"host": "web-1.example.com", "target": "a.b* >c", "type": "sample"}) == \
        "memagent.web-1_example_com.a_b___c.sample"
    assert template.render({"host": "h", "target": None, "type": "agent"}) == "memagent.h._.agent"
    assert template.render({"host": "", "target": "t", "type": "sample"}) == "memagent._.t.sample"
    assert template.filter() == "memagent.*.*.*"


def test_remote_server_without_tls_is_a_security_warning_that_never_shows_the_token() -> None:
    """A server beyond loopback without TLS: a SECURITY warning (naming what crosses in clear
    text, the token among it), the token itself never in it."""
    built = sink("nats://192.0.2.10:4222", token=SECRET)
    [warning] = [line for line in built.context.log.reports if "SECURITY" in line]  # type: ignore[attr-defined]
    assert "192.0.2.10" in warning and "token" in warning and SECRET not in warning


# -- JetStream --------------------------------------------------------------------------------------


async def test_a_batch_is_stored_once_with_its_msg_ids(server: NatsServer) -> None:
    """A JetStream batch: every record stored once, as its own bytes, on its subject, with
    Nats-Msg-Id = run:seq; the sink says which duplicate window exactly-once rests on."""
    records = make_records(300, target="api")
    async with started(sink(server.url, stream="ONCE", create_stream=True, stream_subjects=["once.>"],
                            subject="once.{host}.{target}.{type}")) as built:
        await built.write(records)
        stored = await read_stream([server.url], "ONCE")
    assert [(s.msg_id, s.subject) for s in stored] == \
        [(f"{r.fields['run']}:{r.seq}", "once.test-host.api.sample") for r in records]
    assert [s.record for s in stored] == [dict(r.fields) for r in records]
    assert built.counters["published"] == 300 and built.counters["duplicates"] == 0
    assert "a retried publish is dropped as a duplicate within 120s" in logged(built)


async def test_publishes_are_pipelined_with_a_bounded_number_in_flight(server: NatsServer) -> None:
    """Many publishes await their acks at once, never more than max_inflight."""
    async with started(sink(server.url, stream="INFLIGHT", create_stream=True, max_inflight=16,
                            subject="inflight.{host}", stream_subjects=["inflight.>"])) as built:
        await built.write(make_records(1))  # connected, stream checked
        assert built._js is not None
        js = built._js
        publish, seen = js.publish_async, []

        async def counting(*args: Any, **kwargs: Any) -> Any:
            seen.append(js.publish_async_pending())
            return await publish(*args, **kwargs)

        js.publish_async = counting  # type: ignore[method-assign]
        await built.write(make_records(500, start_seq=1))
    assert 1 < max(seen) <= 16, max(seen)
    assert built.counters["published"] == 501


async def test_lost_acks_are_retried_and_the_server_drops_the_duplicates(tmp_path: Path) -> None:
    """The server freezes (SIGSTOP) with a batch in flight: no ack within ack_timeout is a
    SinkError; once it thaws it stores that batch, and the retry of the same batch is acknowledged
    as duplicates: each record stored once."""
    with NatsServer(tmp_path).start() as server:
        assert server.process is not None
        async with started(sink(server.url, stream="DEDUPE", create_stream=True, ack_timeout="500ms",
                                stream_subjects=["memagent.>"])) as built:
            maker = RecordMaker(host="test-host", os_name="linux", backend="fake", tags={})
            first, batch = make_records(100, maker=maker), make_records(200, maker=maker)
            await built.write(first)
            server.process.send_signal(signal.SIGSTOP)
            pid = server.process.pid
            await until(lambda: stopped(pid))  # stopped before the batch goes: none of it acknowledged
            try:
                with pytest.raises(SinkError, match="200 of 200 records not acknowledged"):
                    await built.write(batch)
            finally:
                server.process.send_signal(signal.SIGCONT)
            await built.write(batch)  # what the framework does next: the same batch
            stored = await read_stream([server.url], "DEDUPE")
    assert built.counters["duplicates"] == 200
    assert [s.record["seq"] for s in stored] == list(range(1, 301))


async def test_dedupe_survives_kill_9_and_a_restart_on_the_same_store(tmp_path: Path) -> None:
    """A batch the server stored but never acknowledged (frozen with SIGSTOP while it came in, then
    thawed), then kill -9 and a restart on the same store: the retried batch is recognised as
    duplicates (the server rebuilds its Msg-Id window from the store) and stored once."""
    with NatsServer(tmp_path).start() as server:
        assert server.process is not None
        built = sink(server.url, stream="RESTART", create_stream=True, ack_timeout="500ms",
                     reconnect_wait="100ms", stream_subjects=["memagent.>"])
        async with started(built):
            maker = RecordMaker(host="test-host", os_name="linux", backend="fake", tags={})
            first, batch = make_records(50, maker=maker), make_records(150, maker=maker)
            await built.write(first)
            server.process.send_signal(signal.SIGSTOP)
            pid = server.process.pid
            await until(lambda: stopped(pid))  # stopped before the batch goes: none of it acknowledged
            try:
                with pytest.raises(SinkError, match="not acknowledged"):
                    await built.write(batch)
            finally:
                server.process.send_signal(signal.SIGCONT)
            await until(lambda: stored_messages(server) == 200, timeout=10)
            server.kill()
            assert built.connection is not None
            await until(lambda: built.connection.lost().is_set())  # type: ignore[union-attr]
            server.start()
            assert await built.connection.wait_up(scaled(10))
            await built.write(batch)
            stored = await read_stream([server.url], "RESTART")
    assert built.counters["duplicates"] == 150
    assert [s.record["seq"] for s in stored] == list(range(1, 201))


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (its state in /proc is ``T``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def stored_messages(server: NatsServer) -> int:
    """How many messages the server holds (its monitoring page)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/jsz", timeout=5) as page:
        return int(json.loads(page.read())["messages"])


async def test_a_server_that_is_down_at_start_is_waited_for(tmp_path: Path) -> None:
    """No server at start: start succeeds, one warning says so, writes fail (to be retried);
    once the server is up the next write goes through and one line says it connected."""
    server = NatsServer(tmp_path)
    built = sink(server.url, stream="LATE", create_stream=True, ack_timeout="300ms", reconnect_wait="100ms",
                 stream_subjects=["memagent.>"])
    async with started(built):
        with pytest.raises(SinkError, match="not connected to NATS"):
            await built.write(make_records(5))
        with server.start():
            assert built.connection is not None
            assert await built.connection.wait_up(scaled(10))
            await built.write(make_records(5))
            assert len(await read_stream([server.url], "LATE")) == 5
    reports = built.context.log.reports  # type: ignore[attr-defined]
    assert [line for line in reports if "cannot connect to" in line] == [reports[0]]
    assert sum("connected to nats://127.0.0.1" in line for line in reports) == 1


async def test_a_stream_that_does_not_exist_is_a_retried_failure(server: NatsServer) -> None:
    """Without create_stream, a missing stream is one warning and a SinkError per attempt."""
    async with started(sink(server.url, stream="NOSUCH", ack_timeout="500ms")) as built:
        with pytest.raises(SinkError, match="no stream captures the subject|not acknowledged"):
            await built.write(make_records(3))
    assert "stream NOSUCH does not exist" in logged(built)


async def test_a_stream_the_server_refuses_to_create_is_one_warning(server: NatsServer) -> None:
    """create_stream for a stream whose subjects another stream already captures: the server's
    reason in one warning, and writes fail (to be retried) instead of going elsewhere."""
    options = {"create_stream": True, "subject": "clash.{host}", "stream_subjects": ["clash.>"],
               "ack_timeout": "300ms"}
    async with started(sink(server.url, stream="CLASH1", **options)) as first:
        await first.write(make_records(1))
    async with started(sink(server.url, stream="CLASH2", **options)) as second:
        with pytest.raises(SinkError, match="cannot look up stream CLASH2|not acknowledged"):
            await second.write(make_records(1))
    [warning] = [line for line in second.context.log.reports if "cannot create stream" in line]  # type: ignore[attr-defined]
    assert "CLASH2" in warning and "overlap" in warning


async def test_a_record_over_max_payload_is_left_out_and_counted(tmp_path: Path) -> None:
    """A record larger than the server's max_payload is counted (too_large), logged once; the
    rest of its batch is stored."""
    with NatsServer(tmp_path, conf="max_payload: 4096").start() as server:
        records = make_records(3)
        padded = records[1].json[:-1] + b',"pad":"' + b"x" * 8000 + b'"}'
        first = records[1]
        huge = Record(first.seq, first.type, first.target, first.pid, first.fields, padded)
        async with started(sink(server.url, stream="BIG", create_stream=True,
                                stream_subjects=["memagent.>"])) as built:
            await built.write([records[0], huge, records[2]])
            stored = await read_stream([server.url], "BIG")
    assert [s.record["seq"] for s in stored] == [1, 3]
    assert built.counters["too_large"] == 1
    assert sum("exceeds the server's max_payload" in line for line in built.context.log.reports) == 1  # type: ignore[attr-defined]


# -- core NATS --------------------------------------------------------------------------------------


async def test_core_nats_is_fire_and_forget_and_drops_while_disconnected(tmp_path: Path) -> None:
    """Without a stream: subscribers get every record's bytes; while the server is gone a batch is
    dropped at once (SinkRejected), counted in disconnected_drops."""
    with NatsServer(tmp_path).start() as server:
        listener = await nats.connect(server.url)
        subscription = await listener.subscribe("memagent.>")
        records = make_records(50)
        async with started(sink(server.url, reconnect_wait="5s")) as built:
            await built.write(records)
            got = [await subscription.next_msg(timeout=scaled(5)) for _ in records]
            await listener.close()
            server.kill()
            reports = built.context.log.reports  # type: ignore[attr-defined]
            await until(lambda: any("lost the connection to" in line for line in reports))
            with pytest.raises(SinkRejected, match="not connected"):
                await built.write(records[:7])
    assert [m.data for m in got] == [r.json for r in records]
    assert built.counters["disconnected_drops"] == 7 and built.counters["published"] == 50
    assert sum("lost the connection to" in line for line in reports) == 1


# -- credentials and TLS ----------------------------------------------------------------------------


def _auth(kind: str, secret: str) -> tuple[str, dict[str, Any]]:
    """The server's authorization block and the sink's options for one kind of credentials."""
    if kind == "token":
        return f'authorization {{ token: "{SECRET}" }}', {"token": secret}
    if kind == "password":
        return f'authorization {{ users: [{{user: "agent", password: "{SECRET}"}}] }}', \
            {"user": "agent", "password": secret}
    public = nkeys.from_seed(SEED).public_key.decode()
    return f'authorization {{ users: [{{nkey: "{public}"}}] }}', {"nkey": secret}


@pytest.mark.parametrize("kind", ["token", "password", "nkey"])
async def test_credentials_work_and_a_wrong_one_is_logged_without_the_secret(
        kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Token, user/password and an nkey seed file each authenticate; a wrong token or password
    is one warning that never shows the secret (nor the right one)."""
    caplog.set_level(logging.DEBUG)
    seed = tmp_path / "agent.nk"
    seed.write_bytes(SEED)
    conf, options = _auth(kind, str(seed) if kind == "nkey" else SECRET)
    with NatsServer(tmp_path, conf=conf).start() as server:
        async with started(sink(server.url, stream="AUTH", create_stream=True,
                                stream_subjects=["memagent.>"], **options)) as built:
            await built.write(make_records(3))
        assert built.counters["published"] == 3
        if kind == "nkey":
            return
        wrong = "not-the-secret-9Q"
        _, bad_options = _auth(kind, wrong)
        async with started(sink(server.url, stream="AUTH", ack_timeout="300ms", reconnect_wait="100ms",
                                **bad_options)) as refused:
            with pytest.raises(SinkError, match="not connected"):
                await refused.write(make_records(1))
    text = "\n".join(record.getMessage() for record in caplog.records)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("Authorization Violation" in line for line in warnings) == 1, warnings
    assert SECRET not in text and wrong not in text


async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    """A tls:// server whose certificate a private CA (ca_file) vouches for."""
    cert, key = self_signed_cert(tmp_path)
    conf = f'tls {{ cert_file: "{cert}"\n key_file: "{key}" }}'
    with NatsServer(tmp_path, conf=conf).start() as server:
        async with started(sink(f"tls://127.0.0.1:{server.port}", ca_file=str(cert), stream="TLS",
                                create_stream=True, stream_subjects=["memagent.>"])) as built:
            await built.write(make_records(3))
    assert built.counters["published"] == 3


# -- without the extra ------------------------------------------------------------------------------


def run_without_nats(*args: str) -> subprocess.CompletedProcess[str]:
    """``memagent ARGS`` in a Python where nats-py cannot be imported (as without the extra)."""
    code = ("import sys; sys.modules['nats'] = None\n"
            "from memagent.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=scaled(60), check=False)


def test_without_the_extra_plugins_check_and_relay_say_how_to_install(tmp_path: Path) -> None:
    """Without nats-py: `memagent plugins` lists nats as not loading, naming memagent[nats];
    `memagent check` of a config using it and `memagent relay` exit 2 saying the same."""
    listed = run_without_nats("plugins")
    assert listed.returncode == 0
    [line] = [row for row in listed.stdout.splitlines() if row.startswith("nats ")]
    assert " no: " in line and "install memagent[nats]" in line
    config = tmp_path / "nats.toml"
    config.write_text('[[targets]]\nname = "self"\nself = true\n\n[[sinks]]\ntype = "nats"\n')
    relay = tmp_path / "relay.toml"
    relay.write_text('[relay]\nstream = "MEMAGENT"\n')
    for args in (("check", str(config)), ("relay", str(relay)), ("check", str(relay))):
        result = run_without_nats(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "install memagent[nats]" in result.stderr and "Traceback" not in result.stderr


def test_examples_nats_toml_uses_this_sink() -> None:
    """examples/nats.toml (checked by test_cli's examples test) configures a JetStream nats sink."""
    config = tomllib.loads((REPO / "examples/nats.toml").read_text())
    [table] = [s for s in config["sinks"] if s["type"] == "nats"]
    assert table["stream"] and table["create_stream"] is True


def _records_of(count: int, host: str) -> list[Record]:
    return make_records(count, maker=RecordMaker(host=host, os_name="linux", backend="fake", tags={}))


async def test_subjects_follow_each_records_own_host(server: NatsServer) -> None:
    """The subject's {host} is the record's own (a relay forwarding several hosts keeps them apart)."""
    async with started(sink(server.url, stream="HOSTS", create_stream=True, subject="hosts.{host}.{type}",
                            stream_subjects=["hosts.>"])) as built:
        await built.write(_records_of(2, "a.example") + _records_of(2, "b"))
        stored = await read_stream([server.url], "HOSTS")
    assert [s.subject for s in stored] == ["hosts.a_example.sample"] * 2 + ["hosts.b.sample"] * 2


async def test_close_is_prompt_with_nothing_to_say(server: NatsServer) -> None:
    """close() after writes returns quickly (no lingering reconnect task)."""
    built = sink(server.url, stream="CLOSE", create_stream=True, subject="close.{host}",
                 stream_subjects=["close.>"])
    await built.start()
    await built.write(make_records(2))
    await asyncio.wait_for(built.close(), scaled(5))

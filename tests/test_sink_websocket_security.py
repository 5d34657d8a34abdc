"""The WebSocket sink against hostile clients: cross-site pages, malformed requests, token leaks."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote, unquote_plus

import pytest
from websockets.typing import Origin

from memagent.options import Options
from memagent.plugins.sinks.websocket import WebSocketSink
from memagent.testing import make_records, sink_context

from attacker import NOBODY, nobody_python
from cli_helpers import run_cli
from ws_helpers import (
    TOKEN,
    WRONG,
    captured,
    connect,
    connected,
    handshake,
    http_exchange,
    receive,
    running_sink,
    token_forms,
    url,
)

#: A page on another site: the WebSocket request its script `new WebSocket("ws://127.0.0.1:PORT/
#: ?since=0")` makes, Origin included, sent by the attacker. Prints its uid, the status, what it read.
ATTACKER = r"""
import base64, os, socket
port, origin = {port}, {origin!r}
key = base64.b64encode(os.urandom(16)).decode()
request = (f"GET /?since=0 HTTP/1.1\r\nHost: 127.0.0.1:{{port}}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {{key}}\r\nSec-WebSocket-Version: 13\r\n"
           f"Origin: {{origin}}\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\r\n")
data = b""
with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
    sock.sendall(request.encode())
    while b'"seq"' not in data and len(data) < 65536:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "none"
print(os.getuid(), status, "read-records" if b'"seq"' in data else "read-nothing")
"""


async def test_cross_site_page_run_by_an_unprivileged_attacker_gets_403() -> None:
    """With the defaults (no token, no origins), another site's page is refused (403) and reads
    nothing; the attacker is a real other user (uid 65534, through setpriv) in its own process."""
    if os.geteuid() != 0:
        pytest.skip("attack tests need root (the agent's user) and setpriv")
    async with running_sink() as sink:
        await sink.write(make_records(5))
        code = ATTACKER.format(port=sink.port, origin="https://evil.example")
        result = await asyncio.to_thread(nobody_python, code)
    assert result.stdout.split() == [str(NOBODY), "403", "read-nothing"], result.stdout + result.stderr
    assert sink.context.counters["rejected_origin"] == 1


@pytest.mark.parametrize(("origin", "host"), [
    ("http://evil.example:{port}", "evil.example:{port}"),  # DNS rebinding: the page's name, our address
    ("https://127.0.0.1:{port}", "127.0.0.1:{port}"),  # https page, plain feed: another origin
    ("http://127.0.0.1:1", "127.0.0.1:{port}"),  # another port is another origin
    ("null", "127.0.0.1:{port}"),  # sandboxed iframes, file:// pages
])
async def test_other_origins_are_refused_even_when_they_look_local(origin: str, host: str) -> None:
    """An Origin that is not exactly the feed's own loopback origin gets 403."""
    async with running_sink() as sink:
        request = handshake(sink.port, headers=(("Origin", origin.format(port=sink.port)),),
                            host=host.format(port=sink.port))
        status, _ = await asyncio.to_thread(http_exchange, sink.port, request)
    assert status == 403


async def test_same_origin_page_listed_origins_and_scripts_are_served() -> None:
    """The feed's own pages (127.0.0.1 or localhost), listed origins and clients without Origin
    (scripts, websocat) connect and receive records."""
    async with running_sink(origins=["https://dash.example"]) as sink:
        own = f"http://127.0.0.1:{sink.port}"
        async with connect(url(sink), origin=Origin(own)) as page, \
                connect(url(sink), origin=Origin("https://dash.example")) as listed, \
                connect(url(sink)) as script:
            await connected(sink, 3)
            await sink.write(make_records(2))
            for client in (page, listed, script):
                assert [m["seq"] for m in await receive(client, 2)] == [1, 2]
        local = handshake(sink.port, headers=(("Origin", f"http://localhost:{sink.port}"),),
                          host=f"localhost:{sink.port}")
        status, _ = await asyncio.to_thread(http_exchange, sink.port, local)
    assert status == 101
    assert sink.context.counters["rejected_origin"] == 0


def test_exposure_beyond_loopback_is_warned_when_the_sink_is_built() -> None:
    """A non-loopback host without a token or without TLS is reported (loudly) by from_options
    (which cases warn: tests/test_listener.py)."""
    context = sink_context("websocket")
    WebSocketSink.from_options(Options({"host": "0.0.0.0"}, "sinks[1]"), context)  # noqa: S104
    reports = context.log.reports  # type: ignore[attr-defined]
    assert [r.split(":")[0] for r in reports] == ["SECURITY", "SECURITY"]
    assert "sinks[1]" in reports[0] and "without a token" in reports[0] and "without TLS" in reports[1]


def test_memagent_check_prints_the_exposure_warning(write_config: Callable[[str], Path]) -> None:
    """`memagent check` on a config serving 0.0.0.0 without token or TLS warns on stderr, exit 0."""
    config = write_config('[[targets]]\nname = "me"\nself = true\n'
                          '[[sinks]]\ntype = "websocket"\nhost = "0.0.0.0"\nport = 0\n')
    result = run_cli("check", str(config))
    assert result.returncode == 0, result.stderr
    assert "without a token" in result.stderr and "without TLS" in result.stderr
    assert "SECURITY" in result.stderr


# -- malformed requests ------------------------------------------------------------------------

async def test_duplicated_headers_get_400_and_at_most_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """Duplicated Authorization, Origin or Host headers: 400 each time, counted, one warning
    line in all and no traceback (was: 500 and a traceback per request)."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.WARNING, logger="websockets")  # as `memagent run` sets it
    async with running_sink(token="s3cret") as sink:
        statuses = []
        for header in ("Authorization", "Origin", "Host"):
            value = {"Authorization": "Bearer s3cret", "Origin": f"http://127.0.0.1:{sink.port}",
                     "Host": f"127.0.0.1:{sink.port}"}[header]
            request = handshake(sink.port, headers=((header, value), (header, value)))
            for _ in range(20):
                status, _ = await asyncio.to_thread(http_exchange, sink.port, request)
                statuses.append(status)
    assert statuses == [400] * 60
    assert sink.context.counters["bad_requests"] == 60
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "malformed request" in warnings[0].getMessage(), captured(caplog)
    assert not any(r.exc_info or r.exc_text for r in caplog.records), captured(caplog)


@pytest.mark.parametrize("request_bytes", [
    b"HELLO\r\n\r\n",
    b"GET / HTTP/1.0 extra\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
])
async def test_request_that_is_not_http_gets_400(request_bytes: bytes) -> None:
    """Garbage, a bad request line, a broken header line, a body: 400, counted (was: no answer)."""
    async with running_sink() as sink:
        status, _ = await asyncio.to_thread(http_exchange, sink.port, request_bytes)
        assert status == 400
        assert sink.context.counters["bad_requests"] == 1


# -- the token in logs -------------------------------------------------------------------------

async def test_token_is_redacted_from_debug_logs_in_every_form(caplog: pytest.LogCaptureFixture) -> None:
    """Real requests carrying the token raw, percent-encoded in every variant, in base64 (Basic),
    under an encoded key name, or inside an unparseable request: no log record at debug level
    contains it or any other token= value or Authorization value."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="websockets")
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    async with running_sink(token=TOKEN) as sink:
        port = sink.port
        requests = [handshake(port, headers=(("Authorization", f"Bearer {TOKEN}"),)),
                    handshake(port, headers=(("Authorization", f"Basic {basic}"),)),
                    handshake(port, headers=(("Authorization", f"Bearer {WRONG}"),)),
                    handshake(port, f"/?token={WRONG}"),
                    handshake(port, f"/?type=sample&%74oken={quote(TOKEN, safe='')}"),
                    handshake(port, "/?token=" + quote(TOKEN, safe="").replace("%40", "@")),
                    *(handshake(port, f"/?token={form}") for form in token_forms(TOKEN)[1:5]),
                    f"GET /?token={quote(TOKEN)} HTTP/1.1 junk\r\n\r\n".encode(),  # quoted in a parse error
                    f"GET / HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nbroken\r\n\r\n".encode()]
        statuses = [(await asyncio.to_thread(http_exchange, port, r))[0] for r in requests]
        async with connect(url(sink), additional_headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            await connected(sink, 1)
            await sink.write(make_records(1))
            await receive(client, 1)
    lines = [line for line in captured(caplog) if " websockets.client " not in line]  # not the test's client
    assert any("< GET /?token=" in line for line in lines), "debug request lines were not captured"
    for line in lines:
        for text in (line, unquote(line), unquote_plus(line)):
            for form in (*token_forms(TOKEN), basic, WRONG):
                assert form not in text, f"token leaked as {form!r} in: {line}"
    assert statuses[:2] == [101, 401] and statuses[2:4] == [401, 401]
    assert statuses[4:10] == [101] * 6, statuses  # every encoding of the right token is accepted
    assert statuses[10:] == [400, 400]

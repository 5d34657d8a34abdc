"""The shared HTTP listener on its own, used as a metrics sink would: plain routes only, no feed;
real HTTP requests on a free loopback port."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from email.message import Message
from pathlib import Path
from urllib.parse import quote, unquote, unquote_plus

import pytest
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response

from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks.listener import CLOSE_GRACE, Listener, ListenerOptions, response
from memagent.plugins.sinks.listener_security import Throttled, exposure_warnings, same_origin

from cli_helpers import scaled, until
from ws_helpers import (
    TOKEN,
    WRONG,
    captured,
    connect,
    handshake,
    http_exchange,
    http_request,
    self_signed_cert,
    token_forms,
)

METRICS = b"# TYPE up gauge\nup 1\n"
sink_log = logging.getLogger("memagent.test.metrics_sink")  # the user's own logger, named to the listener


def metrics(request: Request) -> Response:
    """What a metrics sink's /metrics would answer: text from memory."""
    return response(200, METRICS, "text/plain; version=0.0.4; charset=utf-8")


def broken(request: Request) -> Response:
    """A route with a bug, whose error message quotes the request (and so maybe the token)."""
    sink_log.warning("serving %s", request.path)
    raise KeyError(f"no series for {request.path}")


def health() -> Mapping[str, object]:
    return {"series": 1}


@asynccontextmanager
async def running_listener(options: ListenerOptions | None = None) -> AsyncIterator[Listener]:
    """A started listener with /metrics (token-protected when there is a token), a public
    /about and a /broken route; no feed; closed afterwards."""
    listener = Listener(options or ListenerOptions(), name="metrics", counters={}, health=health,
                        log=sink_log)
    listener.route("/metrics", metrics)
    listener.route("/about", lambda request: response(200, b"memagent\n", "text/plain"), token=False)
    listener.route("/broken", broken)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()


def get(address: str, headers: Mapping[str, str] | None = None,
        context: ssl.SSLContext | None = None) -> tuple[int, Message, bytes]:
    """GET with urllib: status, headers, body (an error status is returned, not raised)."""
    request = urllib.request.Request(address, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=scaled(5), context=context) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, refused.headers, refused.read()


async def fetch(listener: Listener, path: str, **headers: str) -> tuple[int, Message, bytes]:
    return await asyncio.to_thread(get, f"http://127.0.0.1:{listener.port}{path}", headers)


async def exchange(listener: Listener, request: bytes) -> tuple[int | None, bytes]:
    return await asyncio.to_thread(http_exchange, listener.port, request)


# -- routes ------------------------------------------------------------------------------------

async def test_routes_and_healthz_are_served_on_a_free_port() -> None:
    """Port 0 binds a free port; a registered route answers its text, never cached, closing the
    connection; /healthz answers the user's fields after "status"."""
    async with running_listener() as listener:
        assert listener.port != 0
        status, headers, body = await fetch(listener, "/metrics")
        health_status, _, health_body = await fetch(listener, "/healthz")
        _, head = await exchange(listener, http_request(listener.port, "/metrics"))
    assert (status, body) == (200, METRICS)
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["Cache-Control"] == "no-store" and headers["Connection"] == "close"
    assert head.count(b"\r\nServer: ") == 1
    assert (health_status, json.loads(health_body)) == (200, {"status": "ok", "series": 1})


async def test_unknown_paths_get_404_and_other_methods_405() -> None:
    """Only registered paths exist; anything but GET is refused with 405 and Allow: GET."""
    async with running_listener() as listener:
        missing, _, _ = await fetch(listener, "/")
        other, _, _ = await fetch(listener, "/metrics/extra")
        post, post_head = await exchange(listener, http_request(listener.port, "/metrics", method="POST"))
        head, _ = await exchange(listener, http_request(listener.port, "/healthz", method="HEAD"))
    assert (missing, other) == (404, 404)
    assert (post, head) == (405, 405) and b"\r\nAllow: GET" in post_head


async def test_route_that_raises_answers_500_and_the_listener_carries_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a route: 500, counted in server_errors, one log line per period, no traceback;
    the next requests are served."""
    caplog.set_level(logging.WARNING)
    async with running_listener() as listener:
        statuses = [(await fetch(listener, "/broken"))[0] for _ in range(3)]
        after, _, _ = await fetch(listener, "/metrics")
    assert statuses == [500] * 3 and after == 200
    assert listener.counters["server_errors"] == 3
    failures = [m for r in caplog.records if r.name == sink_log.name and "failed" in (m := r.getMessage())]
    assert len(failures) == 1 and "GET /broken failed (500): KeyError" in failures[0], failures
    assert not any(r.exc_info or r.exc_text for r in caplog.records)


def test_route_paths_must_be_free() -> None:
    """/healthz and a path already routed cannot be routed again."""
    listener = Listener(ListenerOptions(), name="metrics", counters={}, health=health)
    listener.route("/metrics", metrics)
    for taken in ("/healthz", "/metrics", "metrics"):
        with pytest.raises(ValueError, match="not a free path"):
            listener.route(taken, metrics)


async def test_upgrade_is_refused_without_a_feed() -> None:
    """No feed: a WebSocket handshake is never upgraded: 404 on an unknown path, the plain answer
    on a route; a real WebSocket client is refused."""
    async with running_listener() as listener:
        unknown, _ = await exchange(listener, handshake(listener.port, "/"))
        route, _ = await exchange(listener, handshake(listener.port, "/metrics"))
        health_check, _ = await exchange(listener, handshake(listener.port, "/healthz"))
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{listener.port}/metrics"):
                pass
    assert (unknown, route, health_check) == (404, 200, 200)
    assert refused.value.response.status_code == 200


# -- the token ---------------------------------------------------------------------------------

async def test_token_guards_routes_but_not_healthz_or_public_routes() -> None:
    """With a token, /metrics needs it (Bearer header or ?token=; 401 otherwise, counted);
    /healthz and a route registered with token=False do not."""
    async with running_listener(ListenerOptions(token="s3cret")) as listener:
        refused = [await fetch(listener, "/metrics"),
                   await fetch(listener, "/metrics", Authorization="Bearer wrong"),
                   await fetch(listener, "/metrics?token=wrong")]
        by_header = await fetch(listener, "/metrics", Authorization="Bearer s3cret")
        by_query = await fetch(listener, "/metrics?token=s3cret")
        public = [(await fetch(listener, path))[0] for path in ("/healthz", "/about")]
    assert [status for status, _, _ in refused] == [401] * 3
    assert refused[0][1]["WWW-Authenticate"] == 'Bearer realm="memagent"'
    assert by_header[::2] == by_query[::2] == (200, METRICS)
    assert public == [200, 200]
    assert listener.counters["rejected_auth"] == 3


async def test_tls_serves_https(tmp_path: Path) -> None:
    """tls_cert/tls_key: the routes over HTTPS, and an https page of the listener's own origin."""
    cert, key = self_signed_cert(tmp_path)
    table = Options({"tls_cert": str(cert), "tls_key": str(key), "port": 0}, "sinks[1]")
    trust = ssl.create_default_context(cafile=str(cert))
    async with running_listener(ListenerOptions.read(table, port=9)) as listener:
        assert listener.tls
        address = f"https://127.0.0.1:{listener.port}/metrics"
        own = await asyncio.to_thread(get, address, {"Origin": f"https://127.0.0.1:{listener.port}"}, trust)
        plain = await asyncio.to_thread(get, address, {"Origin": f"http://127.0.0.1:{listener.port}"}, trust)
    assert own[::2] == (200, METRICS)
    assert plain[0] == 403


# -- browsers ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("origin", "host", "allowed"), [
    ("http://127.0.0.1:{port}", "127.0.0.1:{port}", True),  # the listener's own page
    ("http://localhost:{port}", "localhost:{port}", True),
    ("https://dash.example", "127.0.0.1:{port}", True),  # listed in origins
    ("https://evil.example", "127.0.0.1:{port}", False),  # another site
    ("http://evil.example:{port}", "evil.example:{port}", False),  # DNS rebinding
    ("http://127.0.0.1:1", "127.0.0.1:{port}", False),  # another port
    ("null", "127.0.0.1:{port}", False),  # sandboxed iframes, file:// pages
])
async def test_origin_policy_covers_every_path(origin: str, host: str, allowed: bool) -> None:
    """A browser request is served only from the listener's own loopback origin or a listed one,
    on routes and /healthz alike; refusals are 403, counted."""
    async with running_listener(ListenerOptions(origins=frozenset({"https://dash.example"}))) as listener:
        port = listener.port
        headers = (("Origin", origin.format(port=port)),)
        statuses = [(await exchange(listener, http_request(port, path, headers, host.format(port=port))))[0]
                    for path in ("/metrics", "/healthz")]
    assert statuses == ([200, 200] if allowed else [403, 403])
    assert listener.counters["rejected_origin"] == (0 if allowed else 2)


def test_same_origin_compares_scheme_host_and_port() -> None:
    """Default ports count, TLS means https, loopback-only refuses other names."""
    assert same_origin("http://127.0.0.1", "127.0.0.1:80", tls=False, loopback_only=True)
    assert same_origin("https://[::1]:8443", "[::1]:8443", tls=True, loopback_only=True)
    assert same_origin("https://feed.example", "feed.example", tls=True, loopback_only=False)
    assert not same_origin("http://feed.example", "feed.example", tls=True, loopback_only=False)
    assert not same_origin("http://feed.example", "feed.example", tls=False, loopback_only=True)
    assert not same_origin("http://127.0.0.1:x", "127.0.0.1:x", tls=False, loopback_only=True)
    assert not same_origin("http://127.0.0.1/", "127.0.0.1", tls=False, loopback_only=True)
    assert not same_origin("http://127.0.0.1", None, tls=False, loopback_only=True)


# -- malformed requests ------------------------------------------------------------------------

async def test_malformed_requests_get_400_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Duplicated Host/Origin/Authorization headers, garbage, a body: 400 each time, counted in
    bad_requests, one warning line in all, never a traceback."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.WARNING, logger="websockets")  # as `memagent run` sets it
    async with running_listener(ListenerOptions(token="s3cret")) as listener:
        port = listener.port
        requests = [http_request(port, "/metrics", ((name, value), (name, value))) for name, value in
                    (("Authorization", "Bearer s3cret"), ("Origin", f"http://127.0.0.1:{port}"),
                     ("Host", f"127.0.0.1:{port}"))]
        requests += [b"HELLO\r\n\r\n", b"GET /metrics HTTP/1.1\r\nBad Header Line\r\n\r\n",
                     http_request(port, "/metrics", (("Content-Length", "5"),)) + b"hello"]
        statuses = [(await exchange(listener, request))[0] for request in requests * 5]
    assert statuses == [400] * 30
    assert listener.counters["bad_requests"] == 30
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "metrics: malformed request" in warnings[0].getMessage(), captured(caplog)
    assert not any(r.exc_info or r.exc_text for r in caplog.records), captured(caplog)


def test_throttled_log_says_how_many_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    """At most one line per period; the next line counts the ones held back."""
    now = [100.0]
    throttled = Throttled(logging.getLogger("memagent.test.throttled"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="memagent.test.throttled"):
        for step in range(25):  # one event a second for 25 s
            now[0] = 100.0 + step
            throttled.warning(f"event {step}")
    assert [r.getMessage() for r in caplog.records] == [
        "event 0", "event 10 (9 more in the last 10s not logged)",
        "event 20 (9 more in the last 10s not logged)"]


# -- secrets in logs ---------------------------------------------------------------------------

async def test_token_is_redacted_from_every_log_in_every_form(caplog: pytest.LogCaptureFixture) -> None:
    """Requests carrying the token (raw, percent-encoded, base64, under an encoded key, inside an
    unparseable request) or a wrong one, and a failing route whose error and whose sink's own log
    line quote it: no record at debug level contains any form of either."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="websockets")
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    async with running_listener(ListenerOptions(token=TOKEN)) as listener:
        port = listener.port
        requests = [http_request(port, "/metrics", (("Authorization", f"Bearer {TOKEN}"),)),
                    http_request(port, "/metrics", (("Authorization", f"Basic {basic}"),)),
                    http_request(port, "/metrics", (("Authorization", f"Bearer {WRONG}"),)),
                    http_request(port, f"/metrics?token={WRONG}"),
                    http_request(port, f"/metrics?x=1&%74oken={quote(TOKEN, safe='')}"),
                    *(http_request(port, f"/broken?token={form}") for form in token_forms(TOKEN)[1:5]),
                    f"GET /metrics?token={quote(TOKEN)} HTTP/1.1 junk\r\n\r\n".encode(),
                    f"GET / HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nbroken\r\n\r\n".encode()]
        statuses = [(await exchange(listener, request))[0] for request in requests]
    lines = captured(caplog)
    assert any("< GET /metrics?token=" in line for line in lines), "debug request lines were not captured"
    assert any("serving /broken?token=" in line for line in lines), "the sink's own line was not captured"
    for line in lines:
        for text in (line, unquote(line), unquote_plus(line)):
            for form in (*token_forms(TOKEN), basic, WRONG):
                assert form not in text, f"token leaked as {form!r} in: {line}"
    assert statuses == [200, 401, 401, 401, 200, 500, 500, 500, 500, 400, 400]


# -- lifecycle and options ---------------------------------------------------------------------

async def test_close_is_bounded_with_idle_and_half_sent_requests() -> None:
    """Connections that never finish their request do not hold close() past 2 × CLOSE_GRACE (plus
    slack); they are closed, and the redaction filters are removed."""
    listener = Listener(ListenerOptions(), name="metrics", counters={}, health=health, log=sink_log)
    await listener.start()
    assert sink_log.filters
    idle = [await asyncio.to_thread(socket.create_connection, ("127.0.0.1", listener.port))
            for _ in range(3)]
    try:
        idle[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: 127")
        await until(lambda: len(listener._connections) == 3)  # noqa: SLF001 - accepted, not answered
        await asyncio.wait_for(listener.close(), scaled(2 * CLOSE_GRACE + 1.0))
        for sock in idle:
            sock.settimeout(scaled(5))
            assert await asyncio.to_thread(sock.recv, 1024) == b""  # closed by the listener
    finally:
        for sock in idle:
            sock.close()
    assert not sink_log.filters


def test_options_are_read_from_a_sink_table() -> None:
    """host, port, token, origins, tls_* are consumed; the sink's own keys are left to it."""
    table = Options({"host": "::1", "port": 0, "token": "t", "origins": "https://a.example",
                     "path": "/metrics"}, "sinks[2]")
    options = ListenerOptions.read(table, port=9100)
    assert (options.host, options.port, options.token, options.origins, options.tls) == (
        "::1", 0, "t", frozenset({"https://a.example"}), None)
    assert ListenerOptions.read(Options({}, "sinks[2]"), port=9100).port == 9100
    with pytest.raises(ConfigError, match=r"^sinks\[2\]\.path: unknown key"):
        table.finish()


@pytest.mark.parametrize(("options", "message"), [
    ({"port": 70000}, "sinks[1].port: must be at most 65535"),
    ({"tls_cert": "/nonexistent.pem"}, "sinks[1].tls_key: tls_cert and tls_key go together"),
    ({"tls_key": "/nonexistent.pem"}, "sinks[1].tls_cert: tls_cert and tls_key go together"),
    ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.pem"}, "sinks[1].tls_cert: cannot load"),
    ({"token": ""}, "sinks[1].token: must not be empty"),
    ({"origins": [1]}, "sinks[1].origins: must be an array of strings"),
])
def test_bad_options_name_the_key(options: dict[str, object], message: str) -> None:
    """Bad listener options are ConfigErrors starting with the dotted key."""
    with pytest.raises(ConfigError) as caught:
        ListenerOptions.read(Options(dict(options), "sinks[1]"), port=9100)
    assert str(caught.value).startswith(message)


def test_exposure_beyond_loopback_is_reported() -> None:
    """Loopback is quiet; beyond it a missing token and missing TLS are each a SECURITY report
    naming the table and what is served; the token itself never appears."""
    assert exposure_warnings("127.0.0.1", None, False) == []
    assert exposure_warnings("::1", None, False) == []
    assert exposure_warnings("localhost", None, False) == []
    assert exposure_warnings("0.0.0.0", "t0ken", True) == []  # noqa: S104 - the case under test
    assert len(exposure_warnings("0.0.0.0", None, False)) == 2  # noqa: S104 - the case under test
    [tls_only] = exposure_warnings("10.1.2.3", "t0ken", False)
    assert "without TLS" in tls_only and "t0ken" not in tls_only
    reports: list[str] = []
    ListenerOptions(host="0.0.0.0").report_exposure("sinks[3]", reports.append, serves="metrics")  # noqa: S104
    assert [r.split(": ", 2)[:2] for r in reports] == [["SECURITY", "sinks[3]"]] * 2
    assert all('host = "0.0.0.0" serves metrics beyond this machine' in r for r in reports)

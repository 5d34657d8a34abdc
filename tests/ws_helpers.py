"""Helpers for WebSocket sink and listener tests: a started sink on a free loopback port, clients,
receiving, raw HTTP requests; Chromium for the dashboard."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from memagent.options import Options
from memagent.plugins.sinks.websocket import WebSocketSink
from memagent.testing import sink_context

from cli_helpers import AgentProcess, scaled


@asynccontextmanager
async def running_sink(**options: Any) -> AsyncIterator[WebSocketSink]:
    """A started websocket sink on 127.0.0.1, port 0 unless given; closed afterwards."""
    options.setdefault("port", 0)
    sink = WebSocketSink.from_options(Options(options, "sinks[1]"), sink_context("websocket"))
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def url(sink: WebSocketSink, query: str = "", scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{sink.port}{sink.path}" + (f"?{query}" if query else "")


async def receive(client: ClientConnection, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The next ``count`` messages, decoded (arrays are flattened)."""
    messages: list[dict[str, Any]] = []
    while len(messages) < count:
        data = orjson.loads(await asyncio.wait_for(client.recv(), timeout))
        messages.extend(data if isinstance(data, list) else [data])
    return messages


async def connected(sink: WebSocketSink, clients: int) -> None:
    """Wait until the sink has registered ``clients`` clients."""
    for _ in range(1000):
        if len(sink.clients) >= clients:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"only {len(sink.clients)} of {clients} clients connected")


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1, made with the openssl command."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


__all__ = ["CHROMIUM_ARGS", "TOKEN", "WRONG", "agent_run", "captured", "connect", "connected", "feed_port",
           "free_port", "handshake", "http_exchange", "http_request", "receive", "running_sink",
           "self_signed_cert", "stalled_client", "token_forms", "url"]

#: How the tests start Debian's chromium: headless, and nothing that phones home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def stalled_client(port: int, path: str = "/") -> socket.socket:
    """A real client that completes the WebSocket handshake and then never reads: a tiny receive
    buffer, so the server's writes back up as they would behind a stuck browser tab."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(scaled(10))  # for the handshake only
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        byte = sock.recv(1)  # byte by byte: read the handshake and nothing after it
        if not byte:
            raise AssertionError(f"the server closed during the handshake: {response!r}")
        response += byte
    assert response.startswith(b"HTTP/1.1 101"), response
    sock.settimeout(None)
    return sock


def http_request(port: int, path: str = "/", headers: tuple[tuple[str, str], ...] = (),
                 host: str | None = None, method: str = "GET") -> bytes:
    """A plain HTTP/1.1 request, byte for byte (``Host`` is the listener's unless given)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}",
             *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def handshake(port: int, path: str = "/", headers: tuple[tuple[str, str], ...] = (),
              host: str | None = None) -> bytes:
    """A WebSocket opening request as a browser or a script would send it, byte for byte."""
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = (("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", key),
               ("Sec-WebSocket-Version", "13"))
    return http_request(port, path, (*upgrade, *headers), host)


def http_exchange(port: int, request: bytes, timeout: float = 10) -> tuple[int | None, bytes]:
    """Send raw request bytes; return the response's status (None: no response) and its head."""
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(timeout)) as sock:
        sock.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
    head = response.split(b"\r\n\r\n", 1)[0]
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
    return (int(match.group(1)) if match else None), head


def feed_port(agent: AgentProcess) -> int:
    """The port of the websocket feed of a running ``memagent run``, once it has logged it."""
    return int(agent.wait_for_stderr(r"websocket feed on wss?://[^:/]+:(\d+)/").group(1))


def agent_run(agent: AgentProcess) -> str:
    """The run id of a running ``memagent run --log-level info``, once it has logged it."""
    return agent.wait_for_stderr(r"run ([0-9a-f]{16}):").group(1)


def free_port() -> int:
    """A loopback port free right now: for an agent that must come back on the same port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- secrets in logs ---------------------------------------------------------------------------

TOKEN = "p@ss/w:rd+ x%Z~é"  # noqa: S105 - a test secret with characters that every encoding changes
WRONG = "not-the-token-7Q"  # noqa: S105 - sent as a token: redacted too, matching or not


def token_forms(token: str) -> list[str]:
    """The ways a token travels: raw, percent-encoded (both hex cases, + for space), base64."""
    upper = quote(token, safe="")
    lower = re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), upper)
    return [token, upper, lower, quote_plus(token), quote(token), base64.b64encode(token.encode()).decode()]


def captured(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured log record as a handler would print it, tracebacks included."""
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    return [formatter.format(record) for record in caplog.records]

"""The HTTP side of the ``otlp`` sink: one keep-alive connection that POSTs a body and reads a
bounded answer, with the standard library's :mod:`http.client` (no dependency; see below).

- :class:`Endpoint` is the parsed ``endpoint`` option: http or https, no credentials in the URL
  (they belong in ``headers``, which are never logged), a path (``/v1/metrics`` by default).
- :class:`Poster` is blocking and meant for one worker thread at a time (the sink never has two
  requests in flight: the framework never calls ``write`` concurrently). It keeps one connection
  open between requests; a request on a kept connection that the server closed while idle (its
  idle timeout) is sent once more on a fresh connection, so a slow ``interval`` does not turn every
  request into a logged failure. Every socket operation has ``timeout``; :meth:`Poster.abort`
  (from the event loop, when the whole exchange overran) shuts the socket down so a blocked
  request returns at once. An answer's body is read up to :data:`MAX_ANSWER_BYTES`; the rest is
  not read and the connection is then closed, so a hostile or broken server cannot make the
  agent hold more than that.
- :func:`retry_after` reads a ``Retry-After`` header in both of its forms (seconds, HTTP-date).

Why not aiohttp: one request at a time, already off the event loop in a worker thread, needs
none of an asynchronous client's concurrency; the standard library gives keep-alive, TLS with
the system's or a given CA, and timeouts, and keeps a root agent's dependencies few. Proxies
(``HTTPS_PROXY``) are not used: the usual target is a collector on the host or its network.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from memagent.errors import ConfigError

#: The most of an answer's body that is read (an ExportMetricsServiceResponse or a Status is a
#: few hundred bytes; a proxy's HTML error page is cut).
MAX_ANSWER_BYTES = 64 * 1024

#: Errors that mean "the kept connection was closed by the server while idle": the request is
#: sent once more on a fresh connection.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


@dataclass(frozen=True)
class Endpoint:
    """Where requests go. ``target`` is the path with its query, as sent in the request line."""

    https: bool
    host: str
    port: int
    target: str

    @classmethod
    def parse(cls, url: str, key: str) -> Endpoint:
        """The endpoint from the ``endpoint`` option; ConfigError (at ``key``) if it is not an
        http(s) URL with a host, or carries credentials."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(key, f"not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(key, "must be an http:// or https:// URL with a host "
                                   f"(like http://127.0.0.1:4318/v1/metrics), got scheme {parts.scheme!r}")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(key, "must not carry credentials (user:password@); send them in headers, "
                                   "which are never logged")
        if parts.fragment:
            raise ConfigError(key, "must not have a #fragment")
        https = parts.scheme == "https"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(https, parts.hostname, port or (443 if https else 80), target)

    def __str__(self) -> str:
        """``scheme://host:port/path`` without the query (which could hold a secret): for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.https else 'http'}://{host}:{self.port}{self.target.split('?', 1)[0]}"


@dataclass(frozen=True)
class Answer:
    """A server's answer: status, the headers the sink reads (lowercase names), and at most
    :data:`MAX_ANSWER_BYTES` of the body (``cut`` when there was more)."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    cut: bool = False


class Poster:
    """POSTs to one endpoint over one kept connection. See the module docstring."""

    def __init__(self, endpoint: Endpoint, *, headers: dict[str, str], timeout: float,
                 tls: ssl.SSLContext | None) -> None:
        self.endpoint = endpoint
        self.headers = dict(headers)
        self.timeout = timeout
        self.tls = tls
        self._connection: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()  # guards _connection and _aborted between the worker and abort()
        self._aborted = False

    def _connect(self) -> http.client.HTTPConnection:
        if self.endpoint.https:
            return http.client.HTTPSConnection(self.endpoint.host, self.endpoint.port,
                                               timeout=self.timeout, context=self.tls)
        return http.client.HTTPConnection(self.endpoint.host, self.endpoint.port, timeout=self.timeout)

    def post(self, body: bytes, headers: dict[str, str]) -> Answer:
        """Send ``body`` with ``headers`` and the configured ones (which win); the answer. Raises OSError
        or :class:`http.client.HTTPException` when no answer came (refused, reset, timed out,
        aborted)."""
        with self._lock:
            self._aborted = False
            connection, reused = self._connection, self._connection is not None
            if connection is None:
                connection = self._connection = self._connect()
        try:
            return self._exchange(connection, body, headers)
        except _STALE:
            with self._lock:
                if not reused or self._aborted:
                    raise
                # the server closed the kept connection while it was idle: once more, afresh
                connection = self._connection = self._connect()
        return self._exchange(connection, body, headers)

    def _exchange(self, connection: http.client.HTTPConnection, body: bytes,
                  headers: dict[str, str]) -> Answer:
        try:
            connection.request("POST", self.endpoint.target, body=body, headers={**headers, **self.headers})
            response = connection.getresponse()
            wanted = response.length if response.length is not None else MAX_ANSWER_BYTES + 1
            data = response.read(min(wanted, MAX_ANSWER_BYTES + 1))
        except BaseException:
            self._discard(connection)
            raise
        cut = len(data) > MAX_ANSWER_BYTES or not response.isclosed()
        if cut or response.will_close:
            self._discard(connection)  # the rest of the body is left unread: it cannot be reused
        answer_headers = {name.lower(): value for name, value in response.getheaders()}
        return Answer(response.status, response.reason, answer_headers, data[:MAX_ANSWER_BYTES], cut)

    def abort(self) -> None:
        """Shut the connection's socket down (from any thread): a request blocked on it fails at
        once. The next :meth:`post` connects afresh."""
        with self._lock:
            connection, self._connection, self._aborted = self._connection, None, True
        if connection is not None and connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    def _discard(self, connection: http.client.HTTPConnection) -> None:
        """Close ``connection``; the next request connects afresh."""
        with self._lock:
            if self._connection is connection:
                self._connection = None
        with contextlib.suppress(OSError):
            connection.close()

    def close(self) -> None:
        """Close the kept connection, if any."""
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.close()


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds (``"120"``) or an HTTP-date
    (``"Wed, 21 Oct 2026 07:28:00 GMT"``, counted from ``now``, default the wall clock). None when
    absent or unreadable; 0 for a date already past."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))

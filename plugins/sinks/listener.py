"""The shared, hardened HTTP listener of every sink that serves HTTP.

A sink reads its listener options with :meth:`ListenerOptions.read`, builds one :class:`Listener`
and adds its plain-HTTP routes (:meth:`Listener.route`); a sink with a WebSocket endpoint also
gives it a :class:`Feed`. The listener is websockets' ``serve`` with one ``process_request`` that
answers every request itself, except a handshake on the feed's path that passes every check.
The policies it applies live in :mod:`memagent.plugins.sinks.listener_security`.

Guarantees:

- Requests are parsed by websockets: request and header lines of at most 8 KiB, at most 128
  headers, no body (a request announcing one gets 400), the whole request within 10 s (its
  ``open_timeout``) — websockets' defaults, which its ``WEBSOCKETS_MAX_LINE_LENGTH`` and
  ``WEBSOCKETS_MAX_NUM_HEADERS`` environment variables can change. Every response closes its
  connection (no keep-alive).
- Every request is checked in this order, before any route or the feed sees it:

  1. well formed: duplicated ``Host``, ``Origin`` or ``Authorization`` headers, a request that is
     not HTTP at all, or any unexpected error in these checks get 400, counted in
     ``bad_requests``, at most one log line per :data:`BAD_REQUEST_LOG_EVERY` seconds, never a
     traceback;
  2. the Origin policy: a request carrying ``Origin`` (a browser) gets 403 (``rejected_origin``)
     unless that origin is the listener's own (same scheme, and host:port equal to the request's
     ``Host``; on a loopback listener only a loopback name, which defeats DNS rebinding) or is
     listed in ``origins``. Requests without ``Origin`` (scripts, scrapers) are unaffected;
  3. the method: anything but GET gets 405;
  4. ``GET /healthz``: ``{"status": "ok", ...}`` with what the sink's ``health`` callback returns;
     no token needed;
  5. the sink's routes, each behind the token unless registered with ``token=False``: 401
     (``rejected_auth``) without it. The token is ``Authorization: Bearer <token>`` or
     ``?token=<token>``, compared with ``hmac.compare_digest``. A route that raises (or whose
     awaitable raises) answers 500, counted in ``server_errors``, logged at most every
     :data:`BAD_REQUEST_LOG_EVERY` seconds;
  6. the feed's path, when the sink has a feed: the token (401), then ``Feed.full`` (503,
     ``rejected_full``); only then the WebSocket handshake. Every other path gets 404.

  Without a feed no request is ever upgraded: a handshake gets the answer a plain request would
  (404 on an unknown path; a route answers as usual, which refuses the upgrade).
- ``close`` returns within about 2 × :data:`CLOSE_GRACE` whatever the clients do: WebSocket clients
  are sent 1001 (going away), and connections still open after the grace period are aborted.
- The token is never logged, in any form: the raw token, any percent-encoding of it, its base64,
  and every ``token=`` query value and ``Authorization`` value (matching or not) are redacted from
  every record of the listener's loggers, of its websockets logger and of the loggers the sink
  names, tracebacks included, from :meth:`Listener.start` to the end of :meth:`Listener.close`.
- Serving beyond loopback without a token, or without TLS, is reported when the sink is built
  (:meth:`ListenerOptions.report_exposure`, so ``memagent check`` says it too).

Not guaranteed: any limit on how many connections are open at once (each plain request is answered
and closed at once; the feed limits its own clients); HEAD, bodies, chunked requests; a route's
speed: routes run on the event loop and must answer from memory, without blocking (a route with
CPU-heavy work returns an awaitable and does that work off the loop, e.g. ``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage
from websockets.http11 import Request, Response

from memagent.contracts import declare_counters
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks.listener_security import (
    Redactor,
    Throttled,
    exposure_warnings,
    is_loopback,
    same_origin,
    token_matches,
)

HEALTH_PATH = "/healthz"
#: Seconds clients get at shutdown to complete the closing handshake before their connections are
#: aborted; close() takes at most about twice this, so SIGTERM ends within drain_timeout + 1 s.
CLOSE_GRACE = 0.5
BAD_REQUEST_LOG_EVERY = 10.0  # seconds: at most one log line this often for malformed requests
SINGLE_HEADERS = ("Host", "Origin", "Authorization")  # read by the checks: exactly one or none
#: Seconds a client gets, without a feed, to close its end after a plain response before the
#: connection is aborted (a feed sets its own, Feed.close_timeout).
PLAIN_CLOSE_TIMEOUT = 2.0

# Written before the EOF websockets sends when a request cannot be parsed as HTTP at all.
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nServer: memagent\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 12\r\n\r\nBad Request\n")

Handler = Callable[[Request], Response | Awaitable[Response]]
"""A plain-HTTP route: the request in, the response out (see :func:`response`). Called on the
event loop: it must answer from memory, without blocking. A route whose answer takes CPU time
(rendering a large body) returns an awaitable instead, awaited before answering, and does that work
off the loop; the request's ``open_timeout`` (10 s) still bounds it."""


@dataclass(frozen=True, slots=True)
class ListenerOptions:
    """Where and how a listener serves: the keys ``host``, ``port``, ``token``, ``origins``,
    ``tls_cert`` and ``tls_key`` of a sink's table, the same for every sink that serves HTTP."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port, reported by Listener.port once started
    token: str | None = None
    origins: frozenset[str] = frozenset()  # browser origins allowed besides the listener's own
    tls: ssl.SSLContext | None = None

    @classmethod
    def read(cls, options: Options, *, port: int) -> ListenerOptions:
        """Consume the listener's keys from a sink's ``options`` (``port`` is the sink's default
        port); errors are ConfigErrors naming the dotted key. The sink reads its own keys, calls
        ``options.finish()`` and then :meth:`report_exposure`."""
        cert = options.string("tls_cert", None, nonempty=True)
        key = options.string("tls_key", None, nonempty=True)
        if (cert is None) != (key is None):
            raise ConfigError(options.key("tls_cert" if cert is None else "tls_key"),
                              "tls_cert and tls_key go together")
        tls = None
        if cert is not None and key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                tls.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(options.key("tls_cert"), f"cannot load certificate/key: {exc}") from None
        return cls(host=options.string("host", "127.0.0.1", nonempty=True),
                   port=options.integer("port", port, minimum=0, maximum=65535),
                   token=options.string("token", None, nonempty=True),
                   origins=frozenset(options.string_list("origins", None) or ()),
                   tls=tls)

    def report_exposure(self, table: str, report: Callable[[str], None], *, serves: str,
                        reveals: str = "every process's command line") -> None:
        """Report (``SECURITY: <table>: ...``) what is unsafe about serving ``serves`` (e.g.
        "the feed", which ``reveals`` command lines) with these options; see
        :func:`~.listener_security.exposure_warnings`."""
        for warning in exposure_warnings(self.host, self.token, self.tls is not None, serves=serves,
                                         reveals=reveals):
            report(f"SECURITY: {table}: {warning}")


@dataclass(frozen=True, slots=True)
class Feed:
    """A WebSocket endpoint on a listener: a handshake for ``path`` that passes the listener's
    checks, the token, and ``full()`` (False) is upgraded and handed to ``handler``. The other
    fields are websockets' per-connection settings (see its ``serve``)."""

    path: str
    handler: Callable[[ServerConnection], Awaitable[None]]
    full: Callable[[], bool]  # True: refuse new clients with 503
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    write_limit: int = 65536
    max_size: int = 4096
    max_queue: int = 4
    close_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class _Route:
    handler: Handler
    token: bool


def response(status: int, body: bytes, content_type: str) -> Response:
    """A complete plain-HTTP response, never cached, closing its connection."""
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), ("Connection", "close")])
    return Response(status, HTTPStatus(status).phrase, headers, body)


def peer(connection: ServerConnection) -> str:
    """``host:port`` of the other end, or ``?``."""
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError, AttributeError):
        return "?"


class Listener:
    """One HTTP(S) listener; see the module docstring for what it guarantees.

    ``name`` prefixes its log lines and names its websockets logger; ``counters`` (the sink's
    ``context.counters``) receives ``bad_requests``, ``rejected_origin``, ``rejected_auth``,
    ``server_errors`` and, with a feed, ``rejected_full``; ``health`` supplies the fields of
    ``GET /healthz``; ``log`` is the sink's logger (its ``context.log``): the listener logs
    through it and redacts it, as it redacts websockets' logger.
    No I/O before :meth:`start`.
    """

    def __init__(self, options: ListenerOptions, *, name: str, counters: dict[str, int],
                 health: Callable[[], Mapping[str, object]], feed: Feed | None = None,
                 log: logging.Logger | None = None) -> None:
        self.options, self.name, self.counters, self.feed = options, name, counters, feed
        self.port = options.port  # the bound port once started
        self._health = health
        self._token = options.token.encode() if options.token else None
        self._routes: dict[str, _Route] = {HEALTH_PATH: _Route(self._answer_health, token=False)}
        if feed is not None and (not feed.path.startswith("/") or feed.path in self._routes):
            raise ValueError(f"{name}: the feed cannot be served at {feed.path!r}")
        self._connections: set[ServerConnection] = set()  # every open TCP connection, handshake or not
        self._server: Server | None = None
        self._redactor = Redactor(options.token)
        self._protocol_log = logging.getLogger(f"websockets.server.{name}")
        self.log = log if log is not None else logging.getLogger(f"memagent.sink.{name}")
        self._loggers = (self._protocol_log, self.log)
        self._bad_requests = Throttled(self.log, BAD_REQUEST_LOG_EVERY)
        self._server_errors = Throttled(self.log, BAD_REQUEST_LOG_EVERY)
        declare_counters(counters, "bad_requests", "rejected_origin", "rejected_auth", "server_errors",
                         *(("rejected_full",) if feed else ()))

    @property
    def tls(self) -> bool:
        """Whether it serves HTTPS (and WSS)."""
        return self.options.tls is not None

    def route(self, path: str, handler: Handler, *, token: bool = True) -> None:
        """Answer ``GET path`` with ``handler``; behind the token unless ``token=False`` (for what
        reveals nothing, like a static page). Raises ValueError for a path already served."""
        if not path.startswith("/") or path in self._routes or (self.feed and path == self.feed.path):
            raise ValueError(f"{self.name}: {path!r} is not a free path on this listener")
        self._routes[path] = _Route(handler, token)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve; :attr:`port` is then the bound port (``port = 0`` picks a free one)."""
        for logger in self._loggers:
            logger.addFilter(self._redactor)
        feed = self.feed
        try:
            self._server = await serve(
                feed.handler if feed else _never_upgraded, self.options.host, self.options.port,
                ssl=self.options.tls, process_request=self._process_request, logger=self._protocol_log,
                create_connection=_connection_class(self), server_header="memagent",
                **_websocket_settings(feed))
        except BaseException:
            self._remove_redactor()
            raise
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, send WebSocket clients 1001 (going away); abort connections still open
        after :data:`CLOSE_GRACE` (clients that stopped reading). Bounded whatever the clients do."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()  # stops listening, rejects handshakes in progress, closes clients with 1001
        if not await _finished(server.wait_closed(), CLOSE_GRACE):
            stuck = list(self._connections)
            self.log.warning("%s: %d connection(s) still open %.1fs after closing; aborting them",
                        self.name, len(stuck), CLOSE_GRACE)
            for connection in stuck:
                connection.transport.abort()
            if not await _finished(server.wait_closed(), CLOSE_GRACE):
                self.log.error("%s: connections still open after being aborted; leaving them", self.name)
        self._remove_redactor()

    def _remove_redactor(self) -> None:
        for logger in self._loggers:
            logger.removeFilter(self._redactor)

    # -- requests --------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection,
                         request: Request) -> Response | Awaitable[Response] | None:
        """Answer or refuse a request before the handshake; None only to upgrade it to the feed.
        Never raises (hostile input must not become a 500 and a traceback)."""
        try:
            return self._answer(connection, request)
        except Exception as exc:  # noqa: BLE001 - see the docstring; counted and logged below
            return self._bad_request(connection, f"unexpected {type(exc).__name__}")

    def _answer(self, connection: ServerConnection,
                request: Request) -> Response | Awaitable[Response] | None:
        for name in SINGLE_HEADERS:
            if len(request.headers.get_all(name)) > 1:
                return self._bad_request(connection, f"duplicated {name} header")
        url = urlsplit(request.path)
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.options.origins and not same_origin(
                origin, request.headers.get("Host"), tls=self.tls,
                loopback_only=is_loopback(self.options.host)):
            self.counters["rejected_origin"] += 1
            return connection.respond(403, "Forbidden: origin not allowed\n")
        if request.method != "GET":
            refused = connection.respond(405, "Method Not Allowed\n")
            refused.headers["Allow"] = "GET"
            return refused
        route = self._routes.get(url.path)
        if route is None and (self.feed is None or url.path != self.feed.path):
            return connection.respond(404, "Not Found\n")
        if (route is None or route.token) and not self._authorized(request, url.query):
            self.counters["rejected_auth"] += 1
            refused = connection.respond(401, "Unauthorized\n")
            refused.headers["WWW-Authenticate"] = 'Bearer realm="memagent"'
            return refused
        if route is not None:
            return self._call(route, connection, request, url.path)
        assert self.feed is not None  # the path is the feed's
        if self.feed.full():
            self.counters["rejected_full"] += 1
            return connection.respond(503, "Service Unavailable: too many clients\n")
        return None  # the WebSocket handshake

    def _authorized(self, request: Request, query: str) -> bool:
        return self._token is None or token_matches(request, query, self._token)

    def _call(self, route: _Route, connection: ServerConnection, request: Request,
              path: str) -> Response | Awaitable[Response]:
        try:
            answer = route.handler(request)
        except Exception as exc:  # noqa: BLE001 - the sink's bug: a 500, counted and logged
            return self._server_error(connection, path, exc)
        if isinstance(answer, Response):
            return answer
        return self._awaited(answer, connection, path)

    async def _awaited(self, answer: Awaitable[Response], connection: ServerConnection,
                       path: str) -> Response:
        try:
            return await answer
        except Exception as exc:  # noqa: BLE001 - as in _call
            return self._server_error(connection, path, exc)

    def _server_error(self, connection: ServerConnection, path: str, exc: Exception) -> Response:
        self.counters["server_errors"] += 1
        self._server_errors.warning(f"{self.name}: GET {path} failed (500): {type(exc).__name__}: "
                                    f"{exc}; {self.counters['server_errors']} in all")
        return connection.respond(500, "Internal Server Error\n")

    def _answer_health(self, request: Request) -> Response:
        return response(200, orjson.dumps({"status": "ok", **self._health()}), "application/json")

    def _bad_request(self, connection: ServerConnection, why: str) -> Response:
        """Count a malformed request, log it (rate-limited) and answer 400."""
        self._note_bad_request(connection, why)
        return connection.respond(400, "Bad Request\n")

    def _note_bad_request(self, connection: ServerConnection, why: str) -> None:
        self.counters["bad_requests"] += 1
        self._bad_requests.warning(f"{self.name}: malformed request from {peer(connection)} refused "
                                   f"(400): {why}; {self.counters['bad_requests']} in all")


def _websocket_settings(feed: Feed | None) -> dict[str, Any]:
    """websockets' per-connection settings: the feed's, or (no feed: nothing is ever upgraded)
    only how long a client gets to close after a plain response."""
    if feed is None:
        return {"close_timeout": PLAIN_CLOSE_TIMEOUT}
    return {"ping_interval": feed.ping_interval, "ping_timeout": feed.ping_timeout,
            "write_limit": feed.write_limit, "max_size": feed.max_size, "max_queue": feed.max_queue,
            "close_timeout": feed.close_timeout}


async def _never_upgraded(connection: ServerConnection) -> None:
    """The handler of a listener without a feed, which ``process_request`` never lets run."""
    connection.transport.abort()


def _connection_class(listener: Listener) -> type[ServerConnection]:
    """websockets' connection, tracked by ``listener`` from the first byte (so close() can abort
    any of them, mid-handshake included) and answering a request that is not HTTP with a 400."""

    class ListenerConnection(ServerConnection):
        answered = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            listener._connections.add(self)  # noqa: SLF001 - the listener's own helper class

        def connection_lost(self, exc: Exception | None) -> None:
            listener._connections.discard(self)  # noqa: SLF001 - the listener's own helper class
            super().connection_lost(exc)

        def send_data(self) -> None:
            # websockets answers an unparseable request with a bare EOF; write a 400 before it.
            # (An internal hook: should websockets rename it, requests just get the bare EOF.)
            failed = self.protocol.handshake_exc
            if (not self.answered and self.request is None and isinstance(failed, InvalidMessage)
                    and not isinstance(failed.__cause__, EOFError)):  # EOF: the client just left
                self.answered = True
                listener._note_bad_request(self, "not an HTTP request")  # noqa: SLF001 - as above
                self.transport.write(_BAD_REQUEST)
            super().send_data()

    return ListenerConnection


async def _finished(waiting: Awaitable[None], timeout: float) -> bool:
    """Whether ``waiting`` finished within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(waiting, timeout)
    except TimeoutError:
        return False
    return True

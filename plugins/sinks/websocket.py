"""The ``websocket`` sink: a live feed server for dashboards, scripts and people.

Guarantees:

- ``write`` never waits on a client: each record goes into every subscribed client's own bounded
  queue (``client_queue``). A slow client loses its *oldest* queued records — counted, and told
  to it in a ``{"type": "lag", "dropped": n}`` message before its next record — and once it has
  lost more than ``disconnect_after`` records without catching up it is closed with code 1013
  ("too slow"). Server memory is bounded by clients × ``client_queue`` + ``replay``.
- The last ``replay`` records are kept; a client connecting with ``?since=<seq>`` first gets every
  buffered record after that seq (a ``{"type": "gap"}`` message says what is no longer buffered),
  then the live stream, without loss or repeat in between.
- One ``process_request`` serves ``GET /healthz`` (JSON: clients, sent, dropped), ``GET
  /dashboard`` (a self-contained page, no CDN), then checks the path, the Origin allow-list
  (403), the token (``Authorization: Bearer`` or ``?token=``, compared with
  ``hmac.compare_digest``; 401) and ``max_clients`` (503) before the handshake.
- Bad filters, in the query string or a client message, close that client with 1008 and a reason;
  oversized messages close it with 1009 (``max_size``). The server and other clients carry on.

Not guaranteed: delivery to a client that is too slow (see above) or disconnected; replay beyond
the buffer. The token is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import ssl
from collections import deque
from collections.abc import Sequence
from importlib import resources
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from memagent.contracts import Record, SinkContext
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks.websocket_filters import (
    BadFilter,
    Subscription,
    from_message,
    from_query,
    joined,
)

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008  # bad filter or message
CLOSE_TOO_SLOW = 1013  # "try again later": the client could not keep up
CLOSE_TIMEOUT = 2.0  # seconds a closing client gets to answer; a stuck one must not hold shutdown


class RedactSecret(logging.Filter):
    """Replaces a secret in log messages: websockets logs request lines and headers at debug
    level, and those carry the token (``Authorization`` or ``?token=``)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "<redacted>"), ()
        return True


class Client:
    """One connected client: its subscription, its bounded queue and its sender task."""

    def __init__(self, connection: ServerConnection, subscription: Subscription, capacity: int) -> None:
        self.connection = connection
        self.subscription = subscription
        self.queue: deque[bytes] = deque()
        self.capacity = capacity
        self.ready = asyncio.Event()
        self.dropped_unreported = 0
        self.dropped_since_caught_up = 0
        self.dropped = 0
        self.sent = 0

    def offer(self, message: bytes) -> None:
        if len(self.queue) >= self.capacity:
            self.queue.popleft()
            self.dropped += 1
            self.dropped_unreported += 1
            self.dropped_since_caught_up += 1
        self.queue.append(message)
        self.ready.set()


class WebSocketSink:
    """Streams records to WebSocket clients. See the module docstring."""

    name: ClassVar[str] = "websocket"
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "websocket"
host = "127.0.0.1"          # listen address; "0.0.0.0" to serve other hosts (then set token + TLS)
port = 8765                 # 0 = any free port (logged)
path = "/"                  # the feed; GET /healthz and GET /dashboard are served beside it
# token = "${MEMAGENT_WS_TOKEN}"   # clients send "Authorization: Bearer <token>" or ?token=<token>
# origins = ["https://grafana.example.com"]   # browsers from other origins get 403
# tls_cert = "/etc/memagent/cert.pem"
# tls_key = "/etc/memagent/key.pem"
# max_clients = 100
# client_queue = 1000       # records queued per client before its oldest are dropped (counted)
# disconnect_after = 10000  # a client that lost this many records without catching up is closed
# replay = 1000             # records kept for ?since=<seq> reconnects
# batch = false             # true: each message is a JSON array of records
# ping_interval = "20s"
# ping_timeout = "20s"
# write_limit = 65536       # bytes buffered per connection before its sender waits
# max_size = 4096           # largest client message (filters), bytes
"""

    def __init__(self, *, context: SinkContext, host: str = "127.0.0.1", port: int = 8765, path: str = "/",
                 token: str | None = None, origins: Sequence[str] | None = None,
                 tls: ssl.SSLContext | None = None, max_clients: int = 100, client_queue: int = 1000,
                 disconnect_after: int = 10_000, replay: int = 1000, batch: bool = False,
                 ping_interval: float = 20.0, ping_timeout: float = 20.0, write_limit: int = 65536,
                 max_size: int = 4096) -> None:
        self.context = context
        self.host, self.port, self.path = host, port, path
        self._token = token.encode() if token else None
        self.origins = frozenset(origins) if origins is not None else None
        self.tls = tls
        self.max_clients = max_clients
        self.client_queue = client_queue
        self.disconnect_after = disconnect_after
        self.batch = batch
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.write_limit, self.max_size = write_limit, max_size
        self.replay: deque[Record] = deque(maxlen=replay)
        self.clients: set[Client] = set()
        self._server: Server | None = None
        self._dashboard = b""
        self._closed_drops = 0  # drops of clients that are gone, so the counter never goes down
        for counter in ("clients", "connections", "sent", "client_drops", "disconnected_slow",
                        "rejected_auth", "rejected_origin", "rejected_full", "bad_filters"):
            context.counters.setdefault(counter, 0)

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> WebSocketSink:
        path = options.string("path", "/", nonempty=True)
        if not path.startswith("/") or path in ("/healthz", "/dashboard"):
            raise ConfigError(options.key("path"), f'must start with "/" and not be /healthz or /dashboard, '
                                                   f'got "{path}"')
        cert = options.string("tls_cert", None, nonempty=True)
        key = options.string("tls_key", None, nonempty=True)
        tls = None
        if (cert is None) != (key is None):
            raise ConfigError(options.key("tls_cert" if cert is None else "tls_key"),
                              "tls_cert and tls_key go together")
        if cert is not None and key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                tls.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(options.key("tls_cert"), f"cannot load certificate/key: {exc}") from None
        sink = cls(
            context=context,
            host=options.string("host", "127.0.0.1", nonempty=True),
            port=options.integer("port", 8765, minimum=0, maximum=65535),
            path=path,
            token=options.string("token", None, nonempty=True),
            origins=options.string_list("origins", None),
            tls=tls,
            max_clients=options.integer("max_clients", 100, minimum=1),
            client_queue=options.integer("client_queue", 1000, minimum=1),
            disconnect_after=options.integer("disconnect_after", 10_000, minimum=1),
            replay=options.integer("replay", 1000, minimum=0),
            batch=options.boolean("batch", False),
            ping_interval=options.duration("ping_interval", 20.0),
            ping_timeout=options.duration("ping_timeout", 20.0),
            write_limit=options.integer("write_limit", 65536, minimum=1024),
            max_size=options.integer("max_size", 4096, minimum=64),
        )
        options.finish()
        return sink

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        page = resources.files("memagent.plugins.sinks").joinpath("static/dashboard.html").read_text("utf-8")
        self._dashboard = page.replace("__MEMAGENT_FEED_PATH__", self.path).encode()
        protocol_log = logging.getLogger(f"websockets.server.{self.context.name}")
        if self._token is not None:
            protocol_log.addFilter(RedactSecret(self._token.decode()))
        self._server = await serve(
            self._handle, self.host, self.port, ssl=self.tls, process_request=self._process_request,
            logger=protocol_log,
            ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
            write_limit=self.write_limit, max_size=self.max_size, max_queue=4,
            close_timeout=CLOSE_TIMEOUT,
            server_header="memagent")
        self.port = self._server.sockets[0].getsockname()[1]
        scheme = "wss" if self.tls else "ws"
        log.info("websocket feed on %s://%s:%d%s (dashboard: /dashboard, health: /healthz)",
                 scheme, self.host, self.port, self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()  # closes every connection with 1001 (going away)
            await self._server.wait_closed()

    # -- records in ------------------------------------------------------------------------------

    async def write(self, batch: Sequence[Record]) -> None:
        """Queue the batch for every subscribed client; never waits on a client."""
        self.replay.extend(batch)
        for client in list(self.clients):
            sub = client.subscription
            for record in batch:
                if sub.wants(record):
                    client.offer(sub.encode(record))
            if client.dropped_since_caught_up > self.disconnect_after:
                self._drop_slow(client)
        drops = sum(c.dropped for c in self.clients)
        self.context.counters["client_drops"] = self._closed_drops + drops

    def _drop_slow(self, client: Client) -> None:
        self.clients.discard(client)
        self._closed_drops += client.dropped
        self.context.counters["disconnected_slow"] += 1
        self.context.counters["clients"] = len(self.clients)
        reason = f"too slow: {client.dropped_since_caught_up} records dropped"
        log.warning("websocket client %s closed: %s", _peer(client.connection), reason)
        asyncio.create_task(client.connection.close(CLOSE_TOO_SLOW, reason))

    # -- HTTP before the handshake ---------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/healthz":
            body = orjson.dumps({"status": "ok", "clients": len(self.clients),
                                 "sent": self.context.counters["sent"],
                                 "dropped": self.context.counters["client_drops"],
                                 "replay": len(self.replay)})
            return _response(200, "OK", body, "application/json")
        if url.path == "/dashboard":
            return _response(200, "OK", self._dashboard, "text/html; charset=utf-8")
        if url.path != self.path:
            return connection.respond(404, "Not Found\n")
        origin = request.headers.get("Origin")
        if self.origins is not None and origin is not None and origin not in self.origins:
            self.context.counters["rejected_origin"] += 1
            return connection.respond(403, "Forbidden: origin not allowed\n")
        if self._token is not None and not self._authorized(request, url.query):
            self.context.counters["rejected_auth"] += 1
            response = connection.respond(401, "Unauthorized\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="memagent"'
            return response
        if len(self.clients) >= self.max_clients:
            self.context.counters["rejected_full"] += 1
            return connection.respond(503, "Service Unavailable: too many clients\n")
        return None

    def _authorized(self, request: Request, query: str) -> bool:
        assert self._token is not None
        offered = ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            offered = header[7:].strip()
        else:
            offered = (parse_qs(query).get("token") or [""])[0]
        return hmac.compare_digest(offered.encode(), self._token)

    # -- one connection --------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        self.context.counters["connections"] += 1
        try:
            subscription = from_query(urlsplit(connection.request.path).query if connection.request else "")
        except BadFilter as exc:
            self.context.counters["bad_filters"] += 1
            await connection.close(CLOSE_POLICY, str(exc)[:120])
            return
        client = Client(connection, subscription, self.client_queue)
        self._replay_to(client, subscription.since)
        self.clients.add(client)
        self.context.counters["clients"] = len(self.clients)
        sender = asyncio.create_task(self._send_forever(client))
        try:
            async for message in connection:
                try:
                    client.subscription = from_message(message)
                    if client.subscription.since is not None:
                        raise BadFilter("since: only in the query string, when connecting")
                except BadFilter as exc:
                    self.context.counters["bad_filters"] += 1
                    await connection.close(CLOSE_POLICY, str(exc)[:120])
                    return
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if client in self.clients:
                self.clients.discard(client)
                self._closed_drops += client.dropped
            self.context.counters["clients"] = len(self.clients)

    def _replay_to(self, client: Client, since: int | None) -> None:
        """Queue what the client missed after ``since``; a ``gap`` message if some is gone."""
        if since is None or not self.replay:
            return
        oldest = self.replay[0].seq
        if since + 1 < oldest:
            client.offer(orjson.dumps({"type": "gap", "from": since + 1, "to": oldest - 1}))
        for record in self.replay:
            if record.seq > since and client.subscription.wants(record):
                client.offer(client.subscription.encode(record))

    async def _send_forever(self, client: Client) -> None:
        connection = client.connection
        try:
            while True:
                if not client.queue:
                    client.dropped_since_caught_up = 0
                    client.ready.clear()
                    await client.ready.wait()
                if client.dropped_unreported:
                    lag = orjson.dumps({"type": "lag", "dropped": client.dropped_unreported,
                                        "total_dropped": client.dropped})
                    client.dropped_unreported = 0
                    await connection.send(lag, text=True)
                if self.batch:
                    parts = list(client.queue)
                    client.queue.clear()
                    await connection.send(joined(parts), text=True)
                    sent = len(parts)
                else:
                    await connection.send(client.queue.popleft(), text=True)
                    sent = 1
                client.sent += sent
                self.context.counters["sent"] += sent
        except ConnectionClosed:
            return


def _response(status: int, reason: str, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), ("Server", "memagent")])
    return Response(status, reason, headers, body)


def _peer(connection: ServerConnection) -> str:
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError, AttributeError):
        return "?"


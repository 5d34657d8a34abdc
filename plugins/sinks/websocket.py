"""The ``websocket`` sink: a live feed for dashboards, scripts and people, served on the shared
HTTP listener (:mod:`memagent.plugins.sinks.listener`).

The listener owns everything before the handshake, with its guarantees: options ``host``, ``port``,
``token``, ``origins``, ``tls_cert``, ``tls_key``; malformed requests (400), the Origin policy
(403), the token (401), ``GET /healthz`` (here: clients, sent, dropped, replay), redaction of the
token from every log, exposure warnings and a bounded close. This module is the feed on it:
``GET /dashboard`` (a self-contained page, no CDN, no token needed: it holds no data), ``max_clients``
(503 before the handshake), and, once connected:

- ``write`` never waits on a client: each record goes into every subscribed client's own queue,
  bounded by count (``client_queue``) and by bytes (``client_queue_bytes``). A slow client loses
  its *oldest* queued records — counted alike whichever bound dropped them, and told to it in a
  ``{"type": "lag", "dropped": n}`` message before its next record — and once it has lost more
  than ``disconnect_after`` records without catching up it is closed with code 1013 ("too slow").
  Clients with the same ``fields`` projection share one encoded copy of each record. Server
  memory is bounded by ``replay_bytes`` + clients × (``client_queue_bytes`` + ``write_limit`` +
  one message), counted in encoded JSON bytes.
- The last ``replay`` records (at most ``replay_bytes``) are kept; a client connecting with
  ``?since=<seq>`` first gets a ``{"type": "gap"}`` message saying what is no longer buffered
  (if anything), then every buffered record after that seq, then the live stream, without loss or
  repeat in between. Control messages (``gap``, ``lag``) are never dropped: they are kept apart
  from the record queue and sent before it.
- Bad filters, in the query string or a client message, close that client with 1008 and a reason;
  oversized messages close it with 1009 (``max_size``). The server and other clients carry on.
- ``close`` is the listener's: bounded (about 2 × ``CLOSE_GRACE``) whatever the clients do.

Not guaranteed: delivery to a client that is too slow (see above) or disconnected; replay beyond
the buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import ClassVar
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from memagent.bounded import BoundedQueue
from memagent.contracts import Record, SinkContext, declare_counters
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks.listener import HEALTH_PATH, Feed, Listener, ListenerOptions, peer, response
from memagent.plugins.sinks.websocket_filters import (
    BadFilter,
    Projections,
    Subscription,
    from_message,
    from_query,
    joined,
)

CLOSE_POLICY = 1008  # bad filter or message
CLOSE_TOO_SLOW = 1013  # "try again later": the client could not keep up
CLOSE_TIMEOUT = 2.0  # seconds a client closed for being slow gets to answer before it is aborted
DASHBOARD_PATH = "/dashboard"
MIB = 1024 * 1024

# -- clients ---------------------------------------------------------------------------------------

def _record_bytes(record: Record) -> int:
    return len(record.json)


class Client:
    """One connected client: its subscription, its bounded record queue, its control messages
    (never dropped) and its sender task."""

    def __init__(self, connection: ServerConnection, subscription: Subscription, capacity: int,
                 capacity_bytes: int) -> None:
        self.connection = connection
        self.subscription = subscription
        self.queue: BoundedQueue[bytes] = BoundedQueue(capacity, capacity_bytes, len)
        self.control: deque[bytes] = deque()  # at most one gap message; sent before any record
        self.ready = asyncio.Event()
        self.dropped_unreported = 0
        self.dropped_since_caught_up = 0
        self.dropped = 0
        self.sent = 0

    def offer(self, message: bytes) -> None:
        """Queue a record, dropping the oldest while either bound is exceeded (a record larger
        than the whole byte bound is dropped itself); every drop is counted the same way."""
        dropped = self.queue.push(message)
        if dropped:
            self.dropped += dropped
            self.dropped_unreported += dropped
            self.dropped_since_caught_up += dropped
        self.ready.set()

    def tell(self, message: bytes) -> None:
        """Queue a control message: never dropped, sent before the queued records."""
        self.control.append(message)
        self.ready.set()

    def take(self, every: bool) -> list[bytes]:
        """The oldest queued record, or all of them."""
        return self.queue.take(len(self.queue) if every else 1)


class WebSocketSink:
    """Streams records to WebSocket clients. See the module docstring."""

    name: ClassVar[str] = "websocket"
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "websocket"
host = "127.0.0.1"          # listen address; "0.0.0.0" serves other hosts: set token + TLS (warned)
port = 8765                 # 0 = any free port (logged)
path = "/"                  # the feed; GET /healthz and GET /dashboard are served beside it
# token = "${MEMAGENT_WS_TOKEN}"   # clients send "Authorization: Bearer <token>" or ?token=<token>
# origins = ["https://grafana.example.com"]   # browser pages allowed besides the feed's own origin
# tls_cert = "/etc/memagent/cert.pem"
# tls_key = "/etc/memagent/key.pem"
# max_clients = 100
# client_queue = 1000       # records queued per client before its oldest are dropped (counted)
# client_queue_bytes = "4MiB"   # ... and bytes queued per client, the same way
# disconnect_after = 10000  # a client that lost this many records without catching up is closed
# replay = 1000             # records kept for ?since=<seq> reconnects
# replay_bytes = "16MiB"    # ... at most this many bytes of them
# batch = false             # true: each message is a JSON array of records
# ping_interval = "20s"
# ping_timeout = "20s"
# write_limit = 65536       # bytes buffered per connection before its sender waits
# max_size = 4096           # largest client message (filters), bytes
"""

    def __init__(self, *, context: SinkContext, listener: ListenerOptions | None = None, path: str = "/",
                 max_clients: int = 100, client_queue: int = 1000, client_queue_bytes: int = 4 * MIB,
                 disconnect_after: int = 10_000, replay: int = 1000, replay_bytes: int = 16 * MIB,
                 batch: bool = False, ping_interval: float = 20.0, ping_timeout: float = 20.0,
                 write_limit: int = 65536, max_size: int = 4096) -> None:
        self.context = context
        self.path = path
        self.max_clients = max_clients
        self.client_queue, self.client_queue_bytes = client_queue, client_queue_bytes
        self.disconnect_after = disconnect_after
        self.batch = batch
        self.write_limit = write_limit
        self.replay: BoundedQueue[Record] = BoundedQueue(replay, replay_bytes, _record_bytes)
        self.last_seq = 0
        self.clients: set[Client] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._dashboard = b""
        self._closed_drops = 0  # drops of clients that are gone, so the counter never goes down
        feed = Feed(path, self._handle, full=lambda: len(self.clients) >= self.max_clients,
                    ping_interval=ping_interval, ping_timeout=ping_timeout, write_limit=write_limit,
                    max_size=max_size, close_timeout=CLOSE_TIMEOUT)
        self.listener = Listener(listener or ListenerOptions(port=8765), name=context.name,
                                 counters=context.counters, health=self._health, feed=feed, log=context.log)
        self.listener.route(DASHBOARD_PATH, self._answer_dashboard, token=False)
        declare_counters(context.counters, "clients", "connections", "sent", "client_drops",
                         "disconnected_slow", "bad_filters")

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> WebSocketSink:
        path = options.string("path", "/", nonempty=True)
        if not path.startswith("/") or path in (HEALTH_PATH, DASHBOARD_PATH):
            raise ConfigError(options.key("path"), f'must start with "/" and not be {HEALTH_PATH} or '
                                                   f'{DASHBOARD_PATH}, got "{path}"')
        listener = ListenerOptions.read(options, port=8765)
        client_queue_bytes = options.size("client_queue_bytes", 4 * MIB)
        if client_queue_bytes < 4096:
            raise ConfigError(options.key("client_queue_bytes"), f"must be at least 4096 bytes, "
                                                                 f"got {client_queue_bytes}")
        sink = cls(
            context=context,
            listener=listener,
            path=path,
            max_clients=options.integer("max_clients", 100, minimum=1),
            client_queue=options.integer("client_queue", 1000, minimum=1),
            client_queue_bytes=client_queue_bytes,
            disconnect_after=options.integer("disconnect_after", 10_000, minimum=1),
            replay=options.integer("replay", 1000, minimum=0),
            replay_bytes=options.size("replay_bytes", 16 * MIB),
            batch=options.boolean("batch", False),
            ping_interval=options.duration("ping_interval", 20.0),
            ping_timeout=options.duration("ping_timeout", 20.0),
            write_limit=options.integer("write_limit", 65536, minimum=1024),
            max_size=options.integer("max_size", 4096, minimum=64),
        )
        options.finish()
        listener.report_exposure(options.path, context.log.warning, serves="the feed")
        return sink

    @property
    def port(self) -> int:
        """The listener's port: the bound one once started."""
        return self.listener.port

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        page = resources.files("memagent.plugins.sinks").joinpath("static/dashboard.html").read_text("utf-8")
        self._dashboard = page.replace("__MEMAGENT_FEED_PATH__", self.path).encode()
        await self.listener.start()
        scheme = "wss" if self.listener.tls else "ws"
        self.context.log.info("websocket feed on %s://%s:%d%s (dashboard: %s, health: %s)", scheme,
                 self.listener.options.host, self.port, self.path, DASHBOARD_PATH, HEALTH_PATH)

    async def close(self) -> None:
        """Close the listener (bounded: see the module docstring); then give up on clients still
        being closed for being too slow."""
        await self.listener.close()
        for task in list(self._closing):
            task.cancel()

    # -- HTTP beside the feed --------------------------------------------------------------------

    def _health(self) -> Mapping[str, object]:
        return {"clients": len(self.clients), "sent": self.context.counters["sent"],
                "dropped": self.context.counters["client_drops"], "replay": len(self.replay)}

    def _answer_dashboard(self, request: Request) -> Response:
        return response(200, self._dashboard, "text/html; charset=utf-8")

    # -- records in ------------------------------------------------------------------------------

    async def write(self, batch: Sequence[Record]) -> None:
        """Queue the batch for every subscribed client; never waits on a client. Clients with the
        same projection share each projected record."""
        self._remember(batch)
        projections: Projections = {}
        for client in list(self.clients):
            sub = client.subscription
            for record in batch:
                if sub.wants(record):
                    client.offer(sub.encode(record, projections))
            if client.dropped_since_caught_up > self.disconnect_after:
                self._drop_slow(client)
        drops = sum(c.dropped for c in self.clients)
        self.context.counters["client_drops"] = self._closed_drops + drops

    def _remember(self, batch: Sequence[Record]) -> None:
        """Keep the batch in the replay buffer, evicting the oldest past either bound."""
        for record in batch:
            self.replay.push(record)
            self.last_seq = max(self.last_seq, record.seq)

    def _drop_slow(self, client: Client) -> None:
        self.clients.discard(client)
        self._closed_drops += client.dropped
        self.context.counters["disconnected_slow"] += 1
        self.context.counters["clients"] = len(self.clients)
        reason = f"too slow: {client.dropped_since_caught_up} records dropped"
        self.context.log.warning("websocket client %s closed: %s", peer(client.connection), reason)
        task = asyncio.create_task(_close_or_abort(client.connection, CLOSE_TOO_SLOW, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- one connection --------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        self.context.counters["connections"] += 1
        try:
            subscription = from_query(urlsplit(connection.request.path).query if connection.request else "")
        except BadFilter as exc:
            self.context.counters["bad_filters"] += 1
            await connection.close(CLOSE_POLICY, str(exc)[:120])
            return
        client = Client(connection, subscription, self.client_queue, self.client_queue_bytes)
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
        """Queue what the client missed after ``since``; first a ``gap`` message if some of it is
        no longer buffered."""
        if since is None:
            return
        oldest = self.replay[0].seq if self.replay else self.last_seq + 1
        if since + 1 < oldest:
            client.tell(orjson.dumps({"type": "gap", "from": since + 1, "to": oldest - 1}))
        for record in self.replay:
            if record.seq > since and client.subscription.wants(record):
                client.offer(client.subscription.encode(record))

    async def _send_forever(self, client: Client) -> None:
        connection = client.connection
        try:
            while True:
                if client.control:
                    await connection.send(client.control.popleft(), text=True)
                    continue
                if client.dropped_unreported:
                    lag = orjson.dumps({"type": "lag", "dropped": client.dropped_unreported,
                                        "total_dropped": client.dropped})
                    client.dropped_unreported = 0
                    await connection.send(lag, text=True)
                    continue
                if not client.queue:
                    client.dropped_since_caught_up = 0
                    client.ready.clear()
                    await client.ready.wait()
                    continue
                parts = client.take(every=self.batch)
                await connection.send(joined(parts) if self.batch else parts[0], text=True)
                client.sent += len(parts)
                self.context.counters["sent"] += len(parts)
        except ConnectionClosed:
            return


async def _close_or_abort(connection: ServerConnection, code: int, reason: str) -> None:
    """Close with ``code``; abort the connection if the client has not answered in time."""
    try:
        await asyncio.wait_for(connection.close(code, reason), CLOSE_TIMEOUT)
    except TimeoutError:
        connection.transport.abort()

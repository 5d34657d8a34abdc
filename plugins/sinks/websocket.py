"""The ``websocket`` sink: a live feed for dashboards, scripts and people, served on the shared
HTTP listener (:mod:`memagent.plugins.sinks.listener`).

The listener owns everything before the handshake, with its guarantees: options ``host``, ``port``,
``token``, ``origins``, ``tls_cert``, ``tls_key``; malformed requests (400), the Origin policy
(403), the token (401), ``GET /healthz`` (here: clients, sent, dropped, replay), redaction of the
token from every log, exposure warnings and a bounded close. This module is the feed on it:
``GET /dashboard`` (one self-contained page with the vendored uPlot inlined, no CDN, a strict
Content-Security-Policy, no token needed: it holds no data), ``GET /processes`` (behind the token:
the ``start`` record of every process seen starting and not yet exited, so a page opened late still
knows command lines), ``max_clients`` (503 before the handshake), and, once connected:

- ``write`` never waits on a client: each record goes into every subscribed client's own queue,
  bounded by count (``client_queue``) and by bytes (``client_queue_bytes``). A slow client loses
  its *oldest* queued records — counted alike whichever bound dropped them, and told to it in a
  ``{"type": "lag", "dropped": n}`` message before its next record — and once it has lost more
  than ``disconnect_after`` records without catching up it is closed with code 1013 ("too slow").
  Clients with the same ``fields`` projection share one encoded copy of each record. Server
  memory is bounded by ``replay_bytes`` + clients × (``client_queue_bytes`` + ``write_limit`` +
  one message), counted in encoded JSON bytes.
- The last ``replay`` records (at most ``replay_bytes``) are kept. A client resumes with
  ``?since=<run>:<seq>`` (the run and the last seq it saw). The same run: it first gets a
  ``{"type": "gap", "from": a, "to": b}`` message naming what is no longer buffered (if anything),
  then every buffered record after that seq, then the live stream, without loss or repeat in
  between. Another run (the agent restarted): ``{"type": "run", "run": <this run>, "previous":
  <its run>}``, then the whole buffer as above from seq 0 (a ``gap`` from 1 if the buffer no longer
  starts there), so a restart loses nothing the server still holds. A bare ``?since=<seq>`` is read
  as a seq of this run. A cursor this sink has not reached yet (a sink new since a reload, a relay
  restarted further back in its stream) is checked against the first record after it: a ``gap``
  if records were skipped; records at or before it are not sent again. Control messages
  (``run``, ``gap``, ``lag``) are never dropped: they are kept apart from the record queue and
  sent before it.
- The position is the feed's: ``context.run`` and :attr:`Record.seq`. On an agent they are the
  records' own ``run`` and ``seq``; on a relay the feed id and the source's position, while the
  records keep their agents' ``run`` and ``seq``. A client that asks (``cursor=1``) is told it: a
  ``{"type": "cursor", "since": "<run>:<seq>"}`` message each time it has caught up after getting
  records (after them, never before), to resume from as it is. Once the client has sent filter
  messages, its cursor messages also say how many (``"filters": n``) and one comes (once caught
  up) after each: every record after that message was chosen by its n-th filter (or a later one),
  none by an older one — what a client needs to tell a hole its new filter made from records lost.
- A relay's feed carries many hosts (``?host=`` narrows it). What resuming guarantees there is
  the same, in the feed's positions (the stream sequence): every buffered record after the cursor,
  whichever host made it, once, in feed order, so each (``host``, ``run``) gets its records in
  ``seq`` order with a hole only where a ``gap`` or ``lag`` message says so, or where the relay
  never had the records (lost upstream: the dashboard counts those per run). A ``since`` naming an
  agent's run (a record's own ``run:seq``) is not a position in a relay's feed: it is answered as
  another run (a ``run`` message, then the whole buffer). Positions a relay never relays (other
  subjects, malformed messages) also fall in a ``gap``'s range: there it is an upper bound.
- Bad filters, in the query string or a client message, close that client with 1008 and a reason;
  oversized messages close it with 1009 (``max_size``). The server and other clients carry on.
- ``close`` is the listener's: bounded (about 2 × ``CLOSE_GRACE``) whatever the clients do.

Not guaranteed: delivery to a client that is too slow (see above) or disconnected; replay beyond
the buffer; records of a previous run after the last one a client saw (that agent is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
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
from memagent.plugins.sinks.dashboard_page import dashboard_page
from memagent.plugins.sinks.listener import HEALTH_PATH, Feed, Listener, ListenerOptions, peer, response
from memagent.plugins.sinks.websocket_client import CLOSE_TIMEOUT, Client, close_or_abort, gap
from memagent.plugins.sinks.websocket_filters import (
    BadFilter,
    Cursor,
    Projections,
    from_message,
    from_query,
    joined,
)

CLOSE_POLICY = 1008  # bad filter or message
CLOSE_TOO_SLOW = 1013  # "try again later": the client could not keep up
DASHBOARD_PATH = "/dashboard"
PROCESSES_PATH = "/processes"
RESERVED_PATHS = (HEALTH_PATH, DASHBOARD_PATH, PROCESSES_PATH)
MIB = 1024 * 1024
#: Bytes of start records kept for GET /processes; past it the oldest are forgotten (a process
#: with a 32 KiB command line each: still 256 of them).
STARTS_BYTES = 8 * MIB

class WebSocketSink:
    """Streams records to WebSocket clients. See the module docstring."""

    name: ClassVar[str] = "websocket"
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "websocket"
host = "127.0.0.1"          # listen address; "0.0.0.0" serves other hosts: set token + TLS (warned)
port = 8765                 # 0 = any free port (logged)
path = "/"                  # the feed; GET /healthz, /dashboard and /processes are served beside it
# token = "${MEMAGENT_WS_TOKEN}"   # clients send "Authorization: Bearer <token>" or ?token=<token>
# origins = ["https://grafana.example.com"]   # browser pages allowed besides the feed's own origin
# tls_cert = "/etc/memagent/cert.pem"
# tls_key = "/etc/memagent/key.pem"
# max_clients = 100
# client_queue = 1000       # records queued per client before its oldest are dropped (counted)
# client_queue_bytes = "4MiB"   # ... and bytes queued per client, the same way
# disconnect_after = 10000  # a client that lost this many records without catching up is closed
# replay = 1000             # records kept for ?since=<run>:<seq> reconnects
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
        self.run = context.run
        self.starts: dict[tuple[object, ...], Record] = {}  # (host, target, pid, started): live processes
        self._starts_bytes = 0
        self.clients: set[Client] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._dashboard = b""
        self._dashboard_policy = ""
        self._closed_drops = 0  # drops of clients that are gone, so the counter never goes down
        feed = Feed(path, self._handle, full=lambda: len(self.clients) >= self.max_clients,
                    ping_interval=ping_interval, ping_timeout=ping_timeout, write_limit=write_limit,
                    max_size=max_size, close_timeout=CLOSE_TIMEOUT)
        self.listener = Listener(listener or ListenerOptions(port=8765), name=context.name,
                                 counters=context.counters, health=self._health, feed=feed, log=context.log)
        self.listener.route(DASHBOARD_PATH, self._answer_dashboard, token=False)
        self.listener.route(PROCESSES_PATH, self._answer_processes)
        declare_counters(context.counters, "clients", "connections", "sent", "client_drops",
                         "disconnected_slow", "bad_filters")

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> WebSocketSink:
        path = options.string("path", "/", nonempty=True)
        if not path.startswith("/") or path in RESERVED_PATHS:
            raise ConfigError(options.key("path"), f'must start with "/" and not be '
                                                   f'{", ".join(RESERVED_PATHS)}, got "{path}"')
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
        self._dashboard, self._dashboard_policy = dashboard_page(self.path)
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
        page = response(200, self._dashboard, "text/html; charset=utf-8")
        page.headers["Content-Security-Policy"] = self._dashboard_policy
        page.headers["X-Content-Type-Options"] = "nosniff"
        page.headers["Referrer-Policy"] = "no-referrer"  # its address may carry ?token=
        return page

    def _answer_processes(self, request: Request) -> Response:
        """``{"run": ..., "seq": <last seq>, "processes": [<start record>, ...]}``, oldest first."""
        head = b'{"run":' + orjson.dumps(self.run) + b',"seq":' + str(self.last_seq).encode()
        body = head + b',"processes":' + joined(record.json for record in self.starts.values()) + b"}"
        return response(200, body, "application/json")

    # -- records in ------------------------------------------------------------------------------

    async def write(self, batch: Sequence[Record]) -> None:
        """Queue the batch for every subscribed client; never waits on a client. Clients with the
        same projection share each projected record."""
        self._remember(batch)
        projections: Projections = {}
        cursors: dict[int, bytes] = {}  # by filters applied: one encoding each per write
        for client in list(self.clients):
            records = self._resumed(client, batch) if client.resume_after is not None else batch
            sub = client.subscription
            offered = False
            for record in records:
                if sub.wants(record):
                    client.offer(sub.encode(record, projections))
                    offered = True
            if offered and sub.cursor:
                if (cursor := cursors.get(client.filters)) is None:
                    cursor = cursors[client.filters] = self._cursor(client.filters)
                client.cursor = cursor
            if client.dropped_since_caught_up > self.disconnect_after:
                self._drop_slow(client)
        drops = sum(c.dropped for c in self.clients)
        self.context.counters["client_drops"] = self._closed_drops + drops

    @staticmethod
    def _resumed(client: Client, batch: Sequence[Record]) -> Sequence[Record]:
        """The records of ``batch`` after the cursor of a client that resumed ahead of this sink:
        those at or before it are not sent again; the first one after it says whether records
        were skipped (a ``gap``), and then the client is resumed."""
        after = client.resume_after
        assert after is not None
        for index, record in enumerate(batch):
            if record.seq > after:
                if record.seq > after + 1:
                    client.tell(gap(after + 1, record.seq - 1))
                client.resume_after = None
                return batch[index:]
        return ()

    def _remember(self, batch: Sequence[Record]) -> None:
        """Keep the batch in the replay buffer, evicting the oldest past either bound; keep the
        start record of each live process (for GET /processes), forgetting it at its exit."""
        for record in batch:
            self.replay.push(record)
            self.last_seq = max(self.last_seq, record.seq)
            if record.type == "start" or record.type == "exit":
                self._track_start(record)

    def _cursor(self, filters: int = 0) -> bytes:
        """A cursor message; ``filters``: how many filter messages the client's feed reflects (said
        only once it sent one, so a client that never does gets the same bytes as before)."""
        since = f"{self.run}:{self.last_seq}"
        if filters:
            return orjson.dumps({"type": "cursor", "since": since, "filters": filters})
        return orjson.dumps({"type": "cursor", "since": since})

    def _track_start(self, record: Record) -> None:
        fields = record.fields
        key = (fields.get("host"), record.target, record.pid, fields.get("started"))
        if (gone := self.starts.pop(key, None)) is not None:
            self._starts_bytes -= len(gone.json)
        if record.type == "start":
            self.starts[key] = record
            self._starts_bytes += len(record.json)
            while self._starts_bytes > STARTS_BYTES:
                oldest = self.starts.pop(next(iter(self.starts)))
                self._starts_bytes -= len(oldest.json)

    def _drop_slow(self, client: Client) -> None:
        self.clients.discard(client)
        self._closed_drops += client.dropped
        self.context.counters["disconnected_slow"] += 1
        self.context.counters["clients"] = len(self.clients)
        reason = f"too slow: {client.dropped_since_caught_up} records dropped"
        self.context.log.warning("websocket client %s closed: %s", peer(client.connection), reason)
        task = asyncio.create_task(close_or_abort(client.connection, CLOSE_TOO_SLOW, reason))
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
        sender = asyncio.create_task(client.send_forever(self.batch, self.context.counters))
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
                self._applied(client)
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

    def _applied(self, client: Client) -> None:
        """A filter message now applies to ``client``: a cursor=1 client is told so in its next
        cursor message (``filters``), which comes once everything queued before is sent."""
        client.filters += 1
        if client.subscription.cursor and client.resume_after is None:
            client.cursor = self._cursor(client.filters)
            client.ready.set()

    def _replay_to(self, client: Client, since: Cursor | None) -> None:
        """Queue what the client missed after ``since``: a ``run`` message if it names another run
        (then everything buffered), a ``gap`` message if some of it is no longer buffered, then
        the buffered records. See the module docstring."""
        if since is None:
            return
        after = since.seq
        if since.run is not None and since.run != self.run:
            client.tell(orjson.dumps({"type": "run", "run": self.run, "previous": since.run}))
            after = 0
        if self.last_seq <= after:  # nothing after it has reached this sink yet
            client.resume_after = after
            return
        oldest = self.replay[0].seq if self.replay else self.last_seq + 1
        if after + 1 < oldest:
            client.tell(gap(after + 1, oldest - 1))
        for record in self.replay:
            if record.seq > after and client.subscription.wants(record):
                client.offer(client.subscription.encode(record))
        if client.subscription.cursor:
            client.cursor = self._cursor()


def _record_bytes(record: Record) -> int:
    return len(record.json)

"""The ``websocket`` sink: a live feed server for dashboards, scripts and people.

Guarantees:

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
- One ``process_request`` checks, before anything else, that the request is well formed
  (duplicated ``Host``, ``Origin`` or ``Authorization`` headers, or any unexpected error: 400,
  counted in ``bad_requests``, at most one log line per 10 s, never a traceback). Then the Origin
  policy: a request carrying ``Origin`` (a browser) is refused with 403 unless that origin is the
  feed's own (same scheme, and host:port equal to the request's ``Host``; when the feed listens on
  loopback, only a loopback name, which defeats DNS rebinding) or listed in ``origins``. Requests
  without ``Origin`` (scripts, websocat) are unaffected. Then ``GET /healthz`` (JSON: clients,
  sent, dropped), ``GET /dashboard`` (a self-contained page, no CDN), the path (404), the token
  (``Authorization: Bearer`` or ``?token=``, compared with ``hmac.compare_digest``; 401) and
  ``max_clients`` (503) before the handshake. A request that is not HTTP at all gets a 400 too.
- Bad filters, in the query string or a client message, close that client with 1008 and a reason;
  oversized messages close it with 1009 (``max_size``). The server and other clients carry on.
- ``close`` returns within about 2 × :data:`CLOSE_GRACE` whatever the clients do: they are sent
  1001 (going away), and connections still open after the grace period (a client that stopped
  reading) are aborted.
- The token is never logged, in any form: the raw token, any percent-encoding of it, its base64,
  and every ``token=`` query value and ``Authorization`` value (matching or not) are redacted from
  every log record of this sink and of its websockets logger, tracebacks included.
- Listening beyond loopback without a token, or without TLS, is warned about when the sink is
  built (so ``memagent check`` says it too); see :func:`exposure_warnings`.

Not guaranteed: delivery to a client that is too slow (see above) or disconnected; replay beyond
the buffer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import ClassVar
from urllib.parse import parse_qs, unquote_plus, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidMessage
from websockets.http11 import Request, Response

from memagent.contracts import Record, SinkContext
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks.websocket_filters import (
    BadFilter,
    Projections,
    Subscription,
    from_message,
    from_query,
    joined,
)

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008  # bad filter or message
CLOSE_TOO_SLOW = 1013  # "try again later": the client could not keep up
CLOSE_TIMEOUT = 2.0  # seconds a client closed for being slow gets to answer before it is aborted
#: Seconds clients get at shutdown to complete the closing handshake before their connections are
#: aborted; close() takes at most about twice this, so SIGTERM ends within drain_timeout + 1 s.
CLOSE_GRACE = 0.5
BAD_REQUEST_LOG_EVERY = 10.0  # seconds: at most one log line this often for malformed requests
SINGLE_HEADERS = ("Host", "Origin", "Authorization")  # read by process_request: exactly one or none
MIB = 1024 * 1024

# Written before the EOF websockets sends when a request cannot be parsed as HTTP at all.
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nServer: memagent\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 12\r\n\r\nBad Request\n")


# -- exposure, origins -----------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address or a hostname) only reaches this machine."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(host: str, token: str | None, tls: bool) -> list[str]:
    """What is unsafe about serving the feed on ``host``: nothing on loopback; beyond it, a
    missing token (anyone who can reach the port reads every command line) and missing TLS
    (records, and the token, cross the network in clear text)."""
    if is_loopback(host):
        return []
    where = f'host = "{host}" serves the feed beyond this machine'
    warnings = []
    if not token:
        warnings.append(f"{where} without a token: anyone who can reach the port reads every "
                        "process's command line; set token")
    if not tls:
        carried = "records and the token" if token else "records"
        warnings.append(f"{where} without TLS: {carried} cross the network in clear text; "
                        "set tls_cert and tls_key")
    return warnings


def same_origin(origin: str, host: str | None, *, tls: bool, loopback_only: bool) -> bool:
    """Whether a browser's ``Origin`` is the feed's own: the scheme the feed serves (https with
    TLS, else http) and the host:port the browser asked for (the ``Host`` header). With
    ``loopback_only`` the host must also be a loopback name, so a page whose DNS name was rebound
    to 127.0.0.1 does not pass."""
    if not host:
        return False
    scheme, default_port = ("https", 443) if tls else ("http", 80)
    try:
        asked, requested = urlsplit(origin), urlsplit(f"//{host}")
        if asked.scheme.lower() != scheme or asked.path or asked.query or asked.username:
            return False
        origin_at = (asked.hostname, asked.port or default_port)
        host_at = (requested.hostname, requested.port or default_port)
    except ValueError:  # a port that is not a number, a bracket without its pair
        return False
    if origin_at[0] is None or origin_at != host_at:
        return False
    return not loopback_only or is_loopback(origin_at[0])


# -- logs: redaction and rate limiting -------------------------------------------------------------

_QUERY_PARAMETER = re.compile(r"(?<=[?&])([^=&\s#]*)=([^&\s#]*)")
_AUTHORIZATION = re.compile(r"(?im)\b((?:proxy-)?authorization\s*:\s*)[^\r\n]*")
_CREDENTIALS = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s,;]+")
REDACTED = "<redacted>"


def _secret_pattern(secret: str) -> re.Pattern[str]:
    """Matches ``secret`` raw, with any of its characters percent-encoded (either hex case, ``+``
    for a space), base64-encoded (standard or URL-safe, padded or not), escaped by repr/JSON, or
    its UTF-8 bytes read as ISO-8859-1."""
    def character(c: str) -> str:
        encoded = "".join("%" + "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d
                                        for d in f"{b:02x}") for b in c.encode())
        return "(?:" + "|".join([re.escape(c), encoded, *([r"\+"] if c == " " else [])]) + ")"

    raw = secret.encode()
    literals = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
                repr(secret)[1:-1], json.dumps(secret)[1:-1],
                raw.decode("iso-8859-1")}  # how websockets decodes a header carrying it
    literals |= {literal.rstrip("=") for literal in literals}
    alternatives = ["".join(character(c) for c in secret),
                    *(re.escape(literal) for literal in sorted(literals, key=len, reverse=True) if literal)]
    return re.compile("|".join(alternatives))


def redact(text: str, secret: re.Pattern[str] | None = None) -> str:
    """``text`` without ``secret`` (see :func:`_secret_pattern`), ``token=`` query values (the
    key percent-decoded, as the feed reads it) and ``Authorization`` values, matching or not."""
    if secret is not None:
        text = secret.sub(REDACTED, text)
    text = _QUERY_PARAMETER.sub(
        lambda m: f"{m[1]}={REDACTED}" if unquote_plus(m[1]).strip().lower() == "token" else m[0], text)
    text = _AUTHORIZATION.sub(lambda m: m[1] + REDACTED, text)
    return _CREDENTIALS.sub(lambda m: m[1] + m[2] + REDACTED, text)


class Redactor(logging.Filter):
    """Redacts credentials (see :func:`redact`) from every record of the loggers it is added to —
    the message, its traceback and stack: websockets logs request lines, headers and parse errors
    (which quote the request line) at debug level."""

    def __init__(self, secret: str | None) -> None:
        super().__init__()
        self.secret = _secret_pattern(secret) if secret else None

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not bypass redaction
            message = f"{record.msg!s} (unformattable arguments)"
        record.msg, record.args = redact(message, self.secret), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secret)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secret)
        return True


class Throttled:
    """A warning at most once every ``every`` seconds; the next one says how many were held back.
    For events an outsider can trigger at will (malformed requests), so they cannot flood the log."""

    def __init__(self, logger: logging.Logger, every: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.every, self.clock = logger, every, clock
        self.last: float | None = None
        self.held_back = 0

    def warning(self, message: str) -> None:
        now = self.clock()
        if self.last is not None:
            if now - self.last < self.every:
                self.held_back += 1
                return
            if self.held_back:
                message += f" ({self.held_back} more in the last {now - self.last:.0f}s not logged)"
        self.last, self.held_back = now, 0
        self.logger.warning("%s", message)


# -- clients ---------------------------------------------------------------------------------------

class Client:
    """One connected client: its subscription, its bounded record queue, its control messages
    (never dropped) and its sender task."""

    def __init__(self, connection: ServerConnection, subscription: Subscription, capacity: int,
                 capacity_bytes: int) -> None:
        self.connection = connection
        self.subscription = subscription
        self.queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self.control: deque[bytes] = deque()  # at most one gap message; sent before any record
        self.capacity, self.capacity_bytes = capacity, capacity_bytes
        self.ready = asyncio.Event()
        self.dropped_unreported = 0
        self.dropped_since_caught_up = 0
        self.dropped = 0
        self.sent = 0

    def offer(self, message: bytes) -> None:
        """Queue a record, dropping the oldest while either bound is exceeded (a record larger
        than the whole byte bound is dropped itself); every drop is counted the same way."""
        size = len(message)
        if size > self.capacity_bytes:
            self._count_drop()
        else:
            while self.queue and (len(self.queue) >= self.capacity
                                  or self.queued_bytes + size > self.capacity_bytes):
                self.queued_bytes -= len(self.queue.popleft())
                self._count_drop()
            self.queue.append(message)
            self.queued_bytes += size
        self.ready.set()

    def tell(self, message: bytes) -> None:
        """Queue a control message: never dropped, sent before the queued records."""
        self.control.append(message)
        self.ready.set()

    def take(self, every: bool) -> list[bytes]:
        """The oldest queued record, or all of them."""
        taken = list(self.queue) if every else [self.queue[0]]
        for _ in taken:
            self.queue.popleft()
        self.queued_bytes -= sum(len(m) for m in taken)
        return taken

    def _count_drop(self) -> None:
        self.dropped += 1
        self.dropped_unreported += 1
        self.dropped_since_caught_up += 1


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

    def __init__(self, *, context: SinkContext, host: str = "127.0.0.1", port: int = 8765, path: str = "/",
                 token: str | None = None, origins: Sequence[str] | None = None,
                 tls: ssl.SSLContext | None = None, max_clients: int = 100, client_queue: int = 1000,
                 client_queue_bytes: int = 4 * MIB, disconnect_after: int = 10_000, replay: int = 1000,
                 replay_bytes: int = 16 * MIB, batch: bool = False, ping_interval: float = 20.0,
                 ping_timeout: float = 20.0, write_limit: int = 65536, max_size: int = 4096) -> None:
        self.context = context
        self.host, self.port, self.path = host, port, path
        self._token = token.encode() if token else None
        self.origins = frozenset(origins) if origins is not None else frozenset()
        self.tls = tls
        self.max_clients = max_clients
        self.client_queue, self.client_queue_bytes = client_queue, client_queue_bytes
        self.disconnect_after = disconnect_after
        self.batch = batch
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.write_limit, self.max_size = write_limit, max_size
        self.replay: deque[Record] = deque()
        self.replay_limit, self.replay_bytes_limit = replay, replay_bytes
        self.replay_bytes = 0
        self.last_seq = 0
        self.clients: set[Client] = set()
        self._connections: set[ServerConnection] = set()  # every open TCP connection, handshake or not
        self._closing: set[asyncio.Task[None]] = set()
        self._server: Server | None = None
        self._dashboard = b""
        self._closed_drops = 0  # drops of clients that are gone, so the counter never goes down
        self._redactor = Redactor(token)
        self._protocol_log = logging.getLogger(f"websockets.server.{context.name}")
        self._bad_requests = Throttled(log, BAD_REQUEST_LOG_EVERY)
        for counter in ("clients", "connections", "sent", "client_drops", "disconnected_slow",
                        "rejected_auth", "rejected_origin", "rejected_full", "bad_filters", "bad_requests"):
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
        client_queue_bytes = options.size("client_queue_bytes", 4 * MIB)
        if client_queue_bytes < 4096:
            raise ConfigError(options.key("client_queue_bytes"), f"must be at least 4096 bytes, "
                                                                 f"got {client_queue_bytes}")
        host = options.string("host", "127.0.0.1", nonempty=True)
        token = options.string("token", None, nonempty=True)
        sink = cls(
            context=context,
            host=host,
            port=options.integer("port", 8765, minimum=0, maximum=65535),
            path=path,
            token=token,
            origins=options.string_list("origins", None),
            tls=tls,
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
        for warning in exposure_warnings(host, token, tls is not None):
            context.report(f"SECURITY: {options.path}: {warning}")
        return sink

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        page = resources.files("memagent.plugins.sinks").joinpath("static/dashboard.html").read_text("utf-8")
        self._dashboard = page.replace("__MEMAGENT_FEED_PATH__", self.path).encode()
        for logger in (self._protocol_log, log):
            logger.addFilter(self._redactor)
        try:
            self._server = await serve(
                self._handle, self.host, self.port, ssl=self.tls, process_request=self._process_request,
                logger=self._protocol_log, create_connection=_connection_class(self),
                ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
                write_limit=self.write_limit, max_size=self.max_size, max_queue=4,
                close_timeout=CLOSE_TIMEOUT,
                server_header="memagent")
        except BaseException:
            self._remove_redactor()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        scheme = "wss" if self.tls else "ws"
        log.info("websocket feed on %s://%s:%d%s (dashboard: /dashboard, health: /healthz)",
                 scheme, self.host, self.port, self.path)

    async def close(self) -> None:
        """Send every client 1001 (going away); abort connections still open after
        :data:`CLOSE_GRACE` (clients that stopped reading). Bounded whatever the clients do."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()  # stops listening, rejects handshakes in progress, closes clients with 1001
        if not await _finished(server.wait_closed(), CLOSE_GRACE):
            stuck = list(self._connections)
            log.warning("websocket: %d connection(s) still open %.1fs after closing; aborting them",
                        len(stuck), CLOSE_GRACE)
            for connection in stuck:
                connection.transport.abort()
            if not await _finished(server.wait_closed(), CLOSE_GRACE):
                log.error("websocket: connections still open after being aborted; leaving them")
        for task in list(self._closing):
            task.cancel()
        self._remove_redactor()

    def _remove_redactor(self) -> None:
        for logger in (self._protocol_log, log):
            logger.removeFilter(self._redactor)

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
            self.replay.append(record)
            self.replay_bytes += len(record.json)
            self.last_seq = max(self.last_seq, record.seq)
        while self.replay and (len(self.replay) > self.replay_limit
                               or self.replay_bytes > self.replay_bytes_limit):
            self.replay_bytes -= len(self.replay.popleft().json)

    def _drop_slow(self, client: Client) -> None:
        self.clients.discard(client)
        self._closed_drops += client.dropped
        self.context.counters["disconnected_slow"] += 1
        self.context.counters["clients"] = len(self.clients)
        reason = f"too slow: {client.dropped_since_caught_up} records dropped"
        log.warning("websocket client %s closed: %s", _peer(client.connection), reason)
        task = asyncio.create_task(_close_or_abort(client.connection, CLOSE_TOO_SLOW, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- HTTP before the handshake ---------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer or refuse a request before the handshake; never raises (hostile input must
        not become a 500 and a traceback)."""
        try:
            return self._route(connection, request)
        except Exception as exc:  # noqa: BLE001 - see the docstring; counted and logged below
            return self.bad_request(connection, f"unexpected {type(exc).__name__}")

    def bad_request(self, connection: ServerConnection, why: str) -> Response:
        """Count a malformed request, log it (rate-limited) and answer 400."""
        self.note_bad_request(connection, why)
        return connection.respond(400, "Bad Request\n")

    def note_bad_request(self, connection: ServerConnection, why: str) -> None:
        self.context.counters["bad_requests"] += 1
        self._bad_requests.warning(f"websocket: malformed request from {_peer(connection)} refused "
                                   f"(400): {why}; {self.context.counters['bad_requests']} in all")

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        for name in SINGLE_HEADERS:
            if len(request.headers.get_all(name)) > 1:
                return self.bad_request(connection, f"duplicated {name} header")
        url = urlsplit(request.path)
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.origins and not same_origin(
                origin, request.headers.get("Host"), tls=self.tls is not None,
                loopback_only=is_loopback(self.host)):
            self.context.counters["rejected_origin"] += 1
            return connection.respond(403, "Forbidden: origin not allowed\n")
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
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            # websockets reads header bytes as ISO-8859-1; the client may have sent the token's
            # UTF-8 bytes (undo that reading) or its ISO-8859-1 bytes (encode as UTF-8).
            offered = header[7:].strip()
            raw = offered.encode("iso-8859-1", "replace")
            return hmac.compare_digest(raw, self._token) | hmac.compare_digest(offered.encode(), self._token)
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


def _connection_class(sink: WebSocketSink) -> type[ServerConnection]:
    """websockets' connection, tracked by ``sink`` from the first byte (so close() can abort any
    of them, mid-handshake included) and answering a request that is not HTTP with a 400."""

    class FeedConnection(ServerConnection):
        answered = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            sink._connections.add(self)  # noqa: SLF001 - the sink's own helper class

        def connection_lost(self, exc: Exception | None) -> None:
            sink._connections.discard(self)  # noqa: SLF001 - the sink's own helper class
            super().connection_lost(exc)

        def send_data(self) -> None:
            # websockets answers an unparseable request with a bare EOF; write a 400 before it.
            # (An internal hook: should websockets rename it, requests just get the bare EOF.)
            failed = self.protocol.handshake_exc
            if (not self.answered and self.request is None and isinstance(failed, InvalidMessage)
                    and not isinstance(failed.__cause__, EOFError)):  # EOF: the client just left
                self.answered = True
                sink.note_bad_request(self, "not an HTTP request")
                self.transport.write(_BAD_REQUEST)
            super().send_data()

    return FeedConnection


async def _finished(waiting: Awaitable[None], timeout: float) -> bool:
    """Whether ``waiting`` finished within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(waiting, timeout)
    except TimeoutError:
        return False
    return True


async def _close_or_abort(connection: ServerConnection, code: int, reason: str) -> None:
    """Close with ``code``; abort the connection if the client has not answered in time."""
    try:
        await asyncio.wait_for(connection.close(code, reason), CLOSE_TIMEOUT)
    except TimeoutError:
        connection.transport.abort()


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

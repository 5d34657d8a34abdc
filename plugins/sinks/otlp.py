"""The ``otlp`` sink: samples pushed as OpenTelemetry metrics over OTLP/HTTP (protobuf, or JSON)
to a Collector or any OTLP endpoint.

What is sent — names, units, resource attributes, timestamps — is :mod:`.otlp_metrics`; its
bytes (protobuf or JSON, and the answers' bodies) :mod:`.otlp_wire`; how it travels
:mod:`.otlp_http`. This module is the sink: options, and what each answer means, per
the OTLP/HTTP specification:

- **2xx**: written. A partial success (``rejected_data_points``, or a warning in
  ``error_message``) is logged once per episode — until a batch is accepted whole — and counted
  (``points_rejected``, ``partial_successes``); the batch is not sent again.
- **429, 502, 503, 504, or no answer** (refused, reset, TLS failure, ``timeout``):
  :class:`~memagent.errors.SinkError`, so the framework keeps the batch and retries it with its
  backoff; the records behind it wait in the sink's queue. On 429 and 503 a ``Retry-After``
  (seconds or an HTTP-date, capped at ``max_retry_after``) is honoured: the next attempt is not
  sent before it, so attempts are the longer of the framework's backoff and the server's
  Retry-After apart (the sink waits only what the framework's own delay left of it).
- **any other status** (400 malformed data, 401/403 a wrong token, 404 a wrong path, 413 too large,
  500): the specification forbids retrying it, so :class:`~memagent.errors.SinkRejected`: the
  framework drops the batch, counts it (``rejected``), logs once per episode, and sends the next.
  A redirect is not followed (the message names the ``Location``).
- A retried batch is sent as the same bytes: it is encoded once.

``headers`` carry tokens: their values are redacted from every line this sink logs and every error
it raises (an answer that quotes them included), and never appear in config errors. Encoding,
compression and the request run in one worker thread of the sink's own, never on the event loop
and never in the shared pool the scheduler lists processes with.

Not guaranteed: exactly-once. An answer lost after the collector accepted a batch (a timeout
while it answers slowly) makes the retry a duplicate, as with every OTLP exporter.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import re
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import ClassVar

from memagent.contracts import Record, SinkContext, declare_counters
from memagent.errors import ConfigError, SinkError, SinkRejected
from memagent.options import Options
from memagent.plugins.sinks.client_tls import client_context, tls_keys
from memagent.plugins.sinks.listener_security import REDACTED, Redactor, is_loopback, redact
from memagent.plugins.sinks.otlp_http import Answer, Endpoint, Poster, retry_after
from memagent.record_types import printable

try:
    from memagent.plugins.sinks.otlp_metrics import Encoder
    from memagent.plugins.sinks.otlp_wire import CONTENT_TYPES, partial_success, serialize, status_message
except ImportError as exc:  # opentelemetry-proto (with protobuf) is the optional extra memagent[otlp]
    if (exc.name or "").partition(".")[0] not in ("opentelemetry", "google"):
        raise
    raise ImportError(f"the otlp sink needs opentelemetry-proto, which is not installed here ({exc}): "
                      "install memagent[otlp] (pip install 'memagent[otlp]')") from exc

DEFAULT_ENDPOINT = "http://127.0.0.1:4318/v1/metrics"
#: What the OTLP specification says to retry; every other 4xx/5xx MUST NOT be.
RETRYABLE = frozenset({429, 502, 503, 504})
#: Statuses whose Retry-After the OTLP specification says to honour.
THROTTLING = frozenset({429, 503})
#: Headers the sink sets itself (a config that sets them is an error).
RESERVED_HEADERS = frozenset({"content-type", "content-encoding", "content-length", "host",
                              "transfer-encoding", "connection"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
GZIP_LEVEL = 6  # zlib's default: most of level 9's ratio at a fraction of its CPU
MESSAGE_CHARS = 300  # most of a server's error message quoted in a log line
MIN_SECRET = 4  # shortest header value (or credentials part) redacted from logs


def _version() -> str:
    try:
        return metadata.version("memagent")
    except metadata.PackageNotFoundError:
        return "unknown"


class OtlpSink:
    """Pushes records as OTLP metrics. See the module docstring."""

    name: ClassVar[str] = "otlp"
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "otlp"
endpoint = "http://127.0.0.1:4318/v1/metrics"   # a Collector's OTLP/HTTP receiver; https:// for TLS
# headers = { Authorization = "Bearer ${OTLP_TOKEN}" }   # sent with every request; never logged
# encoding = "protobuf"     # or "json" (OTLP/JSON)
# compression = "gzip"      # or "none"
# timeout = "10s"           # the longest one export may take: connect, send, answer
# ca_file = "/etc/memagent/collector-ca.pem"   # https: trust this CA (default: the system's)
# client_cert = "/etc/memagent/client.pem"     # https: present a client certificate (mTLS) ...
# client_key = "/etc/memagent/client.key"      # ... with its key
# max_retry_after = "30s"   # the longest Retry-After (on 429/503) waited for
# max_processes = 16384     # processes whose start-record attributes (command line, owner) are kept
"""

    def __init__(self, *, context: SinkContext, endpoint: Endpoint, headers: dict[str, str] | None = None,
                 encoding: str = "protobuf", compression: str = "gzip", timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None, max_retry_after: float = 30.0,
                 max_processes: int = 16_384) -> None:
        self.context, self.log, self.counters = context, context.log, context.counters
        self.endpoint, self.encoding, self.compression = endpoint, encoding, compression
        self.timeout, self.max_retry_after = timeout, max_retry_after
        self.version = _version()
        self.encoder = Encoder(version=self.version, max_processes=max_processes)
        headers = dict(headers or {})
        self.poster = Poster(endpoint, headers=headers, timeout=timeout, tls=tls)
        self._request_headers = {"Content-Type": CONTENT_TYPES[encoding],
                                 "User-Agent": f"memagent/{self.version}"}
        if compression == "gzip":
            self._request_headers["Content-Encoding"] = "gzip"
        self._redactors = [Redactor(secret) for secret in _secrets(headers)]
        self._executor: ThreadPoolExecutor | None = None
        self._prepared: tuple[tuple[int, int, int], bytes, int] | None = None  # (batch key, body, points)
        self._resume_at = 0.0  # time.monotonic() before which nothing is sent (Retry-After)
        self._partial = False
        declare_counters(self.counters, "requests", "points_sent", "bytes_sent", "points_rejected",
                         "partial_successes", "throttled", "processes_forgotten")

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> OtlpSink:
        endpoint = Endpoint.parse(options.string("endpoint", DEFAULT_ENDPOINT, nonempty=True),
                                  options.key("endpoint"))
        headers = _headers(options)
        sink_options = {
            "encoding": options.choice("encoding", ("protobuf", "json"), "protobuf"),
            "compression": options.choice("compression", ("gzip", "none"), "gzip"),
            "timeout": options.duration("timeout", 10.0),
            "max_retry_after": options.duration("max_retry_after", 30.0),
            "max_processes": options.integer("max_processes", 16_384, minimum=1),
        }
        tls = _tls_context(options, endpoint)
        options.finish()
        if not endpoint.https and not is_loopback(endpoint.host):
            carried = "records and headers (tokens)" if headers else "records (command lines included)"
            context.log.warning("SECURITY: %s: endpoint %s is beyond this machine over plain http: %s "
                                "cross the network in clear text; use https", options.path, endpoint, carried)
        return cls(context=context, endpoint=endpoint, headers=headers, tls=tls, **sink_options)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """No connection yet: a collector that is not up is a failed write (retried), not a
        failed start."""
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"memagent-otlp-{self.context.name}")
        for redactor in self._redactors:
            self.log.addFilter(redactor)
        self.log.info("sending metrics to %s (%s%s)", self.endpoint, self.encoding,
                      ", gzip" if self.compression == "gzip" else "")

    async def close(self) -> None:
        self.poster.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for redactor in self._redactors:
            self.log.removeFilter(redactor)

    # -- writing -------------------------------------------------------------------------------------

    async def write(self, batch: Sequence[Record]) -> None:
        loop = asyncio.get_running_loop()
        body, points = await loop.run_in_executor(self._executor, self._prepare, batch)
        wait = self._resume_at - time.monotonic()
        if wait > 0:  # the server's Retry-After outlasts the framework's backoff
            await asyncio.sleep(wait)
        answer = await self._post(body)
        self.counters["requests"] += 1
        if 200 <= answer.status < 300:
            self._prepared = None
            self.counters["points_sent"] += points
            self.counters["bytes_sent"] += len(body)
            self._note_partial(answer, points)
            return
        problem = self._describe(answer)
        if answer.status in THROTTLING:
            self.counters["throttled"] += 1
            delay = retry_after(answer.headers.get("retry-after"))
            if delay is not None:
                delay = min(delay, self.max_retry_after)
                self._resume_at = time.monotonic() + delay
                problem += f"; Retry-After: next attempt in {delay:g}s at the earliest"
        if answer.status in RETRYABLE:
            raise SinkError(problem)
        self._prepared = None
        raise SinkRejected(f"{problem}; not retried (OTLP retries only 429, 502, 503 and 504)")

    def _prepare(self, batch: Sequence[Record]) -> tuple[bytes, int]:
        """The request body and its number of data points, made once per batch (in the worker
        thread): a retry of the same batch sends the same bytes, and the process directory sees
        each start and exit once."""
        key = (batch[0].seq, batch[-1].seq, len(batch))
        if self._prepared is not None and self._prepared[0] == key:
            return self._prepared[1], self._prepared[2]
        encoded = self.encoder.encode(batch)
        self.counters["processes_forgotten"] = self.encoder.directory.evicted
        body = serialize(encoded.request, self.encoding)
        if self.compression == "gzip":
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
        self._prepared = (key, body, encoded.points)
        return body, encoded.points

    async def _post(self, body: bytes) -> Answer:
        loop = asyncio.get_running_loop()
        exchange = loop.run_in_executor(self._executor, self.poster.post, body, self._request_headers)
        try:
            return await asyncio.wait_for(exchange, self.timeout)
        except TimeoutError:
            self.poster.abort()
            raise SinkError(f"{self.endpoint}: no answer within timeout ({self.timeout:g}s)") from None
        except asyncio.CancelledError:  # the drain deadline: the request must not linger
            self.poster.abort()
            raise
        except ssl.SSLError as exc:
            raise SinkError(self._redact(f"{self.endpoint}: TLS: {exc.reason or exc}")) from None
        except (OSError, http.client.HTTPException) as exc:
            what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            what = what or type(exc).__name__
            raise SinkError(self._redact(f"{self.endpoint}: {what}")) from None

    def _note_partial(self, answer: Answer, points: int) -> None:
        """Count a partial success; log the first of an episode and the episode's end."""
        partial = partial_success(answer.body, self.encoding)
        if partial is None:
            if self._partial:
                self._partial = False
                self.log.info("%s accepts whole batches again; %d data points rejected so far",
                              self.endpoint, self.counters["points_rejected"])
            return
        rejected, message = partial
        self.counters["points_rejected"] += rejected
        self.counters["partial_successes"] += 1
        if not self._partial:
            self._partial = True
            self.log.warning("%s accepted a batch only in part: %d of its %d data points rejected: %s "
                             "(logged once until a batch is accepted whole; counted in points_rejected)",
                             self.endpoint, rejected, points, self._quote(message) or "no message")

    def _describe(self, answer: Answer) -> str:
        """``<endpoint> answered <status> <reason>: <the server's message>``, redacted."""
        text = f"{self.endpoint} answered {answer.status} {answer.reason}".rstrip()
        kind = answer.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind.startswith("text/"):  # a proxy's or a misconfigured server's own words
            message: str | None = answer.body.decode("utf-8", "replace")
        else:  # OTLP: a google.rpc.Status, in the request's encoding
            message = status_message(answer.body, "json" if kind == "application/json" else "protobuf")
        if 300 <= answer.status < 400:
            message = f"redirects are not followed; set endpoint to {answer.headers.get('location', '?')}"
        quoted = self._quote(message or "")
        return self._redact(f"{text}: {quoted}" if quoted else text)

    def _quote(self, message: str) -> str:
        """A server's text for a log line: redacted, one line, at most :data:`MESSAGE_CHARS`."""
        text = printable(self._redact(" ".join(message.split())))
        return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "..."

    def _redact(self, text: str) -> str:
        for redactor in self._redactors:
            if redactor.secret is not None:
                text = redactor.secret.sub(REDACTED, text)
        return redact(text)


def _secrets(headers: dict[str, str]) -> list[str]:
    """What to keep out of logs: every header value, and the credentials of one shaped like
    ``<scheme> <credentials>`` (``Bearer abc``: a server may quote just ``abc``), in any encoding
    (see :class:`~.listener_security.Redactor`). Values shorter than :data:`MIN_SECRET` are not
    secrets (redacting ``a`` would garble every message)."""
    secrets = set()
    for value in headers.values():
        secrets.add(value.strip())
        parts = value.split(None, 1)
        if len(parts) == 2:
            secrets.add(parts[1].strip())
    return sorted((s for s in secrets if len(s) >= MIN_SECRET), key=len, reverse=True)


def _headers(options: Options) -> dict[str, str]:
    """``headers``: a table of strings with valid names, none the sink sets itself. Errors name
    the key, never the value (a token)."""
    table = options.table("headers", {})
    headers: dict[str, str] = {}
    for name, value in table.items():
        key = f"{options.key('headers')}.{name}"
        if not _TOKEN.match(name):
            raise ConfigError(key, "is not a valid HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise ConfigError(key, "is set by the sink itself (encoding, compression)")
        if not isinstance(value, str):
            raise ConfigError(key, "must be a string")
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(key, "must not contain line breaks or NUL")
        headers[name] = value
    return headers


def _tls_context(options: Options, endpoint: Endpoint) -> ssl.SSLContext | None:
    """The client TLS context for an https endpoint: the system's CAs or ``ca_file``, and a
    client certificate if given; certificates and host names are always verified."""
    ca_file, client_cert, client_key = tls_keys(options)
    given = [name for name, value in (("ca_file", ca_file), ("client_cert", client_cert),
                                      ("client_key", client_key)) if value is not None]
    if not endpoint.https:
        if given:
            raise ConfigError(options.key(given[0]), "needs an https:// endpoint")
        return None
    return client_context(options, ca_file, client_cert, client_key)


"""The ``prometheus`` sink: a scrape endpoint, ``GET /metrics``, served on the shared HTTP listener
(:mod:`memagent.plugins.sinks.listener`).

The listener owns everything before the route runs, with its guarantees: options ``host``
(127.0.0.1), ``port``, ``token`` (Prometheus sends it with ``authorization: {credentials: ...}``),
``origins``, ``tls_cert``, ``tls_key``; malformed requests (400), the Origin policy (403), the
token (401), ``GET /healthz``, redaction of the token from every log, exposure warnings, a bounded
close. This module is the route and what it shows:

- ``write`` only updates the latest values in memory
  (:class:`~memagent.plugins.sinks.prometheus_values.LatestValues`); a scrape renders them with
  ``prometheus_client`` (:class:`~memagent.plugins.sinks.prometheus_metrics.MemagentCollector`)
  and never reads ``/proc`` or anything else. Series of processes and targets that are gone
  disappear at once (see :mod:`~memagent.plugins.sinks.prometheus_values`): no stale value.
- The format is chosen from the request's ``Accept`` header by ``prometheus_client``'s
  ``choose_encoder``: OpenMetrics 1.0 (``# UNIT`` lines included) for ``application/openmetrics-text``
  (what Prometheus asks for first), Prometheus text 0.0.4 otherwise. The body is gzipped when the
  request accepts it (Prometheus always does) and it is larger than :data:`GZIP_FROM` bytes.
- A scrape never stalls the event loop: the metric families are collected on it (about 1 µs per
  series, from memory), then rendered by ``prometheus_client`` in a worker thread (10-25 µs per
  series), one rendering at a time. A rendering is reused by every scrape until the next write, so
  any number of scrapers cost at most one rendering per write and format.
- Per-target series come from ``totals`` records, so only targets with ``totals = true`` have
  them; a target that sends samples without totals is named in one warning.

Not guaranteed: values fresher than the last tick (and, for the agent's own counters, than the
last ``agent`` record: ``stats_interval``); ``memagent check`` saying a target lacks ``totals``
(a sink does not see the targets' settings: the warning comes once running).
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import ClassVar

from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
    gzip_accepted,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from websockets.http11 import Request, Response

from memagent.contracts import Record, SinkContext, declare_counters
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks.listener import HEALTH_PATH, Listener, ListenerOptions, response
from memagent.plugins.sinks.prometheus_metrics import COMPAT, MemagentCollector
from memagent.plugins.sinks.prometheus_values import LatestValues

#: The default port. Not 9464 (the OpenTelemetry SDKs' Prometheus exporter: an application on the
#: same host may want it) nor 9256 (process-exporter's: people run both side by side while they
#: switch); Prometheus' exporter port registry (9100-9999) is full. Next to the websocket sink's 8765.
DEFAULT_PORT = 8766
DEFAULT_MAX_SERIES = 5000
#: Bodies smaller than this are sent as they are: compressing them saves less than it costs.
GZIP_FROM = 4096
GZIP_LEVEL = 1  # metrics text compresses ~20x even at level 1, at a fraction of level 6's CPU
RENDERED_KEPT = 4  # renderings kept per write (formats x gzip); a client naming odd formats can't grow it

Encoder = Callable[[Collector], bytes]


class PrometheusSink:
    """Serves the latest values as Prometheus/OpenMetrics metrics. See the module docstring."""

    name: ClassVar[str] = "prometheus"
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "prometheus"
host = "127.0.0.1"          # listen address; "0.0.0.0" lets other hosts scrape: set token + TLS (warned)
port = 8766                 # GET /metrics (and /healthz); 0 = any free port (logged)
# path = "/metrics"
# per_process = false       # true: series per process too, labels target, name, slot (no pid)
# pid_label = false         # true: label pid instead of slot (a new series per process: churn)
# max_series = 5000         # the most per-process series; what does not fit is left out, counted
#                           # in memagent_processes_left_out_total
# compat = "none"           # "process-exporter": per-target series named as process-exporter's
#                           # (namedprocess_namegroup_*{groupname=<target>}), for its dashboards
# token = "${MEMAGENT_METRICS_TOKEN}"   # Prometheus: authorization: {credentials: <token>}
# tls_cert = "/etc/memagent/cert.pem"
# tls_key = "/etc/memagent/key.pem"
# origins = []              # browser pages allowed besides the endpoint's own origin
# Per-target series need totals = true on the target ([[targets]]); full = true adds uss/pss/swap.
"""

    def __init__(self, *, context: SinkContext, listener: ListenerOptions | None = None,
                 path: str = "/metrics", per_process: bool = False, pid_label: bool = False,
                 max_series: int = DEFAULT_MAX_SERIES, compat: str = "none") -> None:
        self.context = context
        self.path = path
        self.values = LatestValues(per_process=per_process, max_series=max_series, counters=context.counters)
        self.collector = MemagentCollector(self.values, compat=compat, pid_label=pid_label,
                                           version=_memagent_version())
        self.listener = Listener(listener or ListenerOptions(port=DEFAULT_PORT), name=context.name,
                                 counters=context.counters, health=self._health, log=context.log)
        self.listener.route(path, self._answer_metrics)
        self._unconfirmed: set[str] = set()  # targets without totals as of the last agent record
        self._warned: set[str] = set()
        self._writes = 0  # writes so far: what a rendering is of
        self._rendering = asyncio.Lock()
        self._rendered: dict[tuple[str, bool], tuple[bytes, bool]] = {}  # (body, gzipped) by format
        self._rendered_at = 0  # the write they show
        declare_counters(context.counters, "scrapes", "left_out")

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> PrometheusSink:
        path = options.string("path", "/metrics", nonempty=True)
        if not path.startswith("/") or path == HEALTH_PATH:
            raise ConfigError(options.key("path"), f'must start with "/" and not be {HEALTH_PATH}, '
                                                   f'got "{path}"')
        listener = ListenerOptions.read(options, port=DEFAULT_PORT)
        sink = cls(
            context=context,
            listener=listener,
            path=path,
            per_process=options.boolean("per_process", False),
            pid_label=options.boolean("pid_label", False),
            max_series=options.integer("max_series", DEFAULT_MAX_SERIES, minimum=0),
            compat=options.choice("compat", COMPAT, "none"),
        )
        options.finish()
        listener.report_exposure(options.path, context.log.warning, serves="the metrics",
                                 reveals="target and process names and their memory")
        return sink

    @property
    def port(self) -> int:
        """The listener's port: the bound one once started."""
        return self.listener.port

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.listener.start()
        scheme = "https" if self.listener.tls else "http"
        self.context.log.info("%s: prometheus metrics on %s://%s:%d%s (health: %s)", self.context.name,
                              scheme, self.listener.options.host, self.port, self.path, HEALTH_PATH)

    async def close(self) -> None:
        await self.listener.close()

    # -- records in ------------------------------------------------------------------------------

    async def write(self, batch: Sequence[Record]) -> None:
        """Update the latest values; never waits (a scrape reads them as they are)."""
        self._writes += 1
        add = self.values.add
        for record in batch:
            add(record.fields)
            if record.type == "agent":
                self._warn_about_totals()

    def _warn_about_totals(self) -> None:
        """Once per target: it sends samples but no totals, so it has no per-target series. Only
        targets already without totals at the previous agent record are named: a target's totals
        follow its samples in the same tick, which an agent record may fall in the middle of."""
        missing = set(self.values.targets_without_totals())
        for target in sorted((missing & self._unconfirmed) - self._warned):
            self._warned.add(target)
            self.context.log.warning(
                '%s: target "%s" has no totals = true, so it has no memagent_target_* series '
                '(set totals = true on the target)', self.context.name, target)
        self._unconfirmed = missing

    # -- HTTP ------------------------------------------------------------------------------------

    def _answer_metrics(self, request: Request) -> Awaitable[Response]:
        try:
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        except (TypeError, ValueError):  # prometheus_client fails on a version like "1.0.0abc"
            encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
        gzipped = gzip_accepted(request.headers.get("Accept-Encoding", ""))
        self.context.counters["scrapes"] += 1
        return self._answer(encoder, content_type, gzipped)

    async def _answer(self, encoder: Encoder, content_type: str, gzipped: bool) -> Response:
        """The metrics as of the last write: rendered once per write, format and encoding (scrapes
        in between get the same bytes), one rendering at a time, in a worker thread."""
        async with self._rendering:
            if self._rendered_at != self._writes:
                self._rendered.clear()
                self._rendered_at = self._writes
            key = (content_type, gzipped)
            rendered = self._rendered.get(key)
            if rendered is None:
                snapshot = Snapshot(list(self.collector.collect()))  # on the loop: one consistent state
                rendered = await asyncio.to_thread(_render, encoder, snapshot, gzipped)
                if len(self._rendered) >= RENDERED_KEPT:
                    self._rendered.clear()
                self._rendered[key] = rendered
        body, compressed = rendered
        answer = response(200, body, content_type)
        if compressed:
            answer.headers["Content-Encoding"] = "gzip"
        return answer

    def _health(self) -> Mapping[str, object]:
        return {"targets": len(self.values.targets), "processes": len(self.values.processes),
                "series": self.values.series, "scrapes": self.context.counters["scrapes"]}


class Snapshot(Collector):
    """Metric families collected once, rendered later (in another thread)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _render(encoder: Encoder, snapshot: Snapshot, gzipped: bool) -> tuple[bytes, bool]:
    """The exposition bytes, and whether they are gzipped: when asked and worth it."""
    body = encoder(snapshot)
    if gzipped and len(body) >= GZIP_FROM:
        return gzip.compress(body, GZIP_LEVEL), True
    return body, False


def _memagent_version() -> str:
    try:
        return version("memagent")
    except PackageNotFoundError:
        return ""

"""The otlp sink against a real OTLP/HTTP receiver on loopback: what arrives (semconv names,
attributes, timestamps), gzip and headers, every answer the OTLP spec defines, TLS, options.

:class:`OtlpReceiver` (also used by test_sink_otlp_e2e.py) is independent of the sink: a stdlib
HTTP server in a thread that decodes each request with the official ``opentelemetry-proto``
definitions, as a Collector's receiver does, and answers what the test scripts.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsPartialSuccess,
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from memagent.contracts import ProcessInfo, Reading, Record
from memagent.errors import ConfigError, SinkError, SinkRejected
from memagent.fanout import Outlet
from memagent.options import Options
from memagent.plugins.sinks.otlp import OtlpSink
from memagent.plugins.sinks.otlp_http import retry_after
from memagent.plugins.sinks.otlp_metrics import ProcessDirectory
from memagent.records import RecordMaker, iso_utc
from memagent.testing import RecordingLogger, sink_context

from cli_helpers import MEMAGENT, REPO, scaled
from ws_helpers import self_signed_cert

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE

# -- the receiver ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What the receiver answers one request with (default: 200, an empty response)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False  # never answer (until the receiver stops)
    close_after: bool = False  # answer, then close the connection without announcing it


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it: when (time.monotonic()), headers (lowercase names),
    the bytes as sent, and the decoded message."""

    at: float
    path: str
    headers: dict[str, str]
    raw: bytes
    message: ExportMetricsServiceRequest
    status: int


def status_body(code: int, message: str) -> bytes:
    """A google.rpc.Status (code = 1, message = 2), as OTLP servers answer errors: encoded by hand
    here because opentelemetry-proto does not ship the type; two short fields."""
    text = message.encode()
    assert len(text) < 128
    return bytes([0x08, code, 0x12, len(text)]) + text


class OtlpReceiver:
    """A real OTLP/HTTP metrics receiver on 127.0.0.1, port 0 (HTTP/1.1, keep-alive), in a thread.
    ``script(...)`` queues replies for the next requests; ``default`` answers the rest."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Received] = []
        self.replies: deque[Reply] = deque()
        self.default = Reply()
        self.changed = threading.Condition()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                receiver.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.server.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}/v1/metrics"

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def script(self, *replies: Reply) -> None:
        with self.changed:
            self.replies.extend(replies)

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {name.lower(): value for name, value in handler.headers.items()}
        raw = handler.rfile.read(int(headers.get("content-length", "0")))
        body = gzip.decompress(raw) if headers.get("content-encoding") == "gzip" else raw
        message = ExportMetricsServiceRequest()
        try:
            if headers.get("content-type") == "application/json":
                json_format.Parse(body, message)
            else:
                message.ParseFromString(body)
            with self.changed:
                reply = self.replies.popleft() if self.replies else self.default
        except Exception:  # noqa: BLE001 - undecodable data: a 400, as a collector answers
            reply = Reply(400, body=status_body(3, "cannot decode"))
        with self.changed:
            received = Received(time.monotonic(), handler.path, headers, raw, message, reply.status)
            self.requests.append(received)
            self.changed.notify_all()
        if reply.hang:
            self.released.wait(scaled(30))
            handler.close_connection = True
            return
        handler.send_response(reply.status)
        answer_headers = {"Content-Type": "application/x-protobuf", **reply.headers}
        for name, value in answer_headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(reply.body)))
        handler.end_headers()
        handler.wfile.write(reply.body)
        handler.wfile.flush()
        if reply.close_after:
            handler.close_connection = True

    def wait(self, predicate: Callable[[OtlpReceiver], object], timeout: float = 20.0) -> None:
        """Block until ``predicate(self)`` holds (woken by each request); AssertionError after
        ``scaled(timeout)`` seconds."""
        deadline = time.monotonic() + scaled(timeout)
        with self.changed:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"the receiver got {len(self.requests)} requests; still waiting")
                self.changed.wait(remaining)

    async def until(self, predicate: Callable[[OtlpReceiver], object], timeout: float = 20.0) -> None:
        """:meth:`wait` from a coroutine, without blocking the event loop."""
        await asyncio.to_thread(self.wait, predicate, timeout)

    def points(self, accepted_only: bool = True) -> list[Point]:
        with self.changed:
            requests = [r for r in self.requests if r.status == 200 or not accepted_only]
        return [point for request in requests for point in points_of(request.message)]


class Point(NamedTuple):
    """One data point, flattened with its resource and metric."""

    resource: dict[str, Any]
    metric: str
    unit: str
    monotonic: bool
    time: int
    start: int
    value: int
    attributes: dict[str, Any]


def _plain(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


def points_of(message: ExportMetricsServiceRequest) -> Iterator[Point]:
    """Every data point of a request; each metric must be a cumulative Sum with int values."""
    for resource_metrics in message.resource_metrics:
        resource = {kv.key: _plain(kv.value) for kv in resource_metrics.resource.attributes}
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "memagent"
            for metric in scope_metrics.metrics:
                assert metric.WhichOneof("data") == "sum", metric.name
                assert metric.sum.aggregation_temporality == CUMULATIVE
                for point in metric.sum.data_points:
                    assert point.WhichOneof("value") == "as_int"
                    yield Point(resource, metric.name, metric.unit, metric.sum.is_monotonic,
                                point.time_unix_nano, point.start_time_unix_nano, point.as_int,
                                {kv.key: _plain(kv.value) for kv in point.attributes})


def ns(timestamp: str) -> int:
    """A record timestamp in nanoseconds, computed independently of the sink."""
    moment = datetime.strptime(timestamp.rstrip("Z").ljust(26, "0"), "%Y-%m-%dT%H:%M:%S.%f")
    moment = moment.replace(tzinfo=UTC)
    return (int(moment.timestamp()) * 1_000_000 + moment.microsecond) * 1000


# -- records and sinks -----------------------------------------------------------------------------

WORKER = ProcessInfo(pid=4242, ppid=1, name="worker", started=1_700_000_000.25,
                     cmdline=("/usr/bin/python3", "-m", "worker", "--port=8000"), exe="/usr/bin/python3.11",
                     user="www-data", cgroup="/system.slice/worker.service")


def lifecycle(samples: int = 3, *, maker: RecordMaker | None = None, info: ProcessInfo = WORKER,
              full: bool = True) -> list[Record]:
    """A process's start, ``samples`` samples one second apart (rss grows a page each), its exit."""
    maker = maker or RecordMaker(host="test-host", os_name="linux", backend="fake",
                                 tags={"deployment.environment.name": "test"})
    now = time.time()
    records = [maker.seal(maker.start("api", info, iso_utc(now)))]
    for i in range(samples):
        reading = Reading(info.pid, info.started, {"rss": 10_000_000 + 4096 * i, "vms": 50_000_000},
                          {"shared": 4096, "text": 8192, "lib": 0, "data": 65536, "dirty": 0},
                          {"uss": 9_000_000, "pss": 9_500_000, "swap": 0} if full else None)
        records.append(maker.seal(maker.sample("api", info, reading, iso_utc(now + i))))
    records.append(maker.seal(maker.exit("api", info, iso_utc(now + samples))))
    return records


def make_sink(receiver_url: str, **options: Any) -> OtlpSink:
    options.setdefault("endpoint", receiver_url)
    return OtlpSink.from_options(Options(options, "sinks[1]"), sink_context("otlp"))


def reports(sink: OtlpSink) -> list[str]:
    """What the sink logged as warnings and errors (its context's RecordingLogger)."""
    assert isinstance(sink.log, RecordingLogger)
    return sink.log.reports


# -- what arrives ----------------------------------------------------------------------------------


async def test_samples_arrive_as_semconv_metrics() -> None:
    """rss → process.memory.usage, vms → process.memory.virtual (non-monotonic cumulative Sums in
    By, as hostmetrics emits them), full and platform fields under memagent.process.memory.*; the
    resource carries the process attributes of its start record; times are the records' own."""
    records = lifecycle(3)
    with OtlpReceiver() as receiver:
        sink = make_sink(receiver.url)
        await sink.start()
        await sink.write(records)
        await sink.close()
    [request] = receiver.requests
    assert request.path == "/v1/metrics"
    samples = [r.fields for r in records if r.type == "sample"]
    points = receiver.points()
    by_metric: dict[str, list[Point]] = {}
    for point in points:
        by_metric.setdefault(point.metric, []).append(point)
    assert sorted(by_metric) == sorted([
        "process.memory.usage", "process.memory.virtual", "memagent.process.memory.uss",
        "memagent.process.memory.pss", "memagent.process.memory.swap", "memagent.process.memory.shared",
        "memagent.process.memory.text", "memagent.process.memory.lib", "memagent.process.memory.data",
        "memagent.process.memory.dirty"])
    for point in points:
        assert (point.unit, point.monotonic) == ("By", False)
        assert point.start == ns(samples[0]["started"])
    usage = by_metric["process.memory.usage"]
    assert [(p.time, p.value) for p in usage] == [(ns(s["ts"]), s["portable"]["rss"]) for s in samples]
    assert [p.value for p in by_metric["process.memory.virtual"]] == [s["portable"]["vms"] for s in samples]
    assert [p.value for p in by_metric["memagent.process.memory.pss"]] == [s["full"]["pss"] for s in samples]
    assert usage[0].resource == {
        "host.name": "test-host", "process.pid": 4242, "process.parent_pid": 1,
        "process.executable.name": "worker", "process.executable.path": "/usr/bin/python3.11",
        "process.command": "/usr/bin/python3",
        "process.command_line": "/usr/bin/python3 -m worker --port=8000",
        "process.owner": "www-data", "process.cgroup": "/system.slice/worker.service",
        "process.creation.time": samples[0]["started"], "memagent.target": "api",
        "deployment.environment.name": "test"}
    assert len(request.message.resource_metrics) == 1  # one resource per process per request
    assert len(sink.encoder.directory) == 0  # forgotten at its exit
    assert sink.counters["points_sent"] == len(points) == 30


async def test_gzip_headers_and_content_type_arrive() -> None:
    """gzip by default (the receiver decompresses), protobuf content type, the configured headers
    and a memagent User-Agent."""
    with OtlpReceiver() as receiver:
        headers = {"Authorization": "Bearer s3cret-t0ken", "X-Scope-OrgID": "team-a"}
        sink = make_sink(receiver.url, headers=headers)
        await sink.start()
        await sink.write(lifecycle(1))
        await sink.close()
    [request] = receiver.requests
    assert request.headers["content-encoding"] == "gzip" and request.raw[:2] == b"\x1f\x8b"
    assert request.headers["content-type"] == "application/x-protobuf"
    assert request.headers["authorization"] == "Bearer s3cret-t0ken"
    assert request.headers["x-scope-orgid"] == "team-a"
    assert request.headers["user-agent"].startswith("memagent/")


async def test_json_encoding_without_compression() -> None:
    """encoding = "json", compression = "none": OTLP/JSON that the official JSON mapping parses
    into the same points (enums as integers, as the spec requires)."""
    records = lifecycle(2)
    with OtlpReceiver() as receiver:
        sink = make_sink(receiver.url, encoding="json", compression="none")
        await sink.start()
        await sink.write(records)
        await sink.close()
    [request] = receiver.requests
    assert request.headers["content-type"] == "application/json" and "content-encoding" not in request.headers
    assert b'"aggregationTemporality":2' in request.raw
    usage = [p for p in receiver.points() if p.metric == "process.memory.usage"]
    assert [p.value for p in usage] == [r.fields["portable"]["rss"] for r in records if r.type == "sample"]


async def test_totals_and_agent_records_become_metrics() -> None:
    """A totals record → memagent.target.* on the host's resource (memagent.target as point
    attribute); an agent record → the agent's counters and per-sink counters."""
    maker = RecordMaker(host="test-host", os_name="linux", backend="fake", tags={})
    ts = iso_utc(time.time())
    body = {"os": "linux", "backend": "fake", "target": "api", "processes": 3, "rss": 30_000, "vms": 90_000}
    totals = maker.seal(maker.derived("totals", body, ts, target="api"))
    stats = {"uptime_s": 12.5, "processes": 3, "records": 40, "ticks": 10, "ticks_skipped": 1,
             "rss": 5_000_000,
             "sinks": {"otlp": {"type": "otlp", "queued": 2, "written": 30, "dropped": 4, "rejected": 1,
                                "failures": 2, "retries": 2, "reopens": 0, "requests": 5}}}
    agent = maker.seal(maker.agent(stats, ts))
    with OtlpReceiver() as receiver:
        sink = make_sink(receiver.url)
        await sink.start()
        await sink.write([totals, agent])
        await sink.close()
    got = {(p.metric, tuple(sorted(p.attributes.items()))): p for p in receiver.points()}
    usage = got[("memagent.target.memory.usage", (("memagent.target", "api"),))]
    assert usage.value == 30_000 and usage.resource == {"host.name": "test-host"} and usage.time == ns(ts)
    assert got[("memagent.target.processes", (("memagent.target", "api"),))].unit == "{process}"
    own = got[("process.memory.usage", ())]
    assert own.value == 5_000_000 and own.resource["service.name"] == "memagent"
    assert own.start == ns(ts) - 12_500_000_000
    dropped = got[("memagent.sink.dropped", (("memagent.sink", "otlp"), ("memagent.sink.type", "otlp")))]
    assert dropped.value == 4 and dropped.monotonic and dropped.unit == "{record}"
    assert got[("memagent.agent.records", ())].value == 40


async def test_a_sample_without_its_start_still_arrives() -> None:
    """A process whose start record this sink never got (dropped from a full queue): its samples
    carry what a sample knows (pid, parent, name)."""
    records = lifecycle(2)[1:-1]
    with OtlpReceiver() as receiver:
        sink = make_sink(receiver.url)
        await sink.start()
        await sink.write(records)
        await sink.close()
    resource = receiver.points()[0].resource
    assert resource["process.pid"] == 4242 and resource["process.executable.name"] == "worker"
    assert "process.command_line" not in resource


def test_process_directory_is_bounded() -> None:
    """At most max_processes identities are kept; the oldest go first, counted."""
    directory = ProcessDirectory(max_processes=2, max_bytes=1 << 20)
    for pid in (1, 2, 3):
        directory.start({"target": "t", "pid": pid, "ppid": 0, "name": "p", "started": "2026-01-01T00:00:00Z",
                         "host": "h", "cmdline": ["p"]})
    assert len(directory) == 2 and directory.evicted == 1
    directory.exit({"target": "t", "pid": 3, "started": "2026-01-01T00:00:00Z"})
    assert len(directory) == 1
    small = ProcessDirectory(max_processes=100, max_bytes=1000)
    for pid in range(10):
        small.start({"target": "t", "pid": pid, "ppid": 0, "name": "p", "started": "2026-01-01T00:00:00Z",
                     "host": "h", "cmdline": ["x" * 100]})
    assert small.bytes <= 1000 and small.evicted > 0


# -- answers ---------------------------------------------------------------------------------------


async def test_503_retry_after_is_waited_and_the_same_bytes_are_resent() -> None:
    """503 with Retry-After: 1 is a SinkError (the framework keeps the batch); the next attempt
    is not sent before a second has passed, and carries the same bytes."""
    records = lifecycle(2)
    with OtlpReceiver() as receiver:
        receiver.script(Reply(503, {"Retry-After": "1"}, status_body(14, "overloaded")))
        sink = make_sink(receiver.url)
        await sink.start()
        with pytest.raises(SinkError) as failed:
            await sink.write(records)
        assert not isinstance(failed.value, SinkRejected)
        assert "503" in str(failed.value) and "overloaded" in str(failed.value)
        assert "Retry-After" in str(failed.value)
        await sink.write(records)  # what the framework does: the same batch again
        await sink.close()
    first, second = receiver.requests
    assert second.at - first.at >= 0.95
    assert first.raw == second.raw
    assert sink.counters["throttled"] == 1 and sink.counters["requests"] == 2


async def test_retry_after_is_capped_by_max_retry_after() -> None:
    """A Retry-After of an hour waits only max_retry_after."""
    with OtlpReceiver() as receiver:
        receiver.script(Reply(429, {"Retry-After": "3600"}))
        sink = make_sink(receiver.url, max_retry_after="200ms")
        await sink.start()
        with pytest.raises(SinkError):
            await sink.write(lifecycle(1))
        started = time.monotonic()
        await sink.write(lifecycle(1))
        await sink.close()
    assert time.monotonic() - started < scaled(5)
    assert len(receiver.requests) == 2


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After in both RFC 9110 forms; garbage is ignored, a past date is 0."""
    now = 1_800_000_000.0
    assert retry_after("120") == 120.0
    assert retry_after("Fri, 15 Jan 2027 08:00:30 GMT", now=1_800_000_000.0) == 30.0
    assert retry_after("Fri, 15 Jan 2027 07:00:00 GMT", now=now) == 0.0
    assert retry_after("soon") is None and retry_after(None) is None and retry_after("-5") is None


@pytest.mark.parametrize("status", [502, 504])
async def test_gateway_errors_are_retried(status: int) -> None:
    """502 and 504 are retryable (SinkError, not SinkRejected)."""
    with OtlpReceiver() as receiver:
        receiver.script(Reply(status))
        sink = make_sink(receiver.url)
        await sink.start()
        with pytest.raises(SinkError) as failed:
            await sink.write(lifecycle(1))
        await sink.close()
    assert not isinstance(failed.value, SinkRejected)


@pytest.mark.parametrize("status", [400, 404, 413, 500])
async def test_other_errors_reject_the_batch(status: int) -> None:
    """Any other 4xx/5xx must not be retried (OTLP): SinkRejected, quoting the server's Status."""
    with OtlpReceiver() as receiver:
        receiver.script(Reply(status, body=status_body(3, "bad metric")))
        sink = make_sink(receiver.url)
        await sink.start()
        with pytest.raises(SinkRejected, match=f"answered {status} .*bad metric"):
            await sink.write(lifecycle(1))
        await sink.close()


async def test_an_error_in_json_or_text_is_quoted() -> None:
    """A JSON Status (OTLP/JSON servers) and a proxy's plain text are quoted too, on one line."""
    with OtlpReceiver() as receiver:
        receiver.script(Reply(400, {"Content-Type": "application/json"}, b'{"code":3,"message":"bad unit"}'),
                        Reply(404, {"Content-Type": "text/html; charset=utf-8"}, b"<h1>Not\nFound</h1>"))
        sink = make_sink(receiver.url, encoding="json")
        await sink.start()
        with pytest.raises(SinkRejected, match="answered 400 Bad Request: bad unit;"):
            await sink.write(lifecycle(1))
        with pytest.raises(SinkRejected, match=r"answered 404 Not Found: <h1>Not Found</h1>;"):
            await sink.write(lifecycle(1))
        await sink.close()


async def test_a_400_is_dropped_counted_and_the_next_batch_flows() -> None:
    """Through the framework's outlet: the rejected batch is counted (rejected, dropped), the next
    batch is written."""
    records = lifecycle(8, full=False)
    with OtlpReceiver() as receiver:
        receiver.script(Reply(400, body=status_body(3, "invalid")))
        sink = make_sink(receiver.url)
        outlet = Outlet("otlp", sink, queue=100, when_full="drop_oldest", batch=5, targets=None)
        await outlet.start()
        for record in records:
            outlet.offer(record)
        await outlet.drain(time.monotonic() + scaled(10))
    assert outlet.rejected == 5 and outlet.dropped == 5 and outlet.written == 5
    assert [r.status for r in receiver.requests] == [400, 200]
    arrived = [p.time for p in receiver.points() if p.metric == "process.memory.usage"]
    assert arrived == [ns(r.fields["ts"]) for r in records[5:] if r.type == "sample"]


async def test_partial_success_is_logged_once_and_counted() -> None:
    """rejected_data_points are counted on every answer, logged once per episode; a whole success
    ends the episode (logged once too)."""
    partial = ExportMetricsServiceResponse(partial_success=ExportMetricsPartialSuccess(
        rejected_data_points=3, error_message="3 points too old")).SerializeToString()
    with OtlpReceiver() as receiver:
        receiver.script(Reply(body=partial), Reply(body=partial), Reply())
        sink = make_sink(receiver.url)
        await sink.start()
        for _ in range(3):
            await sink.write(lifecycle(1))
        await sink.close()
    assert sink.counters["points_rejected"] == 6 and sink.counters["partial_successes"] == 2
    warnings = [m for m in reports(sink) if "only in part" in m]
    assert len(warnings) == 1 and "3 points too old" in warnings[0]
    assert sum("accepts whole batches again" in m for m in sink.log.infos) == 1


async def test_header_values_are_never_logged() -> None:
    """A 401 whose body quotes the Authorization header: the error and the log carry no token."""
    token = "Bearer s3cret-t0ken-value"
    with OtlpReceiver() as receiver:
        receiver.script(Reply(401, {"Content-Type": "text/plain"}, f"bad credentials: {token}".encode()),
                        Reply(403, body=status_body(7, "s3cret-t0ken-value is revoked")))
        sink = make_sink(receiver.url, headers={"Authorization": token})
        await sink.start()
        errors = []
        for _ in range(2):
            with pytest.raises(SinkRejected) as failed:
                await sink.write(lifecycle(1))
            errors.append(str(failed.value))
        await sink.close()
    assert "401" in errors[0] and "403" in errors[1]
    assert all("s3cret" not in text for text in errors + reports(sink) + sink.log.infos)


async def test_no_answer_is_a_sink_error() -> None:
    """Refused, or an answer that never comes within timeout: SinkError, retried by the framework."""
    with OtlpReceiver() as receiver:
        url = receiver.url
    sink = make_sink(url)  # the receiver is gone: connection refused
    await sink.start()
    with pytest.raises(SinkError, match="refused"):
        await sink.write(lifecycle(1))
    await sink.close()
    with OtlpReceiver() as receiver:
        receiver.script(Reply(hang=True))
        sink = make_sink(receiver.url, timeout="300ms")
        await sink.start()
        started = time.monotonic()
        with pytest.raises(SinkError, match="no answer within timeout"):
            await sink.write(lifecycle(1))
        assert time.monotonic() - started < scaled(3)
        await sink.write(lifecycle(1))  # the next request goes out on a fresh connection
        await sink.close()
    assert [r.status for r in receiver.requests] == [200, 200]  # the hung one, then the retry


async def test_a_connection_closed_while_idle_is_reopened_silently() -> None:
    """A server that closes a kept connection after answering: the next request reconnects
    instead of failing."""
    with OtlpReceiver() as receiver:
        receiver.default = Reply(close_after=True)
        sink = make_sink(receiver.url)
        await sink.start()
        for _ in range(3):
            await sink.write(lifecycle(1))
        await sink.close()
    assert len(receiver.requests) == 3


async def test_an_endless_answer_is_read_only_to_its_bound() -> None:
    """A 200 with a 4 MiB body: the sink reads at most 64 KiB of it and goes on."""
    with OtlpReceiver() as receiver:
        receiver.script(Reply(body=b"x" * (4 << 20)))
        sink = make_sink(receiver.url)
        await sink.start()
        await sink.write(lifecycle(1))
        await sink.write(lifecycle(1))
        await sink.close()
    assert len(receiver.requests) == 2


async def test_https_with_a_ca_file(tmp_path: Path) -> None:
    """An https endpoint: verified against ca_file; without it (system CAs) the self-signed
    certificate is refused, as a SinkError."""
    cert, key = self_signed_cert(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    with OtlpReceiver(tls) as receiver:
        sink = make_sink(receiver.url, ca_file=str(cert))
        await sink.start()
        await sink.write(lifecycle(1))
        await sink.close()
        untrusting = make_sink(receiver.url)
        await untrusting.start()
        with pytest.raises(SinkError, match="TLS"):
            await untrusting.write(lifecycle(1))
        await untrusting.close()
    assert len([r for r in receiver.requests if r.status == 200]) == 1


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "error"), [
    ({"endpoint": "ftp://collector/v1/metrics"}, "sinks[1].endpoint: must be an http:// or https:// URL"),
    ({"endpoint": "http://user:pw@collector:4318/v1/metrics"},
     "sinks[1].endpoint: must not carry credentials"),
    ({"endpoint": "http://collector:x/v1/metrics"}, "sinks[1].endpoint: not a valid URL"),
    ({"headers": {"Content-Encoding": "br"}}, "sinks[1].headers.Content-Encoding: is set by the sink"),
    ({"headers": {"X-Token": "a\r\nInjected: 1"}}, "sinks[1].headers.X-Token: must not contain line breaks"),
    ({"headers": {"Bad Name": "v"}}, "sinks[1].headers.Bad Name: is not a valid HTTP header name"),
    ({"headers": {"X-Token": 5}}, "sinks[1].headers.X-Token: must be a string"),
    ({"ca_file": "/etc/ca.pem"}, "sinks[1].ca_file: needs an https:// endpoint"),
    ({"endpoint": "https://127.0.0.1:4318/v1/metrics", "client_cert": "/c.pem"},
     "sinks[1].client_key: client_cert and client_key go together"),
    ({"endpoint": "https://127.0.0.1:4318/v1/metrics", "ca_file": "/nonexistent.pem"},
     "sinks[1].ca_file: cannot load"),
    ({"encoding": "thrift"}, 'sinks[1].encoding: must be one of "protobuf", "json"'),
    ({"timout": "1s"}, "sinks[1].timout: unknown key; did you mean timeout?"),
])
def test_bad_options_name_their_key(options: dict[str, Any], error: str) -> None:
    """Every bad option is a ConfigError naming its dotted key, never a header's value."""
    with pytest.raises(ConfigError) as failed:
        OtlpSink.from_options(Options(options, "sinks[1]"), sink_context("otlp"))
    assert str(failed.value).startswith(error)
    assert "Injected" not in str(failed.value)


def test_plain_http_beyond_loopback_is_a_security_warning() -> None:
    """http:// to another host with a token: one SECURITY warning (without the token)."""
    context = sink_context("otlp")
    OtlpSink.from_options(Options({"endpoint": "http://collector.example:4318/v1/metrics",
                                   "headers": {"Authorization": "Bearer s3cret"}}, "sinks[1]"), context)
    [warning] = context.log.reports
    assert warning.startswith("SECURITY: sinks[1]: endpoint http://collector.example:4318/v1/metrics")
    assert "s3cret" not in warning
    OtlpSink.from_options(Options({}, "sinks[1]"), quiet := sink_context("otlp"))
    assert quiet.log.reports == []


def test_sample_config_is_a_valid_sink() -> None:
    """The sample config's uncommented keys build a sink with the defaults."""
    [table] = tomllib.loads(OtlpSink.sample_config)["sinks"]
    assert table.pop("type") == "otlp"
    sink = OtlpSink.from_options(Options(table, "sinks[1]"), sink_context("otlp"))
    assert str(sink.endpoint) == "http://127.0.0.1:4318/v1/metrics"
    assert (sink.encoding, sink.compression, sink.timeout) == ("protobuf", "gzip", 10.0)


def run_without_the_extra(*args: str) -> subprocess.CompletedProcess[str]:
    """``memagent ARGS`` in a Python where opentelemetry cannot be imported (as without the extra)."""
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "from memagent.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=scaled(60), check=False)


def test_without_the_extra_plugins_and_check_say_how_to_install(tmp_path: Path) -> None:
    """Without opentelemetry-proto: `memagent plugins` lists otlp as not loading, naming the
    extra; `memagent check` of a config using it exits 2 with the same; the other sinks load."""
    assert MEMAGENT[1:] == ["-m", "memagent"]
    listed = run_without_the_extra("plugins")
    assert listed.returncode == 0
    [line] = [line for line in listed.stdout.splitlines() if line.startswith("otlp ")]
    assert " no: " in line and "install memagent[otlp]" in line
    assert all(" yes" in row for row in listed.stdout.splitlines() if row.startswith(("stdout ", "file ")))
    config = tmp_path / "otlp.toml"
    config.write_text('[[targets]]\nname = "self"\nself = true\n\n[[sinks]]\ntype = "otlp"\n')
    checked = run_without_the_extra("check", str(config))
    assert checked.returncode == 2
    assert checked.stderr.startswith("memagent: error: sink plugin 'otlp' (from memagent)")
    assert "install memagent[otlp]" in checked.stderr and "Traceback" not in checked.stderr


def test_examples_otlp_toml_uses_this_sink() -> None:
    """examples/otlp.toml (checked by test_cli's examples test) configures an otlp sink."""
    config = tomllib.loads((REPO / "examples/otlp.toml").read_text())
    assert [s["type"] for s in config["sinks"] if s["type"] == "otlp"] == ["otlp"]

"""Records → OTLP metrics, built with the official ``opentelemetry-proto`` messages.

Names, units and resource attributes follow the OpenTelemetry semantic conventions where they
have one, as the Collector's hostmetrics ``process`` scraper emits them; the rest are named
``memagent.*``. A level (bytes in use, a number of processes) is an UpDownCounter, which OTLP
carries as a non-monotonic cumulative ``Sum`` (as hostmetrics does for ``process.memory.usage``);
a count that only grows (page faults, records made) is a monotonic cumulative ``Sum``.

=================  ==========================================  ========  ==============================
record             metric                                      unit      from
=================  ==========================================  ========  ==============================
sample             ``process.memory.usage``                    By        ``portable.rss``
sample             ``process.memory.virtual``                  By        ``portable.vms``
sample             ``memagent.process.memory.<field>``         By        ``platform.<field>`` (bytes)
sample             ``process.paging.faults`` (monotonic)       {fault}   ``platform.pfaults`` (macOS),
                                                                         ``platform.num_page_faults``
sample             ``memagent.process.paging.pageins`` (mon.)  {page}    ``platform.pageins`` (macOS)
sample             ``memagent.process.memory.uss|pss|swap``    By        ``full.*``
totals             ``memagent.target.memory.usage|virtual``    By        ``rss``, ``vms`` (sums)
totals             ``memagent.target.memory.uss|pss|swap``     By        ``uss``, ``pss``, ``swap``
totals             ``memagent.target.processes``               {process} ``processes``, ``full_processes``
                   ``memagent.target.full_processes``
agent              ``memagent.agent.records|ticks|             (mon.)    the agent's counters
                   ticks_skipped``, ``memagent.agent.processes``
agent              ``process.memory.usage``                    By        the agent's own ``rss``
agent              ``memagent.sink.written|dropped|rejected|   {record}  per sink (point attributes
                   failures|retries`` (mon.), ``.queued``                ``memagent.sink``, ``.type``)
=================  ==========================================  ========  ==============================

Timestamps: a point's ``time_unix_nano`` is its record's own ``ts`` (when it was sampled), never
the export time; ``start_time_unix_nano`` is the process's ``started`` for process metrics (as
hostmetrics sets it), the agent's start for its counters, and the first ``totals`` record seen of
a target for that target's totals.

Resources: one per watched process — ``host.name``, ``process.pid``, ``process.parent_pid``,
``process.executable.name`` and ``process.creation.time`` from each sample, and from the
process's ``start`` record ``process.executable.path``, ``process.command`` (argv[0]),
``process.command_line`` (arguments joined by spaces, as hostmetrics does), ``process.owner``,
``process.cgroup``; plus ``memagent.target`` and the agent's ``tags``, each under its own key
(``tags = { "deployment.environment.name" = "prod" }`` gives that semconv attribute; a tag never
replaces an attribute above). Totals go on a host resource (``host.name`` and tags, the target as
the point attribute ``memagent.target``); the agent's counters on its own resource
(``service.name = "memagent"``, ``process.pid``). ``start``, ``exit`` and ``error`` records make
no points: ``start`` and ``exit`` keep the :class:`ProcessDirectory`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, NumberDataPoint, ScopeMetrics
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from memagent.contracts import Record

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
Attribute = tuple[str, str | int | bool]


class Instrument(NamedTuple):
    """A metric's identity: name, UCUM unit, description, and whether it only grows."""

    name: str
    unit: str
    description: str
    monotonic: bool = False


def _bytes(name: str, description: str) -> Instrument:
    return Instrument(name, "By", description)


PORTABLE = {
    "rss": _bytes("process.memory.usage", "The amount of physical memory in use (resident set size; "
                                          "Windows: working set)."),
    "vms": _bytes("process.memory.virtual", "The amount of committed virtual memory (Windows: pagefile)."),
}
FULL = {
    "uss": _bytes("memagent.process.memory.uss", "Unique set size: memory freed if the process exited."),
    "pss": _bytes("memagent.process.memory.pss", "Proportional set size: resident memory, shared pages "
                                                 "divided among their users."),
    "swap": _bytes("memagent.process.memory.swap", "Memory of the process swapped out."),
}
_FAULTS = Instrument("process.paging.faults", "{fault}", "Number of page faults the process has made.",
                     monotonic=True)
#: platform fields that are counts, not bytes
PLATFORM_COUNTS = {
    "pfaults": _FAULTS,
    "num_page_faults": _FAULTS,
    "pageins": Instrument("memagent.process.paging.pageins", "{page}",
                          "Number of pages read in from disk (macOS pageins).", monotonic=True),
}
TOTALS = {
    "processes": Instrument("memagent.target.processes", "{process}",
                            "Processes of the target sampled in this tick."),
    "full_processes": Instrument("memagent.target.full_processes", "{process}",
                                 "Processes of the target whose uss/pss/swap were read."),
    "rss": _bytes("memagent.target.memory.usage",
                  "Physical memory in use, summed over the target's processes."),
    "vms": _bytes("memagent.target.memory.virtual",
                  "Committed virtual memory, summed over the target's processes."),
    "uss": _bytes("memagent.target.memory.uss", "Unique set size, summed over full_processes."),
    "pss": _bytes("memagent.target.memory.pss", "Proportional set size, summed over full_processes."),
    "swap": _bytes("memagent.target.memory.swap", "Swapped-out memory, summed over full_processes."),
}
AGENT = {
    "records": Instrument("memagent.agent.records", "{record}", "Records the agent made.", monotonic=True),
    "ticks": Instrument("memagent.agent.ticks", "{tick}", "Sampling ticks run.", monotonic=True),
    "ticks_skipped": Instrument("memagent.agent.ticks_skipped", "{tick}", "Ticks skipped because they "
                                                                          "could not start in time.",
                                monotonic=True),
    "processes": Instrument("memagent.agent.processes", "{process}", "Processes the agent watches."),
    "rss": PORTABLE["rss"],
}
SINK = {
    "written": Instrument("memagent.sink.written", "{record}", "Records the sink delivered.", monotonic=True),
    "dropped": Instrument("memagent.sink.dropped", "{record}", "Records dropped for the sink (queue full, "
                                                               "rejected, undelivered at stop).",
                          monotonic=True),
    "rejected": Instrument("memagent.sink.rejected", "{record}", "Records in batches the sink could never "
                                                                 "write.", monotonic=True),
    "failures": Instrument("memagent.sink.failures", "{failure}", "Failed writes (each retried).",
                           monotonic=True),
    "retries": Instrument("memagent.sink.retries", "{retry}", "Retries of failed writes.", monotonic=True),
    "queued": Instrument("memagent.sink.queued", "{record}", "Records waiting for the sink."),
}
_PLATFORM_BYTES: dict[str, Instrument] = {}


def platform_instrument(field: str) -> Instrument:
    """The metric of a ``platform`` field: a count's own, or ``memagent.process.memory.<field>``."""
    known = PLATFORM_COUNTS.get(field) or _PLATFORM_BYTES.get(field)
    if known is None:
        known = _PLATFORM_BYTES[field] = _bytes(f"memagent.process.memory.{field}",
                                                f"psutil memory_info field {field!r} of this OS.")
    return known


def nanos(text: str) -> int:
    """Nanoseconds since the epoch of a record timestamp (``2026-11-25T05:00:00.123456Z``), exact."""
    return (datetime.fromisoformat(text) - _EPOCH) // _MICROSECOND * 1000


def _value(value: str | int | bool) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    return AnyValue(string_value=value)


def _attributes(pairs: Iterable[tuple[str, Any]], tags: Mapping[str, str] | None) -> list[KeyValue]:
    """KeyValues of ``pairs`` (None values left out), then the tags whose keys are not taken."""
    attributes = {key: value for key, value in pairs if value is not None}
    for key, value in (tags or {}).items():
        attributes.setdefault(key, value)
    return [KeyValue(key=key, value=_value(value)) for key, value in attributes.items()]


class _Known(NamedTuple):
    resource: Resource
    started: int  # ns
    size: int  # serialized bytes, for the directory's bound


class ProcessDirectory:
    """The resource of every watched process, keyed by (target, pid, started): made from its
    ``start`` record (command line, executable, owner, cgroup), forgotten at its ``exit``. A
    sample of a process whose ``start`` this sink never saw (dropped from a full queue) gets a
    resource from the sample alone (pid, parent, name), kept the same way.

    Bounded: at most ``max_processes`` entries and ``max_bytes`` of serialized resources (command
    lines can be 32 KiB each); beyond either the oldest entry is forgotten and counted in
    :attr:`evicted` (its later samples then carry the sample-only resource)."""

    def __init__(self, max_processes: int, max_bytes: int) -> None:
        self.max_processes = max_processes
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evicted = 0
        self._known: dict[tuple[str, int, str], _Known] = {}

    def __len__(self) -> int:
        return len(self._known)

    @staticmethod
    def _key(fields: Mapping[str, Any]) -> tuple[str, int, str]:
        return fields["target"], fields["pid"], fields["started"]

    def start(self, fields: Mapping[str, Any]) -> None:
        """A ``start`` record: remember the process's full resource."""
        self._remember(self._key(fields), _process_resource(fields))

    def exit(self, fields: Mapping[str, Any]) -> None:
        """An ``exit`` record: forget the process."""
        known = self._known.pop(self._key(fields), None)
        if known is not None:
            self.bytes -= known.size

    def lookup(self, fields: Mapping[str, Any]) -> _Known:
        """The resource (and start time) for a ``sample`` record."""
        key = self._key(fields)
        known = self._known.get(key)
        return known if known is not None else self._remember(key, _process_resource(fields))

    def _remember(self, key: tuple[str, int, str], resource: Resource) -> _Known:
        self.exit({"target": key[0], "pid": key[1], "started": key[2]})  # a repeated start replaces
        known = self._known[key] = _Known(resource, nanos(key[2]), resource.ByteSize())
        self.bytes += known.size
        while len(self._known) > self.max_processes or (self.bytes > self.max_bytes and len(self._known) > 1):
            oldest = next(iter(self._known))
            self.bytes -= self._known.pop(oldest).size
            self.evicted += 1
        return known


def _process_resource(fields: Mapping[str, Any]) -> Resource:
    """A process's resource from a ``start`` record (everything) or a ``sample`` (what it has)."""
    cmdline: list[str] = fields.get("cmdline") or []
    pairs: list[tuple[str, Any]] = [
        ("host.name", fields["host"]),
        ("process.pid", fields["pid"]),
        ("process.parent_pid", fields["ppid"]),
        ("process.executable.name", fields["name"]),
        ("process.executable.path", fields.get("exe")),
        ("process.command", cmdline[0] if cmdline else None),
        ("process.command_line", " ".join(cmdline) if cmdline else None),
        ("process.owner", fields.get("user")),
        ("process.cgroup", fields.get("cgroup")),
        ("process.creation.time", fields["started"]),
        ("memagent.target", fields["target"]),
        ("memagent.process.command_line.truncated", True if fields.get("cmdline_truncated") else None),
    ]
    return Resource(attributes=_attributes(pairs, fields.get("tags")))


class _Group:
    """One resource's metrics in a request being built: a metric per instrument, its points in
    record order. (The hot path: one per process per batch, a point per field per sample.)"""

    __slots__ = ("scope_metrics", "points")

    def __init__(self, request: ExportMetricsServiceRequest, resource: Resource,
                 scope: InstrumentationScope) -> None:
        resource_metrics = request.resource_metrics.add()
        resource_metrics.resource.CopyFrom(resource)
        self.scope_metrics: ScopeMetrics = resource_metrics.scope_metrics.add()
        self.scope_metrics.scope.CopyFrom(scope)
        self.points: dict[str, RepeatedCompositeFieldContainer[NumberDataPoint]] = {}  # by metric name

    def point(self, instrument: Instrument, time: int, start: int, value: int,
              attributes: Sequence[KeyValue] | None = None) -> None:
        points = self.points.get(instrument.name)
        if points is None:
            name, unit, description, monotonic = instrument
            sums = self.scope_metrics.metrics.add(name=name, unit=unit, description=description).sum
            sums.aggregation_temporality = CUMULATIVE
            if monotonic:
                sums.is_monotonic = True
            points = self.points[name] = sums.data_points
        if attributes:
            points.add(time_unix_nano=time, start_time_unix_nano=start, as_int=value, attributes=attributes)
        else:
            points.add(time_unix_nano=time, start_time_unix_nano=start, as_int=value)


class Encoded(NamedTuple):
    """A batch as a request: the message and how many data points it carries."""

    request: ExportMetricsServiceRequest
    points: int


class Encoder:
    """Turns batches of records into export requests (see the module docstring). Keeps the
    :class:`ProcessDirectory` and the start times of totals and agent series, so batches must
    come in order, each once."""

    def __init__(self, *, version: str, max_processes: int = 16_384,
                 max_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = ProcessDirectory(max_processes, max_bytes)
        self.scope = InstrumentationScope(name="memagent", version=version)
        self.version = version
        self._ts = ("", 0)
        self._totals_started: dict[str, int] = {}
        self._agent_started: dict[str, int] = {}  # per run

    def _time(self, text: str) -> int:
        cached_text, cached = self._ts  # the samples of one tick share their ts
        if text != cached_text:
            cached = nanos(text)
            self._ts = (text, cached)
        return cached

    def encode(self, batch: Iterable[Record]) -> Encoded:
        """The request for ``batch`` (:class:`~memagent.contracts.Record` objects)."""
        request = ExportMetricsServiceRequest()
        groups: dict[object, _Group] = {}  # a resource's group is made on first use only
        points = 0
        for record in batch:
            kind, fields = record.type, record.fields
            if kind == "sample":
                known = self.directory.lookup(fields)
                key: object = (fields["target"], fields["pid"], fields["started"])
                group = groups.get(key) or groups.setdefault(key, _Group(request, known.resource, self.scope))
                points += self._sample(group, fields, known.started)
            elif kind == "start":
                self.directory.start(fields)
            elif kind == "exit":
                self.directory.exit(fields)
            elif kind == "totals":
                key = ("host", fields["host"])
                group = groups.get(key) or groups.setdefault(
                    key, _Group(request, self._host_resource(fields), self.scope))
                points += self._totals(group, fields)
            elif kind == "agent":
                key = ("agent", fields["pid"])
                group = groups.get(key) or groups.setdefault(
                    key, _Group(request, self._agent_resource(fields), self.scope))
                points += self._agent(group, fields)
        return Encoded(request, points)

    def _sample(self, group: _Group, fields: Mapping[str, Any], started: int) -> int:
        time = self._time(fields["ts"])
        points = 0
        for field, value in fields["portable"].items():
            group.point(PORTABLE[field], time, started, value)
            points += 1
        for field, value in fields["platform"].items():
            group.point(platform_instrument(field), time, started, value)
            points += 1
        for field, value in fields.get("full", {}).items():
            group.point(FULL[field], time, started, value)
            points += 1
        return points

    def _totals(self, group: _Group, fields: Mapping[str, Any]) -> int:
        time = self._time(fields["ts"])
        target = fields["target"]
        started = self._totals_started.setdefault(target, time)
        attributes = _attributes([("memagent.target", target)], None)
        points = 0
        for field, instrument in TOTALS.items():
            if field in fields:
                group.point(instrument, time, started, fields[field], attributes)
                points += 1
        return points

    @staticmethod
    def _host_resource(fields: Mapping[str, Any]) -> Resource:
        return Resource(attributes=_attributes([("host.name", fields["host"])], fields.get("tags")))

    def _agent_resource(self, fields: Mapping[str, Any]) -> Resource:
        pairs: list[Attribute] = [("host.name", fields["host"]), ("service.name", "memagent"),
                                  ("service.version", self.version), ("process.pid", fields["pid"])]
        return Resource(attributes=_attributes(pairs, fields.get("tags")))

    def _agent(self, group: _Group, fields: Mapping[str, Any]) -> int:
        time = self._time(fields["ts"])
        stats = fields["agent"]
        # the agent's start, fixed per run (uptime_s is rounded: recomputing it would move it)
        started = self._agent_started.setdefault(fields["run"], time - int(stats["uptime_s"] * 1e9))
        points = 0
        for field, instrument in AGENT.items():
            if isinstance(stats.get(field), int):
                group.point(instrument, time, started, stats[field])
                points += 1
        for name, counters in stats.get("sinks", {}).items():
            kind = str(counters.get("type"))
            attributes = _attributes([("memagent.sink", name), ("memagent.sink.type", kind)], None)
            for field, instrument in SINK.items():
                if isinstance(counters.get(field), int):
                    group.point(instrument, time, started, counters[field], attributes)
                    points += 1
        return points

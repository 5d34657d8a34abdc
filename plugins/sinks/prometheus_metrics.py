"""The metric families of the ``prometheus`` sink: a ``prometheus_client`` custom collector over
:class:`~memagent.plugins.sinks.prometheus_values.LatestValues`.

Names follow Prometheus' naming practices: one ``memagent_`` prefix, base units in the name
(``_bytes``, ``_seconds``), ``_total`` on counters, and one metric per kind of memory rather than a
``memtype`` label, because summing resident, virtual and swap bytes means nothing (the rule of
thumb: a sum or average over every label of a metric must be meaningful). The kinds are named as
the clients' standard ``process_resident_memory_bytes`` / ``process_virtual_memory_bytes`` are.

Per target, from ``totals`` records (``totals = true``); label ``target``:

    memagent_target_processes                   processes matched now (0: none; then no size series)
    memagent_target_full_processes              of them, those whose uss/pss/swap were read
    memagent_target_resident_memory_bytes       sum of rss
    memagent_target_virtual_memory_bytes        sum of vms
    memagent_target_unique_memory_bytes         sum of uss    } full = true, over
    memagent_target_proportional_memory_bytes   sum of pss    } full_processes
    memagent_target_swap_bytes                  sum of swap   }

or, with ``compat = "process-exporter"``, process-exporter's names instead (``groupname`` is the
target): ``namedprocess_namegroup_num_procs`` and ``namedprocess_namegroup_memory_bytes`` with
``memtype`` ``resident``, ``virtual``, and with ``full = true`` ``swapped``, ``proportionalResident``
and ``proportionalSwapped``. memagent does not read SwapPss: ``proportionalSwapped`` is shown only
when it is known exactly, i.e. 0 because nothing of the target is swapped (SwapPss ≤ Swap).

Per process (``per_process = true``), from ``sample`` records; labels ``target``, ``name`` and
``slot`` (``pid`` instead with ``pid_label = true``): ``memagent_process_resident_memory_bytes``,
``..._virtual_...``, ``..._unique_...``, ``..._proportional_...``, ``memagent_process_swap_bytes``;
then ``memagent_process_series`` (shown now), ``memagent_process_series_limit`` (``max_series``)
and ``memagent_processes_left_out_total`` (processes the cap left out, each once).

The agent's own, from ``agent`` records (as fresh as ``stats_interval``): ``memagent_build_info``,
``process_start_time_seconds`` and ``process_resident_memory_bytes`` (the names every Prometheus
client gives its own process), ``memagent_max_resident_memory_bytes``, ``memagent_watched_processes``,
``memagent_records_total``, ``memagent_ticks_total``, ``memagent_ticks_skipped_total``,
``memagent_rescans_total``, ``memagent_errors_total{kind}`` (``backend``, ``processor``,
``pidfile``, and each backend counter as ``backend_<name>``), per sink (label ``sink``)
``memagent_sink_queued_records``, ``memagent_sink_written_records_total``,
``memagent_sink_dropped_records_total``, ``memagent_sink_rejected_records_total``,
``memagent_sink_failures_total``, ``memagent_sink_retries_total``, ``memagent_sink_reopens_total``;
and from ``error`` records ``memagent_process_errors_total{target, kind}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from memagent.plugins.sinks.prometheus_values import LatestValues

#: (size key, metric name part, what it is) for every size a record may carry.
SIZES = (
    ("rss", "resident_memory_bytes", "resident set size (rss)"),
    ("vms", "virtual_memory_bytes", "virtual memory size (vms)"),
    ("uss", "unique_memory_bytes", "unique set size (uss: memory only this process maps)"),
    ("pss", "proportional_memory_bytes", "proportional set size (pss: shared pages split between sharers)"),
    ("swap", "swap_bytes", "swapped-out memory"),
)
#: process-exporter's memtype for each size; proportionalSwapped is handled apart.
PROCESS_EXPORTER_MEMTYPES = {"rss": "resident", "vms": "virtual", "swap": "swapped",
                             "pss": "proportionalResident"}
COMPAT = ("none", "process-exporter")
#: The counters of an agent record shown as memagent_errors_total{kind}.
AGENT_ERRORS = {"backend_failures": "backend", "processor_failures": "processor",
                "pidfile_problems": "pidfile"}
#: The framework's per-sink counters: (key in agent records, metric, help, is a counter).
SINK_COUNTERS = (
    ("queued", "memagent_sink_queued_records", "records queued for the sink now", False),
    ("written", "memagent_sink_written_records", "records the sink wrote", True),
    ("dropped", "memagent_sink_dropped_records", "records dropped for the sink (queue full, rejected, "
                                                 "or the sink closed for good)", True),
    ("rejected", "memagent_sink_rejected_records", "records in batches the sink could never write "
                                                   "(also counted as dropped)", True),
    ("failures", "memagent_sink_failures", "failed writes", True),
    ("retries", "memagent_sink_retries", "writes retried", True),
    ("reopens", "memagent_sink_reopens", "reopens asked by SIGHUP that succeeded", True),
)
AGENT_COUNTERS = (
    ("records", "memagent_records", "records made (every type)"),
    ("ticks", "memagent_ticks", "sampling ticks run"),
    ("ticks_skipped", "memagent_ticks_skipped", "ticks skipped because they could not start in time"),
    ("rescans", "memagent_rescans", "process listings"),
)


class MemagentCollector(Collector):
    """Builds every metric family from ``values`` at each scrape (see the module docstring).
    Reads memory only; called on the event loop, between writes, so it sees one consistent state."""

    def __init__(self, values: LatestValues, *, compat: str = "none", pid_label: bool = False,
                 version: str = "") -> None:
        self.values = values
        self.compat = compat
        self.pid_label = pid_label
        self.version = version

    def collect(self) -> Iterator[Metric]:
        if self.compat == "process-exporter":
            yield from self._process_exporter()
        else:
            yield from self._targets()
        if self.values.per_process:
            yield from self._processes()
        yield from self._errors()
        yield from self._agent()

    # -- per target ------------------------------------------------------------------------------

    def _targets(self) -> Iterator[Metric]:
        targets = sorted(self.values.targets.items())
        count = GaugeMetricFamily("memagent_target_processes", "processes the target matches now",
                                  labels=["target"])
        full = GaugeMetricFamily("memagent_target_full_processes", "processes of the target whose "
                                 "uss, pss and swap were read (the sums of those are over them)",
                                 labels=["target"])
        for target, totals in targets:
            count.add_metric([target], totals.processes)
            if totals.processes and totals.full_processes:
                full.add_metric([target], totals.full_processes)
        yield count
        yield full
        for key, name, what in SIZES:
            family = GaugeMetricFamily(f"memagent_target_{name}", f"{what}, summed over the target's "
                                       "processes", labels=["target"], unit="bytes")
            for target, totals in targets:
                if totals.processes and key in totals.sizes:
                    family.add_metric([target], totals.sizes[key])
            yield family

    def _process_exporter(self) -> Iterator[Metric]:
        """process-exporter's name-group families, the target being the group."""
        targets = sorted(self.values.targets.items())
        count = GaugeMetricFamily("namedprocess_namegroup_num_procs", "number of processes in this group",
                                  labels=["groupname"])
        memory = GaugeMetricFamily("namedprocess_namegroup_memory_bytes", "number of bytes of memory in use",
                                   labels=["groupname", "memtype"], unit="bytes")
        for target, totals in targets:
            count.add_metric([target], totals.processes)
            if not totals.processes:
                continue
            for key, memtype in PROCESS_EXPORTER_MEMTYPES.items():
                if key in totals.sizes:
                    memory.add_metric([target, memtype], totals.sizes[key])
            if totals.sizes.get("swap") == 0:
                memory.add_metric([target, "proportionalSwapped"], 0)
        yield count
        yield memory

    # -- per process -----------------------------------------------------------------------------

    def _processes(self) -> Iterator[Metric]:
        values = self.values
        labels = ["target", "name", "pid" if self.pid_label else "slot"]
        families = {key: GaugeMetricFamily(f"memagent_process_{name}", f"{what} of one process",
                                           labels=labels, unit="bytes")
                    for key, name, what in SIZES}
        pid_label = self.pid_label
        for process in values.processes.values():
            if not process.series:
                continue
            identity = [process.target, process.name, str(process.pid if pid_label else process.slot)]
            for key, size in process.sizes.items():
                families[key].add_metric(identity, size)
        yield from families.values()
        yield GaugeMetricFamily("memagent_process_series", "per-process series shown now",
                                value=values.series)
        yield GaugeMetricFamily("memagent_process_series_limit", "the most per-process series shown "
                                "(max_series)", value=values.max_series)
        yield CounterMetricFamily("memagent_processes_left_out", "processes whose per-process series "
                                  "max_series left out, each counted once", value=values.left_out)

    # -- errors and the agent's own counters -----------------------------------------------------

    def _errors(self) -> Iterator[Metric]:
        family = CounterMetricFamily("memagent_process_errors", "processes that could not be read, "
                                     "by target and kind (access_denied, read_error, ...)",
                                     labels=["target", "kind"])
        for (target, kind), count in sorted(self.values.process_errors.items()):
            family.add_metric([target, kind], count)
        yield family

    def _agent(self) -> Iterator[Metric]:
        yield InfoMetricFamily("memagent_build", "the memagent serving these metrics",
                               value={"version": self.version})
        stats = self.values.agent
        if stats is None:
            return  # before the first agent record (every stats_interval)
        started = _epoch(self.values.agent_ts) - float(stats.get("uptime_s", 0))
        yield GaugeMetricFamily("process_start_time_seconds", "when the agent started, seconds since "
                                "the epoch", value=round(started, 3), unit="seconds")
        for key, name, what in (("rss", "process_resident_memory_bytes", "the agent's resident set size"),
                                ("max_rss", "memagent_max_resident_memory_bytes",
                                 "the agent's peak resident set size")):
            if isinstance(stats.get(key), int):
                yield GaugeMetricFamily(name, what, value=stats[key], unit="bytes")
        yield GaugeMetricFamily("memagent_watched_processes", "processes the agent samples now",
                                value=_number(stats, "processes"))
        for key, name, what in AGENT_COUNTERS:
            yield CounterMetricFamily(name, what, value=_number(stats, key))
        yield self._agent_errors(stats)
        yield from self._sinks(stats.get("sinks"))

    @staticmethod
    def _agent_errors(stats: Mapping[str, Any]) -> Metric:
        family = CounterMetricFamily("memagent_errors", "the agent's own failures, by kind (backend: "
                                     "a sampling round failed; processor: a pipeline processor failed; "
                                     "pidfile: a pidfile refused or unreadable; backend_<counter>: the "
                                     "backend's own counters, e.g. malformed procfs files)", labels=["kind"])
        for key, kind in AGENT_ERRORS.items():
            family.add_metric([kind], _number(stats, key))
        backend = stats.get("backend")
        if isinstance(backend, Mapping):
            for key, value in sorted(backend.items()):
                if isinstance(value, int):
                    family.add_metric([f"backend_{key}"], value)
        return family

    @staticmethod
    def _sinks(sinks: object) -> Iterator[Metric]:
        if not isinstance(sinks, Mapping):
            return
        for key, name, what, counter in SINK_COUNTERS:
            rows = [(sink, stats[key]) for sink, stats in sorted(sinks.items())
                    if isinstance(stats, Mapping) and isinstance(stats.get(key), int)]
            if counter:
                counted = CounterMetricFamily(name, what, labels=["sink"])
                for sink, value in rows:
                    counted.add_metric([sink], value)
                yield counted
            else:
                gauge = GaugeMetricFamily(name, what, labels=["sink"])
                for sink, value in rows:
                    gauge.add_metric([sink], value)
                yield gauge


def _number(stats: Mapping[str, Any], key: str) -> float:
    value = stats.get(key, 0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _epoch(ts: str) -> float:
    """Seconds since the epoch of a record's ``ts`` (``2026-11-25T05:00:00.123456Z``)."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()

"""The prometheus sink in-process: real records (totals from the real TotalsProcessor), real HTTP
scrapes on a free loopback port, the output parsed by prometheus_client's strict parsers."""

from __future__ import annotations

import asyncio
import gzip
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from email.message import Message
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from memagent.contracts import ProcessInfo, Reading, Record
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks.prometheus import DEFAULT_PORT, PrometheusSink
from memagent.records import RecordMaker, iso_utc
from memagent.testing import sink_context
from memagent.totals import TotalsProcessor

from cli_helpers import scaled

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
MIB = 1024 * 1024


class World:
    """Processes a test sets by hand, turned into the records the agent would make: ``tick()``
    gives each target's samples, then a ``totals`` record per totalled target (made by the real
    :class:`TotalsProcessor`)."""

    def __init__(self, totals: Iterable[str] = ("api",), full: bool = False) -> None:
        self.maker = RecordMaker(host="test-host", os_name="linux", backend="fake", tags={})
        self.processor = TotalsProcessor(self.maker, totals)
        self.full = full
        self.processes: dict[int, tuple[str, ProcessInfo, int]] = {}  # pid -> (target, info, rss)

    def spawn(self, target: str, pid: int, name: str = "worker", rss: int = 10 * MIB) -> ProcessInfo:
        info = ProcessInfo(pid=pid, ppid=1, name=name, started=1_700_000_000.0 + pid)
        self.processes[pid] = (target, info, rss)
        return info

    def tick(self, targets: Sequence[str] = ("api",)) -> list[Record]:
        ts = iso_utc(time.time())
        drafts = []
        for target, info, rss in self.processes.values():
            if target in targets:
                full = {"uss": rss // 2, "pss": rss * 3 // 4, "swap": 0} if self.full else None
                reading = Reading(info.pid, info.started, {"rss": rss, "vms": 4 * rss}, {"shared": 0}, full)
                drafts.append(self.maker.sample(target, info, reading, ts))
        drafts = self.processor.process(drafts) + self.processor.end_tick(ts, list(targets))
        return self.maker.seal_all(drafts)

    def exit(self, pid: int) -> list[Record]:
        target, info, _ = self.processes.pop(pid)
        return [self.maker.seal(self.maker.exit(target, info, iso_utc(time.time())))]

    def error(self, target: str, pid: int, kind: str) -> list[Record]:
        info = ProcessInfo(pid=pid, ppid=1, name="secret", started=1.0)
        draft = self.maker.error(target, info, kind, "permission denied", iso_utc(time.time()))
        return [self.maker.seal(draft)]

    def agent(self, **stats: Any) -> list[Record]:
        body = {"uptime_s": 12.5, "processes": len(self.processes), "records": self.maker.last_seq + 1,
                "ticks": 3, "ticks_skipped": 1, "rescans": 2, "backend_failures": 0, "processor_failures": 0,
                "pidfile_problems": 4, "rss": 30 * MIB, "max_rss": 31 * MIB, "backend": {"malformed": 2},
                "sinks": {"metrics": {"type": "prometheus", "queued": 5, "written": 100, "dropped": 7,
                                      "rejected": 1, "failures": 0, "retries": 0, "reopens": 0}}, **stats}
        return [self.maker.seal(self.maker.agent(body, iso_utc(time.time())))]


def build(**options: Any) -> PrometheusSink:
    return PrometheusSink.from_options(Options({"port": 0, **options}, "sinks[1]"), sink_context("metrics"))


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[PrometheusSink]:
    sink = build(**options)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def get(address: str, headers: Mapping[str, str]) -> tuple[int, Message, bytes]:
    """GET with urllib: status, headers, body (an error status is returned, not raised)."""
    request = urllib.request.Request(address, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=scaled(5)) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, refused.headers, refused.read()


async def scrape(sink: PrometheusSink, path: str = "/metrics", **headers: str) -> tuple[int, Message, bytes]:
    return await asyncio.to_thread(get, f"http://127.0.0.1:{sink.port}{path}", headers)


Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


async def samples(sink: PrometheusSink) -> Samples:
    """Every sample of a text-format scrape: (name, labels) -> value."""
    status, _, body = await scrape(sink)
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in parse_text(body.decode()) for s in family.samples}


def series(found: Samples, name: str) -> dict[Labels, float]:
    return {labels: value for (metric, labels), value in found.items() if metric == name}


def labels(**pairs: str) -> Labels:
    return frozenset(pairs.items())


# -- options -----------------------------------------------------------------------------------

def test_defaults_and_sample_config() -> None:
    """Loopback on the default port, /metrics, no per-process series; the sample config parses."""
    sink = PrometheusSink.from_options(Options({}, "sinks[1]"), sink_context())
    assert (sink.listener.options.host, sink.port, sink.path) == ("127.0.0.1", DEFAULT_PORT, "/metrics")
    assert not sink.values.per_process
    assert 'type = "prometheus"' in PrometheusSink.sample_config


@pytest.mark.parametrize(("options", "message"), [
    ({"per_proces": True}, "sinks[1].per_proces: unknown key; did you mean per_process?"),
    ({"compat": "telegraf"}, 'sinks[1].compat: must be one of "none", "process-exporter"'),
    ({"path": "/healthz"}, "sinks[1].path: must start with"),
    ({"max_series": -1}, "sinks[1].max_series: must be at least 0"),
    ({"tls_cert": "/x.pem"}, "sinks[1].tls_key: tls_cert and tls_key go together"),
])
def test_bad_options_name_the_key(options: dict[str, object], message: str) -> None:
    """Every option is checked, errors name the dotted key (listener keys included)."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(**options)


def test_serving_beyond_loopback_without_token_or_tls_is_reported() -> None:
    """host = 0.0.0.0 without token and TLS: two SECURITY warnings at build (memagent check)."""
    context = sink_context()
    PrometheusSink.from_options(Options({"host": "0.0.0.0"}, "sinks[1]"), context)
    assert len([r for r in context.log.reports if r.startswith("SECURITY: sinks[1]: ")]) == 2


# -- per-target series ---------------------------------------------------------------------------

async def test_target_totals_are_served_with_units_and_counts() -> None:
    """A totals record becomes memagent_target_* gauges: the count and each summed size in bytes."""
    world = World(full=True)
    world.spawn("api", 10, rss=10 * MIB)
    world.spawn("api", 11, rss=30 * MIB)
    async with running() as sink:
        await sink.write(world.tick())
        found = await samples(sink)
    api = labels(target="api")
    assert series(found, "memagent_target_processes") == {api: 2}
    assert series(found, "memagent_target_full_processes") == {api: 2}
    assert series(found, "memagent_target_resident_memory_bytes") == {api: 40 * MIB}
    assert series(found, "memagent_target_virtual_memory_bytes") == {api: 160 * MIB}
    assert series(found, "memagent_target_unique_memory_bytes") == {api: 20 * MIB}
    assert series(found, "memagent_target_proportional_memory_bytes") == {api: 30 * MIB}
    assert series(found, "memagent_target_swap_bytes") == {api: 0}
    assert not series(found, "memagent_process_resident_memory_bytes")  # per_process is off


async def test_a_target_whose_processes_are_gone_keeps_only_its_count() -> None:
    """When the last totals counts 0 processes, the count says 0 and no size series remain."""
    world = World()
    world.spawn("api", 10)
    async with running() as sink:
        await sink.write(world.tick())
        await sink.write(world.exit(10) + world.tick())
        found = await samples(sink)
    assert series(found, "memagent_target_processes") == {labels(target="api"): 0}
    assert not series(found, "memagent_target_resident_memory_bytes")
    assert not series(found, "memagent_target_full_processes")


async def test_a_target_without_totals_is_named_once_in_a_warning() -> None:
    """Samples of a target that has no totals = true: one warning naming it, after two agent
    records (its totals would follow its samples within a tick); the totalled target is not named."""
    world = World(totals=("api",))
    world.spawn("api", 10)
    world.spawn("db", 20)
    async with running() as sink:
        for _ in range(3):
            await sink.write(world.tick(("api", "db")) + world.agent())
        reports = [r for r in sink.context.log.reports if "totals" in r]
    assert len(reports) == 1 and 'target "db" has no totals = true' in reports[0]


async def test_compat_mode_uses_process_exporter_names_and_memtypes() -> None:
    """compat = "process-exporter": namedprocess_namegroup_* with groupname = target and its five
    memtypes (proportionalSwapped known exactly: nothing is swapped); no memagent_target_*."""
    world = World(full=True)
    world.spawn("api", 10, rss=10 * MIB)
    world.spawn("api", 11, rss=30 * MIB)
    async with running(compat="process-exporter") as sink:
        await sink.write(world.tick())
        found = await samples(sink)
    assert series(found, "namedprocess_namegroup_num_procs") == {labels(groupname="api"): 2}
    memory = series(found, "namedprocess_namegroup_memory_bytes")
    assert memory == {labels(groupname="api", memtype="resident"): 40 * MIB,
                      labels(groupname="api", memtype="virtual"): 160 * MIB,
                      labels(groupname="api", memtype="swapped"): 0,
                      labels(groupname="api", memtype="proportionalResident"): 30 * MIB,
                      labels(groupname="api", memtype="proportionalSwapped"): 0}
    assert not [name for name, _ in found if name.startswith("memagent_target_")]


async def test_compat_mode_without_full_has_resident_and_virtual_only() -> None:
    """Without full = true nothing of swap or pss was read: only resident and virtual, never a 0."""
    world = World(full=False)
    world.spawn("api", 10)
    async with running(compat="process-exporter") as sink:
        await sink.write(world.tick())
        found = await samples(sink)
    memtypes = {dict(labels_)["memtype"] for labels_ in series(found, "namedprocess_namegroup_memory_bytes")}
    assert memtypes == {"resident", "virtual"}


# -- per-process series --------------------------------------------------------------------------

async def test_per_process_series_have_pid_free_slots() -> None:
    """per_process: labels target, name, slot (no pid); processes with one name get slots 0, 1;
    an exited process's series go at once and its slot is the next newcomer's."""
    world = World()
    world.spawn("api", 10, name="gunicorn", rss=10 * MIB)
    world.spawn("api", 11, name="gunicorn", rss=20 * MIB)
    world.spawn("api", 12, name="nginx", rss=5 * MIB)
    async with running(per_process=True) as sink:
        await sink.write(world.tick())
        first = series(await samples(sink), "memagent_process_resident_memory_bytes")
        await sink.write(world.exit(10))
        after_exit = series(await samples(sink), "memagent_process_resident_memory_bytes")
        world.spawn("api", 13, name="gunicorn", rss=40 * MIB)
        await sink.write(world.tick())
        found = await samples(sink)
    assert first == {labels(target="api", name="gunicorn", slot="0"): 10 * MIB,
                     labels(target="api", name="gunicorn", slot="1"): 20 * MIB,
                     labels(target="api", name="nginx", slot="0"): 5 * MIB}
    assert labels(target="api", name="gunicorn", slot="0") not in after_exit
    assert series(found, "memagent_process_resident_memory_bytes")[
        labels(target="api", name="gunicorn", slot="0")] == 40 * MIB
    assert series(found, "memagent_process_series") == {labels(): 6}  # rss + vms of 3 processes
    total = series(found, "memagent_target_resident_memory_bytes")[labels(target="api")]
    assert total == sum(series(found, "memagent_process_resident_memory_bytes").values())


async def test_a_hostile_process_name_cannot_forge_series() -> None:
    """A process named to break the format (quotes, braces, newlines, a fake sample) is one
    escaped label value in both formats; no series is forged."""
    evil = 'x"} 1\nmemagent_forged 666\n# EOF\n\\'
    world = World()
    world.spawn("api", 10, name=evil)
    async with running(per_process=True) as sink:
        await sink.write(world.tick())
        _, _, text = await scrape(sink)
        _, _, openmetrics = await scrape(sink, Accept=OPENMETRICS)
    for families in (list(parse_text(text.decode())), list(parse_openmetrics(openmetrics.decode()))):
        assert "memagent_forged" not in {f.name for f in families}
        rss = next(f for f in families if f.name == "memagent_process_resident_memory_bytes")
        assert [s.labels["name"] for s in rss.samples] == [evil]


async def test_pid_label_replaces_the_slot() -> None:
    """pid_label = true: the pid is the identity label, as asked."""
    world = World()
    world.spawn("api", 10)
    async with running(per_process=True, pid_label=True) as sink:
        await sink.write(world.tick())
        found = await samples(sink)
    assert set(series(found, "memagent_process_resident_memory_bytes")) == {
        labels(target="api", name="worker", pid="10")}


async def test_max_series_leaves_whole_processes_out_and_counts_them() -> None:
    """max_series = 5 with 2 series per process: 2 processes shown, the third left out whole,
    counted once however many ticks pass; when one exits the third gets in, in the freed slot."""
    world = World()
    for pid in (10, 11, 12):
        world.spawn("api", pid, rss=pid * MIB)
    async with running(per_process=True, max_series=5) as sink:
        for _ in range(3):
            await sink.write(world.tick())
        capped = await samples(sink)
        await sink.write(world.exit(10) + world.tick())
        freed = await samples(sink)
    shown = series(capped, "memagent_process_resident_memory_bytes")
    assert len(shown) == 2 and len(series(capped, "memagent_process_virtual_memory_bytes")) == 2
    assert series(capped, "memagent_processes_left_out_total") == {labels(): 1}
    assert series(capped, "memagent_process_series") == {labels(): 4}
    assert series(capped, "memagent_process_series_limit") == {labels(): 5}
    assert sink.context.counters["left_out"] == 1
    shown = series(freed, "memagent_process_resident_memory_bytes")
    assert {dict(found)["slot"] for found in shown} == {"0", "1"}  # pid 12 took pid 10's slot 0
    assert shown[labels(target="api", name="worker", slot="0")] == world.processes[12][2]


async def test_a_process_missing_from_a_totalled_tick_disappears() -> None:
    """No stale value even if the exit record never arrives (dropped from the sink's queue): a
    process not sampled in the tick its target's totals close is removed."""
    world = World()
    world.spawn("api", 10)
    world.spawn("api", 11)
    async with running(per_process=True) as sink:
        await sink.write(world.tick())
        del world.processes[11]  # gone, and its exit record lost
        await sink.write(world.tick())
        found = await samples(sink)
    assert set(series(found, "memagent_process_resident_memory_bytes")) == {
        labels(target="api", name="worker", slot="0")}


# -- the agent's own counters and errors ---------------------------------------------------------

async def test_agent_counters_sinks_and_errors_by_kind() -> None:
    """The last agent record's counters and every error record, as counters and gauges."""
    world = World()
    async with running() as sink:
        await sink.write(world.agent() + world.error("api", 7, "access_denied")
                         + world.error("api", 8, "access_denied") + world.error("db", 9, "read_error"))
        found = await samples(sink)
    assert series(found, "memagent_records_total")[labels()] > 0
    assert series(found, "memagent_ticks_skipped_total") == {labels(): 1}
    assert series(found, "process_resident_memory_bytes") == {labels(): 30 * MIB}
    assert series(found, "memagent_max_resident_memory_bytes") == {labels(): 31 * MIB}
    assert series(found, "memagent_errors_total") == {labels(kind="backend"): 0, labels(kind="processor"): 0,
                                                      labels(kind="pidfile"): 4,
                                                      labels(kind="backend_malformed"): 2}
    assert series(found, "memagent_sink_dropped_records_total") == {labels(sink="metrics"): 7}
    assert series(found, "memagent_sink_queued_records") == {labels(sink="metrics"): 5}
    assert series(found, "memagent_process_errors_total") == {labels(target="api", kind="access_denied"): 2,
                                                              labels(target="db", kind="read_error"): 1}
    started = series(found, "process_start_time_seconds")[labels()]
    assert abs(started - (time.time() - 12.5)) < scaled(5)


# -- HTTP ----------------------------------------------------------------------------------------

async def test_content_negotiation_serves_openmetrics_or_text() -> None:
    """Prometheus' Accept gets OpenMetrics 1.0 (UNIT lines, # EOF, strict parser happy); no
    Accept gets text 0.0.4; a version prometheus_client cannot parse falls back to text."""
    world = World(full=True)
    world.spawn("api", 10)
    async with running(per_process=True) as sink:
        await sink.write(world.tick() + world.agent() + world.error("api", 7, "access_denied"))
        om_status, om_headers, om_body = await scrape(sink, Accept=OPENMETRICS)
        text_status, text_headers, text_body = await scrape(sink)
        odd_status, odd_headers, _ = await scrape(sink, Accept="application/openmetrics-text;version=1.0a")
    assert (om_status, text_status, odd_status) == (200, 200, 200)
    assert om_headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert text_headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert odd_headers["Content-Type"] == text_headers["Content-Type"]
    families = {f.name: f for f in parse_openmetrics(om_body.decode())}
    assert families["memagent_target_resident_memory_bytes"].unit == "bytes"
    assert families["memagent_records"].type == "counter"
    assert b"# UNIT memagent_process_resident_memory_bytes bytes\n" in om_body
    assert om_body.endswith(b"# EOF\n")
    text_families = {f.name for f in parse_text(text_body.decode())}
    assert {"memagent_target_processes", "memagent_records"} <= text_families


async def test_large_scrapes_are_gzipped_when_accepted() -> None:
    """Accept-Encoding: gzip (Prometheus always sends it) and a large body: gzipped; a small
    body or no Accept-Encoding: as is."""
    world = World()
    for pid in range(100, 400):
        world.spawn("api", pid)
    async with running(per_process=True) as sink:
        await sink.write(world.tick())
        status, headers, body = await scrape(sink, **{"Accept-Encoding": "gzip"})
        _, plain_headers, plain = await scrape(sink)
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == plain and plain_headers["Content-Encoding"] is None
    assert len(body) * 5 < len(plain)


async def test_scrapes_between_writes_share_one_rendering() -> None:
    """Scrapes with no write between them render once (a flood of scrapes costs one rendering
    per write and format); a write makes the next scrape render again."""
    world = World()
    world.spawn("api", 10)
    async with running() as sink:
        calls = 0
        collect = sink.collector.collect

        def counted() -> Any:
            nonlocal calls
            calls += 1
            return collect()

        sink.collector.collect = counted  # type: ignore[method-assign]
        await sink.write(world.tick())
        answers = await asyncio.gather(*(scrape(sink) for _ in range(5)))
        renders_before_write = calls
        await sink.write(world.tick())
        await scrape(sink)
    assert {a[2] for a in answers} == {answers[0][2]} and renders_before_write == 1
    assert calls == 2
    assert sink.context.counters["scrapes"] == 6


async def test_token_guards_metrics_but_not_healthz() -> None:
    """With a token, /metrics needs it (401 without); /healthz answers without it."""
    async with running(token="s3cret") as sink:
        refused, _, _ = await scrape(sink)
        allowed, _, _ = await scrape(sink, Authorization="Bearer s3cret")
        health, _, body = await scrape(sink, "/healthz")
    assert (refused, allowed, health) == (401, 200, 200)
    assert b'"scrapes":1' in body and sink.context.counters["rejected_auth"] == 1


async def test_a_failing_rendering_answers_500_and_the_next_scrape_works() -> None:
    """A collector that raises (a bug) is a 500, counted in server_errors; the sink carries on."""
    async with running() as sink:
        collect = sink.collector.collect

        def broken() -> Any:
            sink.collector.collect = collect  # type: ignore[method-assign]
            raise RuntimeError("bug")

        sink.collector.collect = broken  # type: ignore[method-assign]
        failed, _, _ = await scrape(sink)
        await sink.write(World().agent())
        worked, _, _ = await scrape(sink)
    assert (failed, worked) == (500, 200)
    assert sink.context.counters["server_errors"] == 1

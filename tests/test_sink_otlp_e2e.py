"""The otlp sink in a real `memagent run`, pushing to an independent OTLP receiver on loopback
(see test_sink_otlp.OtlpReceiver): every sample arrives, named and timed as the records say; a
collector that throttles (503 + Retry-After) loses nothing within the queue; what overflows the
queue is counted; a batch the collector refuses (400) is counted and the next one flows."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from test_sink_otlp import OtlpReceiver, Point, Reply, ns, status_body

from cli_helpers import (
    assert_contiguous,
    ps_rss_vsz,
    run_agent,
    spawn_allocator,
    stop_child,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
TOKEN = "Bearer s3cret-e2e-t0ken"


def usage_points(receiver: OtlpReceiver) -> list[Point]:
    """The process.memory.usage points of watched processes (not the agent's own)."""
    return [p for p in receiver.points()
            if p.metric == "process.memory.usage" and "memagent.target" in p.resource]


def sample_keys(records: list[dict[str, Any]]) -> Counter[tuple[int, int, int]]:
    """(pid, ts in ns, rss) of every sample record."""
    return Counter((r["pid"], ns(r["ts"]), r["portable"]["rss"]) for r in records if r["type"] == "sample")


def point_keys(points: list[Point]) -> Counter[tuple[int, int, int]]:
    return Counter((p.resource["process.pid"], p.time, p.value) for p in points)


def read_ndjson(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def test_every_sample_of_a_run_arrives_with_semconv_names_and_attributes(
        write_config: Callable[[str], Path]) -> None:
    """A child holding 64 MiB, sampled every 200 ms: each sample record is one process.memory.usage
    point (and one process.memory.virtual, pss, ...) with the record's ts as its time and the
    process's start as its start time; the resource carries the start record's identity; rss
    equals ps's within two pages; requests arrive gzipped with the configured header, which no log
    line shows."""
    child = spawn_allocator(64)
    try:
        with OtlpReceiver() as receiver:
            config = write_config(f"""
[agent]
interval = "200ms"
tags = {{ "deployment.environment.name" = "e2e" }}

[[targets]]
name = "alloc"
pid = {child.pid}
full = true

[[sinks]]
type = "stdout"

[[sinks]]
type = "otlp"
endpoint = "{receiver.url}"
headers = {{ Authorization = "{TOKEN}" }}
batch = 4
""")
            with run_agent(config, "--log-level", "debug") as agent:
                for _ in range(8):
                    agent.wait_for_record(lambda r: r["type"] == "sample")
                ps_rss, ps_vsz = ps_rss_vsz(child.pid)
                finished = agent.stop()
    finally:
        stop_child(child)
    assert finished.returncode == 0, finished.stderr
    records = finished.records
    [start] = [r for r in records if r["type"] == "start"]
    samples = [r for r in records if r["type"] == "sample"]
    points = receiver.points()
    usage = usage_points(receiver)
    assert point_keys(usage) == sample_keys(records) and len(usage) >= 8
    virtual = Counter((p.time, p.value) for p in points if p.metric == "process.memory.virtual")
    assert virtual == Counter((ns(s["ts"]), s["portable"]["vms"]) for s in samples)
    pss = Counter((p.time, p.value) for p in points if p.metric == "memagent.process.memory.pss")
    assert pss == Counter((ns(s["ts"]), s["full"]["pss"]) for s in samples)
    for point in usage:
        assert (point.unit, point.monotonic, point.start) == ("By", False, ns(start["started"]))
        assert point.resource == {
            "host.name": start["host"], "process.pid": child.pid, "process.parent_pid": os.getpid(),
            "process.executable.name": start["name"], "process.executable.path": start["exe"],
            "process.command": start["cmdline"][0], "process.command_line": " ".join(start["cmdline"]),
            "process.owner": start["user"], "process.cgroup": start["cgroup"],
            "process.creation.time": start["started"], "memagent.target": "alloc",
            "deployment.environment.name": "e2e"}
    last = max(usage, key=lambda p: p.time)
    assert last.value >= 64 * 1024 * 1024 and abs(last.value - ps_rss) <= 2 * PAGE
    assert abs(next(p.value for p in points if p.metric == "process.memory.virtual" and p.time == last.time)
               - ps_vsz) <= 2 * PAGE
    assert any(p.metric == "memagent.sink.written" and p.attributes["memagent.sink"] == "otlp"
               for p in points)
    for request in receiver.requests:
        assert request.headers["content-encoding"] == "gzip" and request.headers["authorization"] == TOKEN
    assert "s3cret" not in finished.stderr


def agent_stats(records: list[dict[str, Any]], sink: str = "otlp") -> dict[str, Any]:
    """The sink's counters in the last agent record (made at stop, before the drain)."""
    final = [r for r in records if r["type"] == "agent"][-1]
    stats: dict[str, Any] = final["agent"]["sinks"][sink]
    return stats


def test_a_collector_throttling_with_retry_after_loses_nothing(write_config: Callable[[str], Path],
                                                                tmp_path: Path) -> None:
    """Three 503s with Retry-After: 1, then 200s: every sample of the run (seq contiguous in the
    file sink beside it) arrives exactly once; nothing is dropped; attempts after a 503 are a
    second apart at least; the failures and throttling are counted."""
    log = tmp_path / "records.ndjson"
    with OtlpReceiver() as receiver:
        receiver.script(*[Reply(503, {"Retry-After": "1"}, status_body(14, "collector busy"))] * 3)
        config = write_config(f"""
[agent]
interval = "100ms"

[[targets]]
name = "self"
self = true

[[sinks]]
type = "stdout"

[[sinks]]
type = "file"
path = "{log}"

[[sinks]]
type = "otlp"
endpoint = "{receiver.url}"
batch = 50
""")
        with run_agent(config) as agent:
            receiver.wait(lambda r: sum(q.status == 200 for q in r.requests) >= 2)
            finished = agent.stop()
    assert finished.returncode == 0, finished.stderr
    records = read_ndjson(log)
    assert_contiguous(records)
    assert point_keys(usage_points(receiver)) == sample_keys(records)
    statuses = [r.status for r in receiver.requests]
    assert statuses[:3] == [503, 503, 503] and set(statuses[3:]) == {200}
    for refused, next_one in zip(receiver.requests[:3], receiver.requests[1:4], strict=True):
        assert next_one.at - refused.at >= 0.95
    stats = agent_stats(records)
    assert stats["dropped"] == 0 and stats["rejected"] == 0
    assert stats["failures"] == 3 and stats["throttled"] == 3
    assert finished.stderr.count("write failed") == 1  # once per episode
    assert "503" in finished.stderr and "Retry-After" in finished.stderr


def test_records_beyond_the_queue_are_dropped_and_counted(write_config: Callable[[str], Path],
                                                           tmp_path: Path) -> None:
    """queue = 10 while the collector throttles for two seconds: the oldest records are dropped,
    and written + dropped + queued accounts for every record; what arrived is a subset of the file
    sink's samples, short by no more than the drops."""
    log = tmp_path / "records.ndjson"
    with OtlpReceiver() as receiver:
        receiver.script(*[Reply(503, {"Retry-After": "1"})] * 2)
        config = write_config(f"""
[agent]
interval = "50ms"

[[targets]]
name = "self"
self = true

[[sinks]]
type = "stdout"

[[sinks]]
type = "file"
path = "{log}"

[[sinks]]
type = "otlp"
endpoint = "{receiver.url}"
queue = 10
batch = 5
""")
        with run_agent(config) as agent:
            receiver.wait(lambda r: sum(q.status == 200 for q in r.requests) >= 2)
            finished = agent.stop()
    assert finished.returncode == 0, finished.stderr
    records = read_ndjson(log)
    assert_contiguous(records)
    final = [r for r in records if r["type"] == "agent"][-1]
    stats = final["agent"]["sinks"]["otlp"]
    assert stats["dropped"] > 0
    assert stats["written"] + stats["dropped"] + stats["queued"] == final["seq"] - 1
    expected, arrived = sample_keys(records), point_keys(usage_points(receiver))
    assert not arrived - expected
    assert 0 < sum((expected - arrived).values()) <= stats["dropped"]
    assert finished.stderr.count("dropping records") >= 1


def test_a_batch_the_collector_refuses_is_counted_and_the_next_flows(
        write_config: Callable[[str], Path]) -> None:
    """A 400 for the first request: that batch is rejected (counted as rejected and dropped, one
    error line quoting the collector), and later batches arrive."""
    with OtlpReceiver() as receiver:
        receiver.script(Reply(400, body=status_body(3, "invalid metric")))
        config = write_config(f"""
[agent]
interval = "100ms"

[[targets]]
name = "self"
self = true

[[sinks]]
type = "stdout"

[[sinks]]
type = "otlp"
endpoint = "{receiver.url}"
batch = 5
""")
        with run_agent(config) as agent:
            receiver.wait(lambda r: sum(q.status == 200 for q in r.requests) >= 2)
            finished = agent.stop()
    assert finished.returncode == 0, finished.stderr
    stats = agent_stats(finished.records)
    assert 0 < stats["rejected"] <= 5 and stats["dropped"] == stats["rejected"] and stats["written"] > 0
    assert receiver.requests[0].status == 400 and usage_points(receiver)
    [line] = [line for line in finished.stderr.splitlines() if "can never be written" in line]
    assert "answered 400" in line and "invalid metric" in line

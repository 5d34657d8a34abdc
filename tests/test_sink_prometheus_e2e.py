"""The prometheus sink against the real thing: Debian's Prometheus server scraping a real
``memagent run`` every second (over TLS, with a token), Debian's promtool linting the output, and
Debian's prometheus-process-exporter watching the same processes as the compatibility mode.

One setup serves every test here (about 10 s): two children holding a known amount of memory, one
agent with two prometheus sinks (``native``: per-process series, TLS and a token; ``compat``:
process-exporter's names), process-exporter with a config matching the same children by command
line, and a Prometheus server scraping all three at 1 s.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import textwrap
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_text

from cli_helpers import (
    AgentProcess,
    ps_rss_vsz,
    run_agent,
    scaled,
    spawn_allocator,
    stop_child,
    system_tool,
    wait_for,
)
from ws_helpers import self_signed_cert

TOKEN = "e2e-metrics-token"
ALLOCATIONS_MIB = (48, 96)  # the two children: distinct sizes tell their series apart without a pid
#: How far rss read at two moments may differ for an idle child: one page fault maps up to 16
#: pages at once (fault-around), so allow 16 pages.
PAGE_FAULT_DRIFT = 16 * os.sysconf("SC_PAGE_SIZE")
MEMTYPES = {"resident", "virtual", "swapped", "proportionalResident", "proportionalSwapped"}


def free_port() -> int:
    """A loopback port free now, for servers that cannot report the one they bound."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def get(url: str, *, token: str | None = None, tls: ssl.SSLContext | None = None) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=scaled(10),
                                context=tls) as answer:
        body: bytes = answer.read()
        return body


class Server:
    """A child server (Prometheus, process-exporter) logging to a file, stopped at the end."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def alive(self) -> bool:
        """True, or AssertionError with its log if it has exited."""
        if self.process.poll() is not None:
            log = self.log.read_text(errors="replace")
            raise AssertionError(f"{self.log.stem} exited ({self.process.returncode}):\n{log}")
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Setup:
    children: list[subprocess.Popen[str]]
    agent: AgentProcess
    native: str  # https://127.0.0.1:<port>/metrics
    compat: str
    exporter: str
    prometheus: str  # http://127.0.0.1:<port>
    tls: ssl.SSLContext

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant PromQL query over Prometheus' HTTP API: the result vector."""
        url = f"{self.prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        answer = json.loads(get(url))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def values(self, promql: str) -> dict[frozenset[tuple[str, str]], float]:
        return {frozenset(r["metric"].items()): float(r["value"][1]) for r in self.query(promql)}


def agent_config(directory: Path, marker: str, cert: Path, key: Path) -> Path:
    config = directory / "memagent.toml"
    config.write_text(textwrap.dedent(f"""
        [agent]
        interval = "500ms"
        stats_interval = "1s"
        rescan = "1s"

        [[targets]]
        name = "alloc"
        cmdline = "{marker}"
        totals = true
        full = true

        [[sinks]]
        type = "prometheus"
        name = "native"
        port = 0
        per_process = true
        token = "{TOKEN}"
        tls_cert = "{cert}"
        tls_key = "{key}"

        [[sinks]]
        type = "prometheus"
        name = "compat"
        port = 0
        compat = "process-exporter"
    """))
    return config


def prometheus_config(directory: Path, native: int, compat: int, exporter: int, cert: Path) -> Path:
    config = directory / "prometheus.yml"
    config.write_text(textwrap.dedent(f"""
        global:
          scrape_interval: 1s
          scrape_timeout: 1s
        scrape_configs:
          - job_name: memagent
            scheme: https
            tls_config: {{ca_file: "{cert}"}}
            authorization: {{credentials: "{TOKEN}"}}
            static_configs: [{{targets: ["127.0.0.1:{native}"]}}]
          - job_name: memagent-compat
            static_configs: [{{targets: ["127.0.0.1:{compat}"]}}]
          - job_name: process-exporter
            static_configs: [{{targets: ["127.0.0.1:{exporter}"]}}]
    """))
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    prometheus = system_tool("prometheus", "prometheus")
    exporter = system_tool("prometheus-process-exporter", "prometheus-process-exporter")
    directory = tmp_path_factory.mktemp("prometheus-e2e")
    marker = f"memagent-prometheus-e2e-{os.getpid()}"
    cert, key = self_signed_cert(directory)
    tls = ssl.create_default_context(cafile=str(cert))
    children = [spawn_allocator(mib, marker) for mib in ALLOCATIONS_MIB]
    servers: list[Server] = []
    try:
        with run_agent(agent_config(directory, marker, cert, key)) as agent:
            native = int(agent.wait_for_stderr(r"native: prometheus metrics on https://[^:]+:(\d+)/").group(1))
            compat = int(agent.wait_for_stderr(r"compat: prometheus metrics on http://[^:]+:(\d+)/").group(1))
            (directory / "process-exporter.yml").write_text(
                f"process_names:\n  - name: alloc\n    cmdline: ['{marker}']\n")
            exporter_port, prometheus_port = free_port(), free_port()
            servers.append(Server([exporter, "-config.path", str(directory / "process-exporter.yml"),
                                   "-web.listen-address", f"127.0.0.1:{exporter_port}",
                                   "-children=false", "-threads=false"], directory / "process-exporter.log"))
            scrapes = prometheus_config(directory, native, compat, exporter_port, cert)
            servers.append(Server([prometheus, f"--config.file={scrapes}",
                                   f"--storage.tsdb.path={directory / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                                  directory / "prometheus.log"))
            found = Setup(children, agent, f"https://127.0.0.1:{native}/metrics",
                          f"http://127.0.0.1:{compat}/metrics", f"http://127.0.0.1:{exporter_port}/metrics",
                          f"http://127.0.0.1:{prometheus_port}", tls)

            def everything_scraped() -> bool:
                """Each job scraped, the children seen by the agent and by process-exporter."""
                assert all(server.alive() for server in servers)
                try:
                    return len(found.query('memagent_target_processes{target="alloc"} == 2 or '
                                           'namedprocess_namegroup_num_procs{groupname="alloc"} == 2')) == 3
                except OSError:  # Prometheus not listening yet
                    return False

            wait_for(everything_scraped, timeout=30)
            yield found
            assert agent.stop().returncode == 0
    finally:
        for server in servers:
            server.stop()
        for child in children:
            stop_child(child)


def test_prometheus_gets_the_rss_ps_shows(setup: Setup) -> None:
    """PromQL over the real server: each child's per-process rss is the rss ps shows for it,
    within one page fault's drift; the series carry target, name and slot, never a pid."""
    series = setup.values('memagent_process_resident_memory_bytes{target="alloc"}')
    shown = [ps_rss_vsz(child.pid)[0] for child in setup.children]
    assert len(series) == 2
    for labels, rss in series.items():
        assert {name for name, _ in labels} == {"__name__", "job", "instance", "target", "name", "slot"}
        closest = min(shown, key=lambda ps_rss: abs(ps_rss - rss))
        assert abs(closest - rss) <= PAGE_FAULT_DRIFT, (rss, shown)
    big = max(shown)
    assert big >= ALLOCATIONS_MIB[1] * 1024 * 1024  # the child really holds what it allocated


def test_prometheus_target_total_is_the_sum_of_its_processes(setup: Setup) -> None:
    """The per-target total equals the sum of the per-process series, in one PromQL evaluation."""
    total = 'memagent_target_resident_memory_bytes{target="alloc"}'
    summed = 'sum(memagent_process_resident_memory_bytes{target="alloc"})'
    wait_for(lambda: setup.query(f"{total} - on() {summed} == 0"), timeout=10)
    assert setup.values('memagent_target_processes{target="alloc"}') and setup.query(
        f'{total} > {ALLOCATIONS_MIB[0] + ALLOCATIONS_MIB[1]} * 1024 * 1024')


def test_prometheus_ingests_openmetrics_over_tls_with_the_token(setup: Setup) -> None:
    """Every job is up with no scrape error; Prometheus asked for OpenMetrics (its metadata has
    the units, which only OpenMetrics carries) and its own scrape used TLS and the token."""
    targets = json.loads(get(f"{setup.prometheus}/api/v1/targets"))["data"]["activeTargets"]
    assert {(t["labels"]["job"], t["health"], t["lastError"]) for t in targets} == {
        ("memagent", "up", ""), ("memagent-compat", "up", ""), ("process-exporter", "up", "")}
    name = "memagent_target_resident_memory_bytes"
    metadata = json.loads(get(f"{setup.prometheus}/api/v1/metadata?metric={name}"))
    assert {m["unit"] for m in metadata["data"][name]} == {"bytes"}
    assert setup.values('memagent_records_total{job="memagent"} > 0')


def test_promtool_finds_no_problem(setup: Setup) -> None:
    """`promtool check metrics` on the text format of both sinks reports nothing (exit 0). It
    cannot read OpenMetrics: that format is checked by Prometheus ingesting it (above)."""
    promtool = system_tool("promtool", "prometheus")
    for body in (get(setup.native, token=TOKEN, tls=setup.tls), get(setup.compat)):
        assert body.startswith(b"# HELP ")
        lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                              timeout=scaled(30), check=False)
        assert (lint.returncode, lint.stdout, lint.stderr) == (0, b"", b""), body.decode()[:2000]


def test_compat_mode_matches_process_exporter_side_by_side(setup: Setup) -> None:
    """Scraped by the same Prometheus, the compatibility mode and process-exporter give, for the
    same processes, the same metric names, label sets and memtypes, and values within 3 %."""
    def by_job(job: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        found = setup.query(f'{{__name__=~"namedprocess_namegroup_(memory_bytes|num_procs)", '
                            f'groupname="alloc", job="{job}"}}')
        return {(r["metric"]["__name__"], frozenset((k, v) for k, v in r["metric"].items()
                                                    if k not in ("__name__", "job", "instance"))):
                float(r["value"][1]) for r in found}

    ours, theirs = by_job("memagent-compat"), by_job("process-exporter")
    assert set(ours) == set(theirs)
    assert {dict(labels).get("memtype") for _, labels in ours} == MEMTYPES | {None}  # None: num_procs
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=0.03, abs=PAGE_FAULT_DRIFT), key


def test_series_of_an_exited_process_disappear(tmp_path: Path) -> None:
    """A real agent: when the only child of a target exits, its per-process series go and the
    target shows 0 processes and no size series (no stale values)."""
    marker = f"memagent-prometheus-exit-{os.getpid()}"
    config = tmp_path / "memagent.toml"
    config.write_text(textwrap.dedent(f"""
        [agent]
        interval = "250ms"
        rescan = "250ms"
        [[targets]]
        name = "alloc"
        cmdline = "{marker}"
        totals = true
        [[sinks]]
        type = "prometheus"
        port = 0
        per_process = true
    """))
    child = spawn_allocator(8, marker)
    try:
        with run_agent(config) as agent:
            port = int(agent.wait_for_stderr(r"prometheus metrics on http://[^:]+:(\d+)/").group(1))

            def scraped() -> dict[str, dict[frozenset[tuple[str, str]], float]]:
                text = get(f"http://127.0.0.1:{port}/metrics").decode()
                return {f.name: {frozenset(s.labels.items()): s.value for s in f.samples}
                        for f in parse_text(text)}

            wait_for(lambda: scraped()["memagent_process_resident_memory_bytes"], timeout=10)
            stop_child(child)
            wait_for(lambda: scraped()["memagent_target_processes"] == {frozenset({("target", "alloc")}): 0},
                     timeout=10)
            after = scraped()
            assert after["memagent_process_resident_memory_bytes"] == {}
            assert after["memagent_target_resident_memory_bytes"] == {}
            assert after["memagent_process_series"] == {frozenset(): 0}
            assert agent.stop().returncode == 0
    finally:
        stop_child(child)

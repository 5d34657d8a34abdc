"""Benchmark: the prometheus sink with ~1,000 watched processes, per-process series off and on.

    python tests/benchmarks/bench_prometheus.py [--processes 1000] [--seconds 20]

Spawns ``--processes`` idle ``sleep`` children, then for each mode (``per_process = false``, then
``true``) runs a real ``memagent run`` (interval 1 s, ``totals = true``, ``full = false``) with the
prometheus sink, waits until a scrape shows every child, and measures two windows of
``--seconds`` each: the agent's CPU without scrapes, then with one scrape per second as Prometheus
would send it (OpenMetrics, gzip) — so each scrape renders fresh values — timing every scrape
(request to last byte). Prints a table: series, body size (plain and gzipped), scrape latency
p50/p99/max, agent CPU % in each window. Figures only, no asserts.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

OPENMETRICS = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
               "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")  # what Prometheus 2.x sends
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (the rendering thread included)."""
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def scrape(port: int, prometheus_like: bool = True) -> tuple[float, bytes, bytes]:
    """(seconds, body as sent, body decoded)."""
    headers = {"Accept": OPENMETRICS, "Accept-Encoding": "gzip"} if prometheus_like else {}
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers),
                                timeout=30) as answer:
        sent = answer.read()
        took = time.perf_counter() - start
        gzipped = answer.headers.get("Content-Encoding") == "gzip"
    return took, sent, gzip.decompress(sent) if gzipped else sent


def run_mode(per_process: bool, marker: str, count: int, seconds: float, workdir: Path) -> dict[str, object]:
    config = workdir / f"memagent-{per_process}.toml"
    config.write_text(textwrap.dedent(f"""
        [agent]
        interval = "1s"
        stats_interval = "5s"
        [[targets]]
        name = "sleepers"
        cmdline = '^sleep {re.escape(marker)}$'
        totals = true
        [[sinks]]
        type = "prometheus"
        port = 0
        per_process = {str(per_process).lower()}
        max_series = 10000
    """))
    log = workdir / f"memagent-{per_process}.log"
    with open(log, "wb") as err:
        agent = subprocess.Popen([sys.executable, "-m", "memagent", "run", str(config)],
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        port = 0
        while not port:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"memagent did not start: {log.read_text()}")
            if match := re.search(r"prometheus metrics on http://[^:]+:(\d+)/", log.read_text()):
                port = int(match.group(1))
            time.sleep(0.05)
        wanted = f'memagent_target_processes{{target="sleepers"}} {count}'
        while wanted not in scrape(port, prometheus_like=False)[2].decode():
            if time.monotonic() > deadline:
                raise RuntimeError("the agent never saw every child")
            time.sleep(0.2)
        time.sleep(2)  # past the first ticks' start records

        before = cpu_seconds(agent.pid)
        time.sleep(seconds)
        idle_cpu = (cpu_seconds(agent.pid) - before) / seconds

        latencies, sizes = [], []
        before, start = cpu_seconds(agent.pid), time.monotonic()
        for i in range(int(seconds)):
            took, sent, body = scrape(port)
            latencies.append(took)
            sizes.append((len(sent), len(body)))
            time.sleep(max(0.0, start + i + 1 - time.monotonic()))
        scraped_cpu = (cpu_seconds(agent.pid) - before) / (time.monotonic() - start)
        text_took, _, text = scrape(port, prometheus_like=False)
        series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
    finally:
        agent.terminate()
        agent.wait(30)
    latencies.sort()
    return {
        "per_process": per_process, "series": series, "gzipped": statistics.median(s[0] for s in sizes),
        "plain": statistics.median(s[1] for s in sizes), "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], "max": latencies[-1],
        "text_ms": text_took * 1000, "cpu_idle": idle_cpu * 100, "cpu_scraped": scraped_cpu * 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    marker = f"3600.{os.getpid():07d}"  # unique argument: nothing else on the machine matches
    children = [subprocess.Popen(["sleep", marker], stdin=subprocess.DEVNULL) for _ in range(args.processes)]
    try:
        with tempfile.TemporaryDirectory() as workdir:
            rows = [run_mode(per_process, marker, args.processes, args.seconds, Path(workdir))
                    for per_process in (False, True)]
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()
    print(f"\n{args.processes} idle processes, interval 1 s, {os.cpu_count()} CPUs, "
          f"{args.seconds:g} s per window, one scrape/s (OpenMetrics + gzip, as Prometheus asks)\n")
    print("| per_process | series | body (gzip / plain) | scrape p50 / p99 / max | text, no gzip "
          "| agent CPU, no scrapes | agent CPU, 1 scrape/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {str(row['per_process']).lower()} | {row['series']} | {row['gzipped'] / 1024:.0f} KiB / "
              f"{row['plain'] / 1024:.0f} KiB | {row['p50'] * 1000:.1f} / {row['p99'] * 1000:.1f} / "
              f"{row['max'] * 1000:.1f} ms | {row['text_ms']:.1f} ms | {row['cpu_idle']:.1f} % "
              f"| {row['cpu_scraped']:.1f} % |")


if __name__ == "__main__":
    main()

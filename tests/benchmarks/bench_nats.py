"""Benchmark: how many records/s one agent publishes to NATS JetStream with acks, and the CPU it
costs, next to the file sink, in the same run.

    python tests/benchmarks/bench_nats.py [RECORDS] [DIRECTORY]

Starts Debian's nats-server (JetStream, file storage under DIRECTORY, default a fresh directory
under the current one, so the disk measured is the one you run on) on a free loopback port. Then
pushes RECORDS schema-v1 sample records (:func:`memagent.testing.make_records`, ~420 bytes each)
through the agent's own delivery path — :class:`memagent.fanout.Outlet` (its queue, batches of
512, retries) into the real sink — once per case: the file sink; the nats sink with JetStream acks
(at several ``max_inflight``); the nats sink in core NATS (no acks); and the nats and file sinks
side by side in one fanout, as an agent configured with both runs them. For each: records/s,
this process's CPU per record (all its threads) and as a share of one core, and nats-server's CPU
per record. Figures, not asserts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: nats_helpers

from memagent.contracts import Record, Sink
from memagent.fanout import Fanout, Outlet
from memagent.options import Options
from memagent.plugins.sinks.file import FileSink
from memagent.plugins.sinks.nats import NatsSink
from memagent.testing import make_records, sink_context

from nats_helpers import NatsServer  # noqa: E402 - after the sys.path line above

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BATCH = 512  # the framework's default batch


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def deliver(sinks: Sequence[tuple[str, Sink]], records: list[Record],
                  server_pid: int) -> dict[str, Any]:
    """Push ``records`` through one fanout to ``sinks``; wall time, CPU here and in the server."""
    outlets = [Outlet(name, sink, queue=len(records) + 1, when_full="drop_oldest", batch=BATCH, targets=None)
               for name, sink in sinks]
    fanout = Fanout(outlets)
    for outlet in outlets:
        await outlet.start()
    began, cpu, server_cpu = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    for start in range(0, len(records), 1000):  # as ticks hand them over, a chunk at a time
        await fanout.publish(records[start:start + 1000])
        await asyncio.sleep(0)
    await fanout.drain(600.0)
    wall = time.perf_counter() - began
    return {"wall": wall, "cpu": time.process_time() - cpu,
            "server_cpu": cpu_seconds(server_pid) - server_cpu, "dropped": sum(o.dropped for o in outlets)}


def nats_sink(url: str, stream: str | None, **options: Any) -> NatsSink:
    table: dict[str, Any] = {"servers": [url], **options}
    if stream is not None:
        table.update(stream=stream, create_stream=True, stream_subjects=[f"{stream.lower()}.>"],
                     subject=f"{stream.lower()}.{{host}}.{{target}}.{{type}}")
    return NatsSink.from_options(Options(table, "sinks[1]"), sink_context("nats"))


async def main(argv: list[str]) -> None:
    count = int(argv[1]) if len(argv) > 1 else 50_000
    base = Path(argv[2]) if len(argv) > 2 else Path.cwd()
    directory = Path(tempfile.mkdtemp(prefix="bench-nats-", dir=base))
    records = make_records(count)
    size = sum(len(r.json) for r in records) / count
    server = NatsServer(directory).start()
    assert server.process is not None
    print(f"{count:,} records of {size:.0f} bytes, batches of {BATCH}; nats-server (JetStream, file storage) "
          f"and the file sink in {directory}; {os.cpu_count()} CPUs")
    cases: list[tuple[str, Any]] = [
        ("file sink", lambda i: [("file", FileSink.from_options(
            Options({"path": str(directory / f"file-{i}.ndjson")}, "sinks[1]"), sink_context("file")))]),
        ("nats, JetStream acks, max_inflight 256", lambda i: [("nats", nats_sink(server.url, f"B{i}"))]),
        ("nats, JetStream acks, max_inflight 64", lambda i: [("nats", nats_sink(server.url, f"B{i}",
                                                                                 max_inflight=64))]),
        ("nats, JetStream acks, max_inflight 1024", lambda i: [("nats", nats_sink(server.url, f"B{i}",
                                                                                   max_inflight=1024))]),
        ("nats, core NATS (no acks)", lambda i: [("nats", nats_sink(server.url, None))]),
        ("nats (JetStream) + file, one fanout", lambda i: [
            ("nats", nats_sink(server.url, f"B{i}")),
            ("file", FileSink.from_options(Options({"path": str(directory / f"file-{i}.ndjson")}, "sinks[1]"),
                                           sink_context("file")))]),
    ]
    try:
        print(f"  {'case':42} {'records/s':>10} {'agent CPU/record':>17} {'agent CPU':>10} "
              f"{'server CPU/record':>18}")
        for index, (label, make) in enumerate(cases):
            got = await deliver(make(index), records, server.process.pid)
            print(f"  {label:42} {count / got['wall']:>10,.0f} {got['cpu'] / count * 1e6:>14.1f} µs "
                  f"{got['cpu'] / got['wall'] * 100:>8.0f} % {got['server_cpu'] / count * 1e6:>15.1f} µs"
                  + (f"  (dropped {got['dropped']})" if got["dropped"] else ""))
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv))

"""Benchmark: the WebSocket feed under many clients, with one stalled client.

    python tests/benchmarks/bench_websocket.py [--clients 100] [--rate 2000] [--seconds 60] [--json PATH]

A server process runs the real ``websocket`` sink (``batch = true``) fed by a producer at
``--rate`` records/s (schema-v1 records made by RecordMaker, in batches every 10 ms, as the
agent's outlet would hand them over). This process connects ``--clients`` real WebSocket
clients plus one stalled client (completes the handshake, never reads), checks that every client
receives every seq exactly once, and prints p50/p99/max delivery latency (record ``ts`` → arrival)
and the server's RSS over time; ``--json`` also writes those figures to PATH (tests/benchmarks/
suite.py runs it that way). Exit status 1 if any healthy client missed or repeated a record.

The RSS probe reads ``/proc/<server pid>/statm`` in a worker thread: a few microseconds, and
never on the clients' event loop. (It used to list every process on the machine on that loop,
which with ~1,000 processes took tens of milliseconds and showed up as the clients' own p99.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ws_helpers import stalled_client  # noqa: E402 - helpers live beside the tests


async def serve(rate: int, seconds: float, batch: bool) -> None:
    """The server side: a real sink and a producer at ``rate`` records/s."""
    from memagent.contracts import ProcessInfo, Reading
    from memagent.options import Options
    from memagent.plugins.sinks.websocket import WebSocketSink
    from memagent.records import RecordMaker, iso_utc
    from memagent.testing import sink_context

    sink = WebSocketSink.from_options(Options({"port": 0, "batch": batch, "max_clients": 1000,
                                               "client_queue": 5000, "disconnect_after": 20000},
                                              "sinks[1]"), sink_context("websocket"))
    await sink.start()
    print(sink.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # clients are ready
    maker = RecordMaker(host="bench", os_name="linux", backend="bench", tags={})
    info = ProcessInfo(pid=4242, ppid=1, name="bench", started=time.time())
    per_batch = max(1, rate // 100)
    start = time.monotonic()
    tick = 0
    while (elapsed := time.monotonic() - start) < seconds:
        tick += 1
        ts = iso_utc(time.time())
        reading = Reading(4242, info.started, {"rss": 1 << 20, "vms": 1 << 24}, {"shared": 0})
        batch = [maker.seal(maker.sample("bench", info, reading, ts)) for _ in range(per_batch)]
        await sink.write(batch)
        await asyncio.sleep(max(0.0, start + tick * 0.01 - time.monotonic()))
    await asyncio.sleep(2)  # let the healthy clients drain
    counters = dict(sink.context.counters)
    await sink.close()
    print(orjson.dumps({"last_seq": maker.last_seq, "elapsed": elapsed, **counters}).decode(), flush=True)


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_of(pid: int) -> int:
    """The process's resident set size from ``/proc/<pid>/statm``, bytes (0 once it is gone).
    Blocking but tiny: called in a worker thread, never on the clients' loop."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


async def client(port: int, seqs: list[int], latencies: list[float], ready: asyncio.Event,
                 counter: list[int], total: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/", max_size=2**24) as ws:
        counter[0] += 1
        if counter[0] == total:
            ready.set()
        async for message in ws:
            arrived = time.time()
            records = orjson.loads(message)
            if isinstance(records, dict):
                records = [records]
            for record in records:
                if record.get("type") == "sample":
                    seqs.append(record["seq"])
            sent = datetime.fromisoformat(records[0]["ts"].replace("Z", "+00:00")).timestamp()
            latencies.append(arrived - sent)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--no-stalled", action="store_true", help="leave out the stalled client")
    parser.add_argument("--unbatched", action="store_true", help="one message per record (batch = false)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await serve(args.rate, args.seconds, batch=not args.unbatched)
        return 0
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--rate", str(args.rate),
                               "--seconds", str(args.seconds), *(["--unbatched"] if args.unbatched else [])],
                              stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None
    port = int(server.stdout.readline())
    seqs: list[list[int]] = [[] for _ in range(args.clients)]
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    ready, counter = asyncio.Event(), [0]
    tasks = [asyncio.create_task(client(port, seqs[i], latencies[i], ready, counter, args.clients))
             for i in range(args.clients)]
    await ready.wait()
    stalled = None if args.no_stalled else await asyncio.to_thread(stalled_client, port)
    server.stdin.write("go\n")
    server.stdin.flush()
    rss: list[tuple[float, int]] = []
    started = time.monotonic()
    summary_line = asyncio.create_task(asyncio.to_thread(server.stdout.readline))
    while not summary_line.done():
        rss.append((time.monotonic() - started, await asyncio.to_thread(rss_of, server.pid)))
        await asyncio.wait([summary_line], timeout=max(1.0, args.seconds / 6))
    summary = orjson.loads(summary_line.result())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if stalled is not None:
        stalled.close()
    server.wait(timeout=30)

    expected = list(range(1, summary["last_seq"] + 1))
    complete = sum(1 for s in seqs if s == expected)
    every = sorted(x for lat in latencies for x in lat)
    p50 = statistics.median(every) * 1e3
    p99 = every[int(len(every) * 0.99)] * 1e3
    rate = summary["last_seq"] / summary["elapsed"]
    extra = "" if args.no_stalled else " + 1 stalled"
    print(f"{args.clients} clients{extra}, {summary['elapsed']:.0f} s at {rate:.0f} records/s "
          f"(batch = {str(not args.unbatched).lower()}): "
          f"{complete}/{args.clients} clients received every record exactly once")
    print(f"delivery latency (record ts -> client): p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"max {every[-1] * 1e3:.1f} ms over {len(every)} messages")
    print(f"stalled client: disconnected_slow={summary['disconnected_slow']}, "
          f"records dropped for it={summary['client_drops']}")
    print("server RSS: " + ", ".join(f"{t:.0f}s {r / 2**20:.1f} MiB" for t, r in rss))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps({
            "clients": args.clients, "stalled_client": not args.no_stalled, "batch": not args.unbatched,
            "seconds": summary["elapsed"], "records_per_s": rate, "complete_clients": complete,
            "p50_ms": p50, "p99_ms": p99, "max_ms": every[-1] * 1e3, "messages": len(every),
            "disconnected_slow": summary["disconnected_slow"], "client_drops": summary["client_drops"],
            "server_rss": [[round(t, 1), r] for t, r in rss]}))
    return 0 if complete == args.clients else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

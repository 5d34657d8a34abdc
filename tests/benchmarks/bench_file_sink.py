"""Benchmark: the file sink's throughput and the cost of each ``fsync`` mode, on a real disk.

    python tests/benchmarks/bench_file_sink.py [DIRECTORY] [RECORDS] [BATCH]

Writes RECORDS schema-v1 records (made by :func:`memagent.testing.make_records`) in batches of
BATCH through the real sink's contract (start / write / close) into DIRECTORY (default: a fresh
directory under the current one, so the disk you run it on is the disk measured; /tmp is often
tmpfs, where fsync costs nothing). Once per fsync mode, then once with ``rotate_size`` +
``compress`` to show rotation's cost. Prints records/s, µs per batch and fsyncs done. Figures,
not asserts.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from memagent.options import Options
from memagent.plugins.sinks.file import FileSink
from memagent.testing import make_records, sink_context


async def run(directory: Path, count: int, batch: int, **options: object) -> tuple[float, dict[str, int]]:
    """Seconds to write ``count`` records in batches of ``batch`` (close included); counters."""
    live = directory / "bench.ndjson"
    sink = FileSink.from_options(Options({"path": str(live), **options}, "sinks[1]"), sink_context("file"))
    records = make_records(count)
    await sink.start()
    began = time.perf_counter()
    for start in range(0, count, batch):
        await sink.write(records[start:start + batch])
    await sink.close()
    took = time.perf_counter() - began
    for path in directory.iterdir():
        path.unlink()
    return took, sink.context.counters


async def main(argv: list[str]) -> None:
    base = Path(argv[1]) if len(argv) > 1 else Path.cwd()
    count = int(argv[2]) if len(argv) > 2 else 50_000
    batch = int(argv[3]) if len(argv) > 3 else 100
    directory = Path(tempfile.mkdtemp(prefix="bench-file-sink-", dir=base))
    print(f"{count} records in batches of {batch} into {directory}")
    cases: list[tuple[str, dict[str, object]]] = [
        ('fsync = "never"', {"fsync": "never"}),
        ('fsync = "interval" (1 s)', {"fsync": "interval"}),
        ('fsync = "batch"', {"fsync": "batch"}),
        ('rotate_size = "1MB", compress', {"fsync": "interval", "rotate_size": "1MB", "compress": True,
                                           "keep": 1000}),
    ]
    try:
        for label, options in cases:
            took, counters = await run(directory, count, batch, **options)
            batches = -(-count // batch)
            print(f"  {label:34} {count / took:>9,.0f} records/s  {took / batches * 1e6:>7.0f} µs/batch  "
                  f"{counters['fsyncs']} fsyncs  {counters['rotations']} rotations  "
                  f"{counters['bytes_written'] / took / 1e6:.1f} MB/s")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    asyncio.run(main(sys.argv))

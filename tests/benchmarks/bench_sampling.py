"""Benchmark: sampling cost of the linux backend vs psutil, measured in the same run.

    python tests/benchmarks/bench_sampling.py [N_PROCESSES] [ROUNDS]

Spawns N sleeping children, then times (best of ROUNDS): the linux backend's sample() over
all of them (held statm fds, os.pread), psutil's Process.memory_info() over the same processes
(Process objects created once, as an agent would), full info (smaps_rollup vs
memory_full_info), listing (cold and warm cache vs psutil.process_iter), and record building +
orjson encoding. Prints µs per process and the ratios. Figures, not asserts.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import psutil

from memagent.contracts import Reading
from memagent.plugins.backends.linux import LinuxBackend
from memagent.records import RecordMaker, iso_utc


def best(rounds: int, work: Callable[[], object]) -> float:
    """Best wall time of ``rounds`` runs of ``work`` (seconds)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    children = [subprocess.Popen(["sleep", "600.5151"]) for _ in range(count)]
    try:
        backend = LinuxBackend()
        pids = {c.pid for c in children}
        infos = [p for p in backend.list_processes() if p.pid in pids]
        identities = [p.identity for p in infos]
        procs = [psutil.Process(pid) for pid in sorted(pids)]
        backend.sample(identities, False)  # open the fds once, as after the first tick

        ours = best(rounds, lambda: backend.sample(identities, False))
        theirs = best(rounds, lambda: [p.memory_info() for p in procs])
        ours_full = best(max(3, rounds // 4), lambda: backend.sample(identities, True))
        theirs_full = best(max(3, rounds // 4), lambda: [p.memory_full_info() for p in procs])
        cold = best(3, lambda: LinuxBackend().list_processes())
        warm = best(rounds, backend.list_processes)
        iter_all = best(3, lambda: list(psutil.process_iter(["ppid", "create_time", "name", "cmdline",
                                                             "exe", "username"])))
        maker = RecordMaker(host="bench", os_name="linux", backend="linux", tags={"env": "bench"})
        readings = [r for r in backend.sample(identities, False) if isinstance(r, Reading)]
        by_pid = {i.pid: i for i in infos}
        ts = iso_utc(time.time())
        encode = best(rounds, lambda: [maker.sample("bench", by_pid[r.pid], r, ts) for r in readings])
        total = len(psutil.pids())
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()

    per = 1e6 / count
    print(f"processes sampled: {count} (best of {rounds}); processes on the machine: {total}")
    print(f"memory_info   linux backend {ours * per:7.2f} µs/process   psutil {theirs * per:7.2f} µs/process"
          f"   psutil/ours = {theirs / ours:5.1f}x")
    print(f"full info     linux backend {ours_full * per:7.2f} µs/process   psutil {theirs_full * per:7.2f} "
          f"µs/process   psutil/ours = {theirs_full / ours_full:5.1f}x")
    print(f"listing all   cold {cold * 1e3:6.1f} ms   warm (cached details) {warm * 1e3:6.1f} ms   "
          f"psutil.process_iter {iter_all * 1e3:6.1f} ms")
    print(f"record build + orjson encode  {encode * per:6.2f} µs/record")


if __name__ == "__main__":
    main()

"""Benchmark: the linux backend's reading and listing costs next to psutil and the pread floor.

    python tests/benchmarks/bench_sampling.py [N_PROCESSES] [ROUNDS]

Spawns N sleeping children, then times (median of ROUNDS, the contenders interleaved round by
round so that a busy machine slows them alike), per process:

- memory_info: the backend's ``sample()`` in chunks of SAMPLE_CHUNK, as the scheduler calls it,
  fds held (as after the first tick); at rest (statm unchanged since the last tick: the Reading is
  reused) and with every statm changed (parsed and built anew); psutil's ``memory_info()`` with
  its Process objects kept, as an agent would; the floor, ``os.pread`` of a held statm fd.
- full: ``sample(full=True)``; psutil's ``memory_full_info()``; the floor, ``os.pread`` of held
  statm and smaps_rollup fds.
- listing: ``list_processes()`` per known pid (nothing changed), per pid cold (a new backend),
  per new pid (a listing after N/10 new children, less a listing with none new); the floor,
  ``os.scandir`` with inode numbers; one ``stat`` read (open, read, close) per new pid;
  ``psutil.process_iter`` (objects kept) per known pid and ``as_dict`` per new pid.
- record build + orjson encoding per record.

Figures, not asserts.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

from memagent.contracts import SAMPLE_CHUNK, Reading
from memagent.plugins.backends.linux import LinuxBackend
from memagent.records import RecordMaker, iso_utc

MARKER = f"600.{os.getpid()}"  # sleep's argument: these children, and no one else's
ATTRS = ["ppid", "name", "create_time", "cmdline", "exe", "username"]  # what a listing needs


def interleaved(rounds: int, work: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median wall time (seconds) of each of ``work``, all run once per round, in turn."""
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(rounds):
        for name, job in work.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def spawn(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sleep", MARKER]) for _ in range(count)]


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        child.kill()
    for child in children:
        child.wait()


def stat_once(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.read(fd, 4096)
    finally:
        os.close(fd)


def new_pid_costs(backend: LinuxBackend, batch: int, rounds: int) -> dict[str, float]:
    """µs per new pid: the backend's listing, one stat read, psutil's as_dict; fresh children for
    each (the first to look a pid up pays for its dentry)."""
    costs: dict[str, list[float]] = {"memagent": [], "stat": [], "psutil": []}
    for _ in range(rounds):
        children = spawn(batch)
        start = time.perf_counter()
        backend.list_processes()
        first = time.perf_counter() - start
        start = time.perf_counter()
        backend.list_processes()
        again = time.perf_counter() - start
        costs["memagent"].append(max(0.0, first - again) / batch * 1e6)
        stop(children)
        backend.list_processes()
        for name, work in (("stat", stat_once), ("psutil", lambda pid: psutil.Process(pid).as_dict(ATTRS))):
            children = spawn(batch)
            start = time.perf_counter()
            for child in children:
                work(child.pid)
            costs[name].append((time.perf_counter() - start) / batch * 1e6)
            stop(children)
    return {name: statistics.median(values) for name, values in costs.items()}


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    children = spawn(count)
    fds: list[int] = []
    try:
        backend = LinuxBackend()
        pids = {c.pid for c in children}
        infos = [p for p in backend.list_processes() if p.pid in pids]
        identities = [p.identity for p in infos]
        chunks = [identities[i:i + SAMPLE_CHUNK] for i in range(0, len(identities), SAMPLE_CHUNK)]
        procs = [psutil.Process(p.pid) for p in infos]
        statm = [os.open(f"/proc/{p.pid}/statm", os.O_RDONLY | os.O_CLOEXEC) for p in infos]
        fds.extend(statm)
        rollup = [os.open(f"/proc/{p.pid}/smaps_rollup", os.O_RDONLY | os.O_CLOEXEC) for p in infos]
        fds.extend(rollup)
        pread = os.pread

        def sample(full: bool) -> None:
            for chunk in chunks:
                backend.sample(chunk, full)

        def sample_changed() -> None:
            for held in backend._statm.values():  # noqa: SLF001 - forget the last bytes: all changed
                held.raw = None
            sample(False)

        sample(False)  # open the fds once, as the first tick does
        sample(True)
        for proc in procs:
            proc.memory_info()
        list(psutil.process_iter())  # psutil keeps its Process objects from now on
        listed = len(backend.list_processes())

        def scandir_floor() -> dict[str, int]:
            with os.scandir("/proc") as entries:
                return {e.name: e.inode() for e in entries}

        reading = interleaved(rounds, {
            "floor": lambda: [pread(fd, 128, 0) for fd in statm],
            "at rest": lambda: sample(False),
            "changed": sample_changed,
            "psutil": lambda: [p.memory_info() for p in procs],
        })
        full = interleaved(max(3, rounds // 3), {
            "floor": lambda: [(pread(s, 128, 0), pread(r, 65536, 0))
                              for s, r in zip(statm, rollup, strict=True)],
            "memagent": lambda: sample(True),
            "psutil": lambda: [p.memory_full_info() for p in procs],
        })
        known = interleaved(rounds, {
            "floor": scandir_floor,
            "memagent": backend.list_processes,
            "psutil": lambda: list(psutil.process_iter()),
        })
        cold = interleaved(3, {"memagent": lambda: LinuxBackend().list_processes()})["memagent"]
        new = new_pid_costs(backend, max(10, count // 10), 3)
        maker = RecordMaker(host="bench", os_name="linux", backend="linux", tags={"env": "bench"})
        readings = [r for r in backend.sample(identities, False) if isinstance(r, Reading)]
        by_pid = {i.pid: i for i in infos}
        ts = iso_utc(time.time())
        encode = interleaved(rounds, {"encode": lambda: [maker.sample("bench", by_pid[r.pid], r, ts)
                                                         for r in readings]})["encode"]
        total = len(psutil.pids())
        backend.close()
    finally:
        for fd in fds:
            os.close(fd)
        stop(children)

    per = 1e6 / count
    per_listed = 1e6 / listed
    print(f"{count} sleeping children, {total} processes on the machine; medians of {rounds} rounds; µs")
    rest, changed, floor = reading["at rest"] * per, reading["changed"] * per, reading["floor"] * per
    print(f"memory_info  floor {floor:6.2f}   memagent at rest {rest:6.2f} ({rest / floor:4.2f}x floor), "
          f"statm changed {changed:6.2f} ({changed / floor:4.2f}x)   psutil {reading['psutil'] * per:6.2f}")
    ours, floor = full["memagent"] * per, full["floor"] * per
    print(f"full         floor {floor:6.2f}   memagent {ours:6.2f} ({ours / floor:4.2f}x floor)   "
          f"psutil {full['psutil'] * per:6.2f}")
    ours, floor = known["memagent"] * per_listed, known["floor"] * per_listed
    print(f"known pid    scandir floor {floor:5.2f}   memagent {ours:5.2f} ({ours / floor:4.2f}x)   "
          f"psutil.process_iter {known['psutil'] * per_listed:5.2f}")
    print(f"new pid      one stat read {new['stat']:6.2f}   memagent {new['memagent']:6.2f} "
          f"({new['memagent'] / new['stat']:4.1f}x)   psutil as_dict {new['psutil']:6.2f}   "
          f"cold listing {cold * per_listed:6.2f} per pid")
    print(f"record build + orjson encode  {encode * per:6.2f} per record")

if __name__ == "__main__":
    main()

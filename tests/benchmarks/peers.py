"""The peers memagent is measured against, each run as its own process so its CPU is its own.

    python tests/benchmarks/peers.py KIND [--interval S] [--offset S] [--seconds S] [--out FILE]

KIND is one of:

``best-case``
    The psutil script at its best: a ``psutil.Process`` object kept per process across ticks
    (name, ppid and start time read once), ``memory_info()`` per process each tick, one JSON
    line per process with the same fields as memagent's ``sample`` record (orjson, as memagent
    uses), written to ``--out`` in one write per tick. New processes are found every
    ``--rescan`` seconds with ``psutil.pids()`` and a set difference, so it discovers new
    processes as memagent must.
``process-iter``
    The usual script: ``psutil.process_iter(['pid', 'name', 'memory_info'])`` each tick, one
    JSON line per process to ``--out``.
``pread-floor``
    The floor: one fd held per ``/proc/<pid>/statm`` (opened once), ``os.pread`` each tick,
    nothing else (no parsing, no records, no rescans).
``python-floor``
    The least a Python agent doing memagent's job must do, written as tight as Python allows:
    one ``statm`` fd held per process, ``os.pread`` each tick, and when the bytes are those of the
    last tick the process's record bytes kept from then with the new ``seq`` and ``ts`` put in
    (otherwise parsed and encoded with orjson); one write per tick; a ``scandir`` of /proc and a
    set difference every ``--rescan`` seconds, one ``stat`` read per new pid. No event loop, no
    sinks, no processors, no checks: what is left of memagent's cost above it is the price of
    its structure, what is below it is Python's.
``c-floor``
    python-floor's job in C (``c_floor.c``, compiled with the system's ``cc`` into the
    ``--out`` file's directory and run in this process's place, so its CPU is measured under
    the pid started): the price of a compiled agent, to weigh what compiling memagent's hot path
    would buy. Exits with status 3 and one line when there is no C compiler.
``sleep-loop``, ``asyncio-loop``
    A timer on the same wall-clock grid as memagent's ticker (slots at multiples of
    ``--interval``), sleeping with ``time.sleep`` or ``asyncio.sleep``; writes the lateness of
    every wake-up (seconds) to ``--out`` as JSON when done.

``--interval 0`` runs a tick after the other as fast as possible (throughput). Ticks sit on
multiples of ``--interval`` shifted by ``--offset``, so peers running side by side at 1 Hz do not
all wake at once. Each runs until ``--seconds`` have passed or it gets SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import psutil


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ticks(interval: float, offset: float, seconds: float, stopped: Callable[[], bool]) -> Iterator[float]:
    """Yields the wall-clock time of each tick: on the grid, a missed slot skipped (as
    memagent's ticker does); back to back when ``interval`` is 0."""
    end = time.monotonic() + seconds
    slot = math.floor((time.time() - offset) / interval) + 1 if interval else 0
    while not stopped() and time.monotonic() < end:
        if interval:
            delay = slot * interval + offset - time.time()
            if delay > 0:
                time.sleep(delay)
            slot = max(slot + 1, math.floor((time.time() - offset) / interval) + 1)
        yield time.time()


class BestCase:
    """memagent's job done with psutil at its best (see the module docstring)."""

    def __init__(self, out: str, rescan: float) -> None:
        self.out = open(out, "ab", buffering=0)  # noqa: SIM115 - held for the script's life
        self.rescan_every = rescan
        self.procs: dict[int, tuple[psutil.Process, dict[str, object]]] = {}
        self.host = socket.gethostname()
        self.seq = 0
        self.next_rescan = 0.0

    def rescan(self) -> None:
        alive = set(psutil.pids())
        for pid in self.procs.keys() - alive:
            del self.procs[pid]
        for pid in alive - self.procs.keys():
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    fixed = {"target": "all", "pid": pid, "ppid": proc.ppid(), "name": proc.name(),
                             "started": iso(proc.create_time()), "os": "linux", "backend": "psutil"}
            except psutil.Error:
                continue
            self.procs[pid] = (proc, fixed)
        self.next_rescan = time.monotonic() + self.rescan_every

    def tick(self, now: float) -> None:
        if time.monotonic() >= self.next_rescan:
            self.rescan()
        ts = iso(now)
        lines = []
        for pid, (proc, fixed) in list(self.procs.items()):
            try:
                mem = proc.memory_info()
            except psutil.Error:
                del self.procs[pid]
                continue
            self.seq += 1
            numbers = mem._asdict()
            portable = {"rss": numbers.pop("rss"), "vms": numbers.pop("vms")}
            lines.append(orjson.dumps({"schema": 1, "type": "sample", "seq": self.seq, "run": "psutil",
                                       "ts": ts, "host": self.host, **fixed, "portable": portable,
                                       "platform": numbers}))
        lines.append(b"")
        self.out.write(b"\n".join(lines))


class ProcessIter:
    """The usual psutil script: ``process_iter`` with the attributes it needs, every tick."""

    def __init__(self, out: str) -> None:
        self.out = open(out, "ab", buffering=0)  # noqa: SIM115 - held for the script's life
        self.seq = 0

    def tick(self, now: float) -> None:
        ts = iso(now)
        lines = []
        for proc in psutil.process_iter(["pid", "name", "memory_info"]):
            mem = proc.info["memory_info"]
            if mem is None:  # access denied
                continue
            self.seq += 1
            lines.append(orjson.dumps({"type": "sample", "seq": self.seq, "ts": ts, "pid": proc.info["pid"],
                                       "name": proc.info["name"], "rss": mem.rss, "vms": mem.vms}))
        lines.append(b"")
        self.out.write(b"\n".join(lines))


class PreadFloor:
    """One held statm fd per process, ``os.pread`` each tick, nothing else."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):  # gone already
                    self.fds.append(os.open(f"/proc/{name}/statm", os.O_RDONLY | os.O_CLOEXEC))

    def tick(self, now: float) -> None:
        for fd in self.fds:
            try:  # noqa: SIM105 - a floor: try/except costs nothing when nothing is raised, suppress() does
                os.pread(fd, 128, 0)
            except OSError:
                pass  # exited: a floor does not even tidy up


class PythonFloor:
    """memagent's job in the tightest Python (see the module docstring)."""

    def __init__(self, out: str, rescan: float) -> None:
        self.out = open(out, "ab", buffering=0)  # noqa: SIM115 - held for the script's life
        self.rescan_every = rescan
        self.next_rescan = 0.0
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.host = socket.gethostname()
        self.seq = 0
        # pid -> [statm fd, last bytes, the record after its ts, the fixed part of the record]
        self.held: dict[int, list[Any]] = {}

    def rescan(self) -> None:
        alive = {int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()}
        for pid in self.held.keys() - alive:
            os.close(self.held.pop(pid)[0])
        for pid in alive - self.held.keys():
            try:
                with open(f"/proc/{pid}/stat", "rb") as stat:
                    line = stat.read(4096)
                fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            name = line[line.index(b"(") + 1:line.rindex(b")")].decode(errors="replace")
            fixed = {"host": self.host, "target": "all", "pid": pid, "name": name, "os": "linux"}
            self.held[pid] = [fd, b"", b"", fixed]
        self.next_rescan = time.monotonic() + self.rescan_every

    def tick(self, now: float) -> None:
        if time.monotonic() >= self.next_rescan:
            self.rescan()
        ts = iso(now).encode()
        pread, page, seq = os.pread, self.page, self.seq
        lines = []
        for pid, held in list(self.held.items()):
            try:
                raw = pread(held[0], 128, 0)
            except OSError:
                os.close(self.held.pop(pid)[0])
                continue
            if raw != held[1]:
                size, resident = raw.split()[:2]
                record = {"ts": "", "schema": 1, "type": "sample", **held[3],
                          "portable": {"rss": int(resident) * page, "vms": int(size) * page}}
                held[1], held[2] = raw, orjson.dumps(record)[len(b'{"ts":"",'):]
            seq += 1
            lines.append(b'{"seq":%d,"ts":"%b",%b' % (seq, ts, held[2]))
        self.seq = seq
        lines.append(b"")
        self.out.write(b"\n".join(lines))


def exec_c_floor(args: argparse.Namespace) -> int:
    """Compile c_floor.c next to ``--out`` and run it in this process's place (returns only if
    there is no compiler or it fails: status 3)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("c-floor: no C compiler (cc) on this machine: not measured", file=sys.stderr)
        return 3
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c_floor.c")
    binary = os.path.join(os.path.dirname(os.path.abspath(args.out)) if args.out != os.devnull
                          else os.getcwd(), "c_floor")
    built = subprocess.run([compiler, "-O2", "-o", binary, source, "-lm"], capture_output=True, text=True,
                           check=False)
    if built.returncode != 0:
        print(f"c-floor: {compiler} failed: {built.stderr.strip()[:300]}", file=sys.stderr)
        return 3
    os.execv(binary, [binary, f"{args.interval:g}", f"{args.offset:g}", f"{args.seconds:g}",
                      f"{args.rescan:g}", args.out])


def lateness(interval: float, seconds: float, use_asyncio: bool) -> list[float]:
    """Seconds each wake-up came after its slot on the ``interval`` grid."""
    late: list[float] = []
    end = time.time() + seconds

    async def run_async() -> None:
        slot = math.floor(time.time() / interval) + 1
        while time.time() < end:
            await asyncio.sleep(max(0.0, slot * interval - time.time()))
            late.append(time.time() - slot * interval)
            slot = math.floor(time.time() / interval) + 1

    if use_asyncio:
        asyncio.run(run_async())
        return late
    slot = math.floor(time.time() / interval) + 1
    while time.time() < end:
        time.sleep(max(0.0, slot * interval - time.time()))
        late.append(time.time() - slot * interval)
        slot = math.floor(time.time() / interval) + 1
    return late


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["best-case", "process-iter", "pread-floor", "python-floor",
                                         "c-floor", "sleep-loop", "asyncio-loop"])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between ticks; 0: flat out")
    parser.add_argument("--offset", type=float, default=0.0, help="shift of the tick grid, seconds")
    parser.add_argument("--seconds", type=float, default=3600.0, help="stop after this long")
    parser.add_argument("--rescan", type=float, default=2.0,
                        help="best-case, python-floor, c-floor: seconds between rescans")
    parser.add_argument("--out", default=os.devnull, help="the file records are written to")
    args = parser.parse_args(argv)
    if args.kind in ("sleep-loop", "asyncio-loop"):
        late = lateness(args.interval, args.seconds, args.kind == "asyncio-loop")
        with open(args.out, "wb") as out:
            out.write(orjson.dumps({"lateness": late}))
        return 0
    if args.kind == "c-floor":
        return exec_c_floor(args)
    stop: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.append(signum))
    worker: BestCase | ProcessIter | PreadFloor | PythonFloor
    if args.kind == "best-case":
        worker = BestCase(args.out, args.rescan)
    elif args.kind == "python-floor":
        worker = PythonFloor(args.out, args.rescan)
    elif args.kind == "process-iter":
        worker = ProcessIter(args.out)
    else:
        worker = PreadFloor()
    for now in ticks(args.interval, args.offset, args.seconds, lambda: bool(stop)):
        worker.tick(now)
    return 0


if __name__ == "__main__":
    sys.exit(main())

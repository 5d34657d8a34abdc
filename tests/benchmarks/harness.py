"""What the benchmark suite measures with: idle processes to watch, the CPU time and RSS of a
running process read from /proc, a growing NDJSON file read as it grows, and child processes
that are always stopped.

CPU time comes from ``/proc/<pid>/task/*/schedstat`` (nanoseconds, every thread of the process,
kept per thread so a thread that exits does not make the total go back), or, on a kernel without
schedstats, from ``utime + stime`` in ``/proc/<pid>/stat`` (clock ticks: 10 ms, too coarse for
short windows at rest).
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def raise_fd_limit() -> None:
    """The soft fd limit up to the hard one: the suite holds several fds per watched process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def process_count() -> int:
    """Processes on the machine now (entries of /proc that are pids)."""
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


class CpuMeter:
    """CPU seconds used by one process (all its threads) since the meter was made."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads: dict[str, int] = {}
        self.total_ns = 0
        self.read()
        self.total_ns = 0

    def read(self) -> float:
        """CPU seconds so far; the last figure once the process is gone."""
        if not SCHEDSTAT:
            try:
                fields = Path(f"/proc/{self.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
                self.total_ns = (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLOCK_TICKS
            except (OSError, IndexError):
                pass
            return self.total_ns / 1e9
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return self.total_ns / 1e9
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/schedstat", "rb") as file:
                    ns = int(file.read().split()[0])
            except (OSError, IndexError, ValueError):
                continue
            self.total_ns += ns - self.threads.get(tid, 0)
            self.threads[tid] = ns
        return self.total_ns / 1e9


def rss_of(pid: int) -> int:
    """The process's resident set size, bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            return int(file.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


class Tail:
    """An NDJSON file that another process appends to, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0
        self.rest = b""

    def _chunks(self) -> Iterator[bytes]:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                while chunk := file.read(1 << 20):
                    self.offset += len(chunk)
                    yield chunk
        except FileNotFoundError:
            return

    def count(self) -> int:
        """Complete lines in the file so far."""
        for chunk in self._chunks():
            self.lines += chunk.count(b"\n")
        return self.lines

    def records(self) -> Iterator[dict[str, Any]]:
        """The records appended since the last call (complete lines only), parsed."""
        for chunk in self._chunks():
            *complete, self.rest = (self.rest + chunk).split(b"\n")
            self.lines += len(complete)
            for line in complete:
                if line:
                    yield orjson.loads(line)


def wait_until(what: str, condition: Any, timeout: float, child: Child | None = None) -> None:
    """Polls ``condition()`` every 20 ms; raises with ``what`` (and the child's stderr) on timeout
    or when ``child`` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if child is not None and child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited ({child.process.returncode}) before {what}: "
                               f"{child.stderr_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


class Child:
    """A process the suite started: stderr kept in a file, stopped with ``signum`` then killed."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, *, stdout: Any = subprocess.DEVNULL,
                 stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.stop_signal = stop_signal
        self.stderr_path = workdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(list(argv), stdout=stdout, stderr=stderr,
                                            stdin=subprocess.DEVNULL)
        self.pid = self.process.pid

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """Stop signal, then SIGKILL after ``timeout``; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Children:
    """Every process the suite started; :meth:`stop_all` is called in a ``finally``."""

    def __init__(self) -> None:
        self.running: list[Child] = []

    def start(self, name: str, argv: Sequence[str], workdir: Path, **kwargs: Any) -> Child:
        child = Child(name, argv, workdir, **kwargs)
        self.running.append(child)
        return child

    def stop(self, child: Child, timeout: float = 30.0) -> int:
        status = child.stop(timeout)
        self.running.remove(child)
        return status

    def stop_all(self) -> None:
        while self.running:
            self.stop(self.running[-1], timeout=5.0)


class Sleepers:
    """``count`` idle ``sleep`` children whose argument is unique to this run (the marker), so
    nothing else on the machine is mistaken for them. Each sleeps at most ``lifetime`` seconds:
    even if the suite is SIGKILLed they do not outlive it by much."""

    def __init__(self, lifetime: float) -> None:
        self.marker = f"{int(lifetime)}.{os.getpid():07d}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, count: int) -> list[int]:
        new = [subprocess.Popen(["sleep", self.marker], stdin=subprocess.DEVNULL) for _ in range(count)]
        self.processes.extend(new)
        return [p.pid for p in new]

    def kill(self, pids: Sequence[int] | None = None) -> None:
        """Kill and reap ``pids`` (default: every one of them)."""
        chosen = set(pids) if pids is not None else None
        victims = [p for p in self.processes if chosen is None or p.pid in chosen]
        for process in victims:
            if process.poll() is None:
                process.kill()
        for process in victims:
            process.wait()
        self.processes = [p for p in self.processes if p not in victims]

    def owns(self, cmdline: Sequence[str]) -> bool:
        return len(cmdline) == 2 and cmdline[1] == self.marker and os.path.basename(cmdline[0]) == "sleep"


@contextmanager
def stopped_on_sigterm() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so every ``finally`` runs."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def machine_facts(repo: Path) -> dict[str, Any]:
    """What the figures depend on: cores, processes, versions, date, code revision."""
    import psutil

    try:
        import memagent
        memagent_path = str(Path(memagent.__file__).resolve().parent)
    except ImportError:
        memagent_path = "not installed"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "psutil": psutil.__version__,
        "memagent": memagent_path,
        "commit": git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else ""),
        "cpu_clock": "schedstat (ns)" if SCHEDSTAT else f"utime+stime ({CLOCK_TICKS} Hz ticks)",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }

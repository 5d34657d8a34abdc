"""Helpers for end-to-end tests that run the real ``memagent`` command.

Waiting: every wait in the tests has a deadline, and every deadline goes through :func:`scaled`,
so a slow or loaded machine can be given more time without editing a test:
``MEMAGENT_TEST_TIMEOUT_FACTOR=3 pytest`` (as websockets' own suite does with
``WEBSOCKETS_TESTS_TIMEOUT_FACTOR``). A condition with no event to await is polled by
:func:`wait_for` (or :func:`until` inside a coroutine); a running agent's output is read by
:class:`AgentProcess` only.
"""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

MEMAGENT = [sys.executable, "-m", "memagent"]

#: The repository checkout (examples/ lives here).
REPO = Path(__file__).resolve().parent.parent


def _timeout_factor() -> float:
    text = os.environ.get("MEMAGENT_TEST_TIMEOUT_FACTOR", "1")
    try:
        factor = float(text)
    except ValueError:
        factor = 0.0
    if not factor > 0:
        raise pytest.UsageError(f"MEMAGENT_TEST_TIMEOUT_FACTOR must be a positive number, not {text!r}")
    return factor


#: Multiplies every deadline in the tests (``MEMAGENT_TEST_TIMEOUT_FACTOR``, default 1).
TIMEOUT_FACTOR = _timeout_factor()


def scaled(seconds: float) -> float:
    """A test's deadline, in seconds, stretched by :data:`TIMEOUT_FACTOR`."""
    return seconds * TIMEOUT_FACTOR


def system_tool(command: str, package: str) -> str:
    """The path of a Debian tool a test drives for real, or a skip naming the package to install.
    ``bash .ci/run`` installs every package in .ci/apt-packages first, so CI never skips here."""
    found = shutil.which(command) or next(
        (path for path in (f"/usr/sbin/{command}", f"/usr/bin/{command}") if os.access(path, os.X_OK)), None)
    if found is None:
        pytest.skip(f"{command} is not installed (apt-get install {package}; bash .ci/run does)")
    return found


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until true; AssertionError once ``scaled(timeout)`` seconds have passed.

    For conditions no event announces (a file growing, a process state in /proc). Never use it
    for a running agent's output: :meth:`AgentProcess.wait_for_record` wakes on each line."""
    deadline = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(timeout):g}s waiting for {_describe(predicate)}")
        time.sleep(interval)


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """:func:`wait_for` inside a coroutine: checks ``predicate()`` once per event-loop iteration
    (other tasks run in between) until true; AssertionError after ``scaled(timeout)`` seconds."""
    deadline = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(timeout):g}s waiting for {_describe(predicate)}")
        await asyncio.sleep(0)


def _describe(predicate: Callable[..., object]) -> str:
    code = getattr(predicate, "__code__", None)
    where = f" ({Path(code.co_filename).name}:{code.co_firstlineno})" if code is not None else ""
    return f"{getattr(predicate, '__qualname__', predicate)!s}{where}"


#: A child that allocates N MiB (touching every page), prints "ready", and waits for stdin.
ALLOCATOR = textwrap.dedent("""
    import sys
    block = bytearray(int(sys.argv[1]) * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    print("ready", flush=True)
    sys.stdin.read()
""")


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``memagent ARGS`` to completion, capturing text output."""
    return subprocess.run([*MEMAGENT, *args], capture_output=True, text=True, timeout=scaled(timeout),
                          env=env, cwd=cwd, check=False)


def parse_records(stdout: str) -> list[dict[str, Any]]:
    """NDJSON → list of dicts (every line must be a JSON object)."""
    return [orjson.loads(line) for line in stdout.splitlines() if line.strip()]


def spawn_allocator(mib: int, marker: str = "memagent-test-allocator",
                    timeout: float = 30.0) -> subprocess.Popen[str]:
    """A real child holding ``mib`` MiB of touched memory; waits (with a deadline) until it is ready."""
    return spawn_ready(ALLOCATOR, str(mib), marker, timeout=timeout)


def spawn_ready(code: str, *args: str, timeout: float = 30.0) -> subprocess.Popen[str]:
    """``python -c CODE ARGS...`` as a child whose code prints "ready" once set up (then its
    /proc/<pid>/cmdline is final) and waits for stdin to close; waits for "ready" with a
    deadline. End it with :func:`stop_child`."""
    child = subprocess.Popen([sys.executable, "-c", code, *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    # "ready\n" comes in one flushed write: once the pipe is readable, readline() cannot block
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        readable = selector.select(scaled(timeout))
    if not readable:
        child.kill()
        child.wait()
        raise AssertionError(f"the child was not ready after {scaled(timeout):g}s")
    assert child.stdout.readline().strip() == "ready"
    return child


def stop_child(child: subprocess.Popen[str]) -> None:
    """End a child from :func:`spawn_allocator` and reap it."""
    if child.poll() is None:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=scaled(10))


def ps_rss_vsz(pid: int) -> tuple[int, int]:
    """(rss, vsz) in bytes as ``ps`` reports them (ps prints KiB)."""
    out = subprocess.run(["ps", "-o", "rss=,vsz=", "-p", str(pid)], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]) * 1024, int(out[1]) * 1024


@dataclass(frozen=True)
class Finished:
    """What a process from :class:`AgentProcess` left: its exit status, every record it printed
    on stdout from the first line to the last, and all of its stderr."""

    returncode: int
    records: list[dict[str, Any]]
    stderr: str


class AgentProcess:
    """A running process that prints NDJSON records on stdout: ``memagent run`` (see
    :func:`run_agent`), or an external client such as websocat reading the feed.

    One thread owns both pipes and reads each through its file descriptor only (``os.read``, no
    second buffered reader that could hold lines the other never sees), so stdout records and
    stderr lines are kept whole and in order, and neither pipe can fill up and stall the child.
    Tests wait on what was read, never on the pipes:

    - :meth:`wait_for_record` returns the next record (after the one it returned last) that
      matches, waking on each line, with a deadline;
    - :meth:`wait_for_stderr` returns the first stderr line matching a pattern;
    - :meth:`stop` signals, waits for the exit, and returns every record and all stderr
      (:class:`Finished`); :meth:`wait` does the same for a process that ends by itself;
    - :meth:`close_stdout` makes the reader of stdout leave, as ``head`` does.

    Use it as a context manager: a test that fails half-way leaves no process behind (killed).
    """

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self._changed = threading.Condition()
        self._lines: list[bytes] = []  # complete stdout lines, without their newline
        self._stderr: list[str] = []  # complete stderr lines, with their newline
        self._cursor = 0  # wait_for_record looks from here on
        self._reading = {"stdout", "stderr"}  # pipes not yet at EOF (or left)
        self._wake_read, self._wake_write = os.pipe()
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env)
        self._reader = threading.Thread(target=self._read_pipes, name=f"reader-{self.process.pid}",
                                        daemon=True)
        self._reader.start()

    # -- the reader thread ----------------------------------------------------------------------

    def _read_pipes(self) -> None:
        try:
            self._pump()
        finally:  # even if reading failed: waiters see the end at once, not at their deadline
            with self._changed:
                self._reading.clear()
                self._changed.notify_all()

    def _pump(self) -> None:
        assert self.process.stdout is not None and self.process.stderr is not None
        pipes = {"stdout": self.process.stdout, "stderr": self.process.stderr}
        partial = {"stdout": b"", "stderr": b""}
        with selectors.DefaultSelector() as selector:
            for name, pipe in pipes.items():
                selector.register(pipe.fileno(), selectors.EVENT_READ, name)
            selector.register(self._wake_read, selectors.EVENT_READ, "wake")
            while len(selector.get_map()) > 1:
                for key, _ in selector.select():
                    name = key.data
                    if name == "wake":  # close_stdout(): leave stdout as `head` would
                        os.read(self._wake_read, 1)
                        if "stdout" in self._reading:
                            self._finish(selector, pipes, "stdout")
                        continue
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        *complete, partial[name] = (partial[name] + chunk).split(b"\n")
                    else:  # EOF: a last line without its newline still counts
                        complete = [partial[name]] if partial[name] else []
                    with self._changed:
                        if name == "stdout":
                            self._lines.extend(complete)
                        else:
                            self._stderr.extend(line.decode(errors="replace") + "\n" for line in complete)
                        self._changed.notify_all()
                    if not chunk:
                        self._finish(selector, pipes, name)

    def _finish(self, selector: selectors.BaseSelector, pipes: dict[str, Any], name: str) -> None:
        selector.unregister(pipes[name].fileno())
        pipes[name].close()
        with self._changed:
            self._reading.discard(name)
            self._changed.notify_all()

    # -- what the test calls ---------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record read so far."""
        with self._changed:
            lines = list(self._lines)
        return [self._parse(i, line) for i, line in enumerate(lines)]

    @property
    def stderr(self) -> str:
        """All stderr read so far."""
        with self._changed:
            return "".join(self._stderr)

    def wait_for_record(self, predicate: Callable[[dict[str, Any]], object],
                        timeout: float = 20.0) -> dict[str, Any]:
        """The first record after the one this method returned last (or from the start) for which
        ``predicate(record)`` is true; records passed over stay in :attr:`records`. AssertionError
        if stdout ends first or after ``scaled(timeout)`` seconds."""
        deadline = time.monotonic() + scaled(timeout)
        with self._changed:
            while True:
                while self._cursor < len(self._lines):
                    record = self._parse(self._cursor, self._lines[self._cursor])
                    self._cursor += 1
                    if predicate(record):
                        return record
                if "stdout" not in self._reading:
                    raise AssertionError(f"stdout ended (exit {self.process.poll()}) before a record "
                                         f"matching {_describe(predicate)}; stderr:\n{''.join(self._stderr)}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no record matching {_describe(predicate)} within "
                                         f"{scaled(timeout):g}s; stderr:\n{''.join(self._stderr)}")
                self._changed.wait(remaining)

    def wait_for_stderr(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The match of ``pattern`` (a regular expression) in the first stderr line that has one.
        AssertionError if stderr ends first or after ``scaled(timeout)`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + scaled(timeout)
        checked = 0
        with self._changed:
            while True:
                for line in self._stderr[checked:]:
                    if match := regex.search(line):
                        return match
                checked = len(self._stderr)
                if "stderr" not in self._reading:
                    raise AssertionError(f"stderr ended (exit {self.process.poll()}) without "
                                         f"{pattern!r}:\n{''.join(self._stderr)}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no stderr line matching {pattern!r} within "
                                         f"{scaled(timeout):g}s:\n{''.join(self._stderr)}")
                self._changed.wait(remaining)

    def close_stdout(self, timeout: float = 10.0) -> None:
        """Close the read end of stdout (the reader leaves, as ``head`` does); what was read stays."""
        os.write(self._wake_write, b"x")
        deadline = time.monotonic() + scaled(timeout)
        with self._changed:
            while "stdout" in self._reading:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("the reader thread did not close stdout")
                self._changed.wait(remaining)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> Finished:
        """Send ``signum`` (unless the process has already exited), then :meth:`wait`."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.wait(timeout)

    def wait(self, timeout: float = 20.0) -> Finished:
        """Wait for the process to exit and its pipes to reach EOF; every record and all stderr.
        After ``scaled(timeout)`` seconds the process is killed and AssertionError raised."""
        deadline = time.monotonic() + scaled(timeout)
        try:
            self.process.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self._reader.join(scaled(5))
            raise AssertionError(f"{self.argv[:4]}... did not exit within {scaled(timeout):g}s (killed); "
                                 f"stderr:\n{self.stderr}") from None
        self._reader.join(max(0.0, deadline - time.monotonic()))
        if self._reader.is_alive():
            raise AssertionError("the process exited but its stdout/stderr stayed open (a child holds them?)")
        return Finished(self.process.returncode, self.records, self.stderr)

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(scaled(5))
        if not self._reader.is_alive():
            os.close(self._wake_read)
            os.close(self._wake_write)

    @staticmethod
    def _parse(index: int, line: bytes) -> dict[str, Any]:
        try:
            record: dict[str, Any] = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise AssertionError(f"stdout line {index + 1} is not a JSON record: {line[:200]!r}") from exc
        return record


def run_agent(config: Path, *extra: str, env: dict[str, str] | None = None) -> AgentProcess:
    """``memagent run CONFIG EXTRA...`` in the background, read by an :class:`AgentProcess`."""
    return AgentProcess([*MEMAGENT, "run", str(config), *extra], env=env)


def assert_contiguous(records: Sequence[dict[str, Any]]) -> None:
    """One run, seq 1..n with no gap or repeat."""
    assert len({r["run"] for r in records}) == 1
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))


def env_with(**values: str) -> dict[str, str]:
    """The current environment plus ``values``."""
    env = dict(os.environ)
    env.update(values)
    return env


#: Code for :func:`spawn_ready` that does nothing else.
READY_THEN_WAIT = "import sys; print('ready', flush=True); sys.stdin.read()"

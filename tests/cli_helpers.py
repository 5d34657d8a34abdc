"""Helpers for end-to-end tests that run the real ``memagent`` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

MEMAGENT = [sys.executable, "-m", "memagent"]

#: The repository checkout (examples/ lives here).
REPO = Path(__file__).resolve().parent.parent

def system_tool(command: str, package: str) -> str:
    """The path of a Debian tool a test drives for real, or a skip naming the package to install.
    ``bash .ci/run`` installs every package in .ci/apt-packages first, so CI never skips here."""
    found = shutil.which(command) or next(
        (path for path in (f"/usr/sbin/{command}", f"/usr/bin/{command}") if os.access(path, os.X_OK)), None)
    if found is None:
        pytest.skip(f"{command} is not installed (apt-get install {package}; bash .ci/run does)")
    return found


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
    return subprocess.run([*MEMAGENT, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd, check=False)


def parse_records(stdout: str) -> list[dict[str, Any]]:
    """NDJSON → list of dicts (every line must be a JSON object)."""
    return [orjson.loads(line) for line in stdout.splitlines() if line.strip()]


def spawn_allocator(mib: int, marker: str = "memagent-test-allocator") -> subprocess.Popen[str]:
    """A real child holding ``mib`` MiB of touched memory; waits until it is ready."""
    child = subprocess.Popen([sys.executable, "-c", ALLOCATOR, str(mib), marker],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


def stop_child(child: subprocess.Popen[str]) -> None:
    """End a child from :func:`spawn_allocator` and reap it."""
    if child.poll() is None:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)


def ps_rss_vsz(pid: int) -> tuple[int, int]:
    """(rss, vsz) in bytes as ``ps`` reports them (ps prints KiB)."""
    out = subprocess.run(["ps", "-o", "rss=,vsz=", "-p", str(pid)], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]) * 1024, int(out[1]) * 1024


def start_agent(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``memagent run CONFIG`` in the background (stdout/stderr piped)."""
    return subprocess.Popen([*MEMAGENT, "run", str(config), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


def assert_contiguous(records: Sequence[dict[str, Any]]) -> None:
    """One run, seq 1..n with no gap or repeat."""
    assert len({r["run"] for r in records}) == 1
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))


def env_with(**values: str) -> dict[str, str]:
    """The current environment plus ``values``."""
    env = dict(os.environ)
    env.update(values)
    return env

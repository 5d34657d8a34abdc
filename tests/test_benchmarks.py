"""The benchmark suite (tests/benchmarks/suite.py, ``tox -e bench``) keeps working: run in its
smoke mode on 50 processes it measures every figure, and it leaves no process behind, also when
interrupted. The figures themselves are not checked: they are the suite's output, not a test."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest

from cli_helpers import scaled, wait_for

SUITE = Path(__file__).resolve().parent / "benchmarks" / "suite.py"

#: Every row the table has, one per figure of issue 8's targets.
FIGURES = [
    "at_rest_cpu", "discovery",
    "throughput_1_sink", "cpu_per_record_1_sink", "throughput_3_sinks", "cpu_per_record_3_sinks",
    "read_memory_info", "read_full",
    "rescan_known_pid", "rescan_new_pid", "rescan_new_pid_described",
    "lateness_p50", "lateness_p99", "ticks_skipped",
    "agent_rss", "websocket_p99",
]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the suite reads /proc")


def leftovers(marker: str) -> list[psutil.Process]:
    """Processes the suite spawned (its idle ``sleep`` children) that are still alive."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if (proc.info["cmdline"] or [])[1:] == [marker]:
            found.append(proc)
    return found


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_smoke_run_measures_every_figure(tmp_path: Path) -> None:
    """The quickest run on 50 processes writes JSON holding every figure, each a number (> 0
    unless it counts something that may be none), with its peers, and no part failed."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SUITE), "--smoke", "--processes", "50", "--json", str(out)],
                          capture_output=True, text=True, timeout=scaled(120), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = orjson.loads(out.read_bytes())
    assert results["errors"] == {}
    rows = {row["key"]: row for row in results["figures"]}
    assert sorted(rows) == sorted(FIGURES)
    for key, row in rows.items():
        values = {"memagent": row["value"], **row["peers"]}
        for name, value in values.items():
            if name == "C floor" and shutil.which("cc") is None:
                assert value is None, "no C compiler here: the C floor cannot have been measured"
                continue
            assert is_number(value), f"{key}: {name} is {value!r}"
            assert value >= 0 if row["zero_ok"] else value > 0, f"{key}: {name} is {value!r}"
        if row["ratio"] is not None:
            assert row["ratio"] > 0, key
    assert "| 1 | 1 Hz, all" in done.stdout  # the table, printed
    assert leftovers(results["marker"]) == []


def test_interrupted_run_stops_everything(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) in the middle of a run: the suite exits 130 and neither its idle
    processes nor the agents and peers it started are left running."""
    # a 30 s at-rest part: the interrupt lands in it however slow the machine (the smoke plan's
    # one second could end, and the rest of the suite with it, before the signal arrived)
    suite = subprocess.Popen([sys.executable, str(SUITE), "--smoke", "--processes", "50", "--seconds", "30",
                              "--json", str(tmp_path / "bench.json")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             # Ctrl-C as in a terminal: a suite started in the background by a
                             # non-interactive shell inherits SIGINT ignored, and would ignore it
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert suite.stderr is not None
    marker = None
    deadline = time.monotonic() + scaled(60)
    for line in suite.stderr:  # the progress lines; the marker is named when the processes are spawned
        if match := re.search(r"\(sleep (\S+)\)", line):
            marker = match.group(1)
        if marker and "at_rest" in line:
            break
        assert time.monotonic() < deadline, "the suite never reached the at-rest run"
    assert marker is not None

    def agent_running() -> bool:  # the at-rest run's memagent has started: interrupt it mid-run
        for child in psutil.Process(suite.pid).children():
            with contextlib.suppress(psutil.Error):
                if child.cmdline()[1:3] == ["-m", "memagent"]:
                    return True
        return False

    wait_for(agent_running, timeout=60, interval=0.05)
    children = psutil.Process(suite.pid).children(recursive=True)
    assert len(children) > 50
    suite.send_signal(signal.SIGINT)
    suite.communicate(timeout=scaled(60))
    assert suite.returncode == 130
    gone, alive = psutil.wait_procs(children, timeout=scaled(5))
    assert alive == []
    assert leftovers(marker) == []

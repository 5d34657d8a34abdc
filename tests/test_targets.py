"""Target selectors; pidfiles are hostile input (planted by an unprivileged user)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest

from memagent.config import TargetConfig
from memagent.contracts import ProcessInfo
from memagent.targets import PIDFILE_MAX_BYTES, PidfileProblem, Selector, read_pidfile

from attacker import as_nobody, nobody_python
from cli_helpers import MEMAGENT, parse_records, wait_for


def pidfile_selector(path: Path) -> Selector:
    return Selector(TargetConfig(name="daemon", interval=1.0, pidfile=str(path)))


LISTING = [ProcessInfo(pid=4242, ppid=1, name="daemon", started=1.0),
           ProcessInfo(pid=4243, ppid=1, name="other", started=1.0)]


def test_pidfile_selects_the_pid_it_holds(tmp_path: Path) -> None:
    """A pidfile holding "4242\\n" selects pid 4242 and nothing else."""
    path = tmp_path / "daemon.pid"
    path.write_text("4242\n")
    selector = pidfile_selector(path)
    selector.refresh()
    assert [p.pid for p in selector.resolve(LISTING).values()] == [4242]
    assert selector.pidfile_problems == 0


def test_fifo_pidfile_is_refused_without_blocking(attacker_dir: Path) -> None:
    """A FIFO planted as the pidfile is refused at once (opening it for reading must not wait
    for a writer), counted, and selects nothing."""
    path = attacker_dir / "daemon.pid"
    as_nobody("mkfifo", str(path))
    selector = pidfile_selector(path)
    selector.refresh()  # on the old code this open() blocked until someone wrote to the FIFO
    assert selector.resolve(LISTING) == {}
    assert selector.pidfile_problems == 1
    with pytest.raises(PidfileProblem, match="not a regular file"):
        read_pidfile(str(path))


def test_symlink_pidfile_is_not_followed(attacker_dir: Path) -> None:
    """A pidfile that is a link (to /dev/zero, or to a file holding a pid) is never followed."""
    zero = attacker_dir / "zero.pid"
    as_nobody("ln", "-s", "/dev/zero", str(zero))
    with pytest.raises(PidfileProblem, match="symbolic link"):
        read_pidfile(str(zero))
    real = attacker_dir / "real.pid"
    nobody_python(f"open({str(real)!r}, 'w').write('4242\\n')")
    link = attacker_dir / "link.pid"
    as_nobody("ln", "-s", str(real), str(link))
    with pytest.raises(PidfileProblem, match="symbolic link"):
        read_pidfile(str(link))


def test_huge_pidfile_is_refused_unread(attacker_dir: Path) -> None:
    """A pidfile larger than a pid (a sparse 1 GiB file) is refused by its size, not read."""
    path = attacker_dir / "big.pid"
    nobody_python(f"f = open({str(path)!r}, 'wb'); f.write(b'4242\\n'); f.truncate(1 << 30)")
    with pytest.raises(PidfileProblem, match=f"more than a pid \\({PIDFILE_MAX_BYTES} at most\\)"):
        read_pidfile(str(path))


@pytest.mark.parametrize("content", ["", "abc\n", "0\n", "-5\n", "42 43\n", "99999999999\n", "\x00\x00"])
def test_pidfile_without_one_pid_selects_nothing(tmp_path: Path, content: str) -> None:
    """Empty, non-numeric, zero, negative, two pids or out of range: nothing selected."""
    path = tmp_path / "daemon.pid"
    path.write_text(content)
    with pytest.raises(PidfileProblem, match="does not hold a pid"):
        read_pidfile(str(path))


def test_bad_pidfile_is_reported_once_per_episode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Three bad reads in a row: one warning, three counted; fixed: one line saying so."""
    path = tmp_path / "daemon.pid"
    path.write_text("nope\n")
    selector = pidfile_selector(path)
    with caplog.at_level(logging.INFO, logger="memagent.targets"):
        for _ in range(3):
            selector.refresh()
        path.write_text("4242\n")
        selector.refresh()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot use pidfile" in m]) == 1
    assert len([m for m in messages if "usable again" in m]) == 1
    assert selector.pidfile_problems == 3


def test_agent_keeps_sampling_and_stops_with_a_fifo_pidfile(attacker_dir: Path, tmp_path: Path) -> None:
    """End to end: a FIFO pidfile planted by another user neither stops sampling nor makes
    SIGTERM hang; the problem is one warning line and a counter in the agent record."""
    pidfile = attacker_dir / "daemon.pid"
    as_nobody("mkfifo", str(pidfile))
    out = tmp_path / "out.ndjson"
    config = tmp_path / "config.toml"
    config.write_text(f"""
[agent]
interval = "100ms"
rescan = "100ms"
[[targets]]
name = "daemon"
pidfile = "{pidfile}"
[[targets]]
name = "me"
self = true
[[sinks]]
type = "file"
path = "{out}"
fsync = "never"
""")
    with open(tmp_path / "stderr", "w+") as stderr:
        agent = subprocess.Popen([*MEMAGENT, "run", str(config)], stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            def samples() -> int:
                text = out.read_text() if out.exists() else ""
                return sum(1 for r in parse_records(text.rpartition("\n")[0]) if r["type"] == "sample")

            wait_for(lambda: samples() >= 5)
        finally:
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=20)
        stderr.seek(0)
        log = stderr.read()
    assert code == 0, log
    assert log.count("cannot use pidfile") == 1, log
    records = parse_records(out.read_text())
    final = [r for r in records if r["type"] == "agent"][-1]
    assert final["agent"]["pidfile_problems"] == final["agent"]["rescans"] >= 2  # every read refused
    assert not [r for r in records if r.get("target") == "daemon"]
    assert os.path.exists(pidfile)  # only looked at, never touched

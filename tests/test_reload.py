"""Reloading the config on SIGHUP: applied without loss, or refused with the old one kept."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from memagent.config import parse_config
from memagent.errors import ConfigError
from memagent.reload import plan_reload

from cli_helpers import READY_THEN_WAIT, parse_records, run_agent, spawn_ready, stop_child, wait_for
from ws_helpers import feed_port

MARKER = f"memagent-reload-extra-{os.getpid()}"

BASE = """
[agent]
interval = "2ms"
stats_interval = "1h"
[[targets]]
name = "me"
self = true
{extra}
[[sinks]]
name = "keep"
type = "file"
path = "{path}"
fsync = "never"
[[sinks]]
name = "feed"
type = "websocket"
port = 0
{feed_extra}
"""
EXTRA = f'[[targets]]\nname = "extra"\ncmdline = "{MARKER}"\n'


def config_text(path: Path, *, extra: bool, valid: bool = True) -> str:
    text = BASE.format(extra=EXTRA if extra else "", path=path, feed_extra="")
    return text if valid else text.replace("[[sinks]]\nname = \"keep\"", "[[sinks]]\nnmae = \"keep\"")


def write_atomically(path: Path, text: str) -> None:
    """Replace the config as an editor or a deploy tool does: never half-written."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.rename(path)


class FeedClient(threading.Thread):
    """A WebSocket client that keeps every message of the feed."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"ws://127.0.0.1:{port}/"
        self.connected = threading.Event()
        self.messages: list[dict[str, Any]] = []

    def run(self) -> None:
        try:
            with connect(self.url, open_timeout=10) as feed:
                self.connected.set()
                for message in feed:
                    self.messages.append(json.loads(message))
        except Exception:  # noqa: BLE001 - the agent closing the feed ends the thread
            return


def test_twenty_reloads_alternating_valid_and_invalid_lose_nothing(tmp_path: Path) -> None:
    """During a run, 20 SIGHUPs alternate a valid config (adding, then removing, a target) and
    an invalid one: each valid one applies (its target starts at the reload, or ends with exit
    reason unwatched), each invalid one is refused in one line and changes nothing; the file sink
    and a connected WebSocket client, both unchanged sinks, see every seq without a gap."""
    child = spawn_ready(READY_THEN_WAIT, MARKER)
    out = tmp_path / "out.ndjson"
    config = tmp_path / "memagent.toml"
    write_atomically(config, config_text(out, extra=False))
    agent = run_agent(config)
    try:
        client = FeedClient(feed_port(agent))
        client.start()
        assert client.connected.wait(10)
        expected_extra = False
        for number in range(1, 21):
            valid = number % 2 == 1
            if valid:
                expected_extra = not expected_extra
            write_atomically(config, config_text(out, extra=expected_extra, valid=valid))
            agent.send_signal(signal.SIGHUP)
            word = "reloaded" if valid else "reload refused"
            wait_for(lambda word=word, n=number: agent.stderr.count("reloaded ") + agent.stderr.count(
                "reload refused") == n and word in agent.stderr)
        wait_for(lambda: sum(1 for m in client.messages if m.get("type") == "sample") > 50)
    finally:
        finished = agent.stop(signal.SIGTERM, timeout=30)
        stop_child(child)
    assert finished.returncode == 0, finished.stderr
    assert finished.stderr.count("reload refused") == 10
    assert finished.stderr.count("reloaded ") == 10
    assert all("sinks[1].nmae: unknown key" in line for line in finished.stderr.splitlines()
               if "reload refused" in line)
    records = parse_records(out.read_text())
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # no gap, file unchanged
    feed = [m["seq"] for m in client.messages if "seq" in m]
    assert feed == list(range(feed[0], feed[0] + len(feed)))  # no gap for the connected client
    assert not [m for m in client.messages if m.get("type") in ("lag", "gap")]
    extra = [(r["type"], r.get("reason")) for r in records if r.get("target") == "extra"
             and r["type"] in ("start", "exit")]
    assert extra == [("start", None), ("exit", "unwatched")] * 5  # added 5 times, removed 5 times
    agent_record = records[-1]
    assert agent_record["type"] == "agent"
    assert (agent_record["agent"]["reloads"], agent_record["agent"]["failed_reloads"]) == (10, 10)


def test_a_changed_target_config_and_a_backend_change_are_planned_or_refused(tmp_path: Path) -> None:
    """The plan names what changes; a backend change is refused before anything is built."""
    out = tmp_path / "out.ndjson"
    current = parse_config(config_text(out, extra=False))
    new = parse_config(config_text(out, extra=True).replace('interval = "2ms"', 'interval = "50ms"'))
    plan = plan_reload(current, new, run="0123456789abcdef")
    assert plan.targets == (["extra"], [], ["me"])  # me's interval follows the agent's default
    assert plan.built == {} and plan.summary() == "targets +1 -0 ~1, sinks +0 -0 ~0"
    switched = parse_config(config_text(out, extra=False).replace("[agent]", '[agent]\nbackend = "psutil"'))
    with pytest.raises(ConfigError, match="cannot change on reload"):
        plan_reload(current, switched, run="0123456789abcdef")


def test_a_changed_sink_is_replaced_after_the_old_one_drained(tmp_path: Path) -> None:
    """Changing a file sink's path: the old file ends, the new one begins, with no seq lost or
    repeated across the two; the WebSocket feed (unchanged) keeps its port."""
    first, second = tmp_path / "first.ndjson", tmp_path / "second.ndjson"
    config = tmp_path / "memagent.toml"
    write_atomically(config, config_text(first, extra=False))
    agent = run_agent(config)
    try:
        port = feed_port(agent)
        wait_for(lambda: first.exists() and first.stat().st_size > 2000)
        write_atomically(config, config_text(second, extra=False))
        agent.send_signal(signal.SIGHUP)
        agent.wait_for_stderr("reloaded .* sinks \\+0 -0 ~1")
        wait_for(lambda: second.exists() and second.stat().st_size > 2000)
        with connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as still_there:
            assert json.loads(still_there.recv(timeout=10))["seq"] > 0
    finally:
        finished = agent.stop(signal.SIGTERM, timeout=30)
    assert finished.returncode == 0, finished.stderr
    seqs = [r["seq"] for r in parse_records(first.read_text()) + parse_records(second.read_text())]
    assert seqs == list(range(1, len(seqs) + 1))

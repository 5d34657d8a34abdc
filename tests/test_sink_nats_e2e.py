"""The nats sink end to end: real ``memagent run`` agents publishing to real nats-servers
(Debian's, started here on free loopback ports), each agent's file sink beside it as the record
of what it made; the stream read back and compared, record by record."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import AgentProcess, run_agent, wait_for
from nats_helpers import (
    STREAM,
    NatsCluster,
    NatsServer,
    agent_config,
    assert_exactly_once,
    lines,
    nats_server_binary,
    stop_agents,
    stream_contents,
)

HOSTS = ("web-1.example.com", "web-2", "db-1")


@pytest.fixture(autouse=True)
def _needs_nats_server() -> None:
    nats_server_binary()


@contextmanager
def agents(write_config: Callable[[str], Path], tmp_path: Path, servers: list[str],
           replicas: int = 1) -> Iterator[list[tuple[AgentProcess, Path]]]:
    """Three agents with different hostnames, killed on the way out if still running."""
    with ExitStack() as stack:
        started = []
        for host in HOSTS:
            file = tmp_path / f"{host}.ndjson"
            agent = stack.enter_context(run_agent(write_config(agent_config(host, servers, file,
                                                                            replicas=replicas))))
            started.append((agent, file))
        yield started


def test_three_agents_every_seq_exactly_once_in_order(write_config: Callable[[str], Path],
                                                     tmp_path: Path) -> None:
    """Three agents (different hostnames) publish to one JetStream server: the stream holds, for
    every (host, run), every seq its agent made exactly once and in order, each with
    Nats-Msg-Id = run:seq."""
    with NatsServer(tmp_path).start() as server, agents(write_config, tmp_path, [server.url]) as started:
        wait_for(lambda: all(lines(file) >= 60 for _, file in started), timeout=30)
        made = stop_agents(started)
        counts = assert_exactly_once(stream_contents([server.url], STREAM), made)
    assert {host for host, _ in counts} == set(HOSTS)
    print(f"records per (host, run): {counts}")


def test_server_killed_and_restarted_loses_and_repeats_nothing(write_config: Callable[[str], Path],
                                                              tmp_path: Path) -> None:
    """kill -9 of the server mid-run, then a restart on the same store: the agents notice (one line
    each), keep records queued meanwhile, reconnect by themselves (one line each) and deliver them:
    nothing lost, nothing stored twice (Msg-Id dedupe within the stream's 2-minute window)."""
    server = NatsServer(tmp_path)
    with server.start(), agents(write_config, tmp_path, [server.url]) as started:
        wait_for(lambda: all(lines(file) >= 100 for _, file in started), timeout=30)
        server.kill()
        for agent, _ in started:
            agent.wait_for_stderr("lost the connection to")
        during = {file: lines(file) for _, file in started}
        wait_for(lambda: all(lines(file) >= during[file] + 300 for _, file in started), timeout=30)
        server.start()
        for agent, _ in started:
            agent.wait_for_stderr(r"reconnected to nats://127\.0\.0\.1:\d+ after")
        after = {file: lines(file) for _, file in started}
        wait_for(lambda: all(lines(file) >= after[file] + 100 for _, file in started), timeout=30)
        made = stop_agents(started)
        stored = stream_contents([server.url], STREAM)
        stderr = [agent.stderr for agent, _ in started]
    counts = assert_exactly_once(stored, made)
    for text in stderr:
        assert text.count("lost the connection to") == 1 and text.count("reconnected to") == 1, text
    duplicates = [r["agent"]["sinks"]["nats"]["duplicates"] for r in made if r["type"] == "agent"]
    print(f"records per (host, run): {counts}; duplicates dropped by the server (last agents): {duplicates}")


def test_cluster_leader_killed_and_restarted_loses_and_repeats_nothing(write_config: Callable[[str], Path],
                                                                      tmp_path: Path) -> None:
    """A 3-node JetStream cluster and an R3 stream (created by the agents): the node leading the stream
    is killed mid-run (kill -9) and later restarted. One agent was given only that node's address
    and reconnects through the nodes the server told it about; a new leader is elected; then the
    restarted node catches up. Zero loss, zero duplicates, on the cluster and on that node."""
    with NatsCluster(tmp_path).start() as cluster, ExitStack() as stack:
        def start(host: str, servers: list[str]) -> tuple[AgentProcess, Path]:
            file = tmp_path / f"{host}.ndjson"
            config = write_config(agent_config(host, servers, file, replicas=3))
            return stack.enter_context(run_agent(config)), file

        started = [start(host, cluster.urls) for host in HOSTS[1:]]
        wait_for(lambda: all(lines(file) >= 20 for _, file in started), timeout=30)
        wait_for(lambda: stream_leader(cluster.nodes[0]), timeout=30)
        leader = stream_leader(cluster.nodes[0])
        victim = next(node for node in cluster.nodes if node.name == leader)
        started.insert(0, start(HOSTS[0], [victim.url]))
        wait_for(lambda: all(lines(file) >= 40 for _, file in started), timeout=30)
        victim.kill()
        started[0][0].wait_for_stderr("lost the connection to")
        during = {file: lines(file) for _, file in started}
        wait_for(lambda: all(lines(file) >= during[file] + 60 for _, file in started), timeout=30)
        started[0][0].wait_for_stderr(r"reconnected to nats://127\.0\.0\.1:\d+ after")
        survivor = next(node for node in cluster.nodes if node is not victim)
        wait_for(lambda: stream_leader(survivor) not in ("", victim.name), timeout=30)
        elected = stream_leader(survivor)
        victim.start(timeout=30)
        after = {file: lines(file) for _, file in started}
        wait_for(lambda: all(lines(file) >= after[file] + 40 for _, file in started), timeout=30)
        made = stop_agents(started)
        stored = stream_contents(cluster.urls, STREAM)
        wait_for(lambda: local_messages(victim) == len(stored), timeout=30)
    counts = assert_exactly_once(stored, made)
    print(f"killed the stream leader {victim.name}, {elected} elected; the restarted node holds all "
          f"{len(stored)} messages; records per (host, run): {counts}")


def jsz(server: NatsServer) -> dict[str, Any]:
    """The server's JetStream monitoring page, with its streams."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/jsz?streams=true", timeout=5) as page:
        answer: dict[str, Any] = json.loads(page.read())
        return answer


def stream_leader(server: NatsServer) -> str:
    """The name of the node leading the stream, as ``server`` sees it ("" while it knows none)."""
    for account in jsz(server).get("account_details", []):
        for stream in account.get("stream_detail", []):
            if stream["name"] == STREAM:
                return str(stream.get("cluster", {}).get("leader", ""))
    return ""


def local_messages(server: NatsServer) -> int:
    """How many messages ``server``'s own replica of the stream holds."""
    return int(jsz(server)["messages"])

"""Real ``nats-server`` processes for the NATS sink and relay tests, and a reader of what a
JetStream stream holds.

- :class:`NatsServer` is one server on free loopback ports, JetStream storing under its own
  directory: :meth:`~NatsServer.start` waits (with a deadline) until ``/healthz`` says it serves,
  JetStream included; :meth:`~NatsServer.kill` is ``kill -9``; starting again reuses the store.
  Use it as a context manager: the process never outlives the test.
- :class:`NatsCluster` is three of them routed into one JetStream cluster.
- :func:`stream_records` reads a whole stream (every stored message, its stream sequence and its
  ``Nats-Msg-Id``); :func:`assert_exactly_once` checks it against what the agents made.
- :func:`relay_serving` runs ``memagent relay`` (:data:`RELAY_TO_WEBSOCKET`: the whole stream to a
  WebSocket feed that keeps all of it) and hands back its feed id and port once it serves.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cli_helpers import MEMAGENT, AgentProcess, scaled, system_tool, wait_for
from ws_helpers import feed_port, free_port

#: The stream the agents of the end-to-end tests create and publish to.
STREAM = "MEMAGENT"


def nats_server_binary() -> str:
    """Debian's nats-server (``.ci/apt-packages``), or a skip naming the package."""
    return system_tool("nats-server", "nats-server")


@dataclass
class NatsServer:
    """One nats-server on loopback (see the module docstring). ``conf`` is added to its config
    (an ``authorization`` block, say); ``routes`` are the cluster ports of its peers; ``text``,
    when set, is the whole config instead (an example's, its ports made this server's)."""

    directory: Path
    name: str = "n1"
    conf: str = ""
    cluster: str | None = None
    routes: tuple[int, ...] = ()
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    text: str | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store(self) -> Path:
        return self.directory / f"{self.name}-store"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def config(self) -> str:
        if self.text is not None:
            return self.text
        text = (f'server_name: "{self.name}"\nlisten: "127.0.0.1:{self.port}"\n'
                f'http: "127.0.0.1:{self.http_port}"\n'
                f'jetstream {{ store_dir: "{self.store}" }}\n{self.conf}\n')
        if self.cluster is not None:
            routes = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in self.routes)
            text += (f'cluster {{ name: "{self.cluster}"\n listen: "127.0.0.1:{self.cluster_port}"\n'
                     f" routes: [{routes}] }}\n")
        return text

    def spawn(self) -> None:
        """Start the process (same ports, same store as before), without waiting."""
        assert self.process is None or self.process.poll() is not None, "already running"
        conf = self.directory / f"{self.name}.conf"
        conf.write_text(self.config())
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 20.0) -> NatsServer:
        """Start and wait until it serves, JetStream included."""
        self.spawn()
        self.wait_ready(timeout)
        return self

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"nats-server {self.name} exited ({self.process.returncode}):\n"
                                 + self.log.read_text(errors="replace")[-2000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as answer:
                return bool(json.loads(answer.read()).get("status") == "ok")
        except OSError:
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_for(self.healthy, timeout=timeout)

    def kill(self) -> None:
        """``kill -9``, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(scaled(10))

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


class NatsCluster:
    """Three servers routed into one JetStream cluster on loopback ports."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        ports = [free_port() for _ in range(size)]
        self.nodes = [NatsServer(directory, name=f"n{i + 1}", cluster="memagent", cluster_port=ports[i],
                                 routes=tuple(p for p in ports if p != ports[i])) for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready(timeout)
        return self

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for node in self.nodes:
            node.kill()


@dataclass(frozen=True)
class Stored:
    """One message of a stream: its stream sequence, Nats-Msg-Id, subject and record."""

    stream_seq: int
    msg_id: str | None
    subject: str
    record: dict[str, Any]


async def read_stream(urls: list[str], stream: str, timeout: float = 20.0) -> list[Stored]:
    """Every message ``stream`` holds now, in stream order (an ephemeral consumer, no acks)."""
    client = await nats.connect(urls, connect_timeout=2, max_reconnect_attempts=5)
    try:
        js = client.jetstream(timeout=scaled(10))
        info = await js.stream_info(stream)
        config = ConsumerConfig(name="test-reader", deliver_policy=DeliverPolicy.ALL,
                                ack_policy=AckPolicy.NONE, inactive_threshold=30)
        await js.add_consumer(stream, config)
        pull = await js.pull_subscribe_bind(consumer="test-reader", stream=stream)
        stored: list[Stored] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + scaled(timeout)
        while len(stored) < info.state.messages:
            if loop.time() > deadline:
                raise AssertionError(f"read {len(stored)} of {info.state.messages} messages of {stream}")
            try:
                messages = await pull.fetch(1000, timeout=2)
            except nats.errors.TimeoutError:
                continue
            stored.extend(Stored(m.metadata.sequence.stream, (m.headers or {}).get("Nats-Msg-Id"), m.subject,
                                 orjson.loads(m.data)) for m in messages)
        await js.delete_consumer(stream, "test-reader")
        return stored
    finally:
        await client.close()


def stream_contents(urls: list[str], stream: str) -> list[Stored]:
    """:func:`read_stream` from synchronous test code."""
    return asyncio.run(read_stream(urls, stream))


def file_records(path: Path) -> list[dict[str, Any]]:
    """The records a file sink wrote."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def assert_exactly_once(stored: Iterable[Stored],
                        made: Iterable[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """Every record ``made`` (the agents' own file sinks) is in ``stored`` exactly once, in seq order
    per (host, run), with ``Nats-Msg-Id`` = run:seq, and nothing else is; returns the count per
    (host, run)."""
    expected: dict[tuple[str, str], list[int]] = defaultdict(list)
    for record in made:
        expected[(record["host"], record["run"])].append(record["seq"])
    got: dict[tuple[str, str], list[int]] = defaultdict(list)
    for message in stored:
        record = message.record
        assert message.msg_id == f"{record['run']}:{record['seq']}", message
        got[(record["host"], record["run"])].append(record["seq"])
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for key, seqs in expected.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{key}: the agent's own file is not contiguous"
        missing = sorted(set(seqs) - set(got[key]))
        repeated = len(got[key]) - len(set(got[key]))
        assert not missing and not repeated, f"{key}: {len(missing)} missing {missing[:10]}, {repeated} twice"
        assert got[key] == seqs, f"{key}: out of order"
    return {key: len(seqs) for key, seqs in expected.items()}


def agent_config(host: str, servers: list[str], file: Path, *, replicas: int = 1) -> str:
    """An agent sampling the python processes (the agents themselves among them) every 50 ms, to the
    JetStream stream :data:`STREAM` (which it creates), and to a file beside it: the record of what it
    made."""
    listed = ", ".join(f'"{url}"' for url in servers)
    return f"""
[agent]
interval = "50ms"
hostname = "{host}"
stats_interval = "500ms"
[[targets]]
name = "python"
comm = "python*"
[[sinks]]
type = "nats"
servers = [{listed}]
stream = "{STREAM}"
create_stream = true
replicas = {replicas}
ack_timeout = "2s"
reconnect_wait = "100ms"
reconnect_wait_max = "500ms"
queue = 100000
[[sinks]]
type = "file"
path = "{file}"
"""


def lines(path: Path) -> int:
    """Records in a file sink's file so far."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def stop_agents(started: Iterable[tuple[AgentProcess, Path]]) -> list[dict[str, Any]]:
    """SIGTERM every agent; each exits 0 and its nats sink dropped nothing; every record they made
    (from their file sinks)."""
    started = list(started)
    for agent, _ in started:
        agent.send_signal(signal.SIGTERM)
    made = []
    for agent, file in started:
        finished = agent.wait(timeout=30)
        assert finished.returncode == 0, finished.stderr
        records = file_records(file)
        assert records[-1]["type"] == "agent"
        nats_stats = records[-1]["agent"]["sinks"]["nats"]  # made before the drain: unsent ones are "queued"
        assert nats_stats["dropped"] == 0, (nats_stats, finished.stderr)
        made.extend(records)
    return made


#: ``memagent relay``: the whole of :data:`STREAM` (``start = "all"``) to a WebSocket feed that keeps
#: all of it, so a client connecting with ``?since=<feed>:0`` (or the dashboard) gets every record.
RELAY_TO_WEBSOCKET = """
[relay]
servers = ["{url}"]
stream = "{stream}"
start = "all"
[[sinks]]
type = "websocket"
port = 0
replay = 100000
replay_bytes = "256MiB"
client_queue = 100000
client_queue_bytes = "256MiB"
"""

#: The relay's log line once it feeds its sinks: group 1 is the feed id.
FEED = r"relay: feed ([0-9a-f]{16}) to sinks"


@contextmanager
def relay_serving(config: Path) -> Iterator[tuple[AgentProcess, str, int]]:
    """``memagent relay CONFIG`` in the background, once its WebSocket sink serves: the process,
    the feed id and the feed's port. Killed at the end of the block unless stopped before."""
    with AgentProcess([*MEMAGENT, "relay", str(config)]) as relay:
        feed = relay.wait_for_stderr(FEED).group(1)
        yield relay, feed, feed_port(relay)

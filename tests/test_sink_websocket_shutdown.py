"""Shutting the WebSocket sink down while a client has stopped reading: bounded, in-process and
through a real `memagent run` receiving SIGTERM."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

from memagent.plugins.sinks.listener import CLOSE_GRACE
from memagent.records import RecordMaker
from memagent.testing import make_records

from cli_helpers import run_agent, scaled, wait_for
from ws_helpers import connected, feed_port, running_sink, stalled_client

DRAIN_TIMEOUT = 1.0  # seconds: the agent's drain_timeout in the SIGTERM test


async def test_close_with_a_stalled_client_is_bounded() -> None:
    """A client that stopped reading, its connection's write buffer full: close() returns within
    2 × CLOSE_GRACE (plus a second of slack) and its connection is aborted (was: until the next
    ping, 20-40 s here)."""
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={"pad": "x" * 65536})
    records = make_records(500, maker=maker)
    async with running_sink(client_queue=4) as sink:
        stalled = await asyncio.to_thread(stalled_client, sink.port)
        try:
            await connected(sink, 1)
            [client] = sink.clients
            transport = client.connection.transport
            for record in records:  # until the sender waits: the transport buffer is past write_limit
                await sink.write([record])
                await asyncio.sleep(0)  # let the sender run
                if transport.get_write_buffer_size() > sink.write_limit:
                    break
            assert transport.get_write_buffer_size() > sink.write_limit, "the client never stalled"
            await asyncio.wait_for(sink.close(), scaled(2 * CLOSE_GRACE + 1.0))
            assert transport.is_closing()
        finally:
            stalled.close()


def health(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=scaled(5)) as response:
        body: dict[str, int] = json.loads(response.read())
        return body


def test_sigterm_with_a_stalled_client_exits_within_drain_timeout(
        write_config: Callable[[str], Path]) -> None:
    """`memagent run` feeding a client that stopped reading, megabytes pending for it: after
    SIGTERM the process has exited before drain_timeout + 1 s (was: at the next ping, 12-57 s)."""
    pad = "x" * (128 * 1024)  # every record carries it: the stalled client's buffers fill at once
    config = write_config(
        f'[agent]\ninterval = "20ms"\ndrain_timeout = "{DRAIN_TIMEOUT}s"\ntags = {{ pad = "{pad}" }}\n'
        '[[targets]]\nname = "me"\nself = true\n'
        '[[sinks]]\ntype = "websocket"\nport = 0\nclient_queue = 4\ndisconnect_after = 1000000\n'
        'ping_interval = "60s"\nping_timeout = "60s"\n')
    with run_agent(config) as agent:
        port = feed_port(agent)
        stalled = stalled_client(port)
        try:
            # 30 records (4 MB) dropped for it with a queue of 4: its sender waits on a full buffer
            wait_for(lambda: health(port)["dropped"] >= 30, timeout=60)
            finished = agent.stop(timeout=DRAIN_TIMEOUT + 1.0)  # AssertionError: not exited in time
        finally:
            stalled.close()
    assert finished.returncode == 0, finished.stderr

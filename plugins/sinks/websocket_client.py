"""One client of the ``websocket`` sink: its bounded record queue, its control messages and the
task that sends them (:mod:`memagent.plugins.sinks.websocket` has the guarantees).

Guaranteed: a record queued beyond either bound drops the oldest queued records, each drop counted
and told to the client in a ``lag`` message before its next record; control messages (``run``,
``gap``, ``lag``, ``cursor``) are never dropped and go before queued records; a ``cursor`` message
goes only once everything queued before it is sent. Not guaranteed: that a queued record reaches a
client that closes or is closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import MutableMapping

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from memagent.bounded import BoundedQueue
from memagent.plugins.sinks.websocket_filters import Subscription, joined

CLOSE_TIMEOUT = 2.0  # seconds a client closed for being slow gets to answer before it is aborted


class Client:
    """One connected client: its subscription, its bounded record queue, its control messages
    (never dropped) and what its sender has done."""

    def __init__(self, connection: ServerConnection, subscription: Subscription, capacity: int,
                 capacity_bytes: int) -> None:
        self.connection = connection
        self.subscription = subscription
        self.queue: BoundedQueue[bytes] = BoundedQueue(capacity, capacity_bytes, len)
        self.control: deque[bytes] = deque()  # run and gap messages; sent before any record
        self.resume_after: int | None = None  # a since this sink had not reached: checked on the next write
        self.cursor: bytes | None = None  # the position after the last record queued (cursor=1 clients)
        self.cursor_sent: bytes | None = None
        self.filters = 0  # filter messages applied: told in cursor messages once there is one
        self.ready = asyncio.Event()
        self.dropped_unreported = 0
        self.dropped_since_caught_up = 0
        self.dropped = 0
        self.sent = 0

    def offer(self, message: bytes) -> None:
        """Queue a record, dropping the oldest while either bound is exceeded (a record larger
        than the whole byte bound is dropped itself); every drop is counted the same way."""
        dropped = self.queue.push(message)
        if dropped:
            self.dropped += dropped
            self.dropped_unreported += dropped
            self.dropped_since_caught_up += dropped
        self.ready.set()

    def tell(self, message: bytes) -> None:
        """Queue a control message: never dropped, sent before the queued records."""
        self.control.append(message)
        self.ready.set()

    async def send_forever(self, batch: bool, counters: MutableMapping[str, int]) -> None:
        """Send what is queued until the connection closes: control messages first, then a ``lag``
        message for records dropped unreported, then records (one per message, or all queued as
        one JSON array if ``batch``), and once caught up the newest cursor, once. Counts ``sent``."""
        connection = self.connection
        try:
            while True:
                if self.control:
                    await connection.send(self.control.popleft(), text=True)
                    continue
                if self.dropped_unreported:
                    lag = orjson.dumps({"type": "lag", "dropped": self.dropped_unreported,
                                        "total_dropped": self.dropped})
                    self.dropped_unreported = 0
                    await connection.send(lag, text=True)
                    continue
                if not self.queue:
                    self.dropped_since_caught_up = 0
                    cursor = self.cursor
                    if cursor is not None and cursor is not self.cursor_sent:  # caught up: say where, once
                        self.cursor_sent = cursor
                        await connection.send(cursor, text=True)
                        continue
                    self.ready.clear()
                    await self.ready.wait()
                    continue
                parts = self.queue.take(len(self.queue) if batch else 1)
                await connection.send(joined(parts) if batch else parts[0], text=True)
                self.sent += len(parts)
                counters["sent"] += len(parts)
        except ConnectionClosed:
            return


def gap(first: int, last: int) -> bytes:
    """The message telling a client that seqs ``first`` to ``last`` will not come."""
    return orjson.dumps({"type": "gap", "from": first, "to": last})


async def close_or_abort(connection: ServerConnection, code: int, reason: str) -> None:
    """Close with ``code``; abort the connection if the client has not answered in time."""
    try:
        await asyncio.wait_for(connection.close(code, reason), CLOSE_TIMEOUT)
    except TimeoutError:
        connection.transport.abort()

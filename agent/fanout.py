"""Fan-out: one :class:`Outlet` per sink, owning its queue, drop policy, batching and retries.

Guarantees:

- A slow or failing sink never slows the producer or the other sinks, unless its own policy is
  ``block``, and then only while its queue is full.
- Nothing is lost silently: every record an outlet drops is counted (``dropped``) and the first
  drop of an episode is logged; counters appear in ``agent`` records.
- A batch whose write failed is retried, the same batch, with exponential backoff
  (:data:`BACKOFF_FIRST` doubling to :data:`BACKOFF_MAX`); the failure is logged once per episode
  and the recovery once. Meanwhile new records wait in the queue under its ``when_full`` policy.
- ``write`` is never called concurrently with itself, and ``close`` only after the last write.
- A batch the sink can never write (:class:`~memagent.errors.SinkRejected`, or an unexpected
  exception — not a SinkError — raised :data:`UNEXPECTED_ATTEMPTS` times for the same batch) is
  dropped and counted (``rejected``, and in ``dropped``), logged once per episode, and delivery
  goes on: one poison record never blocks a sink.
- A sink that raises :class:`~memagent.errors.SinkClosed` (its destination is gone for good)
  is not retried: that batch, what is queued and every later record for it are counted as
  dropped, one error line says so, and :meth:`Fanout.every_sink_closed` lets the agent stop
  when no sink is left.
- On :meth:`Outlet.drain` the queue is delivered until empty or the deadline passes; what is
  still undelivered then is counted as dropped and logged as one error line.

Not guaranteed: order across sinks, or delivery of records a sink refuses past the drain
deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from memagent.bounded import BoundedQueue
from memagent.contracts import Record, Reopenable, Sink
from memagent.errors import SinkClosed, SinkError, SinkRejected

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.1  # seconds: quick enough to ride over a momentary EAGAIN-like hiccup
BACKOFF_MAX = 30.0  # seconds: a dead disk is retried twice a minute, not hammered
UNEXPECTED_ATTEMPTS = 3  # a bug in a sink (KeyError on a record) is not a destination that is down
#: What the framework reports for every outlet; a sink's own counter of the same name is
#: published as ``sink_<name>`` instead, so it can never hide the framework's.
FRAMEWORK_COUNTERS = ("type", "queued", "written", "dropped", "rejected", "failures", "retries", "reopens")


#: Seconds a sink's ``close()`` may take past the drain deadline (an fsync, a last goodbye to
#: clients) before it is abandoned: SIGTERM ends within ``drain_timeout`` plus this.
CLOSE_GRACE = 0.8


class Outlet:
    """The path from the agent to one sink. Create, :meth:`start`, :meth:`offer`/:meth:`put`
    records, then :meth:`drain` once."""

    def __init__(self, name: str, sink: Sink, *, queue: int, when_full: str, batch: int,
                 targets: Sequence[str] | None, extra: dict[str, int] | None = None) -> None:
        self.name = name
        self.sink = sink
        self.capacity = queue
        self.when_full = when_full
        self.batch = batch
        self.targets = frozenset(targets) if targets is not None else None
        self.extra = extra if extra is not None else {}
        self._queue: BoundedQueue[Record] = BoundedQueue(queue)
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._closing = False
        self._unblocked = False
        self._reopen = False
        self._task: asyncio.Task[None] | None = None
        self._inflight = 0
        self._dropping = False
        self._failing = False
        self.closed = asyncio.Event()  # set once the sink raised SinkClosed
        self.closed_reason: str | None = None
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self.retries = 0
        self.reopens = 0
        self.rejected = 0
        self._rejecting = False

    def accepts(self, record: Record) -> bool:
        """Whether this outlet wants the record (``agent`` records go to every sink)."""
        return self.targets is None or record.target is None or record.target in self.targets

    @property
    def queued(self) -> int:
        return len(self._queue) + self._inflight

    def stats(self) -> dict[str, Any]:
        """Counters for ``agent`` records."""
        stats: dict[str, Any] = {"type": type(self.sink).name, "queued": self.queued,
                                 "written": self.written, "dropped": self.dropped,
                                 "rejected": self.rejected, "failures": self.failures,
                                 "retries": self.retries, "reopens": self.reopens}
        for key, value in self.extra.items():
            stats[f"sink_{key}" if key in FRAMEWORK_COUNTERS else key] = value
        return stats

    async def start(self) -> None:
        """Start the sink, then the delivery task."""
        await self.sink.start()
        self._task = asyncio.create_task(self._deliver_forever(), name=f"outlet {self.name}")

    def _count_drop(self, count: int, why: str) -> None:
        self.dropped += count
        if not self._dropping:
            self._dropping = True
            log.warning("sink %s: %s; dropping records (when_full=%s, queue=%d); counted in agent records",
                        self.name, why, self.when_full, self.capacity)

    def offer(self, record: Record) -> None:
        """Queue without waiting, applying ``drop_oldest`` / ``drop_newest`` when full.
        (For ``block`` outlets use :meth:`put`.)"""
        if self.closed_reason is not None:
            self.dropped += 1  # logged once when the sink closed; counted in agent records
            return
        if self._queue.full and self.when_full == "drop_newest":
            self._count_drop(1, "queue full")
            return
        self._queued(self._queue.push(record))

    def offer_all(self, records: list[Record]) -> None:
        """:meth:`offer` for a chunk this outlet accepts whole (no ``targets`` filter), at once."""
        if self.closed_reason is not None or self.when_full == "drop_newest":
            for record in records:
                self.offer(record)
            return
        self._queued(self._queue.extend(records))

    def _queued(self, dropped: int) -> None:
        """After queueing: count what the queue dropped to make room; note when it has room again."""
        if dropped:
            self._count_drop(dropped, "queue full")
        elif self._dropping and len(self._queue) < self.capacity // 2:
            self._dropping = False
            log.info("sink %s: queue has room again; %d records dropped so far", self.name, self.dropped)
        self._ready.set()

    async def put(self, record: Record) -> None:
        """Queue, waiting for room when the policy is ``block`` (until :meth:`unblock`)."""
        while self.when_full == "block" and self._queue.full and not self._unblocked:
            self._space.clear()
            await self._space.wait()
        self.offer(record)

    def unblock(self) -> None:
        """Stop making producers wait (the agent is stopping): from now on a full ``block``
        queue drops its oldest record, counted, so shutdown can never hang on a stuck sink."""
        self._unblocked = True
        self._space.set()

    def request_reopen(self) -> None:
        """Ask the sink to reopen (SIGHUP) before its next write, even if nothing is queued."""
        self._reopen = True
        self._ready.set()

    async def _deliver_forever(self) -> None:
        while True:
            if self._reopen:
                self._reopen = False
                await self._call_reopen()
            if not self._queue:
                if self._closing:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            batch = self._queue.take(self.batch)
            self._space.set()
            self._inflight = len(batch)
            await self._write_with_retry(batch)
            self._inflight = 0
            if self.closed_reason is not None:
                return

    async def _call_reopen(self) -> None:
        if not isinstance(self.sink, Reopenable):
            return
        try:
            await self.sink.reopen()
            self.reopens += 1
        except Exception as exc:  # noqa: BLE001 - a failed reopen is retried by the next write
            log.warning("sink %s: reopen failed: %s", self.name, exc)

    async def _write_with_retry(self, batch: list[Record]) -> None:
        delay = BACKOFF_FIRST
        unexpected = 0
        while True:
            try:
                await self.sink.write(batch)
            except asyncio.CancelledError:
                raise
            except SinkClosed as exc:
                self.close_for_good(len(batch), _describe(exc))
                return
            except SinkRejected as exc:
                self._reject(batch, _describe(exc))
                return
            except Exception as exc:  # noqa: BLE001 - a sink's failure must never stop the agent
                if not isinstance(exc, SinkError):
                    unexpected += 1
                    if unexpected >= UNEXPECTED_ATTEMPTS:
                        self._reject(batch, f"{type(exc).__name__}: {_describe(exc)} "
                                            f"({unexpected} attempts; a bug in the sink?)")
                        return
                self.failures += 1
                if not self._failing:
                    self._failing = True
                    log.error("sink %s: write failed: %s; retrying with backoff, records wait in "
                              "its queue (when_full=%s)", self.name, _describe(exc), self.when_full)
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if self._failing:
                self._failing = False
                log.warning("sink %s: writing again after %d failed attempts", self.name, self.failures)
            self._rejecting = False
            self.written += len(batch)
            return

    def _reject(self, batch: list[Record], why: str) -> None:
        """Drop a batch that can never be written; count it; log once per episode."""
        self.rejected += len(batch)
        self.dropped += len(batch)
        self._failing = False
        if not self._rejecting:
            self._rejecting = True
            log.error("sink %s: a batch of %d records (seq %d-%d) can never be written: %s; dropped "
                      "and counted, delivery goes on",
                      self.name, len(batch), batch[0].seq, batch[-1].seq, why)

    def close_for_good(self, unwritten: int, why: str) -> None:
        """The sink will never take records again: count ``unwritten`` and what is queued as
        dropped, drop every later record (counted), say so once."""
        self.closed_reason = why
        lost = unwritten + self._queue.clear()
        self.dropped += lost
        self.closed.set()
        log.error("sink %s: closed for good: %s; %d records dropped, and every later record for "
                  "it is dropped too (counted in agent records)", self.name, why, lost)

    async def drain(self, deadline: float) -> None:
        """Deliver what is queued (until ``deadline``, a ``time.monotonic()`` value), then close
        the sink. Undelivered records are counted as dropped and logged."""
        self._closing = True
        self.unblock()
        self._ready.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            except Exception as exc:  # noqa: BLE001 - reported below like any undelivered record
                log.error("sink %s: delivery stopped: %s", self.name, _describe(exc))
        left = len(self._queue) + self._inflight
        if left:
            self.dropped += left
            self._queue.clear()
            log.error("sink %s: %d queued records not delivered before the drain deadline; "
                      "%d dropped in all", self.name, left, self.dropped)
        try:
            # close gets what is left of the deadline plus CLOSE_GRACE, however the sink behaves
            await asyncio.wait_for(self.sink.close(), max(0.0, deadline - time.monotonic()) + CLOSE_GRACE)
        except TimeoutError:
            log.error("sink %s: close did not finish within the drain deadline; abandoned", self.name)
        except Exception as exc:  # noqa: BLE001 - closing one sink must not skip the others
            log.error("sink %s: close failed: %s", self.name, _describe(exc))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


class Fanout:
    """All outlets; hands each record to every outlet that accepts it."""

    def __init__(self, outlets: Sequence[Outlet]) -> None:
        self.outlets = list(outlets)
        self._blocking = any(o.when_full == "block" for o in self.outlets)

    async def publish(self, records: Sequence[Record]) -> None:
        """Queue records, in order, on every outlet that accepts them (waits only for full
        ``block`` outlets)."""
        records = list(records)
        for outlet in self.outlets:
            blocking = self._blocking and outlet.when_full == "block"
            if outlet.targets is None and not blocking:
                outlet.offer_all(records)
                continue
            for record in records:
                if outlet.accepts(record):
                    if blocking:
                        await outlet.put(record)
                    else:
                        outlet.offer(record)

    def replace(self, outlets: Sequence[Outlet]) -> None:
        """The outlets from now on (a reload): kept ones keep their queues; new ones queue
        until started; the caller drains the ones left out."""
        self.outlets = list(outlets)
        self._blocking = any(o.when_full == "block" for o in self.outlets)

    def request_reopen(self) -> None:
        for outlet in self.outlets:
            outlet.request_reopen()

    def unblock(self) -> None:
        """See :meth:`Outlet.unblock`."""
        for outlet in self.outlets:
            outlet.unblock()

    async def every_sink_closed(self) -> None:
        """Wait until every sink has closed for good."""
        await asyncio.gather(*(outlet.closed.wait() for outlet in self.outlets))

    def why_every_sink_closed(self) -> str | None:
        """``"<sink>: <reason>; ..."`` once every sink has closed for good, else None."""
        if not all(outlet.closed.is_set() for outlet in self.outlets):
            return None
        return "; ".join(f"{outlet.name}: {outlet.closed_reason}" for outlet in self.outlets)

    def stats(self) -> dict[str, Any]:
        return {outlet.name: outlet.stats() for outlet in self.outlets}

    async def drain(self, timeout: float) -> None:
        """Drain every outlet concurrently, all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        await asyncio.gather(*(outlet.drain(deadline) for outlet in self.outlets))

"""``memagent relay``: records in from NATS, out through the usual sinks — one live view (and one
file, one Prometheus endpoint...) for a fleet of agents.

Only the producer differs from ``memagent run``: instead of the scheduler and the pipeline, a
:class:`Source` hands over batches of records others made, and :mod:`memagent.fanout` delivers
them to sinks built exactly as ``run`` builds them, with the same queues, drop policies, retries
and counters. Records are relayed as they are — their bytes, ``host``, ``run`` and ``seq`` — so
loss stays detectable per host; no processors run (totals and alerts were made by the agents).

The feed's position is the source's, not any one agent's: :attr:`Record.seq` is the source's
position (the JetStream stream sequence: global, surviving restarts) and the sinks' ``run`` is the
source's :attr:`Source.feed` id, so the WebSocket sink's resume cursor ``?since=<run>:<seq>``
means the same for a relay (``<feed>:<stream seq>``) as for an agent. Because the feed id is only
known once the source has found its stream, the sinks are validated when the relay is built
(``memagent check``) and built for good once connected.

The source is found through the ``nats`` sink's entry point (its class attribute ``source``),
so the relay loads NATS support as a config naming that sink does: without the extra it is the
same one-line error naming ``memagent[nats]``.

Lifecycle: connect (for as long as it takes), start the sinks, relay until SIGTERM/SIGINT (a
second one exits at once) or until every sink closed for good; then stop reading, drain the
sinks within ``drain_timeout`` and log what was relayed. SIGHUP makes sinks reopen their files.
A batch is acknowledged to a durable consumer once it is queued to every sink: a relay killed
with SIGKILL loses what its sink queues held (the next run resumes after it).

Not here: reloading the config (restart the relay), ``agent`` records of the relay's own (its
counters are in its log lines; its sinks' in ``GET /healthz`` where they serve one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from memagent.config import RelayConfig
from memagent.contracts import Record
from memagent.errors import EverySinkClosed, PluginLoadError, StartupError
from memagent.fanout import Fanout, Outlet
from memagent.options import Options
from memagent.registry import find, load
from memagent.reload import build_outlet
from memagent.runtime import under_signals

log = logging.getLogger("memagent.relay")
T = TypeVar("T")
#: The ``run`` sinks are validated with before the feed id is known (``memagent check``).
UNKNOWN_FEED = "0" * 16


class Source(Protocol):
    """Where a relay's records come from (see the module docstring)."""

    counters: dict[str, int]
    feed: str
    last_seq: int
    first_seq: int | None

    def describe(self) -> str:
        """Where records come from, for log lines."""
        ...

    async def start(self) -> None:
        """Connect, for as long as it takes (cancelled to give up); then ``feed`` is known."""
        ...

    async def next_batch(self) -> list[Record]:
        """The next records, at least one; waits as long as it takes."""
        ...

    async def processed(self) -> None:
        """The last batch is queued to every sink (acknowledge it where that means something)."""
        ...

    async def close(self) -> None:
        ...


def source_from_options(options: Options, hostname: str) -> Source:
    """The NATS reader, from the plugin that provides the ``nats`` sink, validating the
    ``[relay]`` table (ConfigError naming its key; PluginLoadError naming ``memagent[nats]``)."""
    spec = find("sink", "nats")
    plugin = load(spec)
    reader = getattr(plugin, "source", None)
    if reader is None:
        raise PluginLoadError("sink", spec.name, spec.distribution, "provides no relay source")
    source: Source = reader.from_options(options, logging.getLogger("memagent.relay.nats"), hostname=hostname)
    return source


@dataclass
class Relay:
    """A built relay; :meth:`run` it once."""

    config: RelayConfig
    source: Source
    fanout: Fanout | None = None
    _reopen: bool = False
    _started: float = field(default_factory=time.monotonic)

    def outlets(self, feed: str) -> list[Outlet]:
        """The configured sinks (validated, not started), told ``feed`` as their run."""
        return [build_outlet(sink, self.config.hostname, feed) for sink in self.config.sinks]

    def reopen(self) -> None:
        """SIGHUP: sinks reopen their files before their next write."""
        if self.fanout is not None:
            self.fanout.request_reopen()

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set or every sink closed for good; then drain. Raises
        :class:`EverySinkClosed` afterwards in the second case, StartupError if a sink cannot start."""
        log.info("relay: reading %s", self.source.describe())
        try:
            if not await _until(self._start_source(), stop):
                return
            fanout = self.fanout = Fanout(self.outlets(self.source.feed))
            await self._start_outlets(fanout)
            names = ", ".join(outlet.name for outlet in fanout.outlets)
            log.info("relay: feed %s to sinks %s", self.source.feed, names)
            closed = asyncio.ensure_future(fanout.every_sink_closed())
            unblock = asyncio.ensure_future(self._unblock_on(stop, fanout))  # a full "block" sink
            try:                                                              # never holds up a stop
                while not stop.is_set() and not closed.done():
                    batch = await _until(self.source.next_batch(), stop, closed)
                    if batch is None:
                        break
                    await fanout.publish(batch)
                    await self.source.processed()
            finally:
                closed.cancel()
                unblock.cancel()
        finally:
            await self.source.close()
            if self.fanout is not None:
                self.fanout.unblock()
                await self.fanout.drain(self.config.drain_timeout)
            self._summary()
        why = self.fanout.why_every_sink_closed() if self.fanout is not None else None
        if why is not None:
            raise EverySinkClosed(f"every sink closed for good ({why}); stopped")

    @staticmethod
    async def _unblock_on(stop: asyncio.Event, fanout: Fanout) -> None:
        await stop.wait()
        fanout.unblock()

    async def _start_source(self) -> bool:
        await self.source.start()
        return True

    async def _start_outlets(self, fanout: Fanout) -> None:
        started: list[Outlet] = []
        for outlet in fanout.outlets:
            try:
                await outlet.start()
            except Exception as exc:
                for running in started:
                    await running.drain(time.monotonic() + 1.0)
                self.fanout = None
                raise StartupError(f"sink {outlet.name}: cannot start: {exc}") from exc
            started.append(outlet)

    def _summary(self) -> None:
        c = self.source.counters
        span = (f" (feed seq {self.source.first_seq}-{self.source.last_seq})"
                if self.source.first_seq is not None else "")
        sinks = "; ".join(f"{name}: {s['written']} written, {s['dropped']} dropped"
                          for name, s in (self.fanout.stats().items() if self.fanout else ()))
        dropped = f", {c['dropped']} dropped before the sinks (too slow)" if c.get("dropped") else ""
        log.info("relay stopped after %.0fs: %d records relayed%s, %d malformed skipped%s; %s",
                 time.monotonic() - self._started, c.get("relayed", 0), span, c.get("malformed", 0), dropped,
                 sinks or "no sink started")


async def _until(work: Awaitable[T], *events: asyncio.Event | asyncio.Future[Any]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) once one of ``events`` is set or done."""
    task = asyncio.ensure_future(work)
    waiters = [asyncio.ensure_future(e.wait()) if isinstance(e, asyncio.Event) else e for e in events]
    try:
        await asyncio.wait([task, *waiters], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter, event in zip(waiters, events, strict=True):
            if waiter is not event:
                waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def build(config: RelayConfig) -> Relay:
    """Validate the ``[relay]`` table and every sink; no I/O beyond imports."""
    source = source_from_options(Options(dict(config.source), "relay"), config.hostname)
    relay = Relay(config, source)
    relay.outlets(UNKNOWN_FEED)  # validated now; built again with the feed id once connected
    return relay


async def run_until_signalled(relay: Relay, duration: float | None = None) -> None:
    """Run ``relay``: the first SIGINT/SIGTERM stops it gracefully, a second exits at once, SIGHUP
    reopens sinks' files (the agent's handling: :func:`memagent.runtime.under_signals`)."""
    await under_signals(relay.run, on_hup=relay.reopen, duration=duration,
                        queued=lambda: sum(o.queued for o in relay.fanout.outlets) if relay.fanout else 0)

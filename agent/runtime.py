"""The agent's lifecycle: build from a config, run until stopped, drain, close.

:func:`build` loads the backend and sink plugins the config names (validating their options) and
is all ``memagent check`` does. :meth:`Agent.run` starts the sinks, scans, ticks, publishes
``agent`` records every ``stats_interval``, and on stop (the ``stop`` event: SIGINT/SIGTERM,
``--duration``, ``--once``) publishes a last ``agent`` record, drains every outlet within
``drain_timeout`` and closes backend and sinks. SIGHUP (:meth:`Agent.reopen`) asks sinks to
reopen their files, as logrotate expects.

Signals (:func:`run_until_signalled`): the first SIGINT/SIGTERM stops gracefully, within
``drain_timeout`` plus a second whatever sinks and clients do; a second one exits at once (exit 1,
what is still queued is counted in the log line and lost). SIGHUP is safe at any moment: ignored
from the console script's first line (:mod:`memagent.entry`) until the loop handles it, and
ignored again after the loop stops handling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from memagent.config import Config
from memagent.contracts import Backend, Counting, SinkContext
from memagent.errors import EverySinkClosed, StartupError
from memagent.fanout import Fanout, Outlet
from memagent.pipeline import Pipeline
from memagent.records import RecordMaker, iso_utc, new_run_id
from memagent.registry import build_backend, build_sink
from memagent.scheduler import Scheduler
from memagent.targets import Selector
from memagent.totals import TotalsProcessor

log = logging.getLogger(__name__)


@dataclass
class Agent:
    """A built agent; :meth:`run` it once."""

    config: Config
    backend: Backend
    fanout: Fanout
    scheduler: Scheduler
    maker: RecordMaker

    def reopen(self) -> None:
        """Ask every sink to reopen before its next write (SIGHUP)."""
        log.info("SIGHUP: reopening sinks")
        self.fanout.request_reopen()

    def stats(self, started: float) -> dict[str, Any]:
        """The agent's counters, as published in ``agent`` records."""
        c = self.scheduler.counters
        stats: dict[str, Any] = {
            "uptime_s": round(time.monotonic() - started, 3), "processes": self.scheduler.watched,
            "records": self.maker.last_seq + 1, "ticks": c.ticks, "ticks_skipped": c.ticks_skipped,
            "rescans": c.rescans, "backend_failures": c.backend_failures,
            "processor_failures": self.scheduler.pipeline.processor_failures,
            "targets_unmatched": self.scheduler.unmatched,
            "pidfile_problems": sum(w.selector.pidfile_problems for w in self.scheduler.watches),
            **own_memory(), "sinks": self.fanout.stats()}
        if isinstance(self.backend, Counting):
            stats["backend"] = dict(self.backend.counters)
        return stats

    async def _publish_stats(self, started: float) -> None:
        await self.scheduler.pipeline.publish([self.maker.agent(self.stats(started), iso_utc(time.time()))])

    async def _stats_forever(self, started: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.agent.stats_interval)
            except TimeoutError:
                await self._publish_stats(started)

    async def _unblock_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.fanout.unblock()

    async def _stop_if_every_sink_closes(self, stop: asyncio.Event) -> None:
        closing = asyncio.ensure_future(self.fanout.every_sink_closed())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({closing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (closing, stopping):
            waiter.cancel()
        if closing.done() and not closing.cancelled():
            log.info("no sink can take records any more; stopping")
            stop.set()

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> None:
        """Run until ``stop`` is set (or one round with ``once``), then drain and close.
        Raises :class:`EverySinkClosed` afterwards if no sink could take records any more."""
        started = time.monotonic()
        await self._start_outlets()
        try:
            await self.scheduler.rescan()
            if once:
                for watches in self.scheduler.groups().values():
                    await self.scheduler.sample(watches)
            else:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._unblock_on(stop))
                    group.create_task(self._stop_if_every_sink_closes(stop))
                    for interval, watches in self.scheduler.groups().items():
                        group.create_task(self.scheduler.tick_forever(interval, watches, stop))
                    group.create_task(self.scheduler.rescan_forever(self.config.agent.rescan, stop))
                    group.create_task(self._stats_forever(started, stop))
        finally:
            self.fanout.unblock()
            await self._publish_stats(started)
            await self.fanout.drain(self.config.agent.drain_timeout)
            self.backend.close()
            dropped = sum(o.dropped for o in self.fanout.outlets)
            log.info("stopped: %d records made, %d dropped", self.maker.last_seq, dropped)
        why = self.fanout.why_every_sink_closed()
        if why is not None:
            raise EverySinkClosed(f"every sink closed for good ({why}); stopped")

    async def _start_outlets(self) -> None:
        started: list[Outlet] = []
        for outlet in self.fanout.outlets:
            try:
                await outlet.start()
            except Exception as exc:
                for running in started:
                    await running.drain(time.monotonic() + 1.0)
                self.backend.close()
                raise StartupError(f"sink {outlet.name}: cannot start: {exc}") from exc
            started.append(outlet)


def own_memory() -> dict[str, int]:
    """The agent's own ``rss`` now (Linux: ``/proc/self/statm``) and peak ``max_rss``, bytes."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    memory = {"max_rss": usage if sys.platform == "darwin" else usage * 1024}  # macOS: bytes; else KiB
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm", "rb") as statm:
        memory["rss"] = int(statm.read(128).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return memory


def build(config: Config) -> Agent:
    """Load and validate every plugin the config names; no I/O beyond imports."""
    backend = build_backend(config.agent.backend, config.backends)
    maker = RecordMaker(host=config.agent.hostname, os_name=backend.os, backend=backend.name,
                        tags=config.agent.tags, run=new_run_id())
    outlets = []
    try:
        for sink_config in config.sinks:
            context = SinkContext(name=sink_config.name, hostname=config.agent.hostname,
                                  run=maker.run, log=logging.getLogger(f"memagent.sink.{sink_config.name}"))
            sink = build_sink(sink_config.type, sink_config.key, sink_config.options, context)
            outlets.append(Outlet(sink_config.name, sink, queue=sink_config.queue,
                                  when_full=sink_config.when_full, batch=sink_config.batch,
                                  targets=sink_config.targets, extra=context.counters))
    except BaseException:
        backend.close()
        raise
    fanout = Fanout(outlets)
    totalled = [t.name for t in config.targets if t.totals]
    processors = [TotalsProcessor(maker, totalled)] if totalled else []
    scheduler = Scheduler(backend, [Selector(t) for t in config.targets], Pipeline(fanout, maker, processors))
    return Agent(config, backend, fanout, scheduler, maker)


async def run_until_signalled(agent: Agent, *, once: bool = False, duration: float | None = None) -> None:
    """Run ``agent``: the first SIGINT/SIGTERM stops it gracefully, a second exits at once,
    SIGHUP reopens sinks (see the module docstring)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_signals: list[int] = []

    def on_stop(signum: int) -> None:
        stop_signals.append(signum)
        if len(stop_signals) == 1:
            stop.set()
            return
        queued = sum(o.queued for o in agent.fanout.outlets)
        log.error("second %s: exiting now; %d queued records are lost", signal.Signals(signum).name, queued)
        logging.shutdown()
        os._exit(1)

    handled: list[tuple[int, Any]] = []
    for signum, handler, args in ((signal.SIGINT, on_stop, (signal.SIGINT,)),
                                  (signal.SIGTERM, on_stop, (signal.SIGTERM,)),
                                  (signal.SIGHUP, agent.reopen, ())):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            previous = signal.getsignal(signum)
            loop.add_signal_handler(signum, handler, *args)
            handled.append((signum, previous))
    timer = loop.call_later(duration, stop.set) if duration is not None else None
    try:
        await agent.run(stop, once=once)
    finally:
        if timer is not None:
            timer.cancel()
        for handled_signum, previous in handled:
            loop.remove_signal_handler(handled_signum)
            if handled_signum == signal.SIGHUP:  # never back to SIGHUP's default action (terminate)
                signal.signal(handled_signum, signal.SIG_IGN)
            elif previous is not None:
                signal.signal(handled_signum, previous)

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from memagent.config import Config, load_config
from memagent.contracts import Backend, Counting
from memagent.errors import EverySinkClosed, MemagentError, StartupError
from memagent.fanout import Fanout, Outlet
from memagent.pipeline import Pipeline
from memagent.records import RecordMaker, iso_utc, new_run_id
from memagent.registry import build_backend
from memagent.reload import ReloadPlan, build_outlet, plan_reload, processors_for
from memagent.scheduler import Scheduler
from memagent.targets import Selector

log = logging.getLogger(__name__)


@dataclass
class Agent:
    """A built agent; :meth:`run` it once. ``config_path`` is the file SIGHUP re-reads (None for
    the embedded default: SIGHUP then only reopens sinks)."""

    config: Config
    backend: Backend
    fanout: Fanout
    scheduler: Scheduler
    maker: RecordMaker
    config_path: str | None = None
    reloads: int = 0
    failed_reloads: int = 0
    _halt: asyncio.Event = field(default_factory=asyncio.Event)  # ends this config's tasks
    _group: asyncio.TaskGroup | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _started: float = 0.0
    _reloading: asyncio.Task[None] | None = None
    _reload_again: bool = False
    _retiring: set[asyncio.Task[None]] = field(default_factory=set)

    def reopen(self) -> None:
        """Ask every sink to reopen before its next write (SIGHUP)."""
        log.info("SIGHUP: reopening sinks")
        self.fanout.request_reopen()

    def on_sighup(self) -> None:
        """SIGHUP: sinks reopen their files (logrotate), and the config file is re-read
        (:meth:`reload`). Signals during a reload coalesce into one more reload."""
        self.reopen()
        if self.config_path is None:
            return
        if self._group is None or (self._reloading is not None and not self._reloading.done()):
            self._reload_again = True  # still starting, or reloading: one more reload after it
            return
        self._reloading = self._group.create_task(self._reload_until_settled())

    async def _reload_until_settled(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    def stats(self, started: float) -> dict[str, Any]:
        """The agent's counters, as published in ``agent`` records."""
        c = self.scheduler.counters
        stats: dict[str, Any] = {
            "uptime_s": round(time.monotonic() - started, 3), "processes": self.scheduler.watched,
            "records": self.maker.last_seq + 1, "ticks": c.ticks, "ticks_skipped": c.ticks_skipped,
            "rescans": c.rescans, "backend_failures": c.backend_failures,
            "processor_failures": self.scheduler.pipeline.processor_failures,
            "targets_unmatched": self.scheduler.unmatched,
            "unsampled": self.scheduler.unsampled, "full_skipped": c.full_skipped,
            "pidfile_problems": sum(w.selector.pidfile_problems for w in self.scheduler.watches),
            "reloads": self.reloads, "failed_reloads": self.failed_reloads,
            **own_memory(), "sinks": self.fanout.stats()}
        if isinstance(self.backend, Counting):
            stats["backend"] = dict(self.backend.counters)
        return stats

    async def _publish_stats(self, started: float) -> None:
        await self.scheduler.pipeline.publish([self.maker.agent(self.stats(started), iso_utc(time.time()))])

    async def _stats_forever(self, halt: asyncio.Event) -> None:
        while not halt.is_set():
            try:
                await asyncio.wait_for(halt.wait(), self.config.agent.stats_interval)
            except TimeoutError:
                await self._publish_stats(self._started)

    async def _halt_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._halt.set()
        self.fanout.unblock()

    async def _stop_if_every_sink_closes(self, stop: asyncio.Event, halt: asyncio.Event) -> None:
        waiters = {asyncio.ensure_future(self.fanout.every_sink_closed()), asyncio.ensure_future(halt.wait())}
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if not halt.is_set() and done:
            log.info("no sink can take records any more; stopping")
            stop.set()

    def _start_tasks(self, stop: asyncio.Event) -> None:
        """This config's tasks: a ticker per interval, rescans, stats, the every-sink watch.
        They end when :attr:`_halt` is set (stop, or a reload that starts new ones)."""
        assert self._group is not None
        halt = self._halt
        for interval, watches in self.scheduler.groups().items():
            self._group.create_task(self.scheduler.tick_forever(interval, watches, halt))
        self._group.create_task(self.scheduler.rescan_forever(self.config.agent.rescan, halt))
        self._group.create_task(self._stats_forever(halt))
        self._group.create_task(self._stop_if_every_sink_closes(stop, halt))

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> None:
        """Run until ``stop`` is set (or one round with ``once``), then drain and close.
        Raises :class:`EverySinkClosed` afterwards if no sink could take records any more."""
        self._started = time.monotonic()
        await self._start_outlets()
        try:
            await self.scheduler.rescan()
            if once:
                for watches in self.scheduler.groups().values():
                    await self.scheduler.sample(watches)
            else:
                async with asyncio.TaskGroup() as group:
                    self._group = group
                    self._stop = stop
                    group.create_task(self._halt_on(stop))
                    self._start_tasks(stop)
                    if self._reload_again:  # SIGHUP while starting: reload now
                        self._reloading = group.create_task(self._reload_until_settled())
        finally:
            self._group = None
            self.fanout.unblock()
            if self._retiring:
                await asyncio.gather(*self._retiring, return_exceptions=True)
            await self._publish_stats(self._started)
            await self.fanout.drain(self.config.agent.drain_timeout)
            self.backend.close()
            dropped = sum(o.dropped for o in self.fanout.outlets)
            log.info("stopped: %d records made, %d dropped", self.maker.last_seq, dropped)
        why = self.fanout.why_every_sink_closed()
        if why is not None:
            raise EverySinkClosed(f"every sink closed for good ({why}); stopped")

    async def reload(self) -> None:
        """Re-read :attr:`config_path` and apply it (see :mod:`memagent.reload`). An invalid
        config is refused with one error line; the running config is untouched."""
        assert self.config_path is not None
        if not os.path.isfile(self.config_path):  # never block on a FIFO put in its place
            self.failed_reloads += 1
            log.error("reload refused: %s is not a regular file now; still running the previous "
                      "config", self.config_path)
            return
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
            plan = plan_reload(self.config, new, self.maker.run)
        except MemagentError as exc:
            self.failed_reloads += 1
            log.error("reload refused: %s; still running the previous config", exc)
            return
        await self._apply(plan)
        self.reloads += 1
        log.info("reloaded %s: %s", self.config_path, plan.summary())

    async def _apply(self, plan: ReloadPlan) -> None:
        new = plan.config
        replaced = {name: outlet for name, outlet in ((o.name, o) for o in self.fanout.outlets)
                    if name in plan.removed_sinks or name in plan.changed_sinks}

        def between_ticks() -> None:  # no tick runs while this does: nothing sees half a change
            self.maker.host, self.maker.tags = new.agent.hostname, dict(new.agent.tags)
            current = {o.name: o for o in self.fanout.outlets}
            self.fanout.replace([plan.built.get(s.name) or current[s.name] for s in new.sinks])
            self.config = new

        await self.scheduler.retarget(new.targets, processors_for(new, self.maker), between_ticks)
        old_halt, self._halt = self._halt, asyncio.Event()
        old_halt.set()  # this config's tasks end at their next wait; the new ones start now
        if self._stop.is_set():  # stopped meanwhile: the new tasks must end at once too
            self._halt.set()
        await self.scheduler.rescan()  # added targets start now, not a rescan period later
        self._start_tasks(self._stop)
        for name, outlet in plan.built.items():
            task = asyncio.create_task(self._swap_in(outlet, replaced.pop(name, None)))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        for outlet in replaced.values():
            task = asyncio.create_task(outlet.drain(time.monotonic() + self.config.agent.drain_timeout))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _swap_in(self, new: Outlet, old: Outlet | None) -> None:
        """Start a reloaded sink, after draining the one it replaces (its queue meanwhile fills)."""
        if old is not None:
            await old.drain(time.monotonic() + self.config.agent.drain_timeout)
        try:
            await new.start()
        except Exception as exc:  # noqa: BLE001 - one sink that cannot start must not stop the agent
            log.error("sink %s: cannot start after reload: %s; its records are dropped (counted)",
                      new.name, exc)
            new.close_for_good(0, f"cannot start: {exc}")

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
    try:
        outlets = [build_outlet(sink, config.agent.hostname, maker.run) for sink in config.sinks]
    except BaseException:
        backend.close()
        raise
    fanout = Fanout(outlets)
    pipeline = Pipeline(fanout, maker, processors_for(config, maker))
    scheduler = Scheduler(backend, [Selector(t) for t in config.targets], pipeline)
    return Agent(config, backend, fanout, scheduler, maker)


async def run_until_signalled(agent: Agent, *, once: bool = False, duration: float | None = None) -> None:
    """Run ``agent``: the first SIGINT/SIGTERM stops it gracefully, a second exits at once,
    SIGHUP reopens sinks and reloads (see the module docstring)."""
    await under_signals(lambda stop: agent.run(stop, once=once), on_hup=agent.on_sighup,
                        queued=lambda: sum(o.queued for o in agent.fanout.outlets), duration=duration)


async def under_signals(work: Callable[[asyncio.Event], Awaitable[None]], *, on_hup: Callable[[], None],
                        queued: Callable[[], int], duration: float | None = None) -> None:
    """Run ``work(stop)`` with the agent's signal handling (an agent's run, a relay's): the first
    SIGINT/SIGTERM sets ``stop``, a second exits at once (exit 1, saying how many ``queued``
    records are lost), SIGHUP calls ``on_hup``; ``duration`` sets ``stop`` after that many seconds.
    Afterwards SIGINT/SIGTERM get their previous handling back and SIGHUP stays ignored."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_signals: list[int] = []

    def on_stop(signum: int) -> None:
        stop_signals.append(signum)
        if len(stop_signals) == 1:
            stop.set()
            return
        log.error("second %s: exiting now; %d queued records are lost", signal.Signals(signum).name, queued())
        logging.shutdown()
        os._exit(1)

    handled: list[tuple[int, Any]] = []
    for signum, handler, args in ((signal.SIGINT, on_stop, (signal.SIGINT,)),
                                  (signal.SIGTERM, on_stop, (signal.SIGTERM,)),
                                  (signal.SIGHUP, on_hup, ())):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            previous = signal.getsignal(signum)
            loop.add_signal_handler(signum, handler, *args)
            handled.append((signum, previous))
    timer = loop.call_later(duration, stop.set) if duration is not None else None
    try:
        await work(stop)
    finally:
        if timer is not None:
            timer.cancel()
        for handled_signum, previous in handled:
            loop.remove_signal_handler(handled_signum)
            if handled_signum == signal.SIGHUP:  # never back to SIGHUP's default action (terminate)
                signal.signal(handled_signum, signal.SIG_IGN)
            elif previous is not None:
                signal.signal(handled_signum, previous)

"""Helpers for testing memagent plugins (and memagent itself) without a running agent.

- :func:`make_records` gives real schema-v1 :class:`~memagent.contracts.Record` objects with a
  contiguous ``seq``, as the agent would produce them.
- :func:`sink_context` gives a :class:`~memagent.contracts.SinkContext` whose logger keeps
  what the sink logged (:class:`RecordingLogger`), to assert on.
- :class:`FakeBackend` is a backend whose processes and readings a test sets by hand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import ClassVar

from memagent.contracts import (
    Failure,
    Gone,
    Identity,
    ProcessInfo,
    Reading,
    Record,
    SampleResult,
    SinkContext,
)
from memagent.options import Options
from memagent.records import RecordMaker, iso_utc


def make_records(count: int, *, target: str = "test", pid: int = 4242,
                 maker: RecordMaker | None = None, start_seq: int = 0) -> list[Record]:
    """``count`` sample records for one fake process (rss grows by one page per record)."""
    maker = maker or RecordMaker(host="test-host", os_name="linux", backend="fake", tags={})
    maker._seq = max(maker._seq, start_seq)  # noqa: SLF001 - tests may start mid-run
    info = ProcessInfo(pid=pid, ppid=1, name="fake", started=1_700_000_000.0)
    ts = iso_utc(time.time())
    records = []
    for i in range(count):
        reading = Reading(pid, info.started, {"rss": 4096 * (i + 1), "vms": 1 << 24}, {"shared": 0})
        records.append(maker.seal(maker.sample(target, info, reading, ts)))
    return records


class RecordingLogger(logging.Logger):
    """A sink's logger that keeps what it logged, for assertions: ``reports`` (warnings and
    errors, what a person must see) and ``infos`` (info and debug), as plain messages. Records
    also go on to the usual handlers (pytest's ``caplog`` sees them)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, logging.DEBUG)
        self.parent = logging.getLogger("memagent.sink")  # records still reach pytest's caplog
        self.reports: list[str] = []
        self.infos: list[str] = []

    def handle(self, record: logging.LogRecord) -> None:
        (self.reports if record.levelno >= logging.WARNING else self.infos).append(record.getMessage())
        super().handle(record)


def sink_context(name: str = "sink", hostname: str = "test-host") -> SinkContext:
    """A context whose ``log`` is a :class:`RecordingLogger` (``context.log.reports``)."""
    return SinkContext(name=name, hostname=hostname, run="0123456789abcdef",
                       log=RecordingLogger(f"memagent.sink.{name}"))


class FakeBackend:
    """A backend whose world a test sets: ``processes`` (what listing returns) and ``readings``
    (per pid). A pid without a reading samples as :class:`Gone`; a pid in ``denied`` as an
    ``access_denied`` :class:`Failure`."""

    name: ClassVar[str] = "fake"
    os: ClassVar[str] = "linux"
    platform_fields: ClassVar[tuple[str, ...]] = ("shared",)

    def __init__(self, processes: Iterable[ProcessInfo] = ()) -> None:
        self.processes: list[ProcessInfo] = list(processes)
        self.readings: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
        self.denied: set[int] = set()
        self.forgotten: list[Identity] = []
        self.closed = False

    @classmethod
    def available(cls) -> bool:
        return True

    @classmethod
    def from_options(cls, options: Options) -> FakeBackend:
        options.finish()
        return cls()

    def list_processes(self) -> list[ProcessInfo]:
        return list(self.processes)

    def sample(self, processes: Sequence[Identity], full: bool) -> list[SampleResult]:
        results: list[SampleResult] = []
        for pid, started in processes:
            if pid in self.denied:
                results.append(Failure(pid, started, "access_denied", "permission denied"))
            elif pid in self.readings:
                portable, platform = self.readings[pid]
                results.append(Reading(pid, started, portable, platform,
                                       {"uss": 1, "pss": 1, "swap": 0} if full else None))
            else:
                results.append(Gone(pid, started))
        return results

    def forget(self, identity: Identity) -> None:
        self.forgotten.append(identity)

    def close(self) -> None:
        self.closed = True


class RecordingSink:
    """A sink that keeps every batch it is given, for assertions.

    ``fail_next`` makes that many following writes raise SinkError; ``gone`` makes every
    following write raise SinkClosed (the destination left for good); ``gate`` (an Event) when
    cleared makes writes wait until it is set (a stalled sink). Lifecycle calls are recorded.
    """

    name: ClassVar[str] = "recording"
    sample_config: ClassVar[str] = '[[sinks]]\ntype = "recording"\n'

    def __init__(self) -> None:
        import asyncio

        self.batches: list[list[Record]] = []
        self.calls: list[str] = []
        self.fail_next = 0
        self.gone = False
        self.gate = asyncio.Event()
        self.gate.set()

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> RecordingSink:
        options.finish()
        return cls()

    @property
    def records(self) -> list[Record]:
        return [record for batch in self.batches for record in batch]

    async def start(self) -> None:
        self.calls.append("start")

    async def write(self, batch: Sequence[Record]) -> None:
        from memagent.errors import SinkClosed, SinkError

        self.calls.append("write")
        await self.gate.wait()
        if self.gone:
            raise SinkClosed("injected: the reader left")
        if self.fail_next:
            self.fail_next -= 1
            raise SinkError("injected failure")
        self.batches.append(list(batch))

    async def reopen(self) -> None:
        self.calls.append("reopen")

    async def close(self) -> None:
        self.calls.append("close")

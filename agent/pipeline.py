"""The pipeline: where drafts become records — processors, then ``seq`` and encoding, then fanout.

::

    scheduler ── drafts, a chunk at a time ──► processors (in order) ──► seal (seq, orjson) ──► fanout

The scheduler (and the runtime, for ``agent`` records) publishes :class:`~memagent.records.Draft`
lists here, never to the fanout directly. Each processor sees every chunk in order and may add,
change or drop drafts; at the end of each tick it is asked for derived drafts (per-target
totals, alerts), which pass through the processors after it. Then every draft is sealed — given
the next ``seq`` and encoded once — in this one place, so ``seq`` stays contiguous whatever the
processors add, and the fanout gets the whole chunk at once.

Guarantees: processors run on the event loop, one chunk at a time, never concurrently; a chunk
is at most what one backend call sampled (:data:`~memagent.contracts.SAMPLE_CHUNK` processes'
records) or one rescan's start/exit records. A processor that raises is a bug: the error is
logged once per processor and episode, counted (``processor_failures``), and the chunk goes on
unprocessed by it — a processor can never stop records from flowing.

Not guaranteed: that a processor sees a whole tick in one chunk (use :meth:`Processor.end_tick`
for what needs the whole tick).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from memagent.fanout import Fanout
from memagent.records import Draft, RecordMaker

log = logging.getLogger(__name__)


class Processor(Protocol):
    """A stage between the scheduler and the fanout (in the spirit of Telegraf's processors and
    Vector's transforms). Make derived drafts with the pipeline's :class:`RecordMaker`."""

    name: str

    def process(self, chunk: list[Draft]) -> list[Draft]:
        """The drafts to pass on for this chunk: ``chunk`` itself, changed, or with more added.
        Must be fast: it runs on the event loop for every chunk."""
        ...

    def end_tick(self, ts: str, targets: Sequence[str]) -> list[Draft]:
        """Called once after the last chunk of a tick that sampled ``targets`` at ``ts``;
        returns derived drafts (often none)."""
        ...


class Pipeline:
    """Processors, then sealing, then the fanout. See the module docstring."""

    def __init__(self, fanout: Fanout, maker: RecordMaker, processors: Sequence[Processor] = ()) -> None:
        self.fanout = fanout
        self.maker = maker
        self.processors = list(processors)
        self.processor_failures = 0
        self._failing: set[str] = set()

    async def publish(self, drafts: list[Draft]) -> None:
        """Run ``drafts`` through every processor, seal and hand them to the fanout."""
        await self._deliver(self._through(drafts, self.processors))

    async def end_tick(self, ts: str, targets: Sequence[str]) -> None:
        """Collect each processor's derived drafts (passed through the processors after it)."""
        derived: list[Draft] = []
        for index, processor in enumerate(self.processors):
            made = self._guarded(processor, [], processor.end_tick, ts, targets)
            derived += self._through(made, self.processors[index + 1:])
        await self._deliver(derived)

    def _through(self, drafts: list[Draft], processors: Sequence[Processor]) -> list[Draft]:
        for processor in processors:
            if not drafts:
                break
            drafts = self._guarded(processor, drafts, processor.process, drafts)
        return drafts

    def _guarded(self, processor: Processor, fallback: list[Draft],
                 method: Callable[..., list[Draft]], *args: Any) -> list[Draft]:
        """``method(*args)``, or ``fallback`` if the processor raises (logged once per episode)."""
        try:
            result = method(*args)
        except Exception as exc:  # noqa: BLE001 - a processor's bug must not stop records
            self.processor_failures += 1
            if processor.name not in self._failing:
                self._failing.add(processor.name)
                log.error("processor %s failed: %s: %s; its chunk goes on unprocessed (counted)",
                          processor.name, type(exc).__name__, exc)
            return fallback
        self._failing.discard(processor.name)
        return result

    async def _deliver(self, drafts: list[Draft]) -> None:
        if drafts:
            await self.fanout.publish(self.maker.seal_all(drafts))

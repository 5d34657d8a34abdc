"""Per-target totals: a processor that sums each tick's samples per target into a ``totals`` record.

For every target with ``totals = true``, once per tick, after its samples: the number of
processes sampled and the sums of ``rss`` and ``vms``, and — over the processes whose full info
was read (``full_processes`` of them) — of ``uss``, ``pss`` and ``swap``. A tick in which the
target matched nothing gives ``processes: 0`` (the service is down, not unknown). This is what
Telegraf's ``sum_matches`` and process-exporter's name groups give, made once in the pipeline so
every sink gets the same numbers and the metrics sinks never recompute them.

Not guaranteed: that a process counted in one tick's totals is the same set as the previous
tick's (processes come and go between ticks; ``start``/``exit`` records say which).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from memagent.records import Draft, RecordMaker

_FULL = ("uss", "pss", "swap")


class TotalsProcessor:
    """The pipeline processor behind ``totals = true`` (see the module docstring)."""

    name = "totals"

    def __init__(self, maker: RecordMaker, targets: Iterable[str]) -> None:
        self.maker = maker
        self.targets = frozenset(targets)
        self._sums: dict[str, list[int]] = {}  # target -> [processes, rss, vms, full, uss, pss, swap]

    def process(self, chunk: list[Draft]) -> list[Draft]:
        """Adds each sample of a totalled target to its tick's sums; passes the chunk on."""
        targets, sums = self.targets, self._sums
        for draft in chunk:
            if draft.type != "sample" or draft.target not in targets:
                continue
            reading = draft.reading  # set on every sample: the numbers, without making its fields
            assert reading is not None
            total = sums.get(draft.target)
            if total is None:
                total = sums[draft.target] = [0, 0, 0, 0, 0, 0, 0]
            portable = reading.portable
            total[0] += 1
            total[1] += portable["rss"]
            total[2] += portable["vms"]
            full = reading.full
            if full is not None:
                total[3] += 1
                total[4] += full["uss"]
                total[5] += full["pss"]
                total[6] += full["swap"]
        return chunk

    def end_tick(self, ts: str, targets: Sequence[str]) -> list[Draft]:
        """One ``totals`` draft per totalled target of this tick."""
        drafts = []
        for target in targets:
            if target not in self.targets:
                continue
            processes, rss, vms, full, uss, pss, swap = self._sums.pop(target, (0, 0, 0, 0, 0, 0, 0))
            body: dict[str, Any] = {"os": self.maker.os, "backend": self.maker.backend, "target": target,
                                    "processes": processes, "rss": rss, "vms": vms}
            if full:
                body.update(full_processes=full, uss=uss, pss=pss, swap=swap)
            drafts.append(self.maker.derived("totals", body, ts, target=target))
        return drafts

"""A tick's cgroup pass: each cgroup of the processes a tick samples, read once, one record each.

Before a tick samples its targets' processes, the scheduler hands their members here, grouped
by :attr:`~memagent.contracts.ProcessInfo.memory_cgroup` (anew only when members changed); the
backend reads each cgroup once (:class:`~memagent.contracts.CgroupReading`, at most
:data:`~memagent.contracts.SAMPLE_CHUNK` cgroups per call, yielding to the loop between calls)
and each becomes one ``cgroup`` record, naming the targets watching processes in it. The records
are published before the tick's samples, so a processor (the ``rss_above_limit`` alert rule) has
this tick's limits when the samples come.

Not done: the root cgroup (the whole machine) and processes the backend could not place
(``memory_cgroup`` None) have no record; a backend without the capability makes none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from memagent.contracts import SAMPLE_CHUNK, CgroupReading, Identity, MemoryCgroup, ProcessInfo
from memagent.pipeline import Pipeline
from memagent.records import Draft


class CgroupGroup:
    """The watched processes of one cgroup this tick: their targets and a representative."""

    __slots__ = ("identities", "info", "targets")

    def __init__(self, info: ProcessInfo) -> None:
        self.info = info
        self.targets: set[str] = set()
        self.identities: set[Identity] = set()


def group_by_cgroup(members: Iterable[tuple[str, Mapping[Identity, ProcessInfo]]],
                    ) -> dict[MemoryCgroup, CgroupGroup]:
    """(target name, its members) pairs → the cgroups they are in, with targets and processes."""
    groups: dict[MemoryCgroup, CgroupGroup] = {}
    for target, processes in members:
        for identity, info in processes.items():
            cgroup = info.memory_cgroup
            if cgroup is None:
                continue
            group = groups.get(cgroup)
            if group is None:
                group = groups[cgroup] = CgroupGroup(info)
            group.targets.add(target)
            group.identities.add(identity)
    return groups


async def publish_cgroups(backend: CgroupReading, pipeline: Pipeline,
                          groups: Mapping[MemoryCgroup, CgroupGroup], ts: str) -> None:
    """Read the cgroups of ``groups`` (from :func:`group_by_cgroup`) once each and publish a
    ``cgroup`` record per cgroup read. A backend exception propagates (the scheduler counts it)."""
    cgroups = list(groups)
    maker = pipeline.maker
    for start in range(0, len(cgroups), SAMPLE_CHUNK):
        chunk = cgroups[start:start + SAMPLE_CHUNK]
        stats = backend.read_cgroups(chunk)
        drafts: list[Draft] = []
        for cgroup in chunk:
            found = stats.get(cgroup)
            if found is None:
                continue
            group = groups[cgroup]
            drafts.append(maker.cgroup(sorted(group.targets), cgroup, len(group.identities), found,
                                       group.info.container, ts))
        await pipeline.publish(drafts)
        await asyncio.sleep(0)

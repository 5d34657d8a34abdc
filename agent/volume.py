"""Volume control and the cost guard: which processes of a target are sampled, and in full.

- ``top = N`` / ``min_rss``: at each rescan every matching process's rss is read once (one chunked
  pass through the backend, statm only) and only the N largest, or those at least ``min_rss``,
  become the target's members: sampled every tick, with ``start`` when they enter and ``exit``
  (reason ``unwatched``) when they leave. The others are counted (``unsampled``), not read again
  until the next rescan.
- ``full_every = N``: uss/pss/swap are read on every Nth tick of the target only.
- ``full_max_rss``: a process whose last rss is above it (or not yet known: its first tick) is
  read without ``full``, counted (``full_skipped``) and noted once with an ``error`` record of
  kind ``full_skipped``: reading smaps walks every mapping under the process's mmap lock, which
  stalls a huge process (seconds on a 200 GB one), so the agent must not do it unasked.

Not guaranteed: the ranking is as of the rescan (a process that grows between rescans moves up
only at the next one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from memagent.config import TargetConfig
from memagent.contracts import SAMPLE_CHUNK, Backend, Identity, ProcessInfo, Reading, SampleResult


def limits_volume(config: TargetConfig) -> bool:
    """Whether the target samples only some of what it matches."""
    return config.top is not None or config.min_rss is not None


async def largest(backend: Backend, matched: dict[Identity, ProcessInfo],
                  config: TargetConfig) -> dict[Identity, ProcessInfo]:
    """The processes of ``matched`` the target samples: by rss, the ``top`` largest of those at
    least ``min_rss``. One statm read per process, in chunks (yielding between them)."""
    identities = list(matched)
    sizes: dict[Identity, int] = {}
    for start in range(0, len(identities), SAMPLE_CHUNK):
        chunk = identities[start:start + SAMPLE_CHUNK]
        for identity, result in zip(chunk, backend.sample(chunk, False), strict=True):
            if isinstance(result, Reading):
                sizes[identity] = result.portable["rss"]
        await asyncio.sleep(0)
    chosen = [i for i, rss in sizes.items() if config.min_rss is None or rss >= config.min_rss]
    chosen.sort(key=sizes.__getitem__, reverse=True)
    if config.top is not None:
        chosen = chosen[:config.top]
    return {identity: matched[identity] for identity in chosen}


def full_now(config: TargetConfig, tick: int) -> bool:
    """Whether this tick (counted from 0 for the target) reads full info."""
    return config.full and tick % config.full_every == 0


def split_full(chunk: Sequence[Identity], config: TargetConfig,
               last_rss: dict[Identity, int]) -> tuple[list[Identity], list[Identity]]:
    """(read in full, read without: too large or not yet known) under ``full_max_rss``."""
    if config.full_max_rss is None:
        return list(chunk), []
    limit = config.full_max_rss
    light = [i for i in chunk if last_rss.get(i, limit + 1) <= limit]
    heavy = [i for i in chunk if last_rss.get(i, limit + 1) > limit]
    return light, heavy


def merged(chunk: Sequence[Identity], parts: Sequence[tuple[list[Identity], list[SampleResult]]]
           ) -> list[SampleResult]:
    """The results of several backend calls over parts of ``chunk``, back in ``chunk``'s order."""
    by_identity = {identity: result for identities, results in parts
                   for identity, result in zip(identities, results, strict=True)}
    return [by_identity[identity] for identity in chunk]

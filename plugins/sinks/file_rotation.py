"""Rotation helpers for the file sink: archive names, clock-aligned boundaries, gzip, pruning.

Archive names are ``<live name>.<UTC time of rotation>`` with microseconds
(``memory.ndjson.2026-11-25T05-00-00.000123``, ``.gz`` when compressed), so they sort in time
order by name and never collide. Compression and pruning block on disk I/O: call them from a
worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import shutil
import time
from datetime import UTC, datetime

ARCHIVE_TIME_FORMAT = "%Y-%m-%dT%H-%M-%S.%f"


def archive_name(live_path: str, now: float | None = None) -> str:
    """A fresh archive path for ``live_path`` (same directory), unique even within a microsecond."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime(ARCHIVE_TIME_FORMAT)
    candidate = f"{live_path}.{stamp}"
    suffix = 0
    while os.path.exists(candidate) or os.path.exists(candidate + ".gz"):
        suffix += 1
        candidate = f"{live_path}.{stamp}-{suffix}"
    return candidate


def next_boundary(now: float, interval: float) -> float:
    """The next multiple of ``interval`` seconds since the epoch (UTC) strictly after ``now``."""
    return (math.floor(now / interval) + 1) * interval


def compress(path: str, mode: int) -> str:
    """gzip ``path`` to ``path.gz`` (written to a temporary name, then renamed), remove ``path``."""
    target = path + ".gz"
    partial = target + ".partial"
    with open(path, "rb") as source:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as packed:
            shutil.copyfileobj(source, packed, 1 << 20)
    os.replace(partial, target)
    os.unlink(path)
    return target


def archives_of(live_path: str) -> list[str]:
    """Existing archives of ``live_path``, oldest first (by name, which is by time)."""
    directory, base = os.path.split(live_path)
    prefix = base + "."
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return []
    found = [n for n in names if n.startswith(prefix) and n[len(prefix):len(prefix) + 1].isdigit()
             and not n.endswith(".partial")]
    return [os.path.join(directory, n) for n in sorted(found)]


def prune(live_path: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` archives; returns what was deleted."""
    archives = archives_of(live_path)
    doomed = archives[:-keep] if keep > 0 else archives
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return doomed

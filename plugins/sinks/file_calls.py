"""Where the file and stdout sinks' per-batch calls run: on the event loop when that is safe,
else in a worker thread.

A batch costs the file sink a ``stat`` of its path and a ``write``. Handing each to a worker
thread costs two thread hops per batch, most of the sink's CPU at a high record rate. A write
to a regular file on a local filesystem only copies into the page cache, so :class:`FileCalls`
makes those calls directly on the event loop when the file is a regular file on a filesystem of
:data:`LOCAL_FILESYSTEMS` (from ``/proc/self/mountinfo``, matched by device), or /dev/null.

Guarantees: a network or FUSE filesystem, an unknown one, a FIFO, a socket, a terminal or a
device other than /dev/null is always written from a worker thread (it may block for as long as
its server or reader likes). A direct call that still takes longer than :data:`SLOW_CALL` (a
disk stalled, writeback throttling) is reported once and sends every later call of that sink to
a worker thread: the loop is held that long at most once. Not guaranteed: that the first slow
call is not slower than that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TypeVar

#: Filesystems whose writes and stats do not wait for anything but the local kernel and disk.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "zfs",
                               "overlay", "bcachefs", "jfs", "reiserfs", "vfat", "exfat"})
#: A direct call slower than this (seconds) ends direct calls for the sink.
SLOW_CALL = 0.05
NULL_DEVICE = os.makedev(1, 3)  # /dev/null: a write never waits
MOUNTINFO = "/proc/self/mountinfo"
MOUNTINFO_BYTES = 4 << 20  # bounded: a host with thousands of mounts still fits

T = TypeVar("T")


def filesystem_of(device: int, mountinfo: str = MOUNTINFO) -> str | None:
    """The filesystem type of the mount whose device is ``device`` (``st_dev``), or None if no
    line of ``mountinfo`` names it (or it cannot be read)."""
    wanted = f"{os.major(device)}:{os.minor(device)}".encode()
    try:
        with open(mountinfo, "rb") as file:
            data = file.read(MOUNTINFO_BYTES)
    except OSError:
        return None
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) > 2 and fields[2] == wanted and b"-" in fields[6:]:
            after = fields[fields.index(b"-", 6) + 1:]
            return after[0].decode("ascii", "replace") if after else None
    return None


class FileCalls:
    """Runs one file sink's per-batch calls (see the module docstring)."""

    def __init__(self, sink: str, log: logging.Logger, mountinfo: str = MOUNTINFO) -> None:
        self.sink = sink
        self.log = log
        self.mountinfo = mountinfo
        self.direct = False
        self._slow = False  # once a direct call was slow: threads for good

    def opened(self, opened: os.stat_result) -> None:
        """A new live file: decide for it (``opened`` is its fstat)."""
        if self._slow:
            self.direct = False
        elif stat.S_ISCHR(opened.st_mode):
            self.direct = opened.st_rdev == NULL_DEVICE
        else:
            self.direct = (stat.S_ISREG(opened.st_mode)
                           and filesystem_of(opened.st_dev, self.mountinfo) in LOCAL_FILESYSTEMS)

    async def run(self, call: Callable[[], T]) -> T:
        """``call()`` directly when direct, else in a worker thread."""
        if not self.direct:
            return await asyncio.to_thread(call)
        began = time.monotonic()
        try:
            return call()
        finally:
            took = time.monotonic() - began
            if took > SLOW_CALL:
                self.direct, self._slow = False, True
                self.log.warning("file sink %s: a write or stat took %.0f ms on the event loop; "
                                 "from now on they run in a worker thread", self.sink, took * 1000)

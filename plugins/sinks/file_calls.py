"""Where the file and stdout sinks' per-batch calls run: on the event loop when that is safe,
else in a worker thread.

A batch costs the file sink a ``stat`` of its path and a ``write``. Handing each to a worker
thread costs two thread hops per batch, most of the sink's CPU at a high record rate. A write
to a regular file on a local filesystem only copies into the page cache, so :class:`FileCalls`
makes those calls directly on the event loop when the file is a regular file on a filesystem of
:data:`LOCAL_FILESYSTEMS` (from ``/proc/self/mountinfo``, matched by device), or /dev/null.

Guarantees: a network or FUSE filesystem, an unknown one (for the file or any directory on its
path), a directory others may write, a directory on the path that others may replace (rename
away, then plant a link to a slow place), a FIFO, a socket, a terminal or a device other than
/dev/null is always written from a worker thread (it may block for as long as its server or
reader likes). A direct call that still takes longer than :data:`SLOW_CALL` (a
disk stalled, writeback throttling) is reported once and sends every later call of that sink to
a worker thread: the loop is held that long at most once. Not guaranteed: that the first slow
call is not slower than that; that a change of ownership or mode on the path made after the file
was opened (by root: nobody else can) is noticed before the sink next opens a file (a rotation,
a reopen, a new path).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from memagent.plugins.sinks.file_rotation import shared_by_stat

#: Filesystems whose writes and stats do not wait for anything but the local kernel and disk.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "zfs",
                               "overlay", "bcachefs", "jfs", "reiserfs", "vfat", "exfat"})
#: A direct call slower than this (seconds) ends direct calls for the sink.
SLOW_CALL = 0.05
NULL_DEVICE = os.makedev(1, 3)  # /dev/null: a write never waits
MOUNTINFO = "/proc/self/mountinfo"
MOUNTINFO_BYTES = 4 << 20  # bounded: a host with thousands of mounts still fits

T = TypeVar("T")


def filesystems(mountinfo: str = MOUNTINFO) -> dict[str, str]:
    """``major:minor`` → filesystem type of every mount in ``mountinfo`` (empty if unreadable)."""
    try:
        with open(mountinfo, "rb") as file:
            data = file.read(MOUNTINFO_BYTES)
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) > 2 and b"-" in fields[6:]:
            after = fields[fields.index(b"-", 6) + 1:]
            if after:
                found.setdefault(fields[2].decode("ascii", "replace"), after[0].decode("ascii", "replace"))
    return found


def filesystem_of(device: int, mountinfo: str = MOUNTINFO) -> str | None:
    """The filesystem type of the mount whose device is ``device`` (``st_dev``), or None if no
    line of ``mountinfo`` names it (or it cannot be read)."""
    return filesystems(mountinfo).get(_device_key(device))


def _device_key(device: int) -> str:
    return f"{os.major(device)}:{os.minor(device)}"


#: Links followed while walking a path before giving up, as the kernel does (ELOOP).
MAX_LINKS = 40


def _path_walk(path: str) -> tuple[set[int], bool]:
    """Walk the directories of ``path`` as the kernel does when it looks the path up (each link
    followed where it stands, ``..`` taken after the links before it): the devices of every
    directory a name is looked up in, and whether someone else may replace one of the entries
    looked up (rename it away and put a link or a mount of their own in its place). OSError if
    one cannot be looked at, or after :data:`MAX_LINKS` links."""
    directory = os.path.dirname(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
    parts = deque(name for name in directory.split("/") if name)
    current = "/"
    devices = {os.stat(current).st_dev}
    replaceable = False
    links = 0
    while parts:
        name = parts.popleft()
        if name == ".":
            continue
        if name == "..":  # current holds no link: its parent by name is its real parent
            current = os.path.dirname(current)
            continue
        entry_path = os.path.join(current, name)
        entry = os.lstat(entry_path)
        replaceable = replaceable or others_may_replace(entry, current)
        if stat.S_ISLNK(entry.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, "too many links", path)
            target = os.readlink(entry_path)
            if target.startswith("/"):
                current = "/"
            parts.extendleft(reversed([step for step in target.split("/") if step]))
            continue
        current = entry_path
        devices.add(entry.st_dev)
    return devices, replaceable


def others_may_replace(entry: os.stat_result, parent: str) -> bool:
    """Whether someone other than root and the agent's user may rename or remove ``entry`` (its
    ``lstat``) from the directory ``parent``: ``parent`` is shared (``shared_by_stat``) and its
    sticky bit does not protect the entry (set, on a directory of root's or ours, for an entry of
    root's or ours: /tmp/our-dir is safe, /tmp/their-dir/our-dir is not). A mount point's owner
    is not known (``lstat`` shows the mounted root's; the kernel asks the covered directory's,
    and another user may have made that one), so the sticky bit is not counted on for it."""
    where = os.stat(parent)
    if not shared_by_stat(where, parent):
        return False
    ours = (0, os.geteuid())
    mount_point = entry.st_dev != where.st_dev
    return not (where.st_mode & stat.S_ISVTX and where.st_uid in ours and entry.st_uid in ours
                and not mount_point)


class FileCalls:
    """Runs one file sink's per-batch calls (see the module docstring)."""

    def __init__(self, sink: str, log: logging.Logger, mountinfo: str = MOUNTINFO) -> None:
        self.sink = sink
        self.log = log
        self.mountinfo = mountinfo
        self.direct = False
        self._slow = False  # once a direct call was slow: threads for good

    def opened(self, opened: os.stat_result, path: str | None = None, *, shared: bool = False) -> None:
        """A new file: decide for it. ``opened`` is its fstat; ``path``, when calls will look it
        up by name (the file sink's ``stat``), is checked too: every directory on the way must be
        local as well, and ``shared`` (others may write its directory, so may put a mount of
        their own at its name) or a directory above it that others may replace sends them to a
        worker thread. Blocking (reads mountinfo, stats the path's directories): call it from a
        worker thread."""
        if self._slow or shared:
            self.direct = False
        elif stat.S_ISCHR(opened.st_mode):
            self.direct = opened.st_rdev == NULL_DEVICE
        elif not stat.S_ISREG(opened.st_mode):
            self.direct = False
        else:
            devices, replaceable = {opened.st_dev}, False
            if path is not None:
                try:
                    above, replaceable = _path_walk(path)
                except OSError:
                    above, replaceable = set(), True  # not looked at: not trusted
                devices |= above
            kinds = filesystems(self.mountinfo)
            self.direct = not replaceable and all(kinds.get(_device_key(device)) in LOCAL_FILESYSTEMS
                                                  for device in devices)

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

"""Disk work for the file sink, safe in a directory that others can write: opening the live file
and its directory, archive names, clock-aligned boundaries, gzip, pruning.

Nothing here follows a symbolic link at a name in the log directory or writes through an entry
it did not create itself. The log directory is reached one level at a time, each opened relative
to its parent's descriptor; it is never a link itself, and a link above it is followed only where
nobody but root and the agent's user can have placed it (:func:`shared_directory` is false for
its parent: ``/var/run -> /run`` is fine, a link in ``/tmp`` is not). Every later operation is
relative to the directory's descriptor (``dir_fd``), so a directory swapped for a link between
two steps cannot redirect them. A refusal is :class:`Refused`.

Archive names are ``<live name>.<UTC time of rotation>`` with microseconds
(``memory.ndjson.2026-11-25T05-00-00.000123``, ``.gz`` when compressed), so they sort in time
order by name and never collide. Everything but :func:`archive_name` and :func:`next_boundary`
blocks on disk I/O: call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable
from datetime import UTC, datetime

ARCHIVE_TIME_FORMAT = "%Y-%m-%dT%H-%M-%S.%f"
#: What follows ``<live name>`` in the name of an archive this sink made; nothing else is pruned.
ARCHIVE_SUFFIX = re.compile(r"\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{6}(?:-\d+)?(?:\.gz)?")


class Refused(OSError):
    """A path the sink will not use: a symbolic link, not a regular file, someone else's file.
    An ``OSError``, so it fails (and is retried) like any other; ``str()`` is one line."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(errno.EPERM, f"refusing to open: {why}", path)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def open_entry(directory: int, name: str, flags: int, path: str, mode: int = 0o600, *,
               follow: bool = False) -> int:
    """``os.open`` of ``name`` relative to ``directory`` (close-on-exec, never a controlling
    terminal), not following a link at ``name`` unless ``follow``: a link there (or a FIFO or
    socket that ``O_NONBLOCK`` could not open) raises :class:`Refused`. ``path`` names it."""
    flags |= os.O_CLOEXEC | os.O_NOCTTY | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(name, flags, mode, dir_fd=directory)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            raise
        try:
            found = os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISLNK(found) and not follow:
            raise Refused(path, "is a symbolic link") from None
        if exc.errno == errno.ENXIO and not stat.S_ISREG(found):
            raise Refused(path, "not a regular file") from None
        raise


def open_directory(path: str, mode: int) -> int:
    """A descriptor of directory ``path``, reached one level at a time from ``/`` (or the working
    directory). The last level is never a link; one above it is followed only if its parent is
    not :func:`shared_directory`; else :class:`Refused`. Missing levels are created with ``mode``
    (less the umask) by ``mkdir`` relative to the parent's descriptor, never through a link."""
    top = "/" if path.startswith("/") else ""
    names = [name for name in path.split("/") if name]
    fd = os.open(top or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(names, 1):
            where = os.path.join(top, *names[:depth])
            follow = depth < len(names) and not shared_directory(fd)
            try:
                level = open_entry(fd, name, os.O_RDONLY | os.O_DIRECTORY, where, follow=follow)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode, dir_fd=fd)
                level = open_entry(fd, name, os.O_RDONLY | os.O_DIRECTORY, where)
            os.close(fd)
            fd = level
    except BaseException:
        os.close(fd)
        raise
    return fd


#: The extended attribute holding a file's POSIX access ACL, and its entries' tags (acl_ea.h).
ACL_XATTR = "system.posix_acl_access"
_ACL_USER, _ACL_GROUP, _ACL_MASK = 0x02, 0x08, 0x10
_ACL_WRITE = 0x02


def shared_directory(directory: int | str) -> bool:
    """Whether someone other than root and the agent's user may add entries to a directory (an
    open descriptor, or a path whose links are followed): owned by another user, world-writable
    (sticky or not), group-writable by a group other than root's (logrotate's test, plus the
    owner), or given write by a POSIX ACL entry naming another user or a group other than
    root's (an ACL that cannot be read counts as one that does). Blocks on the filesystem
    (the ACL is an extended attribute): not on the event loop. OSError if it cannot be stat'd."""
    return shared_by_stat(os.stat(directory), directory)


def shared_by_stat(where: os.stat_result, directory: int | str) -> bool:
    """:func:`shared_directory` for a directory already stat'd (``where``)."""
    if (where.st_uid not in (0, os.geteuid()) or where.st_mode & stat.S_IWOTH
            or where.st_mode & stat.S_IWGRP and where.st_gid != 0):
        return True
    try:
        acl = os.getxattr(directory, ACL_XATTR)
    except OSError as exc:
        # no ACL (or none possible here): the mode bits say it all
        return exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
    return acl_grants_write(acl)


def acl_grants_write(acl: bytes) -> bool:
    """Whether a ``system.posix_acl_access`` value lets another user, or a group other than
    root's, write (its named entries, within the mask). Malformed: True (the safe answer)."""
    if len(acl) < 4 or (len(acl) - 4) % 8 or int.from_bytes(acl[:4], "little") != 2:
        return True
    entries = [(int.from_bytes(acl[i:i + 2], "little"), int.from_bytes(acl[i + 2:i + 4], "little"),
                int.from_bytes(acl[i + 4:i + 8], "little")) for i in range(4, len(acl), 8)]
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), _ACL_WRITE)
    if not mask & _ACL_WRITE:
        return False  # named entries are limited to the mask
    ours = (0, os.geteuid())
    return any(perm & _ACL_WRITE and (tag == _ACL_USER and who not in ours or tag == _ACL_GROUP and who != 0)
               for tag, perm, who in entries)


def check_opened(fd: int, path: str, special_ok: bool = False) -> os.stat_result:
    """``fstat`` what was opened: a regular file owned by the agent's user with no other hard
    link, or (only if ``special_ok``) a FIFO or character device; else :class:`Refused`."""
    found = os.fstat(fd)
    if stat.S_ISREG(found.st_mode):
        if found.st_uid != os.geteuid():
            raise Refused(path, f"owned by uid {found.st_uid}, not the agent's ({os.geteuid()})")
        if found.st_nlink > 1:
            raise Refused(path, f"has {found.st_nlink} hard links")
    elif not (special_ok and (stat.S_ISFIFO(found.st_mode) or stat.S_ISCHR(found.st_mode))):
        raise Refused(path, "not a regular file")
    return found


def open_live(directory: int, path: str, mode: int, special_ok: bool) -> tuple[int, os.stat_result]:
    """Open the live file ``path`` (in ``directory``) to append; create it with exactly ``mode``
    if missing. Only a regular file of ours (:func:`check_opened`) unless ``special_ok``; without
    it, the open does not block (a FIFO planted there cannot stall the sink)."""
    name = os.path.basename(path)
    flags = os.O_WRONLY | os.O_APPEND | (0 if special_ok else os.O_NONBLOCK)
    created = True
    try:
        fd = open_entry(directory, name, flags | os.O_CREAT | os.O_EXCL, path, mode)
    except FileExistsError:  # also a dangling link: O_EXCL never follows one
        created = False
        fd = open_entry(directory, name, flags, path)
    try:
        opened = check_opened(fd, path, special_ok)
        if created:
            os.fchmod(fd, mode)  # exactly the configured mode, whatever the umask
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, opened


def archive_name(live_path: str, now: float | None = None) -> str:
    """A fresh archive path for ``live_path`` (same directory), unique even within a microsecond."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime(ARCHIVE_TIME_FORMAT)
    candidate = f"{live_path}.{stamp}"
    suffix = 0
    while os.path.lexists(candidate) or os.path.lexists(candidate + ".gz"):
        suffix += 1
        candidate = f"{live_path}.{stamp}-{suffix}"
    return candidate


def next_boundary(now: float, interval: float) -> float:
    """The next multiple of ``interval`` seconds since the epoch (UTC) strictly after ``now``."""
    return (math.floor(now / interval) + 1) * interval


def compress(directory: int, path: str, mode: int) -> str | None:
    """gzip the archive ``path`` (in ``directory``) to ``path.gz``, then remove ``path``; None if
    the archive is no longer there (pruned while it waited its turn, when rotations outpace
    compression, or removed by hand): nothing to compress.

    The archive must be a regular file of ours (:func:`check_opened`), opened without following
    a link. The gzip goes to ``path.gz.partial``, created afresh (``O_EXCL``; an entry already
    there, a crash's leftover or planted, is unlinked first, which never touches a link's
    target), then renamed to ``path.gz``.
    """
    name = os.path.basename(path)
    partial = name + ".gz.partial"
    try:
        source = open_entry(directory, name, os.O_RDONLY | os.O_NONBLOCK, path)
    except FileNotFoundError:
        return None
    with open(source, "rb") as reader:
        check_opened(source, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=directory)
        fd = open_entry(directory, partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                        path + ".gz.partial", mode)
        with open(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as packed:
            shutil.copyfileobj(reader, packed, 1 << 20)
    os.replace(partial, name + ".gz", src_dir_fd=directory, dst_dir_fd=directory)
    os.unlink(name, dir_fd=directory)
    return path + ".gz"


def archive_names(names: Iterable[str], live_name: str) -> list[str]:
    """The names among ``names`` of archives of ``live_name``, oldest first (by name, which is
    by time). Only names this module makes: never ``.partial``, never logrotate's ``.1``."""
    return sorted(n for n in names if n.startswith(live_name) and ARCHIVE_SUFFIX.fullmatch(n, len(live_name)))


def archives_of(live_path: str) -> list[str]:
    """Existing archives of ``live_path``, oldest first."""
    directory, live_name = os.path.split(live_path)
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in archive_names(names, live_name)]


def prune(directory: int, live_path: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` archives of ``live_path`` (in ``directory``); returns
    what was deleted. ``unlink`` only: an archive-named link goes, never what it points to; an
    archive-named directory stays."""
    live_name = os.path.basename(live_path)
    archives = archive_names(os.listdir(directory), live_name)
    doomed = archives[:-keep] if keep > 0 else archives
    for name in doomed:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(name, dir_fd=directory)
    return [os.path.join(os.path.dirname(live_path), name) for name in doomed]

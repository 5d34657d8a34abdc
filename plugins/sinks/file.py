"""The ``file`` sink: NDJSON for log shippers (Fluent Bit, Vector, rsyslog imfile, Filebeat).

Guarantees:

- One record per line; one ``write`` call per batch, through an ``O_APPEND`` descriptor, so the
  file never gets a sparse hole even when truncated under us. The write and the path's ``stat``
  run on the event loop for a regular file on a local filesystem, else in a worker thread (see
  :mod:`~memagent.plugins.sinks.file_calls`).
- Exactly once: a write that fails part-way is cut back (``ftruncate``) to where it began before
  :class:`~memagent.errors.SinkError` is raised, so the framework's retry neither duplicates nor
  leaves half a line. (Not possible on non-regular files such as ``/dev/full``.)
- Built-in rotation (``rotate_size``, ``rotate_interval`` aligned to the clock) renames the live
  file to a time-ordered archive and opens a new one between two batches: a tailer following by
  name sees every line once. ``compress`` gzips archives in a worker thread; ``keep`` prunes.
- External rotation: before each batch the path is checked. Renamed or deleted (logrotate
  ``create``) → the file at the path is (re)opened, created if missing; SIGHUP does the same.
  Truncated (logrotate ``copytruncate``) → noticed and counted; appending continues at the new end.
- Files are created with ``mode`` (default 0640, exactly, whatever the umask), missing
  directories, each level, with ``dir_mode`` (0750, less what the umask removes).
- Safe in a directory others can write (see :mod:`~memagent.plugins.sinks.file_rotation`):
  nobody who can write to the log directory can make the agent append to, create, overwrite,
  gzip, rename onto or delete a file outside it. No link at a name in the directory is ever
  followed, nor is the directory itself ever a link; temporary files are created afresh
  (``O_EXCL``); the live file and each archive to compress must be a regular file owned by the
  agent's user with one hard link (a FIFO or character device such as ``/dev/full`` only where
  nobody else can write). Every step after opening the directory is relative to its held
  descriptor. Pruning unlinks only names of this sink's archives, never a link's target. A
  refused path is one ``SinkError`` (``<path>: refusing to open: is a symbolic link``), counted
  in ``refused_paths`` and ``write_errors``, and retried like any other failure. A log directory
  that users other than root and the agent's may write is reported once (logrotate's check).
  Trusted: the directories above the log directory, and a link among them where only root and
  the agent's user can have placed it (``/var/run -> /run``); a link elsewhere is refused.
- ``fsync``: ``never`` (the kernel writes back, ~30 s), ``batch`` (each batch is on disk before the
  next is taken), ``interval`` (the default: a batch is fsynced at most ``fsync_interval`` after it
  was written, also when no further batch comes). Close always fsyncs, so on SIGTERM every record
  the agent produced is on disk before exit. A failed fsync is counted (``fsync_errors``) and
  reported once per episode, never retried as a write: the lines are already in the file, and
  writing them again would duplicate them.
- The path may use strftime fields and ``{host}``: ``/var/log/memagent/{host}-%Y-%m-%d.ndjson``
  switches file when the rendered name changes.

Not guaranteed: lines that logrotate's copytruncate loses itself, between its copy and its
truncate (the agent cannot see them go).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import stat
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import aiofiles

from memagent.contracts import Record, SinkContext, declare_counters, ndjson
from memagent.errors import ConfigError, SinkError
from memagent.options import Options
from memagent.plugins.sinks.file_calls import FileCalls
from memagent.plugins.sinks.file_rotation import (
    Refused,
    archive_name,
    compress,
    next_boundary,
    open_directory,
    open_live,
    prune,
    shared_directory,
)

FSYNC_MODES = ("never", "batch", "interval")


def parse_mode(value: Any, key: str) -> int:
    """A permission mode from an int (``0o640`` in TOML) or an octal string (``"0640"``)."""
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ConfigError(key, f'must be an octal mode like "0640", got "{value}"') from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise ConfigError(key, f'must be an octal mode like "0640", got {value!r}')
    return value


class FileSink:
    """Appends NDJSON lines to a file. See the module docstring."""

    name: ClassVar[str] = "file"
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "file"
path = "/var/log/memagent/memory.ndjson"   # strftime fields and {host} allowed
# mode = "0640"              # new files; directories get dir_mode = "0750"
# rotate_size = "100MB"      # rotate when the file would pass this size
# rotate_interval = "1h"     # rotate on the clock: at every whole hour (UTC)
# keep = 10                  # archives kept (memory.ndjson.2026-11-25T05-00-00.000000[.gz])
# compress = false           # gzip archives (in a worker thread)
# fsync = "interval"         # "never" | "batch" (each batch) | "interval" (every fsync_interval)
# fsync_interval = "1s"
"""

    def __init__(self, *, path: str, context: SinkContext, mode: int = 0o640, dir_mode: int = 0o750,
                 rotate_size: int | None = None, rotate_interval: float | None = None, keep: int = 10,
                 compress: bool = False, fsync: str = "interval", fsync_interval: float = 1.0) -> None:
        self.template, self.context = path, context
        self.mode, self.dir_mode = mode, dir_mode  # of the files and directories it creates
        self.rotate_size, self.rotate_interval = rotate_size, rotate_interval
        self.keep, self.compress = keep, compress
        self.fsync, self.fsync_interval = fsync, fsync_interval
        self.path = ""
        self._file: Any = None
        self._directory: int | None = None  # descriptor of the live file's directory, held
        self._warned: set[str] = set()  # directories reported as writable by others
        self._identity: tuple[int, int] | None = None
        self._size = 0
        self._regular = True  # False for /dev/full, a FIFO: no size, no truncation, no rotation
        self._boundary: float | None = None
        self._last_fsync = time.monotonic()
        self._dirty = False
        self._housekeeping: set[asyncio.Task[None]] = set()
        self._archiving = asyncio.Lock()  # one archive at a time: prune never races a gzip
        self._io = asyncio.Lock()  # the deferred fsync against write / reopen / close
        self._flush_task: asyncio.Task[None] | None = None
        self._fsync_failing = False
        self._open_problem: str | None = None
        self._calls = FileCalls(context.name, context.log)
        declare_counters(context.counters, "bytes_written", "rotations", "reopens", "truncations",
                         "write_errors", "fsyncs", "fsync_errors", "refused_paths")

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> FileSink:
        path = options.string("path", nonempty=True)
        try:
            path.format(host="h")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(options.key("path"), "only {host} may appear in braces") from None
        sink = cls(
            path=path,
            context=context,
            mode=parse_mode(options.raw("mode", 0o640), options.key("mode")),
            dir_mode=parse_mode(options.raw("dir_mode", 0o750), options.key("dir_mode")),
            rotate_size=options.size("rotate_size", None),
            rotate_interval=options.duration("rotate_interval", None),
            keep=options.integer("keep", 10, minimum=0),
            compress=options.boolean("compress", False),
            fsync=options.choice("fsync", FSYNC_MODES, "interval"),
            fsync_interval=options.duration("fsync_interval", 1.0),
        )
        options.finish()
        return sink

    # -- paths and opening --------------------------------------------------------------------

    def render_path(self, now: float | None = None) -> str:
        """The live path now: strftime fields (local time, as logs are named) and ``{host}``."""
        rendered = self.template
        if "%" in rendered:
            rendered = time.strftime(rendered, time.localtime(now))
        return rendered.replace("{host}", self.context.hostname)

    async def _open(self, path: str) -> None:
        """Open the directory afresh (it may have been replaced), then the file in it."""
        directory = os.path.dirname(path)
        fd = await asyncio.to_thread(open_directory, directory, self.dir_mode)
        self._forget_directory()
        self._directory = fd
        where, shared = await asyncio.to_thread(lambda: (os.fstat(fd), shared_directory(fd)))
        if shared and directory not in self._warned:
            self._warned.add(directory)
            self.context.log.warning(
                f"file sink {self.context.name}: directory {directory or '.'} is writable by others "
                f"(owner uid {where.st_uid}, mode {stat.S_IMODE(where.st_mode):04o}); memagent refuses "
                "links there but consider a directory only root can write")
        fd, opened = await asyncio.to_thread(open_live, fd, path, self.mode, not shared)
        try:
            handle = await aiofiles.open(fd, "ab", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        self._file, self.path = handle, path
        self._identity = (opened.st_dev, opened.st_ino)
        self._regular = stat.S_ISREG(opened.st_mode)
        await asyncio.to_thread(self._calls.opened, opened, path, shared=shared)
        self._size = opened.st_size
        if self._open_problem is not None:
            self.context.log.info("file sink %s: %s is writable again", self.context.name, path)
            self._open_problem = None

    def _forget_directory(self) -> None:
        if self._directory is not None:
            os.close(self._directory)
            self._directory = None

    def _explain(self, exc: OSError, path: str) -> str:
        """``<path>: <why>`` for a failure; a refused path is counted too."""
        if isinstance(exc, Refused):
            self.context.counters["refused_paths"] += 1
            return str(exc)
        return f"{path}: {exc.strerror or exc}"

    async def _close_file(self) -> None:
        handle = self._file
        if handle is not None:
            try:
                if self.fsync != "never":
                    await self._fsync()
            finally:
                self._file, self._dirty = None, False
                await handle.close()

    async def _fsync(self) -> None:
        """fsync what was written, if anything. Never raises: a failure is counted and reported
        once per episode (the data is in the file already; a retry would duplicate it)."""
        if not self._dirty or self._file is None:
            return
        try:
            await asyncio.to_thread(os.fsync, self._file.fileno())
        except OSError as exc:
            self.context.counters["fsync_errors"] += 1
            if not self._fsync_failing:
                self._fsync_failing = True
                self.context.log.warning(f"file sink {self.context.name}: fsync {self.path} failed: "
                                    f"{exc.strerror or exc}; records written may not be on disk")
            return
        finally:
            self._last_fsync = time.monotonic()
        self._dirty = False
        self.context.counters["fsyncs"] += 1
        if self._fsync_failing:
            self._fsync_failing = False
            self.context.log.info("file sink %s: fsync works again", self.context.name)

    async def _fsync_later(self) -> None:
        """``fsync = "interval"``: the last batch reaches the disk even if no batch follows."""
        await asyncio.sleep(max(0.0, self._last_fsync + self.fsync_interval - time.monotonic()))
        async with self._io:
            await self._fsync()

    async def start(self) -> None:
        """Open the file. A path that cannot be opened yet is reported, not fatal: every batch
        retries it (through the framework's backoff), and writing starts when it works."""
        if self.rotate_interval:
            self._boundary = next_boundary(time.time(), self.rotate_interval)
        path = self.render_path()
        try:
            await self._open(path)
        except OSError as exc:
            self._open_problem = self._explain(exc, path)
            self.context.log.warning(f"file sink {self.context.name}: cannot open {self._open_problem}; "
                                "records wait in its queue and the path is retried")

    # -- before each batch: is the file at the path still ours? -----------------------------------

    async def _follow_path(self) -> None:
        path = self.render_path()
        if self._file is None or path != self.path:
            if self._file is not None:
                await self._close_file()
            await self._open(path)
            return
        try:
            at_path = await self._calls.run(lambda: os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            at_path = None
        if at_path is None or (at_path.st_dev, at_path.st_ino) != self._identity:
            # renamed away (logrotate create) or deleted: the rest goes to a file at the path
            self.context.counters["reopens"] += 1
            await self._close_file()
            await self._open(path)
            return
        if self._regular and at_path.st_size < self._size:
            # truncated under us (copytruncate): O_APPEND already writes at the new end
            self.context.counters["truncations"] += 1
            self.context.log.info("file sink %s: %s was truncated (%d → %d bytes); appending at its new end",
                     self.context.name, path, self._size, at_path.st_size)
        self._size = at_path.st_size

    async def _rotate_if_due(self, incoming: int) -> None:
        now = time.time()
        by_time = self._boundary is not None and now >= self._boundary
        by_size = self.rotate_size is not None and self._size > 0 and self._size + incoming > self.rotate_size
        if self._boundary is not None and by_time:
            self._boundary = next_boundary(now, self.rotate_interval or 1.0)
        if not (by_size or (by_time and self._size > 0)):
            return
        await self._close_file()
        live, archive = self.path, archive_name(self.path, now)
        directory = os.dup(self._directory)  # type: ignore[arg-type]  # set while the file is open
        try:
            await asyncio.to_thread(os.rename, os.path.basename(live), os.path.basename(archive),
                                    src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            os.close(directory)
            raise
        self.context.counters["rotations"] += 1
        task = asyncio.create_task(self._archive(directory, live, archive))
        self._housekeeping.add(task)
        task.add_done_callback(self._housekeeping.discard)
        await self._open(live)

    async def _archive(self, directory: int, live: str, archive: str) -> None:
        """Compress and prune in the directory the archive was renamed in (its own descriptor)."""
        try:
            async with self._archiving:
                if self.compress:
                    await asyncio.to_thread(compress, directory, archive, self.mode)
                await asyncio.to_thread(prune, directory, live, self.keep)
        except OSError as exc:
            self.context.counters["archive_errors"] = self.context.counters.get("archive_errors", 0) + 1
            self.context.log.warning(f"file sink {self.context.name}: archiving failed: "
                                f"{self._explain(exc, archive)}; archives are left as they are")
        finally:
            os.close(directory)

    # -- writing ---------------------------------------------------------------------------------

    async def write(self, batch: Sequence[Record]) -> None:
        data = ndjson(batch)
        async with self._io:
            await self._write_locked(data)
        if self.fsync == "interval" and self._dirty and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.create_task(self._fsync_later(), name=f"fsync {self.context.name}")

    async def _write_locked(self, data: bytes) -> None:
        try:
            await self._follow_path()
            if self._regular and (self.rotate_size is not None or self._boundary is not None):
                await self._rotate_if_due(len(data))
            await self._write_all(data)
        except OSError as exc:
            self.context.counters["write_errors"] += 1
            await self._forget_file()
            raise SinkError(self._explain(exc, self.path or self.render_path())) from exc
        self._size += len(data)
        self.context.counters["bytes_written"] += len(data)
        self._dirty = True
        if self.fsync == "batch" or (self.fsync == "interval"
                                     and time.monotonic() - self._last_fsync >= self.fsync_interval):
            await self._fsync()

    async def _write_all(self, data: bytes) -> None:
        """One write call for the batch (more only if the kernel takes part of it); on failure the
        partial tail is cut off so the retry writes the whole batch exactly once."""
        handle = self._file
        fd = handle.fileno()
        view = memoryview(data)
        try:
            while view:
                written = await self._calls.run(functools.partial(os.write, fd, view))
                if not written:
                    raise OSError(errno.EIO, "write returned 0")
                view = view[written:]
        except OSError:
            if len(view) < len(data):
                # O_APPEND put our partial bytes last, wherever the end was (even if copytruncate
                # moved it meanwhile): cut exactly them. Only ever shrinks, so never a sparse hole.
                # Not possible on a non-regular file (/dev/full), nor if the disk refuses even that.
                with contextlib.suppress(OSError):
                    end = os.fstat(handle.fileno()).st_size
                    if end >= len(data) - len(view):
                        os.ftruncate(handle.fileno(), end - (len(data) - len(view)))
            raise

    async def _forget_file(self) -> None:
        """Drop the descriptor after an error so the retry reopens the path (it may be fixed);
        what was written before the error is fsynced first, as far as the disk allows."""
        handle = self._file
        if handle is not None:
            if self.fsync != "never":
                await self._fsync()
            self._file, self._dirty = None, False
            with contextlib.suppress(OSError):
                await handle.close()

    async def reopen(self) -> None:
        """SIGHUP: close and reopen the path (logrotate's postrotate). If the path cannot be
        opened now, SinkError says why and the next write tries again."""
        async with self._io:
            self.context.counters["reopens"] += 1
            await self._close_file()
            path = self.render_path()
            try:
                await self._open(path)
            except OSError as exc:
                raise SinkError(self._explain(exc, path)) from exc

    async def close(self) -> None:
        """fsync and close; wait for compression of the last archive."""
        if self._flush_task is not None:
            self._flush_task.cancel()
            await asyncio.gather(self._flush_task, return_exceptions=True)
        try:
            async with self._io:
                try:
                    await self._close_file()
                finally:
                    self._forget_directory()
        finally:
            if self._housekeeping:
                await asyncio.gather(*self._housekeeping, return_exceptions=True)

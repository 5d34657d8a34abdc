"""The ``linux`` backend: native procfs, the numbers psutil's ``memory_info()`` reports, fast.

What it reads (``procfs`` defaults to ``/proc``; ``"/host/proc"`` lets a container watch its host,
and tests point it at fixture trees):

- ``<pid>/statm`` × page size → ``rss``, ``vms`` and the platform fields ``shared``, ``text``,
  ``lib``, ``data``, ``dirty``, exactly as psutil computes them. One fd per process stays open
  and is re-read with ``os.pread(fd, n, 0)``; a read on a reaped process fails with ESRCH, which
  is how an exit is seen. The fd is opened only after ``<pid>/stat`` confirms the start time of
  the identity, so a pid reused between listing and sampling is never misattributed.
- ``full = true``: ``<pid>/smaps_rollup`` (``smaps`` where the kernel has no rollup) →
  ``uss`` (sum of ``Private_*``), ``pss``, ``swap``; kB × 1024. Reading it needs ptrace access
  (root or the process's user): when denied, the sample still goes out without ``full`` and one
  ``error`` record says why.
- Zombies and kernel threads read zeros, as with psutil.

procfs contents are input like any other: every read is bounded in bytes (a command line is
kept to :data:`~memagent.contracts.CMDLINE_MAX_BYTES`, ``smaps`` is summed as it streams), and a
malformed file is never a crash. At build time a malformed ``stat`` is a
:class:`~memagent.errors.ConfigError` (``memagent check`` exits 2 with one line); while running,
a process whose files cannot be parsed is left out of the listing, counted in
``counters["malformed"]`` (published under ``backend`` in ``agent`` records) and reported once
per episode.

Open fds are budgeted: RLIMIT_NOFILE's soft limit is raised as far as the hard limit allows, and
at most ``max_open_fds`` are kept (default: :func:`default_fd_budget`, the limit less a reserve
of :data:`FD_RESERVE` for sinks and clients, or half the limit when it is small); past that,
processes are read with open/read/close — slower, still correct.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import resource
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

from memagent.contracts import (
    CMDLINE_MAX_BYTES,
    Failure,
    Gone,
    Identity,
    ProcessInfo,
    Reading,
    SampleResult,
)
from memagent.errors import ConfigError
from memagent.options import Options

log = logging.getLogger(__name__)

PLATFORM_FIELDS = ("shared", "text", "lib", "data", "dirty")
FD_RESERVE = 1024  # fds left for sinks, WebSocket clients, logs: the agent's own needs come first
_GONE_ERRNOS = (errno.ESRCH, errno.ENOENT)
_STATM_BYTES = 128  # 7 numbers; a 64-bit statm line is at most ~140 chars, the kernel gives < 100
# read bounds for the other procfs files, each far above what a kernel writes
_STAT_BYTES = 4096  # <pid>/stat: comm is at most 64 bytes, 52 numbers
_STATUS_BYTES = 4096  # <pid>/status: the Uid line comes within the first ~400 bytes
_CGROUP_BYTES = 64 * 1024  # <pid>/cgroup: one line per v1 hierarchy, each a path
_BOOT_STAT_BYTES = 1 << 20  # /proc/stat: one line per cpu before btime; 1 MiB is ~10,000 cpus
_ROLLUP_BYTES = 64 * 1024  # smaps_rollup: about 20 lines


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit if allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def default_fd_budget(limit: int) -> int:
    """How many statm fds to hold under an RLIMIT_NOFILE soft limit of ``limit``: all but
    :data:`FD_RESERVE`, or half of a small limit (1,024 where the hard limit cannot be raised)."""
    return max(limit - FD_RESERVE, limit // 2)


def parse_stat(text: str) -> tuple[str, int, int]:
    """(comm, ppid, starttime ticks) from a ``/proc/<pid>/stat`` line. The comm may contain
    spaces and parentheses, so fields are counted from the last ``)``."""
    open_paren, close_paren = text.index("("), text.rindex(")")
    fields = text[close_paren + 2:].split()
    # fields[0] is field 3 (state): ppid is field 4, starttime field 22
    return text[open_paren + 1:close_paren], int(fields[1]), int(fields[19])


def parse_rollup(data: bytes) -> dict[str, int]:
    """uss / pss / swap in bytes from smaps_rollup (or smaps: the same lines, per mapping)."""
    totals = [0, 0, 0]
    _add_rollup_lines(totals, data.split(b"\n"))
    return _rollup(totals)


def _add_rollup_lines(totals: list[int], lines: list[bytes]) -> None:
    for line in lines:
        if line.startswith(b"Private_"):
            totals[0] += int(line.split()[1])
        elif line.startswith(b"Pss:"):
            totals[1] += int(line.split()[1])
        elif line.startswith(b"Swap:"):
            totals[2] += int(line.split()[1])


def _rollup(totals: list[int]) -> dict[str, int]:
    return {"uss": totals[0] * 1024, "pss": totals[1] * 1024, "swap": totals[2] * 1024}


def sum_smaps(path: str) -> dict[str, int]:
    """:func:`parse_rollup` of a whole ``smaps`` file, summed as it streams: memory stays bounded
    however many mappings the process has (``smaps`` can be tens of megabytes)."""
    totals = [0, 0, 0]
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        rest = b""
        while chunk := os.read(fd, 65536):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            if len(rest) > 65536:
                raise ValueError(f"{path}: a line longer than 64 KiB")
            _add_rollup_lines(totals, lines)
        _add_rollup_lines(totals, [rest])
    finally:
        os.close(fd)
    return _rollup(totals)


def pick_cgroup(text: str) -> str | None:
    """The one cgroup path a ``cgroup`` selector matches, from ``/proc/<pid>/cgroup``.

    cgroup v2 (``0::<path>``) when it places the process below the root. Otherwise (cgroup v1,
    or a hybrid host whose v2 line is a bare ``/`` while v1 hierarchies hold the real placement)
    the v1 ``memory`` controller's path, the one that accounts this process's memory; then
    ``name=systemd``'s; then whatever path there is. ``None`` for an empty file.
    """
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths.setdefault(controller, parts[2])
    unified = paths.get("")
    if unified is not None and unified != "/":
        return unified
    for controller in ("memory", "name=systemd"):
        if controller in paths:
            return paths[controller]
    return unified if unified is not None else next(iter(paths.values()), None)


def read_bounded(path: str, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of a procfs file, and whether it holds more."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 65536))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return data[:limit], len(data) > limit


def split_cmdline(data: bytes) -> tuple[str, ...]:
    """``/proc/<pid>/cmdline`` bytes (NUL-separated) → arguments; a cut last one is kept."""
    return tuple(a for a in data.decode("utf-8", "replace").split("\0") if a)


class LinuxBackend:
    """Samples processes from procfs. See the module docstring."""

    name: ClassVar[str] = "linux"
    os: ClassVar[str] = "linux"
    platform_fields: ClassVar[tuple[str, ...]] = PLATFORM_FIELDS

    def __init__(self, procfs: str = "/proc", max_open_fds: int | None = None) -> None:
        self.procfs = procfs.rstrip("/") or "/"
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.boot_time = self._boot_time()
        if max_open_fds is None:
            max_open_fds = default_fd_budget(raise_fd_limit())
        self.max_open_fds = max_open_fds
        self._fds: dict[Identity, int] = {}
        self._details: dict[Identity, ProcessInfo] = {}
        self._users: dict[int, str] = {}
        self.counters = {"malformed": 0}
        self._malformed_episode = False

    @classmethod
    def available(cls) -> bool:
        return sys.platform.startswith("linux") and os.path.exists("/proc/self/statm")

    @classmethod
    def from_options(cls, options: Options) -> LinuxBackend:
        procfs = options.string("procfs", "/proc", nonempty=True)
        max_open_fds = options.integer("max_open_fds", None, minimum=0)
        options.finish()
        if not os.path.isfile(os.path.join(procfs, "stat")):
            raise ConfigError(options.key("procfs"), f'"{procfs}" is not a procfs (no {procfs}/stat)')
        return cls(procfs, max_open_fds)

    def _boot_time(self) -> float:
        path = f"{self.procfs}/stat"
        try:
            data, _ = read_bounded(path, _BOOT_STAT_BYTES)
        except OSError as exc:
            raise ConfigError("backends.linux.procfs", f"cannot read {path}: {exc.strerror or exc}") from None
        for line in data.split(b"\n"):
            if line.startswith(b"btime"):
                value = line[5:].strip()
                if not value.isdigit():
                    shown = value[:40].decode("ascii", "replace")
                    raise ConfigError("backends.linux.procfs", f"{path}: btime is not a number of seconds "
                                                               f"(got {shown!r}); is this a procfs?")
                return float(value)
        raise ConfigError("backends.linux.procfs", f"{path} has no btime line")

    # -- listing ---------------------------------------------------------------------------

    def _read(self, pid: int, name: str, limit: int) -> str:
        return read_bounded(f"{self.procfs}/{pid}/{name}", limit)[0].decode("utf-8", "replace")

    def _identity(self, pid: int) -> tuple[Identity, str, int]:
        comm, ppid, start_ticks = parse_stat(self._read(pid, "stat", _STAT_BYTES))
        return (pid, self.boot_time + start_ticks / self.ticks), comm, ppid

    def _user(self, pid: int) -> str | None:
        for line in self._read(pid, "status", _STATUS_BYTES).splitlines():
            if line.startswith("Uid:"):
                fields = line.split()
                if len(fields) < 2 or not fields[1].isdigit():
                    return None
                uid = int(fields[1])
                if uid not in self._users:
                    try:
                        self._users[uid] = pwd.getpwuid(uid).pw_name
                    except KeyError:
                        self._users[uid] = str(uid)
                return self._users[uid]
        return None

    def _cgroup(self, pid: int) -> str | None:
        try:
            return pick_cgroup(self._read(pid, "cgroup", _CGROUP_BYTES))
        except OSError:
            return None

    def _describe(self, identity: Identity, comm: str, ppid: int) -> ProcessInfo:
        pid = identity[0]
        try:
            data, truncated = read_bounded(f"{self.procfs}/{pid}/cmdline", CMDLINE_MAX_BYTES)
            cmdline = split_cmdline(data)
        except OSError:
            cmdline, truncated = (), False
        try:
            exe: str | None = os.readlink(f"{self.procfs}/{pid}/exe")
        except OSError:
            exe = None
        name = comm
        if len(comm) >= 15 and cmdline:  # comm is cut at 15 chars; psutil uses the full name then
            base = os.path.basename(cmdline[0])
            if base.startswith(comm):
                name = base
        try:
            user = self._user(pid)
        except OSError:
            user = None
        return ProcessInfo(pid=pid, ppid=ppid, name=name, started=identity[1], cmdline=cmdline,
                           exe=exe, user=user, cgroup=self._cgroup(pid), cmdline_truncated=truncated)

    def list_processes(self) -> list[ProcessInfo]:
        processes = []
        details: dict[Identity, ProcessInfo] = {}
        malformed: list[str] = []
        with os.scandir(self.procfs) as entries:
            pids = [int(e.name) for e in entries if e.name.isdigit()]
        for pid in pids:
            try:
                identity, comm, ppid = self._identity(pid)
                info = self._details.get(identity)
                if info is None:
                    info = self._describe(identity, comm, ppid)
                elif info.ppid != ppid:  # reparented (its parent exited)
                    info = replace(info, ppid=ppid)
            except OSError:
                continue  # vanished while listing, or unreadable: not listed
            except (ValueError, IndexError):
                malformed.append(f"{self.procfs}/{pid}/stat")  # not listed, but not silently
                continue
            details[identity] = info
            processes.append(info)
        self._details = details
        self._count_malformed(malformed)
        return processes

    def _count_malformed(self, paths: list[str]) -> None:
        """Count unparsable files; one warning per episode (listings in a row that find some)."""
        self.counters["malformed"] += len(paths)
        if paths and not self._malformed_episode:
            log.warning("linux backend: %d procfs file(s) could not be parsed, e.g. %s; those processes "
                        "are not watched (counted as backend.malformed)", len(paths), paths[0])
        elif not paths and self._malformed_episode:
            log.info("linux backend: every procfs file parses again")
        self._malformed_episode = bool(paths)

    # -- sampling --------------------------------------------------------------------------

    def _open_statm(self, identity: Identity) -> int:
        """An fd on the identity's statm; raises ProcessLookupError if the pid is someone else."""
        pid = identity[0]
        fd = os.open(f"{self.procfs}/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if self._identity(pid)[0] != identity:
                raise ProcessLookupError(errno.ESRCH, "pid reused")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _statm(self, identity: Identity) -> bytes:
        fd = self._fds.get(identity)
        if fd is not None:
            return os.pread(fd, _STATM_BYTES, 0)
        fd = self._open_statm(identity)
        if len(self._fds) < self.max_open_fds:
            self._fds[identity] = fd
            return os.pread(fd, _STATM_BYTES, 0)
        try:
            return os.pread(fd, _STATM_BYTES, 0)
        finally:
            os.close(fd)

    def _full(self, pid: int) -> dict[str, int]:
        """uss/pss/swap from smaps_rollup, or from smaps where this process has no rollup
        (kernels before 4.14). The fallback is per process, never a global switch."""
        try:
            data, _ = read_bounded(f"{self.procfs}/{pid}/smaps_rollup", _ROLLUP_BYTES)
            return parse_rollup(data)
        except FileNotFoundError:
            if not os.path.isdir(f"{self.procfs}/{pid}"):
                raise
        return sum_smaps(f"{self.procfs}/{pid}/smaps")

    def sample(self, processes: Sequence[Identity], full: bool) -> list[SampleResult]:
        results: list[SampleResult] = []
        page = self.page_size
        for identity in processes:
            pid, started = identity
            try:
                size, resident, shared, text, lib, data, dirty = map(int, self._statm(identity).split()[:7])
            except OSError as exc:
                self.forget(identity)
                if isinstance(exc, ProcessLookupError) or exc.errno in _GONE_ERRNOS:
                    results.append(Gone(pid, started))
                elif isinstance(exc, PermissionError):
                    results.append(Failure(pid, started, "access_denied", f"statm: {exc.strerror}"))
                else:
                    results.append(Failure(pid, started, "read_error", f"statm: {exc.strerror or exc}"))
                continue
            except ValueError:
                self.forget(identity)
                results.append(Failure(pid, started, "read_error", "statm: malformed"))
                continue
            platform = {"shared": shared * page, "text": text * page, "lib": lib * page,
                        "data": data * page, "dirty": dirty * page}
            portable = {"rss": resident * page, "vms": size * page}
            if not full:
                results.append(Reading(pid, started, portable, platform))
                continue
            if size == 0:  # kernel thread or zombie: no address space, smaps fails with ESRCH
                results.append(Reading(pid, started, portable, platform, {"uss": 0, "pss": 0, "swap": 0}))
                continue
            try:
                results.append(Reading(pid, started, portable, platform, self._full(pid)))
            except PermissionError as exc:
                problem = (("full_denied", f"{exc.filename or 'smaps_rollup'}: {exc.strerror}; "
                            "uss/pss/swap need ptrace access (root, or the process's own user)"),)
                results.append(Reading(pid, started, portable, platform, None, problem))
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    self.forget(identity)
                    results.append(Gone(pid, started))
                else:
                    problem = (("full_unreadable", f"{exc.filename or 'smaps'}: {exc.strerror or exc}"),)
                    results.append(Reading(pid, started, portable, platform, None, problem))
            except (ValueError, IndexError):
                problem = (("full_unreadable", f"pid {pid}: smaps_rollup/smaps malformed"),)
                results.append(Reading(pid, started, portable, platform, None, problem))
        return results

    def forget(self, identity: Identity) -> None:
        fd = self._fds.pop(identity, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for identity in list(self._fds):
            self.forget(identity)

    @property
    def open_fds(self) -> int:
        """How many statm fds are held now."""
        return len(self._fds)

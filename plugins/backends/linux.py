"""The ``linux`` backend: native procfs, the numbers psutil's ``memory_info()`` reports, fast.

What it reads (``procfs`` defaults to ``/proc``; ``"/host/proc"`` lets a container watch its host,
and tests point it at fixture trees):

- ``<pid>/statm`` × page size → ``rss``, ``vms`` and the platform fields ``shared``, ``text``,
  ``lib``, ``data``, ``dirty``, exactly as psutil computes them. One fd per process stays open
  and is re-read with ``os.pread(fd, n, 0)``; a read on a reaped process fails with ESRCH, which
  is how an exit is seen. The fd is opened only after ``<pid>/stat`` confirms the start time of
  the identity, so a pid reused between listing and sampling is never misattributed. When the
  bytes read are those of the last sample, that sample's Reading is returned again.
- ``full = true``: ``<pid>/smaps_rollup`` (``smaps`` where the kernel has no rollup) →
  ``uss`` (sum of ``Private_*``), ``pss``, ``swap``; kB × 1024. Its fd is held too, opened with
  the same identity check and re-read from offset 0 each tick. A held ``smaps_rollup`` fd reads
  the address space it was opened on, so after an ``exec`` it fails with ESRCH although the
  process lives: it is then reopened once, and only a failing reopen means the process is gone.
  Reading it needs ptrace access (root or the process's user): when denied, the sample still
  goes out without ``full`` and one ``error`` record says why. ``smaps`` is opened, summed and
  closed on every read.
- ``extra`` (fields beyond the seed's ``portable``/``platform``, see :class:`Reading`):
  ``rss_anon`` = statm's resident − shared (the kernel's own definition: shared is file + shmem
  pages) and ``rss_share`` = rss / ``MemTotal`` (``<procfs>/meminfo``, read at most once a
  second) cost nothing more; with ``status = true`` (the default) ``<pid>/status`` gives
  ``peak_rss`` (``VmHWM``, at least the rss read with it) and ``RssShmem`` (``rss_file`` is
  shared − shmem, so the three parts always sum to ``rss``). ``status`` is read through a held
  fd in the same pass, only when statm changed (its numbers cannot have moved otherwise, but for
  a peak between two ticks) and at least every :data:`STATUS_EVERY` samples; a process read
  without held fds (past the fd budget) has no status fields.
- Zombies and kernel threads read zeros, as with psutil.
- cgroups (``cgroupfs``, default ``/sys/fs/cgroup``; ``""`` reads none) and why a process
  exited (``kmsg``, default ``/dev/kmsg``): :mod:`.linux_cgroups` and :mod:`.linux_oom`. A
  listed process's ``memory_cgroup`` and ``container`` come from its ``cgroup`` file, read once.

Listing is incremental: a rescan costs a directory listing and a set difference, plus work for
what changed. ``os.scandir`` gives each ``<pid>`` entry's inode number without a system call of
its own, and procfs gives every process instance a directory inode of its own (checked on Linux
6.18: a pid forced to be reused gets a new one). An entry listed with the inode it had last time
is the same process: its cached :class:`~memagent.contracts.ProcessInfo` is kept, nothing read.
``<pid>/stat`` (one bounded read) is read for a new entry or a changed inode (pid reused, or the
entry only evicted and recreated: the start time decides); for each process whose parent's entry
went or changed (the parent exited: the process was reparented); and for the pids equal to the
listing's number modulo :data:`RESTAT_EVERY`, so that every process is read again at least once
in that many listings. That bound covers what an inode cannot show: a parent that exited but is
not yet reaped (a zombie) keeps its entry, so its children's new ``ppid`` shows when it is reaped
or within :data:`RESTAT_EVERY` listings. A new process costs that one ``stat`` read: it is
listed ``described=False``, and its details (``cmdline``, ``exe``, ``status``, ``cgroup``) are
read once, by :meth:`LinuxBackend.describe`, only if a target may watch it (the backend is
:class:`~memagent.contracts.Describing`). Fixture trees must follow procfs: a process replaced in a
test is a new directory (a new inode), not a ``stat`` rewritten in place.

procfs contents are input like any other: every read is bounded in bytes (a command line is
kept to :data:`~memagent.contracts.CMDLINE_MAX_BYTES`, ``smaps`` is summed as it streams), and a
malformed file is never a crash. At build time a malformed ``stat`` is a
:class:`~memagent.errors.ConfigError` (``memagent check`` exits 2 with one line); while running,
a process whose files cannot be parsed is left out of the listing, counted in
``counters["malformed"]`` (published under ``backend`` in ``agent`` records) and reported once
per episode.

Open fds are budgeted: RLIMIT_NOFILE's soft limit is raised as far as the hard limit allows, and
at most ``max_open_fds`` (``statm`` and ``smaps_rollup`` together) are kept (default:
:func:`default_fd_budget`, the limit less a reserve of :data:`FD_RESERVE` for sinks and clients,
or half the limit when it is small); past that, processes are read with open/read/close —
slower, still correct.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

from memagent.contracts import (
    CMDLINE_MAX_BYTES,
    CgroupStats,
    Container,
    Failure,
    Gone,
    Identity,
    MemoryCgroup,
    ProcessInfo,
    Reading,
    SampleResult,
)
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.backends.linux_cgroups import (
    CgroupReader,
    container_of,
    controller_paths,
    memory_cgroup,
)
from memagent.plugins.backends.linux_oom import KernelLog, OomWitness, in_initial_pid_namespace
from memagent.plugins.backends.malformed import MalformedFiles

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
_ROLLUP_BYTES = 64 * 1024  # smaps_rollup: about 25 lines, under 1 KiB
_MEMINFO_BYTES = 16 * 1024  # /proc/meminfo: MemTotal is its first line
#: A process described younger than this (seconds) is described again at later listings: one
#: listed between its fork and its exec showed its parent's command line and exe.
SETTLED_AFTER = 2.0
#: An unchanged statm's Reading is reused, but ``<pid>/status`` is read again at least every this
#: many samples of a process, for a peak (``VmHWM``) reached and left between two ticks: 1/64 of
#: a status read per process and tick at rest.
STATUS_EVERY = 64
# the d_ino procfs's readdir reports for an entry it could not instantiate (proc_fill_cache):
# the same for every such entry, so it says nothing about which process is there: such an
# entry is kept as _UNTRUSTED, which no inode equals
_UNKNOWN_INODE = 1
_UNTRUSTED = -1
#: Each listing re-reads ``<pid>/stat`` of the cached processes whose pid is the listing's number
#: modulo this: every process at least once in this many listings (about 2 minutes at the default
#: 2 s rescan), for 1/64 of a ``stat`` read (~0.2 µs) per process and listing.
RESTAT_EVERY = 64


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
    paths = controller_paths(text)
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


def read_once(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a procfs file that the kernel makes in one piece (``stat``: a
    single ``seq_file`` show), in one ``read``: one system call fewer than :func:`read_bounded`,
    for the file every new process costs. A longer file is cut (its parse then fails loudly)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def parse_meminfo(data: bytes) -> int:
    """``MemTotal`` in bytes from ``/proc/meminfo``; ValueError if it has none or it is no number."""
    start = data.find(b"MemTotal:")
    if start < 0:
        raise ValueError("no MemTotal line")
    return int(data[start + 9:].split(None, 1)[0]) * 1024


def parse_status(data: bytes) -> tuple[int | None, int | None]:
    """(``VmHWM``, ``RssShmem``) in kB from ``/proc/<pid>/status``; None for a line it lacks
    (kernel threads have neither; RssShmem came with Linux 4.5). ValueError if one is not a
    number."""
    found: list[int | None] = []
    for key in (b"\nVmHWM:", b"\nRssShmem:"):
        start = data.find(key)
        if start < 0:
            found.append(None)
            continue
        end = data.find(b"\n", start + 1)
        found.append(int(data[start + len(key):end if end > 0 else len(data)].split()[0]))
    return found[0], found[1]


def _numeric_order(name: str) -> tuple[int, str]:
    """Sort key putting pid names in numeric order, as procfs lists them."""
    return len(name), name


def split_cmdline(data: bytes) -> tuple[str, ...]:
    """``/proc/<pid>/cmdline`` bytes (NUL-separated) → arguments; a cut last one is kept."""
    return tuple(a for a in data.decode("utf-8", "replace").split("\0") if a)


class _HeldStatm:
    """A held ``statm`` fd, the bytes it read last and the :class:`Reading` made of them; the
    held ``status`` fd (:data:`_NOT_HELD` until opened, :data:`_UNREADABLE` if it cannot be) and
    how many samples reused the Reading since status was read."""

    __slots__ = ("fd", "quiet", "raw", "reading", "status")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.raw: bytes | None = None
        self.reading: Reading | None = None
        self.status = _NOT_HELD
        self.quiet = 0


_NOT_HELD = -1
_UNREADABLE = -2


class LinuxBackend:
    """Samples processes from procfs. See the module docstring."""

    name: ClassVar[str] = "linux"
    os: ClassVar[str] = "linux"
    platform_fields: ClassVar[tuple[str, ...]] = PLATFORM_FIELDS

    def __init__(self, procfs: str = "/proc", max_open_fds: int | None = None, *,
                 open_now: bool = True, cgroupfs: str = "/sys/fs/cgroup", kmsg: str = "/dev/kmsg",
                 status: bool = True) -> None:
        self.procfs = procfs.rstrip("/") or "/"
        self.cgroupfs = cgroupfs
        self.kmsg = kmsg
        self.status = status
        self.cgroups: CgroupReader | None = None
        self.oom = OomWitness(None, None, 0.0)
        self._mem_total = 0  # bytes; 0: unknown
        self._mem_total_at = -1.0
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.boot_time = 0.0
        self._fd_budget = max_open_fds
        self.max_open_fds = max_open_fds or 0
        self._opened = False
        # sample()'s state: the held statm and smaps_rollup fds
        self._statm: dict[Identity, _HeldStatm] = {}
        self._status_fds = 0  # status fds held, in _statm's entries
        self._rollups: dict[Identity, int] = {}
        # list_processes()'s state (it may run in a thread while sample() runs on the loop), as
        # of the last listing: each entry's inode (processes and the rest: self, sys, stat...),
        # each process's info, and the processes by pid % RESTAT_EVERY, all keyed by name
        self._inodes: dict[str, int] = {}
        self._known: dict[str, ProcessInfo] = {}
        self._listing: list[ProcessInfo] | None = None  # list(_known.values()) until _known changes
        self._young: dict[str, ProcessInfo] = {}  # the last description of each process not yet settled
        self._turns: list[set[str]] = [set() for _ in range(RESTAT_EVERY)]
        self._listings = 0
        self._users: dict[int, str] = {}
        self.counters = {"malformed": 0}
        self._malformed = MalformedFiles(self.counters, log, "procfs", "those processes are not watched")
        if open_now:
            self.open()

    def open(self) -> None:
        """Check the procfs root and read its boot time; raise the fd limit. ConfigError (one line
        naming ``backends.linux.procfs``) if it is not a procfs. Idempotent; listing opens first
        if nobody did. ``memagent check`` calls it only to warn: a container's config may name a
        ``/host/proc`` that exists only where it runs."""
        if self._opened:
            return
        if not os.path.isfile(os.path.join(self.procfs, "stat")):
            raise ConfigError("backends.linux.procfs",
                              f'"{self.procfs}" is not a procfs (no {self.procfs}/stat)')
        self.boot_time = self._boot_time()
        if self._fd_budget is None:
            self.max_open_fds = default_fd_budget(raise_fd_limit())
        self._open_insight()
        self._opened = True

    def _open_insight(self) -> None:
        """The cgroupfs and the kernel log, where there are (neither is required: without them
        there are no ``cgroup`` records, and OOM kills are seen by fewer witnesses)."""
        if self.cgroupfs:
            if os.path.isdir(self.cgroupfs):
                self.cgroups = CgroupReader(self.cgroupfs, self._may_hold, self.counters)
            else:
                log.warning("linux backend: no cgroupfs at %s (backends.linux.cgroupfs): no cgroup "
                            "records", self.cgroupfs)
        kernel_log = None
        if self.kmsg:
            if not in_initial_pid_namespace(self.procfs):
                log.info("linux backend: %s is not the initial pid namespace's procfs, whose pids the "
                         "kernel log uses: OOM kills are read from cgroup counters only", self.procfs)
            else:
                try:
                    kernel_log = KernelLog(self.kmsg, self.counters)
                except OSError as exc:
                    log.info("linux backend: cannot read the kernel log %s (%s): OOM kills are read "
                             "from cgroup counters only", self.kmsg, exc.strerror or exc)
        self.oom = OomWitness(kernel_log, self.cgroups, self.boot_time)

    @classmethod
    def available(cls) -> bool:
        return sys.platform.startswith("linux") and os.path.exists("/proc/self/statm")

    @classmethod
    def from_options(cls, options: Options) -> LinuxBackend:
        procfs = options.string("procfs", "/proc", nonempty=True)
        max_open_fds = options.integer("max_open_fds", None, minimum=0)
        cgroupfs = options.string("cgroupfs", "/sys/fs/cgroup")
        kmsg = options.string("kmsg", "/dev/kmsg")
        status = options.boolean("status", True)
        options.finish()
        return cls(procfs, max_open_fds, open_now=False,  # no I/O here: see open()
                   cgroupfs=cgroupfs, kmsg=kmsg, status=status)

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
        text = read_once(f"{self.procfs}/{pid}/stat", _STAT_BYTES).decode("utf-8", "replace")
        comm, ppid, start_ticks = parse_stat(text)
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

    def _cgroup(self, pid: int) -> tuple[str | None, MemoryCgroup | None, Container | None]:
        """From ``<pid>/cgroup``: the selector's path, the memory cgroup, the container."""
        try:
            text = self._read(pid, "cgroup", _CGROUP_BYTES)
        except OSError:
            return None, None, None
        paths = controller_paths(text)
        memory = memory_cgroup(paths) if self.cgroups is not None else None  # no cgroupfs: not asked
        return pick_cgroup(text), memory, container_of(paths)

    def describe(self, process: ProcessInfo) -> ProcessInfo | None:
        """``process`` with its command line, exe, user and cgroups read (see
        :class:`~memagent.contracts.Describing`); kept for later listings once the process is
        :data:`SETTLED_AFTER` seconds old (a younger one may not have exec'd yet: listed between
        its fork and its exec, it shows its parent's command line, so it is described again at
        each listing until then; one exiting meanwhile, whose command line and exe are gone,
        keeps its last description). None if its pid is gone or is another process now."""
        name = str(process.pid)
        try:
            identity, comm, ppid = self._identity(process.pid)
        except (OSError, ValueError, IndexError):
            return None
        if identity != process.identity:
            return None
        described = self._describe(identity, comm, ppid)
        earlier = self._young.get(name)
        if earlier is not None and earlier.identity == identity and not (described.cmdline or described.exe):
            described = earlier  # exiting (a zombie has neither): it keeps what it was
        if self._known.get(name) is not process:
            return described
        if time.time() - process.started >= SETTLED_AFTER:
            self._known[name] = described
            self._listing = None
            self._young.pop(name, None)
        else:
            self._young[name] = described
        return described

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
        cgroup, memory, container = self._cgroup(pid)
        return ProcessInfo(pid=pid, ppid=ppid, name=name, started=identity[1], cmdline=cmdline,
                           exe=exe, user=user, cgroup=cgroup, cmdline_truncated=truncated,
                           memory_cgroup=memory, container=container)

    def list_processes(self) -> list[ProcessInfo]:
        """Every process now, reading only what may have changed (see the module docstring)."""
        if not self._opened:
            self.open()
        with os.scandir(self.procfs) as entries:
            inodes = {entry.name: entry.inode() for entry in entries}
        last, known = self._inodes, self._known
        changed: set[str] = set()
        if inodes != last:  # (equal, the common case at rest: nothing came, went or changed)
            exited = last.keys() - inodes.keys()
            for name in exited:
                self._drop(name)
            # new pids, reused pids, entries evicted and recreated
            changed = {name for name, _ in inodes.items() - last.items()}
            # a process whose parent's entry went or changed (exited, maybe replaced) was reparented
            parents = {int(name) for name in exited | changed if name.isdigit()}
            if parents:
                changed.update(name for name, info in known.items() if info.ppid in parents)
        self._listings += 1
        changed |= self._turns[self._listings % RESTAT_EVERY]
        malformed: list[str] = []
        for name in sorted(changed, key=_numeric_order):
            if not name.isdigit():
                last[name] = inodes[name]  # not a process
                continue
            pid = int(name)
            try:
                identity, comm, ppid = self._identity(pid)
                info = known.get(name)
                if info is not None and info.started == identity[1]:
                    if info.ppid != ppid:  # reparented (its parent exited)
                        info = replace(info, ppid=ppid)
                else:  # new: one bounded read (stat) now, the rest when a target may watch it
                    info = ProcessInfo(pid=pid, ppid=ppid, name=comm, started=identity[1], described=False)
            except OSError:
                self._drop(name)  # vanished while listing, or unreadable: not listed
                continue
            except (ValueError, IndexError):
                self._drop(name)
                malformed.append(f"{self.procfs}/{pid}/stat")  # not listed, but not silently
                continue
            if name not in known:
                self._turns[pid % RESTAT_EVERY].add(name)
            if known.get(name) is not info:
                known[name] = info
                self._listing = None
            inode = inodes[name]
            last[name] = _UNTRUSTED if inode == _UNKNOWN_INODE else inode
        self._malformed.note(malformed)
        if self._listing is None:
            self._listing = list(known.values())
        return self._listing  # the very list while nothing changed (see Backend.list_processes)

    def _drop(self, name: str) -> None:
        """Forget a listing entry: its next listing reads it afresh."""
        self._inodes.pop(name, None)
        self._young.pop(name, None)
        if self._known.pop(name, None) is not None:
            self._turns[int(name) % RESTAT_EVERY].discard(name)
            self._listing = None

    # -- sampling --------------------------------------------------------------------------

    def _open_checked(self, identity: Identity, name: str) -> int:
        """An fd on the identity's ``name``; raises ProcessLookupError if the pid is someone else."""
        pid = identity[0]
        fd = os.open(f"{self.procfs}/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if self._identity(pid)[0] != identity:
                raise ProcessLookupError(errno.ESRCH, "pid reused")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _may_hold(self) -> bool:
        return self.open_fds < self.max_open_fds

    def _read_statm(self, identity: Identity) -> tuple[bytes, _HeldStatm | None]:
        """statm of a process whose fd is not held: open it (identity checked), read it, and
        hold the fd if the budget allows (else close it)."""
        fd = self._open_checked(identity, "statm")
        if not self._may_hold():
            try:
                return os.pread(fd, _STATM_BYTES, 0), None
            finally:
                os.close(fd)
        held = self._statm[identity] = _HeldStatm(fd)
        return os.pread(fd, _STATM_BYTES, 0), held

    def _full(self, identity: Identity) -> dict[str, int]:
        """uss/pss/swap from smaps_rollup, or from smaps where this process has no rollup
        (kernels before 4.14). The fallback is per process, never a global switch."""
        fd = self._rollups.get(identity)
        if fd is not None:
            try:
                return parse_rollup(os.pread(fd, _ROLLUP_BYTES, 0))
            except ProcessLookupError:  # exec'd (the fd reads the old address space), or exited
                del self._rollups[identity]
                os.close(fd)
        try:
            fd = self._open_checked(identity, "smaps_rollup")
        except FileNotFoundError:
            if not os.path.isdir(f"{self.procfs}/{identity[0]}"):
                raise
            return sum_smaps(f"{self.procfs}/{identity[0]}/smaps")
        if self._may_hold():
            self._rollups[identity] = fd
            return parse_rollup(os.pread(fd, _ROLLUP_BYTES, 0))
        try:
            return parse_rollup(os.pread(fd, _ROLLUP_BYTES, 0))
        finally:
            os.close(fd)

    def sample(self, processes: Sequence[Identity], full: bool) -> list[SampleResult]:
        """One result per identity. A process whose ``statm`` reads the same bytes as at its
        last sample gets that sample's :class:`Reading` (with ``full`` read anew when asked for)
        again: nothing parsed or built, so treat a Reading and its dicts as read-only."""
        if not self._opened:
            self.open()
        mem_total = self._each_second()
        results: list[SampleResult] = []
        append = results.append
        held_statm = self._statm.get
        pread = os.pread
        page = self.page_size
        for identity in processes:
            held = held_statm(identity)
            try:
                if held is None:
                    raw, held = self._read_statm(identity)
                else:
                    raw = pread(held.fd, _STATM_BYTES, 0)
                    reading = held.reading
                    if raw == held.raw and reading is not None:  # unchanged (most processes, at rest)
                        if held.quiet < STATUS_EVERY:
                            held.quiet += 1
                        else:  # status again, for a peak reached and left between two ticks
                            reading = self._refreshed(identity, held, reading)
                        append(self._with_full(identity, reading) if full else reading)
                        continue
                size, resident, shared, text, lib, data, dirty = map(int, raw.split()[:7])
            except OSError as exc:
                append(self._statm_failure(identity, exc))
                continue
            except (ValueError, IndexError):  # statm, or the stat that confirms the identity
                self.forget(identity)
                append(Failure(*identity, "read_error", "statm: malformed"))
                continue
            pid, started = identity  # Reading(*identity, ...) would cost a tuple and a slower call
            rss = resident * page
            extra: dict[str, int | float] = {"rss_anon": (resident - shared) * page}
            if held is not None and self.status:
                self._add_status(identity, held, extra, rss, shared * page)
            if mem_total:
                extra["rss_share"] = round(rss / mem_total, 6)
            reading = Reading(pid, started, {"rss": rss, "vms": size * page},
                              {"shared": shared * page, "text": text * page, "lib": lib * page,
                               "data": data * page, "dirty": dirty * page}, None, (), extra)
            if held is not None:
                held.raw, held.reading = raw, reading
            append(self._with_full(identity, reading) if full else reading)
        return results

    def _each_second(self) -> int:
        """At most once a second: read the kernel log (so it never falls far behind) and
        ``MemTotal``, which moves with memory hotplug or a balloon driver (then every held
        Reading is rebuilt, for its ``rss_share``). Returns MemTotal in bytes (0: unknown)."""
        now = time.monotonic()
        if now - self._mem_total_at < 1.0:
            return self._mem_total
        self._mem_total_at = now
        self.oom.tick()
        try:
            total = parse_meminfo(read_bounded(f"{self.procfs}/meminfo", _MEMINFO_BYTES)[0])
        except OSError:
            total = 0
        except ValueError:
            total = 0
            self.counters["malformed"] += 1
        if total != self._mem_total:
            self._mem_total = total
            for held in self._statm.values():
                held.reading = None
        return total

    def _add_status(self, identity: Identity, held: _HeldStatm, extra: dict[str, int | float],
                    rss: int, shared: int) -> None:
        """``rss_file``, ``rss_shmem`` and ``peak_rss`` from the process's held status fd (opened
        on first use, within the fd budget), into ``extra``; nothing if it cannot be read."""
        held.quiet = 0
        fd = held.status
        if fd == _UNREADABLE or (fd == _NOT_HELD and not self._may_hold()):
            return
        try:
            if fd == _NOT_HELD:
                fd = held.status = self._open_checked(identity, "status")
                self._status_fds += 1
            peak, shmem = parse_status(os.pread(fd, _STATUS_BYTES, 0))
        except (OSError, ValueError, IndexError) as exc:
            if not isinstance(exc, OSError):
                self.counters["malformed"] += 1  # once: the fd is not read again
            self._drop_status(held)
            held.status = _UNREADABLE
            return
        if shmem is not None:
            shmem = min(shmem * 1024, shared)
            extra["rss_file"] = shared - shmem
            extra["rss_shmem"] = shmem
        if peak is not None:
            extra["peak_rss"] = max(peak * 1024, rss)  # the peak is at least what was just read

    def _refreshed(self, identity: Identity, held: _HeldStatm, reading: Reading) -> Reading:
        """``reading`` (statm unchanged) with status read again: the same object if nothing moved."""
        held.quiet = 0
        if not self.status or held.status == _UNREADABLE or reading.extra is None:
            return reading
        extra = dict(reading.extra)
        self._add_status(identity, held, extra, reading.portable["rss"], reading.platform["shared"])
        if extra == reading.extra:
            return reading
        held.reading = reading = reading._replace(extra=extra)
        return reading

    def _drop_status(self, held: _HeldStatm) -> None:
        if held.status >= 0:
            os.close(held.status)
            self._status_fds -= 1
        held.status = _NOT_HELD

    def _statm_failure(self, identity: Identity, exc: OSError) -> SampleResult:
        self.forget(identity)
        if isinstance(exc, ProcessLookupError) or exc.errno in _GONE_ERRNOS:
            return Gone(*identity)
        if isinstance(exc, PermissionError):
            return Failure(*identity, "access_denied", f"statm: {exc.strerror}")
        return Failure(*identity, "read_error", f"statm: {exc.strerror or exc}")

    def _with_full(self, identity: Identity, reading: Reading) -> SampleResult:
        """``reading`` (made from statm) with uss/pss/swap added, or a problem saying why not."""
        pid, started = identity
        portable, platform, extra = reading.portable, reading.platform, reading.extra
        if portable["vms"] == 0:  # kernel thread or zombie: no address space, smaps fails with ESRCH
            return Reading(pid, started, portable, platform, {"uss": 0, "pss": 0, "swap": 0}, (), extra)
        try:
            return Reading(pid, started, portable, platform, self._full(identity), (), extra)
        except PermissionError as exc:
            problem = (("full_denied", f"{exc.filename or 'smaps_rollup'}: {exc.strerror}; "
                        "uss/pss/swap need ptrace access (root, or the process's own user)"),)
            return Reading(pid, started, portable, platform, None, problem, extra)
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                self.forget(identity)
                return Gone(pid, started)
            problem = (("full_unreadable", f"{exc.filename or 'smaps'}: {exc.strerror or exc}"),)
            return Reading(pid, started, portable, platform, None, problem, extra)
        except (ValueError, IndexError):
            problem = (("full_unreadable", f"pid {pid}: smaps_rollup/smaps malformed"),)
            return Reading(pid, started, portable, platform, None, problem, extra)

    def forget(self, identity: Identity) -> None:
        held = self._statm.pop(identity, None)
        if held is not None:
            os.close(held.fd)
            self._drop_status(held)
        fd = self._rollups.pop(identity, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for identity in [*self._statm, *self._rollups]:
            self.forget(identity)
        if self.cgroups is not None:
            self.cgroups.close()
        self.oom.close()

    @property
    def open_fds(self) -> int:
        """How many fds are held now (statm, status, smaps_rollup and cgroup files)."""
        cgroups = self.cgroups.held_fds if self.cgroups is not None else 0
        return len(self._statm) + self._status_fds + len(self._rollups) + cgroups

    # -- cgroups and exits (optional capabilities: CgroupReading, ExitExplaining) ---------------

    def read_cgroups(self, cgroups: Sequence[MemoryCgroup]) -> dict[MemoryCgroup, CgroupStats]:
        """Each cgroup's memory numbers (:mod:`.linux_cgroups`); none without a cgroupfs."""
        if not self._opened:
            self.open()
        return self.cgroups.read(cgroups) if self.cgroups is not None else {}

    def exit_reason(self, process: ProcessInfo) -> str | None:
        """``oom_kill`` when the kernel's OOM killer ended ``process`` (:mod:`.linux_oom`)."""
        return self.oom.exit_reason(process)

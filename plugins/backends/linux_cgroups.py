"""cgroups for the ``linux`` backend: which cgroup holds a process's memory, which container it
is, and that cgroup's memory numbers, read once per cgroup per tick.

From ``/proc/<pid>/cgroup`` (read once per process, when it is listed):

- :func:`memory_cgroup`: the cgroup that accounts the process's memory — the v1 ``memory``
  controller's line where there is one (cgroup v1 and hybrid hosts), else the unified ``0::``
  line (cgroup v2). None for the root cgroup (the whole machine: ``/proc/meminfo`` tells that)
  and for a path this agent cannot place (outside its cgroup namespace: ``/../..``).
- :func:`container_of`: the container the paths name. Docker (``/docker/<id>``,
  ``docker-<id>.scope``), containerd (``cri-containerd-<id>.scope``, ``nerdctl-<id>.scope``),
  CRI-O (``crio-<id>[.scope]``), Podman (``libpod-<id>[.scope]``), and Kubernetes pods
  (``kubepods…/pod<uid>`` with either cgroup driver) with their QoS class. A bare 64-hex
  component is a container whose runtime the path does not name (Kubernetes' cgroupfs driver
  with containerd or dockershim). Monitors (``crio-conmon-``, ``libpod-conmon-``) are not
  containers. Nested containers (docker in docker) give the innermost.

From the cgroupfs (``[backends.linux] cgroupfs``, default ``/sys/fs/cgroup``; ``/host/sys/fs/cgroup``
in a container watching its host, a fixture tree in tests), :class:`CgroupReader` reads, under
the same names on both versions:

============== ============================ ===================================================
field          cgroup v2                    cgroup v1 (memory controller)
============== ============================ ===================================================
current        memory.current               memory.usage_in_bytes
max            memory.max (``max``: null)   memory.limit_in_bytes (≥ 2^62, unlimited: null)
effective_max  the lowest ``max`` of the cgroup and its ancestors (null: none is limited)
high           memory.high (``max``: null)  —
peak           memory.peak (Linux 5.19+)    memory.max_usage_in_bytes
swap           memory.swap.current          —
events.oom     memory.events ``oom``        —
events.oom_kill memory.events ``oom_kill``  memory.oom_control ``oom_kill`` (Linux 4.13+)
events.high    memory.events ``high``       —
events.max     memory.events ``max``        memory.failcnt (charges that hit the limit)
============== ============================ ===================================================

A field whose file is absent (no swap accounting, an older kernel) is omitted, never faked.
Files are opened without following a link, read with a bounded ``pread``, and their fds held
between ticks within the backend's fd budget (a removed cgroup's fd reads ENODEV: the path is
then opened again once, for a cgroup recreated under the same name, else the cgroup is gone and
left out). A file that does not parse is counted in the backend's ``malformed`` counter, warned
about once per episode, and its field omitted. Cgroups not read for :data:`IDLE_AFTER` seconds
have their fds closed.

The ``oom_kill`` counters also serve :mod:`.linux_oom` as the fallback witness of OOM kills:
:meth:`CgroupReader.claim_oom_kill`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

from memagent.contracts import CgroupStats, Container, MemoryCgroup
from memagent.plugins.backends.malformed import MalformedFiles

log = logging.getLogger(__name__)

#: A v1 limit at or above this is "unlimited": the kernel writes PAGE_COUNTER_MAX pages there
#: (9223372036854771712 with 4 KiB pages), and no machine has 4 EiB of memory.
V1_UNLIMITED = 1 << 62
#: Seconds after which a cgroup no read asked for has its fds closed (it may come back: a slow
#: target's cgroup is then opened again, slower but correct).
IDLE_AFTER = 300.0
#: Seconds an increase of a cgroup's ``oom_kill`` counter may explain an exit in it (the
#: fallback witness, used when the kernel log cannot be read): an exit is seen by a sample or a
#: rescan within seconds of the kill; a later one is not blamed on it.
OOM_CLAIM_WINDOW = 30.0
_NUMBER_BYTES = 64  # one decimal number and a newline: 21 bytes at most
_TABLE_BYTES = 4096  # memory.events (6 lines) or memory.oom_control (3 lines): ~100 bytes
_GONE = (errno.ENODEV, errno.ENOENT, errno.ESRCH)

_CONTAINER = re.compile(r"^(docker|cri-containerd|crio|libpod|nerdctl)-([0-9a-f]{64})(?:\.scope)?$")
_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "nerdctl": "containerd",
             "crio": "cri-o", "libpod": "podman"}
_BARE_ID = re.compile(r"^[0-9a-f]{64}$")
# kubelet's pod cgroup: pod<uid> (cgroupfs driver, uid with dashes), kubepods[-<qos>]-pod<uid>.slice
# (systemd driver, dashes escaped as underscores); a static pod's uid is a 32-hex config hash
_POD = re.compile(r"^(?:.*-)?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
                  r"|[0-9a-f]{32})(?:\.slice)?$")

# the files of each version: field -> file name
_V2_NUMBERS = {"current": "memory.current", "max": "memory.max", "high": "memory.high",
               "peak": "memory.peak", "swap": "memory.swap.current"}
_V1_NUMBERS = {"current": "memory.usage_in_bytes", "max": "memory.limit_in_bytes",
               "peak": "memory.max_usage_in_bytes"}
_V2_EVENTS = ("oom", "oom_kill", "high", "max")
_LIMIT_FILE = {1: "memory.limit_in_bytes", 2: "memory.max"}
_OOM_FILE = {1: "memory.oom_control", 2: "memory.events"}
_ABSENT = -1  # a held-fd slot for a file this cgroup does not have
_T = TypeVar("_T")


def controller_paths(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` → {controller: path}; the unified hierarchy's controller is ``""``.
    The first line naming a controller wins; lines that are not ``id:controllers:path`` are
    skipped."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths.setdefault(controller, parts[2])
    return paths


def _placeable(path: str) -> bool:
    """A path this agent can look up under its cgroupfs: absolute, below the root, and with no
    ``..`` (a path outside the agent's cgroup namespace) nor empty or ``.`` component."""
    parts = path.split("/")
    return parts[0] == "" and "" not in parts[1:] and "." not in parts and ".." not in parts


def memory_cgroup(paths: dict[str, str]) -> MemoryCgroup | None:
    """The cgroup accounting a process's memory, from :func:`controller_paths` (see the module
    docstring); None in the root cgroup or where the path cannot be placed."""
    if "memory" in paths:
        version, path = 1, paths["memory"]
    elif "" in paths:
        version, path = 2, paths[""]
    else:
        return None
    return MemoryCgroup(version, path) if _placeable(path) else None


def parse_container(path: str) -> Container | None:
    """The container (and Kubernetes pod) one cgroup path names, or None (module docstring)."""
    if len(path) < 64 and "kubepods" not in path:
        return None  # the common case, a service or a session: no id fits, no pod
    runtime: str | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    qos: str | None = None
    kubepods = False
    parent = ""
    for part in path.split("/"):
        if len(part) >= 64:
            if match := _CONTAINER.match(part):
                runtime, container_id = _RUNTIMES[match.group(1)], match.group(2)
            elif _BARE_ID.match(part):
                runtime, container_id = ("docker" if parent == "docker" else None), part
        if "kubepods" in part:
            kubepods = True
        if kubepods and pod_uid is None:
            if qos is None:
                qos = "burstable" if "burstable" in part else "besteffort" if "besteffort" in part else None
            if "pod" in part and (pod := _POD.match(part)):
                pod_uid = pod.group(1).replace("_", "-")
                qos = qos or "guaranteed"  # kubelet puts guaranteed pods right under kubepods
        parent = part
    if container_id is None and pod_uid is None:
        return None
    return Container(runtime=runtime, id=container_id, pod_uid=pod_uid, qos=qos if pod_uid else None)


def container_of(paths: dict[str, str]) -> Container | None:
    """The container a process's cgroup paths name: the memory controller's path first, then
    the unified one, then systemd's, then any (a v1 hybrid host may place a container in v1
    hierarchies only, its unified line still the runtime's shim)."""
    order = [paths.get("memory"), paths.get(""), paths.get("name=systemd"), *paths.values()]
    seen: set[str] = set()
    for path in order:
        if path is None or path in seen:
            continue
        seen.add(path)
        if (found := parse_container(path)) is not None:
            return found
    return None


def _number(data: bytes, unlimited_word: bool) -> int | None:
    """A cgroup file's one number; None for ``max`` (v2's unlimited) where that is allowed.
    ValueError when it is neither."""
    text = data.strip()
    if unlimited_word and text == b"max":
        return None
    if not text.isdigit():
        raise ValueError(text[:40])
    return int(text)


_ORDER = ("version", "current", "max", "effective_max", "high", "peak", "swap", "events")


def _in_order(stats: CgroupStats, effective_max: int | None) -> CgroupStats:
    """``stats`` with ``effective_max``, its fields in the order they read best."""
    stats["effective_max"] = effective_max
    return {name: stats[name] for name in _ORDER if name in stats}


def _table(data: bytes) -> dict[str, int]:
    """``key value`` lines (memory.events, memory.oom_control) → {key: value}. ValueError for a
    line that is not a key and a number."""
    table = {}
    for line in data.split(b"\n"):
        if not line:
            continue
        key, _, value = line.partition(b" ")
        if not value.strip().isdigit():
            raise ValueError(line[:40])
        table[key.decode("ascii", "replace")] = int(value)
    return table


class _Held:
    """The held fds of one cgroup (file name → fd, or :data:`_ABSENT`) and when it was last read."""

    __slots__ = ("directory", "fds", "read_at")

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.fds: dict[str, int] = {}
        self.read_at = 0.0


class _Removed(Exception):
    """The cgroup's directory is gone."""


class CgroupReader:
    """Reads cgroups' memory numbers (module docstring). ``may_hold()`` says whether the
    backend's fd budget allows one more held fd; ``counters`` is the backend's (``malformed``).
    Used on the event loop only."""

    def __init__(self, root: str, may_hold: Callable[[], bool], counters: dict[str, int]) -> None:
        self.root = root.rstrip("/") or "/"
        self._may_hold = may_hold
        self._counters = counters
        self._held: dict[MemoryCgroup, _Held] = {}
        self.held_fds = 0
        self._pruned_at = time.monotonic()
        self._malformed = MalformedFiles(counters, log, "cgroup", "their fields are left out")
        # the v2 hierarchy: at the root (a v2 host), or at unified/ (a hybrid host)
        unified = os.path.join(self.root, "unified")
        hybrid = (not os.path.exists(os.path.join(self.root, "cgroup.controllers"))
                  and os.path.exists(os.path.join(unified, "cgroup.controllers")))
        self._v2_root = unified if hybrid else self.root
        # the oom_kill counters last seen per cgroup, and when each increase was seen
        self._oom_seen: dict[MemoryCgroup, int] = {}
        self._oom_unclaimed: dict[MemoryCgroup, deque[float]] = {}

    def directory(self, cgroup: MemoryCgroup) -> str:
        """The cgroup's directory under the cgroupfs root."""
        if cgroup.version == 1:
            return f"{self.root}/memory{cgroup.path}"
        return f"{self._v2_root}{cgroup.path}"

    # -- reading files ------------------------------------------------------------------------

    def _read(self, held: _Held, name: str, limit: int) -> bytes | None:
        """The bytes of one file of a held cgroup; None if the cgroup has no such file.
        Raises _Removed when the cgroup is gone."""
        fd = held.fds.get(name)
        if fd == _ABSENT:
            return None
        if fd is not None:
            try:
                return os.pread(fd, limit, 0)
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
                raise _Removed from None
        try:
            fd = os.open(f"{held.directory}/{name}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not os.path.isdir(held.directory):
                raise _Removed from None
            held.fds[name] = _ABSENT
            return None
        try:
            data = os.pread(fd, limit, 0)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _GONE:
                raise _Removed from None
            raise
        if self._may_hold():
            held.fds[name] = fd
            self.held_fds += 1
        else:
            os.close(fd)
        return data

    def _release(self, cgroup: MemoryCgroup) -> None:
        held = self._held.pop(cgroup, None)
        if held is not None:
            for fd in held.fds.values():
                if fd >= 0:
                    os.close(fd)
                    self.held_fds -= 1

    def _held_for(self, cgroup: MemoryCgroup) -> _Held:
        held = self._held.get(cgroup)
        if held is None:
            held = self._held[cgroup] = _Held(self.directory(cgroup))
        return held

    def _with_retry(self, cgroup: MemoryCgroup, read: Callable[[_Held], _T]) -> tuple[_T] | None:
        """``(read(held),)`` on the cgroup's held fds; once more on fresh fds if the cgroup was
        removed (it may have been recreated under its name); None if it is gone. The cgroup
        counts as read now (see :data:`IDLE_AFTER`)."""
        for _ in range(2):
            fresh = cgroup not in self._held
            held = self._held_for(cgroup)
            try:
                result = (read(held),)
                held.read_at = time.monotonic()
                return result
            except _Removed:
                self._release(cgroup)
                if fresh:
                    return None  # nothing held was stale: it is not there
            except OSError as exc:  # EACCES, EIO: left out, like an unreadable procfs file
                self._release(cgroup)
                log.debug("linux backend: cgroup %s unreadable: %s", held.directory, exc)
                return None
        return None

    # -- one tick -----------------------------------------------------------------------------

    def read(self, cgroups: Sequence[MemoryCgroup]) -> dict[MemoryCgroup, CgroupStats]:
        """The numbers of each of ``cgroups`` that exists (module docstring), each read once;
        ancestors' limits (for ``effective_max``) read once per call."""
        now = time.monotonic()
        if now - self._pruned_at > IDLE_AFTER / 5:
            self._prune(now)
        problems: list[str] = []
        limits: dict[MemoryCgroup, int | None] = {}
        found: dict[MemoryCgroup, CgroupStats] = {}
        for cgroup in cgroups:
            if cgroup in found:
                continue
            got = self._with_retry(cgroup, functools.partial(self._stats, cgroup, problems=problems))
            if got is None:
                continue
            stats = got[0]
            limits[cgroup] = stats.get("max")
            ancestors = self._ancestor_limits(cgroup, limits, problems)
            effective = [limit for limit in (stats.get("max"), *ancestors) if limit is not None]
            stats = _in_order(stats, min(effective) if effective else None)
            oom_kill = stats.get("events", {}).get("oom_kill")
            if oom_kill is not None:
                self._saw_oom_kills(cgroup, oom_kill, now)
            found[cgroup] = stats
        self._malformed.note(problems)
        return found

    def _stats(self, cgroup: MemoryCgroup, held: _Held, *, problems: list[str]) -> CgroupStats:
        stats: CgroupStats = {"version": cgroup.version}
        v2 = cgroup.version == 2
        for field, name in (_V2_NUMBERS if v2 else _V1_NUMBERS).items():
            data = self._read(held, name, _NUMBER_BYTES)
            if data is None:
                continue
            try:
                value = _number(data, unlimited_word=v2 and field in ("max", "high"))
            except ValueError:
                problems.append(f"{held.directory}/{name}")
                continue
            if not v2 and field == "max" and value is not None and value >= V1_UNLIMITED:
                value = None
            stats[field] = value
        if "current" not in stats and "max" not in stats:
            raise _Removed  # not a memory cgroup here (a fixture or mount that lacks it)
        events: dict[str, int] = {}
        try:
            if v2:
                if (data := self._read(held, "memory.events", _TABLE_BYTES)) is not None:
                    table = _table(data)
                    events = {name: table[name] for name in _V2_EVENTS if name in table}
            else:
                if (data := self._read(held, "memory.failcnt", _NUMBER_BYTES)) is not None:
                    failcnt = _number(data, unlimited_word=False)
                    assert failcnt is not None
                    events["max"] = failcnt
                if (data := self._read(held, "memory.oom_control", _TABLE_BYTES)) is not None:
                    table = _table(data)
                    if "oom_kill" in table:
                        events["oom_kill"] = table["oom_kill"]
        except ValueError:
            names = "memory.events" if v2 else "memory.failcnt or memory.oom_control"
            problems.append(f"{held.directory}/{names}")
        if events:
            stats["events"] = events
        return stats

    def _ancestor_limits(self, cgroup: MemoryCgroup, limits: dict[MemoryCgroup, int | None],
                         problems: list[str]) -> list[int | None]:
        """The limits of the cgroup's ancestors below the hierarchy's root, each read once per
        :meth:`read` (``limits`` caches them)."""
        found: list[int | None] = []
        path = cgroup.path
        while (path := path.rsplit("/", 1)[0]) != "":
            ancestor = MemoryCgroup(cgroup.version, path)
            if ancestor not in limits:
                limits[ancestor] = self._limit(ancestor, problems)
            found.append(limits[ancestor])
        return found

    def _limit(self, cgroup: MemoryCgroup, problems: list[str]) -> int | None:
        name = _LIMIT_FILE[cgroup.version]
        got = self._with_retry(cgroup, lambda held: self._read(held, name, _NUMBER_BYTES))
        if got is None or got[0] is None:
            return None
        try:
            value = _number(got[0], unlimited_word=cgroup.version == 2)
        except ValueError:
            problems.append(f"{self.directory(cgroup)}/{name}")
            return None
        return None if value is None or value >= V1_UNLIMITED else value

    def _prune(self, now: float) -> None:
        self._pruned_at = now
        for cgroup in [c for c, held in self._held.items() if now - held.read_at > IDLE_AFTER]:
            self._release(cgroup)
            self._oom_seen.pop(cgroup, None)
            self._oom_unclaimed.pop(cgroup, None)

    # -- the oom_kill counter as a witness -----------------------------------------------------

    def _saw_oom_kills(self, cgroup: MemoryCgroup, count: int, now: float) -> None:
        last = self._oom_seen.get(cgroup)
        self._oom_seen[cgroup] = count
        if last is not None and count > last:
            unclaimed = self._oom_unclaimed.setdefault(cgroup, deque(maxlen=64))
            unclaimed.extend([now] * min(count - last, 64))

    def claim_oom_kill(self, cgroup: MemoryCgroup) -> bool:
        """Whether the cgroup's ``oom_kill`` counter rose (since a read before this one) within
        :data:`OOM_CLAIM_WINDOW` seconds by a kill not yet claimed: then this claims one. Reads
        the counter now. A cgroup never read before has no baseline: False. The counter says a
        process of the cgroup was killed, not which one."""
        now = time.monotonic()
        name = _OOM_FILE[cgroup.version]
        if cgroup in self._oom_seen:
            got = self._with_retry(cgroup, lambda held: self._read(held, name, _TABLE_BYTES))
            if got is not None and got[0] is not None:
                try:
                    count = _table(got[0]).get("oom_kill")
                except ValueError:
                    count = None
                if count is not None:
                    self._saw_oom_kills(cgroup, count, now)
        unclaimed = self._oom_unclaimed.get(cgroup)
        while unclaimed and now - unclaimed[0] > OOM_CLAIM_WINDOW:
            unclaimed.popleft()
        if unclaimed:
            unclaimed.popleft()
            return True
        return False

    def close(self) -> None:
        for cgroup in list(self._held):
            self._release(cgroup)

"""Why a process exited, for the ``linux`` backend: was it the kernel's OOM killer?

Two witnesses, the first that can answer decides:

1. **The kernel log** (``[backends.linux] kmsg``, default ``/dev/kmsg``). When the OOM killer
   (a cgroup's or the whole machine's) kills, the kernel logs ``Killed process <pid> (<comm>)``
   — not rate-limited, unlike the memory dump before it. :class:`KernelLog` reads the log without
   blocking, from where it stood when the agent started, keeps the pids killed and when, and
   only believes kernel messages (facility 0: a process writing to ``/dev/kmsg`` is logged as
   ``user``, whatever it claims). It names exactly the process killed. It is used only when
   the procfs the backend reads is the initial pid namespace's, whose pids the log uses
   (``<procfs>/1/ns/pid`` is ``pid:[4026531836]``): in a container with its own pid namespace
   the log's pids would name other processes. Reading it needs ``CAP_SYSLOG`` where
   ``kernel.dmesg_restrict = 1`` (root has it); containers rarely have ``/dev/kmsg``.
2. **The cgroup's ``oom_kill`` counter** (:meth:`~.linux_cgroups.CgroupReader.claim_oom_kill`),
   when the log is not readable or lost records lately (the kernel overwrote them before they
   were read: counted in ``kmsg_lost``). Works wherever the cgroupfs is mounted, but says that
   *a* process of the cgroup was killed, not which: an exit in the same cgroup within
   :data:`~.linux_cgroups.OOM_CLAIM_WINDOW` of a kill it does not explain is blamed on it, and
   a cgroup removed before its counter was read (a container whose only process was killed)
   hides its kill.

A kill is matched to a process by pid and time: it must have happened after the process started
(the log's clock stops during suspend, boot time does not: the difference is added back).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict

from memagent.contracts import Identity, ProcessInfo
from memagent.plugins.backends.linux_cgroups import CgroupReader

log = logging.getLogger(__name__)

#: ``readlink /proc/1/ns/pid`` in the initial pid namespace (the kernel's PROC_PID_INIT_INO).
INIT_PID_NAMESPACE = "pid:[4026531836]"
#: Kills remembered (by pid), and verdicts (by identity): bounded, the oldest forgotten first.
REMEMBERED = 4096
#: Records read from the log per drain at most, so a flood cannot hold the event loop.
DRAIN_RECORDS = 4096
#: Seconds after lost log records during which the cgroup counters are consulted as well.
GAP_DISTRUST = 600.0
_RECORD_BYTES = 8192  # /dev/kmsg returns one record per read; the kernel caps one at 1 KiB of text
_KILLED = re.compile(rb"Killed process (\d+) \(")
_SLACK = 1.0  # seconds: start times are in clock ticks, and the two clocks are read apart


def in_initial_pid_namespace(procfs: str) -> bool:
    """Whether ``procfs`` shows the initial pid namespace (the one the kernel log's pids use):
    its pid 1's namespace is the initial one; or, where pid 1's is not readable (it may be
    non-dumpable), the agent's own namespace is the initial one and the procfs is its own (the
    agent has one pid there, ``NSpid`` lists one: a procfs of an ancestor namespace lists more)."""
    try:
        return os.readlink(f"{procfs}/1/ns/pid") == INIT_PID_NAMESPACE
    except OSError:
        pass
    try:
        if os.readlink(f"{procfs}/self/ns/pid") != INIT_PID_NAMESPACE:
            return False
        with open(f"{procfs}/self/status", "rb") as status:
            lines = status.read(_RECORD_BYTES).split(b"\n")
    except OSError:
        return False
    nspid = [line.split()[1:] for line in lines if line.startswith(b"NSpid:")]
    return len(nspid) == 1 and len(nspid[0]) == 1


def _suspended() -> float:
    """Seconds the machine has spent suspended since boot (boot time minus monotonic time)."""
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - time.clock_gettime(time.CLOCK_MONOTONIC))


class KernelLog:
    """OOM kills read from ``/dev/kmsg`` (or a file in its format, for tests), without blocking.
    Raises OSError from the constructor when it cannot be opened."""

    def __init__(self, path: str, counters: dict[str, int]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.lseek(self._fd, 0, os.SEEK_END)  # kills before the agent started are not ours to explain
        except OSError:
            os.close(self._fd)
            raise
        self._counters = counters
        counters.setdefault("kmsg_lost", 0)
        self._rest = b""
        self.kills: OrderedDict[int, float] = OrderedDict()  # pid -> when, s since boot (boot clock)
        self.gap_at: float | None = None  # monotonic time records were last lost

    def drain(self) -> None:
        """Read what the kernel logged since the last drain (at most :data:`DRAIN_RECORDS`)."""
        suspended = _suspended()
        for _ in range(DRAIN_RECORDS):
            try:
                data = os.read(self._fd, _RECORD_BYTES)
            except BlockingIOError:
                return
            except BrokenPipeError:  # EPIPE: the kernel overwrote records before we read them
                self._counters["kmsg_lost"] += 1
                self.gap_at = time.monotonic()
                continue
            if not data:  # a regular file at its end (tests); /dev/kmsg says EAGAIN instead
                return
            lines = (self._rest + data).split(b"\n")
            self._rest = lines.pop()[-_RECORD_BYTES:]  # a record cut by a file read: its end comes next
            for line in lines:
                self._record(line, suspended)

    def _record(self, line: bytes, suspended: float) -> None:
        """One ``priority,sequence,microseconds,flags;message`` record."""
        prefix, _, message = line.partition(b";")
        fields = prefix.split(b",")
        if len(fields) < 3 or not fields[0].isdigit() or not fields[2].isdigit():
            return  # a continuation line (" KEY=value"), or not a record
        if int(fields[0]) >> 3 != 0:
            return  # not the kernel's (facility 0): userspace cannot log as the kernel
        killed = _KILLED.search(message)
        if killed is None:
            return
        pid = int(killed.group(1))
        self.kills.pop(pid, None)
        self.kills[pid] = int(fields[2]) / 1e6 + suspended
        while len(self.kills) > REMEMBERED:
            self.kills.popitem(last=False)

    def killed(self, pid: int, started_since_boot: float) -> bool:
        """Whether the log says ``pid`` was killed after ``started_since_boot``."""
        when = self.kills.get(pid)
        return when is not None and when >= started_since_boot - _SLACK

    @property
    def trusted(self) -> bool:
        """No records lost in the last :data:`GAP_DISTRUST` seconds."""
        return self.gap_at is None or time.monotonic() - self.gap_at > GAP_DISTRUST

    def close(self) -> None:
        os.close(self._fd)


class OomWitness:
    """Decides ``exit_reason`` from the kernel log and/or the cgroup counters (module docstring).
    The same process always gets the same answer (several targets may ask)."""

    def __init__(self, kmsg: KernelLog | None, cgroups: CgroupReader | None, boot_time: float) -> None:
        self.kmsg = kmsg
        self.cgroups = cgroups
        self.boot_time = boot_time
        self._verdicts: OrderedDict[Identity, str | None] = OrderedDict()

    def tick(self) -> None:
        """Read the kernel log (once per tick, so that it never falls far behind)."""
        if self.kmsg is not None:
            self.kmsg.drain()

    def exit_reason(self, process: ProcessInfo) -> str | None:
        identity = process.identity
        if identity in self._verdicts:
            return self._verdicts[identity]
        verdict: str | None = None
        kmsg = self.kmsg
        if kmsg is not None:
            kmsg.drain()
            if kmsg.killed(process.pid, process.started - self.boot_time):
                verdict = "oom_kill"
        if verdict is None and (kmsg is None or not kmsg.trusted) and self.cgroups is not None \
                and process.memory_cgroup is not None and self.cgroups.claim_oom_kill(process.memory_cgroup):
            verdict = "oom_kill"
        self._verdicts[identity] = verdict
        while len(self._verdicts) > REMEMBERED:
            self._verdicts.popitem(last=False)
        return verdict

    def close(self) -> None:
        if self.kmsg is not None:
            self.kmsg.close()

"""Fixture procfs trees for the linux backend: the static one in tests/data/proc, a builder for
variants (``procfs = <tmp>/proc``) and changes to them as procfs makes them, a way to run a check
as an unprivileged user, and a way to make the kernel reuse a pid. Also the static cgroupfs tree
(tests/data/cgroup), real-world ``/proc/<pid>/cgroup`` contents, and kernel log records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memagent.contracts import ProcessInfo
from memagent.plugins.backends.linux import LinuxBackend

BTIME = 1_700_000_000
CLK_TCK = 100


@dataclass
class FakeProc:
    """One process directory. ``statm`` in pages; ``rollup`` None means no smaps_rollup file."""

    pid: int
    comm: str = "worker"
    ppid: int = 1
    start_ticks: int = 500
    statm: tuple[int, ...] = (2000, 500, 100, 10, 0, 300, 0)
    cmdline: tuple[str, ...] = ("/usr/bin/worker", "--serve")
    uid: int = 0
    cgroup: str = "0::/system.slice/worker.service"
    rollup: str | None = ("Rss: 2000 kB\nPss: 1500 kB\nPrivate_Clean: 100 kB\n"
                          "Private_Dirty: 900 kB\nPrivate_Hugetlb: 0 kB\nSwap: 64 kB\n")
    smaps: str | None = None
    hwm_kb: int | None = None  # status's VmHWM line, when set
    shmem_kb: int | None = None  # status's RssShmem line, when set


def build_procfs(root: Path, processes: list[FakeProc], *, mem_total_kb: int | None = None,
                 initial_pid_namespace: bool = False) -> Path:
    """Write ``root/proc`` with a ``stat`` (btime) and one directory per process; a ``meminfo``
    with ``MemTotal`` when given; ``1/ns/pid`` naming the initial pid namespace when asked (the
    linux backend then believes the kernel log's pids)."""
    proc = root / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "stat").write_text(f"cpu  1 2 3 4\nbtime {BTIME}\nprocesses 99\n")
    if mem_total_kb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       {mem_total_kb} kB\nMemFree:        1 kB\n")
    for p in processes:
        d = proc / str(p.pid)
        d.mkdir()
        write_process(d, p)
    if initial_pid_namespace:
        (proc / "1" / "ns").mkdir(parents=True)
        (proc / "1" / "ns" / "pid").symlink_to("pid:[4026531836]")
    return proc


def write_process(d: Path, p: FakeProc) -> None:
    """The files of one process directory."""
    write_stat(d, p)
    (d / "statm").write_text(" ".join(str(v) for v in p.statm) + "\n")
    (d / "cmdline").write_text("\0".join(p.cmdline) + ("\0" if p.cmdline else ""))
    write_status(d, p)
    (d / "cgroup").write_text(p.cgroup + "\n")
    if p.rollup is not None:
        (d / "smaps_rollup").write_text(p.rollup)
    if p.smaps is not None:
        (d / "smaps").write_text(p.smaps)


def write_status(d: Path, p: FakeProc) -> None:
    """``status``: Name and Uid, and VmHWM / RssShmem when the process has them."""
    lines = [f"Name:\t{p.comm}", f"Uid:\t{p.uid}\t{p.uid}\t{p.uid}\t{p.uid}"]
    if p.hwm_kb is not None:
        lines.append(f"VmHWM:\t{p.hwm_kb:8d} kB")
    if p.shmem_kb is not None:
        lines.append(f"RssShmem:\t{p.shmem_kb:8d} kB")
    (d / "status").write_text("\n".join(lines) + "\n")


def write_stat(d: Path, p: FakeProc) -> None:
    """``stat`` rewritten in place, as the kernel changes a live process's (a new ppid)."""
    # fields after comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime priority nice threads itrealvalue starttime ...
    rest = [f"{p.ppid}"] + ["0"] * 17 + [str(p.start_ticks)] + ["0"] * 10
    (d / "stat").write_text(f"{p.pid} ({p.comm}) S {' '.join(rest)}\n")


def replace_process(proc: Path, p: FakeProc) -> None:
    """A new directory for ``p.pid``, as procfs shows a new process there (or the same process's
    entry evicted and recreated): a new inode. The old directory is removed only after the new
    one took its name, so the filesystem cannot hand the new one the old inode number."""
    new, old = proc.parent / f"new-{p.pid}", proc.parent / f"old-{p.pid}"
    new.mkdir()
    write_process(new, p)
    (proc / str(p.pid)).rename(old)
    new.rename(proc / str(p.pid))
    shutil.rmtree(old)


def started(p: FakeProc) -> float:
    """The start time the backend computes for a fixture process."""
    return BTIME + p.start_ticks / CLK_TCK


#: The hand-written tree in tests/data/proc (see tests/data/README.md for its cases).
FIXTURE_PROC = Path(__file__).parent / "data" / "proc"
FIXTURE_BTIME = 1_764_000_000
NOBODY = 65534


def fixture_started(start_ticks: int) -> float:
    """The start time the backend computes for a process of the static tree."""
    return FIXTURE_BTIME + start_ticks / os.sysconf("SC_CLK_TCK")


def identity_of(backend: LinuxBackend, pid: int) -> tuple[int, float]:
    """The identity the backend lists for ``pid``."""
    return next(p.identity for p in backend.list_processes() if p.pid == pid)


def run_as_nobody(work: Callable[[], Any]) -> Any:
    """``work()`` in a forked child that really dropped to uid/gid 65534; its JSON-able result.
    The kernel, not a mock, does the permission checks. Needs root."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, work, report, exit without running pytest's atexit
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, json.dumps(work()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return json.loads(output)


def spawn_at_pid(pid: int, argv: list[str], attempts: int = 100) -> subprocess.Popen[bytes] | None:
    """``argv`` started as process ``pid`` (a free pid), by setting the kernel's last allocated
    pid (``/proc/sys/kernel/ns_last_pid``, root only) just before each try; None if another
    process took the pid first every time, or the kernel does not allow it."""
    for _ in range(attempts):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as last_pid:
                last_pid.write(str(pid - 1))
        except OSError:
            return None
        child = subprocess.Popen(argv)
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    return None


#: The hand-written cgroupfs in tests/data/cgroup (see tests/data/README.md for its cases).
FIXTURE_CGROUP = Path(__file__).parent / "data" / "cgroup"
POD_UID = "6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
LIMITED_ID = "ffffffff" + "0123456789abcdef" * 3 + "01234567"  # its containers and docker's
UNLIMITED_ID = "eeeeeeee" + "0123456789abcdef" * 3 + "01234567"
DOCKER_ID = "dddddddd" + "0123456789abcdef" * 3 + "01234567"
POD_SLICE = ("/kubepods.slice/kubepods-burstable.slice/"
             f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice")
#: /proc/<pid>/cgroup of a process in each of the fixture tree's containers
K8S_LIMITED = f"0::{POD_SLICE}/cri-containerd-{LIMITED_ID}.scope\n"
K8S_UNLIMITED = f"0::{POD_SLICE}/cri-containerd-{UNLIMITED_ID}.scope\n"
DOCKER_HYBRID = (f"12:memory:/docker/{DOCKER_ID}\n4:cpu,cpuacct:/docker/{DOCKER_ID}\n"
                 f"1:name=systemd:/docker/{DOCKER_ID}\n0::/system.slice/containerd.service\n")


def copy_cgroupfs(root: Path) -> Path:
    """A writable copy of the static cgroupfs tree, at ``root/cgroup``."""
    return Path(shutil.copytree(FIXTURE_CGROUP, root / "cgroup"))


def kmsg_record(sequence: int, seconds: float, message: str, *, facility: int = 0, level: int = 3) -> str:
    """One ``/dev/kmsg`` record line: ``priority,sequence,microseconds,flags;message``. Facility
    0 is the kernel's; what a process writes to /dev/kmsg is logged with facility 1 (user)."""
    return f"{facility << 3 | level},{sequence},{round(seconds * 1e6)},-;{message}\n"


def oom_kill_records(sequence: int, seconds: float, pid: int, comm: str, memcg: str) -> str:
    """What the kernel logs when a cgroup's OOM killer kills ``pid`` (Linux 6.x wording)."""
    return (kmsg_record(sequence, seconds, f"{comm} invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), "
                                           "order=0, oom_score_adj=0", level=4)
            + " SUBSYSTEM=memory\n"  # a continuation line, as /dev/kmsg has them
            + kmsg_record(sequence + 1, seconds, f"oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),"
                                                 f"cpuset=/,mems_allowed=0,oom_memcg={memcg},task_memcg="
                                                 f"{memcg},task={comm},pid={pid},uid=0", level=6)
            + kmsg_record(sequence + 2, seconds, "Memory cgroup out of memory: Killed process "
                                                 f"{pid} ({comm}) total-vm:221384kB, anon-rss:32512kB, "
                                                 "file-rss:6660kB, shmem-rss:0kB, UID:0 pgtables:124kB "
                                                 "oom_score_adj:0"))


def described_listing(backend: LinuxBackend) -> list[ProcessInfo]:
    """A listing as an all-process target gets it: every process described (see
    :class:`~memagent.contracts.Describing`); one gone meanwhile is left out."""
    listed = []
    for process in backend.list_processes():
        described = process if process.described else backend.describe(process)
        if described is not None:
            listed.append(described)
    return listed

"""The linux backend against fixture procfs trees and against real processes, `ps` and psutil."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from memagent.config import TargetConfig
from memagent.contracts import Failure, Gone, Reading
from memagent.errors import ConfigError
from memagent.fanout import Fanout, Outlet
from memagent.options import Options
from memagent.pipeline import Pipeline
from memagent.plugins.backends import linux
from memagent.plugins.backends.linux import RESTAT_EVERY, LinuxBackend, parse_stat, pick_cgroup
from memagent.records import RecordMaker
from memagent.scheduler import Scheduler
from memagent.targets import Selector
from memagent.testing import RecordingSink

from cli_helpers import (
    parse_records,
    ps_rss_vsz,
    run_agent,
    run_cli,
    scaled,
    spawn_allocator,
    spawn_ready,
    stop_child,
    wait_for,
)
from procfs_fixture import (
    BTIME,
    CLK_TCK,
    FIXTURE_PROC,
    FakeProc,
    build_procfs,
    described_listing,
    fixture_started,
    identity_of,
    replace_process,
    run_as_nobody,
    spawn_at_pid,
    started,
    write_stat,
)

PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the static fixture tree, tests/data/proc (cases in tests/data/README.md) -----------------

def fixture_backend(**kwargs: Any) -> LinuxBackend:
    return LinuxBackend.from_options(Options({"procfs": str(FIXTURE_PROC), **kwargs}, "backends.linux"))


def test_fixture_tree_lists_every_readable_process_with_its_details() -> None:
    """Listing reads stat/cmdline/exe/status/cgroup; a pid dir without stat (600) is left out."""
    listed = {p.pid: p for p in described_listing(fixture_backend())}
    assert sorted(listed) == [1, 2, 7, 300, 400, 500]
    nginx = listed[1]
    assert (nginx.ppid, nginx.name, nginx.started) == (0, "nginx", fixture_started(950))
    assert nginx.cmdline == ("nginx: master process /usr/sbin/nginx",)
    assert (nginx.exe, nginx.user) == ("/usr/sbin/nginx", "www-data")
    assert nginx.cgroup == "/system.slice/nginx.service"
    kthread = listed[2]
    assert (kthread.cmdline, kthread.exe, kthread.user, kthread.cgroup) == ((), None, "root", "/")
    sd_pam = listed[7]
    assert (sd_pam.name, sd_pam.ppid, sd_pam.user) == ("(sd-pam)", 1, "4242")  # no passwd entry: the uid
    assert listed[300].cgroup == "/legacy/app"  # cgroup v1 only: the memory controller's path
    assert (listed[400].user, listed[400].cgroup) == (None, None)  # no Uid line, no cgroup file


@pytest.mark.parametrize(("cgroup_file", "expected"), [
    ("0::/system.slice/nginx.service\n", "/system.slice/nginx.service"),  # v2
    ("0::/\n", "/"),  # v2, in the root (kernel threads)
    # v1 (RHEL 7): the first line is a controller that places everything in the root
    ("11:hugetlb:/\n10:memory:/system.slice/api.service\n2:cpu,cpuacct:/system.slice/api.service\n"
     "1:name=systemd:/system.slice/api.service\n", "/system.slice/api.service"),
    # hybrid systemd: the v2 line carries the unit
    ("12:memory:/system.slice/api.service\n1:name=systemd:/system.slice/api.service\n"
     "0::/system.slice/api.service\n", "/system.slice/api.service"),
    # hybrid container runtime: v2 is a bare root, the memory controller holds the placement
    ("9:name=systemd:/\n4:memory:/process_api/8a47\n1:cpu:/\n0::/\n", "/process_api/8a47"),
    ("5:pids:/x\n1:name=systemd:/user.slice/u.scope\n", "/user.slice/u.scope"),  # no memory line
    ("", None),
])
def test_pick_cgroup_chooses_the_path_that_places_the_process(cgroup_file: str, expected: str | None) -> None:
    """The cgroup selector matches v2's path, or v1's memory path where v2 says nothing."""
    assert pick_cgroup(cgroup_file) == expected


def test_fixture_normal_process_reads_statm_times_page_size_and_rollup_in_bytes() -> None:
    """rss/vms/platform are statm pages × page size; full is smaps_rollup kB × 1024; both fds held."""
    backend = fixture_backend()
    [reading] = backend.sample([(1, fixture_started(950))], full=True)
    assert isinstance(reading, Reading)
    assert reading.portable == {"rss": 2304 * PAGE, "vms": 25600 * PAGE}
    assert reading.platform == {"shared": 768 * PAGE, "text": 256 * PAGE, "lib": 0,
                                "data": 1536 * PAGE, "dirty": 0}
    assert reading.full == {"uss": (1024 + 5120) * 1024, "pss": 6144 * 1024, "swap": 512 * 1024}
    assert reading.problems == () and backend.open_fds == 3  # statm, status and smaps_rollup


def test_fixture_smaps_is_summed_only_where_rollup_is_missing() -> None:
    """The old-kernel process sums per-mapping smaps; the next process still reads its rollup."""
    old, new = (300, fixture_started(3000)), (7, fixture_started(1200))
    first, second = fixture_backend().sample([old, new], full=True)
    assert isinstance(first, Reading) and isinstance(second, Reading)
    assert first.full == {"uss": 240 * 1024, "pss": 300 * 1024, "swap": 8 * 1024}
    assert second.full == {"uss": 6144 * 1024, "pss": 6144 * 1024, "swap": 0}


def test_fixture_kernel_thread_reads_zeros() -> None:
    """A kernel thread (statm zeros, no smaps) samples as zeros, full included, like psutil."""
    [reading] = fixture_backend().sample([(2, fixture_started(22))], full=True)
    assert isinstance(reading, Reading)
    assert reading.portable == {"rss": 0, "vms": 0} and set(reading.platform.values()) == {0}
    assert reading.full == {"uss": 0, "pss": 0, "swap": 0}


def test_fixture_malformed_files_are_errors_not_crashes() -> None:
    """A truncated statm is a read_error Failure; a malformed rollup keeps the sample, minus full."""
    bad_statm, bad_rollup = (400, fixture_started(4000)), (500, fixture_started(5000))
    backend = fixture_backend()
    first, second = backend.sample([bad_statm, bad_rollup], full=True)
    assert isinstance(first, Failure) and (first.kind, first.message) == ("read_error", "statm: malformed")
    assert isinstance(second, Reading) and second.portable == {"rss": 300 * PAGE, "vms": 3000 * PAGE}
    assert second.full is None and second.problems[0][0] == "full_unreadable"
    assert backend.open_fds == 3  # the failed one's fd was released; 500 keeps statm, status, rollup


def test_fixture_dead_and_vanished_processes_are_gone() -> None:
    """No pid dir (999), or a dir whose stat/statm vanished (600): Gone, and no fd kept."""
    dead, vanished = (999, fixture_started(1)), (600, fixture_started(6000))
    backend = fixture_backend()
    assert backend.sample([dead, vanished], full=True) == [Gone(*dead), Gone(*vanished)]
    assert backend.open_fds == 0


def test_fixture_statm_denied_is_an_access_denied_failure() -> None:
    """An unreadable statm (mode 000, read by a really unprivileged uid) is access_denied."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged uid")
    root = Path(tempfile.mkdtemp(prefix="memagent-procfs-"))  # not under pytest's 0700 tmp dir
    try:
        root.chmod(0o755)
        proc = root / "proc"
        shutil.copytree(FIXTURE_PROC, proc, symlinks=True)
        (proc / "1" / "statm").chmod(0)
        identity = (1, fixture_started(950))

        def sample() -> list[Any]:
            [result] = LinuxBackend(str(proc)).sample([identity], full=False)
            assert isinstance(result, Failure)
            return [result.kind, result.message]

        assert run_as_nobody(sample) == ["access_denied", "statm: Permission denied"]
        assert isinstance(LinuxBackend(str(proc)).sample([identity], full=False)[0], Reading)  # root may
    finally:
        shutil.rmtree(root)


# -- generated variants ------------------------------------------------------------------------

def test_identity_mismatch_is_gone(tmp_path: Path) -> None:
    """A pid whose start time differs from the identity (reused pid) samples as Gone."""
    worker = FakeProc(pid=30, start_ticks=900)
    backend = LinuxBackend(str(build_procfs(tmp_path, [worker])))
    assert backend.sample([(30, started(worker) - 5)], full=False) == [Gone(30, started(worker) - 5)]
    assert backend.open_fds == 0


def test_long_comm_takes_the_full_name_from_cmdline(tmp_path: Path) -> None:
    """comm is cut at 15 characters; like psutil, the full name comes from argv[0]."""
    long = FakeProc(pid=40, comm="very-long-daemo", cmdline=("/opt/very-long-daemon-name", "-d"))
    backend = LinuxBackend(str(build_procfs(tmp_path, [long])))
    assert described_listing(backend)[0].name == "very-long-daemon-name"


def test_comm_with_spaces_and_parentheses_parses() -> None:
    """stat is parsed from the last ')' so odd process names cannot shift the fields."""
    line = "7 (a) b (c)) S 3 0 0 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0"
    assert parse_stat(line) == ("a) b (c)", 3, 4242)


def test_fd_budget_falls_back_to_open_read_close(tmp_path: Path) -> None:
    """With max_open_fds = 1 only one fd is held; the others still read correctly."""
    procs = [FakeProc(pid=50 + i, statm=(1000 + i, 100 + i, 0, 0, 0, 0, 0)) for i in range(5)]
    backend = LinuxBackend(str(build_procfs(tmp_path, procs)), max_open_fds=1)
    identities = [(p.pid, started(p)) for p in procs]
    for _ in range(3):
        results = backend.sample(identities, full=False)
        assert [r.portable["rss"] for r in results if isinstance(r, Reading)] == [
            (100 + i) * PAGE for i in range(5)]
        assert backend.open_fds == 1
    backend.close()
    assert backend.open_fds == 0


def test_procfs_option_is_validated(tmp_path: Path) -> None:
    """procfs must be a procfs: a path without a stat file is a config error naming the key,
    when the backend is opened (from_options itself reads nothing: check may run elsewhere)."""
    backend = LinuxBackend.from_options(Options({"procfs": str(tmp_path)}, "backends.linux"))
    with pytest.raises(ConfigError, match=r"^backends\.linux\.procfs: .* is not a procfs"):
        backend.open()
    typo = r"^backends\.linux\.max_fds: unknown key; did you mean max_open_fds\?"
    with pytest.raises(ConfigError, match=typo):
        LinuxBackend.from_options(Options({"max_fds": 3}, "backends.linux"))


def test_stat_malformed_after_listing_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    """A stat turned malformed before statm is opened: a read_error for that process, no exception."""
    procs = [FakeProc(pid=1), FakeProc(pid=2)]
    proc = build_procfs(tmp_path, procs)
    backend = LinuxBackend(str(proc))
    (proc / "1" / "stat").write_text("1 (x) S\n")
    first, second = backend.sample([(p.pid, started(p)) for p in procs], full=False)
    assert isinstance(first, Failure) and first.kind == "read_error" and isinstance(second, Reading)
    assert backend.open_fds == 2  # the second's statm and status


def test_unchanged_statm_gives_the_same_reading_and_a_changed_one_a_new_one(tmp_path: Path) -> None:
    """Unchanged statm bytes return last tick's Reading; new bytes new numbers; full rereads its fd."""
    worker = FakeProc(pid=20)
    proc = build_procfs(tmp_path, [worker])
    backend = LinuxBackend(str(proc))
    identity = (20, started(worker))
    [first] = backend.sample([identity], full=False)
    [again] = backend.sample([identity], full=False)
    assert isinstance(first, Reading) and again is first
    (proc / "20" / "statm").write_text("3000 700 100 10 0 300 0\n")
    (proc / "20" / "smaps_rollup").write_text("Pss: 7 kB\nPrivate_Dirty: 5 kB\nSwap: 1 kB\n")
    [changed] = backend.sample([identity], full=True)
    assert isinstance(changed, Reading) and changed.portable == {"rss": 700 * PAGE, "vms": 3000 * PAGE}
    assert changed.full == {"uss": 5 * 1024, "pss": 7 * 1024, "swap": 1024}
    (proc / "20" / "smaps_rollup").write_text("Pss: 9 kB\nPrivate_Dirty: 6 kB\nSwap: 0 kB\n")
    [full_again] = backend.sample([identity], full=True)
    assert isinstance(full_again, Reading) and full_again.portable == changed.portable
    assert full_again.full == {"uss": 6 * 1024, "pss": 9 * 1024, "swap": 0} and backend.open_fds == 3


def test_fd_budget_counts_statm_and_rollup_fds_together(tmp_path: Path) -> None:
    """With max_open_fds = 3 and full, at most 3 fds are held; every process still reads right."""
    procs = [FakeProc(pid=60 + i, statm=(1000 + i, 100 + i, 0, 0, 0, 0, 0)) for i in range(5)]
    backend = LinuxBackend(str(build_procfs(tmp_path, procs)), max_open_fds=3)
    identities = [(p.pid, started(p)) for p in procs]
    for _ in range(3):
        results = backend.sample(identities, full=True)
        assert [(r.portable["rss"], r.full) for r in results if isinstance(r, Reading)] == [
            ((100 + i) * PAGE, {"uss": 1000 * 1024, "pss": 1500 * 1024, "swap": 64 * 1024}) for i in range(5)]
        assert backend.open_fds == 3
    backend.close()
    assert backend.open_fds == 0


# -- incremental listing -------------------------------------------------------------------------

@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The procfs files the linux backend reads by path from now on (held fds are not paths)."""
    paths: list[str] = []
    real_bounded, real_once = linux.read_bounded, linux.read_once

    def counting(path: str, limit: int) -> tuple[bytes, bool]:
        paths.append(path)
        return real_bounded(path, limit)

    def counting_once(path: str, limit: int) -> bytes:
        paths.append(path)
        return real_once(path, limit)

    monkeypatch.setattr(linux, "read_bounded", counting)
    monkeypatch.setattr(linux, "read_once", counting_once)
    return paths


def test_warm_listing_reads_nothing_for_unchanged_processes(tmp_path: Path, reads: list[str]) -> None:
    """A rescan of processes whose pid directories are unchanged reads no file at all."""
    backend = LinuxBackend(str(build_procfs(tmp_path, [FakeProc(pid=10), FakeProc(pid=11, ppid=10)])))
    reads.clear()
    cold = backend.list_processes()
    assert sorted(reads) == [f"{tmp_path}/proc/{pid}/stat" for pid in (10, 11)]  # a new pid: one read
    assert [p.described for p in cold] == [False, False]
    reads.clear()
    described = described_listing(backend)  # what a target that may watch them asks for
    assert sorted(reads) == sorted(f"{tmp_path}/proc/{pid}/{name}" for pid in (10, 11)
                                   for name in ("stat", "cmdline", "status", "cgroup"))  # stat: still it?
    reads.clear()
    assert backend.list_processes() == described and reads == []  # listing 3: neither pid's turn


def test_replaced_pid_directory_is_a_new_process(tmp_path: Path) -> None:
    """A pid directory with a new inode (the pid reused) is read again: the new process is listed."""
    old = FakeProc(pid=30, start_ticks=900, cmdline=("/usr/bin/old",))
    proc = build_procfs(tmp_path, [old])
    backend = LinuxBackend(str(proc))
    [before] = backend.list_processes()
    inode = (proc / "30").stat().st_ino
    new = FakeProc(pid=30, comm="new", start_ticks=950, cmdline=("/usr/bin/new", "-x"))
    replace_process(proc, new)
    assert (proc / "30").stat().st_ino != inode
    [after] = described_listing(backend)
    assert (after.identity, after.name, after.cmdline) == ((30, started(new)), "new", ("/usr/bin/new", "-x"))
    assert backend.sample([before.identity, after.identity], full=False)[0] == Gone(*before.identity)


def test_recreated_entry_of_the_same_process_keeps_its_details(tmp_path: Path, reads: list[str]) -> None:
    """A new inode, the same start time (an entry recreated): one stat read, the details are kept."""
    proc = build_procfs(tmp_path, [FakeProc(pid=30)])
    backend = LinuxBackend(str(proc))
    [before] = backend.list_processes()
    replace_process(proc, FakeProc(pid=30, cmdline=("/usr/bin/other",)))
    reads.clear()
    assert backend.list_processes() == [before] and reads == [f"{proc}/30/stat"]


@pytest.mark.parametrize("parent_then", ["exited", "replaced"])
def test_child_whose_parent_exited_is_read_again_for_its_new_ppid(tmp_path: Path, parent_then: str) -> None:
    """When a parent's directory goes or is replaced, its child is read again: its new ppid shows."""
    parent, child = FakeProc(pid=10), FakeProc(pid=11, ppid=10, cmdline=("/usr/bin/child",))
    proc = build_procfs(tmp_path, [parent, child])
    backend = LinuxBackend(str(proc))
    assert {p.pid: p.ppid for p in described_listing(backend)} == {10: 1, 11: 10}
    if parent_then == "exited":
        shutil.rmtree(proc / "10")
    else:
        replace_process(proc, FakeProc(pid=10, start_ticks=990))
    child.ppid = 1
    write_stat(proc / "11", child)  # the kernel changes the stat of the same directory
    listed = {p.pid: p for p in backend.list_processes()}
    assert listed[11].ppid == 1 and listed[11].cmdline == ("/usr/bin/child",)  # described before: kept


def test_every_process_is_read_again_within_restat_every_listings(tmp_path: Path) -> None:
    """A change no inode shows (a zombie parent's child reparented) shows within RESTAT_EVERY listings."""
    child = FakeProc(pid=11, ppid=10)
    proc = build_procfs(tmp_path, [FakeProc(pid=10), child])
    backend = LinuxBackend(str(proc))
    backend.list_processes()
    child.ppid = 1
    write_stat(proc / "11", child)
    ppids = [{p.pid: p.ppid for p in backend.list_processes()}[11] for _ in range(RESTAT_EVERY)]
    turn = (11 - 2) % RESTAT_EVERY  # listing number n (from 1) re-reads pids ≡ n mod RESTAT_EVERY
    assert ppids == [10] * turn + [1] * (RESTAT_EVERY - turn)


def test_an_entry_without_a_real_inode_is_always_read(tmp_path: Path, reads: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """procfs reports inode 1 for an entry it could not instantiate: never trusted, read every time."""
    proc = build_procfs(tmp_path, [FakeProc(pid=10)])
    real_scandir = os.scandir

    class NoInode:
        def __init__(self, name: str) -> None:
            self.name = name

        def inode(self) -> int:
            return 1

    def scandir(path: str) -> contextlib.nullcontext[list[NoInode]]:
        with real_scandir(path) as entries:
            return contextlib.nullcontext([NoInode(entry.name) for entry in entries])

    backend = LinuxBackend(str(proc))
    monkeypatch.setattr(os, "scandir", scandir)
    for _ in range(3):
        reads.clear()
        assert [p.pid for p in backend.list_processes()] == [10] and f"{proc}/10/stat" in reads


# -- real processes ---------------------------------------------------------------------------

def test_real_child_matches_ps_statm_and_psutil() -> None:
    """200 MiB child: rss/vms = ps × 1024 (± 2 pages), platform = statm × page, full ≈ psutil (1%)."""
    child = spawn_allocator(200)
    backend = LinuxBackend()
    try:
        identity = identity_of(backend, child.pid)
        [reading] = backend.sample([identity], full=True)
        ps_rss, ps_vsz = ps_rss_vsz(child.pid)
        statm = [int(v) * PAGE for v in Path(f"/proc/{child.pid}/statm").read_text().split()]
        reference = psutil.Process(child.pid).memory_full_info()
    finally:
        stop_child(child)
        backend.close()
    assert isinstance(reading, Reading) and reading.full is not None
    print(f"\nours rss={reading.portable['rss']} vms={reading.portable['vms']}; "
          f"ps rss={ps_rss} vsz={ps_vsz}; psutil uss={reference.uss} ours uss={reading.full['uss']}")
    assert reading.portable["rss"] >= 200 * 1024 * 1024
    assert abs(reading.portable["rss"] - ps_rss) <= 2 * PAGE
    assert abs(reading.portable["vms"] - ps_vsz) <= 2 * PAGE
    assert abs(reading.platform["shared"] - statm[2]) <= 2 * PAGE
    assert (reading.platform["text"], reading.platform["lib"], reading.platform["data"]) == (
        statm[3], statm[4], statm[5])
    for field in ("uss", "pss"):
        assert abs(reading.full[field] - getattr(reference, field)) <= 0.01 * getattr(reference, field)
    assert reading.full["swap"] == reference.swap


def test_reaped_child_reads_as_gone_through_its_held_fd() -> None:
    """After a sample holds the statm fd, the child's exit and reaping make the next sample Gone."""
    child = spawn_allocator(1)
    backend = LinuxBackend()
    identity = identity_of(backend, child.pid)
    assert isinstance(backend.sample([identity], full=False)[0], Reading)
    assert backend.open_fds == 2  # statm and status
    stop_child(child)
    assert backend.sample([identity], full=False) == [Gone(*identity)]
    assert backend.open_fds == 0


def test_zombie_reads_zeros() -> None:
    """An exited but unreaped child (zombie) reads zeros, as psutil reports them."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # until it has exited (we do not reap it yet)
        wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE)
        backend = LinuxBackend()
        identity = identity_of(backend, zombie.pid)
        [reading] = backend.sample([identity], full=True)
    finally:
        zombie.wait()
    assert isinstance(reading, Reading)
    assert reading.portable == {"rss": 0, "vms": 0}
    assert reading.full == {"uss": 0, "pss": 0, "swap": 0}


def test_full_denied_still_samples_with_a_problem() -> None:
    """As an unprivileged user, another user's smaps_rollup is denied (ptrace check): the sample
    keeps rss/vms and carries one full_denied problem."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged uid")
    child = spawn_allocator(1)
    try:
        def sample() -> list[Any]:
            backend = LinuxBackend()
            [reading] = backend.sample([identity_of(backend, child.pid)], full=True)
            assert isinstance(reading, Reading)
            return [reading.portable["rss"], reading.full, [list(p) for p in reading.problems]]

        rss, full, problems = run_as_nobody(sample)
    finally:
        stop_child(child)
    assert rss > 0 and full is None
    [[kind, message]] = problems
    assert kind == "full_denied" and message.endswith(
        "smaps_rollup: Permission denied; uss/pss/swap need ptrace access (root, or the process's own user)")


def stat_start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: the start time, in clock ticks since boot."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_real_reused_pid_is_listed_as_the_new_process() -> None:
    """A pid the kernel really reuses (via ns_last_pid) has a new inode: the new process is listed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to set the kernel's last pid")
    first = subprocess.Popen(["sleep", "600.1"])
    backend = LinuxBackend()
    old = identity_of(backend, first.pid)  # listed (and cached) with its directory's inode
    assert isinstance(backend.sample([old], full=False)[0], Reading)
    inode, start = os.stat(f"/proc/{first.pid}").st_ino, stat_start_ticks(first.pid)
    first.kill()
    first.wait()
    ticks = os.sysconf("SC_CLK_TCK")  # a later clock tick, so the start times differ
    wait_for(lambda: time.clock_gettime(time.CLOCK_BOOTTIME) * ticks > start + 2, interval=0.005)
    second = spawn_at_pid(first.pid, ["sleep", "600.2"])
    if second is None:
        pytest.skip("the kernel did not hand the pid out again")
    try:
        assert os.stat(f"/proc/{second.pid}").st_ino != inode  # what the listing relies on
        # listed once its exec is done (before, /proc shows the forking parent's command line)
        wait_for(lambda: Path(f"/proc/{second.pid}/cmdline").read_bytes() == b"sleep\x00600.2\x00")
        new = {p.pid: p for p in described_listing(backend)}[second.pid]
        results = backend.sample([old, new.identity], full=False)
    finally:
        second.kill()
        second.wait()
        backend.close()
    assert new.identity != old and new.cmdline == ("sleep", "600.2")
    assert results[0] == Gone(*old) and isinstance(results[1], Reading)


def test_real_orphan_is_listed_with_its_new_parent() -> None:
    """A real child whose parent exits and is reaped is listed with its new ppid at the next rescan."""
    shell = subprocess.Popen(["sh", "-c", "sleep 600.3 >/dev/null & echo $!; read line"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert shell.stdin is not None and shell.stdout is not None
    orphan = int(shell.stdout.readline())
    backend = LinuxBackend()
    try:
        assert {p.pid: p.ppid for p in backend.list_processes()}[orphan] == shell.pid
        shell.stdin.close()
        shell.wait()
        ppid = {p.pid: p.ppid for p in backend.list_processes()}[orphan]
        assert ppid != shell.pid and ppid == psutil.Process(orphan).ppid()
    finally:
        os.kill(orphan, signal.SIGKILL)  # its new parent reaps it


EXEC_CAT = ("import os, sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
            "os.execv('/bin/cat', ['cat'])\n")


def test_real_exec_reopens_the_held_smaps_rollup() -> None:
    """After an exec the held smaps_rollup fd fails (ESRCH): it is reopened, the process is not Gone."""
    child = spawn_ready(EXEC_CAT)
    assert child.stdin is not None
    backend = LinuxBackend()
    try:
        identity = identity_of(backend, child.pid)
        [before] = backend.sample([identity], full=True)
        assert backend.open_fds == 3  # statm, status (a pid's: it survives an exec), smaps_rollup
        child.stdin.write("exec\n")
        child.stdin.flush()
        wait_for(lambda: Path(f"/proc/{child.pid}/cmdline").read_bytes() == b"cat\0")
        [after] = backend.sample([identity], full=True)
    finally:
        stop_child(child)  # cat ends at the end of its input
        backend.close()
    assert isinstance(before, Reading) and before.full is not None
    assert isinstance(after, Reading) and after.full is not None and after.problems == ()
    assert after.full["uss"] < before.full["uss"]  # cat's, not the Python interpreter's


# -- through the real CLI ------------------------------------------------------------------------

def test_cli_on_the_fixture_tree_reports_each_problem_once(
        write_config: Callable[[str], Path], validate_record: Callable[[dict[str, Any]], None]) -> None:
    """`memagent run` with procfs = the fixture tree: exact samples every tick, and each broken
    process gives one error record for the whole run (five ticks and more), not one per tick."""
    config = write_config(f"""
        [agent]
        interval = "100ms"
        hostname = "fixture"
        [backends.linux]
        procfs = "{FIXTURE_PROC}"
        [[targets]]
        name = "everything"
        all = true
        full = true
        [[sinks]]
        type = "stdout"
        """.replace("\n        ", "\n"))
    with run_agent(config) as agent:
        for _ in range(5):
            agent.wait_for_record(lambda r: r["type"] == "sample" and r["pid"] == 1)
        finished = agent.stop()
    assert finished.returncode == 0, finished.stderr
    records = finished.records
    for record in records:
        validate_record(record)
    samples = [r for r in records if r["type"] == "sample"]
    errors = [(r["pid"], r["error"]["kind"]) for r in records if r["type"] == "error"]
    nginx = [r for r in samples if r["pid"] == 1]
    assert len(nginx) >= 5
    assert {r["pid"] for r in samples} == {1, 2, 7, 300, 500}
    assert nginx[-1]["portable"] == {"rss": 2304 * PAGE, "vms": 25600 * PAGE}
    assert nginx[-1]["full"] == {"uss": 6144 * 1024, "pss": 6144 * 1024, "swap": 512 * 1024}
    assert sorted(errors) == [(400, "read_error"), (500, "full_unreadable")]


@pytest.mark.parametrize(("pattern", "pids"), [
    ("/system.slice/*", {1}),  # v2
    ("/legacy/*", {300}),  # v1 only: its memory controller's path
    ("/user.slice/*/user@4242.service/*", {7}),
])
def test_cli_cgroup_selector_on_the_fixture_tree(pattern: str, pids: set[int],
                                                 write_config: Callable[[str], Path]) -> None:
    """`cgroup = "<glob>"` through `memagent run --once` samples exactly the processes placed there."""
    config = write_config(f'[backends.linux]\nprocfs = "{FIXTURE_PROC}"\n'
                          f'[[targets]]\nname = "unit"\ncgroup = "{pattern}"\n')
    result = run_cli("run", str(config), "--once")
    assert result.returncode == 0, result.stderr
    records = parse_records(result.stdout)
    assert {r["pid"] for r in records if r["type"] == "sample"} == pids
    starts = [r for r in records if r["type"] == "start"]
    assert all(fnmatch.fnmatchcase(r["cgroup"], pattern) for r in starts) and len(starts) == len(pids)


FD_LIMIT_PROBE = """
import resource, sys
from memagent.plugins.backends.linux import LinuxBackend
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
backend = LinuxBackend()
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], backend.max_open_fds)
"""


@pytest.mark.parametrize(("soft", "hard", "expected"), [(256, 8192, (8192, 8192 - 1024)),
                                                         (1024, 1024, (1024, 512))])
def test_fd_limit_is_raised_and_budgeted(soft: int, hard: int, expected: tuple[int, int]) -> None:
    """The soft RLIMIT_NOFILE is raised to the hard limit; the fd budget keeps 1,024 (or half) spare."""
    out = subprocess.run([sys.executable, "-c", FD_LIMIT_PROBE, str(soft), str(hard)],
                         capture_output=True, text=True, check=True, timeout=scaled(60)).stdout.split()
    assert (int(out[0]), int(out[1])) == expected


def test_malformed_btime_is_one_line_exit_2_for_run_and_a_warning_for_check(
        tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    """A procfs whose stat says `btime abc`: `memagent run` exits 2 with one line naming it;
    `memagent check` (which may validate a config for another machine) warns with that line."""
    proc = build_procfs(tmp_path, [FakeProc(pid=1)])
    (proc / "stat").write_text("cpu  1 2 3 4\nbtime abc\n")
    config = write_config(f'[backends.linux]\nprocfs = "{proc}"\n[[targets]]\nname = "a"\nall = true\n')
    result = run_cli("run", str(config), "--once")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "btime is not a number" in lines[0] and "Traceback" not in result.stderr
    checked = run_cli("check", str(config))
    assert checked.returncode == 0 and "btime is not a number" in checked.stderr


def test_malformed_stat_is_counted_and_reported_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A process whose stat cannot be parsed is left out, counted on every listing, and warned
    about once per episode (not once per rescan)."""
    proc = build_procfs(tmp_path, [FakeProc(pid=1), FakeProc(pid=2)])
    (proc / "2" / "stat").write_text("2 (broken S 1 garbage\n")
    backend = LinuxBackend(str(proc))
    with caplog.at_level(logging.INFO, logger="memagent.plugins.backends.linux"):
        for _ in range(3):
            assert [p.pid for p in backend.list_processes()] == [1]
        (proc / "2").joinpath("stat").write_text((proc / "1" / "stat").read_text().replace("1 (", "2 (", 1))
        assert sorted(p.pid for p in backend.list_processes()) == [1, 2]
    assert backend.counters["malformed"] == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "could not be parsed" in m]) == 1
    assert len([m for m in messages if "parses again" in m]) == 1


def test_malformed_status_uid_still_lists_the_process(tmp_path: Path) -> None:
    """A status file with a garbage Uid line: the process is listed, its user unknown."""
    proc = build_procfs(tmp_path, [FakeProc(pid=1)])
    (proc / "1" / "status").write_text("Name:\tworker\nUid:\tzz\n")
    [info] = LinuxBackend(str(proc)).list_processes()
    assert info.pid == 1 and info.user is None


def test_run_reports_malformed_count_in_agent_records(
        tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    """`memagent run` on a procfs with a malformed process: the agent record counts it."""
    proc = build_procfs(tmp_path, [FakeProc(pid=1), FakeProc(pid=2)])
    (proc / "2" / "stat").write_text("2 (x) S\n")
    config = write_config(f'[agent]\ninterval = "100ms"\nrescan = "100ms"\n[backends.linux]\n'
                          f'procfs = "{proc}"\n[[targets]]\nname = "a"\nall = true\n')
    result = run_cli("run", str(config), "--duration", "1")
    assert result.returncode == 0, result.stderr
    final = [r for r in parse_records(result.stdout) if r["type"] == "agent"][-1]
    assert final["agent"]["backend"]["malformed"] >= 2
    assert result.stderr.count("could not be parsed") == 1


# -- extra: fields beyond portable/platform (status, meminfo) -------------------------------------

def test_fixture_extra_fields_from_statm_status_and_meminfo() -> None:
    """pid 1: rss_anon = resident - shared; RssShmem 512 kB, rss_file the rest of shared (the
    three sum to rss); peak_rss = VmHWM; rss_share = rss / MemTotal. A kernel thread has no
    status lines: zeros where statm says so, nothing faked."""
    [nginx, kthread] = fixture_backend().sample([(1, fixture_started(950)), (2, fixture_started(22))],
                                                full=False)
    assert isinstance(nginx, Reading) and isinstance(kthread, Reading)
    rss, shared = 2304 * PAGE, 768 * PAGE
    assert nginx.extra == {"rss_anon": rss - shared, "rss_file": shared - 512 * 1024, "rss_shmem": 512 * 1024,
                           "peak_rss": max(12288 * 1024, rss), "rss_share": round(rss / (16384000 * 1024), 6)}
    assert nginx.extra["rss_anon"] + nginx.extra["rss_file"] + nginx.extra["rss_shmem"] == rss
    assert kthread.extra == {"rss_anon": 0, "rss_share": 0.0}


def test_status_is_read_when_statm_changes_and_every_status_every_samples(tmp_path: Path) -> None:
    """An unchanged statm reuses its Reading, status unread, for STATUS_EVERY samples; then status
    is read again and a peak reached in between shows. A changed statm reads status at once."""
    worker = FakeProc(pid=30, hwm_kb=4000, shmem_kb=40)
    proc = build_procfs(tmp_path, [worker], mem_total_kb=1 << 20)
    backend = LinuxBackend(str(proc), cgroupfs="")
    identity = (30, started(worker))
    [first] = backend.sample([identity], full=False)
    assert isinstance(first, Reading) and first.extra is not None and first.extra["peak_rss"] == 4000 * 1024
    (proc / "30" / "status").write_text((proc / "30" / "status").read_text().replace("4000", "7000"))
    for _ in range(linux.STATUS_EVERY):
        [again] = backend.sample([identity], full=False)
        assert again is first
    [refreshed] = backend.sample([identity], full=False)
    assert isinstance(refreshed, Reading) and refreshed.extra is not None
    assert refreshed.extra["peak_rss"] == 7000 * 1024 and refreshed.portable is first.portable
    (proc / "30" / "status").write_text((proc / "30" / "status").read_text().replace("7000", "9000"))
    (proc / "30" / "statm").write_text("3000 700 100 10 0 300 0\n")
    [changed] = backend.sample([identity], full=False)
    assert isinstance(changed, Reading) and changed.extra is not None
    assert changed.extra["peak_rss"] == 9000 * 1024
    assert backend.open_fds == 2  # statm and status


def test_status_false_reads_no_status_and_meminfo_changes_show(tmp_path: Path) -> None:
    """status = false: only the free fields, one fd. A new MemTotal (memory hotplug, a balloon)
    rebuilds held Readings for their rss_share."""
    worker = FakeProc(pid=31, hwm_kb=4000, shmem_kb=40)
    proc = build_procfs(tmp_path, [worker], mem_total_kb=1 << 20)
    backend = LinuxBackend.from_options(Options({"procfs": str(proc), "status": False, "cgroupfs": ""},
                                                "backends.linux"))
    identity = (31, started(worker))
    [first] = backend.sample([identity], full=False)
    assert isinstance(first, Reading) and first.extra == {"rss_anon": 400 * PAGE,
                                                          "rss_share": round(500 * PAGE / (1 << 30), 6)}
    assert backend.open_fds == 1
    (proc / "meminfo").write_text("MemTotal:        2097152 kB\n")
    backend._mem_total_at = -1.0  # noqa: SLF001 - MemTotal is read at most once a second
    [second] = backend.sample([identity], full=False)
    assert isinstance(second, Reading) and second is not first
    assert second.extra == {"rss_anon": 400 * PAGE, "rss_share": round(500 * PAGE / (2 << 30), 6)}


def test_malformed_status_is_counted_once_and_its_fields_left_out(tmp_path: Path) -> None:
    """A status whose VmHWM is not a number: counted once as malformed, no status fields, the
    sample still goes out."""
    worker = FakeProc(pid=32)
    proc = build_procfs(tmp_path, [worker])
    (proc / "32" / "status").write_text("Name:\tworker\nVmHWM:\tlots kB\n")
    backend = LinuxBackend(str(proc), cgroupfs="")
    for _ in range(2):
        [reading] = backend.sample([(32, started(worker))], full=False)
        assert isinstance(reading, Reading) and reading.extra == {"rss_anon": 400 * PAGE}  # no meminfo
    (proc / "32" / "statm").write_text("3000 700 100 10 0 300 0\n")
    backend.sample([(32, started(worker))], full=False)
    assert backend.counters["malformed"] == 1


def test_real_child_extra_matches_its_status() -> None:
    """A 50 MiB child: rss_anon, rss_shmem and peak as its status says (it is idle), the three
    parts sum to rss, rss_share = rss / MemTotal."""
    child = spawn_allocator(50)
    backend = LinuxBackend()
    try:
        identity = identity_of(backend, child.pid)
        [reading] = backend.sample([identity], full=False)
        lines = Path(f"/proc/{child.pid}/status").read_text().splitlines()
        status = dict(line.split(":", 1) for line in lines)
    finally:
        stop_child(child)
        backend.close()
    kb = {key: int(status[key].split()[0]) * 1024 for key in ("VmHWM", "RssAnon", "RssFile", "RssShmem")}
    mem_total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    assert isinstance(reading, Reading) and reading.extra is not None
    extra, rss = reading.extra, reading.portable["rss"]
    print(f"\nextra={extra} status={kb}")
    assert extra["rss_anon"] == kb["RssAnon"] and extra["rss_shmem"] == kb["RssShmem"]
    assert extra["rss_file"] == kb["RssFile"] and extra["peak_rss"] >= rss >= 50 << 20
    assert extra["rss_anon"] + extra["rss_file"] + extra["rss_shmem"] == rss
    assert extra["rss_share"] == round(rss / mem_total, 6)


# -- describing only what a target may watch ------------------------------------------------------

def scheduler_on(proc: Path, **target: Any) -> tuple[Scheduler, RecordingSink, Outlet]:
    sink = RecordingSink()
    out = Outlet("rec", sink, queue=10_000, when_full="drop_oldest", batch=1000, targets=None)
    maker = RecordMaker(host="h", os_name="linux", backend="linux", tags={})
    selector = Selector(TargetConfig(name="t", interval=1.0, **target))
    return Scheduler(LinuxBackend(str(proc)), [selector], Pipeline(Fanout([out]), maker)), sink, out


async def starts_after_rescan(proc: Path, **target: Any) -> list[dict[str, Any]]:
    scheduler, sink, out = scheduler_on(proc, **target)
    await out.start()
    await scheduler.rescan()
    await out.drain(time.monotonic() + 5)
    return [dict(r.fields) for r in sink.records if r.type == "start"]


async def test_a_rescan_describes_only_the_processes_a_target_may_watch(tmp_path: Path,
                                                                      reads: list[str]) -> None:
    """comm = nginx: of 50 new processes, only nginx's details are read; its start record has them."""
    procs = [FakeProc(pid=100 + i) for i in range(49)]
    procs.append(FakeProc(pid=500, comm="nginx", cmdline=("nginx: master",)))
    proc = build_procfs(tmp_path, procs)
    reads.clear()
    [start] = await starts_after_rescan(proc, comm="nginx")
    assert (start["pid"], start["cmdline"]) == (500, ["nginx: master"])
    assert start["cgroup"] == "/system.slice/worker.service"
    per_process = [path for path in reads if path != f"{proc}/stat"]  # /proc/stat: boot time, once
    details = [path for path in per_process if not path.endswith("/stat")]
    assert sorted(details) == [f"{proc}/500/{name}" for name in ("cgroup", "cmdline", "status")]
    stats = [path for path in per_process if path.endswith("/stat")]
    assert len(stats) == 50 + 1  # each listed, and nginx again: still the same process?


async def test_a_long_name_is_still_matched_by_its_full_name(tmp_path: Path) -> None:
    """The kernel cuts comm at 15 characters; a target naming the full name still matches."""
    long = FakeProc(pid=40, comm="very-long-daemo", cmdline=("/opt/very-long-daemon-name", "-d"))
    other = FakeProc(pid=41, comm="very-long-other", cmdline=("/x/very-long-other-one",))
    proc = build_procfs(tmp_path, [long, other])
    [start] = await starts_after_rescan(proc, comm="very-long-daemon-name")
    assert (start["pid"], start["name"]) == (40, "very-long-daemon-name")


@pytest.mark.parametrize("target", [{"cmdline": re.compile("--serve")}, {"all": True}, {"user": "root"}])
async def test_a_target_judged_on_details_describes_every_new_process(tmp_path: Path,
                                                                       target: dict[str, Any]) -> None:
    proc = build_procfs(tmp_path, [FakeProc(pid=100 + i) for i in range(5)])
    starts = await starts_after_rescan(proc, **target)
    assert sorted(s["pid"] for s in starts) == [100, 101, 102, 103, 104]
    assert all(s["cmdline"] == ["/usr/bin/worker", "--serve"] and s["user"] == "root" for s in starts)


async def test_a_process_listed_before_its_exec_is_matched_after_it(tmp_path: Path) -> None:
    """Listed between fork and exec, a process shows its parent's command line; while it is
    young it is described again, so a target naming its real command line starts it."""
    young_ticks = int((time.time() - BTIME) * CLK_TCK)  # started just now
    forked = FakeProc(pid=70, comm="python3", start_ticks=young_ticks,
                      cmdline=("python3", "-m", "pytest"))
    proc = build_procfs(tmp_path, [forked])
    scheduler, sink, out = scheduler_on(proc, cmdline=re.compile("memagent-exec-marker"))
    await out.start()
    await scheduler.rescan()
    assert scheduler.watches[0].members == {}
    # its exec: the same pid, the same start time, a new command line
    (proc / "70" / "cmdline").write_text("python3\0-c\0memagent-exec-marker\0")
    await scheduler.rescan()
    await out.drain(time.monotonic() + 5)
    [start] = [dict(r.fields) for r in sink.records if r.type == "start"]
    assert (start["pid"], start["cmdline"]) == (70, ["python3", "-c", "memagent-exec-marker"])


async def test_a_young_process_exiting_keeps_its_description(tmp_path: Path) -> None:
    """Described again while young, a process caught exiting (a zombie's command line is empty)
    keeps what it was: still watched until it is gone, never ``unwatched`` on its way out."""
    young_ticks = int((time.time() - BTIME) * CLK_TCK)
    victim = FakeProc(pid=71, start_ticks=young_ticks, cmdline=("python3", "-c", "memagent-dying-marker"))
    proc = build_procfs(tmp_path, [victim])
    scheduler, sink, out = scheduler_on(proc, cmdline=re.compile("memagent-dying-marker"))
    await out.start()
    await scheduler.rescan()
    assert list(scheduler.watches[0].members) == [(71, started(victim))]
    (proc / "71" / "cmdline").write_text("")  # killed, not yet reaped
    await scheduler.rescan()
    assert list(scheduler.watches[0].members) == [(71, started(victim))]
    shutil.rmtree(proc / "71")  # reaped
    await scheduler.rescan()
    await out.drain(time.monotonic() + 5)
    assert [(r.type, r.fields.get("reason")) for r in sink.records] == [("start", None), ("exit", None)]

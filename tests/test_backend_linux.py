"""The linux backend against fixture procfs trees and against real processes, `ps` and psutil."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from memagent.contracts import Failure, Gone, Reading
from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.backends.linux import LinuxBackend, parse_stat

from cli_helpers import ps_rss_vsz, spawn_allocator, stop_child
from procfs_fixture import FakeProc, build_procfs, started

PAGE = os.sysconf("SC_PAGE_SIZE")


def test_fixture_process_reads_statm_times_page_size(tmp_path: Path) -> None:
    """rss/vms/platform are statm × page size; full comes from smaps_rollup in bytes."""
    worker = FakeProc(pid=10)
    backend = LinuxBackend(str(build_procfs(tmp_path, [worker])))
    [info] = backend.list_processes()
    assert (info.pid, info.ppid, info.name, info.started) == (10, 1, "worker", started(worker))
    assert info.cmdline == ("/usr/bin/worker", "--serve") and info.user == "root"
    assert info.cgroup == "/system.slice/worker.service"
    [reading] = backend.sample([info.identity], full=True)
    assert isinstance(reading, Reading)
    assert reading.portable == {"rss": 500 * PAGE, "vms": 2000 * PAGE}
    assert reading.platform == {"shared": 100 * PAGE, "text": 10 * PAGE, "lib": 0,
                                "data": 300 * PAGE, "dirty": 0}
    assert reading.full == {"uss": 1000 * 1024, "pss": 1500 * 1024, "swap": 64 * 1024}


def test_smaps_is_used_where_rollup_is_missing(tmp_path: Path) -> None:
    """Old kernels have no smaps_rollup: per-mapping smaps lines are summed instead."""
    smaps = ("00400000-00452000 r-xp 0 08:02 173521 /usr/bin/x\nPss: 100 kB\nPrivate_Clean: 40 kB\n"
             "Swap: 0 kB\n7f00-7f01 rw-p 0 00:00 0\nPss: 200 kB\nPrivate_Dirty: 200 kB\nSwap: 8 kB\n")
    old = FakeProc(pid=11, rollup=None, smaps=smaps)
    backend = LinuxBackend(str(build_procfs(tmp_path, [old])))
    [reading] = backend.sample([(11, started(old))], full=True)
    assert isinstance(reading, Reading)
    assert reading.full == {"uss": 240 * 1024, "pss": 300 * 1024, "swap": 8 * 1024}


def test_kernel_thread_reads_zeros(tmp_path: Path) -> None:
    """A kernel thread (no cmdline, statm zeros, no smaps) samples as zeros, like psutil."""
    kthread = FakeProc(pid=2, comm="kthreadd", ppid=0, cmdline=(), statm=(0,) * 7, rollup=None)
    backend = LinuxBackend(str(build_procfs(tmp_path, [kthread])))
    [info] = backend.list_processes()
    assert info.cmdline == () and info.name == "kthreadd"
    [reading] = backend.sample([info.identity], full=True)
    assert isinstance(reading, Reading)
    assert reading.portable == {"rss": 0, "vms": 0} and reading.full == {"uss": 0, "pss": 0, "swap": 0}


def test_dead_process_is_gone_and_malformed_statm_is_an_error(tmp_path: Path) -> None:
    """A missing pid directory is Gone; a truncated statm is a read_error Failure, not a crash."""
    alive, broken = FakeProc(pid=20), FakeProc(pid=21)
    proc = build_procfs(tmp_path, [alive, broken])
    (proc / "21" / "statm").write_text("12 34\n")
    backend = LinuxBackend(str(proc))
    gone_identity = (99, 1_700_000_001.0)
    results = backend.sample([(20, started(alive)), (21, started(broken)), gone_identity], full=False)
    assert isinstance(results[0], Reading)
    assert isinstance(results[1], Failure) and results[1].kind == "read_error"
    assert results[2] == Gone(*gone_identity)


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
    assert backend.list_processes()[0].name == "very-long-daemon-name"


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
    """procfs must be a procfs: a path without a stat file is a config error naming the key."""
    with pytest.raises(ConfigError, match=r"^backends\.linux\.procfs: .* is not a procfs"):
        LinuxBackend.from_options(Options({"procfs": str(tmp_path)}, "backends.linux"))
    typo = r"^backends\.linux\.max_fds: unknown key; did you mean max_open_fds\?"
    with pytest.raises(ConfigError, match=typo):
        LinuxBackend.from_options(Options({"max_fds": 3}, "backends.linux"))


# -- real processes ---------------------------------------------------------------------------

def identity_of(backend: LinuxBackend, pid: int) -> tuple[int, float]:
    return next(p.identity for p in backend.list_processes() if p.pid == pid)


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
    assert backend.open_fds == 1
    stop_child(child)
    assert backend.sample([identity], full=False) == [Gone(*identity)]
    assert backend.open_fds == 0


def test_zombie_reads_zeros() -> None:
    """An exited but unreaped child (zombie) reads zeros, as psutil reports them."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(500):  # until it has exited (we do not reap it yet)
            if psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.01)
        backend = LinuxBackend()
        identity = identity_of(backend, zombie.pid)
        [reading] = backend.sample([identity], full=True)
    finally:
        zombie.wait()
    assert isinstance(reading, Reading)
    assert reading.portable == {"rss": 0, "vms": 0}
    assert reading.full == {"uss": 0, "pss": 0, "swap": 0}


def test_full_denied_still_samples_with_a_problem() -> None:
    """As an unprivileged user, another user's smaps_rollup is denied: the sample keeps
    rss/vms and carries a full_denied problem (a forked child really drops to uid 65534)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged uid")
    child = spawn_allocator(1)
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the forked child: drop privileges, sample, report, exit
            try:
                os.setgid(65534)
                os.setuid(65534)
                backend = LinuxBackend()
                [reading] = backend.sample([identity_of(backend, child.pid)], full=True)
                assert isinstance(reading, Reading)
                report = [reading.portable["rss"], reading.full, list(map(list, reading.problems))]
                os.write(write_end, json.dumps(report).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            output = pipe.read()
        os.waitpid(pid, 0)
    finally:
        stop_child(child)
    rss, full, problems = json.loads(output)
    assert rss > 0 and full is None
    assert problems[0][0] == "full_denied" and "Permission denied" in problems[0][1]

"""Real cgroups made by the test (the v1 memory controller here; v2 where the machine has it):
the numbers read equal the kernel's files, a removed cgroup is left out, and a child that
allocates past its cgroup's limit is killed by the kernel and its exit record says oom_kill —
through the kernel log and through the cgroup's counter alone."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cgroup_helpers import kernel_log_readable, memory_cgroup, memory_hierarchy, spawn_in, tell

from memagent.contracts import MemoryCgroup
from memagent.plugins.backends.linux import LinuxBackend
from memagent.plugins.backends.linux_cgroups import CgroupReader

from cli_helpers import run_agent, stop_child, wait_for
from procfs_fixture import described_listing

MIB = 1 << 20


def test_real_cgroup_reads_as_its_files() -> None:
    """A child holding 30 MiB in a 256 MiB cgroup: the backend places it there, and the numbers
    it reads are the kernel's own files (current, limit, peak; no OOM kill)."""
    with memory_cgroup(256 * MIB) as cgroup:
        child = spawn_in(cgroup, "memagent-cgroup-reads")
        backend = LinuxBackend()
        try:
            tell(child, "alloc 30")
            assert child.stdout is not None and child.stdout.readline().strip() == "ok"
            [info] = [p for p in described_listing(backend) if p.pid == child.pid]
            key = MemoryCgroup(cgroup.version, cgroup.path)
            assert info.memory_cgroup == key
            stats = backend.read_cgroups([key])[key]
            current_file = "memory.usage_in_bytes" if cgroup.version == 1 else "memory.current"
            current = int((cgroup.directory / current_file).read_text())
        finally:
            stop_child(child)
            backend.close()
    print(f"\n{stats}")
    assert stats["version"] == cgroup.version
    assert abs(stats["current"] - current) <= 64 * 1024 and stats["current"] >= 30 * MIB
    assert stats["max"] == stats["effective_max"] == 256 * MIB
    assert stats["peak"] >= stats["current"] and stats["events"]["oom_kill"] == 0


def test_removed_cgroup_is_left_out_and_a_recreated_one_read_again() -> None:
    """The held fds of a removed cgroup read ENODEV: it is left out and its fds closed; a cgroup
    made again under the same name is read afresh."""
    version, root = memory_hierarchy()
    with memory_cgroup(64 * MIB) as cgroup:
        reader = CgroupReader(str(root.parent if version == 1 else root), lambda: True, {})
        key = MemoryCgroup(cgroup.version, cgroup.path)
        assert key in reader.read([key]) and reader.held_fds > 0
        cgroup.directory.rmdir()
        assert reader.read([key]) == {} and reader.held_fds == 0
        cgroup.directory.mkdir()
        assert reader.read([key])[key]["max"] is None  # the new one has no limit
        reader.close()


@pytest.mark.parametrize("witness", ["kmsg", "cgroup counter"])
def test_real_oom_kill_is_the_exit_reason(witness: str, tmp_path: Path,
                                          validate_record: Callable[[dict[str, Any]], None]) -> None:
    """Two children in one 64 MiB cgroup under a running agent: one allocates 200 MiB and the
    kernel kills it — its exit record says oom_kill; the other then exits normally — its exit
    has no reason. Witnessed by the kernel log alone (no cgroupfs), then by the cgroup's oom_kill
    counter alone (no kernel log), whose cgroup records show the kill and the limit."""
    if witness == "kmsg" and not kernel_log_readable():
        pytest.skip("/dev/kmsg is not readable here")
    backends = {"kmsg": 'cgroupfs = ""', "cgroup counter": 'kmsg = ""'}[witness]
    marker = f"memagent-oom-{os.getpid()}"
    config = tmp_path / "config.toml"
    config.write_text(f"""
[agent]
interval = "100ms"
rescan = "200ms"
[backends.linux]
{backends}
[[targets]]
name = "oom"
cmdline = "{marker}"
""")
    with memory_cgroup(64 * MIB) as cgroup:
        victim, bystander = spawn_in(cgroup, marker), spawn_in(cgroup, marker)
        agent = run_agent(config)
        try:
            for child in (victim, bystander):
                agent.wait_for_record(lambda r, pid=child.pid: r["type"] == "sample" and r["pid"] == pid)
            tell(victim, "alloc 200")
            wait_for(lambda: victim.poll() is not None)  # reaped: a zombie still reads as a process
            killed = agent.wait_for_record(lambda r: r["type"] == "exit" and r["pid"] == victim.pid)
            tell(bystander, "exit")
            wait_for(lambda: bystander.poll() is not None)
            ended = agent.wait_for_record(lambda r: r["type"] == "exit" and r["pid"] == bystander.pid)
        finally:
            finished = agent.stop()
            for child in (victim, bystander):
                if child.poll() is None:
                    stop_child(child)
    assert finished.returncode == 0, finished.stderr
    assert victim.returncode == -9  # SIGKILL: the kernel's OOM killer
    assert killed.get("reason") == "oom_kill", killed
    assert "reason" not in ended, ended
    records = finished.records
    for record in records:
        validate_record(record)
    cgroups = [r for r in records if r["type"] == "cgroup"]
    if witness == "kmsg":
        assert cgroups == []
    else:
        assert cgroups[0]["cgroup"] == cgroup.path and cgroups[0]["max"] == 64 * MIB
        assert cgroups[0]["targets"] == ["oom"] and cgroups[0]["processes"] == 2
        assert cgroups[-1]["events"]["oom_kill"] == 1

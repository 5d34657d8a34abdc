"""Builds fixture procfs trees for the linux backend (``procfs = <tmp>/proc``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def build_procfs(root: Path, processes: list[FakeProc]) -> Path:
    """Write ``root/proc`` with a ``stat`` (btime) and one directory per process."""
    proc = root / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "stat").write_text(f"cpu  1 2 3 4\nbtime {BTIME}\nprocesses 99\n")
    for p in processes:
        d = proc / str(p.pid)
        d.mkdir()
        # fields after comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        # utime stime cutime cstime priority nice threads itrealvalue starttime ...
        rest = [f"{p.ppid}"] + ["0"] * 17 + [str(p.start_ticks)] + ["0"] * 10
        (d / "stat").write_text(f"{p.pid} ({p.comm}) S {' '.join(rest)}\n")
        (d / "statm").write_text(" ".join(str(v) for v in p.statm) + "\n")
        (d / "cmdline").write_text("\0".join(p.cmdline) + ("\0" if p.cmdline else ""))
        (d / "status").write_text(f"Name:\t{p.comm}\nUid:\t{p.uid}\t{p.uid}\t{p.uid}\t{p.uid}\n")
        (d / "cgroup").write_text(p.cgroup + "\n")
        if p.rollup is not None:
            (d / "smaps_rollup").write_text(p.rollup)
        if p.smaps is not None:
            (d / "smaps").write_text(p.smaps)
    return proc


def started(p: FakeProc) -> float:
    """The start time the backend computes for a fixture process."""
    return BTIME + p.start_ticks / CLK_TCK

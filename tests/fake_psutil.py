"""Fakes shaped exactly like psutil's per-OS named tuples, and a tiny fake psutil module.

Field lists are psutil 7's (`_pslinux.py`, `_psosx.py`, `_pswindows.py`, `_psbsd.py`,
`_pssunos.py`, `_psaix.py`), plus the shapes of psutil's next major version as merged on its main
branch (giampaolo/psutil PRs #2737 and #2740, March 2026; not on PyPI as of 7.2.2): Linux drops
`lib`/`dirty`; macOS drops `pfaults`/`pageins`; Windows renames `wset` → `rss`, `peak_wset` →
`peak_rss`, `pagefile` → `vms`, `peak_pagefile` → `peak_vms`, `private` → `vms`, keeping the old
names as attributes that raise DeprecationWarning; `memory_full_info()` is deprecated in favour of
`memory_footprint()` (uss, pss, swap).
"""

from __future__ import annotations

import warnings
from collections import namedtuple
from typing import Any

WINDOWS_FIELDS = ["rss", "vms", "num_page_faults", "peak_wset", "wset", "peak_paged_pool",
                  "paged_pool", "peak_nonpaged_pool", "nonpaged_pool", "pagefile", "peak_pagefile",
                  "private"]
WINDOWS_RENAMED = {"wset": "rss", "peak_wset": "peak_rss", "pagefile": "vms", "peak_pagefile": "peak_vms",
                   "private": "vms"}


def with_deprecated_aliases(shape: Any, aliases: dict[str, str]) -> Any:
    """``shape`` plus read-only attributes under old names that warn, as psutil does for renames."""
    def alias(new: str) -> property:
        def read(self: Any) -> Any:
            warnings.warn(f"use {new} instead", DeprecationWarning, stacklevel=2)
            return getattr(self, new)
        return property(read)
    members = {old: alias(new) for old, new in aliases.items()}
    return type(shape.__name__, (shape,), {"__slots__": (), **members})


PMEM: dict[str, Any] = {
    "linux": namedtuple("pmem", "rss vms shared text lib data dirty"),
    "darwin": namedtuple("pmem", "rss vms pfaults pageins"),
    "freebsd": namedtuple("pmem", "rss vms text data stack"),
    "openbsd": namedtuple("pmem", "rss vms text data stack"),
    "netbsd": namedtuple("pmem", "rss vms text data stack"),
    "sunos": namedtuple("pmem", "rss vms"),
    "aix": namedtuple("pmem", "rss vms"),
    "windows": namedtuple("pmem", WINDOWS_FIELDS),
}
PMEM_PSUTIL8: dict[str, Any] = {
    "linux": namedtuple("pmem", "rss vms shared text data"),
    "darwin": namedtuple("pmem", "rss vms"),
    "windows": with_deprecated_aliases(
        namedtuple("pmem", ["rss", "vms", "num_page_faults", "peak_rss", "peak_paged_pool", "paged_pool",
                            "peak_nonpaged_pool", "nonpaged_pool", "peak_vms"]), WINDOWS_RENAMED),
}
PFOOTPRINT_PSUTIL8: dict[str, Any] = {
    "linux": namedtuple("pfootprint", "uss pss swap"),
    "darwin": namedtuple("pfootprint", "uss"),
    "windows": namedtuple("pfootprint", "uss"),
}
PFULLMEM: dict[str, Any] = {
    "linux": namedtuple("pfullmem", PMEM["linux"]._fields + ("uss", "pss", "swap")),
    "darwin": namedtuple("pfullmem", PMEM["darwin"]._fields + ("uss",)),
    "windows": namedtuple("pfullmem", PMEM["windows"]._fields + ("uss",)),
    # the BSDs, SunOS and AIX: memory_full_info() is memory_info() (pfullmem = pmem)
    "freebsd": PMEM["freebsd"], "openbsd": PMEM["openbsd"], "netbsd": PMEM["netbsd"],
    "sunos": PMEM["sunos"], "aix": PMEM["aix"],
}


def fill(shape: Any, base: int = 1000) -> Any:
    """A tuple of ``shape`` whose n-th field is base + n (distinct, recognisable values)."""
    return shape(*(base + i for i in range(len(shape._fields))))


class Error(Exception):
    pass


class NoSuchProcess(Error):
    def __init__(self, pid: int, name: str | None = None, msg: str | None = None) -> None:
        super().__init__(msg or f"process no longer exists (pid={pid})")


class ZombieProcess(NoSuchProcess):
    pass


class AccessDenied(Error):
    def __init__(self, pid: int | None = None, name: str | None = None, msg: str | None = None) -> None:
        super().__init__(msg or "")


class FakeProcess:
    def __init__(self, module: FakePsutil, pid: int) -> None:
        if pid not in module.table:
            raise NoSuchProcess(pid)
        self.module, self.pid = module, pid
        self.info: dict[str, Any] = {}

    def _entry(self) -> dict[str, Any]:
        if self.pid not in self.module.table:
            raise NoSuchProcess(self.pid)
        return self.module.table[self.pid]

    def create_time(self) -> float:
        return float(self._entry()["create_time"])

    def memory_info(self) -> Any:
        entry = self._entry()
        if isinstance(entry.get("raise"), Exception):
            raise entry["raise"]
        return entry["pmem"]

    def memory_full_info(self) -> Any:
        if self.module.major >= 8:
            warnings.warn("memory_full_info() is deprecated; use memory_footprint()", DeprecationWarning,
                          stacklevel=2)
        entry = self._entry()
        if isinstance(entry.get("raise_full"), Exception):
            raise entry["raise_full"]
        return entry["pfullmem"]

    def __getattr__(self, name: str) -> Any:
        if name == "memory_footprint" and self.module.major >= 8:
            return self._memory_footprint
        raise AttributeError(name)

    def _memory_footprint(self) -> Any:
        entry = self._entry()
        if isinstance(entry.get("raise_full"), Exception):
            raise entry["raise_full"]
        return entry["pfullmem"]

    def as_dict(self, attrs: list[str], ad_value: Any = None) -> dict[str, Any]:
        entry = self._entry()
        return {a: entry.get(a, ad_value) for a in attrs}


class FakePsutil:
    """Just enough of the psutil module for the backend: Process, process_iter, the errors."""

    Error, NoSuchProcess, ZombieProcess, AccessDenied = Error, NoSuchProcess, ZombieProcess, AccessDenied

    def __init__(self, major: int = 7) -> None:
        self.major = major  # 8: memory_footprint() exists and memory_full_info() warns
        self.table: dict[int, dict[str, Any]] = {}

    def add(self, pid: int, pmem: Any, pfullmem: Any = None, **extra: Any) -> None:
        entry = {"ppid": 1, "create_time": 1_700_000_000.5, "name": f"proc{pid}",
                 "cmdline": [f"/bin/proc{pid}"], "exe": f"/bin/proc{pid}", "username": "alice",
                 "pmem": pmem, "pfullmem": pfullmem}
        entry.update(extra)
        self.table[pid] = entry

    def Process(self, pid: int) -> FakeProcess:  # noqa: N802 - psutil's own name
        return FakeProcess(self, pid)

    def process_iter(self, attrs: list[str]) -> list[FakeProcess]:
        procs = []
        for pid in sorted(self.table):
            proc = FakeProcess(self, pid)
            proc.info = {a: self.table[pid].get(a) for a in attrs}
            procs.append(proc)
        return procs

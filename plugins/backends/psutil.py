"""The ``psutil`` backend: every OS psutil supports (macOS, Windows, the BSDs, Solaris, AIX),
and Linux when forced with ``backend = "psutil"``.

Mapping (the seed's table; :data:`PLATFORM_FIELDS`): ``portable`` is ``rss`` and ``vms`` — on
Windows ``wset`` and ``pagefile``, which psutil also names ``rss`` and ``vms``. ``platform`` holds
exactly that OS's ``memory_info()`` fields beyond rss/vms *that the installed psutil returns*:
a field the installed psutil no longer has (its next major version drops Linux's ``lib``/``dirty``
and macOS's ``pfaults``/``pageins``) is omitted — never a faked 0. Fields psutil merely renamed
(Windows: ``wset`` → ``rss``, ``peak_wset`` → ``peak_rss``, ``pagefile`` → ``vms``,
``peak_pagefile`` → ``peak_vms``, ``private`` → ``vms``; :data:`RENAMED`) keep the seed's names in
records, read from the new name without touching psutil's deprecated aliases. ``full`` maps
``uss``, ``pss``, ``swap``, only those present (macOS and Windows have ``uss`` only), from
``memory_footprint()`` where psutil has it, else ``memory_full_info()``.

Identity checks: a cached ``psutil.Process`` is used only while its ``create_time()`` equals the
identity's start time, so a reused pid reads as :class:`~memagent.contracts.Gone`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

from memagent.contracts import Failure, Gone, Identity, ProcessInfo, Reading, SampleResult, cap_cmdline
from memagent.options import Options
from memagent.record_types import PLATFORM_FIELDS

# the seed's per-OS fields: one table, the record schema's
FULL_FIELDS = ("uss", "pss", "swap")
#: seed field → the name a newer psutil gives the same counter (giampaolo/psutil PR #2737)
RENAMED: dict[str, dict[str, str]] = {
    "windows": {"wset": "rss", "peak_wset": "peak_rss", "pagefile": "vms", "peak_pagefile": "peak_vms",
                "private": "vms"},
}


def os_name(platform: str = sys.platform) -> str:
    """The schema's ``os`` value for a ``sys.platform`` string."""
    for prefix, name in (("linux", "linux"), ("darwin", "darwin"), ("win", "windows"),
                         ("freebsd", "freebsd"), ("openbsd", "openbsd"), ("netbsd", "netbsd"),
                         ("sunos", "sunos"), ("aix", "aix")):
        if platform.startswith(prefix):
            return name
    return platform


def map_memory(os: str, pmem: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(portable, platform) from a ``memory_info()`` named tuple of OS ``os``."""
    present = pmem._fields
    if os == "windows":
        rss = pmem.wset if "wset" in present else pmem.rss
        vms = pmem.pagefile if "pagefile" in present else pmem.vms
    else:
        rss, vms = pmem.rss, pmem.vms
    renamed = RENAMED.get(os, {})
    platform = {}
    for field in PLATFORM_FIELDS.get(os, ()):
        source = field if field in present else renamed.get(field)
        if source is not None and source in present:
            platform[field] = int(getattr(pmem, source))
    return {"rss": int(rss), "vms": int(vms)}, platform


def map_full(pfullmem: Any) -> dict[str, int]:
    """uss / pss / swap, those present, from a ``memory_footprint()`` or ``memory_full_info()``
    named tuple."""
    return {f: int(getattr(pfullmem, f)) for f in FULL_FIELDS if f in pfullmem._fields}


def _psutil() -> Any:
    try:
        import psutil
    except ImportError as exc:
        raise ImportError(f"psutil is not installed (pip install psutil): {exc}") from exc
    return psutil


class PsutilBackend:
    """Samples through psutil. See the module docstring."""

    name: ClassVar[str] = "psutil"
    os: ClassVar[str] = os_name()
    platform_fields: ClassVar[tuple[str, ...]] = PLATFORM_FIELDS.get(os_name(), ())

    def __init__(self, psutil_module: Any = None) -> None:
        self.psutil = psutil_module if psutil_module is not None else _psutil()
        self._processes: dict[Identity, Any] = {}
        self._details: dict[Identity, ProcessInfo] = {}

    @classmethod
    def available(cls) -> bool:
        """True where psutil imports; ImportError saying how to install it where it does not."""
        _psutil()
        return True

    @classmethod
    def from_options(cls, options: Options) -> PsutilBackend:
        options.finish()
        return cls()

    def _describe(self, proc: Any, identity: Identity, ppid: int) -> ProcessInfo:
        info = proc.as_dict(["name", "cmdline", "exe", "username"], ad_value=None)
        cmdline, truncated = cap_cmdline(info["cmdline"] or ())
        return ProcessInfo(pid=identity[0], ppid=ppid, name=info["name"] or "", started=identity[1],
                           cmdline=cmdline, cmdline_truncated=truncated, exe=info["exe"] or None,
                           user=info["username"], cgroup=None)

    def list_processes(self) -> list[ProcessInfo]:
        ps = self.psutil
        details: dict[Identity, ProcessInfo] = {}
        for proc in ps.process_iter(["ppid", "create_time"]):
            started, ppid = proc.info["create_time"], proc.info["ppid"]
            if started is None:
                continue  # vanished or unreadable while listing
            identity = (proc.pid, float(started))
            info = self._details.get(identity)
            try:
                if info is None:
                    info = self._describe(proc, identity, ppid or 0)
                elif info.ppid != ppid:
                    info = replace(info, ppid=ppid or 0)
            except ps.Error:
                continue
            details[identity] = info
        self._details = details
        return list(details.values())

    def _process(self, identity: Identity) -> Any:
        proc = self._processes.get(identity)
        if proc is None:
            proc = self.psutil.Process(identity[0])
            if abs(proc.create_time() - identity[1]) > 0.01:
                raise self.psutil.NoSuchProcess(identity[0])
            self._processes[identity] = proc
        return proc

    def sample(self, processes: Sequence[Identity], full: bool) -> list[SampleResult]:
        ps = self.psutil
        results: list[SampleResult] = []
        for identity in processes:
            pid, started = identity
            try:
                proc = self._process(identity)
                pmem = proc.memory_info()
                portable, platform = map_memory(self.os, pmem)
                if not full:
                    results.append(Reading(pid, started, portable, platform))
                    continue
                method = "memory_footprint" if hasattr(proc, "memory_footprint") else "memory_full_info"
                try:
                    full_info = map_full(getattr(proc, method)())
                    results.append(Reading(pid, started, portable, platform, full_info))
                except ps.AccessDenied as exc:
                    problem = (("full_denied", f"{method}: {exc}".rstrip(": ")),)
                    results.append(Reading(pid, started, portable, platform, None, problem))
            except ps.ZombieProcess:
                results.append(Reading(pid, started, {"rss": 0, "vms": 0}, {}))
            except ps.NoSuchProcess:
                self.forget(identity)
                results.append(Gone(pid, started))
            except ps.AccessDenied as exc:
                results.append(Failure(pid, started, "access_denied", str(exc) or "access denied"))
            except (OSError, ps.Error) as exc:
                results.append(Failure(pid, started, "read_error", str(exc) or type(exc).__name__))
        return results

    def forget(self, identity: Identity) -> None:
        self._processes.pop(identity, None)

    def close(self) -> None:
        self._processes.clear()

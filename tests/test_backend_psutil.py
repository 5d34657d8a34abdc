"""The psutil backend: every OS's mapping (with fakes shaped like psutil's tuples) and real psutil."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memagent.contracts import Failure, Gone, Reading
from memagent.plugins.backends.linux import LinuxBackend
from memagent.plugins.backends.psutil import PLATFORM_FIELDS, PsutilBackend, map_full, map_memory, os_name

from cli_helpers import parse_records, ps_rss_vsz, run_cli, spawn_allocator, stop_child
from fake_psutil import (
    PFOOTPRINT_PSUTIL8,
    PFULLMEM,
    PMEM,
    PMEM_PSUTIL8,
    AccessDenied,
    FakePsutil,
    ZombieProcess,
    fill,
)

SEED_TABLE = {  # shared/seed/README.md, verbatim
    "linux": {"shared", "text", "lib", "data", "dirty"},
    "darwin": {"pfaults", "pageins"},
    "freebsd": {"text", "data", "stack"}, "openbsd": {"text", "data", "stack"},
    "netbsd": {"text", "data", "stack"},
    "sunos": set(), "aix": set(),
    "windows": {"num_page_faults", "peak_wset", "wset", "peak_paged_pool", "paged_pool",
                "peak_nonpaged_pool", "nonpaged_pool", "pagefile", "peak_pagefile", "private"},
}


def backend_for(os: str, module: FakePsutil) -> PsutilBackend:
    cls: Any = type(f"PsutilBackend_{os}", (PsutilBackend,), {"os": os})
    backend: PsutilBackend = cls(module)
    return backend


@pytest.mark.parametrize("os", sorted(SEED_TABLE))
def test_platform_fields_are_exactly_the_seed_table(os: str) -> None:
    """Each OS's platform dict has exactly the seed's fields, with psutil's values."""
    pmem = fill(PMEM[os])
    portable, platform = map_memory(os, pmem)
    assert set(platform) == SEED_TABLE[os] == set(PLATFORM_FIELDS[os])
    assert all(platform[f] == getattr(pmem, f) for f in platform)
    if os == "windows":
        assert portable == {"rss": pmem.wset, "vms": pmem.pagefile}
    else:
        assert portable == {"rss": pmem.rss, "vms": pmem.vms}


@pytest.mark.parametrize("os", ["linux", "darwin"])
def test_fields_a_newer_psutil_dropped_are_omitted_never_faked(os: str) -> None:
    """psutil's next major version drops lib/dirty (Linux), pfaults/pageins (macOS): absent, not 0."""
    pmem = fill(PMEM_PSUTIL8[os])
    _, platform = map_memory(os, pmem)
    assert set(platform) == SEED_TABLE[os] & set(pmem._fields)
    dropped = SEED_TABLE[os] - set(pmem._fields)
    assert dropped and not dropped & set(platform)


def test_windows_fields_a_newer_psutil_renamed_keep_the_seed_names() -> None:
    """wset/peak_wset/pagefile/peak_pagefile/private, renamed by psutil, are read from the new names
    (never through psutil's deprecated aliases), so records look the same under either version."""
    pmem = fill(PMEM_PSUTIL8["windows"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        portable, platform = map_memory("windows", pmem)
    assert set(platform) == SEED_TABLE["windows"]
    assert portable == {"rss": pmem.rss, "vms": pmem.vms}
    assert (platform["wset"], platform["peak_wset"]) == (pmem.rss, pmem.peak_rss)
    assert (platform["pagefile"], platform["peak_pagefile"]) == (pmem.vms, pmem.peak_vms)
    assert platform["private"] == pmem.vms
    assert platform["num_page_faults"] == pmem.num_page_faults and platform["paged_pool"] == pmem.paged_pool
    with pytest.warns(DeprecationWarning):  # the fake does warn, so the check above can fail
        assert pmem.wset == pmem.rss


@pytest.mark.parametrize("os", ["linux", "darwin", "windows"])
def test_a_newer_psutil_samples_full_through_memory_footprint(os: str) -> None:
    """Where psutil has memory_footprint(), full comes from it and the deprecated
    memory_full_info() is never called (it warns; warnings are errors here)."""
    fake = FakePsutil(major=8)
    fake.add(9, fill(PMEM_PSUTIL8[os]), fill(PFOOTPRINT_PSUTIL8[os], base=5000))
    backend = backend_for(os, fake)
    identities = [p.identity for p in backend.list_processes()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        [reading] = backend.sample(identities, full=True)
    assert isinstance(reading, Reading)
    footprint = fill(PFOOTPRINT_PSUTIL8[os], base=5000)
    assert reading.full == {f: getattr(footprint, f) for f in footprint._fields}
    with pytest.warns(DeprecationWarning):
        fake.Process(9).memory_full_info()


@pytest.mark.parametrize(("os", "expected"), [
    ("linux", {"uss", "pss", "swap"}), ("darwin", {"uss"}), ("windows", {"uss"}),
    ("freebsd", set()), ("sunos", set()), ("aix", set())])
def test_full_maps_only_the_fields_that_exist(os: str, expected: set[str]) -> None:
    """memory_full_info: uss/pss/swap where the OS has them, nothing invented elsewhere."""
    assert set(map_full(fill(PFULLMEM[os]))) == expected


@pytest.mark.parametrize(("platform", "expected"), [
    ("linux", "linux"), ("darwin", "darwin"), ("win32", "windows"), ("freebsd14", "freebsd"),
    ("openbsd7", "openbsd"), ("netbsd10", "netbsd"), ("sunos5", "sunos"), ("aix7", "aix")])
def test_os_names(platform: str, expected: str) -> None:
    """sys.platform values map to the schema's os names."""
    assert os_name(platform) == expected


def test_windows_backend_end_to_end_with_fakes() -> None:
    """A Windows-shaped psutil: listing, identity, wset/pagefile as rss/vms, uss in full."""
    fake = FakePsutil()
    fake.add(4, fill(PMEM["windows"]), fill(PFULLMEM["windows"]), name="svchost.exe",
             cmdline=["C:\\Windows\\svchost.exe", "-k"], username="NT AUTHORITY\\SYSTEM")
    backend = backend_for("windows", fake)
    [info] = backend.list_processes()
    assert (info.pid, info.name, info.user, info.cgroup) == (4, "svchost.exe", "NT AUTHORITY\\SYSTEM", None)
    [reading] = backend.sample([info.identity], full=True)
    pmem = fill(PMEM["windows"])
    assert isinstance(reading, Reading)
    assert reading.portable == {"rss": pmem.wset, "vms": pmem.pagefile}
    assert reading.full == {"uss": fill(PFULLMEM["windows"]).uss}


def test_process_errors_become_results() -> None:
    """Vanished → Gone, denied → access_denied Failure, zombie → zeros, denied full → problem."""
    fake = FakePsutil()
    fake.add(1, fill(PMEM["darwin"]), fill(PFULLMEM["darwin"]))
    fake.add(2, fill(PMEM["darwin"]))
    fake.add(3, None)
    fake.table[3]["raise"] = AccessDenied(3)
    fake.add(4, None)
    fake.table[4]["raise"] = ZombieProcess(4)
    fake.add(5, fill(PMEM["darwin"]))
    fake.table[5]["raise_full"] = AccessDenied(5, msg="task_for_pid failed")
    backend = backend_for("darwin", fake)
    identities = [p.identity for p in backend.list_processes()]
    del fake.table[2]
    results = backend.sample(identities, full=True)
    assert isinstance(results[0], Reading) and results[0].platform == {"pfaults": 1002, "pageins": 1003}
    assert results[1] == Gone(*identities[1])
    assert isinstance(results[2], Failure) and results[2].kind == "access_denied"
    assert isinstance(results[3], Reading) and results[3].portable == {"rss": 0, "vms": 0}
    assert isinstance(results[4], Reading) and results[4].full is None
    assert results[4].problems[0][0] == "full_denied"


def test_reused_pid_is_gone() -> None:
    """A pid whose create_time changed is a different process: Gone for the old identity."""
    fake = FakePsutil()
    fake.add(7, fill(PMEM["freebsd"]))
    backend = backend_for("freebsd", fake)
    [info] = backend.list_processes()
    fake.table[7]["create_time"] = 1_800_000_000.0
    assert backend.sample([info.identity], full=False) == [Gone(*info.identity)]


def test_forced_on_linux_agrees_with_the_native_backend() -> None:
    """Real psutil on this machine: the same rss/vms/platform as the linux backend (± a page)."""
    import os

    native, via_psutil = LinuxBackend(), PsutilBackend()
    me = os.getpid()
    ours = native.describe(next(p for p in native.list_processes() if p.pid == me))
    assert ours is not None
    theirs = next(p for p in via_psutil.list_processes() if p.pid == me)
    for field in ("name", "cmdline", "exe", "user"):
        assert getattr(ours, field) == getattr(theirs, field)
    assert abs(ours.started - theirs.started) < 0.02
    [a] = native.sample([ours.identity], full=False)
    [b] = via_psutil.sample([theirs.identity], full=False)
    assert isinstance(a, Reading) and isinstance(b, Reading)
    assert set(a.platform) == set(b.platform) and via_psutil.os == "linux"
    for key in ("rss", "vms"):
        assert abs(a.portable[key] - b.portable[key]) <= 64 * 4096  # the interpreter moves between reads


def test_cli_forced_psutil_on_linux_matches_ps(write_config: Callable[[str], Path]) -> None:
    """`backend = "psutil"` through `memagent run`: os linux, Linux's platform fields, rss/vms = ps."""
    child = spawn_allocator(50)
    try:
        config = write_config(f'[agent]\nbackend = "psutil"\n[[targets]]\nname = "child"\npid = {child.pid}\n'
                              'full = true\n[[sinks]]\ntype = "stdout"\n')
        result = run_cli("run", str(config), "--once")
        ps_rss, ps_vsz = ps_rss_vsz(child.pid)
    finally:
        stop_child(child)
    assert result.returncode == 0, result.stderr
    [sample] = [r for r in parse_records(result.stdout) if r["type"] == "sample"]
    assert (sample["os"], sample["backend"], sample["pid"]) == ("linux", "psutil", child.pid)
    assert set(sample["platform"]) == SEED_TABLE["linux"] and set(sample["full"]) == {"uss", "pss", "swap"}
    assert abs(sample["portable"]["rss"] - ps_rss) <= 2 * 4096
    assert abs(sample["portable"]["vms"] - ps_vsz) <= 2 * 4096



def test_psutil_backend_caps_command_lines_like_linux() -> None:
    """A process with 1 MiB of arguments through psutil: cut to 32 KiB and marked, and the mark
    survives a reparenting (the listing rebuilds the info)."""
    from test_backend_psutil import backend_for

    from memagent.contracts import CMDLINE_MAX_BYTES

    from fake_psutil import PMEM, FakePsutil, fill

    fake = FakePsutil()
    fake.add(4, fill(PMEM["darwin"]), cmdline=["/bin/big"] + ["x" * 4096] * 256)
    backend = backend_for("darwin", fake)
    [info] = backend.list_processes()
    assert info.cmdline_truncated and len("\0".join(info.cmdline).encode()) <= CMDLINE_MAX_BYTES
    fake.table[4]["ppid"] = 77
    [info] = backend.list_processes()
    assert info.ppid == 77 and info.cmdline_truncated

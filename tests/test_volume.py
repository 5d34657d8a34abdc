"""Volume control and the cost guard on real processes: top, min_rss, full_every, full_max_rss."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memagent.config import parse_config
from memagent.errors import ConfigError

from cli_helpers import parse_records, run_cli, spawn_allocator, stop_child

MARKER = "memagent-volume-test"


@pytest.fixture(scope="module")
def three_sizes() -> Any:
    """Three real children holding 10, 60 and 120 MiB."""
    children = {mib: spawn_allocator(mib, marker=MARKER) for mib in (10, 60, 120)}
    yield children
    for child in children.values():
        stop_child(child)


def run_for(write_config: Callable[[str], Path], target_options: str, duration: str = "1") -> list[Any]:
    config = write_config(f'[agent]\ninterval = "100ms"\n[[targets]]\nname = "w"\ncmdline = "{MARKER}"\n'
                          + target_options)
    result = run_cli("run", str(config), "--duration", duration)
    assert result.returncode == 0, result.stderr
    return parse_records(result.stdout)


def sampled_pids(records: list[Any]) -> set[int]:
    return {r["pid"] for r in records if r["type"] == "sample"}


def test_top_samples_only_the_largest(three_sizes: Any, write_config: Callable[[str], Path]) -> None:
    """top = 2: only the 60 and 120 MiB children get start and sample records; the third is
    counted as unsampled."""
    records = run_for(write_config, "top = 2\n")
    assert sampled_pids(records) == {three_sizes[60].pid, three_sizes[120].pid}
    assert {r["pid"] for r in records if r["type"] == "start"} == sampled_pids(records)
    assert [r for r in records if r["type"] == "agent"][-1]["agent"]["unsampled"] == 1


def test_min_rss_samples_only_the_large_enough(three_sizes: Any, write_config: Callable[[str], Path]) -> None:
    """min_rss = "100MiB": only the 120 MiB child."""
    records = run_for(write_config, 'min_rss = "100MiB"\n')
    assert sampled_pids(records) == {three_sizes[120].pid}


def test_full_every_reads_full_on_every_nth_tick(
        three_sizes: Any, write_config: Callable[[str], Path]) -> None:
    """full_every = 3: a process's samples carry uss/pss/swap on ticks 1, 4, 7... only."""
    records = run_for(write_config, "full = true\nfull_every = 3\ntop = 1\n", duration="1.5")
    with_full = [("full" in r) for r in records if r["type"] == "sample"]
    assert len(with_full) >= 6
    assert with_full == [index % 3 == 0 for index in range(len(with_full))]


def test_full_max_rss_never_reads_a_huge_process_in_full(
        three_sizes: Any, write_config: Callable[[str], Path],
        validate_record: Callable[[dict[str, Any]], None]) -> None:
    """full_max_rss = "50MiB": the 60 and 120 MiB children never get full (one full_skipped
    notice each), the 10 MiB one does from its second tick on (its size known by then)."""
    records = run_for(write_config, 'full = true\nfull_max_rss = "50MiB"\n')
    for record in records:
        validate_record(record)
    samples = [r for r in records if r["type"] == "sample"]
    small, big = three_sizes[10].pid, {three_sizes[60].pid, three_sizes[120].pid}
    assert not [s for s in samples if s["pid"] in big and "full" in s]
    small_full = [("full" in s) for s in samples if s["pid"] == small]
    assert small_full[0] is False and all(small_full[1:]) and len(small_full) >= 3
    notices = [r for r in records if r["type"] == "error" and r["error"]["kind"] == "full_skipped"]
    assert sorted(n["pid"] for n in notices) == sorted(big)
    assert [r for r in records if r["type"] == "agent"][-1]["agent"]["full_skipped"] >= 2 * 5


def test_cost_guard_options_need_full() -> None:
    """full_every / full_max_rss without full = true is a config error naming the key."""
    with pytest.raises(ConfigError, match=r"targets\[1\]\.full_every: goes with full = true"):
        parse_config('[[targets]]\nname = "a"\nall = true\nfull_every = 2\n')

"""Per-target totals: each tick, the target's processes counted and their memory summed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli_helpers import parse_records, ps_rss_vsz, run_cli, spawn_allocator, stop_child


def test_totals_equal_the_sum_of_the_tick_samples_and_ps(
        write_config: Callable[[str], Path], validate_record: Callable[[dict[str, Any]], None]) -> None:
    """Three real children (10, 20, 30 MiB) in one target with totals and full: each tick's
    totals record follows its samples, counts 3 processes, and its sums equal the samples'
    (and rss within a page-fault's drift of what ps reports)."""
    children = [spawn_allocator(mib, marker="memagent-totals-test") for mib in (10, 20, 30)]
    try:
        config = write_config('[agent]\ninterval = "200ms"\n'
                              '[[targets]]\nname = "workers"\ncmdline = "memagent-totals-test"\n'
                              'totals = true\nfull = true\n'
                              '[[targets]]\nname = "me"\nself = true\n')
        result = run_cli("run", str(config), "--duration", "1")
        ps_rss = sum(ps_rss_vsz(child.pid)[0] for child in children)
    finally:
        for child in children:
            stop_child(child)
    assert result.returncode == 0, result.stderr
    records = parse_records(result.stdout)
    for record in records:
        validate_record(record)
    totals = [r for r in records if r["type"] == "totals"]
    assert totals and all(t["target"] == "workers" for t in totals)  # only where asked
    for total in totals:
        samples = [r for r in records if r["type"] == "sample" and r["target"] == "workers"
                   and r["ts"] == total["ts"]]
        assert total["processes"] == len(samples) == 3
        assert total["rss"] == sum(s["portable"]["rss"] for s in samples)
        assert total["vms"] == sum(s["portable"]["vms"] for s in samples)
        assert total["full_processes"] == 3
        assert total["uss"] == sum(s["full"]["uss"] for s in samples)
        assert total["pss"] == sum(s["full"]["pss"] for s in samples)
        assert max(r["seq"] for r in samples) < total["seq"]  # after the tick's samples
    assert abs(totals[-1]["rss"] - ps_rss) <= 3 * 64 * 4096


def test_a_target_that_matches_nothing_totals_zero(write_config: Callable[[str], Path]) -> None:
    """totals for a target with no process: processes 0, sums 0 (down, not unknown)."""
    config = write_config('[agent]\ninterval = "200ms"\n'
                          '[[targets]]\nname = "ghost"\ncomm = "no-such-process-xyz"\ntotals = true\n')
    result = run_cli("run", str(config), "--duration", "0.7")
    assert result.returncode == 0, result.stderr
    totals = [r for r in parse_records(result.stdout) if r["type"] == "totals"]
    assert totals and {(t["processes"], t["rss"], t["vms"]) for t in totals} == {(0, 0, 0)}
    assert all("uss" not in t for t in totals)


def test_totals_in_text_format(write_config: Callable[[str], Path]) -> None:
    """format = "text" shows a totals line with the target and the summed sizes."""
    config = write_config('[[targets]]\nname = "me"\nself = true\ntotals = true\n'
                          '[[sinks]]\ntype = "stdout"\nformat = "text"\n')
    result = run_cli("run", str(config), "--once")
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if " totals " in line]
    assert " me totals processes=1 rss=" in line and "MiB" in line

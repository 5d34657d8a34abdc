"""Alert rules on real processes: a leak fires once, a one-off allocation never, a threshold
fires and resolves; the rules' config is checked."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memagent.alerts import parse_rate, parse_rules, theil_sen
from memagent.errors import ConfigError

from cli_helpers import parse_records, run_agent, spawn_ready, stop_child, wait_for

#: A child that obeys stdin: "grow MIB MS" grows by MIB every MS ms until the next command,
#: "alloc MIB" allocates a block at once, "free" drops everything; it prints "ok" after each.
WORKER = textwrap.dedent("""
    import select, sys, time
    blocks, grow = [], None
    print("ready", flush=True)
    while True:
        timeout = grow[1] / 1000 if grow else None
        ready, _, _ = select.select([sys.stdin], [], [], timeout)
        if ready:
            line = sys.stdin.readline()
            if not line:
                break
            command, *args = line.split()
            if command == "grow":
                grow = (int(args[0]), int(args[1]))
            elif command == "alloc":
                grow = None
                blocks.append(bytearray(int(args[0]) << 20))
                for i in range(0, len(blocks[-1]), 4096):
                    blocks[-1][i] = 1
            elif command == "free":
                grow, blocks = None, []
            print("ok", flush=True)
        elif grow:
            block = bytearray(grow[0] << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            blocks.append(block)
""")


def tell(child: Any, command: str) -> None:
    child.stdin.write(command + "\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "ok"


def test_rules_parse_and_bad_ones_name_their_key() -> None:
    """Sizes, rates and windows parse; a rule with both or neither kind, a bad rate or an
    unknown key is one error naming the dotted key."""
    [above, grows] = parse_rules([{"rss_above": "2GB"}, {"grows_above": "50MB/h", "over": "30m"}],
                                 "targets[1].alerts")
    assert (above.rss_above, above.text) == (2_000_000_000, "rss > 2GB")
    assert grows.grows_above == pytest.approx(50e6 / 3600) and grows.over == 1800
    assert grows.text == "rss grows > 50MB/h over 30m"
    assert parse_rate("1MiB/s", "k") == 1 << 20
    for raw, message in (([{}], r"targets\[1\].alerts\[1\]: needs exactly one of"),
                         ([{"rss_above": "1GB", "grows_above": "1MB/s"}], "needs exactly one of"),
                         ([{"grows_above": "fast"}], r"alerts\[1\].grows_above: must be a growth rate"),
                         ([{"rss_above": "1GB", "over": "1m"}], r"alerts\[1\].over: goes with grows_above"),
                         ([{"rss_abov": "1GB"}], "rss_abov: unknown key")):
        with pytest.raises(ConfigError, match=message):
            parse_rules(raw, "targets[1].alerts")


def test_theil_sen_ignores_a_minority_of_outliers() -> None:
    """The slope of a steady line survives a few wild points (least squares would not)."""
    points = [(float(t), 100 * t) for t in range(20)]
    points[5] = (5.0, 10**9)
    points[12] = (12.0, -(10**9))
    assert theil_sen(points) == pytest.approx(100)


def test_leak_fires_once_one_off_block_never_threshold_fires_and_resolves(
        tmp_path: Path, validate_record: Callable[[dict[str, Any]], None]) -> None:
    """Real children under one agent: a steady grower fires its growth rule once and never
    resolves while growing; a child that allocates one 60 MiB block after the warm-up never
    fires it; a child that crosses rss_above fires, then resolves when it frees."""
    leak, block, spike = (spawn_ready(WORKER, f"memagent-alert-{role}")
                          for role in ("leak", "block", "spike"))
    out = tmp_path / "out.ndjson"
    config = tmp_path / "config.toml"
    config.write_text(f"""
[agent]
interval = "100ms"
rescan = "500ms"
[[targets]]
name = "workers"
cmdline = "memagent-alert-"
[[targets.alerts]]
grows_above = "10MiB/s"
over = "3s"
[[targets.alerts]]
rss_above = "120MiB"
[[sinks]]
type = "file"
path = "{out}"
fsync = "never"
""")
    agent = run_agent(config)
    try:
        wait_for(lambda: out.exists() and out.read_text().count('"type":"sample"') >= 3 * 40)  # > warm-up
        tell(leak, "grow 4 100")  # ~40 MiB/s
        tell(block, "alloc 60")  # a one-off step, below rss_above
        tell(spike, "alloc 200")  # above rss_above
        wait_for(lambda: '"state":"firing"' in out.read_text() and out.read_text().count('"alert"') >= 2)
        tell(spike, "free")
        wait_for(lambda: '"state":"resolved"' in out.read_text())
        # until the block's step has left the 3 s window
        wait_for(lambda: out.read_text().count('"type":"sample"') >= 3 * 80)
    finally:
        finished = agent.stop()
        for child in (leak, block, spike):
            stop_child(child)
    assert finished.returncode == 0, finished.stderr
    records = parse_records(out.read_text())
    alerts = [r for r in records if r["type"] == "alert"]
    for alert in alerts:
        validate_record(alert)
    by_pid = {child.pid: [(a["rule"], a["state"]) for a in alerts if a["pid"] == child.pid]
              for child in (leak, block, spike)}
    growth_rule = "rss grows > 10MiB/s over 3s"
    assert by_pid[leak.pid].count((growth_rule, "firing")) == 1
    assert (growth_rule, "resolved") not in by_pid[leak.pid]  # not while it was growing
    assert all(rule != growth_rule for rule, _ in by_pid[block.pid])  # the one-off block never fired
    assert by_pid[spike.pid][:2] == [("rss > 120MiB", "firing"), ("rss > 120MiB", "resolved")]
    fired = next(a for a in alerts if a["pid"] == leak.pid and a["rule"] == growth_rule)
    assert fired["growth_per_hour"] > 10 * 2**20 * 3600 and fired["window_s"] == 3


def test_rss_above_limit_parses_and_bad_shares_name_their_key() -> None:
    """"90%" is 0.9 of the cgroup limit; a share that is not a percentage in (0, 100] is one
    error naming the key; it cannot be combined with another kind of rule."""
    [rule] = parse_rules([{"rss_above_limit": "90%"}], "targets[1].alerts")
    assert (rule.rss_above_limit, rule.text) == (0.9, "rss > 90% of cgroup limit")
    for raw, message in (([{"rss_above_limit": "90"}], r"alerts\[1\].rss_above_limit: must be a percentage"),
                         ([{"rss_above_limit": "0%"}], "must be a percentage"),
                         ([{"rss_above_limit": "150%"}], "must be a percentage"),
                         ([{"rss_above_limit": 0.9}], "must be a percentage"),
                         ([{"rss_above_limit": "90%", "rss_above": "1GB"}], "needs exactly one of"),
                         ([{"rss_above_limit": "90%", "over": "1m"}], "over: goes with grows_above")):
        with pytest.raises(ConfigError, match=message):
            parse_rules(raw, "targets[1].alerts")


def test_rss_above_limit_fires_against_the_cgroup_limit_of_this_tick(
        validate_record: Callable[[dict[str, Any]], None]) -> None:
    """The rule compares each sample with the effective limit its cgroup's record gave this tick:
    it fires once above 90% (with the threshold and limit), resolves below, resolves when the
    limit is lifted; a process in a cgroup without a limit, or in none, never fires."""
    from memagent.alerts import AlertProcessor
    from memagent.contracts import MemoryCgroup, ProcessInfo, Reading
    from memagent.records import RecordMaker

    maker = RecordMaker(host="h", os_name="linux", backend="linux", tags={})
    processor = AlertProcessor(maker, {"api": parse_rules([{"rss_above_limit": "90%"}], "k")})
    limited, free = MemoryCgroup(2, "/limited"), MemoryCgroup(1, "/free")
    infos = [ProcessInfo(pid=pid, ppid=1, name="api", started=1.0, memory_cgroup=cgroup)
             for pid, cgroup in ((10, limited), (11, free), (12, None))]
    ts = "2026-11-25T05:00:00.000000Z"

    def tick(limit: int | None, rss: int) -> list[dict[str, Any]]:
        chunk = [maker.cgroup(["api"], limited, 1, {"version": 2, "current": rss, "max": limit,
                                                      "effective_max": limit}, None, ts),
                 maker.cgroup(["api"], free, 1, {"version": 1, "current": rss, "max": None,
                                                   "effective_max": None}, None, ts)]
        chunk += [maker.sample("api", info, Reading(info.pid, 1.0, {"rss": rss, "vms": rss}, {}), ts)
                  for info in infos]
        made = [d.fields for d in processor.process(chunk) if d.type == "alert"]
        for alert in made:
            validate_record({**alert, "seq": 1})
        return made

    assert tick(1000, 800) == []
    [fired] = tick(1000, 950)
    assert (fired["pid"], fired["state"], fired["rss"], fired["threshold"], fired["limit"]) == (
        10, "firing", 950, 900, 1000)
    assert fired["rule"] == "rss > 90% of cgroup limit"
    assert tick(1000, 990) == []  # still holding: no record per tick
    [resolved] = tick(1000, 100)
    assert (resolved["pid"], resolved["state"]) == (10, "resolved")
    assert tick(2000, 1900)[0]["state"] == "firing"
    [lifted] = tick(None, 1900)  # the limit went away: the rule no longer holds
    assert (lifted["state"], "limit" in lifted) == ("resolved", False)

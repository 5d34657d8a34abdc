"""Issue 8's side-by-side benchmark: memagent next to a psutil script, the ``process_iter``
script and the pread, Python and C floors, in one run, on ~1,000 idle processes it spawns itself.

    tox -e bench [-- --quick | --long] [--processes N] [--seconds S] [--json PATH]
    python tests/benchmarks/suite.py ...      (the same, in an environment with memagent + psutil)

Defaults take about three minutes on a 2-core machine, ``--quick`` under two (15 s at rest, shorter
throughput and timing runs), ``--long`` runs at rest for 10 minutes (the memory target).
``--smoke`` runs every part for a second or two on whatever ``--processes`` says: it checks that
the suite works (tests/test_benchmarks.py), its figures mean little.

For each target of the issue it prints memagent's figure, the peers' figures, the ratio, the
target and whether it is met, as a Markdown table, and writes every figure and the raw
measurements as JSON (``--json``, default ``bench-results.json`` in the current directory). A
target not met is a figure, not a failure: the exit status is 1 only when a part could not be
measured (its error is printed and recorded). What each part runs is in scenarios.py; the peers
are in peers.py. The idle processes and every other child are stopped whatever happens
(Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import scenarios
from harness import Children, Sleepers, machine_facts, process_count, raise_fd_limit, stopped_on_sigterm
from scenarios import Bench, Plan

PLANS = {
    "default": Plan(),
    "quick": Plan(at_rest=15, throughput=4, rounds=10, timing=10, ws_seconds=5),
    "long": Plan(at_rest=600),
    "smoke": Plan(processes=50, at_rest=4, window=2, throughput=0.5, warmup=0.5, rounds=3, timing=2,
                  ws_seconds=1, ws_clients=5, ws_rate=200),
}

MiB = 1 << 20


@dataclass
class Figure:
    """One row of the table: memagent's figure, the peers' (same run), a ratio, the target."""

    key: str
    target_no: int
    label: str
    unit: str
    value: float | None
    peers: dict[str, float | None] = field(default_factory=dict)
    ratio: float | None = None
    ratio_of: str = ""  # what the ratio divides, e.g. "psutil best case ÷ memagent"
    target: str = ""
    met: bool | None = None
    zero_ok: bool = False  # counts (ticks skipped) may be 0; every other figure is > 0
    shown: str = ""  # memagent's cell when more than the value is worth showing
    verdict: str = ""  # the met cell when neither "met" nor "not met" says it


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if unit == "records/s":
        return f"{value / 1000:,.1f}k/s"
    if unit in ("µs", "%", "ms", "s") and value < 10:
        return f"{value:.2f} {unit}"
    if unit == "count":
        return f"{value:.0f}"
    return f"{value:,.1f} {unit}"


def ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def at_most(value: float | None, limit: float | None) -> bool | None:
    return None if value is None or limit is None else value <= limit


def at_least(value: float | None, limit: float | None) -> bool | None:
    return None if value is None or limit is None else value >= limit


def dig(raw: dict[str, Any], *path: str) -> Any:
    """``raw[a][b]...``, or None where a part is missing (it failed: its error is reported)."""
    for key in path:
        if not isinstance(raw, dict) or key not in raw:
            return None
        raw = raw[key]
    return raw


def figures(raw: dict[str, Any], plan: Plan) -> list[Figure]:
    """The table's rows from the raw measurements; a part that failed leaves its figures None."""
    rest = raw.get("at_rest") or {}
    cpu = rest.get("cpu", {})
    rescan = rest.get("rescan_s") or 2.0
    reading = dig(raw, "reading_and_rescans", "reading") or {}
    rescans = dig(raw, "reading_and_rescans", "rescans") or {}
    timing = raw.get("timing") or {}
    loops = timing.get("peers", {})

    def row(key: str, no: int, label: str, unit: str, ours: float | None, peers: dict[str, float | None],
            versus: str, target: str, *, ours_over: bool = True, ratio_at_most: float | None = None,
            ratio_at_least: float | None = None, value_at_most: float | None = None,
            ratio_of: str = "") -> Figure:
        """A row whose ratio is memagent over the peer named ``versus`` (``ours_over``) or that
        peer over memagent, met when the ratio or the value is within the limit given."""
        other = peers[versus]
        shown = ratio(ours, other) if ours_over else ratio(other, ours)
        checks = [(at_most(shown, ratio_at_most), ratio_at_most),
                  (at_least(shown, ratio_at_least), ratio_at_least),
                  (at_most(ours, value_at_most), value_at_most)]
        given = [check for check, limit in checks if limit is not None]
        met = None if not given or None in given else all(given)
        text = ratio_of or (f"memagent ÷ {versus}" if ours_over else f"{versus} ÷ memagent")
        return Figure(key, no, label, unit, ours, peers, shown, text, target, met)

    processes = rest.get("processes_on_machine", "?")
    rows = [
        row("at_rest_cpu", 1, f"1 Hz, all {processes} processes, % of one core "
                              f"(median of {plan.window:g} s windows, {rest.get('seconds', '?')} s)",
            "%", dig(cpu, "memagent", "median_pct"),
            {"psutil best case": dig(cpu, "best-case", "median_pct"),
             "process_iter script": dig(cpu, "process-iter", "median_pct"),
             "pread floor": dig(cpu, "pread-floor", "median_pct"),
             "Python floor": dig(cpu, "python-floor", "median_pct"),
             "C floor": dig(cpu, "c-floor", "median_pct")},
            "psutil best case", "≤ 0.5 % and ≥ 4× cheaper than the best case", ours_over=False,
            ratio_at_least=4, value_at_most=0.5),
        # the start record is stamped after the listing that found the process: allow for that listing
        Figure("discovery", 1, "process spawned during the at-rest run: its start record after (worst of 3)",
               "s", rest.get("discovery_s"), target=f"≤ the rescan period ({rescan:g} s, + 0.25 s listing)",
               met=at_most(rest.get("discovery_s"), rescan + 0.25)),
    ]
    names = {"best-case": "psutil best case", "process-iter": "process_iter script",
             "python-floor": "Python floor"}
    for suffix, label, extra in (("1_sink", "file sink", ""),
                                 ("3_sinks", "3 sinks (2 files + stdout to /dev/null)", " (encode once)")):
        run = f"memagent-{suffix.replace('_', '-')}"
        peers = ("best-case", "process-iter", "python-floor") if suffix == "1_sink" else ("best-case",)
        rows.append(row(
            f"throughput_{suffix}", 2, f"1 ms interval, all processes, {label}: records/s end to end "
                                       f"({plan.throughput:g} s)",
            "records/s", dig(raw, "throughput", run, "records_per_s"),
            {names[p]: dig(raw, "throughput", p, "records_per_s") for p in peers},
            "psutil best case", "≥ 3× the best case" + extra, ratio_at_least=3))
        rows.append(row(
            f"cpu_per_record_{suffix}", 2, f"CPU per record, {label}", "µs",
            dig(raw, "throughput", run, "cpu_us_per_record"),
            {names[p]: dig(raw, "throughput", p, "cpu_us_per_record") for p in peers},
            "psutil best case", "≤ 6 µs", ours_over=False, value_at_most=6))
    held = reading.get("processes", "?")
    rows += [
        row("read_memory_info", 3, f"memory_info numbers, per process ({held} held identities)", "µs",
            dig(reading, "memory_info_us", "memagent"),
            {"psutil memory_info()": dig(reading, "memory_info_us", "psutil"),
             "pread floor": dig(reading, "memory_info_us", "floor")},
            "pread floor", "≤ 2× the floor", ratio_at_most=2),
        row("read_full", 3, "full (uss/pss/swap), per process", "µs", dig(reading, "full_us", "memagent"),
            {"psutil memory_full_info()": dig(reading, "full_us", "psutil"),
             "smaps_rollup pread floor": dig(reading, "full_us", "floor")},
            "smaps_rollup pread floor", "≤ 2× the floor", ratio_at_most=2),
        row("rescan_known_pid", 4, f"rescan, per known pid (nothing changed; {rescans.get('listed', '?')} "
                                   "pids)", "µs", dig(rescans, "known_pid_us", "memagent"),
            {"psutil process_iter() (warm)": dig(rescans, "known_pid_us", "psutil"),
             "scandir floor": dig(rescans, "known_pid_us", "floor")},
            "scandir floor", "≤ 2 µs", value_at_most=2),
        row("rescan_new_pid", 4, f"rescan, per new pid ({rescans.get('new_batch', '?')} new at once)", "µs",
            dig(rescans, "new_pid_us", "memagent"),
            {"psutil Process().as_dict(6 attrs)": dig(rescans, "new_pid_us", "psutil"),
             "one stat read (floor)": dig(rescans, "new_pid_us", "floor")},
            "one stat read (floor)", "one bounded read (≤ 2× the floor)", ratio_at_most=2),
        row("rescan_new_pid_described", 4, "same, each also described (cmdline, exe, user, cgroup: what an "
                                            "all-process target's start record needs)", "µs",
            dig(rescans, "new_pid_us", "memagent described"),
            {"psutil Process().as_dict(6 attrs)": dig(rescans, "new_pid_us", "psutil")},
            "psutil Process().as_dict(6 attrs)", "—"),
    ]
    for which, target, limit in (("p50", "—", None), ("p99", "≤ 1 ms", 1.0)):
        label = (f"10 ms target next to a 1 s all-process target ({plan.timing:g} s): tick lateness p50"
                 if which == "p50" else "same: tick lateness p99")
        rows.append(row(
            f"lateness_{which}", 5, label, "ms", timing.get(f"{which}_ms"),
            {"time.sleep loop": dig(loops, "sleep-loop", f"{which}_ms"),
             "asyncio.sleep loop": dig(loops, "asyncio-loop", f"{which}_ms")},
            "time.sleep loop", target, value_at_most=limit))
    rows.append(Figure("ticks_skipped", 5, "same: ticks skipped (agent records)", "count",
                       timing.get("ticks_skipped"),
                       {"10 ms slots without a record": timing.get("slots_without_tick")},
                       target="0", met=at_most(timing.get("ticks_skipped"), 0), zero_ok=True))

    rss = rest.get("rss") or {}
    start, end = rss.get("start"), rss.get("end")
    seconds = rest.get("seconds") or 0
    memory = Figure("agent_rss", 6, f"agent RSS in the at-rest run, {rss.get('start_at_s', '?')} s in → end "
                                    f"({seconds} s)", "MiB",
                    None if end is None else end / MiB, target="flat over 10 min (--long)")
    if start is not None and end is not None:
        flat = end - start <= max(MiB, 0.02 * start)  # "flat": within 1 MiB or 2 %, whichever is more
        memory.shown = f"{start / MiB:.1f} → {end / MiB:.1f} MiB ({(end - start) / MiB:+.1f})"
        if seconds >= 600:
            memory.met = flat
        else:
            memory.verdict = f"{'flat' if flat else 'grew'} over {seconds} s"
    rows.append(memory)
    ws_with, ws_without = raw.get("websocket_with_processes") or {}, raw.get("websocket_without") or {}
    without = f"same, {ws_without.get('processes_on_machine', '?')} processes"
    reached = [f"{run['records_per_s']:,.0f}" for run in (ws_with, ws_without) if "records_per_s" in run]
    rows.append(row(
        "websocket_p99", 6, f"bench_websocket.py p99, {plan.ws_clients} clients + 1 stalled at "
                            f"{plan.ws_rate}/s (reached: {' / '.join(reached) or '?'}; "
                            f"{plan.ws_seconds:g} s), {ws_with.get('processes_on_machine', '?')} processes",
        "ms", ws_with.get("p99_ms"), {without: ws_without.get("p99_ms")}, without,
        "holds: ≤ 1.25× without them", ratio_at_most=1.25, ratio_of="with ÷ without the idle processes"))
    return rows


def table(facts: dict[str, Any], rows: list[Figure]) -> str:
    busy = ""
    if facts.get("load_before", 0) > 0.5:  # not idle: other work shares the cores with every figure
        busy = (f"; NOT IDLE: load average {facts['load_before']:.2f} before the suite, "
                f"{facts.get('load_after', 0):.2f} after")
    lines = [
        f"memagent benchmark suite — {facts['date']}, {facts['nproc']} cores ({facts['cpu']}), "
        f"kernel {facts['kernel']}, Python {facts['python']}, psutil {facts['psutil']}, "
        f"code {facts['commit']}",
        f"processes on the machine: {facts.get('processes_before', '?')} before the suite, "
        f"{facts.get('processes_during', '?')} with its idle ones{busy}; CPU from {facts['cpu_clock']}; "
        f"command: {facts['command']}",
        "",
        "| # | figure (same run) | memagent | peers | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        peers = "; ".join(f"{name} {fmt(value, row.unit)}" for name, value in row.peers.items()) or "—"
        shown_ratio = f"{row.ratio:.2f}× ({row.ratio_of})" if row.ratio is not None else "—"
        met = row.verdict or {True: "met", False: "**not met**", None: "—"}[row.met]
        lines.append(f"| {row.target_no} | {row.label} | {row.shown or fmt(row.value, row.unit)} | {peers} | "
                     f"{shown_ratio} | {row.target} | {met} |")
    return "\n".join(lines)


def run(plan: Plan, json_path: Path) -> int:
    raise_fd_limit()
    repo = Path(__file__).resolve().parent.parent.parent
    facts = machine_facts(repo)
    facts["processes_before"] = process_count()
    facts["load_before"] = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="memagent-bench-"))
    children = Children()
    # long enough for the whole run, short enough not to linger if the suite is SIGKILLed
    sleepers = Sleepers(lifetime=plan.at_rest + 900)
    raw: dict[str, Any] = {}
    errors: dict[str, str] = {}
    began = time.monotonic()

    def part(name: str, work: Callable[[], dict[str, Any]]) -> None:
        print(f"[{time.monotonic() - began:5.0f} s] {name} ...", file=sys.stderr, flush=True)
        try:
            raw[name] = work()
        except Exception:  # noqa: BLE001 - one part failing must not hide the others' figures
            errors[name] = traceback.format_exc()
            print(errors[name], file=sys.stderr, flush=True)

    try:
        from memagent.config import parse_config

        rescan = parse_config('[[targets]]\nname = "all"\nall = true\n', "<bench>").agent.rescan
        bench = Bench(plan, workdir, children, sleepers, rescan)
        part("websocket_without", lambda: scenarios.websocket(bench, "without"))
        print(f"[{time.monotonic() - began:5.0f} s] spawning {plan.processes} idle processes "
              f"(sleep {sleepers.marker}) ...", file=sys.stderr, flush=True)
        sleepers.spawn(plan.processes)
        facts["processes_during"] = process_count()
        part("reading_and_rescans", lambda: scenarios.reading_and_rescans(bench))
        part("at_rest", lambda: scenarios.at_rest(bench))
        part("throughput", lambda: scenarios.throughput(bench))
        part("timing", lambda: scenarios.timing(bench))
        part("websocket_with_processes", lambda: scenarios.websocket(bench, "with"))
    finally:
        children.stop_all()
        sleepers.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    facts["suite_seconds"] = round(time.monotonic() - began)
    facts["load_after"] = os.getloadavg()[0]
    rows = figures(raw, plan)
    print(table(facts, rows))
    if errors:
        print(f"\nparts that could not be measured: {', '.join(errors)} (tracebacks above and in the JSON)")
    json_path.write_bytes(orjson.dumps({
        "machine": facts, "plan": dataclasses.asdict(plan), "marker": sleepers.marker,
        "figures": [dataclasses.asdict(row) for row in rows],
        "raw": raw, "errors": errors,
    }, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"\nfigures written to {json_path} ({facts['suite_seconds']} s)")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs (under 2 minutes on 2 cores)")
    mode.add_argument("--long", action="store_true", help="at rest for 10 minutes (the memory target)")
    mode.add_argument("--smoke", action="store_true", help="a second or two per part: checks the suite works")
    parser.add_argument("--processes", type=int, help="idle processes to spawn (default 1000; --smoke 50)")
    parser.add_argument("--seconds", type=float, help="length of the at-rest run (default 60; --quick 15)")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"),
                        help="where the figures go (default: bench-results.json here)")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "long" if args.long else "smoke" if args.smoke else "default"]
    if args.processes is not None:
        plan = dataclasses.replace(plan, processes=args.processes)
    if args.seconds is not None:
        plan = dataclasses.replace(plan, at_rest=args.seconds)
    with stopped_on_sigterm():
        try:
            return run(plan, args.json)
        except KeyboardInterrupt:
            print("interrupted: every process the suite started is stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())

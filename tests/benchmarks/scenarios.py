"""The suite's measurements, one function per target of issue 8, each returning raw figures.

memagent is measured only through its public entry points, so the same code measures it before
and after its internals change: ``python -m memagent run CONFIG`` (a real agent writing real
files, its CPU and RSS read from /proc), and the backend built as the agent builds it
(``registry.build_backend``) through its public methods ``list_processes()`` and
``sample(identities, full)``. The peers (see peers.py) run as their own processes next to it, in
the same run, or in this process for the per-process micro figures.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psutil
from harness import Child, Children, CpuMeter, Sleepers, Tail, process_count, rss_of, wait_until

HERE = Path(__file__).resolve().parent
AGENT = [sys.executable, "-m", "memagent"]
PEERS = [sys.executable, str(HERE / "peers.py")]


@dataclass(frozen=True)
class Plan:
    """How long each part runs (seconds) and on how many processes."""

    processes: int = 1000
    at_rest: float = 60.0
    window: float = 4.0  # CPU windows at rest: a multiple of the default 2 s rescan, so each holds as many
    throughput: float = 10.0
    warmup: float = 2.0
    rounds: int = 20  # repetitions of each in-process micro figure (the median is kept)
    timing: float = 20.0
    ws_seconds: float = 10.0
    ws_clients: int = 100
    ws_rate: int = 2000


@dataclass
class Bench:
    """What every scenario shares."""

    plan: Plan
    workdir: Path
    children: Children
    sleepers: Sleepers
    rescan: float  # memagent's default rescan period, seconds

    def agent(self, name: str, config: str, cap: float) -> Child:
        """A real ``memagent run`` on ``config``; stops by itself after ``cap`` seconds at worst."""
        path = self.workdir / f"{name}.toml"
        path.write_text(config, encoding="utf-8")
        return self.children.start(name, [*AGENT, "run", str(path), "--duration", f"{cap:g}"], self.workdir)

    def peer(self, kind: str, *args: str) -> Child:
        return self.children.start(kind, [*PEERS, kind, *args], self.workdir)


def file_sink(path: Path, name: str = "file") -> str:
    return f'[[sinks]]\ntype = "file"\nname = "{name}"\npath = "{path}"\n'


ALL_TARGET = '[[targets]]\nname = "all"\nall = true\n'


def sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.time()))


def epoch_us(ts: str) -> int:
    """A record's ``ts`` (``2026-11-25T05:00:00.123456Z``) as integer microseconds since the epoch."""
    moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def median_times(rounds: int, works: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median wall time of each of ``works``, seconds, over ``rounds`` rounds that run each once
    in turn: on a machine doing other work too, every contender meets the same interference."""
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            began = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def last_agent_record(path: Path) -> dict[str, Any] | None:
    """The last ``agent`` record in an NDJSON file (read from its end)."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - (1 << 20)))
            lines = file.read().split(b"\n")
    except OSError:
        return None
    for line in reversed(lines):
        if b'"agent"' in line:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if record.get("type") == "agent":
                return record
    return None


# -- 1 and 6: at rest, discovery, the agent's own memory ----------------------------------------

def at_rest(bench: Bench) -> dict[str, Any]:
    """memagent at 1 Hz on every process next to the three peers at 1 Hz (ticks staggered), CPU
    of each per window; a process spawned late must get its ``start`` record within the rescan
    period; the agent's RSS each second."""
    plan = bench.plan
    out = bench.workdir / "at-rest.ndjson"
    peers = {kind: bench.peer(kind, "--interval", "1", "--offset", offset, "--rescan", f"{bench.rescan:g}",
                              "--out", str(bench.workdir / f"at-rest-{kind}.ndjson"))
             for kind, offset in (("c-floor", "0.1"), ("best-case", "0.2"), ("process-iter", "0.4"),
                                  ("pread-floor", "0.6"), ("python-floor", "0.8"))}
    agent = bench.agent("at-rest", f'[agent]\ninterval = "1s"\n\n{ALL_TARGET}\n{file_sink(out)}',
                        cap=plan.at_rest + 120)
    meters = {"memagent": CpuMeter(agent.pid), **{kind: CpuMeter(p.pid) for kind, p in peers.items()}}
    tail = Tail(out)
    samples, starts, agent_records = [0], {}, []

    def drain() -> int:
        for record in tail.records():
            kind = record.get("type")
            if kind == "sample":
                samples[0] += 1
            elif kind == "start":
                starts.setdefault(record["pid"], record["ts"])
            elif kind == "agent":
                agent_records.append(record["agent"])
        return samples[0]

    wait_until("memagent's first sample record", drain, 60, agent)
    # three processes spawned mid-run (the rescan's phase drifts against the 1 s loop), each at
    # least a rescan period and two seconds before the end
    steps = max(int(plan.at_rest), math.ceil(bench.rescan) + 3)
    last_spawn = steps - math.ceil(bench.rescan) - 2
    first_spawn = max(1, min(steps // 4, last_spawn))
    gap = (last_spawn - first_spawn) // 3
    spawn_at = [first_spawn + n * gap for n in range(3)]  # all at once when the run is short
    t0 = math.ceil(time.time()) + 0.5  # half-way between ticks: never reading a process mid-tick
    points: dict[str, list[tuple[float, float]]] = {name: [] for name in meters}
    rss: list[tuple[float, int]] = []
    spawned: dict[int, float] = {}
    for step in range(steps + 1):
        sleep_until(t0 + step)
        now = time.time()
        for name, meter in meters.items():
            points[name].append((now, meter.read()))
        rss.append((round(now - t0, 1), rss_of(agent.pid)))
        if step in spawn_at:
            when = time.time()  # before the fork: the delay measured is never too short
            spawned.update((pid, when) for pid in bench.sleepers.spawn(spawn_at.count(step)))
        drain()
    processes = process_count()
    bench.children.stop(agent)
    drain()
    # a peer that ended before the run did (c-floor with no C compiler) measured nothing
    ended = {kind for kind, child in peers.items() if child.process.poll() is not None}
    for child in peers.values():
        bench.children.stop(child)

    window = max(1, int(plan.window))
    cpu: dict[str, Any] = {}
    for name, series in points.items():
        if name in ended:
            cpu[name] = {"median_pct": None, "mean_pct": None, "windows_pct": [], "ended_early": True}
            continue
        windows = [(series[i + window][1] - series[i][1]) / (series[i + window][0] - series[i][0]) * 100
                   for i in range(0, len(series) - window, window)]
        whole = (series[-1][1] - series[0][1]) / (series[-1][0] - series[0][0]) * 100
        cpu[name] = {"median_pct": statistics.median(windows), "mean_pct": whole,
                     "windows_pct": [round(w, 3) for w in windows]}
    found = {pid: epoch_us(starts[pid]) / 1e6 - when if pid in starts else None
             for pid, when in spawned.items()}
    delays = [delay for delay in found.values() if delay is not None]
    rss_values = [value for _, value in rss[window:] if value]  # from the end of the first window: warm
    return {
        "seconds": steps, "window_s": window, "processes_on_machine": processes, "cpu": cpu,
        "samples_written": samples[0], "rescan_s": bench.rescan,
        "discovery_s": max(delays) if len(delays) == len(found) else None, "discovery_each_s": found,
        "rss": {"start": rss_values[0], "end": rss_values[-1], "max": max(rss_values), "start_at_s": window,
                "series": rss},
        "agent": agent_records[-1] if agent_records else None,
    }


# -- 2: throughput --------------------------------------------------------------------------------

def _rate(bench: Bench, child: Child, paths: Sequence[Path]) -> dict[str, Any]:
    """Lines per second appended to each of ``paths`` over the measured stretch (after the first
    line and a warm-up), and the child's CPU per line of the first."""
    tails = [Tail(path) for path in paths]
    meter = CpuMeter(child.pid)
    wait_until(f"{child.name}'s first record", lambda: tails[0].count() > 0, 60, child)
    time.sleep(bench.plan.warmup)
    counts, cpu0, t0 = [t.count() for t in tails], meter.read(), time.time()
    time.sleep(bench.plan.throughput)
    ends, cpu1, t1 = [t.count() for t in tails], meter.read(), time.time()
    records = ends[0] - counts[0]
    return {"records_per_s": records / (t1 - t0),
            "cpu_us_per_record": (cpu1 - cpu0) / records * 1e6 if records else None,
            "cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
            "records_per_s_each_file": [(e - c) / (t1 - t0) for c, e in zip(counts, ends, strict=True)]}


def throughput(bench: Bench) -> dict[str, Any]:
    """Flat out: memagent at a 1 ms interval over every process to one file, then to two files
    plus stdout (to /dev/null); the psutil best case and the process_iter script flat out."""
    results: dict[str, Any] = {}
    cap = bench.plan.warmup + bench.plan.throughput + 120
    for name, files, stdout in (("memagent-1-sink", 1, False), ("memagent-3-sinks", 2, True)):
        paths = [bench.workdir / f"{name}-{n}.ndjson" for n in range(files)]
        sinks = "\n".join(file_sink(p, f"file{n}") for n, p in enumerate(paths))
        if stdout:
            sinks += '\n[[sinks]]\ntype = "stdout"\n'
        agent = bench.agent(name, f'[agent]\ninterval = "1ms"\n\n{ALL_TARGET}\n{sinks}', cap)
        results[name] = _rate(bench, agent, paths)
        bench.children.stop(agent)
        stats = last_agent_record(paths[0])
        if stats is not None:
            agent_stats = stats["agent"]
            results[name]["dropped"] = {sink: s.get("dropped", 0) for sink, s in agent_stats["sinks"].items()}
            results[name]["ticks_skipped"] = agent_stats.get("ticks_skipped")
        for path in paths:
            path.unlink(missing_ok=True)
    for kind in ("best-case", "process-iter", "python-floor"):
        path = bench.workdir / f"{kind}.ndjson"
        peer = bench.peer(kind, "--interval", "0", "--rescan", f"{bench.rescan:g}", "--out", str(path),
                          "--seconds", f"{cap:g}")
        results[kind] = _rate(bench, peer, [path])
        bench.children.stop(peer)
        path.unlink(missing_ok=True)
    return results


# -- 3 and 4: reading and rescans, in this process ------------------------------------------------

def reading_and_rescans(bench: Bench) -> dict[str, Any]:
    """Per-process costs over the idle children: the backend's ``sample()`` (fds already open,
    as after the first tick; in chunks of SAMPLE_CHUNK, as the scheduler calls it) next to psutil
    with its Process objects kept and to the pread floor; ``full`` likewise. Then the backend's
    ``list_processes()`` per known pid (nothing changed) and per new pid."""
    from memagent import contracts
    from memagent.registry import build_backend

    chunk = getattr(contracts, "SAMPLE_CHUNK", 128)
    rounds = bench.plan.rounds
    full_rounds = max(3, rounds // 4)
    backend = build_backend("linux", {})
    statm_fds: list[int] = []
    rollup_fds: list[int] = []
    try:
        listed = [info if getattr(info, "described", True) else backend.describe(info)  # command lines
                  for info in backend.list_processes()]
        infos = [info for info in listed if info is not None and bench.sleepers.owns(info.cmdline)]
        identities = [info.identity for info in infos]
        count = len(identities)

        def sample(full: bool) -> None:
            for start in range(0, count, chunk):
                results = backend.sample(identities[start:start + chunk], full)
                if len(results) != len(identities[start:start + chunk]):
                    raise RuntimeError("sample() did not return one result per process")

        sample(False)  # opens what it holds, as the first tick does
        sample(True)
        procs = [psutil.Process(info.pid) for info in infos]
        for proc in procs:
            proc.memory_info()
        statm_fds = [os.open(f"/proc/{info.pid}/statm", os.O_RDONLY | os.O_CLOEXEC) for info in infos]
        rollup_fds = [os.open(f"/proc/{info.pid}/smaps_rollup", os.O_RDONLY | os.O_CLOEXEC) for info in infos]
        memory_info = median_times(rounds, {
            "memagent": lambda: sample(False),
            "psutil": lambda: [p.memory_info() for p in procs],
            "floor": lambda: [os.pread(fd, 128, 0) for fd in statm_fds],
        })
        full = median_times(full_rounds, {
            "memagent": lambda: sample(True),
            "psutil": lambda: [p.memory_full_info() for p in procs],
            "floor": lambda: [os.pread(fd, 4096, 0) for fd in rollup_fds],
        })
        reading = {"processes": count,
                    "memory_info_us": {name: t / count * 1e6 for name, t in memory_info.items()},
                    "full_us": {name: t / count * 1e6 for name, t in full.items()}}
        rescans = _rescans(bench, backend)
    finally:
        for fd in statm_fds + rollup_fds:
            os.close(fd)
        backend.close()
    return {"reading": reading, "rescans": rescans}


def _rescans(bench: Bench, backend: Any) -> dict[str, Any]:
    """``list_processes()`` per pid when nothing changed, and per new pid: a listing right after
    ``batch`` processes started, less the listing after it (they are known then)."""
    rounds = bench.plan.rounds
    listed = len(backend.list_processes())
    list(psutil.process_iter())  # psutil keeps its Process objects between calls from now on

    def scandir() -> list[str]:
        with os.scandir("/proc") as entries:
            return [e.name for e in entries if e.name.isdigit()]

    known = median_times(rounds, {"memagent": backend.list_processes,
                                  "psutil": lambda: list(psutil.process_iter()), "floor": scandir})
    batch = max(10, min(100, bench.plan.processes // 10))
    new: dict[str, list[float]] = {"memagent": [], "memagent described": [], "psutil": [], "floor": []}
    attrs = ["ppid", "name", "create_time", "cmdline", "exe", "username"]

    def stat_once(pid: int) -> None:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.read(fd, 4096)
        finally:
            os.close(fd)

    for _ in range(max(3, min(5, rounds // 4))):  # fresh processes for each measurer: the first to look a
        # pid up pays for its /proc entry
        pids = bench.sleepers.spawn(batch)
        began = time.perf_counter()
        listing = backend.list_processes()
        first = time.perf_counter() - began
        began = time.perf_counter()
        backend.list_processes()
        again = time.perf_counter() - began
        new["memagent"].append(max(0.0, first - again) / batch * 1e6)
        # what a target that may watch them (an all-process one) adds: each described once
        spawned = set(pids)
        began = time.perf_counter()
        for info in listing:
            if info.pid in spawned and not getattr(info, "described", True):
                backend.describe(info)
        described = time.perf_counter() - began
        new["memagent described"].append(max(0.0, first - again + described) / batch * 1e6)
        bench.sleepers.kill(pids)
        backend.list_processes()
        for name, work in (("psutil", lambda pid: psutil.Process(pid).as_dict(attrs)), ("floor", stat_once)):
            pids = bench.sleepers.spawn(batch)
            began = time.perf_counter()
            for pid in pids:
                work(pid)
            new[name].append((time.perf_counter() - began) / batch * 1e6)
            bench.sleepers.kill(pids)
    return {"listed": listed, "new_batch": batch,
            "known_pid_us": {name: t / listed * 1e6 for name, t in known.items()},
            "new_pid_us": {name: statistics.median(values) for name, values in new.items()},
            "new_pid_us_rounds": new}


# -- 5: timing ------------------------------------------------------------------------------------

def timing(bench: Bench) -> dict[str, Any]:
    """A 10 ms ``self`` target next to a 1 s all-process target in one agent: lateness of each
    10 ms tick (its records' ``ts``, taken when the tick starts sampling, against the 10 ms
    grid), 10 ms slots with no tick, and ``ticks_skipped`` from agent records (every second).
    Peers: a ``time.sleep`` loop and an ``asyncio.sleep`` loop on the same grid, same time."""
    plan = bench.plan
    interval_us = 10_000
    out = bench.workdir / "timing.ndjson"
    config = ('[agent]\ninterval = "1s"\nstats_interval = "1s"\n\n'
              '[[targets]]\nname = "self"\nself = true\ninterval = "10ms"\n\n'
              f"{ALL_TARGET}\n{file_sink(out)}")
    agent = bench.agent("timing", config, cap=plan.timing + 120)
    tail = Tail(out)
    wait_until("memagent's first sample record", lambda: tail.count() > 0, 60, agent)
    time.sleep(max(plan.warmup, 1.5))  # past the first listing's start records, one agent record
    t0 = time.time()
    loops = {kind: (bench.peer(kind, "--interval", "0.01", "--seconds", f"{plan.timing:g}",
                               "--out", str(bench.workdir / f"{kind}.json")), bench.workdir / f"{kind}.json")
             for kind in ("sleep-loop", "asyncio-loop")}
    time.sleep(plan.timing)
    t1 = time.time()
    bench.children.stop(agent)
    for child, _ in loops.values():
        child.process.wait(timeout=30)
        bench.children.stop(child)

    # the slots wholly inside the window: a tick of the slot before it can be stamped after t0
    first_slot, last_slot = int(t0 * 1e6) // interval_us + 1, int(t1 * 1e6) // interval_us - 1
    late_us: list[int] = []
    slots: set[int] = set()
    agent_before: dict[str, Any] | None = None
    agent_after: dict[str, Any] | None = None
    for record in Tail(out).records():
        ts = epoch_us(record["ts"])
        if record.get("type") == "agent":  # the last one before the window, the last one in it
            if ts < t0 * 1e6:
                agent_before = record["agent"]
            elif ts <= t1 * 1e6:
                agent_after = record["agent"]
        elif (record.get("type") == "sample" and record.get("target") == "self"
              and first_slot <= ts // interval_us <= last_slot):
            late_us.append(ts % interval_us)
            slots.add(ts // interval_us)
    expected_slots = last_slot - first_slot + 1
    missing = sorted(set(range(first_slot, last_slot + 1)) - slots)
    peers = {}
    for kind, (_, path) in loops.items():
        late = orjson.loads(path.read_bytes())["lateness"]
        peers[kind] = {"p50_ms": percentile(late, 0.5) * 1e3, "p99_ms": percentile(late, 0.99) * 1e3,
                       "max_ms": max(late) * 1e3, "wakes": len(late)}
    skipped = None
    if agent_before is not None and agent_after is not None:
        skipped = agent_after["ticks_skipped"] - agent_before["ticks_skipped"]
    return {
        "seconds": t1 - t0, "ticks": len(late_us),
        "p50_ms": percentile(late_us, 0.5) / 1e3, "p99_ms": percentile(late_us, 0.99) / 1e3,
        "max_ms": max(late_us) / 1e3,
        "ticks_skipped": skipped, "slots_without_tick": max(0, expected_slots - len(slots)),
        "expected_slots": expected_slots, "peers": peers,
        # where in the second the missing ticks were: right after :00 points at the 1 s tick
        "missing_slots_ms_into_second": [slot * interval_us % 1_000_000 // 1000 for slot in missing[:500]],
        "note": "lateness is ts modulo 10 ms: exact below 10 ms, a lower bound beyond",
    }


# -- 6: the WebSocket benchmark with and without the idle processes -------------------------------

def websocket(bench: Bench, label: str) -> dict[str, Any]:
    """bench_websocket.py (a real sink in its own process, real clients) for ``ws_seconds``."""
    plan = bench.plan
    out = bench.workdir / f"websocket-{label}.json"
    command = [sys.executable, str(HERE / "bench_websocket.py"), "--clients", str(plan.ws_clients),
               "--rate", str(plan.ws_rate), "--seconds", f"{plan.ws_seconds:g}", "--json", str(out)]
    child = bench.children.start(f"websocket-{label}", command, bench.workdir)
    try:
        child.process.wait(timeout=plan.ws_seconds + 120)
    finally:
        bench.children.stop(child)
    if not out.exists():
        raise RuntimeError(f"bench_websocket.py wrote no figures: {child.stderr_tail()}")
    figures: dict[str, Any] = orjson.loads(out.read_bytes())
    figures["processes_on_machine"] = process_count()
    return figures

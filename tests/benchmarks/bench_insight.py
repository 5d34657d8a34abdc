"""Benchmark: what issue 11's reads cost per tick — status (extra fields), cgroups, the kernel log.

    python tests/benchmarks/bench_insight.py [N_PROCESSES] [ROUNDS]

Spawns N sleeping children (as root with a writable memory cgroup hierarchy: spread over 10,
100 and N cgroups it makes, removed at the end), then times (median of ROUNDS, interleaved):

- sampling all N (``sample()`` in chunks, fds held, as after the first tick), ``status = false``
  next to ``status = true``: at rest (statm unchanged: the Reading reused, status read every
  STATUS_EVERY samples) and with every statm changed (parsed anew, status read with it); the
  floors, ``os.pread`` of held statm and of held status fds;
- the cgroup pass of a tick: ``read_cgroups`` of 10, 100 and N cgroups holding the N processes
  (fds held), and the scheduler's grouping of N members by cgroup;
- per new process at listing: parsing its cgroup file for the memory cgroup and the container;
- the kernel log: one drain with nothing new (once a second and per exit), one exit_reason.

Figures, not asserts.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from memagent.cgroups import group_by_cgroup
from memagent.contracts import SAMPLE_CHUNK, MemoryCgroup, ProcessInfo
from memagent.plugins.backends.linux import LinuxBackend
from memagent.plugins.backends.linux_cgroups import container_of, controller_paths, memory_cgroup

MARKER = f"601.{os.getpid()}"
K8S_CGROUP = ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6a1b2c3d_4e5f_4a6b_8c7d_"
              "9e0f1a2b3c4d.slice/cri-containerd-" + "0123456789abcdef" * 4 + ".scope\n")


def interleaved(rounds: int, work: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median wall time (seconds) of each of ``work``, all run once per round, in turn."""
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(rounds):
        for name, job in work.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def hierarchy() -> tuple[int, Path] | None:
    root = Path("/sys/fs/cgroup")
    if os.geteuid() != 0:
        return None
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2, root
    if os.access(root / "memory", os.W_OK) and (root / "memory" / "memory.limit_in_bytes").exists():
        return 1, root / "memory"
    return None


@contextlib.contextmanager
def cgroups(count: int) -> Iterator[list[Path]]:
    """``count`` new cgroups (empty list without a writable hierarchy), removed after."""
    found = hierarchy()
    made: list[Path] = []
    try:
        if found is not None:
            for i in range(count):
                directory = found[1] / f"memagent-bench-{os.getpid()}-{i}"
                directory.mkdir()
                made.append(directory)
        yield made
    finally:
        for directory in made:
            for _ in range(500):
                try:
                    directory.rmdir()
                    break
                except OSError:
                    time.sleep(0.01)


def spawn(count: int, homes: list[Path]) -> list[subprocess.Popen[bytes]]:
    """``count`` sleepers, spread over ``homes`` (cgroup directories) when there are any."""
    if not homes:
        return [subprocess.Popen(["sleep", MARKER]) for _ in range(count)]
    return [subprocess.Popen(["sh", "-c", f"echo $$ > {homes[i % len(homes)]}/cgroup.procs && "
                                          f"exec sleep {MARKER}"]) for i in range(count)]


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        child.kill()
    for child in children:
        child.wait()


def sampling(count: int, rounds: int) -> None:
    children = spawn(count, [])
    time.sleep(0.5)
    fds: list[int] = []
    try:
        backends = {"status off": LinuxBackend(status=False, cgroupfs=""),
                    "status on": LinuxBackend(cgroupfs="")}
        pids = {c.pid for c in children}
        infos = [p for p in backends["status on"].list_processes() if p.pid in pids]
        chunks = [[p.identity for p in infos[i:i + SAMPLE_CHUNK]] for i in range(0, len(infos), SAMPLE_CHUNK)]
        for backend in backends.values():
            backend.list_processes()
            for chunk in chunks:
                backend.sample(chunk, False)
        statm = [os.open(f"/proc/{p.pid}/statm", os.O_RDONLY | os.O_CLOEXEC) for p in infos]
        status = [os.open(f"/proc/{p.pid}/status", os.O_RDONLY | os.O_CLOEXEC) for p in infos]
        fds += statm + status

        def sample(backend: LinuxBackend, changed: bool) -> None:
            if changed:
                for held in backend._statm.values():  # noqa: SLF001 - forget the last bytes: all changed
                    held.raw = None
            for chunk in chunks:
                backend.sample(chunk, False)

        times = interleaved(rounds, {
            "statm floor": lambda: [os.pread(fd, 128, 0) for fd in statm],
            "status floor": lambda: [os.pread(fd, 4096, 0) for fd in status],
            **{f"{name} at rest": (lambda b=b: sample(b, False)) for name, b in backends.items()},
            **{f"{name} changed": (lambda b=b: sample(b, True)) for name, b in backends.items()},
        })
        held = {name: b.open_fds for name, b in backends.items()}
        for backend in backends.values():
            backend.close()
    finally:
        for fd in fds:
            os.close(fd)
        stop(children)
    per = 1e6 / len(infos)
    print(f"sampling {len(infos)} sleeping processes, medians of {rounds} rounds, µs per process per tick")
    print(f"  floors: pread statm {times['statm floor'] * per:6.2f}   "
          f"pread status {times['status floor'] * per:6.2f}")
    for state in ("at rest", "changed"):
        off, on = times[f"status off {state}"] * per, times[f"status on {state}"] * per
        print(f"  {state:8s} status off {off:6.2f}   status on {on:6.2f}   (+{on - off:5.2f})")
    print(f"  fds held: status off {held['status off']}, status on {held['status on']}")


def cgroup_pass(count: int, rounds: int) -> None:
    if hierarchy() is None:
        print("cgroup pass: skipped (needs root and a writable memory cgroup hierarchy)")
        return
    print(f"cgroup pass with {count} processes, medians of {rounds} rounds, µs per tick")
    for spread in (10, 100, count):
        with cgroups(spread) as homes:
            children = spawn(count, homes)
            time.sleep(1.0)
            try:
                backend = LinuxBackend(kmsg="")
                pids = {c.pid for c in children}
                infos = [p for p in backend.list_processes() if p.pid in pids]
                members = [("bench", {p.identity: p for p in infos})]
                keys = list(group_by_cgroup(members))

                def read(backend: LinuxBackend = backend, keys: list[MemoryCgroup] = keys) -> None:
                    for start in range(0, len(keys), SAMPLE_CHUNK):
                        backend.read_cgroups(keys[start:start + SAMPLE_CHUNK])

                cold_start = time.perf_counter()
                read()
                cold = time.perf_counter() - cold_start
                times = interleaved(rounds, {"read": read, "group": lambda m=members: group_by_cgroup(m)})
                fds = backend.open_fds
                backend.close()
            finally:
                stop(children)
        per_cgroup = times["read"] * 1e6 / len(keys)
        print(f"  {len(keys):5d} cgroups: read {times['read'] * 1e6:8.0f} ({per_cgroup:5.1f} "
              f"per cgroup; first read {cold * 1e6 / len(keys):5.1f}, {fds} fds held)   "
              f"grouping {count} members {times['group'] * 1e6:6.0f}")


def per_process(rounds: int) -> None:
    paths = controller_paths(K8S_CGROUP)
    parse = interleaved(rounds, {"parse": lambda: [(memory_cgroup(paths), container_of(paths))
                                                   for _ in range(1000)]})
    print("listing a new process: memory cgroup + container from its cgroup file "
          f"{parse['parse'] * 1e3:5.2f} µs")
    backend = LinuxBackend(cgroupfs="")
    backend.open()
    if backend.oom.kmsg is None:
        print("kernel log: not readable here")
        return
    kmsg = backend.oom.kmsg
    info = ProcessInfo(pid=1 << 22, ppid=1, name="x", started=time.time())
    counter = iter(range(1 << 30))
    def reasons() -> None:
        for _ in range(1000):
            backend.exit_reason(ProcessInfo(pid=next(counter), ppid=1, name="x", started=info.started))

    drain = interleaved(rounds, {"drain": lambda: [kmsg.drain() for _ in range(1000)], "reason": reasons})
    print(f"kernel log: an empty drain {drain['drain'] * 1e3:5.2f} µs (once a second); exit_reason "
          f"{drain['reason'] * 1e3:5.2f} µs per exit")
    backend.close()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    sampling(count, rounds)
    cgroup_pass(count, rounds)
    per_process(rounds)


if __name__ == "__main__":
    main()

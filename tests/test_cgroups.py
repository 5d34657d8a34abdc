"""cgroups and containers on fixture trees: which cgroup and container a process is in (real-world
/proc/<pid>/cgroup contents), the numbers read from v1 and v2 trees under one normalized set of
names, one read and one record per cgroup per tick, and why a process exited (kernel log and
cgroup counters). Real cgroups and a real OOM kill: tests/test_cgroups_real.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from memagent.config import TargetConfig
from memagent.contracts import CgroupStats, Container, MemoryCgroup, ProcessInfo
from memagent.fanout import Fanout, Outlet
from memagent.options import Options
from memagent.pipeline import Pipeline
from memagent.plugins.backends.linux import LinuxBackend
from memagent.plugins.backends.linux_cgroups import (
    CgroupReader,
    container_of,
    controller_paths,
    memory_cgroup,
    parse_container,
)
from memagent.plugins.backends.linux_oom import KernelLog, OomWitness
from memagent.records import RecordMaker
from memagent.scheduler import Scheduler
from memagent.targets import Selector
from memagent.testing import FakeBackend, RecordingSink

from cli_helpers import parse_records, run_cli, scaled
from procfs_fixture import (
    DOCKER_HYBRID,
    DOCKER_ID,
    FIXTURE_CGROUP,
    FIXTURE_PROC,
    K8S_LIMITED,
    LIMITED_ID,
    POD_SLICE,
    POD_UID,
    UNLIMITED_ID,
    FakeProc,
    build_procfs,
    copy_cgroupfs,
    described_listing,
    kmsg_record,
    oom_kill_records,
    started,
)

HEX = "0123456789abcdef" * 4  # a 64-hex container id


# -- which cgroup, which container ---------------------------------------------------------------

@pytest.mark.parametrize(("cgroup_file", "expected"), [
    ("0::/system.slice/nginx.service\n", MemoryCgroup(2, "/system.slice/nginx.service")),  # v2
    ("0::/\n", None),  # the root: the whole machine
    ("12:memory:/system.slice/api.service\n1:name=systemd:/system.slice/api.service\n"
     "0::/system.slice/api.service\n", MemoryCgroup(1, "/system.slice/api.service")),  # hybrid systemd
    (DOCKER_HYBRID, MemoryCgroup(1, f"/docker/{DOCKER_ID}")),  # hybrid docker: v2 is the shim's
    ("9:name=systemd:/\n4:memory:/process_api/8a47\n0::/\n", MemoryCgroup(1, "/process_api/8a47")),
    ("0::/../../system.slice/x.service\n", None),  # outside the agent's cgroup namespace
    ("5:pids:/x\n1:name=systemd:/user.slice/u.scope\n", None),  # no memory controller anywhere
    ("", None),
])
def test_memory_cgroup_is_the_memory_controllers_placement(cgroup_file: str,
                                                            expected: MemoryCgroup | None) -> None:
    """The v1 memory line where there is one, else v2's; never the root nor a path outside."""
    assert memory_cgroup(controller_paths(cgroup_file)) == expected


@pytest.mark.parametrize(("path", "expected"), [
    # docker: cgroupfs driver (v1 and v2), systemd driver, docker in docker (the innermost)
    (f"/docker/{HEX}", Container("docker", HEX)),
    (f"/system.slice/docker-{HEX}.scope", Container("docker", HEX)),
    (f"/docker/{'a' * 64}/docker/{HEX}", Container("docker", HEX)),
    # podman: systemd (rootful and rootless, with its nested container cgroup), cgroupfs
    (f"/machine.slice/libpod-{HEX}.scope/container", Container("podman", HEX)),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{HEX}.scope",
     Container("podman", HEX)),
    (f"/libpod_parent/libpod-{HEX}", Container("podman", HEX)),
    (f"/machine.slice/libpod-conmon-{HEX}.scope", None),  # the monitor, not the container
    # containerd outside Kubernetes (nerdctl)
    (f"/system.slice/nerdctl-{HEX}.scope", Container("containerd", HEX)),
    # Kubernetes, systemd driver: containerd burstable, cri-o besteffort, guaranteed (no QoS slice)
    (f"{POD_SLICE}/cri-containerd-{HEX}.scope", Container("containerd", HEX, POD_UID, "burstable")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID.replace('-', '_')}.slice/"
     f"crio-{HEX}.scope", Container("cri-o", HEX, POD_UID, "besteffort")),
    (f"/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{HEX}.scope",
     Container("containerd", HEX, POD_UID, "guaranteed")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/"
     f"crio-conmon-{HEX}.scope", Container(None, None, POD_UID, "burstable")),  # conmon: the pod only
    # Kubernetes, cgroupfs driver: the runtime is not in the path (containerd, dockershim), or is (cri-o)
    (f"/kubepods/burstable/pod{POD_UID}/{HEX}", Container(None, HEX, POD_UID, "burstable")),
    (f"/kubepods/pod{POD_UID}/{HEX}", Container(None, HEX, POD_UID, "guaranteed")),
    (f"/kubepods/besteffort/pod{POD_UID}/crio-{HEX}", Container("cri-o", HEX, POD_UID, "besteffort")),
    # a static pod's uid is a 32-hex config hash; kubelet under its own cgroup root (kind)
    (f"/kubepods/burstable/pod{'9' * 32}/{HEX}", Container(None, HEX, "9" * 32, "burstable")),
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-"
     f"pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{HEX}.scope",
     Container("containerd", HEX, POD_UID, "besteffort")),
    # not containers
    ("/system.slice/nginx.service", None),
    ("/user.slice/user-1000.slice/session-3.scope", None),
    (f"/system.slice/pod{POD_UID}.slice", None),  # "pod" outside kubepods means nothing
    ("/", None),
])
def test_container_is_parsed_from_the_cgroup_path(path: str, expected: Container | None) -> None:
    """Docker, containerd, CRI-O and Podman ids and Kubernetes pods with their QoS class, from the
    paths each runtime and cgroup driver makes."""
    assert parse_container(path) == expected


def test_container_is_found_in_any_hierarchy_memory_first() -> None:
    """On a hybrid host docker places a container in v1 hierarchies only: its unified line is the
    shim's, but the memory line names the container."""
    assert container_of(controller_paths(DOCKER_HYBRID)) == Container("docker", DOCKER_ID)
    assert container_of(controller_paths("0::/system.slice/sshd.service\n")) is None


def test_listing_carries_memory_cgroup_and_container(tmp_path: Path) -> None:
    """A listed process knows its memory cgroup and container, read once from its cgroup file."""
    procs = [FakeProc(pid=10, cgroup=K8S_LIMITED), FakeProc(pid=11, cgroup=DOCKER_HYBRID),
             FakeProc(pid=12, cgroup="0::/\n")]
    listed = {p.pid: p for p in described_listing(LinuxBackend(str(build_procfs(tmp_path, procs))))}
    assert listed[10].memory_cgroup == MemoryCgroup(2, f"{POD_SLICE}/cri-containerd-{LIMITED_ID}.scope")
    assert listed[10].container == Container("containerd", LIMITED_ID, POD_UID, "burstable")
    assert listed[11].memory_cgroup == MemoryCgroup(1, f"/docker/{DOCKER_ID}")
    assert listed[11].container == Container("docker", DOCKER_ID)
    assert listed[11].cgroup == "/system.slice/containerd.service"  # the selector's path is unchanged
    assert (listed[12].memory_cgroup, listed[12].container) == (None, None)


# -- reading the numbers -------------------------------------------------------------------------

NGINX = MemoryCgroup(2, "/system.slice/nginx.service")
BROKEN = MemoryCgroup(2, "/system.slice/broken.service")
K8S = MemoryCgroup(2, f"{POD_SLICE}/cri-containerd-{LIMITED_ID}.scope")
K8S_SIBLING = MemoryCgroup(2, f"{POD_SLICE}/cri-containerd-{UNLIMITED_ID}.scope")
DOCKER = MemoryCgroup(1, f"/docker/{DOCKER_ID}")
LEGACY = MemoryCgroup(1, "/legacy/app")

EXPECTED: dict[MemoryCgroup, CgroupStats] = {
    NGINX: {"version": 2, "current": 41943040, "max": None, "effective_max": None, "high": None,
            "peak": 52428800, "swap": 0, "events": {"oom": 0, "oom_kill": 0, "high": 0, "max": 0}},
    K8S: {"version": 2, "current": 429916160, "max": 536870912, "effective_max": 536870912, "high": None,
          "peak": 536866816, "swap": 4096, "events": {"oom": 2, "oom_kill": 1, "high": 0, "max": 12}},
    # no limit of its own: the pod's; no peak or swap file: left out
    K8S_SIBLING: {"version": 2, "current": 8388608, "max": None, "effective_max": 1073741824,
                  "high": 402653184, "events": {"oom": 0, "oom_kill": 0, "high": 5, "max": 0}},
    # v1: the same names; failcnt is events.max, a huge limit is null; no high, swap nor oom count
    DOCKER: {"version": 1, "current": 268435456, "max": 536870912, "effective_max": 536870912,
             "peak": 536870912, "events": {"max": 1234, "oom_kill": 3}},
    LEGACY: {"version": 1, "current": 10485760, "max": None, "effective_max": None, "peak": 20971520,
             "events": {"max": 0, "oom_kill": 0}},
}


def cgroup_backend(**options: Any) -> LinuxBackend:
    return LinuxBackend.from_options(Options({"procfs": str(FIXTURE_PROC), "cgroupfs": str(FIXTURE_CGROUP),
                                              **options}, "backends.linux"))


def test_v1_and_v2_read_under_the_same_names() -> None:
    """Each fixture cgroup reads exactly as the table in linux_cgroups says, the v1 memory
    controller's files under v2's names; a cgroup that does not exist is left out."""
    backend = cgroup_backend()
    gone = MemoryCgroup(2, "/system.slice/gone.service")
    assert backend.read_cgroups([*EXPECTED, gone]) == EXPECTED
    assert backend.counters["malformed"] == 0
    backend.close()
    assert backend.open_fds == 0


def test_malformed_cgroup_files_are_counted_and_left_out(caplog: pytest.LogCaptureFixture) -> None:
    """memory.max "1GB", an empty memory.peak and "oom_kill many" are three malformed files, each
    field left out, warned once; the file that parses still reads."""
    backend = cgroup_backend()
    for _ in range(2):
        assert backend.read_cgroups([BROKEN]) == {
            BROKEN: {"version": 2, "current": 12345, "effective_max": None, "high": None}}
    assert backend.counters["malformed"] == 6
    assert len([r for r in caplog.records if "cgroup file(s) could not be parsed" in r.getMessage()]) == 1


def test_cgroup_files_are_held_and_read_again(tmp_path: Path) -> None:
    """A cgroup's files are opened once and re-read each tick: a changed counter shows; the fds
    are budgeted with the others and released by close."""
    cgroupfs = copy_cgroupfs(tmp_path)
    backend = LinuxBackend(str(FIXTURE_PROC), cgroupfs=str(cgroupfs))
    assert backend.read_cgroups([DOCKER])[DOCKER]["events"] == {"max": 1234, "oom_kill": 3}
    held = backend.open_fds
    assert held == 5 + 1  # five files, and its parent's limit (the effective_max)
    (cgroupfs / f"memory/docker/{DOCKER_ID}/memory.failcnt").write_text("1300\n")  # same size: same inode
    assert backend.read_cgroups([DOCKER])[DOCKER]["events"] == {"max": 1300, "oom_kill": 3}
    assert backend.open_fds == held
    backend.close()
    assert backend.open_fds == 0


def test_without_a_cgroupfs_there_are_no_cgroup_records(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """cgroupfs = "" reads none; a missing cgroupfs is one warning, not an error."""
    assert cgroup_backend(cgroupfs="").read_cgroups([NGINX]) == {}
    assert cgroup_backend(cgroupfs=str(tmp_path / "nowhere")).read_cgroups([NGINX]) == {}
    assert "no cgroupfs at" in caplog.text


def test_hybrid_host_finds_v2_under_unified(tmp_path: Path) -> None:
    """A hybrid host's v2 hierarchy is at <cgroupfs>/unified (v2 paths are looked up there)."""
    (tmp_path / "unified" / "x.service").mkdir(parents=True)
    (tmp_path / "unified" / "cgroup.controllers").write_text("memory\n")
    (tmp_path / "unified" / "x.service" / "memory.current").write_text("4096\n")
    reader = CgroupReader(str(tmp_path), lambda: True, {})
    assert reader.read([MemoryCgroup(2, "/x.service")])[MemoryCgroup(2, "/x.service")]["current"] == 4096


# -- the tick: one read and one record per cgroup ------------------------------------------------

class CgroupBackend(FakeBackend):
    """A fake backend that reads cgroups (counting its calls) and explains exits."""

    def __init__(self, processes: Sequence[ProcessInfo]) -> None:
        super().__init__(processes)
        self.asked: list[list[MemoryCgroup]] = []
        self.reasons: dict[int, str] = {}

    def read_cgroups(self, cgroups: Sequence[MemoryCgroup]) -> dict[MemoryCgroup, CgroupStats]:
        self.asked.append(list(cgroups))
        return {c: dict(EXPECTED[c]) for c in cgroups if c in EXPECTED}

    def exit_reason(self, process: ProcessInfo) -> str | None:
        return self.reasons.get(process.pid)


def member(pid: int, cgroup: MemoryCgroup | None, container: Container | None = None) -> ProcessInfo:
    return ProcessInfo(pid=pid, ppid=1, name=f"p{pid}", started=100.0, cmdline=(f"p{pid}",),
                       memory_cgroup=cgroup, container=container)


def two_target_scheduler(backend: FakeBackend) -> tuple[Scheduler, RecordingSink, Outlet]:
    sink = RecordingSink()
    out = Outlet("rec", sink, queue=10_000, when_full="drop_oldest", batch=1000, targets=None)
    maker = RecordMaker(host="h", os_name="linux", backend="fake", tags={})
    targets = [TargetConfig(name="web", interval=1.0, comm="p1*"),
               TargetConfig(name="all", interval=1.0, all=True)]
    return Scheduler(backend, [Selector(t) for t in targets], Pipeline(Fanout([out]), maker)), sink, out


async def test_one_cgroup_record_per_cgroup_per_tick_before_the_samples(
        validate_record: Callable[[dict[str, Any]], None]) -> None:
    """Four processes in two cgroups (and one in none), watched by two targets: each tick reads
    the two cgroups once, in one call, and makes one record each — naming the targets watching
    processes in it and how many — before any of the tick's samples."""
    k8s = Container("containerd", LIMITED_ID, POD_UID, "burstable")
    processes = [member(10, K8S, k8s), member(11, K8S, k8s), member(20, DOCKER), member(12, None),
                 member(21, DOCKER)]
    backend = CgroupBackend(processes)
    backend.readings = {p.pid: ({"rss": 4096, "vms": 8192}, {"shared": 0}) for p in processes}
    scheduler, sink, out = two_target_scheduler(backend)
    await out.start()
    await scheduler.rescan()
    for _ in range(2):
        await scheduler.sample(scheduler.watches)
    await out.drain(time.monotonic() + scaled(5))
    assert [sorted(asked) for asked in backend.asked] == [sorted([K8S, DOCKER])] * 2
    records = [dict(r.fields) for r in sink.records]
    for record in records:
        validate_record(record)
    tick = [r for r in records if r["type"] in ("cgroup", "sample")][:2 + 8]
    assert [r["type"] for r in tick] == ["cgroup"] * 2 + ["sample"] * 8
    by_path = {r["cgroup"]: r for r in tick[:2]}
    assert by_path[K8S.path]["targets"] == ["all", "web"] and by_path[K8S.path]["processes"] == 2
    assert by_path[K8S.path]["container"] == {"runtime": "containerd", "id": LIMITED_ID,
                                              "pod_uid": POD_UID, "qos": "burstable"}
    assert {k: by_path[K8S.path][k] for k in EXPECTED[K8S]} == EXPECTED[K8S]
    assert by_path[DOCKER.path]["targets"] == ["all"] and by_path[DOCKER.path]["processes"] == 2
    routed = {r.fields["cgroup"]: r.target for r in sink.records if r.type == "cgroup"}
    assert routed == {K8S.path: None, DOCKER.path: "all"}  # several targets: every sink; one: its own
    starts = {r["pid"]: r for r in records if r["type"] == "start" and r["target"] == "all"}
    assert starts[10]["container"]["pod_uid"] == POD_UID and "container" not in starts[20]


async def test_a_cgroup_record_counts_the_processes_in_it_as_they_come_and_go() -> None:
    """Grouping is kept from tick to tick: an exit and a new member show at the next tick."""
    processes = [member(20, DOCKER), member(21, DOCKER)]
    backend = CgroupBackend(processes)
    backend.readings = {p.pid: ({"rss": 4096, "vms": 8192}, {"shared": 0}) for p in processes}
    scheduler, sink, out = two_target_scheduler(backend)
    await out.start()
    await scheduler.rescan()
    await scheduler.sample(scheduler.watches)
    del backend.readings[21]  # exits: the tick sees it gone
    await scheduler.sample(scheduler.watches)
    await scheduler.sample(scheduler.watches)
    backend.processes = [member(20, DOCKER), member(22, DOCKER)]
    backend.readings[22] = ({"rss": 4096, "vms": 8192}, {"shared": 0})
    await scheduler.rescan()
    await scheduler.sample(scheduler.watches)
    await out.drain(time.monotonic() + scaled(5))
    counts = [r.fields["processes"] for r in sink.records if r.type == "cgroup"]
    assert counts == [2, 2, 1, 2]  # the exit is seen during the second tick, after its cgroup record


async def test_exit_reason_comes_from_the_backend() -> None:
    """A process the backend explains ends with reason oom_kill, whether a sample or a rescan
    sees it gone; another without a reason."""
    processes = [member(10, K8S), member(11, K8S), member(12, None)]
    backend = CgroupBackend(processes)
    backend.readings = {p.pid: ({"rss": 4096, "vms": 8192}, {"shared": 0}) for p in processes}
    backend.reasons = {10: "oom_kill", 11: "oom_kill"}
    scheduler, sink, out = two_target_scheduler(backend)
    await out.start()
    await scheduler.rescan()
    await scheduler.sample(scheduler.watches)
    del backend.readings[10], backend.readings[12]  # a sample sees 10 and 12 gone
    await scheduler.sample(scheduler.watches)
    backend.processes = []  # a rescan sees 11 gone
    await scheduler.rescan()
    await out.drain(time.monotonic() + scaled(5))
    exits = {(r.fields["target"], r.pid): r.fields.get("reason") for r in sink.records if r.type == "exit"}
    assert exits == {("web", 10): "oom_kill", ("all", 10): "oom_kill", ("web", 11): "oom_kill",
                     ("all", 11): "oom_kill", ("web", 12): None, ("all", 12): None}


# -- why a process exited: the kernel log, the cgroup counter ------------------------------------

def kmsg_file(tmp_path: Path) -> Path:
    path = tmp_path / "kmsg"
    path.write_text(kmsg_record(1, 1.0, "Linux version 6.18.0 (boot messages before the agent)") +
                    kmsg_record(2, 2.0, "Memory cgroup out of memory: Killed process 10 (old)"))
    return path


def test_kernel_log_names_the_process_killed(tmp_path: Path) -> None:
    """Only kills logged after the log was opened count, by pid and only if after the process
    started; a user-facility record claiming a kill and continuation lines are ignored."""
    path = kmsg_file(tmp_path)
    log = KernelLog(str(path), {})
    with path.open("a") as kmsg:
        kmsg.write(oom_kill_records(3, 50.0, 42, "python3", "/memagent-test"))
        kmsg.write(kmsg_record(6, 51.0, "Out of memory: Killed process 43 (java)"))  # the machine's
        kmsg.write(kmsg_record(7, 52.0, "Memory cgroup out of memory: Killed process 44 (x)", facility=1))
        kmsg.write(kmsg_record(8, 53.0, "Memory cgroup out of memory: Killed proc"))  # cut by a file read ...
    log.drain()
    with path.open("a") as kmsg:
        kmsg.write("ess 45 (y)\n")  # ... its end comes next
    log.drain()
    assert set(log.kills) == {42, 43}  # 10 before the agent, 44 not the kernel's, 45 garbled
    assert log.killed(42, 5.0) and not log.killed(42, 60.0)  # a later process with the same pid
    assert not log.killed(10, 0.0)


def test_kill_in_the_log_is_the_exit_reason_and_the_counter_is_not_consulted(tmp_path: Path) -> None:
    """With the kernel log readable, the process it names is oom_kill and a process of the same
    cgroup that exited meanwhile is not, though the cgroup's counter rose; asked twice (two
    targets), the answer is the same."""
    path = kmsg_file(tmp_path)
    cgroupfs = copy_cgroupfs(tmp_path)
    reader = CgroupReader(str(cgroupfs), lambda: True, {})
    reader.read([DOCKER])
    witness = OomWitness(KernelLog(str(path), {}), reader, boot_time=1_000.0)
    (cgroupfs / f"memory/docker/{DOCKER_ID}/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
    with path.open("a") as kmsg:
        kmsg.write(oom_kill_records(3, 50.0, 42, "python3", f"/docker/{DOCKER_ID}"))
    victim = ProcessInfo(pid=42, ppid=1, name="python3", started=1_010.0, memory_cgroup=DOCKER)
    bystander = ProcessInfo(pid=43, ppid=1, name="sh", started=1_010.0, memory_cgroup=DOCKER)
    assert [witness.exit_reason(p) for p in (victim, bystander, victim)] == ["oom_kill", None, "oom_kill"]


def test_without_the_kernel_log_the_cgroup_counter_explains_one_exit(tmp_path: Path) -> None:
    """No kernel log: a rise of the cgroup's oom_kill counter explains one exit in that cgroup;
    a cgroup never read before has no baseline; an old rise explains nothing."""
    cgroupfs = copy_cgroupfs(tmp_path)
    reader = CgroupReader(str(cgroupfs), lambda: True, {})
    witness = OomWitness(None, reader, boot_time=1_000.0)
    first = ProcessInfo(pid=42, ppid=1, name="a", started=1_010.0, memory_cgroup=DOCKER)
    assert witness.exit_reason(first) is None  # never read: no baseline
    reader.read([DOCKER])
    (cgroupfs / f"memory/docker/{DOCKER_ID}/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
    second, third = (ProcessInfo(pid=pid, ppid=1, name="b", started=1_010.0, memory_cgroup=DOCKER)
                     for pid in (43, 44))
    assert [witness.exit_reason(p) for p in (second, third, second)] == ["oom_kill", None, "oom_kill"]
    (cgroupfs / f"memory/docker/{DOCKER_ID}/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    reader.read([DOCKER])
    reader._oom_unclaimed[DOCKER][0] -= 3600  # noqa: SLF001 - the rise was seen an hour ago
    assert witness.exit_reason(ProcessInfo(pid=45, ppid=1, name="c", started=1_010.0,
                                           memory_cgroup=DOCKER)) is None


def test_kernel_log_is_believed_only_for_the_initial_pid_namespace(tmp_path: Path) -> None:
    """The backend reads the kernel log only when its procfs is the initial pid namespace's,
    whose pids the log uses (a fixture tree says so with 1/ns/pid)."""
    path = kmsg_file(tmp_path)
    plain = LinuxBackend(str(build_procfs(tmp_path / "a", [FakeProc(pid=5)])), kmsg=str(path))
    assert plain.oom.kmsg is None
    initial = LinuxBackend(str(build_procfs(tmp_path / "b", [FakeProc(pid=5)], initial_pid_namespace=True)),
                           kmsg=str(path))
    assert initial.oom.kmsg is not None and "kmsg_lost" in initial.counters
    assert LinuxBackend(str(FIXTURE_PROC), kmsg=str(tmp_path / "none")).oom.kmsg is None  # unreadable


def test_backend_explains_a_killed_fixture_process(tmp_path: Path) -> None:
    """End to end through the backend: a fixture process killed per the kernel log samples Gone
    and its exit reason is oom_kill; one that exits otherwise gets none."""
    victim, other = FakeProc(pid=42, start_ticks=1000), FakeProc(pid=43, start_ticks=1000)
    proc = build_procfs(tmp_path, [victim, other], initial_pid_namespace=True)
    path = kmsg_file(tmp_path)
    backend = LinuxBackend(str(proc), kmsg=str(path), cgroupfs="")
    infos = {p.pid: p for p in backend.list_processes()}
    with path.open("a") as kmsg:
        kmsg.write(oom_kill_records(3, 20.0, 42, "worker", "/system.slice/worker.service"))
    for pid in (42, 43):
        (proc / str(pid) / "stat").unlink()
        (proc / str(pid) / "statm").unlink()
    assert [type(r).__name__ for r in backend.sample([(42, started(victim)), (43, started(other))],
                                                      full=False)] == ["Gone", "Gone"]
    assert (backend.exit_reason(infos[42]), backend.exit_reason(infos[43])) == ("oom_kill", None)


# -- through the CLI on the fixture trees --------------------------------------------------------

def test_cli_on_fixture_trees_makes_cgroup_records(write_config: Callable[[str], Path],
                                                   validate_record: Callable[[dict[str, Any]], None]) -> None:
    """`memagent run --once` on tests/data/proc with cgroupfs = tests/data/cgroup: one cgroup
    record for nginx (v2) and one for the legacy app (v1), schema-valid; samples carry extra."""
    config = write_config(f"""
[backends.linux]
procfs = "{FIXTURE_PROC}"
cgroupfs = "{FIXTURE_CGROUP}"
[[targets]]
name = "fixture"
pid = 1
[[targets]]
name = "legacy"
pid = 300
""")
    result = run_cli("run", str(config), "--once")
    assert result.returncode == 0, result.stderr
    records = parse_records(result.stdout)
    for record in records:
        validate_record(record)
    cgroups = {r["cgroup"]: r for r in records if r["type"] == "cgroup"}
    assert set(cgroups) == {NGINX.path, LEGACY.path}
    assert {k: cgroups[NGINX.path][k] for k in EXPECTED[NGINX]} == EXPECTED[NGINX]
    assert cgroups[LEGACY.path]["targets"] == ["legacy"] and cgroups[LEGACY.path]["version"] == 1
    [sample] = [r for r in records if r["type"] == "sample" and r["pid"] == 1]
    assert sample["extra"]["peak_rss"] == 12288 * 1024

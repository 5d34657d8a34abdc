"""Real memory cgroups for tests: made by the test under the machine's cgroupfs (the v1 memory
controller's hierarchy, or v2 where the machine has memory there), with children that join them
and allocate on command; removed after, once their processes are gone."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli_helpers import scaled, spawn_ready

CGROUPFS = Path("/sys/fs/cgroup")
_names = itertools.count()

#: A child that joins the cgroup directory given as argv[1] (before saying "ready"), then obeys
#: stdin: "alloc MIB" touches MIB MiB (and says "ok" if it survives), "exit" exits normally.
JOINER = textwrap.dedent("""
    import os, sys
    with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    print("ready", flush=True)
    blocks = []
    for line in sys.stdin:
        command, *args = line.split()
        if command == "alloc":
            block = bytearray(int(args[0]) << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            blocks.append(block)
            print("ok", flush=True)
        elif command == "exit":
            break
""")


@dataclass(frozen=True)
class RealCgroup:
    """A cgroup this test made: its ``version``, its ``path`` as /proc/<pid>/cgroup shows it, and
    its ``directory``."""

    version: int
    path: str
    directory: Path


def memory_hierarchy() -> tuple[int, Path]:
    """(version, root directory) of a memory hierarchy this test may create cgroups in; skips the
    test where there is none (not root, no writable cgroupfs with the memory controller)."""
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    controllers = CGROUPFS / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2, CGROUPFS
    v1 = CGROUPFS / "memory"
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return 1, v1
    pytest.skip(f"no writable memory cgroup hierarchy under {CGROUPFS}")


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[RealCgroup]:
    """A new cgroup limited to ``limit`` bytes (swap included where swap is accounted, so going
    past the limit is an OOM kill, not swapping); its processes killed and the cgroup removed
    after the block."""
    version, root = memory_hierarchy()
    name = f"memagent-test-{os.getpid()}-{next(_names)}"
    directory = root / name
    if version == 2:
        subtree = CGROUPFS / "cgroup.subtree_control"
        if "memory" not in subtree.read_text().split():
            try:
                subtree.write_text("+memory")
            except OSError as exc:
                pytest.skip(f"cannot enable the memory controller for child cgroups: {exc}")
    directory.mkdir()
    try:
        if version == 1:
            (directory / "memory.limit_in_bytes").write_text(str(limit))
            with contextlib.suppress(FileNotFoundError):
                (directory / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            (directory / "memory.max").write_text(str(limit))
            with contextlib.suppress(FileNotFoundError):
                (directory / "memory.swap.max").write_text("0")
        yield RealCgroup(version, f"/{name}", directory)
    finally:
        remove_cgroup(directory)


def remove_cgroup(directory: Path) -> None:
    """Kill what is left in ``directory``'s cgroup, then remove it (a cgroup is removable once its
    last process is gone, which may take a moment after SIGKILL)."""
    deadline = time.monotonic() + scaled(10)
    while directory.exists():
        with contextlib.suppress(FileNotFoundError):
            for pid in (directory / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            directory.rmdir()
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def spawn_in(cgroup: RealCgroup, marker: str) -> subprocess.Popen[str]:
    """A :data:`JOINER` child in ``cgroup``, ready (already in it); ``marker`` in its command line."""
    return spawn_ready(JOINER, str(cgroup.directory), marker)


def tell(child: subprocess.Popen[str], command: str) -> None:
    """Send a command line to a :data:`JOINER` child (no answer awaited: it may be killed)."""
    assert child.stdin is not None
    child.stdin.write(command + "\n")
    child.stdin.flush()


def kernel_log_readable() -> bool:
    """Whether /dev/kmsg can be opened here (root, or kernel.dmesg_restrict = 0)."""
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True

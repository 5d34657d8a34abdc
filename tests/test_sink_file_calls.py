"""The file sink writes on the event loop only where that cannot block it for long."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from memagent.plugins.sinks.file import FileSink
from memagent.plugins.sinks.file_calls import SLOW_CALL, FileCalls, filesystem_of
from memagent.plugins.sinks.file_rotation import ACL_XATTR, acl_grants_write, shared_directory
from memagent.testing import RecordingLogger, make_records, sink_context

from attacker import NOBODY, as_nobody


def mountinfo_naming(path: Path, device: int, fstype: str) -> Path:
    """A mountinfo file in which ``device`` is a mount of ``fstype`` (other lines around it)."""
    lines = [
        "22 1 0:21 / /proc rw,nosuid - proc proc rw",
        f"29 1 {os.major(device)}:{os.minor(device)} / /data rw,relatime shared:1 - {fstype} server:/x rw",
        "30 29 7:3 / /snap rw master:2 - squashfs /dev/loop3 ro",
    ]
    out = path / "mountinfo"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_the_filesystem_of_a_device_is_read_from_mountinfo(tmp_path: Path) -> None:
    device = os.stat(tmp_path).st_dev
    assert filesystem_of(device, str(mountinfo_naming(tmp_path, device, "nfs4"))) == "nfs4"
    assert filesystem_of(os.makedev(250, 99), str(mountinfo_naming(tmp_path, device, "nfs4"))) is None
    assert filesystem_of(device, str(tmp_path / "missing")) is None


def test_the_real_mountinfo_names_procfs() -> None:
    assert filesystem_of(os.stat("/proc").st_dev) == "proc"


@pytest.mark.parametrize(("fstype", "direct"), [("ext4", True), ("tmpfs", True), ("nfs4", False),
                                                 ("fuse.sshfs", False), ("cifs", False)])
def test_only_a_local_filesystem_is_written_on_the_loop(tmp_path: Path, fstype: str, direct: bool) -> None:
    live = tmp_path / "live.ndjson"
    live.write_bytes(b"")
    mountinfo = mountinfo_naming(tmp_path, os.stat(live).st_dev, fstype)
    calls = FileCalls("f", RecordingLogger("f"), str(mountinfo))
    calls.opened(os.stat(live))
    assert calls.direct is direct


def test_a_fifo_is_never_written_on_the_loop(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    mountinfo = mountinfo_naming(tmp_path, os.stat(fifo).st_dev, "ext4")
    calls = FileCalls("f", RecordingLogger("f"), str(mountinfo))
    calls.opened(os.stat(fifo))
    assert calls.direct is False


async def test_a_slow_direct_call_sends_every_later_one_to_a_thread(tmp_path: Path) -> None:
    live = tmp_path / "live.ndjson"
    live.write_bytes(b"")
    log = RecordingLogger("f")
    calls = FileCalls("f", log, str(mountinfo_naming(tmp_path, os.stat(live).st_dev, "ext4")))
    calls.opened(os.stat(live))

    def where() -> str:
        return threading.current_thread().name

    assert await calls.run(where) == threading.current_thread().name  # direct: on the loop's thread
    await calls.run(lambda: time.sleep(SLOW_CALL * 1.5))
    assert calls.direct is False
    assert await calls.run(where) != threading.current_thread().name
    calls.opened(os.stat(live))  # a reopened file does not bring direct calls back
    assert calls.direct is False
    assert len(log.reports) == 1 and "worker thread" in log.reports[0]


async def test_the_file_sink_writes_a_local_file_on_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "out.ndjson"
    sink = FileSink(path=str(path), context=sink_context("file"))
    await sink.start()
    try:
        assert sink._calls.direct is True  # noqa: SLF001 - /tmp here is a local filesystem
        records = make_records(3)
        await sink.write(records)
        await asyncio.sleep(0)
    finally:
        await sink.close()
    assert path.read_bytes() == b"".join(r.json + b"\n" for r in records)


def test_dev_null_is_written_on_the_loop_and_a_terminal_or_pipe_is_not(tmp_path: Path) -> None:
    for path, direct in (("/dev/null", True), ("/dev/zero", False), ("/dev/tty", False)):
        if not os.path.exists(path):
            continue
        calls = FileCalls("f", RecordingLogger("f"))
        calls.opened(os.stat(path))
        assert calls.direct is direct, path
    read_end, write_end = os.pipe()
    try:
        calls = FileCalls("f", RecordingLogger("f"))
        calls.opened(os.fstat(write_end))
        assert calls.direct is False
    finally:
        os.close(read_end)
        os.close(write_end)


def mountinfo_of(path: Path, kinds: dict[int, str]) -> Path:
    """A mountinfo file naming each device of ``kinds`` a mount of that filesystem type."""
    lines = [f"{20 + n} 1 {os.major(device)}:{os.minor(device)} / /m{n} rw - {kind} src rw"
             for n, (device, kind) in enumerate(kinds.items())]
    out = path / "mountinfo"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_a_path_through_a_network_filesystem_is_not_looked_up_on_the_loop(tmp_path: Path) -> None:
    """The file sink stats its path by name: every directory on the way must be local too."""
    live = tmp_path / "live.ndjson"
    live.write_bytes(b"")
    directories = {os.stat(d).st_dev for d in [live.parent, *live.parents]}
    local = {device: "ext4" for device in directories | {os.stat(live).st_dev}}
    calls = FileCalls("f", RecordingLogger("f"), str(mountinfo_of(tmp_path, local)))
    calls.opened(os.stat(live), str(live))
    assert calls.direct is True
    above = {**local, os.stat("/").st_dev: "nfs4"}  # the root directory on NFS
    calls = FileCalls("f", RecordingLogger("f"), str(mountinfo_of(tmp_path, above)))
    calls.opened(os.stat(live), str(live))
    assert calls.direct is False


def test_a_directory_others_may_write_is_never_looked_up_on_the_loop(tmp_path: Path) -> None:
    """Whoever may write the directory may put a mount of their own at the file's name."""
    live = tmp_path / "live.ndjson"
    live.write_bytes(b"")
    calls = FileCalls("f", RecordingLogger("f"))
    calls.opened(os.stat(live), str(live), shared=True)
    assert calls.direct is False


def direct_for(directory: Path | str) -> bool:
    """Whether the calls for a new live file in ``directory`` (made root's, 0755, if missing)
    run on the loop, as the file sink decides when it opens it."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    live = os.path.join(directory, "live.ndjson")
    Path(live).write_bytes(b"")
    calls = FileCalls("f", RecordingLogger("f"))
    calls.opened(os.stat(live), live, shared=False)
    return calls.direct


def test_a_path_under_a_directory_the_attacker_may_replace_is_never_looked_up_on_the_loop(
        attacker_dir: Path) -> None:
    """The log directory is root's, but the attacker (uid 65534, for real) owns the one above it:
    it can rename the log directory away and plant a link to any slow place in its stead, so the
    stat by name each batch must not run on the loop. Root's own parent: direct again."""
    os.chown(attacker_dir, NOBODY, NOBODY)
    attacker_dir.chmod(0o755)
    logs = attacker_dir / "logs"
    assert direct_for(logs) is False
    as_nobody("mv", str(logs), str(attacker_dir / "moved"))  # it really can
    as_nobody("ln", "-s", "/proc/self/cwd", str(logs))
    os.unlink(logs)
    (attacker_dir / "moved").rename(logs)
    os.chown(attacker_dir, 0, 0)  # the same tree, the parent now root's: nobody else may replace logs
    assert direct_for(logs) is True


def test_a_sticky_directory_protects_root_s_entries_but_not_another_user_s(attacker_dir: Path) -> None:
    """/tmp-like (root's, mode 1777): the attacker cannot rename root's directory in it, so a
    log directory there is looked up on the loop; inside a directory the attacker made there,
    it can, so it is not."""
    attacker_dir.chmod(0o1777)
    assert direct_for(attacker_dir / "ours") is True
    theirs = attacker_dir / "theirs"
    as_nobody("mkdir", "-m", "0755", str(theirs))
    assert direct_for(theirs / "logs") is False


def test_a_link_on_the_path_is_followed_to_the_directories_it_leads_through(attacker_dir: Path) -> None:
    """A root-owned link (``varlog/app -> srv/app/data``, as /var/log/app pointing elsewhere) to
    root's directory under one the attacker owns (``srv/app``): the stat by name walks through the
    attacker's directory, which it can empty and refill with a link to a slow place; so does a
    path that climbs out with ``..``. Neither is looked up on the loop; once ``srv/app`` is
    root's, both are."""
    app = attacker_dir / "srv" / "app"
    (app / "data" / "logs").mkdir(parents=True, mode=0o755)
    os.chown(app, NOBODY, NOBODY)
    (attacker_dir / "varlog").mkdir(mode=0o755)
    (attacker_dir / "varlog" / "app").symlink_to(app / "data")
    through_link = attacker_dir / "varlog" / "app" / "logs"
    climbing = f"{app}/data/../../../ours"
    assert direct_for(through_link) is False
    assert direct_for(climbing) is False
    as_nobody("mv", str(app / "data"), str(app / "moved"))  # it really can
    as_nobody("mv", str(app / "moved"), str(app / "data"))
    os.chown(app, 0, 0)
    assert direct_for(through_link) is True
    assert direct_for(climbing) is True


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A ``system.posix_acl_access`` value: version 2, then (tag, perm, id) entries."""
    return (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + who.to_bytes(4, "little")
        for tag, perm, who in entries)


UNDEFINED = 0xFFFFFFFF
#: root's 0775 directory whose ACL also lets uid 65534 write (setfacl -m u:nobody:rwx)
NOBODY_MAY_WRITE = posix_acl((0x01, 7, UNDEFINED), (0x02, 7, NOBODY), (0x04, 5, UNDEFINED),
                             (0x10, 7, UNDEFINED), (0x20, 5, UNDEFINED))


def test_an_acl_letting_another_user_write_makes_a_directory_shared(attacker_dir: Path) -> None:
    """Mode bits alone (root's, 0775, group root) say nobody else may write; an ACL entry for
    uid 65534 says it may, and it really can: shared, so not looked up on the loop."""
    attacker_dir.chmod(0o755)
    logs = attacker_dir / "logs"
    logs.mkdir(mode=0o775)
    try:
        os.setxattr(logs, ACL_XATTR, NOBODY_MAY_WRITE)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on this filesystem: {exc}")
    as_nobody("touch", str(logs / "planted"))  # it really can
    assert shared_directory(str(logs)) is True
    assert shared_directory(str(attacker_dir)) is False
    (logs / "inner").mkdir(mode=0o755)
    assert direct_for(logs / "inner") is False  # the attacker may replace inner


@pytest.mark.parametrize(("acl", "shared"), [
    (NOBODY_MAY_WRITE, True),
    (posix_acl((0x01, 7, UNDEFINED), (0x02, 5, NOBODY), (0x04, 5, UNDEFINED), (0x10, 5, UNDEFINED),
               (0x20, 5, UNDEFINED)), False),  # nobody may read only
    (posix_acl((0x01, 7, UNDEFINED), (0x02, 7, NOBODY), (0x04, 5, UNDEFINED), (0x10, 5, UNDEFINED),
               (0x20, 5, UNDEFINED)), False),  # its rwx is cut by the mask
    (posix_acl((0x01, 7, UNDEFINED), (0x04, 5, UNDEFINED), (0x08, 7, 0), (0x10, 7, UNDEFINED),
               (0x20, 5, UNDEFINED)), False),  # group root may write
    (posix_acl((0x01, 7, UNDEFINED), (0x04, 5, UNDEFINED), (0x08, 7, 100), (0x10, 7, UNDEFINED),
               (0x20, 5, UNDEFINED)), True),  # group 100 may write
    (b"\x02\x00\x00\x00\x01", True),  # malformed: the safe answer
], ids=["user-write", "user-read", "masked", "group-root", "group-other", "malformed"])
def test_acl_entries_that_grant_write(acl: bytes, shared: bool) -> None:
    assert acl_grants_write(acl) is shared


def test_a_mount_over_another_user_s_directory_in_a_sticky_directory_is_not_trusted(
        attacker_dir: Path) -> None:
    """uid 65534 makes ``ours`` in a /tmp-like directory; root mounts a tmpfs over it. ``lstat``
    then shows the tmpfs root (root's), but the kernel lets the directory's maker rename it (from
    a mount namespace of its own, where the mount is not there): not looked up on the loop."""
    attacker_dir.chmod(0o1777)
    covered = attacker_dir / "ours"
    as_nobody("mkdir", "-m", "0755", str(covered))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755,size=1m", "none", str(covered)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        assert os.lstat(covered).st_uid == 0  # what a stat shows: the mounted root's owner
        assert direct_for(covered / "logs") is False
    finally:
        subprocess.run(["umount", str(covered)], check=True)

"""The file sink in a log directory an unprivileged attacker (uid 65534) can write.

Every attack is made by that user for real (``setpriv``, see tests/attacker.py); the agent's side
is root, as in production. Where an attack must land between two of the sink's steps (after a
rotation, before gzip or prune), the test holds the sink's archiving lock to keep that window open
instead of racing it.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import re
import time
from pathlib import Path

import pytest

from memagent.errors import SinkError
from memagent.fanout import Outlet
from memagent.plugins.sinks.file_rotation import archives_of
from memagent.testing import make_records

from attacker import NOBODY, as_nobody
from cli_helpers import scaled, until
from filesink_helpers import file_sink, fingerprint, read_lines, root_only_file

SECRET = b"root-only secret\n"


@pytest.fixture
def logs(attacker_dir: Path) -> Path:
    """The log directory, the attacker's own: it may add, rename and delete any entry in it (no
    sticky bit, so the kernel's protected_symlinks and protected_fifos do not step in)."""
    os.chown(attacker_dir, NOBODY, NOBODY)
    attacker_dir.chmod(0o755)
    return attacker_dir


def refusal(path: Path | str, why: str = "is a symbolic link") -> str:
    """The one-line reason the sink gives, as a regex matching the whole message."""
    return f"^{re.escape(f'{path}: refusing to open: {why}')}$"


async def test_link_at_live_path_is_refused_counted_and_retried_until_gone(
        logs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A link at the live path to a root-only file: the file is untouched, one error line says
    why, refusals are counted, and the queued records land once the link is gone."""
    secret = root_only_file(tmp_path / "secret", SECRET)
    before = fingerprint(secret)
    live = logs / "m.ndjson"
    as_nobody("ln", "-s", str(secret), str(live))
    sink = file_sink(live)
    counters = sink.context.counters
    outlet = Outlet("file", sink, queue=1000, when_full="drop_oldest", batch=10, targets=None)
    records = make_records(30)
    with caplog.at_level(logging.WARNING):
        await outlet.start()
        for record in records:
            outlet.offer(record)
        await until(lambda: counters["write_errors"] >= 2)  # failed, and failed again on retry
        as_nobody("rm", str(live))
        await outlet.drain(time.monotonic() + scaled(10))
    assert fingerprint(secret) == before
    assert read_lines(live) == [r.json for r in records] and outlet.written == 30
    assert counters["refused_paths"] == counters["write_errors"] + 1  # + the open at start
    failed = [m for m in caplog.messages if "write failed" in m]
    assert len(failed) == 1 and f"{live}: refusing to open: is a symbolic link" in failed[0]
    assert f"file sink file: cannot open {live}: refusing to open: is a symbolic link; records wait " \
           "in its queue and the path is retried" in sink.context.log.reports


async def test_dangling_link_at_live_path_creates_nothing(logs: Path, tmp_path: Path) -> None:
    """A dangling link at the live path: its target is never created; start and write say why."""
    target = tmp_path / "made-by-root"
    live = logs / "m.ndjson"
    as_nobody("ln", "-s", str(target), str(live))
    sink = file_sink(live)
    await sink.start()
    with pytest.raises(SinkError, match=refusal(live)):
        await sink.write(make_records(3))
    await sink.close()
    assert not target.exists() and live.is_symlink()
    assert sink.context.counters["refused_paths"] == 2 and sink.context.counters["write_errors"] == 1


async def test_missing_directories_are_not_created_through_a_planted_link(logs: Path, tmp_path: Path) -> None:
    """A link where the sink must create a directory level: nothing appears at its target."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    as_nobody("ln", "-s", str(elsewhere), str(logs / "a"))
    sink = file_sink(logs / "a" / "b" / "m.ndjson")
    await sink.start()
    with pytest.raises(SinkError, match=refusal(logs / "a")):
        await sink.write(make_records(3))
    await sink.close()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(("plant", "why"), [
    ("fifo", "not a regular file"),
    ("own file", f"owned by uid {NOBODY}, not the agent's (0)"),
    ("hard link", "has 2 hard links"),
], ids=["fifo", "own-file", "hard-link"])
async def test_planted_entry_at_live_path_is_refused_without_blocking(plant: str, why: str, logs: Path,
                                                                      tmp_path: Path) -> None:
    """A FIFO, the attacker's own file, or a hard link to a root-only file at the live path:
    refused at once, never waited on, never written."""
    secret = root_only_file(tmp_path / "secret", SECRET)
    before = fingerprint(secret)
    live = logs / "m.ndjson"
    if plant == "fifo":
        as_nobody("mkfifo", str(live))
    elif plant == "own file":
        as_nobody("touch", str(live))
    else:  # made by root: fs.protected_hardlinks=0 (old or tuned kernels) lets the attacker do it
        os.link(secret, live)
    sink = file_sink(live)
    try:
        await asyncio.wait_for(sink.start(), scaled(5))
        with pytest.raises(SinkError, match=refusal(live, why)):
            await asyncio.wait_for(sink.write(make_records(3)), scaled(5))
        await sink.close()
    finally:
        if plant == "fifo":  # a reader frees a writer stuck in open(), so a failing run still ends
            os.close(os.open(live, os.O_RDONLY | os.O_NONBLOCK))
    assert fingerprint(secret) == before
    assert plant == "hard link" or os.lstat(live).st_size == 0  # nothing written to what was planted
    assert sink.context.counters["refused_paths"] == 2


async def test_planted_partial_link_is_never_written_through(logs: Path, tmp_path: Path) -> None:
    """A link planted at <archive>.gz.partial before gzip: its target is untouched, the .gz whole."""
    secret = root_only_file(tmp_path / "secret", SECRET)
    before = fingerprint(secret)
    live = logs / "m.ndjson"
    sink = file_sink(live, rotate_size="1KB", compress=True)
    await sink.start()
    records = make_records(20)
    await sink.write(records[:10])
    async with sink._archiving:  # the window between rotation and gzip, held open
        await sink.write(records[10:])  # rotates: records[:10] are now an archive awaiting gzip
        [archive] = archives_of(str(live))
        as_nobody("ln", "-s", str(secret), f"{archive}.gz.partial")
    await sink.close()
    assert fingerprint(secret) == before
    packed = Path(f"{archive}.gz")
    assert archives_of(str(live)) == [str(packed)] and not packed.is_symlink()
    assert read_lines(packed) == [r.json for r in records[:10]]
    assert sorted(os.listdir(logs)) == sorted([live.name, packed.name])  # the planted link is gone


async def test_archive_swapped_for_a_link_is_not_compressed(logs: Path, tmp_path: Path) -> None:
    """An archive swapped for a link to a secret before gzip: the secret is untouched and in no
    .gz; the refusal is reported and counted, and the link is left as it is."""
    secret = root_only_file(tmp_path / "secret", SECRET)
    before = fingerprint(secret)
    live = logs / "m.ndjson"
    sink = file_sink(live, rotate_size="1KB", compress=True)
    await sink.start()
    records = make_records(20)
    await sink.write(records[:10])
    async with sink._archiving:
        await sink.write(records[10:])
        [archive] = archives_of(str(live))
        as_nobody("sh", "-c", 'rm "$1" && ln -s "$2" "$1"', "swap", archive, str(secret))
    await sink.close()
    assert fingerprint(secret) == before
    assert [p.name for p in logs.glob("*.gz") if SECRET in gzip.decompress(p.read_bytes())] == []
    assert sorted(os.listdir(logs)) == sorted([live.name, Path(archive).name])  # no .gz, no .partial
    assert sink.context.counters["archive_errors"] == 1 and sink.context.counters["refused_paths"] == 1
    assert sink.context.log.reports[-1] == (f"file sink file: archiving failed: {archive}: refusing to open: "
                                       "is a symbolic link; archives are left as they are")


async def test_prune_unlinks_an_archive_named_link_never_its_target(logs: Path, tmp_path: Path) -> None:
    """keep prunes an archive-named link the attacker planted: the link goes, its target stays."""
    secret = root_only_file(tmp_path / "secret", SECRET)
    before = fingerprint(secret)
    planted = logs / "m.ndjson.2000-01-01T00-00-00.000000.gz"
    as_nobody("ln", "-s", str(secret), str(planted))
    live = logs / "m.ndjson"
    sink = file_sink(live, rotate_size="1KB", keep=1)
    await sink.start()
    records = make_records(20)
    await sink.write(records[:10])
    await sink.write(records[10:])
    await sink.close()
    assert fingerprint(secret) == before and not os.path.lexists(planted)
    assert [read_lines(Path(a)) for a in archives_of(str(live))] == [[r.json for r in records[:10]]]


async def test_prune_stays_in_the_log_directory_when_it_is_swapped_for_a_link(logs: Path,
                                                                              tmp_path: Path) -> None:
    """The log directory swapped for a link to another directory between rotation and prune:
    nothing there is deleted or created, and the next open refuses the link."""
    victims = tmp_path / "victims"
    victims.mkdir()
    kept = root_only_file(victims / "m.ndjson.2000-01-01T00-00-00.000000")
    live = logs / "sub" / "m.ndjson"
    sink = file_sink(live, rotate_size="1KB", keep=0)
    await sink.start()
    records = make_records(30)
    await sink.write(records[:10])
    async with sink._archiving:  # the window between rotation and prune, held open
        await sink.write(records[10:20])
        as_nobody("sh", "-c", 'mv "$1" "$1.old" && ln -s "$2" "$1"', "swap", str(live.parent), str(victims))
    with pytest.raises(SinkError, match=refusal(live.parent)):
        await sink.write(records[20:])
    await sink.close()
    assert sorted(os.listdir(victims)) == [kept.name]
    assert os.listdir(logs / "sub.old") == [live.name]  # keep = 0 pruned its archive there


@pytest.mark.parametrize(("owner", "group", "mode", "warned"), [
    (NOBODY, 0, 0o755, True),
    (0, 0, 0o777, True),
    (0, 0, 0o1777, True),
    (0, NOBODY, 0o775, True),
    (0, 0, 0o775, False),
    (0, 0, 0o755, False),
], ids=["theirs", "world-writable", "sticky", "group-writable", "root-group-writable", "root-only"])
async def test_directory_writable_by_others_is_reported_once(owner: int, group: int, mode: int, warned: bool,
                                                             tmp_path: Path) -> None:
    """A log directory others may write (theirs, world-writable with or without the sticky bit,
    group-writable by a group other than root's) is reported once; root's own is not."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory another owner")
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chown(logs, owner, group)
    logs.chmod(mode)
    sink = file_sink(logs / "m.ndjson")
    await sink.start()
    await sink.write(make_records(3))
    await sink.reopen()
    await sink.write(make_records(3, start_seq=3))
    await sink.close()
    warning = (f"file sink file: directory {logs} is writable by others (owner uid {owner}, "
               f"mode {mode:04o}); memagent refuses links there but consider a directory only root can write")
    assert list(sink.context.log.reports) == ([warning] if warned else [])

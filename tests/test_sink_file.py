"""The file sink through its contract: real files, real rotation, real full disks."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from memagent.errors import ConfigError, SinkError
from memagent.options import Options
from memagent.plugins.sinks.file import FileSink
from memagent.plugins.sinks.file_rotation import archives_of, compress, next_boundary
from memagent.testing import make_records, sink_context

from filesink_helpers import can_mount, file_sink, read_lines, seqs_in_order, tmpfs


async def test_batches_become_lines_with_0640_and_0750(tmp_path: Path) -> None:
    """Records are NDJSON lines; every new dir level is 0750 and the file 0640 even under umask 0."""
    old = os.umask(0)
    try:
        sink = file_sink(tmp_path / "var" / "logs" / "m.ndjson")
        await sink.start()
        records = make_records(25)
        await sink.write(records[:10])
        await sink.write(records[10:])
        await sink.close()
    finally:
        os.umask(old)
    live = tmp_path / "var" / "logs" / "m.ndjson"
    assert read_lines(live) == [r.json for r in records]
    assert oct(live.stat().st_mode & 0o777) == "0o640"
    assert oct(live.parent.stat().st_mode & 0o777) == "0o750"
    assert oct(live.parent.parent.stat().st_mode & 0o777) == "0o750"


async def test_size_rotation_keeps_every_line_once_in_order(tmp_path: Path) -> None:
    """Dozens of size rotations with gzip: archives + live hold every seq once, in order."""
    live = tmp_path / "m.ndjson"
    sink = file_sink(live, rotate_size="4KB", keep=1000, compress=True)
    await sink.start()
    records = make_records(2000)
    for start in range(0, len(records), 20):
        await sink.write(records[start:start + 20])
    await sink.close()
    assert seqs_in_order(live) == list(range(1, 2001))
    archives = archives_of(str(live))
    assert len(archives) == sink.context.counters["rotations"] >= 50
    assert all(a.endswith(".gz") for a in archives)
    assert archives == sorted(archives)


def test_an_archive_pruned_before_its_turn_to_be_compressed_is_no_error(tmp_path: Path) -> None:
    """Rotations can outpace gzip: an archive may be pruned (keep reached) while it waits for its
    turn. Compressing it then finds nothing to do — not an archive error (a loaded run saw one)."""
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert compress(directory, str(tmp_path / "m.ndjson.2026-11-26T03-32-46.163295"), 0o640) is None
        (tmp_path / "m.ndjson.2026-11-26T03-32-47.000000").write_bytes(b'{"seq":1}\n')
        packed = compress(directory, str(tmp_path / "m.ndjson.2026-11-26T03-32-47.000000"), 0o640)
    finally:
        os.close(directory)
    assert packed is not None and sorted(p.name for p in tmp_path.iterdir()) == [Path(packed).name]


@pytest.mark.parametrize("compress", [False, True])
async def test_keep_prunes_oldest_archives(tmp_path: Path, compress: bool) -> None:
    """keep = 3 leaves the three newest archives (gzipped or not) and nothing else."""
    live = tmp_path / "m.ndjson"
    sink = file_sink(live, rotate_size="1KB", keep=3, compress=compress)
    await sink.start()
    for batch in range(30):
        await sink.write(make_records(3, start_seq=batch * 3))
    await sink.close()
    archives = archives_of(str(live))
    assert len(archives) == 3 and sink.context.counters["rotations"] > 3
    assert all(a.endswith(".gz") == compress for a in archives)
    assert "archive_errors" not in sink.context.counters and list(sink.context.log.reports) == []
    leftovers = {p.name for p in tmp_path.iterdir()} - {live.name, *(Path(a).name for a in archives)}
    assert leftovers == set()  # no .partial, no uncompressed archive left behind
    assert seqs_in_order(live)[-1] == 90


def test_rotate_interval_boundaries_are_clock_aligned() -> None:
    """A 1h interval rotates at whole hours (UTC), a 1d interval at midnight."""
    assert next_boundary(3600 * 5 + 12.5, 3600) == 3600 * 6
    assert next_boundary(86400 * 3 + 1, 86400) == 86400 * 4


async def test_renamed_file_is_reopened_and_deleted_file_recreated(tmp_path: Path) -> None:
    """logrotate create: after a rename the next batch goes to a new file at the path; same after delete."""
    live = tmp_path / "m.ndjson"
    sink = file_sink(live)
    await sink.start()
    records = make_records(30)
    await sink.write(records[:10])
    live.rename(tmp_path / "m.ndjson.1")
    await sink.write(records[10:20])
    live.unlink()
    await sink.write(records[20:])
    await sink.close()
    assert read_lines(tmp_path / "m.ndjson.1") == [r.json for r in records[:10]]
    assert read_lines(live) == [r.json for r in records[20:]]
    assert sink.context.counters["reopens"] == 2


async def test_truncated_file_continues_at_new_end_without_hole(tmp_path: Path) -> None:
    """copytruncate: after truncation the file holds only new lines, no NUL bytes."""
    live = tmp_path / "m.ndjson"
    sink = file_sink(live)
    await sink.start()
    records = make_records(20)
    await sink.write(records[:10])
    os.truncate(live, 0)
    await sink.write(records[10:])
    await sink.close()
    assert b"\0" not in live.read_bytes()
    assert read_lines(live) == [r.json for r in records[10:]]
    assert sink.context.counters["truncations"] == 1


async def test_dev_full_raises_sink_error(tmp_path: Path) -> None:
    """Writing to /dev/full raises SinkError naming the path and ENOSPC's text."""
    sink = file_sink(Path("/dev/full"))
    await sink.start()
    with pytest.raises(SinkError, match="/dev/full: No space left on device"):
        await sink.write(make_records(3))
    await sink.close()


async def test_partial_write_on_full_disk_is_cut_back_and_retried_once(tmp_path: Path) -> None:
    """A real full tmpfs: the failed batch leaves no partial line; after space frees up the retry
    writes it exactly once."""
    if not can_mount(tmp_path):
        pytest.skip("needs root to mount a small tmpfs")
    with tmpfs(tmp_path / "small", size="64k") as disk:
        ballast = disk / "ballast"
        ballast.write_bytes(b"x" * 40_000)
        sink = file_sink(disk / "m.ndjson")
        await sink.start()
        records = make_records(400)
        written: list[bytes] = []
        failed_at = None
        for start in range(0, 400, 25):
            batch = records[start:start + 25]
            try:
                await sink.write(batch)
                written.extend(r.json for r in batch)
            except SinkError as exc:
                assert "No space left on device" in str(exc)
                failed_at = start
                break
        assert failed_at is not None, "the disk never filled"
        assert read_lines(disk / "m.ndjson") == written  # whole lines only, nothing duplicated
        ballast.unlink()
        await sink.write(records[failed_at:failed_at + 25])  # the framework's retry
        await sink.close()
        assert read_lines(disk / "m.ndjson") == written + [r.json for r in records[failed_at:failed_at + 25]]
        assert sink.context.counters["write_errors"] == 1


async def test_unwritable_path_is_reported_not_fatal_and_recovers(tmp_path: Path) -> None:
    """A read-only filesystem: start reports once, writes raise SinkError, remount rw → writes land."""
    if not can_mount(tmp_path):
        pytest.skip("needs root to mount a tmpfs")
    with tmpfs(tmp_path / "ro", readonly=True) as disk:
        sink = file_sink(disk / "m.ndjson")
        await sink.start()
        assert len(sink.context.log.reports) == 1 and "Read-only file system" in sink.context.log.reports[0]
        records = make_records(5)
        with pytest.raises(SinkError, match="Read-only file system"):
            await sink.write(records)
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        await sink.write(records)
        await sink.close()
        assert read_lines(disk / "m.ndjson") == [r.json for r in records]


async def test_path_template_uses_host_and_strftime(tmp_path: Path) -> None:
    """{host} and strftime fields are filled in when the file is opened."""
    sink = file_sink(tmp_path / "{host}" / "%Y.ndjson")
    await sink.start()
    await sink.write(make_records(1))
    await sink.close()
    assert (tmp_path / "test-host" / f"{time.strftime('%Y')}.ndjson").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "rw"}, 'sinks[1].mode: must be an octal mode like "0640", got "rw"'),
    ({"fsync": "always"}, 'sinks[1].fsync: must be one of "never", "batch", "interval", got "always"'),
    ({"rotate_size": "big"}, "sinks[1].rotate_size: must be a positive size"),
    ({"rotate_sise": "1MB"}, "sinks[1].rotate_sise: unknown key; did you mean rotate_size?"),
    ({"path": "/x/{hostname}.log"}, "sinks[1].path: only {host} may appear in braces"),
])
def test_bad_options_name_the_key(options: dict[str, object], message: str) -> None:
    """Each bad option is a ConfigError starting with its dotted key."""
    raw = {"path": "/tmp/x.ndjson", **options}
    with pytest.raises(ConfigError) as caught:
        FileSink.from_options(Options(raw, "sinks[1]"), sink_context())
    assert str(caught.value).startswith(message)



async def test_interval_fsync_reaches_disk_without_a_further_batch(tmp_path: Path) -> None:
    """fsync = "interval": the last batch is fsynced fsync_interval later even if nothing follows."""
    sink = file_sink(tmp_path / "m.ndjson", fsync="interval", fsync_interval="50ms")
    await sink.start()
    await sink.write(make_records(3))
    assert sink.context.counters["fsyncs"] == 0
    assert sink._flush_task is not None
    await asyncio.wait_for(sink._flush_task, 5)
    assert sink.context.counters["fsyncs"] == 1
    await sink.close()
    assert sink.context.counters["fsyncs"] == 1  # nothing new to sync at close


async def test_batch_fsync_and_close_fsync(tmp_path: Path) -> None:
    """fsync = "batch" syncs every batch; "never" syncs nothing, not even at close."""
    each = file_sink(tmp_path / "a.ndjson", fsync="batch")
    never = file_sink(tmp_path / "b.ndjson", fsync="never")
    for sink in (each, never):
        await sink.start()
        for start in range(0, 30, 10):
            await sink.write(make_records(10, start_seq=start))
        await sink.close()
    assert each.context.counters["fsyncs"] == 3
    assert never.context.counters["fsyncs"] == 0


async def test_failed_fsync_is_reported_once_and_never_duplicates(tmp_path: Path) -> None:
    """A file that refuses fsync (a FIFO: EINVAL): counted, one report, each line delivered once."""
    fifo = tmp_path / "m.fifo"
    os.mkfifo(fifo)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(fifo.read_bytes()))
    reader.start()
    sink = file_sink(fifo, fsync="batch")
    await sink.start()
    records = make_records(30)
    for start in range(0, 30, 10):
        await sink.write(records[start:start + 10])
    await sink.close()
    reader.join(timeout=10)
    assert received.splitlines() == [r.json for r in records]
    assert sink.context.counters["fsync_errors"] == 4  # each batch, and close tries once more
    assert sink.context.counters["truncations"] == 0  # a FIFO's size 0 is not a truncation
    assert [m for m in sink.context.log.reports if "fsync" in m] == [
        f"file sink file: fsync {fifo} failed: Invalid argument; records written may not be on disk"]


async def test_reopen_that_cannot_open_says_why_and_the_next_write_recovers(tmp_path: Path) -> None:
    """SIGHUP while the directory is gone (a file in its place): SinkError naming the path; once
    the directory is back the next write recreates the file."""
    logs = tmp_path / "logs"
    live = logs / "m.ndjson"
    sink = file_sink(live)
    await sink.start()
    records = make_records(20)
    await sink.write(records[:10])
    shutil.rmtree(logs)
    logs.write_text("not a directory")
    with pytest.raises(SinkError, match=f"^{live}: Not a directory$"):
        await sink.reopen()
    with pytest.raises(SinkError, match="Not a directory"):
        await sink.write(records[10:])
    logs.unlink()
    await sink.write(records[10:])  # the framework's retry
    await sink.close()
    assert read_lines(live) == [r.json for r in records[10:]]


async def test_rotate_interval_rotates_at_the_boundary_and_skips_empty_files(tmp_path: Path) -> None:
    """rotate_interval: the first batch after a clock boundary starts a new file; a boundary that
    passed with an empty live file makes no empty archive."""
    live = tmp_path / "m.ndjson"
    sink = file_sink(live, rotate_interval="200ms")
    await sink.start()
    records = make_records(30)

    async def past_boundary() -> None:  # waiting on the wall clock itself: nothing to await
        assert sink._boundary is not None
        await asyncio.sleep(max(0.0, sink._boundary - time.time()) + 0.01)

    await sink.write(records[:10])
    await past_boundary()
    await sink.write(records[10:20])  # rotates first: records[:10] are archived
    await past_boundary()
    os.truncate(live, 0)  # as if empty when the boundary passed
    await sink.write(records[20:])
    await sink.close()
    archives = archives_of(str(live))
    assert sink.context.counters["rotations"] == 1 and len(archives) == 1
    assert read_lines(Path(archives[0])) == [r.json for r in records[:10]]
    assert read_lines(live) == [r.json for r in records[20:]]

"""Helpers for file-sink tests: read back every record across live file and archives."""

from __future__ import annotations

import contextlib
import gzip
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson

from memagent.options import Options
from memagent.plugins.sinks.file import FileSink
from memagent.plugins.sinks.file_rotation import archives_of
from memagent.testing import sink_context


def file_sink(path: Path, **options: object) -> FileSink:
    """A file sink named ``file`` writing to ``path``, built from options as the agent does."""
    return FileSink.from_options(Options({"path": str(path), **options}, "sinks[1]"), sink_context("file"))


def read_lines(path: Path, *, partial_tail: bool = False) -> list[bytes]:
    """Lines of a file, gunzipped if it ends in .gz. Every line must be whole, except with
    ``partial_tail`` a last one cut short, which is left out: logrotate's copytruncate may copy
    a file while a batch is being appended (the rest of that line is then truncated away)."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if partial_tail and data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
    assert not data or data.endswith(b"\n"), f"{path} ends with a partial line"
    return data.splitlines()


def seqs_in_order(live: Path) -> list[int]:
    """``seq`` of every record in the archives (oldest first) then the live file."""
    files = [Path(p) for p in archives_of(str(live))] + ([live] if live.exists() else [])
    return [orjson.loads(line)["seq"] for f in files for line in read_lines(f)]


def seqs_anywhere(directory: Path, *, partial_tail: bool = False) -> list[int]:
    """``seq`` of every record in every file of ``directory`` (any order, duplicates kept)."""
    seqs = []
    for path in sorted(directory.iterdir()):
        if path.is_file():
            seqs.extend(orjson.loads(line)["seq"] for line in read_lines(path, partial_tail=partial_tail)
                        if line.strip())
    return seqs


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str = "1m", readonly: bool = False) -> Iterator[Path]:
    """A real tmpfs mounted at ``mountpoint`` (root only); unmounted afterwards. Its root is
    0755 like a log directory (tmpfs defaults to 1777, which the file sink reports)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], check=True,
                   capture_output=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def can_mount(tmp_path: Path) -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN)."""
    probe = tmp_path / "mount-probe"
    try:
        with tmpfs(probe):
            return True
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False


def root_only_file(path: Path, content: bytes = b"root-only secret\n") -> Path:
    """A 0600 file of root's that the attacker wants the agent to write, read or delete."""
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def fingerprint(path: Path) -> tuple[bytes, int, int]:
    """What must not change in a victim file: content, mode, modification time."""
    status = path.stat()
    return path.read_bytes(), status.st_mode, status.st_mtime_ns

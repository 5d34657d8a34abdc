"""The ``stdout`` sink: NDJSON for pipes, or one readable line per record for people.

Writes happen in a worker thread, so a slow reader on the other end of a pipe never blocks the
event loop (the outlet's queue and ``when_full`` absorb it instead). A closed pipe
(``memagent run | head``) raises :class:`~memagent.errors.SinkClosed`: no reader will come back,
so the framework stops writing here and counts the rest as dropped (never silently lost); if it
was the only sink, the agent stops with exit 1. Other write errors are retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO, ClassVar

from memagent.contracts import Record, SinkContext
from memagent.errors import SinkClosed, SinkError
from memagent.options import Options

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: anything a terminal or
# a line-based reader could take as a new line, a cursor move or an escape sequence
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u2028``), so a
    process name or command line can never start a new line or move the cursor."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def human_bytes(value: int) -> str:
    """``15491072`` → ``14.8MiB``."""
    amount = float(value)
    for unit in _UNITS:
        if abs(amount) < 1024 or unit == _UNITS[-1]:
            return f"{int(amount)}{unit}" if unit == "B" else f"{amount:.1f}{unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def text_line(fields: Mapping[str, Any]) -> str:
    """One readable line for a record, e.g.
    ``05:00:00.12 api 1234 gunicorn rss=14.8MiB vms=80.1MiB``. Everything that comes from a
    process (name, command line, error messages) is passed through :func:`printable`."""
    kind = fields["type"]
    clock = fields["ts"][11:22]
    if kind == "agent":
        stats = fields["agent"]
        dropped = sum(s.get("dropped", 0) for s in stats.get("sinks", {}).values())
        return (f"{clock} agent processes={stats['processes']} records={stats['records']} "
                f"skipped_ticks={stats['ticks_skipped']} dropped={dropped}")
    who = f"{clock} {fields['target']} {fields['pid']} {printable(fields['name'])}"
    if kind == "sample":
        portable = fields["portable"]
        parts = [f"rss={human_bytes(portable['rss'])}", f"vms={human_bytes(portable['vms'])}"]
        for key, value in fields.get("full", {}).items():
            parts.append(f"{key}={human_bytes(value)}")
        return f"{who} " + " ".join(parts)
    if kind == "start":
        return f"{who} start: {printable(' '.join(fields.get('cmdline', []))[:120])}"
    if kind == "error":
        return f"{who} error {fields['error']['kind']}: {printable(fields['error']['message'])}"
    return f"{who} {kind}"


class StdoutSink:
    """Writes records to standard output."""

    name: ClassVar[str] = "stdout"
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "stdout"
# format = "ndjson"     # "ndjson": one JSON record per line (for pipes);
#                       # "text": one readable line per record (for people)
"""

    def __init__(self, text: bool, stream: BinaryIO | None = None) -> None:
        self.text = text
        self._stream = stream

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> StdoutSink:
        fmt = options.choice("format", ("ndjson", "text"), "ndjson")
        options.finish()
        return cls(text=fmt == "text")

    async def start(self) -> None:
        if self._stream is None:
            self._stream = sys.stdout.buffer

    def _encode(self, batch: Sequence[Record]) -> bytes:
        if self.text:
            return "".join(text_line(r.fields) + "\n" for r in batch).encode()
        return b"\n".join(r.json for r in batch) + b"\n"

    def _write(self, data: bytes) -> None:
        assert self._stream is not None
        self._stream.write(data)
        self._stream.flush()

    async def write(self, batch: Sequence[Record]) -> None:
        try:
            await asyncio.to_thread(self._write, self._encode(batch))
        except BrokenPipeError as exc:
            self._discard_unflushed()
            raise SinkClosed("the reader of stdout closed the pipe") from exc
        except ValueError as exc:  # the stream object was closed
            raise SinkClosed(f"stdout is closed: {exc}") from exc
        except OSError as exc:
            raise SinkError(f"stdout: {exc.strerror or exc}") from exc

    def _discard_unflushed(self) -> None:
        """Point the process's stdout at /dev/null, so the bytes still buffered for the closed
        pipe cannot raise again when the interpreter flushes stdout at exit."""
        if self._stream is sys.stdout.buffer:
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())
                os.close(devnull)

    async def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError, ValueError):  # already closed or broken: nothing to flush
                self._stream.flush()

"""The ``stdout`` sink: NDJSON for pipes, or one readable line per record for people.

The readable line is :func:`memagent.record_types.text_line`: each record type says how it reads,
and every line is escaped there, so nothing a process controls can forge a line.

Writes to a pipe, a terminal or a socket (the journal) happen in a worker thread, so a slow
reader on the other end never blocks the event loop (the outlet's queue and ``when_full`` absorb
it instead); writes to a regular file on a local filesystem or to /dev/null are made on the loop,
as the file sink's are (:mod:`~memagent.plugins.sinks.file_calls`). A closed pipe
(``memagent run | head``) raises :class:`~memagent.errors.SinkClosed`: no reader will come back,
so the framework stops writing here and counts the rest as dropped (never silently lost); if it
was the only sink, the agent stops with exit 1. Other write errors are retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import sys
from collections.abc import Sequence
from typing import BinaryIO, ClassVar

from memagent.contracts import Record, SinkContext, ndjson
from memagent.errors import SinkClosed, SinkError
from memagent.options import Options
from memagent.plugins.sinks.file_calls import FileCalls
from memagent.record_types import text_line


class StdoutSink:
    """Writes records to standard output."""

    name: ClassVar[str] = "stdout"
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "stdout"
# format = "ndjson"     # "ndjson": one JSON record per line (for pipes);
#                       # "text": one readable line per record (for people)
"""

    def __init__(self, text: bool, stream: BinaryIO | None = None, log: logging.Logger | None = None) -> None:
        self.text = text
        self._stream = stream
        self._calls = FileCalls("stdout", log or logging.getLogger("memagent.sink.stdout"))

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> StdoutSink:
        fmt = options.choice("format", ("ndjson", "text"), "ndjson")
        options.finish()
        return cls(text=fmt == "text", log=context.log)

    async def start(self) -> None:
        if self._stream is None:
            self._stream = sys.stdout.buffer
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):  # no real fd: threads
            await asyncio.to_thread(self._calls.opened, os.fstat(self._stream.fileno()))

    def _encode(self, batch: Sequence[Record]) -> bytes:
        if self.text:
            return "".join(text_line(r.fields) + "\n" for r in batch).encode()
        return ndjson(batch)

    def _write(self, data: bytes) -> None:
        assert self._stream is not None
        self._stream.write(data)
        self._stream.flush()

    async def write(self, batch: Sequence[Record]) -> None:
        try:
            data = self._encode(batch)
            await self._calls.run(lambda: self._write(data))
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

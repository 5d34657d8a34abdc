"""An example third-party sink for memagent: ``sample`` records as CSV rows.

It shows the whole plugin contract: a class registered in the ``memagent.sinks`` entry-point
group, options validated with :class:`memagent.options.Options` (unknown keys are errors), and
``start`` / ``write`` / ``close``. Queues, batching, retries and drop counting are memagent's
job, not the plugin's: ``write`` only writes, and raises SinkError when it cannot.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
from collections.abc import Sequence
from typing import ClassVar

from memagent.contracts import Record, SinkContext
from memagent.errors import SinkError
from memagent.options import Options

COLUMNS = ("ts", "host", "target", "pid", "name", "rss", "vms")


class CsvSink:
    """Appends one CSV row per ``sample`` record; other record types are skipped."""

    name: ClassVar[str] = "csv"
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "csv"
path = "memory.csv"     # created with a header row if missing
"""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: io.TextIOWrapper | None = None

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> CsvSink:
        path = options.string("path", nonempty=True)
        options.finish()
        return cls(path)

    async def start(self) -> None:
        fresh = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._file = open(fd, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if fresh:
            csv.writer(self._file).writerow(COLUMNS)

    def _write(self, rows: list[tuple[object, ...]]) -> None:
        assert self._file is not None
        csv.writer(self._file).writerows(rows)
        self._file.flush()

    async def write(self, batch: Sequence[Record]) -> None:
        rows = [(r.fields["ts"], r.fields["host"], r.target, r.pid, r.fields["name"],
                 r.fields["portable"]["rss"], r.fields["portable"]["vms"])
                for r in batch if r.type == "sample"]
        try:
            await asyncio.to_thread(self._write, rows)
        except OSError as exc:
            raise SinkError(f"{self.path}: {exc.strerror}") from exc

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()

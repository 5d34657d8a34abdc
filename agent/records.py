"""Schema-v1 records: drafted from readings, then numbered and encoded once.

:class:`RecordMaker` is the only place records are made. Its ``sample``/``start``/... methods
return :class:`Draft` objects: the whole record but its ``seq``. :meth:`RecordMaker.seal` gives a
draft its ``seq`` and encodes it with orjson, exactly once; the bytes are shared by every sink.
Only the pipeline (:mod:`memagent.pipeline`) seals, after its processors ran, so ``seq`` is
contiguous across every type within a run — derived records included — and a consumer detects
loss by a gap. The shape is documented in the schema printed by ``memagent schema``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from memagent.contracts import CgroupStats, Container, MemoryCgroup, ProcessInfo, Reading, Record
from memagent.record_types import record_type

SCHEMA_VERSION = 1

#: At most this many processes' last samples are kept encoded (~1.5 KiB each; past it, all are
#: forgotten and made anew: a host watching more processes still works, only slower).
MAX_KEPT_SAMPLES = 65_536


class Draft:
    """A record before its ``seq``: ``fields`` is the whole record, its ``seq`` still 0. A
    processor may read and change ``fields`` before the pipeline seals it. ``memory_cgroup``
    (never encoded) tells processors which cgroup a ``sample``'s process is in, or which one a
    ``cgroup`` record is about.

    A ``sample`` draft is made from its process's :class:`SampleSource` (``source``): ``info``,
    ``reading`` and ``ts`` are there for processors that only read numbers, and the record's
    ``fields`` dict is made only if someone asks for it. Until then sealing it reuses the bytes
    kept since the process's numbers last changed: a concatenation, not an encoding. Asking for
    ``fields`` (to change them, say) gives that up: the draft is encoded anew."""

    __slots__ = ("type", "target", "pid", "memory_cgroup", "ts", "source", "_fields")

    def __init__(self, type: str, target: str | None, pid: int | None,  # noqa: A002
                 fields: dict[str, Any] | None, memory_cgroup: MemoryCgroup | None = None,
                 ts: str = "", source: SampleSource | None = None) -> None:
        if fields is None and source is None:
            raise ValueError("a draft needs its fields or its sample source")
        self.type = type
        self.target = target
        self.pid = pid
        self.memory_cgroup = memory_cgroup
        self.ts = ts
        self.source = source
        self._fields = fields

    @property
    def fields(self) -> dict[str, Any]:
        fields = self._fields
        if fields is None:
            assert self.source is not None  # one of them is set (__init__)
            fields = self._fields = self.source.fields(self.ts, to_change=True)
        return fields

    @property
    def fields_made(self) -> bool:
        """Whether ``fields`` exists as a dict (asked for, or made with the draft)."""
        return self._fields is not None

    @property
    def info(self) -> ProcessInfo | None:
        """A sample's process (None for other types)."""
        return self.source.info if self.source is not None else None

    @property
    def reading(self) -> Reading | None:
        """A sample's numbers (None for other types)."""
        return self.source.reading if self.source is not None else None

    def fields_at(self, seq: int) -> dict[str, Any]:
        """The fields of the record sealed from this draft's kept bytes (see
        :class:`~memagent.contracts.LazyFields`): made from the same source as those bytes."""
        assert self.source is not None  # only such drafts are sealed without fields
        fields = self.source.fields(self.ts)
        fields["seq"] = seq
        return fields


class SampleSource(NamedTuple):
    """One process's ``sample`` record as of one reading, kept from tick to tick: the record
    with ``seq`` 0 and an empty ``ts`` (``template``, never handed out: copied) and its
    encoding after ``"ts":"…",`` (``body``; None if the encoding did not begin as every
    sample's does: then each draft is encoded in full). Valid while ``info`` and ``reading``
    are the very objects the scheduler holds (a backend hands back the same Reading when the
    numbers did not change)."""

    info: ProcessInfo
    reading: Reading
    template: dict[str, Any]
    body: bytes | None

    def fields(self, ts: str, *, to_change: bool = False) -> dict[str, Any]:
        """The record at ``ts`` (its ``seq`` still 0). ``to_change``: its nested mappings
        copied too, so changing them leaves the kept template, bytes and Reading alone."""
        fields = dict(self.template)
        fields["ts"] = ts
        if to_change:
            for key, value in fields.items():
                if isinstance(value, dict):
                    fields[key] = dict(value)
        return fields


def iso_utc(epoch: float, digits: int = 6) -> str:
    """``2026-11-25T05:00:00.123456Z`` (``digits`` fractional digits, 0-6)."""
    text = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    if digits <= 0:
        return text[:-7] + "Z"
    return text[: len(text) - 6 + digits] + "Z"


def new_run_id() -> str:
    """16 hex digits, random per agent run."""
    return secrets.token_hex(8)


class RecordMaker:
    """Makes the records of one run. Not thread-safe: use it from the event loop only."""

    def __init__(self, *, host: str, os_name: str, backend: str, tags: dict[str, str],
                 run: str | None = None) -> None:
        self.run = run or new_run_id()
        self.os = os_name
        self.backend = backend
        self._seq = 0
        self._pid = os.getpid()
        self._started_text: dict[float, str] = {}
        # each watched process's last sample, encoded: see sample() and seal_all()
        self._samples: dict[tuple[str, int], SampleSource] = {}
        self._host, self._tags = host, dict(tags)
        opening = orjson.dumps({"schema": SCHEMA_VERSION, "type": "sample", "seq": 0, "run": self.run,
                                "ts": ""})
        self._sample_opening = opening[:-1]  # '{"schema":1,…,"ts":""' without its closing brace
        self._sample_head = opening[:opening.index(b'"seq":0') + len(b'"seq":')]
        self._sample_mid = opening[opening.index(b'"seq":0') + len(b'"seq":0'):-len(b'"}')]

    @property
    def host(self) -> str:
        return self._host

    @host.setter
    def host(self, host: str) -> None:
        """A reload's new hostname: from now on in every record, kept sample bytes included."""
        if host != self._host:
            self._host = host
            self._samples.clear()

    @property
    def tags(self) -> dict[str, str]:
        return self._tags

    @tags.setter
    def tags(self, tags: dict[str, str]) -> None:
        """A reload's new tags: from now on in every record, kept sample bytes included."""
        if tags != self._tags:
            self._tags = dict(tags)
            self._samples.clear()

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the newest record sealed (0 before the first)."""
        return self._seq

    def seal(self, draft: Draft) -> Record:
        """Number and encode a draft: the next ``seq``, then orjson, once."""
        return self.seal_all((draft,))[0]

    def seal_all(self, drafts: Iterable[Draft]) -> list[Record]:
        """:meth:`seal` for a chunk, in order (the pipeline's hot path: one call per chunk). A
        sample draft with kept bytes and no ``fields`` asked for is sealed by concatenating its
        ``seq`` and ``ts`` with them; the result is byte for byte what encoding its fields gives."""
        seq = self._seq
        dumps = orjson.dumps
        head, mid = self._sample_head, self._sample_mid
        ts_text, ts_bytes = "", b""
        sealed = []
        for draft in drafts:
            seq += 1
            source = draft.source
            if source is not None and source.body is not None and draft._fields is None:  # noqa: SLF001
                if draft.ts is not ts_text:
                    ts_text, ts_bytes = draft.ts, draft.ts.encode()
                data = b"%b%d%b%b\",%b" % (head, seq, mid, ts_bytes, source.body)
                sealed.append(Record(seq, "sample", draft.target, draft.pid, None, data, draft))
                continue
            fields = draft.fields
            fields["seq"] = seq
            sealed.append(Record(seq, draft.type, draft.target, draft.pid, fields, dumps(fields)))
        self._seq = seq
        return sealed

    def derived(self, kind: str, body: dict[str, Any], ts: str, *, target: str | None = None,
                pid: int | None = None) -> Draft:
        """A draft of a registered type other than the five made above (a processor's per-target
        totals, say); ``body`` holds its own fields. ValueError for an unregistered type, so
        nothing the schema does not describe is ever made."""
        try:
            record_type(kind)
        except KeyError:
            raise ValueError(f"record type {kind!r} is not registered (memagent.record_types)") from None
        return self._finish(kind, target, pid, body, ts)

    def _finish(self, kind: str, target: str | None, pid: int | None,
                body: dict[str, Any], ts: str) -> Draft:
        fields: dict[str, Any] = {"schema": SCHEMA_VERSION, "type": kind, "seq": 0,
                                  "run": self.run, "ts": ts, "host": self.host}
        fields.update(body)
        if self.tags:
            fields["tags"] = self.tags
        return Draft(kind, target, pid, fields)

    def _started(self, started: float) -> str:
        # formatting a time costs more than the rest of a record: once per process, not per sample
        text = self._started_text.get(started)
        if text is None:
            if len(self._started_text) > 100_000:  # bounded: forget everything, rebuild lazily
                self._started_text.clear()
            text = self._started_text[started] = iso_utc(started, 2)
        return text

    def _process(self, target: str, info: ProcessInfo) -> dict[str, Any]:
        return {"target": target, "pid": info.pid, "ppid": info.ppid, "name": info.name,
                "started": self._started(info.started), "os": self.os, "backend": self.backend}

    def sample(self, target: str, info: ProcessInfo, reading: Reading, ts: str) -> Draft:
        """A ``sample`` record; ``ts`` is the tick's time from :func:`iso_utc`. The hot path:
        one per process per tick. The record is encoded when the process's ``reading`` is not
        the one it had last time (a backend hands back the same Reading while the numbers do
        not change); until then its bytes are kept and reused (see :class:`Draft`)."""
        key = (target, info.pid)
        source = self._samples.get(key)
        if source is None or source.reading is not reading or source.info is not info:
            source = self._source(target, info, reading)
            if len(self._samples) >= MAX_KEPT_SAMPLES and key not in self._samples:
                self._samples.clear()  # bounded: forget every kept encoding, make them anew
            self._samples[key] = source
        return Draft("sample", target, info.pid, None, info.memory_cgroup, ts, source)

    def _sample_fields(self, target: str, info: ProcessInfo, reading: Reading) -> dict[str, Any]:
        started = self._started_text.get(info.started) or self._started(info.started)
        fields: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "type": "sample", "seq": 0, "run": self.run, "ts": "",
            "host": self.host, "target": target, "pid": info.pid, "ppid": info.ppid, "name": info.name,
            "started": started, "os": self.os, "backend": self.backend,
            "portable": reading.portable, "platform": reading.platform}
        if reading.full is not None:
            fields["full"] = reading.full
        if reading.extra is not None:
            fields["extra"] = reading.extra
        if self.tags:
            fields["tags"] = self.tags
        return fields

    def _source(self, target: str, info: ProcessInfo, reading: Reading) -> SampleSource:
        """The kept form of a sample record; its ``body`` None if the encoding does not begin as
        every sample's does (it always does for the fields this maker writes: checked, not assumed)."""
        template = self._sample_fields(target, info, reading)
        data = orjson.dumps(template)
        opening = self._sample_opening
        if not data.startswith(opening) or data[len(opening):len(opening) + 1] != b",":
            return SampleSource(info, reading, template, None)
        return SampleSource(info, reading, template, data[len(opening) + 1:])

    def forget(self, target: str, pid: int) -> None:
        """Drop what is kept for a process that ``target`` no longer watches."""
        self._samples.pop((target, pid), None)

    def start(self, target: str, info: ProcessInfo, ts: str) -> Draft:
        """A process matched ``target`` for the first time; carries what identifies it. The
        command line is at most :data:`~memagent.contracts.CMDLINE_MAX_BYTES`; a cut one is
        marked ``"cmdline_truncated": true``."""
        body = self._process(target, info)
        body["cmdline"] = list(info.cmdline)
        if info.cmdline_truncated:
            body["cmdline_truncated"] = True
        if info.exe is not None:
            body["exe"] = info.exe
        if info.user is not None:
            body["user"] = info.user
        if info.cgroup is not None:
            body["cgroup"] = info.cgroup
        if info.container is not None:
            body["container"] = info.container.fields()
        return self._finish("start", target, info.pid, body, ts)

    def exit(self, target: str, info: ProcessInfo, ts: str, reason: str | None = None) -> Draft:
        """The process is gone (exited, or its pid now names another process); with
        ``reason="unwatched"``, it lives on but the target no longer watches it; with
        ``"oom_kill"``, the kernel's OOM killer ended it."""
        self.forget(target, info.pid)
        body = self._process(target, info)
        if reason is not None:
            body["reason"] = reason
        return self._finish("exit", target, info.pid, body, ts)

    def cgroup(self, targets: list[str], cgroup: MemoryCgroup, processes: int, stats: CgroupStats,
               container: Container | None, ts: str) -> Draft:
        """One cgroup's memory at one tick (``stats`` from the backend), made once however many
        watched processes of ``targets`` (sorted) it holds. Routed as a record of its target
        when it has one, else (several targets) to every sink."""
        body: dict[str, Any] = {"os": self.os, "backend": self.backend, "targets": targets,
                                "cgroup": cgroup.path, "processes": processes}
        if container is not None:
            body["container"] = container.fields()
        body.update(stats)
        draft = self._finish("cgroup", targets[0] if len(targets) == 1 else None, None, body, ts)
        draft.memory_cgroup = cgroup
        return draft

    def error(self, target: str, info: ProcessInfo, kind: str, message: str, ts: str) -> Draft:
        """A process could not be read; made once per (process, kind), never per tick."""
        body = self._process(target, info)
        body["error"] = {"kind": kind, "message": message}
        return self._finish("error", target, info.pid, body, ts)

    def agent(self, stats: dict[str, Any], ts: str) -> Draft:
        """The agent's own counters (``stats`` goes under the ``agent`` key)."""
        body = {"pid": self._pid, "os": self.os, "backend": self.backend, "agent": stats}
        return self._finish("agent", None, self._pid, body, ts)

"""The public contracts between memagent and its plugins: backends and sinks.

Plugins import from here (and from :mod:`memagent.errors`, :mod:`memagent.options`), nothing
else. The framework owns the hard parts: a sink only writes a batch; queues, drop policy,
counters, batching and retries belong to :mod:`memagent.fanout`. A backend only lists and reads
processes; matching, scheduling and records belong to the framework.

Backend
    Registered in the entry-point group ``memagent.backends``. A class with the class attributes
    ``name``, ``os`` and ``platform_fields``, a classmethod ``available()``, a classmethod
    ``from_options(options)`` and the methods below. ``list_processes`` may be called from a
    worker thread; ``sample`` is called on the event loop with small batches (at most
    :data:`SAMPLE_CHUNK` processes), so it must be fast and must not block on anything but
    procfs-like reads. Neither is ever called concurrently with itself, but ``list_processes``
    (in its thread) may run while ``sample`` runs on the loop: keep their state apart.

Sink
    Registered in the entry-point group ``memagent.sinks``. A class with the class attributes
    ``name`` and ``sample_config`` (commented TOML), a classmethod ``from_options(options,
    context)`` that validates its own keys (unknown keys are errors: call ``options.finish()``),
    and the coroutines ``start()``, ``write(batch)``, ``close()``. ``write`` is never called
    concurrently with itself; ``close`` is called once, after the last ``write`` has finished.
    A sink raises :class:`~memagent.errors.SinkError` when a batch could not be written; it is
    retried with backoff. It raises :class:`~memagent.errors.SinkClosed` when it never can again
    (its reader left): no retry, its records are counted as dropped; and
    :class:`~memagent.errors.SinkRejected` when this batch never can (dropped and counted, the
    next one is written). A sink that is also :class:`Reopenable` has ``reopen()`` called between
    writes on SIGHUP (logrotate's signal). It may keep counters in ``context.counters``, which
    the agent reports under the sink's name in ``agent`` records.

Optional capabilities are Protocols too, checked with ``isinstance``: :class:`Reopenable` for a
sink; :class:`Counting`, :class:`Openable`, :class:`CgroupReading`, :class:`Describing` and
:class:`ExitExplaining` for a backend. What :func:`memagent.registry.load` requires of a plugin
class is derived from :class:`Backend` and :class:`Sink` (:func:`protocol_members`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from memagent.options import Options

#: Largest number of processes handed to one ``Backend.sample`` call; the scheduler yields to
#: the event loop between chunks so that sampling 1,000 processes never blocks it for long.
SAMPLE_CHUNK = 128

#: The most of a command line a backend keeps (bytes of its arguments joined by NULs, as in
#: ``/proc/<pid>/cmdline``): what the ``cmdline`` selector sees and ``start`` records carry. A
#: longer one is cut there and marked ``cmdline_truncated``, so one process with a megabyte of
#: arguments cannot make the agent hold megabytes.
CMDLINE_MAX_BYTES = 32 * 1024

Identity = tuple[int, float]
"""A process's identity: (pid, start time as seconds since the epoch). A reused pid is a new
process because its start time differs."""


class MemoryCgroup(NamedTuple):
    """The cgroup that accounts a process's memory: the cgroup ``version`` (1: the v1 ``memory``
    controller's hierarchy, 2: the unified one) and the ``path`` as ``/proc/<pid>/cgroup`` shows
    it. Hashable: the key under which a backend reads a cgroup once per tick however many
    processes it holds."""

    version: int
    path: str


@dataclass(frozen=True, slots=True)
class Container:
    """What a cgroup path says about the container a process runs in: the ``runtime``
    (``docker``, ``containerd``, ``cri-o``, ``podman``; None when the path names none, as a
    Kubernetes cgroupfs-driver path does), the container ``id`` (64 hex digits), and for a
    Kubernetes pod its ``pod_uid`` and ``qos`` class (``guaranteed``, ``burstable``,
    ``besteffort``). At least one of ``id`` and ``pod_uid`` is set."""

    runtime: str | None = None
    id: str | None = None
    pod_uid: str | None = None
    qos: str | None = None

    def fields(self) -> dict[str, str]:
        """The set fields, as a record carries them (``{"runtime": "docker", "id": ...}``)."""
        return {name: value for name, value in (("runtime", self.runtime), ("id", self.id),
                                                ("pod_uid", self.pod_uid), ("qos", self.qos))
                if value is not None}


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What a backend knows about one process when listing. Fields a backend cannot know are
    None (``cgroup`` off Linux, ``exe`` when access is denied). ``cmdline`` holds at most
    :data:`CMDLINE_MAX_BYTES` (see :func:`cap_cmdline`); ``cmdline_truncated`` says it was cut.
    ``cgroup`` is the path the ``cgroup`` selector matches; ``memory_cgroup`` the cgroup whose
    memory numbers a :class:`CgroupReading` backend reads for it (None: the root cgroup, none
    known, or the backend reads no cgroups); ``container`` what its cgroup paths say about its
    container (None: not in one, as far as they tell). ``described`` False: a :class:`Describing`
    backend's cheap listing, of which only ``pid``, ``ppid``, ``name`` (the kernel's comm, which
    is cut at 15 characters) and ``started`` are known yet."""

    pid: int
    ppid: int
    name: str
    started: float
    cmdline: tuple[str, ...] = ()
    exe: str | None = None
    user: str | None = None
    cgroup: str | None = None
    cmdline_truncated: bool = False
    memory_cgroup: MemoryCgroup | None = None
    container: Container | None = None
    described: bool = True

    @property
    def identity(self) -> Identity:
        return (self.pid, self.started)


def cap_cmdline(args: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """``args`` cut so that, joined by NULs (UTF-8), they take at most :data:`CMDLINE_MAX_BYTES`,
    as the Linux backend's bounded read of ``/proc/<pid>/cmdline`` does; and whether anything
    was cut. The last argument kept may be cut part-way."""
    kept: list[str] = []
    room = CMDLINE_MAX_BYTES + 1  # every argument counts one separator; the last needs none
    for arg in args:
        size = len(arg.encode("utf-8", "surrogateescape")) + 1
        if size > room:
            if room > 1:
                kept.append(arg.encode("utf-8", "surrogateescape")[:room - 1].decode("utf-8", "ignore"))
            return tuple(kept), True
        kept.append(arg)
        room -= size
    return tuple(kept), False


@runtime_checkable
class Openable(Protocol):
    """Optional for a backend: what it checks of the machine (a procfs root, say), kept out of
    ``from_options`` so ``memagent check`` can validate a config for another machine (a
    container's ``/host/proc``) and only warn. ``memagent run`` calls it before sampling; it
    raises ConfigError (exit 2) when the machine does not fit."""

    def open(self) -> None:
        ...


@runtime_checkable
class Counting(Protocol):
    """Optional for a backend: counters of its own (``malformed`` procfs files, say), published
    under ``backend`` in ``agent`` records. Read on the event loop; keep them plain ints."""

    counters: dict[str, int]


class Reading(NamedTuple):
    """One memory sample of one process. All values are ints: bytes, except the counts named in
    the schema (``pfaults``, ``pageins``, ``num_page_faults``). A field the backend cannot provide
    is absent, never faked. ``full`` is None unless full info was asked for and could be read;
    when it was asked for but could not be read, ``problems`` says why as (kind, message) pairs,
    which the framework reports once per process and kind, like a :class:`Failure`.

    ``extra`` holds the fields beyond the seed's (``portable``/``platform`` stay exactly those):
    on Linux ``rss_anon``, ``rss_file``, ``rss_shmem``, ``peak_rss`` (bytes) and ``rss_share``
    (rss over the machine's total memory, a float in [0, 1]); None when the backend has none.

    A backend may return the same Reading (and its dicts) again on a later tick when nothing
    changed (the Linux backend does, for an unchanged statm): consumers treat it, and the dicts
    that records embed, as read-only."""

    pid: int
    started: float
    portable: dict[str, int]
    platform: dict[str, int]
    full: dict[str, int] | None = None
    problems: tuple[tuple[str, str], ...] = ()
    extra: dict[str, int | float] | None = None


class Gone(NamedTuple):
    """The process exited (or its pid was reused) since it was listed."""

    pid: int
    started: float


class Failure(NamedTuple):
    """The process exists but could not be read. ``kind`` is a short stable word
    (``access_denied``, ``read_error``); the framework reports each (process, kind) once."""

    pid: int
    started: float
    kind: str
    message: str


SampleResult = Reading | Gone | Failure


@runtime_checkable
class Backend(Protocol):
    """Reads process memory on one OS. See the module docstring for the calling rules."""

    name: ClassVar[str]
    os: ClassVar[str]
    platform_fields: ClassVar[tuple[str, ...]]

    @classmethod
    def available(cls) -> bool:
        """Whether this backend can run on this machine (cheap; no side effects). May raise
        ImportError saying how to install what it lacks (``pip install psutil``)."""
        ...

    @classmethod
    def from_options(cls, options: Options) -> Backend:
        """Build from the ``[backends.<name>]`` table; call ``options.finish()``."""
        ...

    def list_processes(self) -> list[ProcessInfo]:
        """Every process visible now. Processes that vanish while listing are left out. May
        return the very list it returned last time when nothing changed (the framework then
        skips matching it again): nobody changes a returned list."""
        ...

    def sample(self, processes: Sequence[Identity], full: bool) -> list[SampleResult]:
        """One result per identity, in order. Never raises for one process's trouble."""
        ...

    def forget(self, identity: Identity) -> None:
        """The framework no longer samples this process: release what is held for it."""
        ...

    def close(self) -> None:
        """Release everything (fds, handles)."""
        ...


CgroupStats = dict[str, Any]
"""One cgroup's memory numbers at one tick, as a ``cgroup`` record carries them (``version``,
``current``, ``max``, ``effective_max``, ``high``, ``peak``, ``swap``, ``events``): see
``memagent schema``. Built anew on each read; read-only for consumers."""


@runtime_checkable
class CgroupReading(Protocol):
    """Optional for a backend: the memory numbers of cgroups. The scheduler calls it once per
    tick, before sampling, with the distinct :attr:`ProcessInfo.memory_cgroup` of the processes
    that tick samples (at most :data:`SAMPLE_CHUNK` per call), so a cgroup is read once however
    many processes share it. Called on the event loop: procfs-like reads only."""

    def read_cgroups(self, cgroups: Sequence[MemoryCgroup]) -> dict[MemoryCgroup, CgroupStats]:
        """The numbers of each cgroup that could be read (a vanished one is left out); never
        raises for one cgroup's trouble."""
        ...


#: The ``reason`` values of an ``exit`` record that an :class:`ExitExplaining` backend may give.
EXIT_REASONS = ("oom_kill",)


@runtime_checkable
class Describing(Protocol):
    """Optional for a backend: a listing that reads one bounded file per new process, its other
    details read only for the processes some target may watch. ``list_processes`` then returns
    ``described=False`` infos for processes not described yet; the framework calls ``describe``
    (in the listing's worker thread, right after ``list_processes``, never concurrently with it)
    for each it needs, and never makes a member of a process that is not described."""

    def describe(self, process: ProcessInfo) -> ProcessInfo | None:
        """``process`` with every field read (``described=True``), or None if it is gone. From
        then on the backend's listings return the described info."""
        ...


@runtime_checkable
class ExitExplaining(Protocol):
    """Optional for a backend: why a process ended. The framework asks once per gone process
    and target (the answer for one process must not change between asks), on the event loop."""

    def exit_reason(self, process: ProcessInfo) -> str | None:
        """One of :data:`EXIT_REASONS` when the backend knows why ``process`` (seen gone) ended
        (``oom_kill``: the kernel's OOM killer ended it), else None."""
        ...


def protocol_members(protocol: type) -> tuple[str, ...]:
    """The public attributes and methods a Protocol declares, sorted (what a plugin class must
    have to satisfy it)."""
    names = set(vars(protocol)) | set(getattr(protocol, "__annotations__", {}))
    return tuple(sorted(n for n in names if not n.startswith("_")))


class LazyFields(Protocol):
    """Where a :class:`Record` made without its ``fields`` dict gets it on first use."""

    def fields_at(self, seq: int) -> dict[str, Any]:
        """The record's fields, ``seq`` included: equal to ``orjson.loads`` of its ``json``."""
        ...


_MAKING_FIELDS = threading.Lock()


class Record:
    """One schema-v1 record, encoded once. ``json`` is the orjson encoding of ``fields``
    (no trailing newline), shared by every sink. Treat ``fields`` as read-only.

    ``fields`` may be made on first use (a record sealed from bytes kept since the last tick has
    none until a sink asks: see :meth:`memagent.records.RecordMaker.sample`); it is the same
    mapping on every later use, and always equal to the decoded ``json``."""

    __slots__ = ("seq", "type", "target", "pid", "json", "_fields", "_lazy")

    def __init__(self, seq: int, type: str, target: str | None, pid: int | None,  # noqa: A002
                 fields: Mapping[str, Any] | None, json: bytes, lazy: LazyFields | None = None) -> None:
        if fields is None and lazy is None:
            raise ValueError("a record needs its fields or a way to make them")
        self.seq = seq
        self.type = type
        self.target = target
        self.pid = pid
        self.json = json
        self._fields = fields
        self._lazy = lazy

    @property
    def fields(self) -> Mapping[str, Any]:
        fields = self._fields
        if fields is None:  # made once, also when sinks on the loop and in threads ask at once
            with _MAKING_FIELDS:
                fields = self._fields
                if fields is None:
                    assert self._lazy is not None  # one of them is set (__init__)
                    fields = self._fields = self._lazy.fields_at(self.seq)
                    self._lazy = None
        return fields

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return (self.seq, self.type, self.target, self.pid, self.json) == \
            (other.seq, other.type, other.target, other.pid, other.json)

    def __hash__(self) -> int:
        return hash((self.seq, self.json))

    def __repr__(self) -> str:
        return (f"Record(seq={self.seq}, type={self.type!r}, target={self.target!r}, pid={self.pid}, "
                f"json={self.json!r})")


@dataclass(frozen=True)
class SinkContext:
    """What the agent tells a sink when building it.

    ``log`` is the sink's logger (``memagent.sink.<name>``), handed by the framework: the one way
    a sink logs. ``log.warning`` for what a person must see (not rate-limited: once per
    episode), ``log.info`` for recoveries, ``log.debug`` for detail. ``counters`` is where a sink may keep
    extra counters that the agent publishes under its name in ``agent`` records.
    """

    name: str
    hostname: str
    run: str
    log: logging.Logger
    counters: dict[str, int] = field(default_factory=dict)


def ndjson(batch: Sequence[Record]) -> bytes:
    """A batch as NDJSON: each record's shared bytes, one per line, newline-terminated."""
    return b"\n".join(record.json for record in batch) + b"\n"


def declare_counters(counters: dict[str, int], *names: str) -> None:
    """Start ``names`` at 0 in ``counters`` (a sink's ``context.counters``) unless already there,
    so ``agent`` records show them before the first event."""
    for name in names:
        counters.setdefault(name, 0)


@runtime_checkable
class Sink(Protocol):
    """Delivers batches of records somewhere. See the module docstring for the calling rules."""

    name: ClassVar[str]
    sample_config: ClassVar[str]

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> Sink:
        """Validate options (``options.finish()`` for unknown keys) and build; no I/O yet."""
        ...

    async def start(self) -> None:
        """Open files, bind sockets. Raising here stops the agent with a clear error."""
        ...

    async def write(self, batch: Sequence[Record]) -> None:
        """Deliver a batch, or raise SinkError to have the same batch retried later, or
        SinkClosed if this sink can never write again (no retry; the rest is counted dropped)."""
        ...

    async def close(self) -> None:
        """Flush and release; called once after the last write finished."""
        ...


@runtime_checkable
class Reopenable(Protocol):
    """Optional for a sink: reopen files (SIGHUP, after logrotate). Called between writes; may
    raise SinkError, and the next write tries again."""

    async def reopen(self) -> None:
        ...

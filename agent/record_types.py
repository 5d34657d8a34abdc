"""The record types, each declared once: its name, a summary, its fields and how it reads as text.

Everything that knows the record types reads them here, so nothing else lists them:

- :func:`record_schema` assembles the JSON Schema v1 from the registered types: the envelope
  every record shares, an ``enum`` of the type names, and one ``if type == <name> then
  <fragment>`` rule per type (plus the type's :class:`Case` rules, e.g. ``sample``'s platform
  fields per ``os``). ``memagent schema`` prints it; the tests validate every record with it.
- The WebSocket feed accepts ``type=<name>`` for exactly the registered names.
- :func:`text_line` is the stdout sink's ``format = "text"``: a common prefix (clock, and
  ``target pid name`` when the record is about a process), then the type's own :attr:`~RecordType.text`,
  and the whole line escaped once by :func:`printable`, so nothing a process controls can start a
  new line or move a terminal's cursor — whatever a type's ``text`` returns.

A type's :meth:`~RecordType.fragment` (the ``then`` of its rule) is built from its ``fields``: the
envelope (``schema``, ``type``, ``seq``, ``run``, ``ts``, ``host``, ``tags``) is added for it, and
nothing undeclared is allowed (``additionalProperties: false``). Types are additive to schema v1:
a consumer of v1 ignores a type it does not know, so a new type never changes the version.

Adding a record type (say ``totals``, made by a processor):

1. Register it once: below, next to the built-ins, for a type the agent itself makes (so
   ``memagent schema`` always lists it, whatever the config); in its own module for a third-party
   processor (registered when that module is imported)::

       TOTALS = register(RecordType(
           name="totals",
           summary="one target's memory summed over its processes, per tick",
           fields={**pick(PROCESS_FIELDS, "os", "backend", "target"),
                   "processes": COUNT, "rss": COUNT},
           required=("os", "backend", "target", "processes", "rss"),
           text=lambda r: f"{r['target']} totals processes={r['processes']} rss={human_bytes(r['rss'])}",
       ))

2. Make its records: a processor returns them as :class:`~memagent.records.Draft` objects, and
   the pipeline numbers and encodes them like any other record.

Nothing else changes: the schema, ``memagent schema``, the test suite's record validation, the
WebSocket ``type`` filter and the text format all follow the registration. Registering is done at
import time; the registry is not meant to change while records flow.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

Schema = dict[str, Any]
"""A JSON Schema (a fragment of one), as parsed JSON."""

TextBody = Callable[[Mapping[str, Any]], str]
"""How a record reads as text after the common prefix (see :func:`text_line`)."""

SCHEMA_ID: Final = "https://memagent.dev/schema/record-v1.json"
SCHEMA_VERSION: Final = 1

#: The fields every record has, in this order; :data:`ENVELOPE` gives their schemas.
ENVELOPE_REQUIRED: Final = ("schema", "type", "seq", "run", "ts", "host")

_TIMESTAMP = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$"

#: Schemas of the envelope (``type`` is filled in per record type).
ENVELOPE: Final[Mapping[str, Schema]] = {
    "schema": {"const": SCHEMA_VERSION, "description": "record schema version"},
    "seq": {"type": "integer", "minimum": 1,
            "description": "grows by one per record within a run: a gap means loss"},
    "run": {"type": "string", "pattern": "^[0-9a-f]{16}$", "description": "random id of one agent run"},
    "ts": {"type": "string", "pattern": _TIMESTAMP, "description": "UTC time the record was made"},
    "host": {"type": "string"},
    "tags": {"type": "object", "additionalProperties": {"type": "string"}},
}

#: The ``platform`` fields of each ``os`` (the seed's table; a backend may omit one it cannot
#: read, never add one). Also the ``os`` values a record may carry.
PLATFORM_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "linux": ("shared", "text", "lib", "data", "dirty"),
    "darwin": ("pfaults", "pageins"),
    "freebsd": ("text", "data", "stack"),
    "openbsd": ("text", "data", "stack"),
    "netbsd": ("text", "data", "stack"),
    "sunos": (),
    "aix": (),
    "windows": ("num_page_faults", "peak_wset", "wset", "peak_paged_pool", "paged_pool",
                "peak_nonpaged_pool", "nonpaged_pool", "pagefile", "peak_pagefile", "private"),
}

COUNT: Final[Schema] = {"type": "integer", "minimum": 0}
"""A non-negative integer: a size in bytes or a count."""

#: Schemas of the fields that say which process (and which agent) a record is about.
PROCESS_FIELDS: Final[Mapping[str, Schema]] = {
    "os": {"enum": sorted(PLATFORM_FIELDS)},
    "backend": {"type": "string", "minLength": 1},
    "target": {"type": "string", "minLength": 1},
    "pid": COUNT,
    "ppid": COUNT,
    "name": {"type": "string"},
    "started": {"type": "string", "pattern": _TIMESTAMP,
                "description": "process start time, UTC; (pid, started) is a process's identity"},
}


def pick(schemas: Mapping[str, Schema], *names: str) -> dict[str, Schema]:
    """Some of ``schemas``, in the order named: ``pick(PROCESS_FIELDS, "os", "target")``."""
    return {name: schemas[name] for name in names}


@dataclass(frozen=True)
class Case:
    """A further rule for records of one type whose fields have given values: ``when``
    maps field names to constants (``{"os": "linux"}``), ``then`` is the schema those records
    must also satisfy."""

    when: Mapping[str, Any]
    then: Schema


@dataclass(frozen=True)
class RecordType:
    """One record type. ``fields`` are the schemas of its top-level fields beyond the envelope,
    in the order they read best; ``required`` the ones every record of this type has; ``text``
    its part of a text line (default: just its name); ``cases`` further rules (:class:`Case`)."""

    name: str
    summary: str
    fields: Mapping[str, Schema]
    required: tuple[str, ...]
    text: TextBody | None = None
    cases: tuple[Case, ...] = ()

    def fragment(self) -> Schema:
        """The ``then`` part of this type's rule: the whole record, envelope included."""
        properties = {"schema": ENVELOPE["schema"], "type": {"const": self.name},
                      **{k: v for k, v in ENVELOPE.items() if k != "schema"}, **self.fields}
        return {"type": "object", "properties": properties, "additionalProperties": False,
                "required": [*ENVELOPE_REQUIRED, *self.required]}

    def body(self, fields: Mapping[str, Any]) -> str:
        """This record's text after the common prefix (unescaped: :func:`text_line` escapes)."""
        return self.text(fields) if self.text is not None else self.name


_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_registry: dict[str, RecordType] = {}


def register(record_type: RecordType) -> RecordType:
    """Add a record type; returns it. Raises ValueError for a name already registered or not
    like ``totals``, a field that shadows the envelope, or a required or case field not in
    ``fields``: mistakes show at import time, not when a record fails validation."""
    name = record_type.name
    if not _NAME.fullmatch(name):
        raise ValueError(f"record type {name!r}: a name is lowercase letters, digits and _ (at most 32)")
    if name in _registry:
        raise ValueError(f"record type {name!r} is already registered")
    if shadowed := sorted(set(record_type.fields) & {"type", *ENVELOPE}):
        raise ValueError(f"record type {name!r}: {shadowed[0]!r} is an envelope field")
    named = {*record_type.required, *(k for case in record_type.cases for k in case.when)}
    if undeclared := sorted(named - set(record_type.fields)):
        raise ValueError(f"record type {name!r}: {undeclared[0]!r} is not one of its fields")
    _registry[name] = record_type
    return record_type


def unregister(name: str) -> None:
    """Remove a record type (tests that register a throwaway one clean up with this)."""
    del _registry[name]


def record_types() -> tuple[RecordType, ...]:
    """Every registered type, in the order they were registered (the built-ins first)."""
    return tuple(_registry.values())


def record_type(name: str) -> RecordType:
    """The type called ``name``; KeyError if there is none."""
    try:
        return _registry[name]
    except KeyError:
        raise KeyError(f"unknown record type {name!r}") from None


def _rule(name: str, when: Mapping[str, Any], then: Schema) -> Schema:
    conditions = {"type": {"const": name}, **{k: {"const": v} for k, v in when.items()}}
    return {"if": {"properties": conditions, "required": list(conditions)}, "then": then}


def record_schema(types: Iterable[RecordType] | None = None) -> Schema:
    """The JSON Schema (draft 2020-12) of records made of ``types`` (default: every registered
    type). A new dict each call: the caller may change it."""
    chosen = record_types() if types is None else tuple(types)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"memagent record, schema v{SCHEMA_VERSION}",
        "description": "One JSON object per line. All sizes are bytes, as integers.",
        "type": "object",
        "required": list(ENVELOPE_REQUIRED),
        "properties": {"schema": {"const": SCHEMA_VERSION}, "type": {"enum": [t.name for t in chosen]}},
        "allOf": [_rule(t.name, {}, t.fragment()) for t in chosen]
        + [_rule(t.name, case.when, case.then) for t in chosen for case in t.cases],
    }
    copy: Schema = orjson.loads(orjson.dumps(schema))  # no part shared with the registry or itself
    return copy


# --- text ---------------------------------------------------------------------------------------

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: anything a terminal or
# a line-based reader could take as a new line, a cursor move or an escape sequence
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PROCESS_PREFIX = ("target", "pid", "name")


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
    """One readable line for a record, e.g. ``05:00:00.12 api 1234 gunicorn rss=14.8MiB
    vms=80.1MiB``: the clock, ``target pid name`` when the record has them, then its type's
    :meth:`~RecordType.body` (a type not registered here shows just its name). The whole line
    goes through :func:`printable` once, so it is always exactly one line."""
    kind = str(fields.get("type"))
    known = _registry.get(kind)
    parts = [str(fields.get("ts", ""))[11:22]]
    if all(key in fields for key in _PROCESS_PREFIX):
        parts.extend(str(fields[key]) for key in _PROCESS_PREFIX)
    parts.append(known.body(fields) if known is not None else kind)
    return printable(" ".join(parts))


# --- the built-in types -------------------------------------------------------------------------

_PROCESS_REQUIRED = tuple(PROCESS_FIELDS)


def _sample_text(record: Mapping[str, Any]) -> str:
    portable = record["portable"]
    sizes = {"rss": portable["rss"], "vms": portable["vms"], **record.get("full", {})}
    return " ".join(f"{key}={human_bytes(value)}" for key, value in sizes.items())


def closed_object(properties: Schema, *required: str, **extra: Any) -> Schema:
    """An object schema with exactly ``properties`` (nothing else allowed), ``required`` ones."""
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False, **extra}
    if required:
        schema["required"] = list(required)
    return schema


def _platform_names(fields: tuple[str, ...]) -> Schema:
    return {"propertyNames": {"enum": list(fields)} if fields else {"not": {}}}


#: What a cgroup path says about a process's container (``start`` and ``cgroup`` records).
CONTAINER: Final[Schema] = closed_object({
    "runtime": {"enum": ["docker", "containerd", "cri-o", "podman"],
                "description": "absent when the path does not name it (Kubernetes' cgroupfs driver)"},
    "id": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "pod_uid": {"type": "string", "description": "Kubernetes: the pod's uid"},
    "qos": {"enum": ["guaranteed", "burstable", "besteffort"],
            "description": "Kubernetes: the pod's QoS class"},
}, description="parsed from the cgroup path: the container (docker, containerd, cri-o, podman) "
               "and, for a Kubernetes pod, its uid and QoS class", minProperties=1)

_LIMIT: Final[Schema] = {"type": ["integer", "null"], "minimum": 0}


SAMPLE = register(RecordType(
    name="sample",
    summary="one process's memory at one tick",
    fields={
        **PROCESS_FIELDS,
        "portable": closed_object({
            "rss": {**COUNT, "description": "resident set size, bytes (Windows: wset)"},
            "vms": {**COUNT, "description": "virtual memory size, bytes (Windows: pagefile)"},
        }, "rss", "vms"),
        "platform": closed_object(
            {name: COUNT for name in sorted(set().union(*PLATFORM_FIELDS.values()))},
            description="exactly the psutil memory_info fields of this OS that the backend could "
                        "read; bytes except the counts pfaults, pageins, num_page_faults"),
        "full": closed_object({"uss": COUNT, "pss": COUNT, "swap": COUNT}),
        "extra": closed_object({
            "rss_anon": {**COUNT, "description": "anonymous resident memory, bytes (Linux RssAnon)"},
            "rss_file": {**COUNT, "description": "file-backed resident memory, bytes (Linux RssFile)"},
            "rss_shmem": {**COUNT, "description": "resident shared memory (shmem, tmpfs), bytes "
                                                  "(Linux RssShmem)"},
            "peak_rss": {**COUNT, "description": "the highest rss the process has had, bytes (Linux VmHWM)"},
            "rss_share": {"type": "number", "minimum": 0, "maximum": 1,
                          "description": "rss over the machine's total memory (Linux MemTotal)"},
        }, description="fields beyond portable/platform (Linux); rss_anon + rss_file + rss_shmem = rss"),
    },
    required=(*_PROCESS_REQUIRED, "portable", "platform"),
    text=_sample_text,
    cases=tuple(Case({"os": os}, {"properties": {"platform": _platform_names(fields)}})
                for os, fields in PLATFORM_FIELDS.items()),
))

START = register(RecordType(
    name="start",
    summary="a process matched a target for the first time; what identifies it",
    fields={
        **PROCESS_FIELDS,
        "cmdline": {"type": "array", "items": {"type": "string"},
                    "description": "the command line, at most 32 KiB (arguments' bytes plus one "
                                   "separator each)"},
        "cmdline_truncated": {"const": True, "description": "present when the command line was "
                                                            "longer than 32 KiB and was cut"},
        "exe": {"type": "string"},
        "user": {"type": "string"},
        "cgroup": {"type": "string", "description": "the cgroup path the cgroup selector matches (Linux)"},
        "container": CONTAINER,
    },
    required=(*_PROCESS_REQUIRED, "cmdline"),
    text=lambda record: f"start: {' '.join(record.get('cmdline', []))[:120]}",
))

EXIT = register(RecordType(
    name="exit",
    summary="a process is gone (exited, or its pid now names another process), or no longer "
            "watched by the target (reason unwatched)",
    fields={**PROCESS_FIELDS,
            "reason": {"enum": ["unwatched", "oom_kill"],
                       "description": "absent: the process is gone; unwatched: it lives on, but the "
                                      "target no longer matches it (its selectors, or a reload); "
                                      "oom_kill: the kernel's OOM killer ended it (Linux)"}},
    required=_PROCESS_REQUIRED,
    text=lambda record: f"exit ({record['reason']})" if "reason" in record else "exit",
))

ERROR = register(RecordType(
    name="error",
    summary="a process could not be read; once per process and kind, never per tick",
    fields={
        **PROCESS_FIELDS,
        "error": closed_object({"kind": {"type": "string", "minLength": 1}, "message": {"type": "string"}},
                               "kind", "message"),
    },
    required=(*_PROCESS_REQUIRED, "error"),
    text=lambda record: f"error {record['error']['kind']}: {record['error']['message']}",
))


def _counts(*names: str, **described: str) -> dict[str, Schema]:
    return {**{name: COUNT for name in names},
            **{name: {**COUNT, "description": text} for name, text in described.items()}}


def _agent_text(record: Mapping[str, Any]) -> str:
    stats = record["agent"]
    dropped = sum(s.get("dropped", 0) for s in stats.get("sinks", {}).values())
    return (f"agent processes={stats['processes']} records={stats['records']} "
            f"skipped_ticks={stats['ticks_skipped']} dropped={dropped}")


AGENT = register(RecordType(
    name="agent",
    summary="the agent's own counters, periodically",
    fields={
        **pick(PROCESS_FIELDS, "os", "backend", "pid"),
        "agent": {
            "type": "object",
            "required": ["uptime_s", "processes", "records", "ticks", "ticks_skipped", "sinks"],
            "properties": {
                "uptime_s": {"type": "number", "minimum": 0},
                **_counts("processes", "records", "ticks", "ticks_skipped", "rescans", "backend_failures"),
                "sinks": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["type", "queued", "written", "dropped", "failures"],
                        "properties": {
                            "type": {"type": "string"},
                            **_counts(
                                "queued", "written", "dropped", "failures", "retries",
                                rejected="records in batches the sink could never write (dropped, "
                                         "also counted in dropped)",
                                reopens="reopens asked by SIGHUP that succeeded"),
                        },
                        "additionalProperties": {"type": ["integer", "number", "string"]},
                    },
                },
                **_counts(rss="the agent's own resident set size now, bytes (where it can be read)",
                          max_rss="the agent's peak resident set size, bytes",
                          pidfile_problems="pidfile reads that were refused or failed",
                          targets_unmatched="targets that matched no process for a whole rescan "
                                            "period (warned once each)",
                          reloads="config reloads applied (SIGHUP)",
                          unsampled="processes matched but left out by top / min_rss at the last rescan",
                          full_skipped="full reads skipped by full_max_rss (each process noted once)",
                          failed_reloads="config reloads refused (the previous config kept running)",
                          processor_failures="pipeline processor calls that raised (counted, skipped)"),
                "backend": {"type": "object", "additionalProperties": COUNT,
                            "description": "the backend's own counters (linux: malformed procfs files)"},
            },
            "additionalProperties": True,
        },
    },
    required=("os", "backend", "pid", "agent"),
    text=_agent_text,
))


def _totals_text(record: Mapping[str, Any]) -> str:
    sizes = [f"{key}={human_bytes(record[key])}"
             for key in ("rss", "vms", "uss", "pss", "swap") if key in record]
    return f"{record['target']} totals processes={record['processes']} " + " ".join(sizes)


def _alert_text(record: Mapping[str, Any]) -> str:
    if "growth_per_hour" in record:
        measured = f"grows {human_bytes(record['growth_per_hour'])}/h"
    else:
        measured = f"rss={human_bytes(record['rss'])}"
    return f"alert {record['state']}: {record['rule']} ({measured})"


ALERT = register(RecordType(
    name="alert",
    summary="a target's alert rule started (firing) or stopped (resolved) holding for a process",
    fields={
        **PROCESS_FIELDS,
        "rule": {"type": "string", "description": "the rule as configured, e.g. 'rss > 2GB'"},
        "state": {"enum": ["firing", "resolved"]},
        **_counts(rss="the process's rss when the state changed, bytes",
                  threshold="rss_above and rss_above_limit rules: the size, bytes",
                  limit="rss_above_limit rules: the cgroup's effective limit, bytes"),
        "growth_per_hour": {"type": "integer", "description": "grows_above rules: the measured "
                                                              "slope (Theil-Sen), bytes per hour"},
        "window_s": {"type": "number", "description": "grows_above rules: the window, seconds"},
    },
    required=(*_PROCESS_REQUIRED, "rule", "state", "rss"),
    text=_alert_text,
))

TOTALS = register(RecordType(
    name="totals",
    summary="one target's memory summed over its processes, once per tick (targets with totals = true)",
    fields={
        **pick(PROCESS_FIELDS, "os", "backend", "target"),
        **_counts(processes="processes sampled in this tick (0: the target matches nothing now)",
                  rss="sum of portable.rss, bytes", vms="sum of portable.vms, bytes",
                  full_processes="how many of them had uss/pss/swap read (full = true)",
                  uss="sum of full.uss over full_processes, bytes",
                  pss="sum of full.pss over full_processes, bytes",
                  swap="sum of full.swap over full_processes, bytes"),
    },
    required=("os", "backend", "target", "processes", "rss", "vms"),
    text=_totals_text,
))


def _cgroup_text(record: Mapping[str, Any]) -> str:
    sizes = " ".join(f"{key}={human_bytes(record[key]) if record[key] is not None else 'max'}"
                     for key in ("current", "effective_max") if key in record)
    events = record.get("events", {})
    kills = f" oom_kill={events['oom_kill']}" if "oom_kill" in events else ""
    return f"cgroup {record['cgroup']} processes={record['processes']} {sizes}{kills}"


CGROUP = register(RecordType(
    name="cgroup",
    summary="one cgroup's memory at one tick, read once however many watched processes it holds (Linux)",
    fields={
        **pick(PROCESS_FIELDS, "os", "backend"),
        "targets": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                    "uniqueItems": True,
                    "description": "the targets whose processes in it this tick sampled"},
        "cgroup": {"type": "string", "description": "its path, as /proc/<pid>/cgroup shows it"},
        "version": {"enum": [1, 2], "description": "cgroup v1 (the memory controller) or v2"},
        "processes": {**COUNT, "description": "watched processes in it this tick"},
        "container": CONTAINER,
        "current": {**COUNT, "description": "memory charged now, bytes (v2 memory.current, "
                                            "v1 memory.usage_in_bytes)"},
        "max": {**_LIMIT, "description": "its limit, bytes; null: none (v2 memory.max, "
                                         "v1 memory.limit_in_bytes)"},
        "effective_max": {**_LIMIT, "description": "the lowest limit of it and its ancestors, bytes; "
                                                   "null: none is limited"},
        "high": {**_LIMIT, "description": "v2 memory.high (the throttling limit), bytes; null: none"},
        "peak": {**COUNT, "description": "the highest current so far, bytes (v2 memory.peak, "
                                         "v1 memory.max_usage_in_bytes)"},
        "swap": {**COUNT, "description": "v2 memory.swap.current, bytes"},
        "events": closed_object({
            "oom": {**COUNT, "description": "v2: times it went out of memory"},
            "oom_kill": {**COUNT, "description": "processes the OOM killer killed in it (v2 memory.events, "
                                                 "v1 memory.oom_control)"},
            "high": {**COUNT, "description": "v2: times it was throttled over memory.high"},
            "max": {**COUNT, "description": "times a charge hit the limit (v2 memory.events, "
                                            "v1 memory.failcnt)"},
        }, description="counters since the cgroup was made"),
    },
    required=("os", "backend", "targets", "cgroup", "version", "processes"),
    text=_cgroup_text,
))

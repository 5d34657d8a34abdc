"""Per-client subscriptions of the WebSocket feed: which records, which fields, from where.

A subscription comes from the query string (``?host=web-1&target=api&type=sample&fields=portable``)
or from a JSON message (``{"host": ["web-1"], "target": ["api"], "pid": [42], "type": ["sample"],
"fields": ["portable"]}``). ``host`` keeps the records of those hosts: a relay's feed (``memagent
relay``) carries many, an agent's one. ``pid`` is a pid on any host: pair it with ``host`` on a
relay's feed.
Lists in the query string are comma-separated. Anything malformed raises :class:`BadFilter`, whose
message is fit to send as a close reason (<= 123 bytes).

``since`` is where a reconnecting client resumes (a :class:`Cursor`): ``<run>:<seq>`` (the feed's
run and the last seq the client got in it) or a bare ``<seq>``, read as a seq of the feed's current
run (the form before runs were named; it cannot tell a restarted agent). ``cursor`` (``1``/``true``)
asks for ``cursor`` messages, which say that position whenever the client has caught up.

Projection keeps the named top-level fields plus ``seq`` and ``type``, so a client can always
detect loss and tell records apart. Projected bytes are shared through a :data:`Projections`
cache: clients with the same ``fields`` get the same bytes object for a record, not a copy each.

``type`` accepts the names in :mod:`memagent.record_types` (asked when a client subscribes, so a
type registered later is accepted too).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import orjson

from memagent.contracts import Record
from memagent.record_types import record_types

#: Every filter a client may give, in the order the unknown-filter reason names them (``token`` is
#: the listener's, accepted beside them).
FILTER_KEYS = ("host", "target", "pid", "type", "fields", "since", "cursor")
ALWAYS_KEPT = ("seq", "type")
RUN_NAME = re.compile(r"[0-9A-Za-z_-]{1,64}")  # a run id is 16 hex digits; bounded, printable
SINCE_FORMS = "since: expected <run>:<seq> or <seq>, seq >= 0"

Projections = dict[tuple[int, tuple[str, ...]], bytes]
"""Projected records by (``id(record)``, fields): valid while the records it was filled from are
alive, so keep one for one batch (one ``write``) and then let it go."""


class BadFilter(ValueError):
    """A subscription that cannot be honoured; the message is the close reason."""


class Cursor(NamedTuple):
    """A position in a feed: just after record ``seq`` of run ``run`` (None: the feed's current
    run, whatever it is)."""

    run: str | None
    seq: int


@dataclass(frozen=True)
class Subscription:
    """What one client wants. None means "no restriction"."""

    hosts: frozenset[str] | None = None
    targets: frozenset[str] | None = None
    pids: frozenset[int] | None = None
    types: frozenset[str] | None = None
    fields: tuple[str, ...] | None = None
    since: Cursor | None = None
    cursor: bool = False

    def wants(self, record: Record) -> bool:
        if self.types is not None and record.type not in self.types:
            return False
        if self.targets is not None and record.target not in self.targets:
            return False
        if self.hosts is not None and record.fields.get("host") not in self.hosts:
            return False
        return self.pids is None or record.pid in self.pids

    def encode(self, record: Record, projections: Projections | None = None) -> bytes:
        """The record as JSON for this client: the shared bytes unless a projection applies; a
        projection made once per ``projections`` cache and then shared."""
        if self.fields is None:
            return record.json
        key = (id(record), self.fields)
        if projections is not None and (cached := projections.get(key)) is not None:
            return cached
        fields = record.fields
        projected = orjson.dumps({k: fields[k] for k in (*ALWAYS_KEPT, *self.fields) if k in fields})
        if projections is not None:
            projections[key] = projected
        return projected


def _strings(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadFilter(f"{key}: expected a list of names")
    return value


def _ints(key: str, value: Any) -> list[int]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadFilter(f"{key}: expected a list of integers")
    try:
        return [int(v) for v in items if not isinstance(v, bool)]
    except (TypeError, ValueError):
        raise BadFilter(f"{key}: expected a list of integers") from None


def subscription(raw: Mapping[str, Any]) -> Subscription:
    """Validate a filter mapping (from a query string or a JSON message)."""
    unknown = sorted(set(raw) - set(FILTER_KEYS) - {"token"})
    if unknown:
        raise BadFilter(f"unknown filter {unknown[0]!r}; use {', '.join(FILTER_KEYS)}")
    types = _strings("type", raw["type"]) if "type" in raw else None
    if types is not None and (unregistered := set(types) - {t.name for t in record_types()}):
        raise BadFilter(f"type: unknown record type {sorted(unregistered)[0]!r}")
    return Subscription(
        hosts=frozenset(_strings("host", raw["host"])) if "host" in raw else None,
        targets=frozenset(_strings("target", raw["target"])) if "target" in raw else None,
        pids=frozenset(_ints("pid", raw["pid"])) if "pid" in raw else None,
        types=frozenset(types) if types is not None else None,
        fields=tuple(_strings("fields", raw["fields"])) if "fields" in raw else None,
        since=_cursor(raw["since"]) if "since" in raw else None,
        cursor=_flag("cursor", raw["cursor"]) if "cursor" in raw else False,
    )


def _flag(key: str, value: Any) -> bool:
    """true/false in a JSON message; 1/0/true/false in the query string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "0", "false"):
        return value.lower() in ("1", "true")
    raise BadFilter(f"{key}: expected true or false")


def _cursor(value: Any) -> Cursor:
    """``<run>:<seq>`` or ``<seq>`` (a string, or an int in a JSON message)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadFilter(SINCE_FORMS)
    run, colon, seq = value.rpartition(":")
    if colon and not RUN_NAME.fullmatch(run):
        raise BadFilter(SINCE_FORMS)
    if not (seq.isascii() and seq.isdigit() and len(seq) <= 19):  # 19 digits: any int64
        raise BadFilter(SINCE_FORMS)
    return Cursor(run or None, int(seq))


def from_query(query: str) -> Subscription:
    """A subscription from a URL query string (repeated keys are joined with commas)."""
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=32)
    except ValueError as exc:
        raise BadFilter(f"bad query string: {exc}") from None
    return subscription({k: ",".join(v) for k, v in parsed.items()})


def from_message(message: str | bytes) -> Subscription:
    """A subscription from a client's JSON message."""
    try:
        raw = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise BadFilter("messages must be JSON filter objects") from None
    if not isinstance(raw, dict):
        raise BadFilter("messages must be JSON filter objects")
    return subscription(raw)


def joined(parts: Iterable[bytes]) -> bytes:
    """A JSON array of already-encoded records (``batch = true``)."""
    return b"[" + b",".join(parts) + b"]"

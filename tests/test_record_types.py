"""The record-type registry: one registration reaches the schema, the feed's filter and the text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from memagent.plugins.backends import linux, psutil
from memagent.plugins.sinks.websocket_filters import BadFilter, from_query, subscription
from memagent.record_types import (
    COUNT,
    ENVELOPE,
    PLATFORM_FIELDS,
    PROCESS_FIELDS,
    Case,
    RecordType,
    human_bytes,
    pick,
    record_schema,
    record_type,
    record_types,
    register,
    text_line,
    unregister,
)

V1_TYPES = ("sample", "start", "exit", "error", "agent")
PUBLISHED_V1 = Path(__file__).parent / "data" / "record-v1.json"
TOTALS = "test_totals"  # not "totals": a real built-in of that name may come


@contextmanager
def registered(declared: RecordType) -> Iterator[RecordType]:
    """``declared`` registered for the duration of the block."""
    register(declared)
    try:
        yield declared
    finally:
        unregister(declared.name)


@pytest.fixture
def totals() -> Iterator[RecordType]:
    """A throwaway type registered the way the module docstring says a processor would; gone
    after the test."""
    with registered(RecordType(
        name=TOTALS,
        summary="one target's memory summed over its processes, per tick",
        fields={**pick(PROCESS_FIELDS, "os", "backend", "target"), "processes": COUNT, "rss": COUNT},
        required=("os", "backend", "target", "processes", "rss"),
        text=lambda r: f"{r['target']} totals processes={r['processes']} rss={human_bytes(r['rss'])}",
    )) as declared:
        yield declared


def totals_record(**changes: Any) -> dict[str, Any]:
    record = {"schema": 1, "type": TOTALS, "seq": 7, "run": "0123456789abcdef",
              "ts": "2026-11-25T05:00:00.123456Z", "host": "web-1", "os": "linux", "backend": "linux",
              "target": "api", "processes": 3, "rss": 15491072}
    record.update(changes)
    return record


def test_schema_v1_is_the_published_one() -> None:
    """Assembled from the five v1 types, the schema equals tests/data/record-v1.json rule for
    rule: any change to them shows here. Changes must be additive (a new optional field, as
    ``targets_unmatched`` in agent records); then regenerate the file in the same commit."""
    published = json.loads(PUBLISHED_V1.read_text(encoding="utf-8"))
    assert record_schema(record_type(name) for name in V1_TYPES) == published


def test_builtin_types_come_first_in_v1_order() -> None:
    """record_types() lists the built-ins in the order the schema's enum has always had."""
    assert tuple(t.name for t in record_types())[:len(V1_TYPES)] == V1_TYPES
    assert all(t.summary and "\n" not in t.summary for t in record_types())


def test_assembled_schema_is_valid_draft_2020_12() -> None:
    """The assembled schema is itself a valid JSON Schema."""
    jsonschema.Draft202012Validator.check_schema(record_schema())


def test_record_schema_returns_a_fresh_copy() -> None:
    """Changing a returned schema changes neither its other parts, nor the registry, nor the
    next one (pid and ppid are declared with one shared dict)."""
    schema = record_schema()
    schema["allOf"][0]["then"]["properties"]["pid"]["minimum"] = 99
    schema["properties"]["type"]["enum"].clear()
    assert schema["allOf"][0]["then"]["properties"]["ppid"] == {"type": "integer", "minimum": 0}
    again = record_schema()
    assert again["allOf"][0]["then"]["properties"]["pid"] == {"type": "integer", "minimum": 0}
    assert again["properties"]["type"]["enum"][:len(V1_TYPES)] == list(V1_TYPES)


def test_platform_table_is_the_backends_table() -> None:
    """The schema's platform fields per os are exactly what the backends report."""
    assert PLATFORM_FIELDS == psutil.PLATFORM_FIELDS
    assert PLATFORM_FIELDS["linux"] == linux.LinuxBackend.platform_fields


def test_one_registration_reaches_schema_filter_and_text(totals: RecordType) -> None:
    """A type registered once is in the schema (enum and its own rule), is accepted by the
    WebSocket type filter and reads as text: nothing else had to change."""
    schema = record_schema()
    assert schema["properties"]["type"]["enum"][-1] == TOTALS
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(totals_record())
    assert not validator.is_valid(totals_record(extra=1))
    assert not validator.is_valid(totals_record(rss=-1))
    assert not validator.is_valid({k: v for k, v in totals_record().items() if k != "processes"})

    assert from_query(f"type={TOTALS},sample").types == frozenset({TOTALS, "sample"})
    assert subscription({"type": [TOTALS]}).types == frozenset({TOTALS})

    assert text_line(totals_record()) == "05:00:00.12 api totals processes=3 rss=14.8MiB"
    assert text_line(totals_record(target="a\npi\x1b[2J")) == \
        "05:00:00.12 a\\npi\\x1b[2J totals processes=3 rss=14.8MiB"


def test_an_unregistered_type_is_refused() -> None:
    """Without the registration the same type is not in the schema, the filter refuses it, and
    the text format shows just its name."""
    assert TOTALS not in record_schema()["properties"]["type"]["enum"]
    assert not jsonschema.Draft202012Validator(record_schema()).is_valid(totals_record())
    with pytest.raises(BadFilter, match=f"type: unknown record type '{TOTALS}'"):
        from_query(f"type=sample,{TOTALS}")
    with pytest.raises(KeyError, match="unknown record type"):
        record_type(TOTALS)
    assert text_line(totals_record()) == f"05:00:00.12 {TOTALS}"


def test_a_case_applies_only_to_its_type_and_values() -> None:
    """A Case adds a rule for the records of its type whose fields have the given values only."""
    declared = RecordType(name=TOTALS, summary="s", fields={**pick(PROCESS_FIELDS, "os"), "rss": COUNT},
                          required=("os",), cases=(Case({"os": "windows"}, {"required": ["rss"]}),))
    with registered(declared):
        validator = jsonschema.Draft202012Validator(record_schema())
    base = {k: v for k, v in totals_record().items() if k in {*ENVELOPE, "type", "os"}}
    assert validator.is_valid(base)
    assert not validator.is_valid({**base, "os": "windows"})
    assert validator.is_valid({**base, "os": "windows", "rss": 1})


@pytest.mark.parametrize(("record_type_", "problem"), [
    (RecordType(name="sample", summary="s", fields={}, required=()), "'sample' is already registered"),
    (RecordType(name="Totals", summary="s", fields={}, required=()), "lowercase letters"),
    (RecordType(name="t", summary="s", fields={"seq": COUNT}, required=()), "'seq' is an envelope field"),
    (RecordType(name="t", summary="s", fields={"type": COUNT}, required=()), "'type' is an envelope field"),
    (RecordType(name="t", summary="s", fields={}, required=("rss",)), "'rss' is not one of its fields"),
    (RecordType(name="t", summary="s", fields={}, required=(), cases=(Case({"os": "linux"}, {}),)),
     "'os' is not one of its fields"),
])
def test_register_refuses_mistakes(record_type_: RecordType, problem: str) -> None:
    """Mistakes in a declaration are a ValueError at registration, and nothing is registered."""
    before = record_types()
    with pytest.raises(ValueError, match=problem):
        register(record_type_)
    assert record_types() == before

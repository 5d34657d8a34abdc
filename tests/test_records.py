"""Records: command lines are bounded in bytes; agent records carry the agent's own memory; a
sample sealed from bytes kept since the last tick is exactly what encoding it gives."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from memagent.contracts import CMDLINE_MAX_BYTES, ProcessInfo, Reading, cap_cmdline
from memagent.records import RecordMaker, iso_utc

from cli_helpers import READY_THEN_WAIT, parse_records, run_cli, spawn_ready, stop_child


def test_cap_cmdline_keeps_short_ones_whole() -> None:
    """A command line within the limit is kept as is and not marked."""
    assert cap_cmdline(["python3", "-m", "http.server"]) == (("python3", "-m", "http.server"), False)


def test_cap_cmdline_cuts_at_the_byte_limit() -> None:
    """Joined by NULs they never pass CMDLINE_MAX_BYTES; the cut argument is kept in part,
    multi-byte characters are never split."""
    args = ["prog"] + ["€" * 1000] * 100  # 3,000 bytes each
    kept, truncated = cap_cmdline(args)
    assert truncated
    assert len("\0".join(kept).encode()) <= CMDLINE_MAX_BYTES
    assert kept[:-1] == tuple(args[:len(kept) - 1])
    assert set(kept[-1]) == {"€"}


def test_start_record_of_a_huge_command_line_is_capped_and_marked(
        write_config: Callable[[str], Path], validate_record: Callable[[dict[str, Any]], None]) -> None:
    """A real child with 1 MiB of arguments: its start record holds the first 32 KiB of them,
    exactly as /proc shows them, and says so with cmdline_truncated."""
    huge = ["a" * 4096] * 256
    child = spawn_ready(READY_THEN_WAIT, *huge)
    try:
        with open(f"/proc/{child.pid}/cmdline", "rb") as handle:
            actual = handle.read().split(b"\0")
        config = write_config(f'[[targets]]\nname = "huge"\npid = {child.pid}\n')
        result = run_cli("run", str(config), "--once")
    finally:
        stop_child(child)
    assert result.returncode == 0, result.stderr
    [start] = [r for r in parse_records(result.stdout) if r["type"] == "start"]
    validate_record(start)
    assert start["cmdline_truncated"] is True
    kept = [a.encode() for a in start["cmdline"]]
    assert len(b"\0".join(kept)) <= CMDLINE_MAX_BYTES
    assert kept[:-1] == actual[:len(kept) - 1]
    assert actual[len(kept) - 1].startswith(kept[-1])
    assert len(result.stdout) < 64 * 1024


def test_agent_record_reports_the_agent_own_memory(
        write_config: Callable[[str], Path], validate_record: Callable[[dict[str, Any]], None]) -> None:
    """The agent's own rss is in agent records, and equals what it reports for itself as a
    sampled process in the same run (the same statm, read by another path) within 25%."""
    config = write_config('[agent]\ninterval = "100ms"\n[[targets]]\nname = "me"\nself = true\n')
    result = run_cli("run", str(config), "--duration", "1")
    assert result.returncode == 0, result.stderr
    records = parse_records(result.stdout)
    agent = [r for r in records if r["type"] == "agent"][-1]
    validate_record(agent)
    sampled = [r["portable"]["rss"] for r in records if r["type"] == "sample"][-1]
    own = agent["agent"]["rss"]
    assert 0.75 * sampled <= own <= 1.25 * sampled, (own, sampled)
    assert agent["agent"]["max_rss"] >= own


# -- samples sealed from kept bytes -------------------------------------------------------------

def _maker(**tags: str) -> RecordMaker:
    return RecordMaker(host='h"ost\n', os_name="linux", backend="linux", tags=tags)


INFO = ProcessInfo(pid=42, ppid=1, name="a\"b\\c\u2028", started=1_700_000_000.25)


def _reading(rss: int) -> Reading:
    return Reading(42, INFO.started, {"rss": rss, "vms": 1 << 30}, {"shared": 4096},
                   full={"uss": 1, "pss": 2, "swap": 3}, extra={"rss_share": 0.5})


def test_a_sample_sealed_from_kept_bytes_is_exactly_its_encoded_fields() -> None:
    """The second tick of an unchanged reading reuses its bytes; they decode to the record's
    fields, which equal what encoding the whole record gives, seq and ts included."""
    maker = _maker(env="prod")
    reading = _reading(8192)
    first = maker.seal(maker.sample("t", INFO, reading, iso_utc(1_800_000_000.5)))
    again = maker.sample("t", INFO, reading, iso_utc(1_800_000_001.5))
    assert again.source is not None and again.source.body is not None and not again.fields_made
    second = maker.seal(again)
    for record in (first, second):
        assert orjson.loads(record.json) == record.fields
        assert record.json == orjson.dumps(dict(record.fields))
    assert (second.fields["seq"], second.fields["ts"]) == (2, "2027-01-15T08:00:01.500000Z")
    assert second.fields["tags"] == {"env": "prod"}


def test_a_new_reading_or_a_changed_draft_is_encoded_anew() -> None:
    maker = _maker()
    ts = iso_utc(1_800_000_000.0)
    maker.seal(maker.sample("t", INFO, _reading(4096), ts))
    grown = maker.seal(maker.sample("t", INFO, _reading(8192), ts))
    assert grown.fields["portable"]["rss"] == 8192 and orjson.loads(grown.json) == grown.fields
    changed = maker.sample("t", INFO, _reading(8192), ts)
    changed.fields["name"] = "renamed"  # a processor changing a draft gives up the kept bytes
    record = maker.seal(changed)
    assert orjson.loads(record.json)["name"] == "renamed" and record.fields["name"] == "renamed"


def test_what_is_kept_goes_with_the_process_exit() -> None:
    maker = _maker()
    ts = iso_utc(1_800_000_000.0)
    maker.seal_all([maker.sample("t", INFO, _reading(4096), ts), maker.sample("u", INFO, _reading(4096), ts)])
    assert len(maker._samples) == 2  # noqa: SLF001
    maker.seal(maker.exit("t", INFO, ts))
    assert list(maker._samples) == [("u", 42)]  # noqa: SLF001


def test_a_reloaded_hostname_or_tags_reach_kept_sample_bytes() -> None:
    """A reload changes the maker's host and tags; an unchanged process's next sample has them."""
    maker = _maker(env="old")
    reading = _reading(4096)
    maker.seal(maker.sample("t", INFO, reading, iso_utc(1_800_000_000.0)))
    maker.host, maker.tags = "new-host", {"env": "new"}  # what a reload does
    record = maker.seal(maker.sample("t", INFO, reading, iso_utc(1_800_000_001.0)))
    assert orjson.loads(record.json)["host"] == "new-host" and record.fields["tags"] == {"env": "new"}
    assert orjson.loads(record.json) == record.fields


def test_changing_a_drafts_nested_fields_leaves_the_kept_bytes_alone() -> None:
    """A processor may change a draft's fields, nested ones too: that record says so, the next
    tick's record of the same unchanged reading is as the process really is."""
    maker = _maker()
    reading = _reading(4096)
    draft = maker.sample("t", INFO, reading, iso_utc(1_800_000_000.0))
    draft.fields["portable"]["rss"] = 0
    assert orjson.loads(maker.seal(draft).json)["portable"]["rss"] == 0
    assert reading.portable["rss"] == 4096
    record = maker.seal(maker.sample("t", INFO, reading, iso_utc(1_800_000_001.0)))
    assert orjson.loads(record.json)["portable"]["rss"] == 4096 == record.fields["portable"]["rss"]


def test_lazy_fields_are_made_once_when_threads_ask_together() -> None:
    """Sinks in worker threads (otlp) and on the loop may ask a shared record for its fields at
    once: every caller gets the same mapping."""
    maker = _maker()
    reading = _reading(4096)
    maker.seal(maker.sample("t", INFO, reading, iso_utc(1_800_000_000.0)))
    ts = iso_utc(1_800_000_001.0)
    records = maker.seal_all([maker.sample("t", INFO, reading, ts) for _ in range(2000)])
    seen: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def ask(into: list[int]) -> None:
        barrier.wait()
        into.extend(id(r.fields) for r in records)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=ask, args=(out,)) for out in seen]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(old)
    assert seen[0] == seen[1]

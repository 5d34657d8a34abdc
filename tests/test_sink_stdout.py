"""The stdout sink's text format: one line per record type, and what a process controls can
never forge output lines."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memagent.contracts import ProcessInfo, Reading
from memagent.record_types import printable, text_line
from memagent.records import RecordMaker

from cli_helpers import MEMAGENT, READY_THEN_WAIT, spawn_ready, stop_child

FORGED = "worker\n05:00:00.00 api 1 sshd rss=1.0MiB\x1b[2J\u2028"

ENVELOPE = {"schema": 1, "seq": 1, "run": "0123456789abcdef", "ts": "2026-11-25T05:00:00.123456Z",
            "host": "h", "os": "linux", "backend": "linux"}
PROCESS = {**ENVELOPE, "target": "api", "pid": 1234, "ppid": 1, "name": "gunicorn",
           "started": "2026-11-25T04:59:58.12Z"}
#: one record of each built-in type and how it reads (the format people and scripts know)
LINES: list[tuple[dict[str, Any], str]] = [
    ({**PROCESS, "type": "sample", "portable": {"rss": 15491072, "vms": 84025344}, "platform": {},
      "full": {"uss": 11661312, "pss": 12247040, "swap": 0}},
     "05:00:00.12 api 1234 gunicorn rss=14.8MiB vms=80.1MiB uss=11.1MiB pss=11.7MiB swap=0B"),
    ({**PROCESS, "type": "start", "cmdline": ["gunicorn", "-w", "4", "x" * 200]},
     "05:00:00.12 api 1234 gunicorn start: gunicorn -w 4 " + "x" * 106),
    ({**PROCESS, "type": "exit"}, "05:00:00.12 api 1234 gunicorn exit"),
    ({**PROCESS, "type": "error", "error": {"kind": "access_denied", "message": "no way"}},
     "05:00:00.12 api 1234 gunicorn error access_denied: no way"),
    ({**ENVELOPE, "type": "agent", "pid": 9,
      "agent": {"uptime_s": 1.5, "processes": 3, "records": 10, "ticks": 2, "ticks_skipped": 1,
                "sinks": {"a": {"dropped": 2}, "b": {"dropped": 3}}}},
     "05:00:00.12 agent processes=3 records=10 skipped_ticks=1 dropped=5"),
]


def test_printable_escapes_every_control_character() -> None:
    """Newlines, escapes, DEL, C1 and Unicode line separators come out as visible escapes."""
    assert printable("a\nb\rc\td\x1b[31me\x7ff\x85g\u2028h\u2029") == \
        "a\\nb\\rc\\td\\x1b[31me\\x7ff\\x85g\\u2028h\\u2029"
    assert printable("ordinary näme (1) €") == "ordinary näme (1) €"


def test_text_line_of_each_builtin_type() -> None:
    """Each v1 record type reads as its one line: clock, target pid name, then its own part."""
    assert {fields["type"] for fields, _ in LINES} == {"sample", "start", "exit", "error", "agent"}
    for fields, line in LINES:
        assert text_line(fields) == line


def test_text_line_of_a_hostile_process_is_one_line() -> None:
    """A process named and started with control characters still makes exactly one line per
    record, in every record type that shows its name, command line or error message."""
    maker = RecordMaker(host="h", os_name="linux", backend="linux", tags={})
    info = ProcessInfo(pid=7, ppid=1, name=FORGED, started=1.0, cmdline=("sh", "-c", FORGED))
    records = [maker.start("api", info, "2026-11-25T05:00:00.000000Z"),
               maker.sample("api", info, Reading(7, 1.0, {"rss": 1, "vms": 2}, {}), "2026-11-25T05:00:00.1Z"),
               maker.error("api", info, "read_error", FORGED, "2026-11-25T05:00:00.200000Z"),
               maker.exit("api", info, "2026-11-25T05:00:00.300000Z")]
    for record in records:
        line = text_line(record.fields)
        assert len(line.splitlines()) == 1 and "\x1b" not in line and "\u2028" not in line, line
        assert "worker\\n05:00:00.00 api 1 sshd" in line


def test_text_output_of_a_real_process_with_a_newline_in_its_name(
        tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    """End to end: a real child whose command line holds a newline prints one line per record."""
    child = spawn_ready(READY_THEN_WAIT, "x\nFORGED LINE")
    try:
        config = write_config(f'[[targets]]\nname = "c"\npid = {child.pid}\n'
                              '[[sinks]]\ntype = "stdout"\nformat = "text"\n')
        result = subprocess.run([*MEMAGENT, "run", str(config), "--once"], capture_output=True, text=True,
                                timeout=60, check=False)
    finally:
        stop_child(child)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FORGED")], lines
    assert any("x\\nFORGED LINE" in line for line in lines if " start: " in line), lines

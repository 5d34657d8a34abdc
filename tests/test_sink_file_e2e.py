"""The file sink end to end: the real CLI under load, real logrotate, real tailers, real disks."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from cli_helpers import MEMAGENT, REPO, AgentProcess, Finished, run_agent, system_tool, wait_for
from filesink_helpers import can_mount, read_lines, seqs_anywhere, seqs_in_order, tmpfs

NOBODY = 65534
# ~1,000 records/s whatever else runs on the machine (all = true would scale with its process
# count: a host with thousands of processes made the sink drop, counted, and the tests flaky)
HIGH_RATE = ('[agent]\ninterval = "2ms"\nstats_interval = "500ms"\n'
             '[[targets]]\nname = "me"\nself = true\n[[targets]]\nname = "init"\npid = 1\n')


def stop(agent: AgentProcess) -> Finished:
    """SIGTERM, wait, and require a clean exit; every stdout record and all stderr."""
    finished = agent.stop(signal.SIGTERM, timeout=60)
    assert finished.returncode == 0, finished.stderr
    return finished


def last_seq(live: Path) -> int:
    """The seq of the agent's final record (the last line of the live file)."""
    return int(orjson.loads(read_lines(live)[-1])["seq"])


def seqs_of(path: Path, *, partial_tail: bool = False) -> list[int]:
    """``seq`` of every line of one file, in file order."""
    return [int(orjson.loads(line)["seq"]) for line in read_lines(path, partial_tail=partial_tail)]


def grows(path: Path, lines: int) -> Callable[[], bool]:
    return lambda: path.exists() and path.stat().st_size > lines * 300


def test_dozens_of_rotations_lose_and_repeat_nothing(tmp_path: Path,
                                                     write_config: Callable[[str], Path]) -> None:
    """High rate, tiny rotate_size: every seq of the run appears once, in order, across archives."""
    live = tmp_path / "logs" / "memory.ndjson"
    config = write_config(HIGH_RATE + f'[[sinks]]\ntype = "file"\npath = "{live}"\nrotate_size = "40KB"\n'
                          'keep = 10000\ncompress = true\nfsync = "never"\n')
    agent = run_agent(config)
    began = time.monotonic()
    wait_for(lambda: len(list(live.parent.glob("memory.ndjson.*.gz"))) >= 36, timeout=60)
    finished = stop(agent)
    took = time.monotonic() - began
    seqs = seqs_in_order(live)
    rotations = len(list(live.parent.glob("memory.ndjson.*.gz")))
    print(f"\n{len(seqs)} records in {rotations} archives + live file in {took:.1f} s "
          f"({len(seqs) / took:.0f} records/s)")
    assert seqs == list(range(1, last_seq(live) + 1)), finished.stderr
    assert rotations >= 36


@pytest.mark.parametrize("mode", ["create+SIGHUP", "create", "copytruncate"])
def test_real_logrotate_during_a_run(mode: str, tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    """logrotate rotates the live file 10 times under load: create mode loses and repeats nothing
    (with or without SIGHUP); copytruncate repeats nothing and loses only its own copy window."""
    logrotate = system_tool("logrotate", "logrotate")
    logs = tmp_path / "logs"
    live = logs / "memory.ndjson"
    config = write_config(HIGH_RATE + f'[[sinks]]\ntype = "file"\npath = "{live}"\nfsync = "never"\n')
    agent = run_agent(config)
    directive = "copytruncate" if mode == "copytruncate" else "create 0640"
    postrotate = (f"    postrotate\n        kill -HUP {agent.pid}\n    endscript\n"
                  if mode == "create+SIGHUP" else "")
    rotate_conf = tmp_path / "logrotate.conf"
    rotate_conf.write_text(f"{live} {{\n    rotate 1000\n    {directive}\n    missingok\n    nocompress\n"
                           f"{postrotate}}}\n")
    try:
        for _ in range(10):
            wait_for(grows(live, 100))  # records in the live file (new or truncated) before each run
            subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(rotate_conf)],
                           check=True, capture_output=True)
    finally:
        stop(agent)
    copied = mode == "copytruncate"  # an archive copied mid-append may end in a cut line: lost
    counts = Counter(seqs_anywhere(logs, partial_tail=copied))
    final = last_seq(live)
    missing = sorted(set(range(1, final + 1)) - set(counts))
    files = sorted((seqs_of(path, partial_tail=copied) for path in logs.iterdir()), key=lambda seqs: seqs[0])
    gaps = [later[0] - earlier[-1] - 1 for earlier, later in itertools.pairwise(files)]
    print(f"\nlogrotate {mode}: {len(files) - 1} rotations, {final} records, {len(missing)} lost; "
          f"lost per rotation: {gaps}")
    assert len(files) == 11
    assert max(counts.values()) == 1, "a record was written twice"
    assert all(seqs == list(range(seqs[0], seqs[-1] + 1)) for seqs in files), "a gap inside a file"
    if mode == "copytruncate":
        # whatever is lost is lost at a rotation: written between logrotate's copy and its truncate
        assert len(missing) == sum(gaps)
    else:
        assert missing == [] and gaps == [0] * 10


def test_tail_F_and_rsyslog_imfile_receive_every_record(tmp_path: Path,
                                                        write_config: Callable[[str], Path]) -> None:
    """Two real tailers following by name see every line exactly once across built-in rotations.

    rsyslog runs examples/rsyslog-imfile.conf as shipped (paths replaced). A child with a 20 KB
    command line is among the targets, so lines longer than rsyslog's default 8k limit are shipped.
    """
    live = tmp_path / "memory.ndjson"
    tail_out = tmp_path / "tail.out"
    rsyslog_out = tmp_path / "rsyslog.out"
    conf = tmp_path / "rsyslog.conf"
    (tmp_path / "rsyslog-work").mkdir()
    conf.write_text((REPO / "examples/rsyslog-imfile.conf").read_text()
                    .replace("/var/log/memagent/memory.ndjson", str(live))
                    .replace("/var/spool/rsyslog", str(tmp_path / "rsyslog-work"))
                    .replace("/var/log/memagent-shipped.ndjson", str(rsyslog_out)))
    rsyslogd = system_tool("rsyslogd", "rsyslog")
    long_cmdline = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *["x" * 99] * 200])
    config = write_config('[agent]\ninterval = "100ms"\n[[targets]]\nname = "all"\nall = true\n'
                          f'[[sinks]]\ntype = "file"\npath = "{live}"\nrotate_size = "200KB"\nkeep = 1000\n')
    agent = run_agent(config)
    wait_for(live.exists)
    tailers = [subprocess.Popen(["tail", "-n", "+1", "-F", str(live)], stdout=tail_out.open("wb"),
                                stderr=subprocess.DEVNULL),
               subprocess.Popen([rsyslogd, "-n", "-f", str(conf), "-i", str(tmp_path / "rsyslog.pid")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for(lambda: len(list(tmp_path.glob("memory.ndjson.*"))) >= 4, timeout=60)
        stop(agent)
        final = last_seq(live)
        expected = list(range(1, final + 1))

        def delivered(path: Path) -> list[int]:
            return [orjson.loads(line)["seq"] for line in path.read_bytes().splitlines() if line.strip()]

        wait_for(lambda: delivered(tail_out)[-1:] == [final] and delivered(rsyslog_out)[-1:] == [final],
                 timeout=30)
    finally:
        for child in [*tailers, long_cmdline]:
            child.terminate()
            child.wait(timeout=10)
    rotations = len(list(tmp_path.glob("memory.ndjson.*")))
    print(f"\n{final} records across {rotations} rotations: tail -F and rsyslog imfile got all")
    assert rotations >= 4
    assert delivered(tail_out) == expected
    assert delivered(rsyslog_out) == expected
    assert max(map(len, tail_out.read_bytes().splitlines())) > 20_000


def test_dev_full_counts_drops_and_spares_stdout(write_config: Callable[[str], Path]) -> None:
    """/dev/full: one error line, counted drops in agent records, stdout gets every record."""
    config = write_config('[agent]\ninterval = "20ms"\nstats_interval = "300ms"\ndrain_timeout = "1s"\n'
                          '[[targets]]\nname = "me"\nself = true\n'
                          '[[sinks]]\ntype = "file"\npath = "/dev/full"\nqueue = 20\n'
                          '[[sinks]]\ntype = "stdout"\n')
    agent = run_agent(config)
    # until an agent record on stdout shows the file sink dropping
    agent.wait_for_record(lambda r: r["type"] == "agent" and r["agent"]["sinks"]["file"]["dropped"] > 0)
    finished = stop(agent)
    records, err = finished.records, finished.stderr
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # stdout: nothing lost
    final = records[-1]["agent"]["sinks"]["file"]
    assert final["dropped"] > 0 and final["failures"] > 0 and final["written"] == 0
    # every record accounted for: dropped or still queued, but for the final record itself
    assert final["dropped"] + final["queued"] == records[-1]["seq"] - 1
    errors = [line for line in err.splitlines() if "write failed" in line]
    assert errors == ["memagent ERROR: sink file: write failed: /dev/full: No space left on device; "
                      "retrying with backoff, records wait in its queue (when_full=drop_oldest)"]
    assert "Traceback" not in err


def test_read_only_directory_recovers_when_writable(tmp_path: Path,
                                                    write_config: Callable[[str], Path]) -> None:
    """A read-only mount: reported, retried; once remounted read-write the queued records land."""
    if not can_mount(tmp_path):
        pytest.skip("needs root to mount a tmpfs")
    with tmpfs(tmp_path / "ro", readonly=True) as disk:
        live = disk / "memory.ndjson"
        config = write_config('[agent]\ninterval = "50ms"\n[[targets]]\nname = "me"\nself = true\n'
                              f'[[sinks]]\ntype = "file"\npath = "{live}"\n')
        agent = run_agent(config)
        agent.wait_for_stderr("write failed")  # the first failed write
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        wait_for(lambda: live.exists() and live.stat().st_size > 0, timeout=20)
        text = stop(agent).stderr
        seqs = seqs_in_order(live)
    assert seqs == list(range(1, seqs[-1] + 1))  # the queue held everything during the outage
    assert text.count("Read-only file system") == 2  # the failed open at start, the failed write
    assert "writing again" in text and "Traceback" not in text


def test_permission_denied_then_granted(tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    """EACCES (root without CAP_DAC_OVERRIDE, a directory it does not own): one error line, stdout
    unaffected; once the directory is chowned to it, the queued records land, every seq once."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux's setpriv to drop CAP_DAC_OVERRIDE")
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    os.chown(logs, NOBODY, NOBODY)
    live = logs / "memory.ndjson"
    config = write_config('[agent]\ninterval = "50ms"\n[[targets]]\nname = "me"\nself = true\n'
                          f'[[sinks]]\ntype = "file"\npath = "{live}"\n[[sinks]]\ntype = "stdout"\n')
    # the kernel, not a mock, refuses: without these capabilities root obeys the mode bits
    agent = AgentProcess([setpriv, "--bounding-set=-dac_override,-dac_read_search", *MEMAGENT, "run",
                          str(config)])
    try:
        first = agent.wait_for_stderr("Permission denied").string  # the failed open at start
        agent.wait_for_record(lambda r: r["seq"] >= 20)  # stdout flows during the outage
        os.chown(logs, 0, 0)
        wait_for(lambda: live.exists() and live.stat().st_size > 0, timeout=20)
    finally:
        finished = stop(agent)
    file_seqs = seqs_in_order(live)
    stdout_seqs = [r["seq"] for r in finished.records]
    text = finished.stderr
    print(f"\nEACCES then granted: {len(file_seqs)} records in the file, {len(stdout_seqs)} on stdout")
    assert f"{live}: Permission denied" in first and oct(live.stat().st_mode & 0o777) == "0o640"
    assert stdout_seqs == list(range(1, stdout_seqs[-1] + 1))  # the other sink never noticed
    assert file_seqs == stdout_seqs  # the file's queue held everything during the outage
    assert text.count("Permission denied") == 2  # the failed open, then one failed-write episode
    assert "writing again" in text and "Traceback" not in text


def test_sigterm_under_load_loses_nothing(tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    """SIGTERM at a high rate: the file ends with the final agent record and holds seq 1..N."""
    live = tmp_path / "memory.ndjson"
    config = write_config(HIGH_RATE + f'[[sinks]]\ntype = "file"\npath = "{live}"\n')
    agent = run_agent(config)
    wait_for(grows(live, 2000))
    stop(agent)
    lines = read_lines(live)
    last = orjson.loads(lines[-1])
    assert last["type"] == "agent" and last["agent"]["sinks"]["file"]["dropped"] == 0
    assert [orjson.loads(line)["seq"] for line in lines] == list(range(1, last["seq"] + 1))
    print(f"\nSIGTERM under load: {last['seq']} records produced, {len(lines)} on disk")

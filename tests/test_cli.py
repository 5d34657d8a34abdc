"""The real `memagent` command, end to end: records, exit codes, errors, signals."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from memagent.cli import main

from bad_configs import BAD_CONFIGS
from cli_helpers import (
    MEMAGENT,
    REPO,
    assert_contiguous,
    env_with,
    parse_records,
    ps_rss_vsz,
    run_agent,
    run_cli,
    scaled,
    spawn_allocator,
    stop_child,
    wait_for,
)

PAGE = 4096


def test_quickstart_once_prints_valid_contiguous_records(
        validate_record: Callable[[dict[str, Any]], None]) -> None:
    """`memagent run examples/quickstart.toml --once`: start + sample records, schema-valid, no gaps."""
    result = run_cli("run", str(REPO / "examples/quickstart.toml"), "--once")
    assert result.returncode == 0, result.stderr
    records = parse_records(result.stdout)
    assert_contiguous(records)
    for record in records:
        validate_record(record)
    own = [r for r in records if r["type"] == "sample" and r["target"] == "memagent"]
    assert len(own) == 1 and own[0]["full"]["pss"] > 0
    assert records[-1]["type"] == "agent"
    assert records[0]["tags"] == {"env": "quickstart"}


def test_default_config_samples_every_visible_process(
        validate_record: Callable[[dict[str, Any]], None]) -> None:
    """`memagent run --once` with no config covers the processes `ps` sees."""
    ps_pids = {int(p) for p in subprocess.run(["ps", "-e", "-o", "pid="], capture_output=True,
                                              text=True, check=True).stdout.split()}
    result = run_cli("run", "--once")
    assert result.returncode == 0, result.stderr
    records = parse_records(result.stdout)
    sampled = {r["pid"] for r in records if r["type"] == "sample"}
    # processes may come and go between the two listings; nearly all must be there
    assert len(sampled & ps_pids) >= 0.9 * len(ps_pids)
    for record in records[:50]:
        validate_record(record)


def test_rss_and_vms_match_ps_for_a_200mb_child(write_config: Callable[[str], Path]) -> None:
    """A child holding 200 MiB: rss/vms equal `ps` × 1024 within two pages; statm fields too."""
    child = spawn_allocator(200)
    try:
        config = write_config(f'[[targets]]\nname = "alloc"\npid = {child.pid}\nfull = true\n')
        result = run_cli("run", str(config), "--once")
        ps_rss, ps_vsz = ps_rss_vsz(child.pid)
        statm = [int(v) * PAGE for v in Path(f"/proc/{child.pid}/statm").read_text().split()]
    finally:
        stop_child(child)
    assert result.returncode == 0, result.stderr
    sample = next(r for r in parse_records(result.stdout) if r["type"] == "sample")
    assert sample["portable"]["rss"] >= 200 * 1024 * 1024
    assert abs(sample["portable"]["rss"] - ps_rss) <= 2 * PAGE
    assert abs(sample["portable"]["vms"] - ps_vsz) <= 2 * PAGE
    platform = sample["platform"]
    assert abs(platform["shared"] - statm[2]) <= 2 * PAGE
    assert platform["text"] == statm[3] and platform["data"] == statm[5]


def test_plugins_lists_builtins_with_distribution() -> None:
    """`memagent plugins` shows each built-in, its kind, distribution and whether it loads."""
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("NAME"))) + 1:]
    rows = {line.split()[0]: line.split() for line in table}
    for name, kind in (("linux", "backend"), ("psutil", "backend"), ("stdout", "sink"),
                       ("file", "sink"), ("websocket", "sink")):
        assert rows[name][1:3] == [kind, "memagent"]
    assert rows["linux"][4] == "yes" and rows["stdout"][4] == "yes"


def test_schema_command_prints_the_shipped_schema(record_schema: dict[str, Any]) -> None:
    """`memagent schema` prints the JSON Schema the tests validate with."""
    result = run_cli("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout) == record_schema


def test_sample_config_is_a_valid_config(write_config: Callable[[str], Path]) -> None:
    """`memagent sample-config` output passes `memagent check` as is."""
    result = run_cli("sample-config")
    assert result.returncode == 0, result.stderr
    check = run_cli("check", str(write_config(result.stdout)))
    assert check.returncode == 0, check.stderr
    assert "ok" in check.stdout


@pytest.mark.parametrize(("text", "key", "fragment"), BAD_CONFIGS,
                         ids=[c[1] + ":" + c[2][:20] for c in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line(text: str, key: str, fragment: str,
                                          write_config: Callable[[str], Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`memagent run BAD` exits 2 with one stderr line naming the key, no traceback."""
    code = main(["run", str(write_config(text)), "--once"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("memagent: error: ") and fragment in err
    assert key in err or key == "<config>"  # a TOML syntax error names the file instead


@pytest.mark.parametrize(("extra", "fragment"), [
    ('[[sinks]]\ntype = "nosuch"\n', 'sinks[1].type: no sink plugin named'),
    ('[[sinks]]\ntype = "stdout"\nformat = "xml"\n', 'sinks[1].format: must be one of'),
    ('[[sinks]]\ntype = "stdout"\nfromat = "text"\n', 'sinks[1].fromat: unknown key; did you mean format?'),
    ('[agent]\nbackend = "linuxx"\n', "agent.backend: no backend plugin named 'linuxx'; did you mean linux?"),
    ('[backends.linux]\nprocfs = 3\n', "backends.linux.procfs"),
])
def test_plugin_option_errors_exit_2(extra: str, fragment: str, write_config: Callable[[str], Path]) -> None:
    """Plugin options are validated by the plugin, reported by dotted key, exit 2 (real process)."""
    result = run_cli("check", str(write_config('[[targets]]\nname = "me"\nself = true\n' + extra)))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert fragment in result.stderr


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown commands and bad flags are one line and exit 2."""
    assert main(["frobnicate"]) == 2
    assert main(["run", "--duration", "-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_and_flushes(signum: int, write_config: Callable[[str], Path]) -> None:
    """SIGTERM/SIGINT: exit 0, the final agent record written, no gap in seq."""
    config = write_config('[agent]\ninterval = "20ms"\n[[targets]]\nname = "me"\nself = true\n')
    with run_agent(config) as agent:
        agent.wait_for_record(lambda r: r["type"] == "start")  # running: the start record is out
        finished = agent.stop(signum)
    assert finished.returncode == 0, finished.stderr
    records = finished.records
    assert_contiguous(records)
    assert records[-1]["type"] == "agent"
    assert records[-1]["agent"]["sinks"]["stdout"]["dropped"] == 0


def test_piped_into_head_stops_with_one_line_when_the_reader_leaves(
        tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    """`memagent run | head -n 3`: once head exits, the agent stops by itself (exit 1), with one
    error line, no traceback, no 'Exception ignored' at interpreter exit."""
    config = write_config('[agent]\ninterval = "20ms"\n[[targets]]\nname = "me"\nself = true\n')
    stderr = tmp_path / "stderr"
    pipeline = (f"{shlex.join(MEMAGENT)} run {config} 2>{stderr} | head -n 3; "
                'echo "${PIPESTATUS[0]}"')
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, timeout=scaled(60),
                            check=True)
    elapsed = time.monotonic() - started
    *lines, status = result.stdout.splitlines()
    err = stderr.read_text()
    print(f"\nhead -n 3: agent stopped after {elapsed:.1f} s, exit {status}")
    assert [orjson.loads(line)["seq"] for line in lines] == [1, 2, 3]
    assert status == "1"
    errors = [line for line in err.splitlines() if line.startswith("memagent: error:")]
    assert errors == ["memagent: error: every sink closed for good (stdout: the reader of stdout "
                      "closed the pipe); stopped"]
    assert "Traceback" not in err and "Exception ignored" not in err


def test_stdout_closing_leaves_the_other_sinks_running(tmp_path: Path,
                                                       write_config: Callable[[str], Path]) -> None:
    """stdout + file: the stdout reader leaves; the file keeps receiving every record, the agent
    keeps running until SIGTERM (exit 0), and stdout's lost records are counted in agent records."""
    live = tmp_path / "memory.ndjson"
    config = write_config('[agent]\ninterval = "20ms"\nstats_interval = "200ms"\n'
                          '[[targets]]\nname = "me"\nself = true\n'
                          f'[[sinks]]\ntype = "stdout"\n[[sinks]]\ntype = "file"\npath = "{live}"\n')
    with run_agent(config) as agent:
        agent.wait_for_record(lambda r: r["type"] == "start")
        agent.close_stdout()
        wait_for(lambda: _stdout_dropped(live) > 20)
        assert agent.poll() is None, "the agent must keep running for its file sink"
        finished = agent.stop()
    assert finished.returncode == 0, finished.stderr
    err = finished.stderr
    records = parse_records(live.read_text())
    assert_contiguous(records)
    final = records[-1]
    stdout_stats = final["agent"]["sinks"]["stdout"]
    assert stdout_stats["written"] + stdout_stats["dropped"] + stdout_stats["queued"] == final["seq"] - 1
    assert err.count("closed for good") == 1 and "Traceback" not in err


def _stdout_dropped(live: Path) -> int:
    """stdout's ``dropped`` in the newest agent record of the file sink's output (0 if none yet).
    Reads complete lines only: the agent may be half-way through writing the last one."""
    text = live.read_text() if live.exists() else ""
    agents = [r for r in parse_records(text[:text.rfind("\n") + 1]) if r["type"] == "agent"]
    return int(agents[-1]["agent"]["sinks"]["stdout"]["dropped"]) if agents else 0


def test_duration_stops_the_run(write_config: Callable[[str], Path]) -> None:
    """--duration S: aligned ticks, then the agent stops by itself, exit 0, with a final agent record;
    never more ticks (sampled or skipped) than interval slots in its own uptime."""
    config = write_config('[agent]\ninterval = "100ms"\n[[targets]]\nname = "me"\nself = true\n')
    result = run_cli("run", str(config), "--duration", "1.05")
    assert result.returncode == 0, result.stderr
    records = parse_records(result.stdout)
    assert_contiguous(records)
    samples = [r for r in records if r["type"] == "sample"]
    final = records[-1]["agent"]
    assert records[-1]["type"] == "agent"
    assert len(samples) == final["ticks"] >= 1  # one sample per tick of the one process
    # counts against the agent's own clock, whatever the machine's load: every tick or skip is a
    # distinct slot boundary inside the uptime (rounded to 1 ms), so no burst ever makes extra ticks
    assert final["ticks"] + final["ticks_skipped"] <= (final["uptime_s"] + 0.001) / 0.1 + 1


def test_exit_then_start_for_a_reused_pid(write_config: Callable[[str], Path]) -> None:
    """A watched process that exits yields `exit`; a new process given its pid yields a new `start`."""
    ns_last_pid = Path("/proc/sys/kernel/ns_last_pid")
    try:
        ns_last_pid.write_text(ns_last_pid.read_text())
    except OSError:
        pytest.skip("forcing pid reuse needs write access to /proc/sys/kernel/ns_last_pid (root)")
    config = write_config('[agent]\ninterval = "50ms"\nrescan = "50ms"\n'
                          '[[targets]]\nname = "reuse"\ncmdline = "memagent-reuse-marker"\n')
    with run_agent(config) as agent:
        first = spawn_allocator(1, "memagent-reuse-marker")
        pid = first.pid

        def next_of(kind: str) -> dict[str, Any]:
            return agent.wait_for_record(lambda r: r["type"] == kind and r["pid"] == pid)

        start_one = next_of("start")
        next_of("sample")
        stop_child(first)
        exit_one = next_of("exit")
        second = None
        for _ in range(50):  # another process on this machine may take the pid first; retry
            ns_last_pid.write_text(str(pid - 1))
            candidate = spawn_allocator(1, "memagent-reuse-marker")
            if candidate.pid == pid:
                second = candidate
                break
            stop_child(candidate)  # the agent may or may not have seen it: next_of() skips its records
        assert second is not None, "could not get the same pid again"
        start_two = next_of("start")
        stop_child(second)
        assert agent.stop().returncode == 0
    assert start_one["pid"] == exit_one["pid"] == start_two["pid"] == pid
    assert exit_one["started"] == start_one["started"]
    assert start_two["started"] != start_one["started"]
    assert start_one["seq"] < exit_one["seq"] < start_two["seq"]


def test_missing_variable_is_reported_with_its_line(write_config: Callable[[str], Path]) -> None:
    """An unset ${VAR} without default: exit 2, names the variable and the line."""
    config = write_config('[agent]\nhostname = "${MEMAGENT_TEST_UNSET}"\n[[targets]]\nname="x"\nself=true\n')
    result = run_cli("check", str(config), env=env_with())
    assert result.returncode == 2
    assert result.stderr.strip() == ("memagent: error: line 2: ${MEMAGENT_TEST_UNSET} is not set "
                                     "(set it, or write ${MEMAGENT_TEST_UNSET:-default})")


def test_text_format_is_one_readable_line_per_record(write_config: Callable[[str], Path]) -> None:
    """format = "text": start, sample (with MiB figures) and agent lines, no JSON."""
    config = write_config('[[targets]]\nname = "me"\nself = true\nfull = true\n'
                          '[[sinks]]\ntype = "stdout"\nformat = "text"\n')
    result = run_cli("run", str(config), "--once")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    cgroups = [line for line in lines if " cgroup /" in line]  # on Linux, its cgroup's (one per tick)
    assert all(re.search(r" processes=1 current=\S+B", line) for line in cgroups), cgroups
    lines = [line for line in lines if line not in cgroups]
    assert len(lines) == 3
    assert " me " in lines[0] and " start: " in lines[0]
    assert re.search(r" me \d+ python\S* rss=\d+\.\dMiB vms=\d+\.\dMiB uss=", lines[1]), lines[1]
    assert " agent processes=1 records=" in lines[2] and "dropped=0" in lines[2]


def test_agent_records_come_every_stats_interval(write_config: Callable[[str], Path]) -> None:
    """stats_interval = "200ms": agent records keep coming while the agent runs, never closer
    together than 200 ms of its uptime, with counters that only grow; one more when it stops."""
    config = write_config('[agent]\nstats_interval = "200ms"\ninterval = "100ms"\n'
                          '[[targets]]\nname = "me"\nself = true\n')
    with run_agent(config) as agent:
        for _ in range(3):
            agent.wait_for_record(lambda r: r["type"] == "agent")
        finished = agent.stop()
    assert finished.returncode == 0, finished.stderr
    agents = [r["agent"] for r in finished.records if r["type"] == "agent"]
    periodic, last = agents[:-1], agents[-1]
    assert len(periodic) >= 3
    uptimes = [a["uptime_s"] for a in periodic]
    # each waits a full stats_interval after the previous one (uptime is rounded to 1 ms)
    assert all(b - a >= 0.2 - 0.001 for a, b in zip(uptimes, uptimes[1:], strict=False)), uptimes
    for key in ("records", "ticks", "rescans"):
        assert [a[key] for a in agents] == sorted(a[key] for a in agents), key
    assert last["processes"] == 1 and last["ticks"] >= 1
    stdout = last["sinks"]["stdout"]
    # every record made before the final one is written, or still queued for the drain
    assert stdout["dropped"] == 0
    assert stdout["written"] + stdout["queued"] == last["records"] - 1


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.toml")))
def test_every_example_config_checks(example: str) -> None:
    """Each config in examples/ passes `memagent check` (container.toml with HOST_PROC=/proc)."""
    result = run_cli("check", str(REPO / "examples" / example), env=env_with(HOST_PROC="/proc"))
    assert result.returncode == 0, result.stderr


def test_sink_that_cannot_start_exits_1_with_one_line(write_config: Callable[[str], Path]) -> None:
    """A websocket port already taken is a run-time failure: exit 1, one clear line, no traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(f'[[targets]]\nname = "me"\nself = true\n'
                              f'[[sinks]]\ntype = "websocket"\nport = {port}\n')
        result = run_cli("run", str(config), "--once")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith("memagent: error: sink websocket: cannot start:") and "in use" in errors[0]


def test_version_and_usage() -> None:
    """--version prints the installed version; no command prints the usage (exit 2); plugins
    says the version too."""
    from importlib import metadata

    installed = metadata.version("memagent")
    version = run_cli("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"memagent {installed}")
    bare = run_cli()
    assert bare.returncode == 2 and "usage: memagent" in bare.stderr and "sample-config" in bare.stderr
    assert run_cli("plugins").stdout.startswith(f"memagent {installed} (Python ")


def test_missing_psutil_says_how_to_install_it(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """backend = "psutil" where psutil cannot be imported: one line saying pip install psutil."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "psutil.py").write_text("raise ImportError('blocked for this test')\n")
    config = write_config('[agent]\nbackend = "psutil"\n[[targets]]\nname = "me"\nself = true\n')
    result = run_cli("check", str(config), env=env_with(PYTHONPATH=str(blocker)))
    assert result.returncode == 2
    assert "psutil is not installed (pip install psutil)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_warns_about_selectors_that_match_nothing_now(write_config: Callable[[str], Path]) -> None:
    """A pid, pidfile or user that does not exist now: check still passes, with one warning each."""
    config = write_config('[[targets]]\nname = "a"\npid = 4194303\n'
                          '[[targets]]\nname = "b"\npidfile = "/nonexistent/daemon.pid"\n'
                          '[[targets]]\nname = "c"\nuser = "no-such-user-memagent"\n'
                          '[[targets]]\nname = "d"\nself = true\n')
    result = run_cli("check", str(config))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 3
    assert "a: pid 4194303 does not exist now" in warnings[0]
    assert "b: pidfile /nonexistent/daemon.pid" in warnings[1]
    assert "c: user 'no-such-user-memagent' does not exist" in warnings[2]


def test_container_example_checks_here_and_run_says_what_is_missing() -> None:
    """examples/container.toml on a machine without /host/proc: check passes with a warning
    naming the procfs; run stops at once with exit 2 and that one line."""
    if Path("/host/proc/stat").exists():
        pytest.skip("this machine has a /host/proc")
    example = str(REPO / "examples" / "container.toml")
    checked = run_cli("check", example)
    assert checked.returncode == 0, checked.stderr
    assert 'backends.linux.procfs: "/host/proc" is not a procfs' in checked.stderr
    ran = run_cli("run", example, "--once")
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines() == [
        'memagent: error: backends.linux.procfs: "/host/proc" is not a procfs (no /host/proc/stat)']


def test_containerfile_runs_the_container_example_as_a_non_root_user() -> None:
    """The Containerfile (not buildable here: no container engine) installs the package, copies
    the example it runs and switches to a non-root uid before its entry point."""
    recipe = (REPO / "examples" / "Containerfile").read_text()
    lines = [line for line in recipe.splitlines() if line and not line.startswith("#")]
    assert "COPY examples/container.toml /etc/memagent/container.toml" in lines
    user = next(line for line in lines if line.startswith("USER "))
    assert not user.split()[1].startswith("0") and lines.index(user) < lines.index('ENTRYPOINT ["memagent"]')
    assert lines[-1] == 'CMD ["run", "/etc/memagent/container.toml"]'

"""A third-party plugin package (examples/plugin-csv-sink), pip-installed, is found and used."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cli_helpers import REPO, env_with, run_cli, scaled


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/plugin-csv-sink installed by pip into its own directory."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(site), str(REPO / "examples/plugin-csv-sink")],
                   check=True, capture_output=True, timeout=scaled(300))
    return site


def with_site(site: Path) -> dict[str, str]:
    return env_with(PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


def test_plugins_command_discovers_it(plugin_site: Path) -> None:
    """`memagent plugins` lists the csv sink with its distribution and version, loadable."""
    result = run_cli("plugins", env=with_site(plugin_site))
    assert result.returncode == 0, result.stderr
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("csv "))
    assert row == ["csv", "sink", "memagent-csv-sink", "1.0.0", "yes"]


def test_run_uses_it(plugin_site: Path, tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    """`memagent run` with `type = "csv"` writes the agent's own sample as a CSV row."""
    out = tmp_path / "memory.csv"
    config = write_config(f'[[targets]]\nname = "me"\nself = true\n'
                          f'[[sinks]]\ntype = "csv"\npath = "{out}"\n')
    result = run_cli("run", str(config), "--once", env=with_site(plugin_site))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["target"] == "me" and int(rows[0]["rss"]) > 0
    assert oct(out.stat().st_mode & 0o777) == "0o640"


def test_its_option_errors_name_the_key(plugin_site: Path, write_config: Callable[[str], Path]) -> None:
    """A typo in the plugin's options is reported by dotted key, exit 2."""
    config = write_config('[[targets]]\nname = "me"\nself = true\n[[sinks]]\ntype = "csv"\npaht = "x"\n')
    result = run_cli("check", str(config), env=with_site(plugin_site))
    assert result.returncode == 2
    assert result.stderr.strip() == "memagent: error: sinks[1].path: is required"

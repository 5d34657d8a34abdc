"""Config validation: good configs parse; bad ones give one line naming the dotted key."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from memagent.config import default_config_text, expand_variables, parse_config
from memagent.errors import ConfigError

from bad_configs import BAD_CONFIGS, MINIMAL
from cli_helpers import run_cli


def test_minimal_config_defaults_to_stdout_and_one_second() -> None:
    """A config with only a target gets the documented defaults."""
    config = parse_config(MINIMAL)
    assert config.agent.interval == 1.0
    assert config.targets[0].interval == 1.0
    assert [(s.type, s.name, s.queue, s.when_full) for s in config.sinks] == [
        ("stdout", "stdout", 10_000, "drop_oldest")]


def test_embedded_default_watches_every_process() -> None:
    """`memagent run` without a config samples all processes every second to stdout."""
    config = parse_config(default_config_text())
    assert config.targets[0].all and config.targets[0].interval == 1.0
    assert config.sinks[0].type == "stdout"


def test_durations_accept_numbers_and_units() -> None:
    """Durations are seconds or strings with ms/s/m/h units."""
    config = parse_config('[agent]\ninterval = "250ms"\nrescan = 3\n' + MINIMAL
                          + 'interval = "5m"\n')
    assert config.agent.interval == 0.25
    assert config.agent.rescan == 3.0
    assert config.targets[0].interval == 300.0


def test_variables_expand_with_defaults_and_escape() -> None:
    """${VAR}, ${VAR:-default} and $${ work; comment lines are left alone."""
    env = {"PORT": "9000", "EMPTY": ""}
    text = 'a = ${PORT}\nb = "${MISSING:-x}"\nc = "$${LITERAL}"\nd = "${EMPTY:-fallback}"\n# ${UNSET}\n'
    assert expand_variables(text, env) == ('a = 9000\nb = "x"\nc = "${LITERAL}"\nd = "fallback"\n'
                                           "# ${UNSET}\n")


def test_sink_framework_keys_are_separated_from_plugin_options() -> None:
    """queue/when_full/batch/targets belong to the framework; the rest goes to the plugin."""
    config = parse_config(MINIMAL + '[[sinks]]\ntype = "file"\npath = "/tmp/x"\nqueue = 5\n'
                          'when_full = "block"\ntargets = ["me"]\n')
    sink = config.sinks[0]
    assert (sink.queue, sink.when_full, sink.targets) == (5, "block", ("me",))
    assert sink.options == {"path": "/tmp/x"}


@pytest.mark.parametrize(("text", "key", "fragment"), BAD_CONFIGS,
                         ids=[c[1] + ":" + c[2][:20] for c in BAD_CONFIGS])
def test_bad_config_names_the_key(text: str, key: str, fragment: str) -> None:
    """Each mistake is a ConfigError whose one-line message starts with the dotted key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: "), message
    assert fragment in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist names the path."""
    from memagent.config import load_config

    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nope.toml'}: no such file")):
        load_config(tmp_path / "nope.toml")



def test_required_variable_with_message() -> None:
    """${VAR:?message} expands when set; unset or empty it is an error carrying the message."""
    assert expand_variables('h = "${HOST_X:?set HOST_X}"\n', {"HOST_X": "web-1"}) == 'h = "web-1"\n'
    with pytest.raises(ConfigError, match=r"line 1: \$\{HOST_X\} is not set: set HOST_X to the hostname"):
        expand_variables('h = "${HOST_X:?set HOST_X to the hostname}"\n', {})
    with pytest.raises(ConfigError, match=r"\$\{HOST_X\} is empty: must not be empty"):
        expand_variables('h = "${HOST_X:?must not be empty}"\n', {"HOST_X": ""})


@pytest.mark.parametrize("reference", ["${A-x}", "${A:=x}", "${A?x}", "${ A }", "${}", "${A", "${A:+x}"])
def test_unsupported_reference_is_an_error_not_literal_text(reference: str) -> None:
    """Any ${...} form but ${VAR}, ${VAR:-d}, ${VAR:?m} is refused, never passed through."""
    with pytest.raises(ConfigError, match="not a supported reference"):
        expand_variables(f'x = "{reference}"\n', {"A": "1"})


def test_required_variable_from_the_cli(write_config: Callable[[str], Path]) -> None:
    """`memagent check` on ${MEMAGENT_HOST_T:?...} unset: exit 2 and one line with the message."""
    config = write_config('[agent]\nhostname = "${MEMAGENT_HOST_T:?must be set}"\n'
                          '[[targets]]\nname = "me"\nself = true\n')
    result = run_cli("check", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "memagent: error: line 2: ${MEMAGENT_HOST_T} is not set: must be set"]

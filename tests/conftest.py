"""Shared fixtures: schema validation of records, config files in tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from memagent import record_types

import attacker


def pytest_report_header() -> str:
    """The deadline factor in force (MEMAGENT_TEST_TIMEOUT_FACTOR), next to pytest's own header."""
    from cli_helpers import TIMEOUT_FACTOR

    return f"memagent: every test deadline x{TIMEOUT_FACTOR:g} (MEMAGENT_TEST_TIMEOUT_FACTOR)"


@pytest.fixture(scope="session")
def record_schema() -> dict[str, Any]:
    """The JSON Schema the agent ships (assembled from the record-type registry), as
    ``memagent schema`` prints it."""
    return record_types.record_schema()


@pytest.fixture(scope="session")
def validate_record(record_schema: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Raises jsonschema.ValidationError for a record that does not follow the shipped schema."""
    validator = jsonschema.Draft202012Validator(record_schema)
    return validator.validate


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Writes TOML text to a fresh file and returns its path."""
    counter = iter(range(1_000_000))

    def write(text: str) -> Path:
        path = tmp_path / f"config-{next(counter)}.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def attacker_dir() -> Iterator[Path]:
    """A directory the unprivileged attacker (uid 65534) may write: see tests/attacker.py."""
    yield from attacker.writable_dir()

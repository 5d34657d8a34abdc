"""Plugin loading: what a plugin class must have comes from the contracts' Protocols."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import ClassVar

import pytest

from memagent.contracts import Backend, Sink, protocol_members
from memagent.errors import PluginLoadError
from memagent.registry import REQUIRED, PluginSpec, load
from memagent.testing import FakeBackend, RecordingSink


class SinkWithoutWrite:
    """Everything a sink needs but ``write``."""

    name: ClassVar[str] = "nowrite"
    sample_config: ClassVar[str] = ""

    @classmethod
    def from_options(cls, options: object, context: object) -> SinkWithoutWrite:
        return cls()

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def spec(kind: str, attr: str) -> PluginSpec:
    value = f"{__name__}:{attr}"
    entry_point = EntryPoint(attr, value, f"memagent.{kind}s")
    return PluginSpec(kind, attr, value, "test-dist", "0", entry_point)  # type: ignore[arg-type]


def test_required_members_are_the_protocols() -> None:
    """The loader asks for exactly what Backend and Sink declare, no hand-kept list."""
    assert REQUIRED["sink"] == protocol_members(Sink)
    assert set(REQUIRED["sink"]) == {"name", "sample_config", "from_options", "start", "write", "close"}
    assert set(REQUIRED["backend"]) >= {"name", "os", "available", "list_processes", "sample", "forget"}
    assert REQUIRED["backend"] == protocol_members(Backend)


def test_a_sink_lacking_a_contract_method_is_a_load_error_naming_it() -> None:
    """A sink class without write(): PluginLoadError naming the plugin, its distribution and
    what it lacks."""
    with pytest.raises(PluginLoadError, match=r"'SinkWithoutWrite' \(from test-dist\):.* lacks write"):
        load(spec("sink", "SinkWithoutWrite"))


def test_complete_plugins_load() -> None:
    """The testing fakes satisfy the contracts (so plugin authors can trust them)."""
    assert load(spec("sink", "RecordingSink")) is RecordingSink
    assert load(spec("backend", "FakeBackend")) is FakeBackend

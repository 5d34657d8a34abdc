"""Typed reading of one config table, with errors that name the dotted key.

:class:`Options` is the one way memagent and its plugins read a table of options::

    opts = Options(raw, "sinks[2]")
    path = opts.string("path", required=True)
    size = opts.size("rotate_size", default=None)
    opts.finish()          # unknown keys -> "sinks[2].rotate_sise: unknown key; did you mean rotate_size?"

Every getter consumes its key; :meth:`Options.finish` raises for whatever is left.
Errors are :class:`~memagent.errors.ConfigError` with a one-line message.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from memagent.errors import ConfigError

_MISSING: Any = object()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def describe(value: object) -> str:
    """Render a config value the way the user wrote it, for error messages."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def parse_duration(value: object, key: str) -> float:
    """Seconds from a number or a string like ``"250ms"``, ``"1s"``, ``"5m"``; must be > 0."""
    problem = (f"must be a positive duration, got {describe(value)} "
               '(a number of seconds, or "250ms", "1s", "5m", "1h")')
    if isinstance(value, bool):
        raise ConfigError(key, problem)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ConfigError(key, problem)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(key, problem)
    return seconds


def parse_size(value: object, key: str) -> int:
    """Bytes from an int or a string like ``"100MB"`` (1000-based) or ``"64MiB"`` (1024-based)."""
    problem = f'must be a positive size (bytes, or like "100MB", "64MiB"), got {describe(value)}'
    if isinstance(value, bool):
        raise ConfigError(key, problem)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = (match.group(2) or "").lower().removesuffix("b")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ConfigError(key, problem)
    if size <= 0:
        raise ConfigError(key, problem)
    return size


def suggest(word: str, known: Iterable[str]) -> str:
    """``"; did you mean X?"`` when a known word is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_key_error(key: str, known: Iterable[str]) -> ConfigError:
    """The error for a key nobody reads, with a suggestion when one is close."""
    return ConfigError(key, "unknown key" + suggest(key.rsplit(".", 1)[-1], known))


class Options:
    """A config table read key by key; see the module docstring."""

    def __init__(self, raw: Mapping[str, Any], path: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(path, f"must be a table, got {describe(raw)}")
        self._raw = dict(raw)
        self._path = path
        self._known: set[str] = set()

    @property
    def path(self) -> str:
        """The dotted path of this table, e.g. ``sinks[2]``."""
        return self._path

    def key(self, name: str) -> str:
        """The dotted path of one key in this table."""
        return f"{self._path}.{name}" if self._path else name

    def _take(self, name: str, default: Any) -> tuple[Any, bool]:
        """(value, given): the user's value, or ``default`` when the key is absent."""
        self._known.add(name)
        if name in self._raw:
            return self._raw.pop(name), True
        if default is _MISSING:
            raise ConfigError(self.key(name), "is required")
        return default, False

    def _typed(self, name: str, default: Any, types: tuple[type, ...], what: str) -> Any:
        value, given = self._take(name, default)
        if not given:
            return value
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            raise ConfigError(self.key(name), f"must be {what}, got {describe(value)}")
        return value

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        """The value as parsed from TOML, unchecked."""
        return self._take(name, default)[0]

    def string(self, name: str, default: Any = _MISSING, *, nonempty: bool = False) -> Any:
        """A string (``default`` may be None)."""
        value = self._typed(name, default, (str,), "a string")
        if nonempty and isinstance(value, str) and not value.strip():
            raise ConfigError(self.key(name), "must not be empty")
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        """``true`` or ``false``."""
        return self._typed(name, default, (bool,), "true or false")

    def integer(self, name: str, default: Any = _MISSING, *, minimum: int | None = None,
                maximum: int | None = None) -> Any:
        """An integer, optionally bounded (inclusive)."""
        value = self._typed(name, default, (int,), "an integer")
        if isinstance(value, int):
            if minimum is not None and value < minimum:
                raise ConfigError(self.key(name), f"must be at least {minimum}, got {value}")
            if maximum is not None and value > maximum:
                raise ConfigError(self.key(name), f"must be at most {maximum}, got {value}")
        return value

    def duration(self, name: str, default: Any = _MISSING) -> Any:
        """Seconds (float) from a number or ``"250ms"``/``"1s"``/``"5m"``/``"1h"``."""
        value, given = self._take(name, default)
        return parse_duration(value, self.key(name)) if given else value

    def size(self, name: str, default: Any = _MISSING) -> Any:
        """Bytes from an integer or ``"100MB"``/``"64MiB"``."""
        value, given = self._take(name, default)
        return parse_size(value, self.key(name)) if given else value

    def choice(self, name: str, choices: Iterable[str], default: Any = _MISSING) -> Any:
        """One of ``choices``."""
        allowed = list(choices)
        value, given = self._take(name, default)
        if given and value not in allowed:
            listed = ", ".join(f'"{c}"' for c in allowed)
            raise ConfigError(self.key(name), f"must be one of {listed}, got {describe(value)}")
        return value

    def string_list(self, name: str, default: Any = _MISSING) -> Any:
        """An array of strings; a single string is taken as a one-item array."""
        value, given = self._take(name, default)
        if not given:
            return value
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(self.key(name), f"must be an array of strings, got {describe(value)}")
        return list(value)

    def table(self, name: str, default: Any = _MISSING) -> Any:
        """A sub-table, as a plain dict (validate it with another :class:`Options`)."""
        return self._typed(name, default, (dict,), "a table")

    def rest(self) -> dict[str, Any]:
        """Everything not read yet (consumes it: :meth:`finish` will then pass)."""
        rest, self._raw = self._raw, {}
        return rest

    def finish(self) -> None:
        """Raise for the first key nobody read."""
        for name in sorted(self._raw):
            raise unknown_key_error(self.key(name), self._known)

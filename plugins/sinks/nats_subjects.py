"""NATS subjects for records: a template, its validation, and the tokens records fill it with.

A template such as ``memagent.{host}.{target}.{type}`` names the subject each record is published
to. Its placeholders are ``{host}``, ``{target}``, ``{type}`` and ``{run}``, filled from the
record itself (so a relay forwarding another host's records keeps that host in the subject).
What a placeholder receives is *sanitized* into a safe part of one token: everything but ASCII
letters, digits and ``-_:@/+=~%`` becomes ``_`` — above all ``.`` (the token separator), ``*`` and
``>`` (wildcards), whitespace and control characters; an empty value becomes ``_``. So a host
named ``web-1.example.com`` publishes under ``memagent.web-1_example_com....`` and no target name
can add tokens or a wildcard to a subject. Records without a target (``agent`` records) fill
``{target}`` with :data:`NO_TARGET`.

:func:`subject_matches` tells whether a subject falls under a filter with wildcards (``*`` one
token, ``>`` the rest), as the server matches a stream's subjects: the sink uses it to warn at
start when its subjects are not captured by the stream it publishes to.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from memagent.errors import ConfigError

DEFAULT_TEMPLATE = "memagent.{host}.{target}.{type}"
PLACEHOLDERS = ("host", "target", "type", "run")
#: The ``{target}`` token of records that have no target (``agent`` records).
NO_TARGET = "_"
#: Characters kept as they are in a token; everything else becomes ``_``.
_SAFE = frozenset(string.ascii_letters + string.digits + "-_:@/+=~%")
_SUBJECT_TOKEN = re.compile(r"^[^\s.*>]+$|^\*$|^>$")
#: Most distinct subjects remembered (hosts x targets x types): past it the cache starts over.
CACHE_LIMIT = 4096


def sanitize(value: object) -> str:
    """``value`` as a safe part of one subject token (see the module docstring)."""
    text = "" if value is None else str(value)
    cleaned = "".join(c if c in _SAFE else "_" for c in text[:256])
    return cleaned or "_"


def _check_literal(template: str, key: str) -> None:
    """The template with each placeholder replaced by ``x`` must be a subject one may publish
    to: tokens separated by single dots, no whitespace, no wildcards, not ``$``-prefixed (the
    server's own ``$JS``, ``$SYS``)."""
    sample = template
    for name in PLACEHOLDERS:
        sample = sample.replace("{" + name + "}", "x")
    problem = None
    if sample.startswith("$"):
        problem = "must not start with $ (the server's own subjects: $JS, $SYS)"
    elif any(c.isspace() for c in sample):
        problem = "must not contain whitespace"
    elif "*" in sample or ">" in sample:
        problem = "must not contain wildcards (* or >): records are published to one subject each"
    elif any(not token for token in sample.split(".")):
        problem = "must not have empty tokens (a leading, trailing or doubled dot)"
    elif "{" in sample or "}" in sample:
        problem = "has an unknown placeholder; use " + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    if problem:
        raise ConfigError(key, f"{problem}, got {template!r}")


class SubjectTemplate:
    """A validated subject template; :meth:`render` gives a record's subject."""

    def __init__(self, template: str, key: str = "subject") -> None:
        _check_literal(template, key)
        self.template = template
        self._cache: dict[tuple[Any, ...], str] = {}

    def render(self, fields: Mapping[str, Any]) -> str:
        """The subject of a record (its fields), every placeholder sanitized; remembered per
        (host, target, type, run)."""
        target = fields.get("target")
        key = (fields.get("host"), target, fields.get("type"), fields.get("run"))
        subject = self._cache.get(key)
        if subject is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            values = {"host": sanitize(key[0]), "target": NO_TARGET if target is None else sanitize(target),
                      "type": sanitize(key[2]), "run": sanitize(key[3])}
            subject = self.template
            for name, value in values.items():
                subject = subject.replace("{" + name + "}", value)
            self._cache[key] = subject
        return subject

    def example(self, host: str, run: str) -> str:
        """The subject a ``sample`` record of a target ``example`` would get on this host."""
        return self.render({"host": host, "target": "example", "type": "sample", "run": run})

    def filter(self) -> str:
        """The template as a subscription filter: each token holding a placeholder becomes ``*``
        (``memagent.{host}.{target}.{type}`` → ``memagent.*.*.*``): what a stream must capture."""
        return ".".join("*" if "{" in token else token for token in self.template.split("."))


def valid_filter(subject: str) -> bool:
    """Whether ``subject`` is a valid subscription filter (wildcards allowed as whole tokens,
    ``>`` only last)."""
    tokens = subject.split(".")
    if not all(_SUBJECT_TOKEN.match(token) for token in tokens):
        return False
    return ">" not in tokens[:-1]


def subject_matches(filter_subject: str, subject: str) -> bool:
    """Whether ``subject`` (no wildcards) falls under ``filter_subject`` (``*`` matches one
    token, a final ``>`` one or more)."""
    wanted = filter_subject.split(".")
    tokens = subject.split(".")
    for index, part in enumerate(wanted):
        if part == ">":
            return len(tokens) > index
        if index >= len(tokens) or (part != "*" and part != tokens[index]):
            return False
    return len(tokens) == len(wanted)

"""The JetStream stream the ``nats`` sink publishes to: its name, what ``create_stream`` creates,
and the check made once connected.

:class:`StreamOptions` reads ``stream`` and, with ``create_stream = true``, the new stream's
``stream_subjects``, ``retention``, ``max_age`` (``0``: no limit), ``max_bytes``, ``replicas``,
``storage`` and ``duplicate_window`` (those keys without ``create_stream`` are errors: an existing
stream keeps its own configuration). :meth:`StreamOptions.ensure` runs once connected:

- the stream exists: its configuration is kept, whatever the options say;
- it does not: created when ``create_stream = true`` (several agents may race to create it: the
  loser takes the winner's stream), else one warning — publishes fail and are retried until
  someone creates it;
- one line says what exactly-once rests on: the stream's **duplicate window** (a publish repeated
  within it with the same ``Nats-Msg-Id`` is dropped by the server) — a warning when it is shorter
  than :data:`MIN_DUPLICATE_WINDOW`, or when the stream does not capture the sink's subjects.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig, StreamInfo

from memagent.errors import ConfigError
from memagent.options import Options, parse_duration
from memagent.plugins.sinks.nats_subjects import subject_matches, valid_filter

#: A stream name as the server accepts it (no whitespace, ``.``, wildcards or path separators).
STREAM_NAME = re.compile(r"^[^\s.*>/\\]{1,255}$")
#: The server's default duplicate window, and the shortest the sink does not warn about: a batch
#: is retried for as long as an outage lasts, the framework's backoff alone reaching 30 s.
DEFAULT_DUPLICATE_WINDOW = 120.0
MIN_DUPLICATE_WINDOW = 60.0
CREATE_KEYS = ("stream_subjects", "retention", "max_age", "max_bytes", "replicas", "storage",
               "duplicate_window")


def default_subjects(template_filter: str) -> str:
    """The subjects a created stream captures by default: the template's literal first tokens and
    ``>`` (``memagent.*.*.*`` → ``memagent.>``), or the template's filter itself."""
    tokens = template_filter.split(".")
    literal = []
    for token in tokens:
        if token == "*":
            break
        literal.append(token)
    return ".".join([*literal, ">"]) if literal else template_filter


@dataclass(frozen=True)
class StreamOptions:
    """The stream to publish to and, with ``create``, how to create it."""

    name: str
    create: bool = False
    subjects: tuple[str, ...] = ()
    retention: str = "limits"
    max_age: float | None = 7 * 86400.0
    max_bytes: int | None = None
    replicas: int = 1
    storage: str = "file"
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW

    @classmethod
    def read(cls, options: Options, template_filter: str) -> StreamOptions | None:
        """None without ``stream`` (core NATS); ConfigError for a bad name or a creation key given
        without ``create_stream = true``."""
        name = options.string("stream", None, nonempty=True)
        create = options.boolean("create_stream", False)
        given = {key: value for key in CREATE_KEYS if (value := options.raw(key, None)) is not None}
        if name is None:
            if create or given:
                raise ConfigError(options.key("create_stream" if create else next(iter(given))),
                                  "needs stream (the JetStream stream to publish to)")
            return None
        if not STREAM_NAME.match(name):
            raise ConfigError(options.key("stream"), "must be a stream name: no spaces, dots, wildcards "
                                                     f"(* >) or slashes, got {name!r}")
        if not create:
            if given:
                first = options.key(next(iter(given)))
                raise ConfigError(first, "only with create_stream = true (an existing stream keeps its own "
                                         "settings)")
            return cls(name)
        creation = Options(given, options.path)
        subjects = tuple(creation.string_list("stream_subjects", [default_subjects(template_filter)]))
        for subject in subjects:
            if not valid_filter(subject):
                raise ConfigError(options.key("stream_subjects"), f"{subject!r} is not a subject filter")
        if not any(subject_matches(s, template_filter.replace("*", "x")) for s in subjects):
            raise ConfigError(options.key("stream_subjects"), f"{', '.join(subjects)} would not capture "
                                                              f"the sink's subjects ({template_filter})")
        max_age = creation.raw("max_age", "7d")
        stream = cls(
            name=name, create=True, subjects=subjects,
            retention=creation.choice("retention", ("limits", "interest", "workqueue"), "limits"),
            max_age=None if max_age == 0 else parse_duration(max_age, options.key("max_age")),
            max_bytes=creation.size("max_bytes", None),
            replicas=creation.integer("replicas", 1, minimum=1, maximum=5),
            storage=creation.choice("storage", ("file", "memory"), "file"),
            duplicate_window=creation.duration("duplicate_window", DEFAULT_DUPLICATE_WINDOW),
        )
        creation.finish()
        return stream

    def config(self) -> StreamConfig:
        """What ``create_stream`` asks the server for."""
        return StreamConfig(
            name=self.name, subjects=list(self.subjects), retention=RetentionPolicy(self.retention),
            max_age=self.max_age, max_bytes=self.max_bytes if self.max_bytes is not None else -1,
            num_replicas=self.replicas, storage=StorageType(self.storage),
            duplicate_window=self.duplicate_window)

    async def ensure(self, js: JetStreamContext, example_subject: str,
                     log: logging.Logger) -> StreamInfo | None:
        """Look the stream up (create it if asked) and say what exactly-once rests on; None if it
        does not exist. Raises nats errors (a timeout, no JetStream) for the caller to retry."""
        try:
            info = await js.stream_info(self.name)
        except nats.js.errors.NotFoundError:
            if not self.create:
                log.warning("stream %s does not exist: publishes fail and are retried (records wait in the "
                            "queue) until it does; create it, or set create_stream = true", self.name)
                return None
            try:
                info = await js.add_stream(self.config())
                log.info("created stream %s: subjects %s, %s retention, %d replica(s), %s storage",
                         self.name, ", ".join(self.subjects), self.retention, self.replicas, self.storage)
            except nats.js.errors.BadRequestError as refused:  # another agent created it first, or...
                try:
                    info = await js.stream_info(self.name)
                except nats.js.errors.NotFoundError:  # ... the server refuses it (overlapping subjects)
                    log.warning("cannot create stream %s: %s; publishes fail and are retried until it "
                                "exists", self.name, refused.description or refused)
                    return None
        subjects = info.config.subjects or []
        window = info.config.duplicate_window or DEFAULT_DUPLICATE_WINDOW
        if not any(subject_matches(s, example_subject) for s in subjects):
            log.warning("stream %s captures %s, not this sink's subjects (%s): publishes fail and are "
                        "retried", self.name, ", ".join(subjects) or "nothing", example_subject)
        if window < MIN_DUPLICATE_WINDOW:
            log.warning("stream %s has a duplicate window of %gs: a batch retried later than that after an "
                        "outage may be stored twice; raise duplicate_window (at least the longest outage to "
                        "ride out)", self.name, window)
        else:
            log.info("stream %s: a retried publish is dropped as a duplicate within %gs of the first "
                     "(Nats-Msg-Id = run:seq): exactly once across outages shorter than that",
                     self.name, window)
        return info


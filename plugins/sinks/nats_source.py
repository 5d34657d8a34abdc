"""The relay's reader (``memagent relay``): records out of NATS, as :class:`~memagent.contracts.Record`
objects the usual sinks take unchanged.

The ``[relay]`` table names the connection (:mod:`.nats_connection`: ``servers``, credentials,
TLS) and where to read:

- ``stream = "MEMAGENT"`` (JetStream; ``subject`` then filters within it): a pull consumer,
  ``consumer = "name"`` for a durable one (the server remembers how far it got, across restarts of
  the relay and of the server), else an ephemeral one. ``start`` says where a new consumer begins:
  ``"new"`` (default), ``"all"``, ``"last_per_subject"`` (the latest record of every subject), a
  stream sequence number, or a duration (``"15m"``: what the stream holds from 15 minutes ago).
  A durable consumer that exists already resumes where it stopped, whatever ``start`` says.
- ``subject = "memagent.>"`` without a stream (core NATS): live only; a relay that cannot keep up
  drops the oldest past ``queue`` records (counted in ``dropped``).

**Records are not re-sequenced**: each keeps its bytes and its ``host``, ``run`` and ``seq``, so
loss stays detectable per host. What changes is the *feed's* position, :attr:`Record.seq`: the
JetStream stream sequence (global, and it survives restarts of the relay and of the server), or
in core NATS a count of this relay's records. The sinks are given a :attr:`NatsSource.feed` id
as their ``run``: for a stream, a digest of its name and creation time, so the WebSocket sink's
resume cursor ``?since=<feed>:<stream seq>`` stays valid across relay restarts and becomes
another run only if the stream is re-created; in core NATS a new id per relay run.

Messages are input from anyone allowed to publish there: a message that is not a schema record
(a JSON object with a string ``type``, ``host`` and ``run`` and an integer ``seq``) is skipped and
counted (``malformed``), with one warning per minute at most. A record's bytes are passed on as
they came, unless they hold a line break (JSON allows one between tokens): then re-encoded, so a
message can never become two lines of an NDJSON file.

Reading survives everything the server does: a lost connection (reconnected forever, one line
per outage), a server restart, a consumer deleted or expired (an ephemeral one is re-created
from the stream sequence after the last record relayed, a durable one re-bound), a stream that
does not exist yet (waited for). A message delivered twice (a redelivery after a reconnect) is
relayed once: anything at or below the last stream sequence relayed is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from memagent.bounded import BoundedQueue
from memagent.contracts import Record, declare_counters
from memagent.errors import ConfigError
from memagent.options import Options, parse_duration
from memagent.plugins.sinks.nats_connection import Connection, ConnectionOptions
from memagent.plugins.sinks.nats_stream import STREAM_NAME
from memagent.plugins.sinks.nats_subjects import valid_filter

FETCH_WAIT = 2.0  # seconds a pull waits for records before asking again (and checking the consumer)
RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # seconds between attempts to (re)create the consumer
INACTIVE_THRESHOLD = 60.0  # an ephemeral consumer nobody pulls from is deleted by the server after this
ACK_WAIT = 10.0  # a durable consumer redelivers what was not acknowledged after this
MALFORMED_EVERY = 60.0  # seconds between two warnings about malformed messages
STARTS = ("new", "all", "last_per_subject")


def _consumer_start(value: object, key: str) -> dict[str, Any]:
    """ConsumerConfig fields for ``start``."""
    if value == "new":
        return {"deliver_policy": DeliverPolicy.NEW}
    if value == "all":
        return {"deliver_policy": DeliverPolicy.ALL}
    if value == "last_per_subject":
        return {"deliver_policy": DeliverPolicy.LAST_PER_SUBJECT}
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(key, f"a stream sequence starts at 1, got {value}")
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": value}
    try:
        ago = parse_duration(value, key)
    except ConfigError:
        raise ConfigError(key, 'must be "new", "all", "last_per_subject", a stream sequence number or a '
                               f'duration ago like "15m", got {value!r}') from None
    since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=ago)
    return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": since}


def feed_id(stream: str, created: datetime.datetime | None) -> str:
    """16 hex digits naming one incarnation of a stream (see the module docstring)."""
    stamp = created.isoformat() if created is not None else ""
    return hashlib.sha256(f"{stream}\0{stamp}".encode()).hexdigest()[:16]


def decode(data: bytes, seq: int) -> Record | None:
    """The record a message carries, at feed position ``seq``; None if it is not one."""
    try:
        fields = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(fields, dict):
        return None
    kind, target, pid = fields.get("type"), fields.get("target"), fields.get("pid")
    record_seq = fields.get("seq")
    named = isinstance(fields.get("host"), str) and isinstance(fields.get("run"), str)
    numbered = isinstance(record_seq, int) and not isinstance(record_seq, bool)
    if not (named and numbered and isinstance(kind, str)):
        return None
    if target is not None and not isinstance(target, str):
        return None
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
        return None
    if b"\n" in data or b"\r" in data:  # whitespace between tokens: one line again
        data = orjson.dumps(fields)
    return Record(seq, kind, target, pid, fields, data)


class NatsSource:
    """Reads records from a JetStream stream or a core NATS subject. See the module docstring."""

    name: ClassVar[str] = "nats"

    def __init__(self, *, connection: ConnectionOptions, log: logging.Logger, stream: str | None,
                 subject: str | None, consumer: str | None, start: dict[str, Any], start_text: str,
                 fetch: int = 256, queue: int = 10_000) -> None:
        self.options, self.log = connection, log
        self.stream, self.subject, self.consumer = stream, subject, consumer  # what to read
        self.start_fields, self.start_text = start, start_text  # where to begin
        self.fetch = fetch
        self.counters: dict[str, int] = {}
        declare_counters(self.counters, "relayed", "malformed", "redelivered", "consumers_created",
                         *(("dropped",) if stream is None else ()))
        self.feed = ""
        self.first_seq: int | None = None
        self.last_seq = 0  # the feed position of the last record handed on
        self.connection: Connection | None = None
        self._js: JetStreamContext | None = None
        self._pull: JetStreamContext.PullSubscription | None = None
        self._consumer_name: str | None = None
        self._ack_policy = AckPolicy.NONE
        self._unacked: list[Msg] = []
        self._core: Subscription | None = None
        self._inbox: BoundedQueue[Msg] = BoundedQueue(queue)
        self._arrived = asyncio.Event()
        self._malformed_at = -MALFORMED_EVERY

    @classmethod
    def from_options(cls, options: Options, log: logging.Logger, *, hostname: str) -> NatsSource:
        """Validate the ``[relay]`` table's NATS keys (``options.finish()`` included)."""
        stream = options.string("stream", None, nonempty=True)
        subject = options.string("subject", None, nonempty=True)
        consumer = options.string("consumer", None, nonempty=True)
        start_raw = options.raw("start", None)
        fetch = options.integer("fetch", 256, minimum=1, maximum=10_000)
        queue = options.integer("queue", None, minimum=1)
        if stream is not None and not STREAM_NAME.match(stream):
            raise ConfigError(options.key("stream"), f"must be a stream name (no spaces, dots, * > or "
                                                     f"slashes), got {stream!r}")
        if stream is None and subject is None:
            raise ConfigError(options.path, "needs stream (a JetStream stream) or subject (core NATS)")
        if subject is not None and not valid_filter(subject):
            raise ConfigError(options.key("subject"), f"not a valid subject filter: {subject!r}")
        if consumer is not None and not STREAM_NAME.match(consumer):
            raise ConfigError(options.key("consumer"), f"must be a consumer name (no spaces, dots, * > or "
                                                       f"slashes), got {consumer!r}")
        if stream is None and (consumer is not None or start_raw is not None):
            raise ConfigError(options.key("consumer" if consumer is not None else "start"),
                              "only with stream (core NATS has no history)")
        if stream is not None and queue is not None:
            raise ConfigError(options.key("queue"), "only without stream (core NATS: what the relay holds "
                                                    "while its sinks catch up; a stream holds it itself)")
        start = _consumer_start(start_raw if start_raw is not None else "new", options.key("start"))
        connection = ConnectionOptions.read(options, name=f"memagent relay {hostname}")
        options.finish()
        for warning in connection.exposure():
            log.warning("SECURITY: %s: %s", options.path, warning)
        return cls(connection=connection, log=log, stream=stream, subject=subject, consumer=consumer,
                   start=start, start_text=str(start_raw if start_raw is not None else "new"),
                   fetch=fetch, queue=queue or 10_000)

    def describe(self) -> str:
        """Where records come from, for log lines."""
        if self.stream is None:
            return f"subject {self.subject} (core NATS) on {self.options.describe()}"
        what = f"stream {self.stream}" + (f", subject {self.subject}" if self.subject else "")
        who = f"durable consumer {self.consumer}" if self.consumer else "an ephemeral consumer"
        return f"{what} ({who}, start {self.start_text}) on {self.options.describe()}"

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and find the stream, for as long as it takes (cancel to give up); then
        :attr:`feed` is known."""
        consequence = ("the relay goes on from the last record it relayed once it is back" if self.stream
                       else "core NATS: records published meanwhile are not seen by the relay")
        self.connection = Connection(self.options, self.log, consequence=consequence, counters=self.counters)
        await self.connection.start()
        if self.stream is None:
            self.feed = secrets.token_hex(8)
            while not await self.connection.wait_up(FETCH_WAIT):
                pass
            self._core = await self.connection.client.subscribe(self.subject or ">", cb=self._on_core)
            return
        delay = RETRY_FIRST
        warned = False
        while True:
            await self._wait_up()
            self._js = self.connection.client.jetstream(timeout=self.options.connect_timeout)
            try:
                info = await self._js.stream_info(self.stream)
                break
            except nats.js.errors.NotFoundError:
                if not warned:
                    warned = True
                    self.log.warning("stream %s does not exist (yet); waiting for it", self.stream)
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                self.log.debug("stream %s: %s", self.stream, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        self.feed = feed_id(self.stream, info.created)
        self.log.info("stream %s holds %d records (stream seq %d-%d); the feed is %s", self.stream,
                      info.state.messages, info.state.first_seq, info.state.last_seq, self.feed)

    async def close(self) -> None:
        if self.connection is not None:
            if self._js is not None and self._consumer_name and self.consumer is None:
                # an ephemeral consumer would otherwise linger until INACTIVE_THRESHOLD
                with contextlib.suppress(nats.errors.Error, OSError, TimeoutError, ValueError):
                    deleting = self._js.delete_consumer(self.stream or "", self._consumer_name)
                    await asyncio.wait_for(deleting, 1.0)
            await self.connection.close()

    async def _wait_up(self) -> None:
        assert self.connection is not None
        while not await self.connection.wait_up(FETCH_WAIT):
            pass

    # -- reading -------------------------------------------------------------------------------------

    async def next_batch(self) -> list[Record]:
        """The next records (at least one, at most ``fetch``), waiting as long as it takes."""
        if self.stream is None:
            return await self._next_core()
        while True:
            messages = await self._pull_messages()
            records = self._records(messages)
            if records:
                return records

    async def processed(self) -> None:
        """The last batch is queued to every sink: acknowledge it (a durable consumer)."""
        unacked, self._unacked = self._unacked, []
        if not unacked or self._ack_policy == AckPolicy.NONE:
            return
        try:
            if self._ack_policy == AckPolicy.ALL:
                await unacked[-1].ack()
            else:
                for message in unacked:
                    await message.ack()
        except (nats.errors.Error, OSError) as exc:  # redelivered later, skipped as already relayed
            self.log.debug("ack failed: %s", exc)

    def _records(self, messages: Sequence[Msg]) -> list[Record]:
        records = []
        for message in messages:
            seq = message.metadata.sequence.stream if self.stream is not None else self.last_seq + 1
            if seq <= self.last_seq:
                self.counters["redelivered"] += 1
                continue
            self._unacked.append(message)
            self.last_seq = seq
            record = decode(message.data, seq)
            if record is None:
                self._malformed(message)
                continue
            if self.first_seq is None:
                self.first_seq = seq
            records.append(record)
        self.counters["relayed"] += len(records)
        return records

    def _malformed(self, message: Msg) -> None:
        self.counters["malformed"] += 1
        now = time.monotonic()
        if now - self._malformed_at >= MALFORMED_EVERY:
            self._malformed_at = now
            self.log.warning("skipped a message on %s that is not a memagent record (%d bytes); %d so far, "
                             "counted in malformed (logged at most once a minute)", message.subject[:200],
                             len(message.data), self.counters["malformed"])

    async def _pull_messages(self) -> list[Msg]:
        if self._pull is None:
            await self._subscribe()
        assert self._pull is not None
        try:
            return await self._pull.fetch(self.fetch, timeout=FETCH_WAIT)
        except nats.errors.TimeoutError:
            await self._check_consumer()
        except nats.js.errors.NotFoundError:
            self._lost_consumer("it was deleted")
        except (nats.errors.Error, OSError) as exc:
            self.log.debug("fetch: %s", exc)
            await self._wait_up()
        return []

    async def _check_consumer(self) -> None:
        """Nothing came: make sure the consumer still exists (a server restart or an outage longer
        than its inactive threshold removes an ephemeral one)."""
        assert self._js is not None and self._pull is not None and self.stream is not None
        if self.connection is None or not self.connection.up:
            await self._wait_up()
            return
        try:
            await self._pull.consumer_info()
        except nats.js.errors.NotFoundError:
            self._lost_consumer("the server no longer has it")
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            self.log.debug("consumer info: %s", exc)

    def _lost_consumer(self, why: str) -> None:
        self.log.warning("the consumer of stream %s is gone (%s); creating it again from stream seq %d",
                         self.stream, why, self.last_seq + 1)
        self._pull = None

    async def _subscribe(self) -> None:
        """(Re)create or bind the consumer, for as long as it takes."""
        assert self.stream is not None
        delay = RETRY_FIRST
        while True:
            await self._wait_up()
            assert self._js is not None
            try:
                self._pull = await self._bind()
                return
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                self.log.debug("consumer of stream %s: %s; retrying in %gs", self.stream, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _bind(self) -> JetStreamContext.PullSubscription:
        assert self._js is not None and self.stream is not None
        if self.consumer is not None:
            try:
                info = await self._js.consumer_info(self.stream, self.consumer)
                self._ack_policy = info.config.ack_policy or AckPolicy.EXPLICIT
                self.log.info("durable consumer %s of stream %s: going on where it stopped (%d records "
                              "pending)", self.consumer, self.stream, info.num_pending or 0)
                return await self._js.pull_subscribe_bind(consumer=self.consumer, stream=self.stream)
            except nats.js.errors.NotFoundError:
                pass
        start = self.start_fields
        if self.last_seq:  # re-created: go on after the last record relayed
            start = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": self.last_seq + 1}
        config = ConsumerConfig(**start, filter_subject=self.subject)
        if self.consumer is not None:
            config.durable_name = config.name = self.consumer
            config.ack_policy, config.ack_wait = AckPolicy.ALL, ACK_WAIT
        else:
            config.name = f"memagent-relay-{secrets.token_hex(8)}"
            config.ack_policy, config.inactive_threshold = AckPolicy.NONE, INACTIVE_THRESHOLD
        info = await self._js.add_consumer(self.stream, config)
        self._consumer_name = info.name
        self._ack_policy = config.ack_policy
        self.counters["consumers_created"] += 1
        self.log.info("consumer %s of stream %s created (%s)", info.name, self.stream,
                      f"from stream seq {self.last_seq + 1}" if self.last_seq else f"start {self.start_text}")
        return await self._js.pull_subscribe_bind(consumer=info.name, stream=self.stream)

    # -- core NATS -----------------------------------------------------------------------------------

    async def _on_core(self, message: Msg) -> None:
        dropped = self._inbox.push(message)
        if dropped:
            self.counters["dropped"] += dropped
        self._arrived.set()

    async def _next_core(self) -> list[Record]:
        while True:
            while not self._inbox:
                self._arrived.clear()
                await self._arrived.wait()
            records = self._records(self._inbox.take(self.fetch))
            self._unacked.clear()
            if records:
                return records

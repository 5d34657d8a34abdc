"""The ``nats`` sink: records published to NATS, acknowledged and deduplicated by JetStream, or
fire-and-forget on core NATS; the fleet's records in one place.

Each record goes to the subject its template names (:mod:`.nats_subjects`; default
``memagent.{host}.{target}.{type}``) as the same JSON bytes every other sink sends. The connection
— servers, credentials, TLS, reconnecting forever with backoff, one log line per outage — is
:mod:`.nats_connection`; the stream and ``create_stream``, :mod:`.nats_stream`.

**JetStream** (``stream`` named): every record is published with the header
``Nats-Msg-Id: <run>:<seq>`` (the record's own, so a relay forwarding records keeps their ids),
and the server drops a publish whose id it stored within the stream's duplicate window. A batch
is pipelined — at most ``max_inflight`` publishes await their acknowledgement at once, never one
round trip per record — and is done only when every record's ack came back. A missing ack after
``ack_timeout``, an error ack, or a lost connection is a :class:`~memagent.errors.SinkError`: the
framework retries the same batch with its backoff (records behind it wait in the queue under its
``when_full`` policy, drops counted); the retry sends only the records not acknowledged yet, and
those the server did store before their ack was lost are dropped by it as duplicates (counted in
``duplicates``). So every record is stored once, provided a retry comes within the duplicate
window of the first attempt: the window must outlast the outages to ride out (the sink says the
window at start, and warns when it is under a minute). While disconnected, a write waits up to
``ack_timeout`` for the connection before it fails, so a reconnect is used at once.

**Core NATS** (no ``stream``): fire-and-forget, for live views. Nothing is acknowledged, so
records the server had not received when a connection broke are lost unseen; a batch made while
disconnected is dropped at once — :class:`~memagent.errors.SinkRejected`, counted by the
framework (``rejected``, ``dropped``) and here (``disconnected_drops``) — rather than queued:
live consumers want now, not a backlog.

A record larger than the server's ``max_payload`` (1 MiB by default) can never be published: it
is left out of its batch, counted (``too_large``) and logged once per episode; the rest goes.

Not guaranteed: exactly-once beyond the duplicate window (an outage longer than it, with an ack
lost at its start, stores that record twice); order across subjects as consumers see them
(records of one agent are published, and stored, in ``seq`` order).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

from memagent.contracts import Record, SinkContext, declare_counters
from memagent.errors import ConfigError, SinkError, SinkRejected
from memagent.options import Options
from memagent.plugins.sinks.nats_subjects import DEFAULT_TEMPLATE, SubjectTemplate

try:
    import nats.errors
    import nats.js.errors
    from nats.js import JetStreamContext
    from nats.js.api import PubAck

    from memagent.plugins.sinks.nats_connection import Connection, ConnectionOptions
    from memagent.plugins.sinks.nats_source import NatsSource
    from memagent.plugins.sinks.nats_stream import StreamOptions
except ImportError as exc:  # nats-py is the optional extra memagent[nats]
    if (exc.name or "").partition(".")[0] != "nats":
        raise
    raise ImportError(f"the nats sink needs nats-py, which is not installed here ({exc}): "
                      "install memagent[nats] (pip install 'memagent[nats]')") from exc

MSG_ID = "Nats-Msg-Id"


class NatsSink:
    """Publishes records to NATS. See the module docstring."""

    name: ClassVar[str] = "nats"
    #: The relay's reader (``memagent relay``): found through this sink's entry point, so the
    #: relay loads NATS support exactly as a config naming the sink does.
    source: ClassVar[type[NatsSource]] = NatsSource
    sample_config: ClassVar[str] = """\
[[sinks]]
type = "nats"
servers = ["nats://127.0.0.1:4222"]   # one or more; a cluster's other nodes are learnt from the server
subject = "memagent.{host}.{target}.{type}"   # also {run}; each value sanitized to one token
stream = "MEMAGENT"         # JetStream: acked, deduplicated (Nats-Msg-Id = run:seq); omit for core NATS
# ack_timeout = "5s"        # (JetStream) a batch not fully acknowledged by then is retried
# max_inflight = 256        # (JetStream) publishes awaiting their ack at once
# create_stream = false     # (JetStream) create the stream if missing, with:
# stream_subjects = ["memagent.>"]
# retention = "limits"      # or "interest", "workqueue"
# max_age = "7d"            # 0: no limit
# max_bytes = "10GB"
# replicas = 1              # 3 on a 3-node cluster
# storage = "file"          # or "memory"
# duplicate_window = "2m"   # exactly-once across outages shorter than this
# token = "${NATS_TOKEN}"   # or user + password, or nkey (a seed file), or creds (a .creds file)
# ca_file = "/etc/memagent/nats-ca.pem"   # TLS (also with tls:// servers); client_cert + client_key for mTLS
# reconnect_wait = "1s"     # backoff after every server was tried once, doubling to:
# reconnect_wait_max = "30s"
"""

    def __init__(self, *, context: SinkContext, connection: ConnectionOptions, template: SubjectTemplate,
                 stream: StreamOptions | None = None, ack_timeout: float = 5.0,
                 max_inflight: int = 256) -> None:
        self.context, self.log, self.counters = context, context.log, context.counters
        self.connection_options, self.template, self.stream = connection, template, stream
        self.ack_timeout, self.max_inflight = ack_timeout, max_inflight
        self.connection: Connection | None = None
        self._js: JetStreamContext | None = None
        self._stream_checked = False
        self._batch_key: tuple[int, int, int] | None = None
        self._done = bytearray()  # per record of the batch being written: acknowledged (or left out)
        self._too_large_episode = False
        declare_counters(self.counters, "published", "duplicates", "too_large",
                         *(("disconnected_drops",) if stream is None else ()))

    @classmethod
    def from_options(cls, options: Options, context: SinkContext) -> NatsSink:
        template = SubjectTemplate(options.string("subject", DEFAULT_TEMPLATE, nonempty=True),
                                   options.key("subject"))
        stream = StreamOptions.read(options, template.filter())
        ack_timeout = options.duration("ack_timeout", None)
        max_inflight = options.integer("max_inflight", None, minimum=1, maximum=65_536)
        if stream is None and (ack_timeout is not None or max_inflight is not None):
            raise ConfigError(options.key("ack_timeout" if ack_timeout is not None else "max_inflight"),
                              "only with stream (core NATS has no acks)")
        connection = ConnectionOptions.read(options, name=f"memagent {context.hostname}")
        options.finish()
        for warning in connection.exposure():
            context.log.warning("SECURITY: %s: %s", options.path, warning)
        return cls(context=context, connection=connection, template=template, stream=stream,
                   ack_timeout=ack_timeout or 5.0, max_inflight=max_inflight or 256)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect in the background: a server that is down is a failed write (retried), not a
        failed start."""
        if self.stream is not None:
            consequence = "records wait in the queue (when_full applies) and go once it is back"
        else:
            consequence = "core NATS: records made meanwhile are dropped, counted (a stream keeps them)"
        self.connection = Connection(self.connection_options, self.log, consequence=consequence,
                                     counters=self.counters)
        where = f"stream {self.stream.name}" if self.stream is not None else "core NATS, no acks"
        self.log.info("publishing to %s as %s (%s)", self.connection_options.describe(),
                      self.template.template, where)
        # core NATS drops what comes before the connection: give the first one a moment; JetStream
        # writes wait for it themselves
        await self.connection.start(wait=min(self.connection_options.connect_timeout, 1.0)
                                    if self.stream is None else 0.0)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    # -- writing -------------------------------------------------------------------------------------

    async def write(self, batch: Sequence[Record]) -> None:
        if self.stream is None:
            await self._publish_core(batch)
        else:
            await self._publish_acked(batch)

    async def _publish_core(self, batch: Sequence[Record]) -> None:
        assert self.connection is not None
        client = self.connection.client
        if not self.connection.up:
            self.counters["disconnected_drops"] += len(batch)
            raise SinkRejected("not connected to NATS; core NATS (no stream) keeps nothing during an outage")
        for index, record in enumerate(batch):
            try:
                await client.publish(self.template.render(record.fields), record.json)
            except nats.errors.MaxPayloadError:
                self._too_large(record, client.max_payload)
            except (nats.errors.Error, OSError) as exc:
                left = len(batch) - index
                self.counters["disconnected_drops"] += left
                raise SinkRejected(f"publishing failed ({_describe(exc)}); core NATS keeps nothing: "
                                   f"{left} records dropped") from None
            else:
                self.counters["published"] += 1
        self._too_large_episode = False

    async def _publish_acked(self, batch: Sequence[Record]) -> None:
        assert self.connection is not None and self.stream is not None
        if not await self.connection.wait_up(self.ack_timeout):
            raise SinkError(f"not connected to NATS ({self.connection_options.describe()}) within "
                            f"{self.ack_timeout:g}s; the batch waits and is retried")
        js = await self._ready()
        key = (batch[0].seq, batch[-1].seq, len(batch))
        if key != self._batch_key:  # a new batch (a retry of the same one skips what was acknowledged)
            self._batch_key, self._done = key, bytearray(len(batch))
        lost = self.connection.lost()
        watch = asyncio.ensure_future(lost.wait())
        futures: dict[asyncio.Future[PubAck], int] = {}
        window: deque[asyncio.Future[PubAck]] = deque()  # in flight, oldest first
        try:
            for index, record in enumerate(batch):
                if self._done[index]:
                    continue
                if len(window) >= self.max_inflight and not await self._room(window, watch):
                    break  # the connection is lost: what was acknowledged counts, the rest is retried
                fields = record.fields
                headers = {MSG_ID: f"{fields.get('run')}:{fields.get('seq')}"}
                try:  # never waits (there is room): a batch goes out in few writes, not one per record
                    future = await js.publish_async(self.template.render(fields), record.json,
                                                    stream=self.stream.name, headers=headers)
                except nats.errors.MaxPayloadError:
                    self._done[index] = 1
                    self._too_large(record, self.connection.client.max_payload)
                    continue
                except (nats.errors.Error, OSError) as exc:
                    raise SinkError(f"publishing failed: {_describe(exc)}; retrying the batch") from None
                futures[future] = index
                window.append(future)
            await self._collect(futures, lost, watch, len(batch))
        finally:
            watch.cancel()
            for future in futures:
                if not future.done():
                    future.cancel()  # gives its in-flight slot back
        self._too_large_episode = False

    async def _room(self, window: deque[asyncio.Future[PubAck]], watch: asyncio.Future[Any]) -> bool:
        """Wait until fewer than ``max_inflight`` publishes await their acks: False if the
        connection is lost meanwhile, SinkError if the oldest waits over ``ack_timeout``."""
        while len(window) >= self.max_inflight:
            if window[0].done():
                window.popleft()
                continue
            done, _ = await asyncio.wait({window[0], watch}, timeout=self.ack_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if watch in done:
                return False
            if not done:
                raise SinkError(f"{self.max_inflight} publishes waited over {self.ack_timeout:g}s for their "
                                "acks; retrying the batch")
        return True

    async def _collect(self, futures: dict[asyncio.Future[PubAck], int], lost: asyncio.Event,
                       watch: asyncio.Future[Any], size: int) -> None:
        """Wait for the acks (up to ``ack_timeout``, or until the connection is lost); mark what
        came back; SinkError if anything of the batch is still unacknowledged."""
        every: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # one waiter for all
        remaining = len(futures)

        def one_done(_: asyncio.Future[PubAck]) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not every.done():
                every.set_result(None)

        for future in futures:
            future.add_done_callback(one_done)
        if not futures:
            every.set_result(None)
        try:
            await asyncio.wait({every, watch}, timeout=self.ack_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            every.cancel()
        failure: BaseException | None = None
        for future, index in futures.items():
            if not future.done() or future.cancelled():
                continue
            if (exc := future.exception()) is not None:
                failure = failure or exc
                continue
            self._done[index] = 1
            self.counters["published"] += 1
            if future.result().duplicate:
                self.counters["duplicates"] += 1
        missing = size - sum(self._done)
        if not missing:
            return
        if failure is not None:
            raise SinkError(f"stream {self.stream.name if self.stream else '?'} refused {missing} of {size} "
                            f"records: {_describe(failure)}; retrying them")
        why = "the connection was lost" if lost.is_set() else f"no ack within {self.ack_timeout:g}s"
        raise SinkError(f"{missing} of {size} records not acknowledged ({why}); retrying them (the stream "
                        "drops those it stored already)")

    async def _ready(self) -> JetStreamContext:
        """The JetStream context, and the stream checked (created if asked) once."""
        assert self.connection is not None and self.stream is not None
        if self._js is None:
            self._js = self.connection.client.jetstream(timeout=self.ack_timeout,
                                                        publish_async_max_pending=self.max_inflight)
        if not self._stream_checked:
            example = self.template.example(self.context.hostname, self.context.run)
            try:
                info = await self.stream.ensure(self._js, example, self.log)
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                raise SinkError(f"cannot look up stream {self.stream.name}: {_describe(exc)}; "
                                "retrying") from None
            self._stream_checked = info is not None
        return self._js

    def _too_large(self, record: Record, limit: int) -> None:
        self.counters["too_large"] += 1
        if not self._too_large_episode:
            self._too_large_episode = True
            self.log.warning("a %s record (seq %d) of %d bytes exceeds the server's max_payload (%d): left "
                             "out, counted in too_large (logged once until a batch goes whole)",
                             record.type, record.seq, len(record.json), limit)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return "no stream captures the subject (no responders)"
    if isinstance(exc, nats.js.errors.APIError):
        return f"{exc.description or 'error'} (code {exc.code}, error code {exc.err_code})"
    return str(exc).strip() or type(exc).__name__

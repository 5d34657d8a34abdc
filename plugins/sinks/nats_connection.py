"""One connection to a NATS system, shared by the ``nats`` sink and the relay's reader.

:class:`ConnectionOptions` reads the keys both take: ``servers``, credentials (``token``,
``user``/``password``, ``nkey`` seed file, ``creds`` file), TLS (``ca_file``, ``client_cert``,
``client_key``, or a ``tls://`` server), timeouts and the reconnect backoff. :class:`Connection`
holds the nats-py client and guarantees:

- **Never gives up.** The first connection is made in the background (a server that is not up
  yet is not a failed start) and retried every ``reconnect_wait``; a lost one is reconnected
  forever, trying every known server once at once (a cluster's other nodes, learnt from the
  server, included), then with backoff: ``reconnect_wait`` doubling to ``reconnect_wait_max``,
  ±20% jitter so a fleet of agents does not reconnect in step.
- **One log line per outage and one on recovery**, whatever the number of attempts in between
  (each attempt is logged at debug level). Errors the server reports while connected (a
  permissions violation) are logged at most once a minute each.
- **Secrets never logged**: ``token`` and ``password`` are redacted from every line this
  connection's logger writes; servers are shown without credentials (credentials in a server URL
  are refused: they belong in ``user``/``password``, which are never logged); nkey and creds files
  are named, never read here (nats-py reads them when it signs the server's nonce: the seed never
  crosses the network).

Not here: what a lost connection means for records — the owner says that in ``consequence``
(the sink: records wait in its queue; the relay: it resumes where it stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import random
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client, Server

from memagent.errors import ConfigError
from memagent.options import Options
from memagent.plugins.sinks.client_tls import client_context, tls_keys
from memagent.plugins.sinks.listener_security import REDACTED, Redactor, is_loopback

DEFAULT_SERVER = "nats://127.0.0.1:4222"
JITTER = 0.2  # ±20% on every backoff delay: agents restarted together do not reconnect in step
SERVER_ERROR_EVERY = 60.0  # seconds between two log lines about the same error from the server
MIN_SECRET = 4  # shorter credentials are not redacted (redacting "a" would garble every line)


@dataclass(frozen=True)
class ConnectionOptions:
    """The connection keys of a ``[[sinks]]`` table of type ``nats``, or of ``[relay]``."""

    servers: tuple[str, ...] = (DEFAULT_SERVER,)
    name: str = "memagent"
    token: str | None = None
    user: str | None = None
    password: str | None = None
    nkey: str | None = None
    creds: str | None = None
    tls: ssl.SSLContext | None = None
    connect_timeout: float = 5.0
    reconnect_wait: float = 1.0
    reconnect_wait_max: float = 30.0
    ping_interval: float = 20.0

    @classmethod
    def read(cls, options: Options, *, name: str) -> ConnectionOptions:
        """Read and check the connection keys; ConfigError naming the key (never a secret)."""
        servers = tuple(options.string_list("servers", [DEFAULT_SERVER]))
        if not servers:
            raise ConfigError(options.key("servers"), "must name at least one server")
        schemes = {_check_server(server, options.key("servers")) for server in servers}
        token = options.string("token", None, nonempty=True)
        user = options.string("user", None, nonempty=True)
        password = options.string("password", None, nonempty=True)
        nkey = options.string("nkey", None, nonempty=True)
        creds = options.string("creds", None, nonempty=True)
        if (user is None) != (password is None):
            raise ConfigError(options.key("password" if password is None else "user"),
                              "user and password go together")
        chosen = [key for key, value in (("token", token), ("user", user), ("nkey", nkey), ("creds", creds))
                  if value is not None]
        if len(chosen) > 1:
            raise ConfigError(options.key(chosen[1]), f"cannot be combined with {chosen[0]}: "
                                                       "give one way to authenticate")
        for key, path in (("nkey", nkey), ("creds", creds)):
            if path is not None:
                if importlib.util.find_spec("nkeys") is None:
                    raise ConfigError(options.key(key), "needs the nkeys package: install memagent[nats]")
                if not os.access(path, os.R_OK):
                    raise ConfigError(options.key(key), f"cannot read {path!r}")
        tls = _tls_context(options, "tls" in schemes)
        connection = cls(
            servers=servers,
            name=options.string("name", name, nonempty=True),
            token=token, user=user, password=password, nkey=nkey, creds=creds, tls=tls,
            connect_timeout=options.duration("connect_timeout", 5.0),
            reconnect_wait=options.duration("reconnect_wait", 1.0),
            reconnect_wait_max=options.duration("reconnect_wait_max", 30.0),
            ping_interval=options.duration("ping_interval", 20.0),
        )
        if connection.reconnect_wait_max < connection.reconnect_wait:
            raise ConfigError(options.key("reconnect_wait_max"), "must be at least reconnect_wait")
        return connection

    def secrets(self) -> list[str]:
        """What must never appear in a log line."""
        return [s for s in (self.token, self.password) if s is not None and len(s) >= MIN_SECRET]

    def exposure(self) -> list[str]:
        """``SECURITY:`` warnings: a server beyond this machine reached without TLS."""
        remote = [s for s in self.servers if not is_loopback(urlsplit(_with_scheme(s)).hostname or "")]
        if not remote or self.tls is not None:
            return []
        carried = "records (command lines included)"
        if self.token or self.password:
            carried += " and the " + ("token" if self.token else "password")
        return [f"server {remote[0]} is beyond this machine without TLS: {carried} cross the network "
                "in clear text; use tls:// servers (or ca_file)"]

    def describe(self) -> str:
        """The servers, for log lines."""
        return ", ".join(self.servers)


def _with_scheme(server: str) -> str:
    return server if "://" in server else f"nats://{server}"


def _check_server(server: str, key: str) -> str:
    """The scheme of one ``servers`` entry (``nats``, ``tls``); ConfigError for anything else, or
    for credentials in the URL."""
    try:
        parts = urlsplit(_with_scheme(server))
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(key, f"{server!r} is not a valid server URL: {exc}") from None
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        raise ConfigError(key, "each server must be nats://host:port or tls://host:port, got "
                               f"scheme {parts.scheme!r}" if parts.hostname else f"{server!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(key, "a server URL must not carry credentials (user:password@); use user and "
                               "password, or token, which are never logged")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, f"a server URL is scheme://host:port only, got {server!r}")
    return parts.scheme


def _tls_context(options: Options, tls_scheme: bool) -> ssl.SSLContext | None:
    """A client TLS context when a server is ``tls://`` or a TLS key is given: the system's CAs
    or ``ca_file``, a client certificate if given; certificates and host names always verified."""
    ca_file, client_cert, client_key = tls_keys(options)
    if not tls_scheme and ca_file is None and client_cert is None and client_key is None:
        return None
    return client_context(options, ca_file, client_cert, client_key)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text or type(exc).__name__


class Connection:
    """A nats-py client that reconnects forever and logs once per outage (see the module
    docstring). ``consequence`` completes the outage line: what happens to records meanwhile."""

    def __init__(self, options: ConnectionOptions, log: logging.Logger, *, consequence: str,
                 counters: dict[str, int] | None = None) -> None:
        self.options = options
        self.log = log
        self.consequence = consequence
        self.client = Client()
        self.counters = counters if counters is not None else {}
        self.counters.setdefault("disconnects", 0)
        self.counters.setdefault("reconnects", 0)
        self._up = asyncio.Event()
        self._lost = asyncio.Event()  # set once the connection in use is lost; a new one per connection
        self._lost.set()
        self._connecting: asyncio.Task[None] | None = None
        self._closing = False
        self._ever_up = False
        self._down_since = time.monotonic()  # not connected yet counts as down, for the first line
        self._attempts = 0
        self._last_error = ""
        self._reported: dict[str, float] = {}  # errors the server reported while connected: when logged
        self._redactors = [Redactor(secret) for secret in options.secrets()]
        self._warned = False  # the first connection failed: said once
        self._server = "-"  # the server of the last connection

    # -- state ---------------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up.is_set() and self.client.is_connected

    @property
    def server(self) -> str:
        """The server connected to now (scheme://host:port, never credentials), or ``-``."""
        url = self.client.connected_url
        return f"{url.scheme}://{url.hostname}:{url.port}" if url is not None else "-"

    def lost(self) -> asyncio.Event:
        """An event set once the connection in use now is lost (already set while down)."""
        return self._lost

    async def wait_up(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; whether there is one. A connection
        that just broke (the client knows, its callback has not run yet) counts as down."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.up:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            # going down: first the disconnect callback (which clears _up), then the next connection
            event = self._lost if self._up.is_set() else self._up
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return False
            await asyncio.sleep(0)
        return True

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self, wait: float = 0.0) -> None:
        """Begin connecting in the background; wait up to ``wait`` seconds for the first
        connection (not an error if there is none yet)."""
        for redactor in self._redactors:
            self.log.addFilter(redactor)
        self._connecting = asyncio.create_task(self._connect(), name=f"nats connect {self.options.name}")
        if wait > 0:
            await self.wait_up(wait)

    async def _connect(self) -> None:
        o = self.options
        auth: dict[str, Any] = {}
        if o.token is not None:
            auth["token"] = o.token
        if o.user is not None:
            auth["user"], auth["password"] = o.user, o.password
        if o.nkey is not None:
            auth["nkeys_seed"] = o.nkey
        if o.creds is not None:
            auth["user_credentials"] = o.creds
        if o.tls is not None:
            auth["tls"] = o.tls
        # nats-py annotates these int, but takes any number of seconds (asyncio timeouts and sleeps)
        timing: dict[str, Any] = {"reconnect_time_wait": o.reconnect_wait,  # its pace until first connected
                                  "connect_timeout": o.connect_timeout, "ping_interval": o.ping_interval}
        await self.client.connect(
            servers=[_with_scheme(s) for s in o.servers], name=o.name,
            error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected, closed_cb=self._on_closed,
            lame_duck_mode_cb=self._on_lame_duck,
            allow_reconnect=True, max_reconnect_attempts=-1,  # forever
            reconnect_to_server_handler=self._next_server,  # the backoff, once connected
            max_outstanding_pings=2, **timing, **auth)
        self._came_up()

    async def close(self) -> None:
        """Stop reconnecting; flush what the client buffered (bounded) and close."""
        self._closing = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self.client.is_connected:  # push out what the client buffered, unless the connection goes
            wait = max(1, round(self.options.connect_timeout))
            flush = asyncio.ensure_future(self.client.flush(timeout=wait))
            lost = asyncio.ensure_future(self._lost.wait())
            await asyncio.wait({flush, lost}, return_when=asyncio.FIRST_COMPLETED)
            lost.cancel()
            if not flush.done():
                flush.cancel()
            with contextlib.suppress(asyncio.CancelledError, nats.errors.Error, OSError, TimeoutError):
                await flush
        try:
            await self.client.close()
        except (nats.errors.Error, OSError) as exc:
            self.log.debug("close: %s", _describe(exc))
        for redactor in self._redactors:
            self.log.removeFilter(redactor)

    # -- nats-py callbacks --------------------------------------------------------------------------

    def _came_up(self) -> None:
        down_for = time.monotonic() - self._down_since
        if not self._ever_up and not self._warned:
            version = self.client.connected_server_version
            self.log.info("connected to %s (nats-server %d.%d.%d)", self.server, version.major, version.minor,
                          version.patch)
        else:
            again = "re" if self._ever_up else ""
            self.log.warning("%sconnected to %s after %.1fs (%d attempts)", again, self.server, down_for,
                             max(1, self._attempts))
        if self._ever_up:
            self.counters["reconnects"] += 1
        self._server = self.server
        self._ever_up = True
        self._attempts = 0
        self._lost = asyncio.Event()
        self._up.set()

    async def _on_reconnected(self) -> None:
        self._came_up()

    async def _on_disconnected(self) -> None:
        was_up = self._up.is_set()
        self._up.clear()
        self._lost.set()
        if self._closing or not was_up:
            return
        self._down_since = time.monotonic()
        self.counters["disconnects"] += 1
        why = f" ({self._last_error})" if self._last_error else ""
        self.log.warning("lost the connection to %s%s; reconnecting to %s for as long as it takes "
                         "(backoff %gs doubling to %gs); %s", self._server, why, self.options.describe(),
                         self.options.reconnect_wait, self.options.reconnect_wait_max, self.consequence)

    async def _on_closed(self) -> None:
        self._up.clear()
        self._lost.set()

    async def _on_lame_duck(self) -> None:
        self.log.info("%s is shutting down (lame duck mode); moving to another server", self.server)

    async def _on_error(self, exc: Exception) -> None:
        text = _describe(exc)
        self._last_error = text
        if self._up.is_set():
            if isinstance(exc, (OSError, nats.errors.StaleConnectionError)):
                self.log.debug("NATS: %s", text)  # the connection is going: the outage line says so
                return
            now = time.monotonic()  # the server reports a problem on a working connection
            if now - self._reported.get(text, -SERVER_ERROR_EVERY) >= SERVER_ERROR_EVERY:
                self._reported[text] = now
                self.log.warning("NATS: %s", text)
            return
        if not self._ever_up:
            self._attempts += 1
            if not self._warned:
                self._warned = True
                self.log.warning("cannot connect to %s yet (%s); retrying every %gs for as long as it "
                                 "takes; %s", self.options.describe(), text, self.options.reconnect_wait,
                                 self.consequence)
                return
        self.log.debug("NATS: %s", text)

    def _next_server(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
        """nats-py's reconnect handler: the server tried least in this outage; at once while some
        server has not been tried, then ``reconnect_wait`` doubling to ``reconnect_wait_max``."""
        self._attempts += 1
        chosen = min(servers, key=lambda server: server.reconnects)
        if chosen.reconnects == 0:
            return chosen, 0.0
        o = self.options
        delay = min(o.reconnect_wait * 2 ** min(chosen.reconnects - 1, 30), o.reconnect_wait_max)
        return chosen, delay * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 - jitter, not a secret


__all__ = ["REDACTED", "Connection", "ConnectionOptions"]

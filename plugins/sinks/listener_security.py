"""The policies of the shared HTTP listener (see :mod:`memagent.plugins.sinks.listener`), as plain
functions and small classes with no I/O: what counts as loopback, what is unsafe to expose, which
browser origins are the listener's own, how a token is checked, how secrets are kept out of logs,
and how log lines an outsider can trigger are rate-limited.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable
from urllib.parse import parse_qs, unquote_plus, urlsplit

from websockets.http11 import Request

# -- exposure, origins -----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address or a hostname) only reaches this machine."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(host: str, token: str | None, tls: bool, *, serves: str = "the listener",
                      reveals: str = "every process's command line") -> list[str]:
    """What is unsafe about serving ``serves`` (e.g. "the feed") on ``host``: nothing on loopback;
    beyond it, a missing token (anyone who can reach the port reads what it ``reveals``) and
    missing TLS (records, and the token, cross the network in clear text)."""
    if is_loopback(host):
        return []
    where = f'host = "{host}" serves {serves} beyond this machine'
    warnings = []
    if not token:
        warnings.append(f"{where} without a token: anyone who can reach the port reads {reveals}; "
                        "set token")
    if not tls:
        carried = "records and the token" if token else "records"
        warnings.append(f"{where} without TLS: {carried} cross the network in clear text; "
                        "set tls_cert and tls_key")
    return warnings


def same_origin(origin: str, host: str | None, *, tls: bool, loopback_only: bool) -> bool:
    """Whether a browser's ``Origin`` is the listener's own: the scheme it serves (https with
    TLS, else http) and the host:port the browser asked for (the ``Host`` header). With
    ``loopback_only`` the host must also be a loopback name, so a page whose DNS name was rebound
    to 127.0.0.1 does not pass."""
    if not host:
        return False
    scheme, default_port = ("https", 443) if tls else ("http", 80)
    try:
        asked, requested = urlsplit(origin), urlsplit(f"//{host}")
        if asked.scheme.lower() != scheme or asked.path or asked.query or asked.username:
            return False
        origin_at = (asked.hostname, asked.port or default_port)
        host_at = (requested.hostname, requested.port or default_port)
    except ValueError:  # a port that is not a number, a bracket without its pair
        return False
    if origin_at[0] is None or origin_at != host_at:
        return False
    return not loopback_only or is_loopback(origin_at[0])


# -- the token -------------------------------------------------------------------------------------

def token_matches(request: Request, query: str, token: bytes) -> bool:
    """Whether the request carries ``token``: as ``Authorization: Bearer <token>`` or, without
    that header, as ``?token=<token>`` (percent-decoded). Compared with ``hmac.compare_digest``."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        # websockets reads header bytes as ISO-8859-1; the client may have sent the token's
        # UTF-8 bytes (undo that reading) or its ISO-8859-1 bytes (encode as UTF-8).
        offered = header[7:].strip()
        raw = offered.encode("iso-8859-1", "replace")
        return hmac.compare_digest(raw, token) | hmac.compare_digest(offered.encode(), token)
    offered = (parse_qs(query).get("token") or [""])[0]
    return hmac.compare_digest(offered.encode(), token)


# -- logs: redaction and rate limiting -------------------------------------------------------------

_QUERY_PARAMETER = re.compile(r"(?<=[?&])([^=&\s#]*)=([^&\s#]*)")
_AUTHORIZATION = re.compile(r"(?im)\b((?:proxy-)?authorization\s*:\s*)[^\r\n]*")
_CREDENTIALS = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s,;]+")
REDACTED = "<redacted>"


def _secret_pattern(secret: str) -> re.Pattern[str]:
    """Matches ``secret`` raw, with any of its characters percent-encoded (either hex case, ``+``
    for a space), base64-encoded (standard or URL-safe, padded or not), escaped by repr/JSON, or
    its UTF-8 bytes read as ISO-8859-1."""
    def character(c: str) -> str:
        encoded = "".join("%" + "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d
                                        for d in f"{b:02x}") for b in c.encode())
        return "(?:" + "|".join([re.escape(c), encoded, *([r"\+"] if c == " " else [])]) + ")"

    raw = secret.encode()
    literals = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
                repr(secret)[1:-1], json.dumps(secret)[1:-1],
                raw.decode("iso-8859-1")}  # how websockets decodes a header carrying it
    literals |= {literal.rstrip("=") for literal in literals}
    alternatives = ["".join(character(c) for c in secret),
                    *(re.escape(literal) for literal in sorted(literals, key=len, reverse=True) if literal)]
    return re.compile("|".join(alternatives))


def redact(text: str, secret: re.Pattern[str] | None = None) -> str:
    """``text`` without ``secret`` (see :func:`_secret_pattern`), ``token=`` query values (the
    key percent-decoded, as the listener reads it) and ``Authorization`` values, matching or not."""
    if secret is not None:
        text = secret.sub(REDACTED, text)
    text = _QUERY_PARAMETER.sub(
        lambda m: f"{m[1]}={REDACTED}" if unquote_plus(m[1]).strip().lower() == "token" else m[0], text)
    text = _AUTHORIZATION.sub(lambda m: m[1] + REDACTED, text)
    return _CREDENTIALS.sub(lambda m: m[1] + m[2] + REDACTED, text)


class Redactor(logging.Filter):
    """Redacts credentials (see :func:`redact`) from every record of the loggers it is added to —
    the message, its traceback and stack: websockets logs request lines, headers and parse errors
    (which quote the request line) at debug level. Only records logged to those loggers
    themselves: a logging filter does not see records propagated from child loggers."""

    def __init__(self, secret: str | None) -> None:
        super().__init__()
        self.secret = _secret_pattern(secret) if secret else None

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not bypass redaction
            message = f"{record.msg!s} (unformattable arguments)"
        record.msg, record.args = redact(message, self.secret), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secret)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secret)
        return True


class Throttled:
    """A warning at most once every ``every`` seconds; the next one says how many were held back.
    For events an outsider can trigger at will (malformed requests), so they cannot flood the log."""

    def __init__(self, logger: logging.Logger, every: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.every, self.clock = logger, every, clock
        self.last: float | None = None
        self.held_back = 0

    def warning(self, message: str) -> None:
        now = self.clock()
        if self.last is not None:
            if now - self.last < self.every:
                self.held_back += 1
                return
            if self.held_back:
                message += f" ({self.held_back} more in the last {now - self.last:.0f}s not logged)"
        self.last, self.held_back = now, 0
        self.logger.warning("%s", message)

"""The client side of TLS for sinks that connect out (otlp, nats): one way to build it.

Certificates and host names are always verified (the system's CAs, or ``ca_file``); a client
certificate (``client_cert`` + ``client_key``, both or neither) for mutual TLS. There is no
"insecure" switch. Every problem is a ConfigError naming the key.
"""

from __future__ import annotations

import ssl

from memagent.errors import ConfigError
from memagent.options import Options


def tls_keys(options: Options) -> tuple[str | None, str | None, str | None]:
    """(ca_file, client_cert, client_key) as given, validated as strings."""
    ca_file = options.string("ca_file", None, nonempty=True)
    client_cert = options.string("client_cert", None, nonempty=True)
    return ca_file, client_cert, options.string("client_key", None, nonempty=True)


def client_context(options: Options, ca_file: str | None, client_cert: str | None,
                   client_key: str | None) -> ssl.SSLContext:
    """A verifying client context from the keys :func:`tls_keys` read."""
    if (client_cert is None) != (client_key is None):
        missing = "client_key" if client_key is None else "client_cert"
        raise ConfigError(options.key(missing), "client_cert and client_key go together")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(options.key("ca_file"), f"cannot load: {exc}") from None
    if client_cert is not None:
        try:
            context.load_cert_chain(client_cert, client_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(options.key("client_cert"), f"cannot load: {exc}") from None
    return context

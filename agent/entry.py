"""The ``memagent`` console script's entry point, kept apart from :mod:`memagent.cli` so that
SIGHUP is made harmless before anything heavy is imported.

Importing the CLI and its dependencies takes ~100 ms; SIGHUP's default action would kill the
agent in that window (logrotate's ``postrotate`` may send it at any moment). Ignoring it until
the event loop installs the real handler (reopen sinks) closes the window down to the
interpreter's own start-up, before any of our code runs. Nothing is lost by ignoring: sinks that
are not open yet have nothing to reopen.
"""

from __future__ import annotations

import signal


def main() -> int:
    """Ignore SIGHUP, then run the CLI; returns its exit code."""
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from memagent.cli import main as cli_main  # imported after the signal, on purpose

    return cli_main()

"""An unprivileged attacker for hostile-input tests: a directory it may write, commands as it.

The agent runs as root; the attacker is uid/gid 65534 (nobody), acting through ``setpriv``
exactly as another local user would. Tests that need root skip when not run as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as uid/gid 65534 with no supplementary groups; raise if it fails."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed (apt-get install util-linux)")
    return subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
                          capture_output=True, text=True, check=True, timeout=30)


def nobody_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as the attacker with the system interpreter (a venv or pyenv under
    /root is not readable by another user)."""
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("/usr/bin/python3 is missing (apt-get install python3)")
    return as_nobody("/usr/bin/python3", "-c", code)


def writable_dir() -> Iterator[Path]:
    """The ``attacker_dir`` fixture: a fresh root-owned directory under /tmp that the attacker
    may write (mode 1777, as /tmp itself), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("attack tests need root (the agent's user) and setpriv")
    path = Path(tempfile.mkdtemp(prefix="memagent-attack-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

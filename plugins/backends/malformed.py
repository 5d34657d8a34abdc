"""Counting files that do not parse, said once per episode: the Linux backend's procfs and cgroup
readers share it, so a file that stays malformed is one warning, not one per read."""

from __future__ import annotations

import logging


class MalformedFiles:
    """Adds each read's unparsable files to ``counters["malformed"]``; warns when an episode of
    reads with some begins (naming one, and what ``consequence`` follows), and says when a read
    finds none again."""

    def __init__(self, counters: dict[str, int], log: logging.Logger, what: str, consequence: str) -> None:
        self.counters, self.log = counters, log
        self.what, self.consequence = what, consequence
        self.episode = False
        counters.setdefault("malformed", 0)

    def note(self, paths: list[str]) -> None:
        self.counters["malformed"] += len(paths)
        if paths and not self.episode:
            self.log.warning("linux backend: %d %s file(s) could not be parsed, e.g. %s; %s (counted "
                             "as backend.malformed)", len(paths), self.what, paths[0], self.consequence)
        elif not paths and self.episode:
            self.log.info("linux backend: every %s file parses again", self.what)
        self.episode = bool(paths)

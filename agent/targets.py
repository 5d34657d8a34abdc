"""Which processes each target watches: selectors applied to a process listing.

:class:`Selector` turns one ``[[targets]]`` table into a predicate over
:class:`~memagent.contracts.ProcessInfo` and resolves a whole listing to the set of identities
the target watches now. Selectors in one target are ANDed; ``children = true`` adds every
descendant of a matched process. A pidfile is re-read on every resolve, so a restarted daemon
is followed; an unreadable pidfile matches nothing and is reported once per episode.
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

from memagent.config import TargetConfig
from memagent.contracts import Identity, ProcessInfo

log = logging.getLogger(__name__)

Predicate = Callable[[ProcessInfo], bool]


def _user_names(user: str) -> set[str]:
    """The spellings a ``user`` selector may take: the name and the numeric uid."""
    names = {user}
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        return names
    return names | {entry.pw_name, str(entry.pw_uid)}


class Selector:
    """The processes one target watches."""

    def __init__(self, config: TargetConfig) -> None:
        self.config = config
        self._predicates = self._build(config)
        self._pidfile_problem: str | None = None

    @staticmethod
    def _build(config: TargetConfig) -> list[Predicate]:
        checks: list[Predicate] = []
        if config.self:
            own = os.getpid()
            checks.append(lambda p: p.pid == own)
        if config.pid is not None:
            wanted = config.pid
            checks.append(lambda p: p.pid == wanted)
        if config.comm is not None:
            comm = config.comm
            checks.append(lambda p: fnmatchcase(p.name, comm))
        if config.exe is not None:
            exe = config.exe
            checks.append(lambda p: p.exe is not None and fnmatchcase(p.exe, exe))
        if config.cmdline is not None:
            search = config.cmdline.search
            checks.append(lambda p: bool(p.cmdline) and search(" ".join(p.cmdline)) is not None)
        if config.user is not None:
            users = _user_names(config.user)
            checks.append(lambda p: p.user is not None and p.user in users)
        if config.cgroup is not None:
            cgroup = config.cgroup
            checks.append(lambda p: p.cgroup is not None and fnmatchcase(p.cgroup, cgroup))
        return checks

    def _pidfile_pid(self) -> int | None:
        path = self.config.pidfile
        assert path is not None
        try:
            with open(path, encoding="ascii") as handle:
                pid = int(handle.read().split()[0])
            problem = None
        except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
            pid, problem = None, getattr(exc, "strerror", None) or "does not hold a pid"
        if problem != self._pidfile_problem:
            if problem:
                log.warning("target %s: cannot use pidfile %s: %s; watching nothing until it can",
                            self.config.name, path, problem)
            else:
                log.info("target %s: pidfile %s readable again (pid %s)", self.config.name, path, pid)
            self._pidfile_problem = problem
        return pid

    def resolve(self, processes: Iterable[ProcessInfo]) -> dict[Identity, ProcessInfo]:
        """The processes this target watches now, by identity."""
        listing = list(processes)
        checks = list(self._predicates)
        if self.config.pidfile is not None:
            pid = self._pidfile_pid()
            if pid is None:
                return {}
            checks.append(lambda p: p.pid == pid)
        matched = {p.identity: p for p in listing if all(check(p) for check in checks)}
        if self.config.children and matched:
            matched.update(descendants(listing, {p.pid for p in matched.values()}))
        return matched


def descendants(processes: list[ProcessInfo], roots: set[int]) -> dict[Identity, ProcessInfo]:
    """Every process below the pids in ``roots`` (not the roots themselves)."""
    children: dict[int, list[ProcessInfo]] = {}
    for process in processes:
        if process.pid != process.ppid:
            children.setdefault(process.ppid, []).append(process)
    found: dict[Identity, ProcessInfo] = {}
    stack = list(roots)
    seen = set(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child.pid not in seen:
                seen.add(child.pid)
                found[child.identity] = child
                stack.append(child.pid)
    return found

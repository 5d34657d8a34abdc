"""Which processes each target watches: selectors applied to a process listing.

:class:`Selector` turns one ``[[targets]]`` table into a predicate over
:class:`~memagent.contracts.ProcessInfo` and resolves a whole listing to the set of identities
the target watches now. Selectors in one target are ANDed; ``children = true`` adds every
descendant of a matched process.

A pidfile is re-read by :meth:`Selector.refresh` before every listing (in the scheduler's worker
thread, never on the event loop), so a restarted daemon is followed. It is treated as hostile
input: opened without following a symbolic link and without blocking (a FIFO never stalls the
agent), accepted only if it is a regular file of at most :data:`PIDFILE_MAX_BYTES` bytes holding
one pid, and read with that bound (a link to ``/dev/zero`` is refused, never read). A pidfile
that cannot be used matches nothing, is counted in :attr:`Selector.pidfile_problems` and is
reported once per episode (one warning when it goes bad, one line when it is usable again).
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

from memagent.config import TargetConfig
from memagent.contracts import Identity, ProcessInfo

log = logging.getLogger(__name__)

Predicate = Callable[[ProcessInfo], bool]

#: The most a pidfile may hold: a pid and a newline, with room for stray whitespace.
PIDFILE_MAX_BYTES = 64
#: Linux's PID_MAX_LIMIT (2^22); other systems stay well below it.
PID_MAX = 1 << 22


class PidfileProblem(Exception):
    """Why a pidfile cannot be used; the message is one short phrase for the log line."""


def read_pidfile(path: str) -> int:
    """The pid in ``path``; :class:`PidfileProblem` if it is not a small regular file holding
    one. Never follows a symbolic link in the last component and never blocks (see module
    docstring). Blocking I/O on a regular file: call it from a worker thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PidfileProblem("is a symbolic link (not followed)") from None
        raise PidfileProblem(exc.strerror or str(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PidfileProblem("is not a regular file")
        if info.st_size > PIDFILE_MAX_BYTES:
            raise PidfileProblem(f"holds {info.st_size} bytes, more than a pid ({PIDFILE_MAX_BYTES} at most)")
        data = os.read(fd, PIDFILE_MAX_BYTES + 1)
    except OSError as exc:
        raise PidfileProblem(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    text = data.decode("ascii", errors="replace").strip()
    if len(data) > PIDFILE_MAX_BYTES or not text.isdigit() or not 0 < int(text) <= PID_MAX:
        raise PidfileProblem("does not hold a pid")
    return int(text)


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
        self._cheap, self._detailed = self._build(config)
        self._pidfile_pid: int | None = None
        self._pidfile_problem: str | None = None
        self.pidfile_problems = 0

    @staticmethod
    def _build(config: TargetConfig) -> tuple[list[Predicate], list[Predicate]]:
        """(checks on what every listing knows: pid, name; checks on a described process's
        details: exe, command line, user, cgroup)."""
        cheap: list[Predicate] = []
        if config.self:
            own = os.getpid()
            cheap.append(lambda p: p.pid == own)
        if config.pid is not None:
            wanted = config.pid
            cheap.append(lambda p: p.pid == wanted)
        if config.comm is not None:
            comm = config.comm
            # an undescribed name is the kernel's comm, cut at 15 characters: the full name
            # (from the command line) is known only once described, so such a name may match
            cheap.append(lambda p: fnmatchcase(p.name, comm) or (not p.described and len(p.name) >= 15))
        detailed: list[Predicate] = []
        if config.exe is not None:
            exe = config.exe
            detailed.append(lambda p: p.exe is not None and fnmatchcase(p.exe, exe))
        if config.cmdline is not None:
            search = config.cmdline.search
            detailed.append(lambda p: bool(p.cmdline) and search(" ".join(p.cmdline)) is not None)
        if config.user is not None:
            users = _user_names(config.user)
            detailed.append(lambda p: p.user is not None and p.user in users)
        if config.cgroup is not None:
            cgroup = config.cgroup
            detailed.append(lambda p: p.cgroup is not None and fnmatchcase(p.cgroup, cgroup))
        return cheap, detailed

    def problems_now(self) -> list[str]:
        """What ``memagent check`` warns about: a ``pid``, ``pidfile`` or ``user`` that does not
        exist at this moment (the target may still match later; ``run`` watches for it)."""
        config, found = self.config, []
        if config.pid is not None:
            try:
                os.kill(config.pid, 0)
            except ProcessLookupError:
                found.append(f"pid {config.pid} does not exist now")
            except PermissionError:
                pass  # it exists, owned by someone else
        if config.pidfile is not None:
            try:
                read_pidfile(config.pidfile)
            except PidfileProblem as exc:
                found.append(f"pidfile {config.pidfile}: {exc}")
        if config.user is not None and not config.user.isdigit():
            try:
                pwd.getpwnam(config.user)
            except KeyError:
                found.append(f"user {config.user!r} does not exist")
        return [f"targets: {config.name}: {problem}; it matches nothing until it does" for problem in found]

    def refresh(self) -> None:
        """Re-read what a resolve needs from outside the process listing (the pidfile).
        Blocking but bounded: call it from a worker thread, before listing processes."""
        path = self.config.pidfile
        if path is None:
            return
        try:
            pid, problem = read_pidfile(path), None
        except PidfileProblem as exc:
            pid, problem = None, str(exc)
            self.pidfile_problems += 1
        if problem != self._pidfile_problem:
            if problem:
                log.warning("target %s: cannot use pidfile %s: %s; watching nothing until it can",
                            self.config.name, path, problem)
            else:
                log.info("target %s: pidfile %s usable again (pid %s)", self.config.name, path, pid)
            self._pidfile_problem = problem
        self._pidfile_pid = pid

    def _cheap_checks(self) -> list[Predicate] | None:
        """The cheap checks with the pidfile's; None when the pidfile says no process."""
        checks = list(self._cheap)
        if self.config.pidfile is not None:
            pid = self._pidfile_pid
            if pid is None:
                return None
            checks.append(lambda p: p.pid == pid)
        return checks

    def candidates(self, processes: list[ProcessInfo]) -> set[Identity]:
        """The processes this target may watch, judged on what every listing knows (pid and
        name, not exe, command line, user or cgroup), with their descendants when it watches
        children: those to describe before :meth:`resolve` (see
        :class:`~memagent.contracts.Describing`). No I/O."""
        checks = self._cheap_checks()
        if checks is None:
            return set()
        found = {p.identity: p for p in processes if all(check(p) for check in checks)}
        if self.config.children and found:
            found.update(descendants(processes, {p.pid for p in found.values()}))
        return set(found)

    def resolve(self, processes: Iterable[ProcessInfo]) -> dict[Identity, ProcessInfo]:
        """The processes this target watches now, by identity. No I/O: the pidfile's pid is
        the one the last :meth:`refresh` read (none before the first); a process that is not
        described fails every check on its details."""
        listing = list(processes)
        checks = self._cheap_checks()
        if checks is None:
            return {}
        checks += self._detailed
        matched = {p.identity: p for p in listing if all(check(p) for check in checks)}
        if self.config.children and matched:
            matched.update(descendants(listing, {p.pid for p in matched.values()}))
        return matched


def described_where_needed(processes: list[ProcessInfo], selectors: Iterable[Selector],
                           describe: Callable[[ProcessInfo], ProcessInfo | None]) -> list[ProcessInfo]:
    """``processes`` with every process some selector may watch described (``describe``: a
    :class:`~memagent.contracts.Describing` backend's); one that vanished meanwhile is left out.
    Blocking reads: call it in the listing's worker thread."""
    if all(p.described for p in processes):
        return processes  # the common case at rest: nothing new
    wanted: set[Identity] = set()
    for selector in selectors:
        wanted |= selector.candidates(processes)
    if not any(not p.described and p.identity in wanted for p in processes):
        return processes  # the very list: a rescan knows an unchanged listing by it
    listed = []
    for process in processes:
        if not process.described and process.identity in wanted:
            described = describe(process)
            if described is None:
                continue
            process = described
        listed.append(process)
    return listed


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

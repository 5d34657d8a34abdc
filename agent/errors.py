"""The exceptions memagent raises, rooted at :class:`MemagentError`.

The tree, and what happens next when each is raised::

    MemagentError
    ├── ConfigError           bad config or usage: one line naming the dotted key; exit 2
    ├── PluginError           a plugin misbehaved; carries plugin name and distribution
    │   └── PluginLoadError   import failed or not runnable here; that plugin is unusable,
    │                         the others still load (exit 2 if the config names it)
    ├── SinkError             a sink could not write a batch; the framework keeps the batch,
    │   │                     reports once per episode, and retries with backoff
    │   ├── SinkClosed        the sink's destination is gone for good (stdout's reader left):
    │   │                     no retry; its records are counted as dropped; when every sink
    │   │                     is closed the agent stops, exit 1
    │   └── SinkRejected      this batch can never be written (a record the sink cannot
    │                         serialize): the batch is dropped and counted, the sink goes on
    ├── StartupError          a sink could not start (a port in use): nothing runs; exit 1
    └── EverySinkClosed       every sink closed for good (``memagent run | head``): nothing can
                              be delivered, so the agent stopped after its drain; exit 1

Nothing here is raised for a normal event such as a process exiting between two ticks, or one
process that cannot be read: backends report those as results (:class:`~memagent.contracts.Gone`,
:class:`~memagent.contracts.Failure`), which become ``exit`` and ``error`` records, never
exceptions.
"""

from __future__ import annotations


class MemagentError(Exception):
    """Root of every error memagent raises on purpose."""


class ConfigError(MemagentError):
    """The config (or the command line) is wrong; the agent does not start.

    ``str()`` is one line: ``<dotted key>: <what is wrong>``, e.g.
    ``targets[1].interval: must be a positive duration, got "-1s"``.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class PluginError(MemagentError):
    """A plugin failed; names the plugin, its kind and the distribution that ships it."""

    def __init__(self, kind: str, name: str, distribution: str, problem: str) -> None:
        self.kind = kind
        self.name = name
        self.distribution = distribution
        self.problem = problem
        super().__init__(f"{kind} plugin {name!r} (from {distribution}): {problem}")


class PluginLoadError(PluginError):
    """The plugin could not be imported or cannot run on this machine; it is not used."""


class SinkError(MemagentError):
    """A sink could not write a batch right now. The framework retries the same batch
    with backoff; the sink should raise this (not crash) for disk-full, refused, etc."""


class SinkClosed(SinkError):
    """The sink can never write again (the reader of stdout closed the pipe), so retrying is
    pointless. The framework stops calling ``write``, counts the batch and every later record
    for this sink as dropped, and logs it once; when every sink is closed the agent stops."""


class SinkRejected(SinkError):
    """This batch can never be written, however often it is retried (a record the sink cannot
    serialize). The framework drops the batch, counts it (``rejected``), logs once per episode
    and goes on with the next batch: one poison record must not block a sink forever. Any
    unexpected exception (not a SinkError) that repeats for the same batch is treated the same
    way after a few attempts."""


class StartupError(MemagentError):
    """The agent could not start (a sink failed to open); nothing is running. Exit 1."""


class EverySinkClosed(MemagentError):
    """Every sink closed for good (``memagent run | head``): nothing can be delivered, so the
    agent stopped. Raised after the drain; exit 1."""

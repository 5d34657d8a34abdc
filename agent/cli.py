"""``memagent``: the command line.

Exit codes: 0 ok; 2 bad config or usage; 1 failure at run time. Errors are one line on stderr,
``memagent: error: ...``, never a traceback unless ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata, resources

from memagent.config import (
    Config,
    default_config_text,
    is_relay_config,
    load_config,
    load_relay_config,
    parse_config,
)
from memagent.contracts import Openable
from memagent.errors import ConfigError, MemagentError, PluginLoadError
from memagent.record_types import record_schema
from memagent.registry import discover, load
from memagent.runtime import build, run_until_signalled

log = logging.getLogger("memagent")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
LOG_LEVELS = ["debug", "info", "warning", "error"]


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 without the usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError("usage", message)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                        help="stderr log level; debug also shows tracebacks (default: info)")
    parser = _Parser(prog="memagent", description="Samples process memory and streams JSON records.",
                     parents=[common])
    parser.add_argument("--version", action="version", version=f"memagent {version()}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        # --log-level is accepted before or after the command name
        return commands.add_parser(name, help=help, parents=[common])

    run = command("run", "run the agent (no CONFIG: all processes, 1 s, stdout)")
    run.add_argument("config", nargs="?", help="TOML config file")
    run.add_argument("--once", action="store_true", help="sample every target once, then exit")
    run.add_argument("--duration", type=_positive_seconds, metavar="SECONDS",
                     help="stop gracefully after this many seconds")
    check = command("check", "validate a config and the plugins it names")
    check.add_argument("config", help="TOML config file")
    relay = command("relay", "records from NATS to the configured sinks (a fleet's live view)")
    relay.add_argument("config", help="TOML config file with a [relay] table")
    relay.add_argument("--duration", type=_positive_seconds, metavar="SECONDS",
                       help="stop gracefully after this many seconds")
    command("plugins", "list installed backends and sinks")
    command("schema", "print the record JSON Schema (v1)")
    command("sample-config", "print a commented example config")
    return parser


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _load(path: str | None) -> Config:
    return load_config(path) if path else parse_config(default_config_text(), source="<default>")


def _run(args: argparse.Namespace) -> int:
    if args.config and is_relay_config(args.config):
        raise ConfigError(args.config, "has a [relay] table: run it with memagent relay")
    agent = build(_load(args.config))
    if isinstance(agent.backend, Openable):
        try:
            agent.backend.open()  # a procfs that is not there: exit 2 now, not a failure per rescan
        except BaseException:
            agent.backend.close()
            raise
    if args.config and os.path.isfile(args.config):  # a FIFO (<(...)) cannot be read twice: no reload
        agent.config_path = args.config
    log.info("run %s: %d targets, sinks %s, backend %s", agent.maker.run, len(agent.config.targets),
             ", ".join(o.name for o in agent.fanout.outlets), agent.backend.name)
    asyncio.run(run_until_signalled(agent, once=args.once, duration=args.duration))
    return EXIT_OK


def _relay(args: argparse.Namespace) -> int:
    from memagent import relay  # only this command needs it

    built = relay.build(load_relay_config(args.config))
    asyncio.run(relay.run_until_signalled(built, duration=args.duration))
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    if is_relay_config(args.config):
        from memagent import relay

        built = relay.build(load_relay_config(args.config))
        sinks = ", ".join(f"{s.name} ({s.type})" for s in built.config.sinks)
        print(f"{args.config}: ok: relay from {built.source.describe()}, sinks: {sinks}")
        return EXIT_OK
    agent = build(_load(args.config))
    if isinstance(agent.backend, Openable):
        try:  # only a warning here: the config may be for another machine (a container's /host/proc)
            agent.backend.open()
        except ConfigError as exc:
            log.warning("%s (memagent run would stop here with this error)", exc)
    agent.backend.close()
    for watch in agent.scheduler.watches:
        for problem in watch.selector.problems_now():
            log.warning("%s", problem)
    sinks = ", ".join(f"{o.name} ({type(o.sink).name})" for o in agent.fanout.outlets)
    print(f"{args.config}: ok: {len(agent.config.targets)} targets, sinks: {sinks}, "
          f"backend: {agent.backend.name}")
    return EXIT_OK


def version() -> str:
    """The installed distribution's version ("unknown" when run from a bare source tree)."""
    try:
        return metadata.version("memagent")
    except metadata.PackageNotFoundError:
        return "unknown"


def _plugins(args: argparse.Namespace) -> int:
    print(f"memagent {version()} (Python {sys.version.split()[0]}, {sys.platform})\n")
    rows = [("NAME", "KIND", "DISTRIBUTION", "VERSION", "LOADS HERE")]
    for kind in ("backend", "sink"):
        for spec in discover(kind):
            try:
                load(spec)
                loads = "yes"
            except PluginLoadError as exc:
                loads = f"no: {exc.problem}"
            rows.append((spec.name, kind, spec.distribution, spec.version, loads))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4])
    return EXIT_OK


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(record_schema(), indent=2))
    return EXIT_OK


def _sample_config(args: argparse.Namespace) -> int:
    print(resources.files("memagent").joinpath("sample-config.toml").read_text(encoding="utf-8"), end="")
    for spec in discover("sink"):
        try:
            plugin = load(spec)
        except PluginLoadError:
            continue
        print(f"\n# --- sink {spec.name!r} (from {spec.distribution}) ---")
        print("\n".join("# " + line if line and not line.startswith("#") else line
                        for line in plugin.sample_config.rstrip().splitlines()))
    return EXIT_OK


COMMANDS = {"run": _run, "relay": _relay, "check": _check, "plugins": _plugins, "schema": _schema,
            "sample-config": _sample_config}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (the console script exits with it)."""
    debug = "--log-level" in (argv := list(sys.argv[1:] if argv is None else argv)) and \
        "debug" in argv
    try:
        parser = _parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --version and --help print, then exit 0
            return int(exc.code or 0)
        if args.command is None:  # `memagent` alone: what it can do, not just an error
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        level = getattr(args, "log_level", "info")
        logging.basicConfig(level=level.upper(), stream=sys.stderr,
                            format="memagent %(levelname)s: %(message)s", force=True)
        if level != "debug":  # one line per connection is noise for a feed with many clients
            logging.getLogger("websockets").setLevel(logging.WARNING)
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        return _fail(exc, EXIT_USAGE, debug)
    except PluginLoadError as exc:
        return _fail(exc, EXIT_USAGE, debug)
    except MemagentError as exc:
        return _fail(exc, EXIT_FAILURE, debug)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `memagent schema | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        print(f"memagent: error: unexpected {type(exc).__name__}: {exc} "
              f"(run with --log-level debug for details)", file=sys.stderr)
        if debug:
            raise
        return EXIT_FAILURE


def _fail(exc: BaseException, code: int, debug: bool) -> int:
    if debug:
        logging.getLogger("memagent").exception("traceback")
    print(f"memagent: error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The `clipline` command: parse argv, load config, set up logging, call one stage, map outcomes to exit codes.

Generic over the command records of pipeline/cli/commands.py: nothing here names a command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Callable

from pipeline.cli.commands import COMMANDS, COMMON, Command, unsupported
from pipeline.core.config import Config, load_config
from pipeline.core.errors import ConfigError, JobFailed
from pipeline.core.logs import setup_logging
from pipeline.core.summary import format_summary

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("clipline")


def _add_arguments(sp: argparse.ArgumentParser, command: Command) -> None:
    # Positionals first: `clipline demo DIR KEY=VALUE...` reads DIR before the overrides.
    for a in command.args:
        if a.positional:
            sp.add_argument(*a.flags, **a.options)
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
    sp.add_argument("--config", "-c", help="a YAML file merged over conf/base.yaml")
    groups: dict[str, Any] = {}
    for a in command.args:
        if a.positional:
            continue
        if a.exclusive and a.exclusive not in groups:
            groups[a.exclusive] = sp.add_mutually_exclusive_group()
        (groups[a.exclusive] if a.exclusive else sp).add_argument(*a.flags, **a.options)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipline",
        description="Batch CLIP embedding pipeline: download -> embed -> index -> dedup -> query.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `clipline COMMAND --help` for a worked example of each command." + COMMON,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        sp = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description() + "\n" + COMMON,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_arguments(sp, command)
    return p


def _resolve(fn_path: str) -> Callable[..., Any]:
    module, _, name = fn_path.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _print_result(command: str, result: Any) -> None:
    from pipeline.core.storage import mask

    if isinstance(result, dict):
        print(mask(format_summary(command, result)))
    elif isinstance(result, str):
        print(mask(result))


def _parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace] | int:
    parser = _parser()
    try:
        # KEY=VALUE overrides may also come after options (`query --text T log_level=ERROR`).
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else EXIT_USAGE
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        print(f"clipline: unrecognized arguments: {' '.join(stray)}", file=sys.stderr)
        return EXIT_USAGE
    if extra and getattr(args, "overrides", None) is not None:
        args.overrides = [*args.overrides, *extra]
    return parser, args


def _refuse_distributor(command: Command, cfg: Config, args: argparse.Namespace) -> str | None:
    """The message to exit 2 with when a command (or a stage it runs) cannot run on cfg.distributor."""
    refused = unsupported(command, cfg.distributor, args)
    if not refused:
        return None
    reasons = "; ".join(f"{c.name}: {c.spark}" for c in refused)
    return (
        f"distributor={cfg.distributor} is not supported by {', '.join(c.name for c in refused)} ({reasons}); "
        f"nothing was run. Use distributor=local" + (" or --stage to leave it out" if command.parts(args) else "")
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    parsed = _parse(argv)
    if isinstance(parsed, int):
        return parsed
    parser, args = parsed
    if args.version:
        from pipeline import __version__

        print(__version__)
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    command = COMMANDS[args.command]
    try:
        cfg = load_config(command.overrides(args, list(args.overrides)), args.config)
    except ConfigError as e:
        print(f"clipline {command.name}: {e}", file=sys.stderr)
        return EXIT_USAGE
    refusal = _refuse_distributor(command, cfg, args)
    if refusal:
        print(f"clipline {command.name}: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(cfg.log_level)
    return run_command(command, cfg, command.kwargs(args))


def output_of(command: Command, cfg: Config) -> str | None:
    """Where the command's run.json goes: output=, else the command's own default output, else nowhere."""
    if not command.writes_record:
        return None
    if cfg.output:
        return str(cfg.output)
    return _resolve(command.default_output)(cfg) if command.default_output else None


def run_command(command: Command, cfg: Config, kwargs: dict[str, Any]) -> int:
    """Call the command's function with the storage section applied (to this process and every process it starts
    meanwhile); map its outcome to an exit code and write its run.json either way."""
    from pipeline.core.storage import applied

    try:
        with applied(cfg.storage):
            return _run_command(command, cfg, kwargs)
    except ConfigError as e:  # a variable the storage section names is not set: nothing was run
        print(f"clipline {command.name}: {e}", file=sys.stderr)
        return EXIT_USAGE


def _run_command(command: Command, cfg: Config, kwargs: dict[str, Any]) -> int:
    from pipeline.core.runinfo import RunRecord
    from pipeline.core.storage import mask

    record = RunRecord(command.name, cfg, output_of(command, cfg))
    try:
        result = _resolve(command.fn)(cfg, **kwargs)
    except ConfigError as e:
        print(mask(f"clipline {command.name}: {e}"), file=sys.stderr)
        return EXIT_USAGE
    except JobFailed as e:
        log.error("%s failed: %s", command.name, e)
        if e.summary:
            print(mask(format_summary(command.name, e.summary)))
        record.finish(EXIT_FAILED, e.summary, str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("%s interrupted; committed shards are kept, re-run to resume", command.name)
        record.finish(130, None, "interrupted")
        return 130
    except Exception as e:  # any other failure is a failed job, never exit 0
        log.exception("%s failed: %s", command.name, e)
        record.finish(EXIT_FAILED, None, f"{type(e).__name__}: {e}")
        return EXIT_FAILED
    _print_result(command.name, result)
    if isinstance(result, dict) and result.get("output") and not record.output and command.writes_record:
        record.output = str(result["output"])
    record.finish(EXIT_OK, result if isinstance(result, dict) else None)
    return EXIT_OK


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()

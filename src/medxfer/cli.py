"""The ``medxfer`` command line: verbs registered in :data:`medxfer.commands.COMMANDS`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medxfer.commands import COMMANDS

VERB_MODULES = ("run", "ls", "validate", "report", "demo", "fetch")
log = logging.getLogger("medxfer")


def _load_verbs() -> None:
    for name in VERB_MODULES:
        try:
            importlib.import_module(f"medxfer.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"medxfer.commands.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_verbs()
    parser = argparse.ArgumentParser(
        prog="medxfer", description="Which pretrained backbone transfers best to your medical images?")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('medxfer').__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors, no progress bars")
        p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    try:
        return int(args._command.run(args) or 0)
    except KeyboardInterrupt:
        print("medxfer: interrupted; finished cells are saved and a re-run resumes", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, TypeError) as exc:
        # our errors are ValueError/KeyError/RuntimeError subclasses with messages naming file, row or key
        if args.verbose:
            raise
        print(f"medxfer {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

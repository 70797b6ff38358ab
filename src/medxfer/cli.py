"""The ``medxfer`` command line: verbs registered in :data:`medxfer.commands.COMMANDS`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from medxfer.commands import COMMANDS
from medxfer.errors import MedxferError

VERB_MODULES = ("run", "analyze", "pretrain", "ls", "validate", "report", "demo", "fetch", "cache")
log = logging.getLogger("medxfer")


def _load_verbs() -> None:
    for name in VERB_MODULES:
        try:
            importlib.import_module(f"medxfer.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"medxfer.commands.{name}":
                raise


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one line (``medxfer VERB: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    _load_verbs()
    parser = _Parser(
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
    """Log ``medxfer`` messages to stderr at INFO (``--quiet``: WARNING, which also hides every
    progress bar; ``--verbose``: DEBUG). Only the ``medxfer`` logger is configured."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logger = logging.getLogger("medxfer")
    for h in [h for h in logger.handlers if getattr(h, "_medxfer_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    handler._medxfer_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    try:
        return int(args._command.run(args) or 0)
    except KeyboardInterrupt:
        print("medxfer: interrupted; finished cells are saved and a re-run resumes", file=sys.stderr)
        return 130
    except MedxferError as exc:  # the user's input; anything else is a bug and keeps its traceback
        if args.verbose:
            raise
        print(f"medxfer {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""``medxfer validate NAME=PATH [--json]``: counts per split and class, or a clear error."""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from medxfer.commands import Command, register_command
from medxfer.config import DatasetArg
from medxfer.data.records import DatasetError
from medxfer.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="NAME=PATH", help="registered NAME=PATH or LABEL=folder:DIR / csv:FILE / medmnist:FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--skip-bad", action="store_true", help="drop bad rows/images and list them as problems")
    p.add_argument("--no-check-images", action="store_true", help="do not open every image")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="adapter option (repeatable)")


def run(args: argparse.Namespace) -> int:
    from medxfer.data.validate import validate_dataset

    arg = DatasetArg.parse(args.dataset)
    options = dict(arg.options)
    for item in args.option:
        k, eq, v = item.partition("=")
        if not eq:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        options[k] = yaml.safe_load(v)
    try:
        ds = validate_dataset(arg.kind, arg.root, skip_bad=args.skip_bad,
                              check_images=not args.no_check_images, **options)
    except DatasetError as exc:
        if args.json:
            print(json.dumps({"dataset": arg.label, "total": 0, "counts": {}, "pairs": None,
                              "problems": [str(exc)]}, indent=2))
            return 1
        print(f"medxfer validate: {arg.label} cannot be used: {exc}", file=sys.stderr)
        return 1
    summary = ds.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['dataset']}: {summary['total']} images")
    for split, counts in summary["counts"].items():
        print(f"  {split:<6} " + ", ".join(f"{c}: {n}" for c, n in counts.items()))
    if summary["pairs"] is not None:
        print(f"  multi-view pairs: {summary['pairs']}")
    for p in summary["problems"]:
        print(f"  problem: {p}")
    return 0


register_command(Command("validate", "check a dataset folder: counts per split and class, or what is wrong",
                         add_arguments, run))

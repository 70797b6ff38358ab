"""``medxfer report RUN_DIR``: write ``RUN_DIR/report/`` (tables, figures, stats.json,
report.html) from the run's result JSONs, and print the files it wrote."""
from __future__ import annotations

import argparse
from pathlib import Path

from medxfer.cache import write_text_atomic
from medxfer.commands import Command, register_command
from medxfer.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="a run's output folder (holds results/)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="add the generalisation interval of every few-shot comparison: N pools resampled with "
                        "replacement (patients or images), the same episodes re-run on each from the cached "
                        "features (e.g. 1000; default 0: none)")
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED",
                   help="seed of the bootstrap resampling (default 0)")


def run(args: argparse.Namespace) -> int:
    from medxfer.report.build import build_report

    if args.bootstrap < 0 or args.bootstrap == 1:
        raise UsageError(f"--bootstrap {args.bootstrap}: give 0 (none) or at least 2 replicates, e.g. 1000")
    out = Path(args.out)
    report = build_report(out, bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    write_text_atomic(out / "summary.md", report.summary)  # the run's own summary, kept in step
    print(f"medxfer report: wrote {len(report.files)} files to {report.folder} in {report.seconds:.1f} s:")
    for name in report.files:
        print(f"  {report.folder / name}")
    print(f"  {out / 'summary.md'}")
    print(f"Open {report.html} in a browser (one self-contained file).")
    return 0


register_command(Command("report", "write RUN_DIR/report/: tables, figures, statistics and report.html",
                         add_arguments, run))

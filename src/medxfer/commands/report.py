"""``medxfer report DIR``: rebuild summary.md, results.csv and LaTeX tables from result JSONs."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from medxfer.cache import write_text_atomic
from medxfer.commands import Command, register_command
from medxfer.errors import UsageError
from medxfer.report.tables import (
    latex_table,
    protocol_tables,
    results_csv,
    summary_markdown,
)
from medxfer.results import load_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="a run's output folder (holds results/)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    results = load_results(out / "results")
    if not results:
        raise UsageError(f"no result JSONs under {out / 'results'}")
    write_text_atomic(out / "summary.md", summary_markdown(results))
    write_text_atomic(out / "results.csv", results_csv(results))
    for proto in protocol_tables(results):
        write_text_atomic(out / f"table_{re.sub(r'[^A-Za-z0-9_.=-]+', '_', proto).strip('_')}.tex",
                          latex_table(results, proto))
    print(summary_markdown(results))
    return 0


register_command(Command("report", "rebuild tables (Markdown, CSV, LaTeX) from a run's results", add_arguments, run))

"""``medxfer analyze NAME[,NAME...] ...``: the analyses as cells of a run (a thin verb over ``run``).

Exactly ``medxfer run --protocols NAME,...`` with the same options, restricted to the analyses
(saliency, invariance, reconstruction, transferability): the same cells, typed results, artifacts
and reuse.
"""
from __future__ import annotations

import argparse

from medxfer.commands import Command, register_command
from medxfer.commands.run import add_arguments as add_run_arguments
from medxfer.commands.run import report_outcome, spec_from_args
from medxfer.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("analyses", metavar="NAME[,NAME...]", help="analyses to run (see `medxfer ls protocols`)")
    add_run_arguments(p)


def run(args: argparse.Namespace) -> int:
    from medxfer.protocols import PROTOCOLS

    if args.protocols:
        raise UsageError("medxfer analyze takes the analyses as its first argument, not --protocols")
    names = [n.strip() for n in args.analyses.split(",") if n.strip()]
    analyses = [n for n, p in PROTOCOLS.items() if p.analysis]
    for n in names:
        if not PROTOCOLS.get(n).analysis:
            raise UsageError(f"{n!r} is an evaluation protocol, not an analysis (analyses: {', '.join(analyses)}); "
                             f"use medxfer run --protocols {n}")
    args.protocols = ",".join(names)
    spec = spec_from_args(args)
    if args.plan:
        from medxfer.plan import make_plan

        plan = make_plan(spec)
        print(plan.text)
        return 0 if plan.runnable else 1
    from medxfer.pipeline import run as run_pipeline

    return report_outcome(run_pipeline(spec))


register_command(Command("analyze", "run analyses (saliency, invariance, reconstruction, transferability) as cells",
                         add_arguments, run))

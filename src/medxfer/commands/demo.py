"""``medxfer demo``: the main job on built-in synthetic data, no downloads."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from medxfer.commands import Command, register_command
from medxfer.config import DatasetArg, RunSpec
from medxfer.presets import load_preset

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    p.add_argument("--models", help="comma-separated models (default: the demo preset's)")
    p.add_argument("--weights", choices=["auto", "random", "pretrained"],
                   help="auto (default: pretrained if cached, else random), random or pretrained")
    p.add_argument("--cache-dir", help="cache folder (default $MEDXFER_CACHE or ~/.cache/medxfer)")


def write_demo_data(root: Path, synthetic: dict[str, dict[str, Any]]) -> list[DatasetArg]:
    """Write (once) the synthetic datasets in their official layouts; return their dataset args."""
    from medxfer.data.synthetic import write_synthetic

    args = []
    for name, opts in synthetic.items():
        path = write_synthetic(name, root / name, seed=0, **opts)
        args.append(DatasetArg(label=name, kind=name, root=str(path)))
    return args


def run(args: argparse.Namespace) -> int:
    from medxfer.pipeline import run as run_pipeline

    t0 = time.perf_counter()
    preset = load_preset("demo")
    out = Path(args.out)
    datasets = write_demo_data(out / "data", preset["synthetic"])
    models = [m.strip() for m in args.models.split(",")] if args.models else preset["models"]
    spec = RunSpec(models=tuple(models), datasets=tuple(datasets), protocols=tuple(preset["protocols"]),
                   seeds=tuple(preset["seeds"]), weights=args.weights or preset["weights"], out=str(out),
                   cache_dir=args.cache_dir)
    outcome = run_pipeline(spec)
    from medxfer.commands.run import report_outcome

    status = report_outcome(outcome)
    print("Data: synthetic images with class-dependent structure, written in the official layouts of "
          + ", ".join(d.label for d in datasets) + f" under {out / 'data'}.")
    weights = {r.model: r.model_info.weights for r in outcome.results}
    for m, w in weights.items():
        note = " (RANDOM weights: no pretrained weights in the cache; run `medxfer fetch " + m + "` online)" \
            if w.startswith("random") else ""
        print(f"Weights of {m}: {w}{note}")
    print(f"Summary: {outcome.summary_path}  (result JSONs in {out / 'results'})")
    if outcome.report_path is not None:
        print(f"Report: {outcome.report_path}  (open it in a browser; tables, figures and stats.json beside it)")
    print(f"Demo finished in {time.perf_counter() - t0:.1f} s.", file=sys.stderr)
    return status


register_command(Command("demo", "run the few-shot benchmark on built-in synthetic datasets (no downloads)",
                         add_arguments, run))

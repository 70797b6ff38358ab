"""Report generation for the paper's full grid: 13 models x 8 datasets, few-shot, linear,
finetune and every analysis (saliency with overlays, invariance, reconstruction with images,
transferability), from fabricated result JSONs (``medxfer.testing.write_fake_paper_run``).

Times ``build_report`` (tables, statistics, 25 figures as PNG and SVG, stats.json and the
self-contained report.html) in this process, wall clock and CPU, after the imports. The
target is 10 s: ``ratio`` = 10 s / the measured wall time (>= 1 meets it).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import load_average, machine

BUDGET_S = 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=2, help="builds to time (the best is reported)")
    ap.add_argument("--keep", help="write the run here and keep it, or reuse it if it is there (default: a "
                    "temporary folder)")
    args = ap.parse_args()

    from medxfer.report.build import build_report
    from medxfer.testing import write_fake_paper_run

    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.keep or tmp) / "paper-grid"
        t0 = time.perf_counter()
        if not (run / "results").is_dir():  # a kept grid is reused
            write_fake_paper_run(run)
        n = len(list((run / "results").glob("*.json")))
        print(f"fabricated {n} result JSONs in {time.perf_counter() - t0:.1f} s ({run})")
        walls, cpus = [], []
        for i in range(args.repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            out = build_report(run)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            print(f"build {i + 1}: {walls[-1]:.2f} s wall, {cpus[-1]:.2f} s CPU; {len(out.files)} files, "
                  f"{out.figures} figures, report.html {out.html.stat().st_size / 1e6:.1f} MB; {load_average()}")
    best = min(walls)
    print(f"report for 13 models x 8 datasets: best {best:.2f} s wall ({min(cpus):.2f} s CPU); budget {BUDGET_S:g} s")
    print(f"target={1.0:g}")
    print(f"ratio={BUDGET_S / best:.3f}")


if __name__ == "__main__":
    main()

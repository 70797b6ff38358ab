"""Run every benchmark script, collect their figures and ratio lines, write BENCHMARKS.md.

Each ``benchmarks/<name>.py`` (not starting with ``_``, not this file) runs in its own
process; its last line is ``ratio=<float>``, and a ``target=<float>`` line states what the
ratio must reach. On a machine with CUDA the extraction benchmark also runs for DenseNet-121.
The report is written atomically with the machine description; the exit status is non-zero
when a script fails or prints no ratio.
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import REPO, load_average, machine  # noqa: E402
from medxfer.cache import write_text_atomic  # noqa: E402

#: arguments that keep a script's run within its timeout on a 2-core CPU (each is still the
#: script's own measurement; ``python benchmarks/NAME.py --help`` for the longer forms)
SCRIPT_ARGS: dict[str, tuple[str, ...]] = {
    "linear_probe": ("--rounds", "1"),  # one interleaved round: scikit-learn's path alone takes ~16 min here
}
#: per-script timeouts in seconds where the default (--timeout) is too short
SCRIPT_TIMEOUTS: dict[str, float] = {"linear_probe": 2700.0}

RATIO_RE = re.compile(r"^ratio=([-+0-9.eEinfa]+)\s*$")
TARGET_RE = re.compile(r"^target=([-+0-9.eE]+)\s*$")


@dataclass
class Outcome:
    name: str
    args: list[str]
    returncode: int
    seconds: float
    output: str
    ratio: float | None
    target: float | None

    @property
    def met(self) -> bool | None:
        if self.ratio is None or self.target is None:
            return None
        return self.ratio >= self.target


def scripts() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py")


def last_match(pattern: re.Pattern[str], text: str) -> float | None:
    found = [m.group(1) for line in text.splitlines() if (m := pattern.match(line.strip()))]
    return float(found[-1]) if found else None


def run_script(path: Path, args: list[str], timeout: float) -> Outcome:
    name = path.stem + (" " + " ".join(args) if args else "")
    print(f"--- {name}", flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen([sys.executable, str(path), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, proc.kill)  # a silent hang is killed too
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            print("    " + line, end="", flush=True)
        code = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    if code < 0:
        lines.append(f"killed (signal {-code}) after {time.perf_counter() - t0:.0f}s; limit {timeout:.0f}s\n")
    out = "".join(lines)
    return Outcome(name, args, code, time.perf_counter() - t0, out, last_match(RATIO_RE, out),
                   last_match(TARGET_RE, out))


def render(outcomes: list[Outcome], started: str, total: float, machine_line: str, load_before: str) -> str:
    rows = []
    for o in outcomes:
        ratio = "n/a" if o.ratio is None else f"{o.ratio:.2f}"
        target = "n/a" if o.target is None else f">= {o.target:g}"
        met = {True: "yes", False: "**no**", None: "n/a"}[o.met] if o.returncode == 0 else f"**failed ({o.returncode})**"
        rows.append(f"| `{o.name}` | {ratio} | {target} | {met} | {o.seconds:.0f} |")
    parts = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`benchmarks/run_all.py`) from the output below; do not edit by hand.",
        "Each script runs medxfer and a baseline in the same process and ends with `ratio=<float>`.",
        "All models use random weights (no network); throughput does not depend on weight values.",
        "",
        f"- run started: {started} UTC, total {total:.0f}s",
        f"- {machine_line}",
        f"- {load_before} at the start, {load_average()} at the end (other work on the machine slows "
        "every figure; the CPU benchmarks compare CPU seconds where they can)",
        "",
        "| script | ratio | target | met | seconds |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    for o in outcomes:
        parts += [f"## {o.name}", "", "```", o.output.rstrip(), "```", ""]
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="script names to run (default: all)")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per script")
    args = ap.parse_args()
    import torch

    jobs = [(p, list(SCRIPT_ARGS.get(p.stem, ()))) for p in scripts() if not args.only or p.stem in args.only]
    if torch.cuda.is_available() and any(p.stem == "extract" for p, _ in jobs):
        jobs.append((HERE / "extract.py", ["--arch", "supervised-d121"]))
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    machine_line, load_before = machine(), load_average()
    t0 = time.perf_counter()
    outcomes = [run_script(p, a, max(args.timeout, SCRIPT_TIMEOUTS.get(p.stem, 0.0))) for p, a in jobs]
    total = time.perf_counter() - t0
    write_text_atomic(args.out, render(outcomes, started, total, machine_line, load_before))
    print(f"\nwrote {args.out} ({total:.0f}s)")
    for o in outcomes:
        print(f"{o.name}: ratio={o.ratio} target={o.target} met={o.met} rc={o.returncode} {o.seconds:.0f}s")
    return 0 if all(o.returncode == 0 and o.ratio is not None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

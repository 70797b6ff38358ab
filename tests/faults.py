"""Fault injection: SIGKILL `medxfer run` at seeded random points, resume, compare.

Run by tests/test_faults.py as ``python tests/faults.py PLAN.json REPORT.json``. This process
imports medxfer (and torch) once and forks one child per run, so each run costs its work and
not the imports. Every child runs ``medxfer.cli.main(["run", ...])``, exactly the command line.

1. A reference child runs the grid uninterrupted with a profiler that counts every call of a
   medxfer function (in every thread) and notes the stage it belongs to (prepare, extract,
   linear, finetune, analysis, few-shot, report, other: the innermost medxfer module on the
   stack that names one).
2. Kill points are drawn per stage, seeded, among the reference's call indices.
3. For each point a child starts the same run on a fresh run folder and cache and SIGKILLs
   itself at that call. The parent checks that nothing half-written is visible (every result
   JSON and ``run.json`` parses, every cache artifact with a completion marker verifies), then
   a second child finishes it with ``medxfer run --resume RUN_DIR`` (or, when the kill came
   before ``run.json`` was written, the same command again), and its results are compared
   with the reference (tests/runs.py ``comparable``).
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import medxfer
import medxfer.cli  # imports torch and the verbs once, before forking
import medxfer.report.build
from medxfer.protocols import PROTOCOLS
from runs import comparable, first_difference

SRC = str(Path(medxfer.__file__).resolve().parent) + os.sep
STAGES = (
    ("prepare", ("prepare.py", "data/images.py")),
    ("extract", ("extract.py", "runtime.py")),
    ("linear", ("protocols/linear.py", "protocols/logreg.py")),
    ("finetune", ("protocols/finetune.py", "training/")),
    ("analysis", ("analysis/",)),
    ("fewshot", ("protocols/fewshot.py",)),
    ("report", ("report/",)),
)
CHILD_TIMEOUT_S = 300


def stage_of(frame: Any) -> str:
    """The stage of the innermost medxfer frame on the stack that names one."""
    depth = 0
    while frame is not None and depth < 60:
        name = frame.f_code.co_filename
        if name.startswith(SRC):
            rel = name[len(SRC):]
            for stage, prefixes in STAGES:
                if rel.startswith(prefixes):
                    return stage
        frame = frame.f_back
        depth += 1
    return "other"


class Tracer:
    """Counts calls of medxfer functions; records their stages or SIGKILLs at one of them."""

    def __init__(self, kill_at: int | None = None, record: bool = False, note: Path | None = None) -> None:
        self.n = 0
        self.kill_at = kill_at
        self.stages: list[str] | None = [] if record else None
        self.note = note
        self.lock = threading.Lock()

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(SRC):
            return
        with self.lock:
            i = self.n
            self.n += 1
        if self.stages is not None:
            self.stages.append(stage_of(frame))
        if i == self.kill_at:
            if self.note is not None:
                self.note.write_text(json.dumps({"stage": stage_of(frame), "function": frame.f_code.co_qualname,
                                                 "file": frame.f_code.co_filename[len(SRC):]}))
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        threading.setprofile(self)
        sys.setprofile(self)


def in_child(fn: Any, log: Path) -> int:
    """Run ``fn()`` in a forked child (output to ``log``); its exit code, or -signal."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            signal.alarm(CHILD_TIMEOUT_S)
            code = int(fn() or 0)
        except SystemExit as exc:
            code = int(exc.code or 0)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_args(plan: dict[str, Any], out: Path, cache: Path) -> list[str]:
    return ["run", "--quiet", *plan["args"], "--out", str(out), "--cache-dir", str(cache)]


def half_written(out: Path, cache: Path) -> list[str]:
    """Files visible under their final names that are not whole."""
    from medxfer.cache import ResumableArray
    from medxfer.results import read_result

    bad = []
    results = out / "results"
    if results.is_dir():
        for f in results.iterdir():
            if f.name.startswith("."):
                continue  # a temporary name of an interrupted atomic write: never read
            if f.suffix != ".json" or read_result(f) is None:
                bad.append(str(f))
    if (out / "run.json").exists():
        try:
            json.loads((out / "run.json").read_text())
        except json.JSONDecodeError:
            bad.append(str(out / "run.json"))
    for kind in ("prepared", "features"):
        for folder in sorted((cache / kind).glob("*")) if (cache / kind).is_dir() else []:
            art = ResumableArray(folder, f"{kind} {folder.name}")
            if art.complete and art.verify(full=True) is not None:
                bad.append(f"{folder}: {art.verify(full=True)}")
    return bad


def main(plan_path: str, report_path: str) -> None:
    PROTOCOLS.names()  # discover (import) every protocol and analysis here, once
    plan = json.loads(Path(plan_path).read_text())
    base = Path(plan["workdir"])
    t_start = time.monotonic()

    ref_out, ref_cache = base / "reference", base / "reference-cache"
    tracer = Tracer(record=True)
    stages_file = base / "reference-stages.json"

    def reference() -> int:
        tracer.install()
        rc = medxfer.cli.main(run_args(plan, ref_out, ref_cache))
        sys.setprofile(None)
        threading.setprofile(None)
        stages_file.write_text(json.dumps(tracer.stages))
        return rc

    t0 = time.monotonic()
    rc = in_child(reference, base / "reference.log")
    ref_seconds = time.monotonic() - t0
    if rc != 0:
        raise SystemExit(f"reference run failed ({rc}); see {base / 'reference.log'}")
    stages = json.loads(stages_file.read_text())
    reference_results = comparable(ref_out)
    by_stage: dict[str, list[int]] = {}
    for i, s in enumerate(stages):
        by_stage.setdefault(s, []).append(i)
    rng = random.Random(plan["seed"])
    points = []
    for stage, count in plan["points"].items():
        candidates = by_stage.get(stage, [])
        points += [(stage, i) for i in sorted(rng.sample(candidates, min(count, len(candidates))))]

    rows = []
    for n, (stage, index) in enumerate(points):
        if time.monotonic() - t_start > plan["budget_s"]:
            rows.append({"index": index, "drawn_in": stage, "skipped": "time budget spent"})
            continue
        out, cache = base / f"k{n:03d}", base / f"k{n:03d}-cache"
        note = base / f"k{n:03d}-kill.json"
        t0 = time.monotonic()

        def killed_run(index: int = index, out: Path = out, cache: Path = cache, note: Path = note) -> int:
            Tracer(kill_at=index, note=note).install()
            return medxfer.cli.main(run_args(plan, out, cache))

        rc = in_child(killed_run, base / f"k{n:03d}.log")
        row: dict[str, Any] = {"index": index, "drawn_in": stage, "killed": rc == -signal.SIGKILL, "rc": rc}
        if note.is_file():
            row.update(json.loads(note.read_text()))
        row["half_written"] = half_written(out, cache)
        row["resumed_with"] = "--resume" if (out / "run.json").is_file() else "the same command"
        if (out / "run.json").is_file():
            rc2 = in_child(lambda out=out: medxfer.cli.main(["run", "--quiet", "--resume", str(out)]),
                           base / f"k{n:03d}-resume.log")
        else:
            rc2 = in_child(lambda out=out, cache=cache: medxfer.cli.main(run_args(plan, out, cache)),
                           base / f"k{n:03d}-resume.log")
        row["resume_rc"] = rc2
        got = comparable(out) if (out / "results").is_dir() else {}
        diff = None if sorted(got) == sorted(reference_results) else f"results {sorted(got)}"
        for name in sorted(got) if diff is None else []:
            diff = diff or first_difference(got[name], reference_results[name])
        row["equal"] = diff is None
        row["difference"] = diff
        row["seconds"] = round(time.monotonic() - t0, 2)
        rows.append(row)

    Path(report_path).write_text(json.dumps({
        "reference_calls": len(stages), "reference_seconds": round(ref_seconds, 2),
        "calls_by_stage": {s: len(v) for s, v in sorted(by_stage.items())}, "points": rows,
        "seconds": round(time.monotonic() - t_start, 2)}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Two ``medxfer run`` processes at once on one cache: both finish, agree, and share the work.

Contention is made certain, not left to timing: the test holds the lock of the prepared
images, starts both runs, waits until each has logged that it is waiting for a lock (that
one, or with one output folder the first cell's, held by the other run), then lets go, so
both reach the cache at the same moment. The work is counted from what the
runs log when they do it (``prepared ...: N images decoded``, ``extracted ...``,
``converted ...``, one line per build, naming the artifact folder) and checked against the
results' own record of which run built each input.
"""
from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from medxfer.data import load_dataset
from medxfer.prepare import prepared_artifact
from medxfer.testing import write_stripes_blobs
from runs import built_counts, comparable, env, first_difference, tiny_checkpoint

N_PER_CLASS = 30
PROTOCOLS = "fewshot,transferability"  # features only, cheap: the point is the shared artifacts
FAST = ["--set", "fewshot.n_shot=4", "--set", "fewshot.n_query=4", "--set", "fewshot.episodes=20"]
WAITING = "waiting for another medxfer process to finish"  # the prepared images, or a cell (one output folder)
PREPARED = re.compile(r"prepared (\S+): (\d+) images decoded in \S+ -> (\S+)")
EXTRACTED = re.compile(r"extracted (\S+) on (\S+): (\d+) images in \S+ -> (\S+)")
CONVERTED = re.compile(r"medxfer\.models\.fetch: (\S+): converted \S+ -> (\S+)")
HANG_GUARD_S = 300  # only so that a deadlock fails the test instead of hanging it


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The image folder and three tiny checkpoints (the user's own models a, b, c)."""
    base = tmp_path_factory.mktemp("concurrency")
    found = {"data": write_stripes_blobs(base / "data", n_per_class=N_PER_CLASS, size=32)}
    for seed, name in enumerate("abc", start=3):
        found[name] = tiny_checkpoint(base / f"{name}.pth", seed=seed)
    return found


class Run:
    """A ``medxfer run`` subprocess whose stderr is collected line by line (a reader thread)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "medxfer", *args], env=env(OMP_NUM_THREADS="1"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.waiting = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.extend(part for part in line.split("\r") if part.strip())
            if WAITING in line:
                self.waiting.set()
        self.waiting.set()  # ended (a failure shows in its exit status)

    def finish(self) -> str:
        self.proc.wait(timeout=HANG_GUARD_S)
        self._reader.join(timeout=HANG_GUARD_S)
        return "\n".join(self.lines)


def run_args(inputs: dict[str, Path], models: str, out: Path, cache: Path) -> list[str]:
    ckpt = {name: f"{name}=tinycnn:{inputs[name]}" for name in "abc"}
    return ["run", "--models", ",".join(ckpt[m] for m in models), "--dataset", f"toy=folder:{inputs['data']}",
            "--image-size", "32", "--protocols", PROTOCOLS, *FAST, "--out", str(out), "--cache-dir", str(cache)]


def run_together(inputs: dict[str, Path], cache: Path, grids: list[tuple[str, Path]]) -> list[str]:
    """Start one run per (models, out) while holding the prepared images' lock; let go once
    every run waits for it. Returns each run's log; every run must exit 0."""
    from filelock import FileLock

    dataset = load_dataset("folder", inputs["data"], name="toy")
    artifact = prepared_artifact(dataset, 32, "aspect", cache)
    artifact.folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(artifact.lock_path))
    lock.acquire()
    try:
        runs = [Run(run_args(inputs, models, out, cache)) for models, out in grids]
        for r in runs:
            assert r.waiting.wait(HANG_GUARD_S), "a run never waited for a lock"
    finally:
        lock.release()
    logs = [r.finish() for r in runs]
    for r, log in zip(runs, logs):
        assert r.proc.returncode == 0, log
        assert WAITING in log  # it did wait for the lock held here
    return logs


def work_done(logs: list[str]) -> dict[str, Counter[str]]:
    """How often each artifact folder was built, over all logs: decoded, extracted, converted."""
    found: dict[str, Counter[str]] = {"decoded": Counter(), "extracted": Counter(), "converted": Counter(),
                                      "images_decoded": Counter(), "images_extracted": Counter()}
    for log in logs:
        for _name, n, folder in PREPARED.findall(log):
            found["decoded"][folder] += 1
            found["images_decoded"][folder] += int(n)
        for model, _ds, n, folder in EXTRACTED.findall(log):
            found["extracted"][f"{model} {folder}"] += 1
            found["images_extracted"][model] += int(n)
        for model, path in CONVERTED.findall(log):
            found["converted"][f"{model} {path}"] += 1
    return found


def assert_shared_results_identical(a: Path, b: Path, expected: int) -> None:
    ra, rb = comparable(a), comparable(b)
    shared = sorted(set(ra) & set(rb))
    assert len(shared) == expected, (sorted(ra), sorted(rb))
    for name in shared:
        assert first_difference(ra[name], rb[name]) is None, (name, first_difference(ra[name], rb[name]))


def test_two_runs_of_the_same_grid_on_one_cache(tmp_path: Path, inputs: dict[str, Path]) -> None:
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    logs = run_together(inputs, cache, [("ab", one), ("ab", two)])
    done = work_done(logs)
    assert list(done["decoded"].values()) == [1], done  # one prepared array, decoded by one run
    assert list(done["images_decoded"].values()) == [2 * N_PER_CLASS]
    assert sorted(k.split()[0] for k in done["extracted"]) == ["a", "b"] and set(done["extracted"].values()) == {1}
    assert done["images_extracted"] == {"a": 2 * N_PER_CLASS, "b": 2 * N_PER_CLASS}
    assert sorted(k.split()[0] for k in done["converted"]) == ["a", "b"] and set(done["converted"].values()) == {1}
    assert len(list((cache / "prepared").iterdir())) == 1 and len(list((cache / "features").iterdir())) == 2
    assert_shared_results_identical(one, two, expected=4)
    assert set(built_counts([one, two]).values()) == {1}  # the results say the same: each input built once


def test_two_runs_of_overlapping_grids_on_one_cache(tmp_path: Path, inputs: dict[str, Path]) -> None:
    """Models {a, b} and {b, c}: the images are decoded once, b's features extracted once
    (by whichever run got there first), and the b cells of both runs agree."""
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    logs = run_together(inputs, cache, [("ab", one), ("bc", two)])
    done = work_done(logs)
    assert list(done["decoded"].values()) == [1] and list(done["images_decoded"].values()) == [2 * N_PER_CLASS]
    assert sorted(k.split()[0] for k in done["extracted"]) == ["a", "b", "c"]
    assert set(done["extracted"].values()) == {1}, done
    assert sorted(k.split()[0] for k in done["converted"]) == ["a", "b", "c"]
    assert set(done["converted"].values()) == {1}, done
    assert_shared_results_identical(one, two, expected=2)  # b x toy x {fewshot, transferability}
    assert set(built_counts([one, two]).values()) == {1}


def test_two_runs_of_the_same_grid_into_one_output_folder(tmp_path: Path, inputs: dict[str, Path]) -> None:
    """The cell lock: each cell is computed by one run and reused by the other."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    logs = run_together(inputs, cache, [("ab", out), ("ab", out)])
    done = work_done(logs)
    assert list(done["decoded"].values()) == [1] and set(done["extracted"].values()) == {1}
    totals = [re.search(r"computed (\d+) cell\(s\), reused (\d+)", log) for log in logs]
    assert all(totals), logs
    computed = [int(m.group(1)) for m in totals if m]
    reused = [int(m.group(2)) for m in totals if m]
    assert sum(computed) == 4 and sum(reused) == 4, (computed, reused)  # 4 cells, each computed exactly once
    assert len(list((out / "results").glob("*.json"))) == 4


def test_a_corrupt_artifact_is_removed_only_under_its_lock(tmp_path: Path) -> None:
    """A run that finds a corrupt artifact must not delete it outside the lock: another run
    may be rebuilding it there. Reading leaves it alone; get_or_build repairs it under the lock."""
    import numpy as np

    from medxfer.cache import ResumableArray

    art = ResumableArray(tmp_path / "artifact", "a test array")

    def build(a: ResumableArray) -> dict[str, int]:
        part = a.start((4, 2), np.float32, checkpoint_every=10)
        part.array[:] = 1.0
        part.mark(np.arange(4))
        a.finish(part, {"v": 1})
        return {"v": 1}

    art.get_or_build(build)
    with open(art.array_path, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")  # the last value becomes inf: the SHA-256 no longer matches
    assert art.load() is None  # not used ...
    assert art.complete and art.array_path.is_file()  # ... and not removed by a mere reader
    array, meta, built = art.get_or_build(build)
    assert built and meta == {"v": 1} and art.verify() is None and np.all(array == 1.0)

"""``medxfer cache ls|verify|prune`` on real artifacts made by prepare and extract on tiny
synthetic images, and the lock and last-use rules behind it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from medxfer.cache import LAST_USED, default_cache_dir
from medxfer.cli import main
from medxfer.errors import UsageError
from medxfer.inventory import parse_age

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


@dataclass
class Made:
    cache: Path
    prepared: Path
    features: dict[str, Path]  # model -> features folder


def _make(tmp_path: Path) -> Made:
    import dataclasses

    from medxfer.data import load_dataset
    from medxfer.extract import extract_features
    from medxfer.models import MODELS, load_model
    from medxfer.models.spec import register_model
    from medxfer.prepare import prepare
    from medxfer.testing import write_stripes_blobs

    register_model(dataclasses.replace(MODELS.get("test-tiny"), name="tiny-b", aliases=()))
    cache = default_cache_dir()
    ds = load_dataset("folder", write_stripes_blobs(tmp_path / "data", n_per_class=4, size=SIZE), name="toy")
    p = prepare(ds, size=SIZE, cache_dir=cache, workers=0, progress=False)
    # other random weights: features are keyed by the weights, so equal weights would share them
    feats = {m: Path(extract_features(load_model(m, weights="random", seed=seed), p, cache_dir=cache, device="cpu",
                                      progress=False).meta["path"]) for m, seed in (("test-tiny", 0), ("tiny-b", 1))}
    return Made(cache, p.path, feats)


@pytest.fixture
def made(tmp_path: Path) -> Made:
    return _make(tmp_path)


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict]]:
    rc = main(["cache", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def _partial_features(tmp_path: Path, made: Made) -> Path:
    """Features of a third model whose extraction was killed after its first flush."""
    import dataclasses

    from medxfer.data import load_dataset
    from medxfer.extract import extract_features
    from medxfer.models import MODELS, load_model
    from medxfer.models.spec import register_model
    from medxfer.prepare import prepare

    register_model(dataclasses.replace(MODELS.get("test-tiny"), name="tiny-killed", aliases=()))

    class Killed(Exception):
        pass

    def kill(done: int, total: int) -> None:
        raise Killed

    p = prepare(load_dataset("folder", tmp_path / "data", name="toy"), size=SIZE, cache_dir=made.cache, workers=0,
                progress=False)
    with pytest.raises(Killed):
        extract_features(load_model("tiny-killed", weights="random", seed=2), p, cache_dir=made.cache, device="cpu",
                         batch_size=2, checkpoint_every=1, on_progress=kill, progress=False)
    (folder,) = [f for f in (made.cache / "features").iterdir() if f not in made.features.values()]
    return folder


# --------------------------------------------------------------------------- ls

def test_ls_lists_every_artifact_with_what_made_it(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    rc, rows = _json(capsys, "ls")
    assert rc == 0
    by_path = {Path(r["path"]): r for r in rows}
    assert set(by_path) == {made.prepared, *made.features.values()}
    prep = by_path[made.prepared]
    assert prep["kind"] == "prepared" and prep["dataset"] == "toy" and prep["model"] is None
    assert "32px aspect" in prep["detail"] and prep["complete"] and prep["key"] == made.prepared.name
    for model, folder in made.features.items():
        r = by_path[folder]
        assert (r["kind"], r["model"], r["dataset"], r["complete"]) == ("features", model, "toy", True)
        assert r["size"] > 0 and r["last_used_from"] == "stamp" and r["lock"] == str(folder / ".lock")
    assert main(["cache", "ls"]) == 0
    text = capsys.readouterr().out
    assert "tiny-b" in text and "complete" in text and "3 artifact(s)" in text


def test_ls_describes_an_unfinished_artifact_from_its_about_file(tmp_path: Path, made: Made,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = _partial_features(tmp_path, made)
    _, rows = _json(capsys, "ls", "--incomplete")
    assert [(r["path"], r["model"], r["dataset"], r["complete"]) for r in rows] == \
        [(str(folder), "tiny-killed", "toy", False)]
    assert rows[0]["progress"].endswith("/8 rows") and not rows[0]["progress"].startswith("8/")


def test_last_use_is_stamped_on_every_read_and_falls_back_to_mtime(made: Made,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from medxfer.cache import ResumableArray

    stamp = made.prepared / LAST_USED
    old = time.time() - 40 * 86400
    stamp.write_text(json.dumps({"time": old}))
    _, rows = _json(capsys, "ls", "--kind", "prepared")
    assert rows[0]["last_used"] == pytest.approx(old) and rows[0]["last_used_from"] == "stamp"
    assert ResumableArray(made.prepared, "prepared").load() is not None  # what prepare() does on reuse
    _, rows = _json(capsys, "ls", "--kind", "prepared")
    assert time.time() - rows[0]["last_used"] < 60
    stamp.unlink()
    os.utime(made.prepared / "array.npy", (old, old))
    os.utime(made.prepared / "complete.json", (old, old))
    _, rows = _json(capsys, "ls", "--kind", "prepared")
    assert rows[0]["last_used_from"] == "mtime"
    assert rows[0]["last_used"] == pytest.approx(max(p.stat().st_mtime for p in made.prepared.iterdir()
                                                     if p.name != ".lock"))


# --------------------------------------------------------------------------- verify

def test_verify_passes_then_names_a_corrupt_features_file(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 3 and "CORRUPT" not in out
    array = made.features["tiny-b"] / "array.npy"
    with open(array, "r+b") as f:  # one byte of the last feature
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert main(["cache", "verify"]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = [line for line in lines if line.startswith("CORRUPT")]
    assert len(bad) == 1 and str(array) in bad[0] and "tiny-b" in bad[0] and "SHA-256" in bad[0]
    assert sum(line.startswith("OK") for line in lines) == 2
    rc, rows = _json(capsys, "verify", "--model", "test-tiny")
    assert rc == 0 and [r["status"] for r in rows] == ["OK"]


def test_verify_reports_truncation_and_unfinished_work(tmp_path: Path, made: Made,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    partial = _partial_features(tmp_path, made)
    rc, rows = _json(capsys, "verify")
    status = {r["path"]: r["status"] for r in rows}
    assert rc == 0 and status[str(partial)] == "INCOMPLETE"
    array = made.prepared / "array.npy"
    with open(array, "r+b") as f:
        f.truncate(array.stat().st_size - 10)
    rc, rows = _json(capsys, "verify", "--kind", "prepared")
    assert rc == 1 and rows[0]["status"] == "CORRUPT" and "truncated" in rows[0]["message"]


# --------------------------------------------------------------------------- prune

def test_prune_by_model_removes_only_that_models_features(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "prune", "--model", "tiny-b", "--dry-run"]) == 0
    assert "would remove features" in capsys.readouterr().out and made.features["tiny-b"].is_dir()
    assert main(["cache", "prune", "--model", "tiny-b"]) == 0
    out = capsys.readouterr().out
    assert f"removed features {made.features['tiny-b'].name}" in out and "1 artifact(s) removed" in out
    assert not made.features["tiny-b"].exists()
    assert made.features["test-tiny"].is_dir() and made.prepared.is_dir()
    assert not [p for p in (made.cache / "features").iterdir() if p.name.startswith(".")]  # no leftovers
    assert main(["cache", "verify"]) == 0


def test_prune_by_dataset_and_age(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "prune", "--dataset", "other"]) == 0
    assert "0 artifact(s) removed" in capsys.readouterr().out
    (made.prepared / LAST_USED).write_text(json.dumps({"time": time.time() - 31 * 86400}))
    assert main(["cache", "prune", "--older-than", "30d"]) == 0
    assert not made.prepared.exists() and all(f.is_dir() for f in made.features.values())
    assert main(["cache", "prune", "--dataset", "toy", "--kind", "features"]) == 0
    assert not any(f.exists() for f in made.features.values())


def test_prune_never_removes_an_artifact_locked_by_another_process(made: Made,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = made.features["test-tiny"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom filelock import FileLock\nl = FileLock(sys.argv[1])\n"
         "l.acquire()\nprint('held', flush=True)\nsys.stdin.read()\nl.release()\n", str(folder / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["cache", "prune", "--all"]) == 0
        out = capsys.readouterr().out
        assert "skipped features" in out and "locked by a run in progress" in out and str(folder / ".lock") in out
        assert folder.is_dir() and (folder / "complete.json").is_file()
        assert not made.prepared.exists() and not made.features["tiny-b"].exists()
    finally:
        holder.communicate("", timeout=30)
    assert main(["cache", "prune", "--model", "test-tiny"]) == 0
    assert not folder.exists()


def test_a_writer_waiting_on_a_pruned_lock_locks_the_new_folder(tmp_path: Path) -> None:
    from filelock import FileLock

    folder = tmp_path / "features" / "abc"
    folder.mkdir(parents=True)
    code = ("import os, sys\nfrom medxfer.cache import file_lock\nfrom pathlib import Path\n"
            "lock = Path(sys.argv[1])\nprint('waiting', flush=True)\n"
            "with file_lock(lock, 'test'):\n    print(lock.parent.is_dir() and lock.is_file(), flush=True)\n")
    held = FileLock(str(folder / ".lock"))
    held.acquire()
    writer = subprocess.Popen([sys.executable, "-c", code, str(folder / ".lock")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert writer.stdout is not None and writer.stdout.readline().strip() == "waiting"
    time.sleep(1.0)  # the writer is now blocked on the held lock
    os.rename(folder, folder.with_name(".abc.prune-test"))  # what prune does under the lock
    held.release()
    out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0 and out.strip() == "True"


def test_prune_needs_a_filter_and_ages_are_parsed_clearly(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "prune"]) == 2
    assert "--all" in capsys.readouterr().err and made.prepared.is_dir()
    assert parse_age("30d") == 30 * 86400 and parse_age("12h") == 12 * 3600 and parse_age("1.5m") == 90
    assert parse_age("2w") == 14 * 86400 and parse_age("45s") == 45
    for bad in ("3x", "30", "d", "-1d", "", "thirty days"):
        with pytest.raises(UsageError, match=f"--older-than {bad!r}"):
            parse_age(bad)
    assert main(["cache", "prune", "--older-than", "3x"]) == 2
    err = capsys.readouterr().err
    assert "--older-than '3x'" in err and "30d" in err and made.prepared.is_dir()


def test_missing_cache_lists_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, rows = _json(capsys, "ls", "--cache-dir", str(tmp_path / "nowhere"))
    assert rc == 0 and rows == [] and not (tmp_path / "nowhere").exists()


def test_weights_and_auxiliary_files_are_listed_and_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from medxfer.models.auxiliary import AUXILIARY, fetch_auxiliary
    from medxfer.models.checkpoint import save_converted

    cache = default_cache_dir()
    weights = cache / "weights" / "test-tiny-0123456789ab.safetensors"
    save_converted(weights, {"w": torch.zeros(4, 4)}, {"medxfer_model": "test-tiny", "format": "torchvision"})
    src = tmp_path / AUXILIARY.get("lpips-alex").filename
    src.write_bytes(b"not really alexnet")
    aux = fetch_auxiliary("lpips-alex", source=src, cache_dir=cache, verify_hash=False)
    rc, rows = _json(capsys, "verify")
    got = {r["kind"]: (r["model"], r["status"]) for r in rows}
    assert rc == 0 and got == {"weights": ("test-tiny", "UNCHECKED"), "auxiliary": ("lpips-alex", "OK")}
    aux.write_bytes(b"not really alexneT")
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 4)
    rc, rows = _json(capsys, "verify")
    assert rc == 1 and {r["kind"]: r["status"] for r in rows} == {"weights": "CORRUPT", "auxiliary": "CORRUPT"}
    assert all(r["path"] in r["message"] for r in rows)
    assert main(["cache", "prune", "--model", "lpips-alex"]) == 0
    assert not aux.exists() and not aux.with_suffix(".sha256").exists() and weights.is_file()


def test_prune_deletes_what_an_interrupted_prune_left(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    left = made.cache / "features" / f".{made.features['tiny-b'].name}.prune-dead"
    os.rename(made.features["tiny-b"], left)
    _, rows = _json(capsys, "ls")
    assert str(left) not in {r["path"] for r in rows} and len(rows) == 2  # out of view already
    assert main(["cache", "prune", "--model", "test-tiny"]) == 0
    assert not left.exists() and not made.features["test-tiny"].exists() and made.prepared.is_dir()


def test_a_pretrained_model_is_one_artifact_with_its_record_weights_and_work_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lightly")
    from medxfer.pretrain import PretrainParams, parse_data, pretrain
    from medxfer.testing import write_stripes_blobs

    toy = parse_data(f"toy=folder:{write_stripes_blobs(tmp_path / 'data', n_per_class=4, size=32)}")
    out = pretrain("mine", "test-tiny", [toy], PretrainParams(steps=2, batch_size=4, size=32, queue=64, out_dim=64,
                                                              n_local=2, checkpoint_every=1),
                   weights="random", cache_dir=default_cache_dir(), device="cpu")
    rc, rows = _json(capsys, "verify", "--kind", "pretrained")
    assert rc == 0 and len(rows) == 1
    r = rows[0]
    assert (r["model"], r["dataset"], r["status"], r["complete"]) == ("mine", "toy", "OK", True)
    assert str(out.weights_path) in r["paths"] and str(out.record_path) == r["path"]
    rc, rows = _json(capsys, "ls", "--kind", "weights")
    assert rows == []  # its weights belong to the pretrained artifact
    with open(out.weights_path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert main(["cache", "verify", "--model", "mine"]) == 1
    assert str(out.weights_path) in capsys.readouterr().out
    assert main(["cache", "prune", "--model", "mine"]) == 0
    assert not out.weights_path.exists() and not out.record_path.exists()
    assert not (default_cache_dir() / "pretrain" / "mine").exists()

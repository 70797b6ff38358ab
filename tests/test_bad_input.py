"""Bad input at every entry of ``medxfer run``, as one table driving the real CLI in-process.

Every case gives exactly one line ``medxfer run: error: ...`` naming the file or key, exits 2,
and leaves nothing half-written in the output and cache folders (no temporary files, no
result or JSON file that does not parse, no artifact with a completion marker that fails
verification, no preallocated array without its resume state). File-system cases use real
mounts (a read-only or size-limited tmpfs) where this process may mount, and otherwise are
skipped with the reason; the same failures are also injected at the system calls (``ENOSPC``
from ``posix_fallocate`` or ``fsync``, ``EROFS``/``EACCES`` from ``mkdir``/``open``), which
runs everywhere. ``MEDXFER_BAD_INPUT_TABLE=FILE`` appends each case's outcome to FILE as JSON
lines (the table of the issue's report).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from medxfer.cache import ResumableArray
from medxfer.cli import main
from medxfer.results import read_result
from medxfer.testing import write_stripes_blobs

FAST = ["--set", "fewshot.n_shot=4", "--set", "fewshot.n_query=4", "--set", "fewshot.episodes=10"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 tiny greyscale images in two classes (an image folder)."""
    return write_stripes_blobs(tmp_path_factory.mktemp("data") / "toy", n_per_class=12, size=40)


class Mounts:
    """tmpfs mounts made by one test, lazily unmounted afterwards; a test that needs one is
    skipped (with the reason) where this process may not mount."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def tmpfs(self, target: Path, size: str = "1m", read_only: bool = False) -> Path:
        if not IS_ROOT:
            pytest.skip("mounting a tmpfs needs root; the injected-errno cases cover this failure")
        target.mkdir(parents=True, exist_ok=True)
        options = f"{'ro,' if read_only else ''}size={size}"
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the injected-errno cases cover this")
        self.mounted.append(target)
        return target

    def close(self) -> None:
        for target in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@dataclass
class Where:
    """What a case's setup gets and may change: a scratch folder, the data, the output and
    cache folders of the run, mounts and a monkeypatch for injected failures."""

    tmp: Path
    data: Path
    out: Path
    cache: Path
    mounts: Mounts
    monkeypatch: pytest.MonkeyPatch
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def run(self, *extra: str, dataset: str | None = None) -> list[str]:
        """``medxfer run`` of the tiny few-shot cell on ``dataset`` (default the toy folder),
        then ``extra`` (later options win)."""
        return ["run", "--quiet", "--models", "test-tiny", "--weights", "random", "--dataset",
                dataset or f"toy=folder:{self.data}", "--image-size", "32", *FAST, "--out", str(self.out),
                "--cache-dir", str(self.cache), *extra]

    def spec_file(self, text: str, name: str = "spec.yaml") -> str:
        path = self.tmp / name
        path.write_text(text.replace("DATA", str(self.data)))
        return str(path)


@dataclass(frozen=True)
class Case:
    """One bad input: ``setup`` returns the arguments; ``expect`` are substrings of the error
    line (``{out}``, ``{cache}``, ``{tmp}``, ``{data}`` filled in); ``out_absent``: the output
    folder must not even be created (the input is refused before any work)."""

    id: str
    setup: Callable[[Where], list[str]]
    expect: tuple[str, ...]
    out_absent: bool = True


SPEC_OK = 'models: [test-tiny]\ndatasets: ["toy=folder:DATA"]\nweights: random\nimage_size: 32\n'


def _errno_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _inject_fsync(w: Where, under: Path, code: int) -> None:
    """``fsync`` of any file whose path starts with ``under`` fails with ``code`` (data that
    cannot be flushed: what NFS or a delayed allocation reports on a full disk)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if _fd_path(fd).startswith(str(under)) and os.path.isfile(_fd_path(fd)):
            raise _errno_error(code)
        real(fd)
    w.monkeypatch.setattr(os, "fsync", fsync)


def _inject_fallocate(w: Where) -> None:
    """Reserving an array's blocks fails: the disk is full."""
    def fallocate(fd: int, offset: int, length: int) -> None:
        raise _errno_error(errno.ENOSPC)
    w.monkeypatch.setattr(os, "posix_fallocate", fallocate)


def _inject_denied(w: Where, under: Path, code: int) -> None:
    """Creating a folder or opening a file for writing under ``under`` fails with ``code`` (a
    read-only file system, or a permission that root's chmod cannot take away)."""
    real_mkdir, real_open = os.mkdir, os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path).startswith(str(under)):
            raise _errno_error(code)
        real_mkdir(path, *args, **kwargs)

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & writing and os.fspath(path).startswith(str(under)):
            raise _errno_error(code)
        return real_open(path, flags, *args, **kwargs)
    w.monkeypatch.setattr(os, "mkdir", mkdir)
    w.monkeypatch.setattr(os, "open", open_)


def _locked_parent(w: Where) -> list[str]:
    if IS_ROOT:
        pytest.skip("running as root, where chmod 0o500 does not deny writing; see out-denied-injected, "
                    "out-parent-is-a-file and out-read-only-tmpfs")
    locked = w.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    w.cleanups.append(lambda: locked.chmod(0o700))
    w.out = locked / "out"
    return w.run()


def _blocked_out(w: Where) -> list[str]:
    (w.tmp / "a-file").write_text("x")
    w.out = w.tmp / "a-file" / "out"
    return w.run()


def _ro_out(w: Where) -> list[str]:
    w.out = w.mounts.tmpfs(w.tmp / "ro", read_only=True) / "out"
    return w.run()


def _ro_results(w: Where) -> list[str]:
    w.mounts.tmpfs(w.out / "results", read_only=True)
    return w.run()


def _ro_cache(w: Where) -> list[str]:
    w.cache = w.mounts.tmpfs(w.tmp / "ro", read_only=True) / "cache"
    return w.run()


def _ro_cache_part(w: Where) -> list[str]:
    w.mounts.tmpfs(w.cache / "prepared", read_only=True)
    return w.run()


def _full_cache(size: str) -> Callable[[Where], list[str]]:
    def setup(w: Where) -> list[str]:
        w.cache = w.mounts.tmpfs(w.tmp / "small", size=size) / "cache"
        return w.run()
    return setup


def _full_out(size: str) -> Callable[[Where], list[str]]:
    def setup(w: Where) -> list[str]:
        w.out = w.mounts.tmpfs(w.tmp / "small", size=size) / "out"
        return w.run()
    return setup


def _then(inject: Callable[[Where], None]) -> Callable[[Where], list[str]]:
    def setup(w: Where) -> list[str]:
        inject(w)
        return w.run()
    return setup


CASES = [
    # spec files
    Case("yaml-malformed", lambda w: w.run("--config", w.spec_file('models: [test-tiny\ndatasets: ["toy=x"]\n')),
         ("{tmp}/spec.yaml: line 2, column 9: invalid YAML in run spec", "expected ',' or ']'")),
    Case("yaml-tab-indent", lambda w: w.run("--config", w.spec_file(SPEC_OK + "\tseeds: [1]\n")),
         ("{tmp}/spec.yaml: line 5, column 1: invalid YAML in run spec", "'\\t'")),
    Case("yaml-not-a-mapping", lambda w: w.run("--config", w.spec_file("- test-tiny\n")),
         ("{tmp}/spec.yaml: a run spec must be a mapping",)),
    Case("yaml-missing-file", lambda w: w.run("--config", str(w.tmp / "nowhere.yaml")),
         ("{tmp}/nowhere.yaml: run spec not found",)),
    Case("yaml-unknown-field", lambda w: w.run("--config", w.spec_file(SPEC_OK + "imagesize: 32\n")),
         ("{tmp}/spec.yaml: unknown field(s) imagesize", "Did you mean 'image_size'")),
    Case("yaml-wrong-type", lambda w: w.run("--config", w.spec_file(SPEC_OK + "seeds: [zero]\n")),
         ("{tmp}/spec.yaml: seeds: ['zero']: expected an integer",)),
    Case("yaml-wrong-type-param", lambda w: w.run("--config", w.spec_file(
        SPEC_OK + "protocol_params: {fewshot: {n_shot: five}}\n")),
         ("{tmp}/spec.yaml", "protocol_params.fewshot.n_shot='five': expected an integer")),
    Case("yaml-unknown-param", lambda w: w.run("--config", w.spec_file(
        SPEC_OK + "protocol_params: {fewshot: {n_shto: 5}}\n")),
         ("{tmp}/spec.yaml", "unknown 'protocol_params.fewshot.n_shto'",
          "Did you mean 'protocol_params.fewshot.n_shot'")),
    Case("yaml-unknown-model", lambda w: w.run("--config", w.spec_file(SPEC_OK.replace("test-tiny", "resnet-5O"))),
         ("{tmp}/spec.yaml: models[0]: unknown model 'resnet-5O'", "Did you mean 'resnet50'")),
    Case("yaml-unknown-dataset", lambda w: w.run("--config", w.spec_file(SPEC_OK.replace("toy=folder:DATA",
                                                                                        "shenzen=DATA"))),
         ("{tmp}/spec.yaml: datasets[0]: unknown dataset 'shenzen'", "Did you mean 'shenzhen'")),
    Case("yaml-unknown-dataset-option", lambda w: w.run("--config", w.spec_file(SPEC_OK.replace(
        '"toy=folder:DATA"', "{label: toy, kind: folder, root: DATA, options: {colour: red}}"))),
         ("{tmp}/spec.yaml: dataset 'toy': unknown 'datasets[0].options.colour'",)),
    Case("yaml-unknown-protocol", lambda w: w.run("--config", w.spec_file(SPEC_OK + "protocols: [fewshto]\n")),
         ("{tmp}/spec.yaml: protocols[0]: unknown protocol 'fewshto'", "Did you mean 'fewshot'")),
    Case("model-file-malformed", lambda w: w.run("--model-file", w.spec_file("models: [{name: x\n", "m.yaml")),
         ("{tmp}/m.yaml: line 2, column 1: invalid YAML in model file",)),
    # names on the command line
    Case("unknown-model", lambda w: w.run("--models", "resnet-5O"),
         ("unknown model 'resnet-5O'", "Did you mean 'resnet50'")),
    Case("unknown-dataset", lambda w: w.run(dataset=f"shenzen={w.data}"),
         ("unknown dataset 'shenzen'", "Did you mean 'shenzhen'")),
    Case("unknown-protocol", lambda w: w.run("--protocols", "fewshto"),
         ("unknown protocol 'fewshto'", "Did you mean 'fewshot'")),
    Case("unknown-protocol-in-set", lambda w: w.run("--set", "fewshto.n_shot=3"),
         ("unknown protocol 'fewshto'", "Did you mean 'fewshot'")),
    Case("unknown-param-in-set", lambda w: w.run("--set", "fewshot.n_shto=3"),
         ("unknown '--set fewshot.n_shto'", "Did you mean '--set fewshot.n_shot'")),
    Case("unknown-dataset-option", lambda w: w.run("--dataset-option", "toy.colour=red"),
         ("unknown '--dataset-option toy.colour'",)),
    # wrong types on the command line
    Case("set-wrong-type", lambda w: w.run("--set", "fewshot.n_shot=five"),
         ("--set fewshot.n_shot='five': expected an integer",)),
    Case("set-float-for-int", lambda w: w.run("--set", "fewshot.n_shot=1.5"),
         ("--set fewshot.n_shot=1.5: expected an integer",)),
    Case("set-invalid-yaml-value", lambda w: w.run("--set", "fewshot.n_shot=[1"),
         ("--set 'fewshot.n_shot=[1': n_shot: the value is not valid YAML",)),
    Case("set-without-dot", lambda w: w.run("--set", "n_shot=5"), ("--set 'n_shot=5': expected GROUP.KEY=VALUE",)),
    Case("option-wrong-type", lambda w: w.run("--image-size", "big"),
         ("argument --image-size: invalid int value: 'big' (see medxfer run --help)",)),
    Case("option-out-of-range", lambda w: w.run("--image-size", "8"), ("image_size: 8 is too small",)),
    # missing dataset paths
    Case("dataset-folder-missing", lambda w: w.run(dataset=f"toy=folder:{w.tmp / 'gone'}"),
         ("dataset 'toy': {tmp}/gone: image folder not found",)),
    Case("dataset-csv-missing", lambda w: w.run(dataset=f"toy=csv:{w.tmp / 'gone.csv'}"),
         ("dataset 'toy': {tmp}/gone.csv: file not found",)),
    Case("dataset-registered-missing", lambda w: w.run(dataset=f"shenzhen={w.tmp / 'gone'}"),
         ("dataset 'shenzhen': {tmp}/gone: no CXR_png/ folder found",)),
    # an output folder that cannot be written
    Case("out-parent-is-a-file", _blocked_out, ("output folder {out}", "{tmp}/a-file is a file, not a folder")),
    Case("out-parent-chmod-500", _locked_parent, ("output folder {out}", "{tmp}/locked is not writable")),
    Case("out-read-only-tmpfs", _ro_out, ("output folder {out}", "{tmp}/ro is on a read-only file system")),
    Case("results-read-only-tmpfs", _ro_results, ("results folder {out}/results", "is on a read-only file system"),
         out_absent=False),
    Case("out-denied-injected", _then(lambda w: _inject_denied(w, w.out / "results", errno.EACCES)),
         ("{out}/results: cannot write there (permission denied)",), out_absent=False),
    # a cache folder on a read-only file system
    Case("cache-read-only-tmpfs", _ro_cache, ("cache folder {cache}: cannot write there (read-only file system)",)),
    Case("cache-prepared-read-only-tmpfs", _ro_cache_part,
         ("cache folder for prepared images of toy (32px, aspect) {cache}/prepared/",
          "cannot write there (read-only file system)"), out_absent=False),
    Case("cache-read-only-injected", _then(lambda w: _inject_denied(w, w.cache, errno.EROFS)),
         ("cache folder {cache}: cannot write there (read-only file system)",)),
    # a full disk
    Case("cache-full-tmpfs-8k", _full_cache("8k"),
         ("prepared images of toy (32px, aspect) {cache}/prepared/", "/array.npy: cannot write, no space left"),
         out_absent=False),
    Case("cache-full-tmpfs-40k", _full_cache("40k"), ("{cache}/", ": cannot write, no space left on the device"),
         out_absent=False),
    Case("out-full-tmpfs-12k", _full_out("12k"), ("{out}/", ": cannot write, no space left on the device"),
         out_absent=False),
    Case("out-full-tmpfs-40k", _full_out("40k"), ("{out}/report/", ": cannot write, no space left on the device"),
         out_absent=False),
    Case("cache-full-injected-fallocate", _then(_inject_fallocate),
         ("prepared images of toy (32px, aspect) {cache}/prepared/", "/array.npy: cannot write, no space left"),
         out_absent=False),
    Case("results-full-injected-fsync", _then(lambda w: _inject_fsync(w, w.out / "results", errno.ENOSPC)),
         ("{out}/results/test-tiny__toy__fewshot__seed0__", ".json: cannot write, no space left on the device"),
         out_absent=False),
    Case("run-record-over-quota-injected", _then(lambda w: _inject_fsync(w, w.out / ".run.json.", errno.EDQUOT)),
         ("{out}/run.json: cannot write, over the disk quota",), out_absent=False),
]


def _files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file())


def assert_nothing_half_written(*roots: Path) -> None:
    """No temporary or probe file; every JSON parses (results as results); every artifact with
    a completion marker verifies, and an array without one is a resumable partial (its state
    beside it); a report manifest matches its files."""
    for p in _files(*roots):
        assert not p.name.endswith(".tmp") and not p.name.startswith(".medxfer-write-test."), p
        if p.suffix == ".json":
            if p.parent.name == "results":
                assert read_result(p) is not None, p
            else:
                json.loads(p.read_text())
        if p.name == "complete.json":
            assert ResumableArray(p.parent, str(p.parent)).verify() is None, p.parent
        if p.name == "array.npy" and not (p.parent / "complete.json").exists():
            assert (p.parent / "state.npy").is_file(), f"{p}: an array with neither marker nor resume state"
        if p.name == "manifest.json":
            for name, sha in json.loads(p.read_text())["files"].items():
                assert hashlib.sha256((p.parent / name).read_bytes()).hexdigest() == sha, p.parent / name


def _record(case: Case, rc: int, err: str, w: Where) -> None:
    table = os.environ.get("MEDXFER_BAD_INPUT_TABLE")
    if not table:
        return
    left = [str(p.relative_to(w.tmp)) for p in _files(w.out, w.cache) if p.name != ".lock" and "locks" not in p.parts]
    with open(table, "a", encoding="utf-8") as f:
        f.write(json.dumps({"case": case.id, "rc": rc, "error": err, "left": left}) + "\n")


def cli(argv: list[str]) -> int:
    """``medxfer ARGV`` in this process: its exit status (argparse's own errors exit too)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture
def where(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Where]:
    mounts = Mounts()
    w = Where(tmp=tmp_path, data=data, out=tmp_path / "out", cache=tmp_path / "cache", mounts=mounts,
              monkeypatch=monkeypatch)
    yield w
    monkeypatch.undo()
    mounts.close()
    for cleanup in w.cleanups:
        cleanup()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_and_leaves_nothing_half_written(case: Case, where: Where, capsys) -> None:
    argv = case.setup(where)
    rc = cli(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    _record(case, rc, err, where)
    assert rc == 2, err
    assert captured.out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("medxfer run: error: "), err
    assert "Traceback" not in err
    for text in case.expect:
        expected = text.format(out=where.out, cache=where.cache, tmp=where.tmp, data=where.data)
        assert expected in err, f"{expected!r} not in {err!r}"
    where.monkeypatch.undo()  # walk the folders with the real system calls
    if case.out_absent:
        assert not where.out.exists(), _files(where.out)
    assert_nothing_half_written(where.out, where.cache)


def test_a_full_disk_leaves_a_run_that_resumes_once_there_is_space(tmp_path: Path, data: Path, capsys) -> None:
    """After ENOSPC at the result, the same command on a disk with space reuses the cached
    artifacts (they verified) and writes the result: nothing from the failed run is in the way."""
    w = Where(tmp=tmp_path, data=data, out=tmp_path / "out", cache=tmp_path / "cache", mounts=Mounts(),
              monkeypatch=pytest.MonkeyPatch())
    _inject_fsync(w, w.out / "results", errno.ENOSPC)
    try:
        assert main(w.run()) == 2
    finally:
        w.monkeypatch.undo()
    capsys.readouterr()
    assert main(w.run()) == 0
    results = list((w.out / "results").glob("*.json"))
    assert len(results) == 1 and read_result(results[0]) is not None
    inputs = json.loads(results[0].read_text())["inputs"]
    assert inputs and not any(entry["built"] for entry in inputs.values())  # prepared and extracted before
    assert_nothing_half_written(w.out, w.cache)


def test_a_disk_that_fills_under_the_memory_map_is_an_error_not_a_crash(tmp_path: Path, data: Path) -> None:
    """A 20 KiB tmpfs holds the array's header and last page, not its 28 KiB of pixels: the
    blocks are reserved before the memory map is written, so the real ``medxfer run`` exits 2
    with one line instead of dying of SIGBUS (exit 135) on the first unbacked page."""
    from runs import medxfer

    mounts = Mounts()
    try:
        cache = mounts.tmpfs(tmp_path / "small", size="20k") / "cache"
        w = Where(tmp=tmp_path, data=data, out=tmp_path / "out", cache=cache, mounts=mounts,
                  monkeypatch=pytest.MonkeyPatch())
        proc = medxfer(*w.run(), timeout=300)
        err = proc.stderr.strip()
        assert proc.returncode == 2, (proc.returncode, err)
        assert len(err.splitlines()) == 1 and "array.npy: cannot write, no space left on the device" in err, err
        assert_nothing_half_written(w.out, cache)
    finally:
        mounts.close()


def test_a_writer_that_hides_the_errno_on_a_full_disk_is_still_a_disk_full_error(tmp_path: Path) -> None:
    """``torch.save`` reports a full disk as a RuntimeError without the errno (a finetuning
    checkpoint): the atomic write still says the disk is full, naming the file, and leaves
    no temporary file."""
    import torch

    from medxfer.cache import atomic_path
    from medxfer.errors import DiskFullError

    mounts = Mounts()
    try:
        small = mounts.tmpfs(tmp_path / "small", size="16k")
        with pytest.raises(DiskFullError, match=r"checkpoint\.pt: cannot write, no space left on the device"):
            with atomic_path(small / "checkpoint.pt") as tmp:
                torch.save({"w": torch.zeros(100_000)}, tmp)
        assert list(small.iterdir()) == []
    finally:
        mounts.close()

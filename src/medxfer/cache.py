"""Cache locations, content keys, atomic writes, locks, and the one resumable array artifact.

Every artifact (prepared images, features) is a :class:`ResumableArray`: a preallocated
``.npy`` memmap filled row by row with a per-row state mask flushed periodically (a killed run
resumes), a file lock so two processes never build it twice or corrupt it, and a completion
marker written last that records the array's size and SHA-256 (a truncated or overwritten
file is detected on use and rebuilt, never silently used).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.errors import DiskFullError, MedxferError, OutputError

log = logging.getLogger(__name__)

CACHE_ENV = "MEDXFER_CACHE"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


_REASONS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def storage_error(exc: OSError, path: str | os.PathLike[str], what: str = "") -> OutputError | None:
    """The :class:`OutputError` an ``OSError`` from writing ``path`` means, or None when it is
    not about storage: a full disk or quota is a :class:`DiskFullError` naming the file; a
    read-only file system or a denied permission is an :class:`OutputError` naming the folder."""
    p = Path(path)
    label = f"{what} " if what else ""
    if exc.errno in DISK_FULL:
        reason = "over the disk quota" if exc.errno == errno.EDQUOT else "no space left on the device"
        return DiskFullError(f"{label}{p}: cannot write, {reason}; free some space (or use another folder) "
                             "and run again")
    if exc.errno in NOT_WRITABLE:
        reason = _REASONS[exc.errno]
        folder = p if p.is_dir() else p.parent
        return OutputError(f"{label}{folder}: cannot write there ({reason})")
    return None


@contextmanager
def storage_errors(path: str | os.PathLike[str], what: str = "") -> Iterator[None]:
    """Turn a full disk, a read-only file system or a denied write under this block into one
    :class:`OutputError` naming ``path`` (see :func:`storage_error`); other errors pass."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, MedxferError):
            raise
        translated = storage_error(exc, path, what)
        if translated is None:
            raise
        raise translated from None


def default_cache_dir() -> Path:
    """``$MEDXFER_CACHE`` if set, else ``~/.cache/medxfer``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medxfer"


def ensure_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create ``path`` (and parents) and check it can be written; one clear :class:`OutputError`
    naming it otherwise (a file in its place, a read-only file system, no permission)."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=p, prefix=".medxfer-write-test.", delete=True)
        probe.close()
    except FileExistsError:
        raise OutputError(f"{what} {p}: a file is in the way (need a folder)") from None
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise DiskFullError(f"{what} {p}: cannot write there (no space left on the device)") from None
        reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        raise OutputError(f"{what} {p}: cannot write there ({reason})") from None
    return p


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache folder (created and checked writable)."""
    return ensure_dir(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(), "cache folder")


def content_key(*parts: Any, length: int = 16) -> str:
    """A stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    Nothing half-written is ever visible under the final name: a failed write removes the
    temporary file (a crash leaves only a ``.tmp`` file that is ignored next time). A full
    disk, a read-only file system or a denied write, here or in the caller's block, is one
    :class:`OutputError` (:class:`DiskFullError` for a full disk) naming ``path``.
    """
    final = Path(path)
    with storage_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with storage_errors(final):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    except Exception as exc:
        if not isinstance(exc, OSError) and _nearly_full(final.parent):  # a writer that hides the errno (torch.save)
            raise DiskFullError(f"{final}: cannot write, no space left on the device ({type(exc).__name__}: "
                                f"{exc}); free some space (or use another folder) and run again") from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(final.parent)


NEARLY_FULL_BYTES = 1 << 20


def _nearly_full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has less than :data:`NEARLY_FULL_BYTES` free: then
    a failed write whose library lost the ``errno`` (``torch.save`` raises a RuntimeError) is a
    full disk."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL_BYTES


def replace_folder(staging: Path, final: Path) -> None:
    """Swap the fully written folder ``staging`` in as ``final`` (same parent): the old
    ``final`` is renamed aside, ``staging`` renamed into place, then the old one removed, so
    ``final`` is always absent, the old or the new folder, never half of one."""

    with storage_errors(final, f"folder {final}"):
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
            os.rename(final, old / final.name)
        os.rename(staging, final)
        _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


class LockHeld(Exception):
    """Another process holds the lock (:func:`file_lock` with ``wait=False``)."""


@contextmanager
def file_lock(path: str | os.PathLike[str], what: str, wait: bool = True) -> Iterator[None]:
    """An exclusive inter-process lock (``filelock``) on ``path``; logs once when it must wait
    for another process (which is then building ``what``). ``wait=False``: raise
    :class:`LockHeld` instead of waiting.

    When the lock file was moved away while we waited (``medxfer cache prune`` renames a
    whole artifact folder, lock included), the lock is taken again on a fresh file at ``path``.
    """
    from filelock import FileLock, Timeout

    waited = False
    while True:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                if not wait:
                    raise LockHeld(str(path)) from None
                if not waited:
                    log.info("waiting for another medxfer process to finish %s", what)
                    waited = True
                lock.acquire()
        except FileNotFoundError:  # its folder was moved away while we waited
            continue
        if _holds_lock_at(lock, Path(path)):
            break
        log.debug("lock %s was moved away while we waited; locking it again", path)
        lock.release()
    try:
        yield
    finally:
        lock.release()


def _holds_lock_at(lock: Any, path: Path) -> bool:
    """Whether the descriptor ``lock`` holds is still the file at ``path`` (True when the
    installed ``filelock`` does not tell us its descriptor)."""
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    if not isinstance(fd, int):
        return True
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


# --------------------------------------------------------------------------- last use

LAST_USED = "last_used.json"


def last_used_path(artifact: Path) -> Path:
    """Where the last-use stamp of ``artifact`` lives: ``last_used.json`` inside an artifact
    folder, ``.<name>.last_used.json`` beside an artifact file."""
    return artifact / LAST_USED if artifact.is_dir() else artifact.with_name(f".{artifact.name}.{LAST_USED}")


def is_last_used_stamp(path: Path) -> bool:
    """Whether ``path`` is a last-use stamp (:func:`last_used_path`), not part of an artifact's data."""
    return path.name == LAST_USED or (path.name.startswith(".") and path.name.endswith(f".{LAST_USED}"))


def stamp_last_used(artifact: str | os.PathLike[str]) -> None:
    """Record (atomically) that the pipeline opened ``artifact`` for reading now; a cache that
    cannot be written only loses the stamp (logged at debug level)."""
    try:
        write_json_atomic(last_used_path(Path(artifact)),
                          {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
    except OSError as exc:
        log.debug("could not record the last use of %s: %s", artifact, exc)


def read_last_used(artifact: Path) -> float | None:
    """The time of the last-use stamp of ``artifact``, or None when there is none."""
    try:
        return float(json.loads(last_used_path(artifact).read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- the resumable array

STATE_TODO, STATE_DONE, STATE_FAILED = 0, 1, 2
FULL_VERIFY_BYTES = 1 << 30  # arrays up to 1 GiB are checked against their full SHA-256 on use
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 256, 4096
_VERIFIED: dict[tuple[str, int, int, int], bool] = {}  # (path, size, mtime_ns, inode) checked in this process


class ArtifactError(MedxferError, RuntimeError):
    """A cached artifact that is incomplete or corrupt (it is rebuilt)."""


def sample_sha256(path: Path, size: int) -> str:
    """SHA-256 of ``SAMPLE_BLOCKS`` blocks spread evenly over the file (first and last included):
    a cheap check for large arrays that catches truncation-by-overwrite and zeroed regions."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = max(1, min(SAMPLE_BLOCKS, size // SAMPLE_BLOCK_BYTES))
        for i in range(n):
            f.seek(int(i * max(0, size - SAMPLE_BLOCK_BYTES) / max(1, n - 1)) if n > 1 else 0)
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


@dataclass
class Partial:
    """An artifact being built: ``array`` (writable memmap), ``state`` per row, ``notes`` (row ->
    message for failed rows). Mark rows, then :meth:`flush` (also called every
    ``checkpoint_every`` marked rows) makes them durable: pixels first, then the state."""

    artifact: ResumableArray
    array: np.ndarray
    state: np.ndarray
    notes: dict[str, str]
    checkpoint_every: int
    on_progress: Callable[[int, int], None] | None = None
    rows: np.ndarray | None = None  # per-row integer attributes (N x k int32), e.g. image extents
    _since_flush: int = 0

    @property
    def todo(self) -> np.ndarray:
        return np.flatnonzero(self.state == STATE_TODO)

    def mark(self, rows: Any, state: int = STATE_DONE, note: str | None = None) -> None:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        self.state[rows] = state
        if note is not None:
            for r in rows:
                self.notes[str(int(r))] = note
        self._since_flush += len(rows)
        if self._since_flush >= self.checkpoint_every:
            self.flush()
        if self.on_progress is not None:
            self.on_progress(int((self.state != STATE_TODO).sum()), len(self.state))

    def flush(self) -> None:
        if isinstance(self.array, np.memmap):
            self.array.flush()
        write_json_atomic(self.artifact.notes_path, self.notes)
        if self.rows is not None:
            save_npy_atomic(self.artifact.rows_path, self.rows)
        save_npy_atomic(self.artifact.state_path, self.state)
        self._since_flush = 0


@dataclass
class ResumableArray:
    """A resumable, locked, checksummed array artifact in ``folder`` (see the module docstring).

    Files: ``array.npy``, ``state.npy`` and ``notes.json`` while building, ``complete.json``
    (the marker: meta, shape, dtype, size, SHA-256) once done, ``.lock``; ``about.json``
    (``about``: what is being built, e.g. model and dataset, written when a build starts so an
    unfinished artifact can be described) and ``last_used.json`` (stamped by :meth:`load`).
    """

    folder: Path
    what: str
    about: dict[str, Any] | None = None

    @property
    def array_path(self) -> Path:
        return self.folder / "array.npy"

    @property
    def state_path(self) -> Path:
        return self.folder / "state.npy"

    @property
    def notes_path(self) -> Path:
        return self.folder / "notes.json"

    @property
    def rows_path(self) -> Path:
        return self.folder / "rows.npy"

    @property
    def marker_path(self) -> Path:
        return self.folder / "complete.json"

    @property
    def lock_path(self) -> Path:
        return self.folder / ".lock"

    @property
    def about_path(self) -> Path:
        return self.folder / "about.json"

    @property
    def complete(self) -> bool:
        return self.marker_path.is_file()

    def marker(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.marker_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable completion marker (%s)", self.what, exc)
            return None

    def progress(self) -> tuple[int, int | None]:
        """(rows done, rows in all) without taking the lock; (0, None) when nothing exists yet."""
        m = self.marker()
        if m is not None:
            return int(m["shape"][0]), int(m["shape"][0])
        try:
            state = np.load(self.state_path)
        except (OSError, ValueError):
            return 0, None
        return int((state != STATE_TODO).sum()), int(state.size)

    def verify(self, full: bool | None = None, marker: dict[str, Any] | None = None) -> str | None:
        """None when the array matches its marker (``marker``: the one already read), else what
        is wrong. ``full``: hash the whole file (default: for files up to
        :data:`FULL_VERIFY_BYTES`, else a sampled hash)."""
        m = marker if marker is not None else self.marker()
        if m is None:
            return "no completion marker"
        try:
            st = self.array_path.stat()
        except OSError:
            return f"{self.array_path.name} is missing"
        if st.st_size != m["size"]:
            return f"{self.array_path.name} has {st.st_size} bytes, the marker says {m['size']} (truncated?)"
        full = st.st_size <= FULL_VERIFY_BYTES if full is None else full
        memo = (str(self.array_path), st.st_size, st.st_mtime_ns, st.st_ino)
        if _VERIFIED.get(memo) and not full:
            return None
        if full:
            if file_sha256(self.array_path) != m["sha256"]:
                return f"{self.array_path.name} does not match its SHA-256 (modified or zero-filled?)"
        elif sample_sha256(self.array_path, st.st_size) != m["sample_sha256"]:
            return f"{self.array_path.name} does not match its sampled SHA-256 (modified or zero-filled?)"
        if m.get("rows_sha256") is not None and (not self.rows_path.is_file()
                                                 or file_sha256(self.rows_path) != m["rows_sha256"]):
            return f"{self.rows_path.name} is missing or does not match its SHA-256"
        _VERIFIED[memo] = True
        return None

    def open_verified(self, full: bool | None = None,
                      marker: dict[str, Any] | None = None) -> tuple[np.ndarray | None, str | None]:
        """(read-only memmap, None) when the array matches its marker in content (:meth:`verify`),
        shape and dtype; else (None, what is wrong, the file named)."""
        m = marker if marker is not None else self.marker()
        if m is None:
            return None, "no completion marker"
        problem = self.verify(full, marker=m)
        if problem is not None:
            return None, problem
        try:
            array = np.load(self.array_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            return None, f"{self.array_path.name} is unreadable ({exc})"
        if list(array.shape) != list(m["shape"]) or str(array.dtype) != m["dtype"]:
            return None, (f"{self.array_path.name} has shape {list(array.shape)} {array.dtype}, the marker says "
                          f"{m['shape']} {m['dtype']}")
        return array, None

    def load(self, repair: bool = False) -> tuple[np.ndarray, dict[str, Any]] | None:
        """(read-only memmap, meta) of a complete, verified artifact; None when it is not there
        or does not verify. ``repair``: remove a corrupt one (with a warning) so that it gets
        rebuilt; only under the lock (:meth:`get_or_build`), never while another process may be
        rebuilding it."""
        m = self.marker()
        if m is None:
            return None
        array, problem = self.open_verified(marker=m)
        if array is None:
            if repair:
                log.warning("%s: %s; rebuilding it", self.what, problem)
                self.discard()
            return None
        meta = dict(m["meta"])
        if m.get("rows_sha256") is not None:
            meta["rows"] = np.load(self.rows_path)
        stamp_last_used(self.folder)
        return array, meta

    def discard(self) -> None:
        """Remove the marker and the data (the lock file stays)."""
        for p in (self.marker_path, self.array_path, self.state_path, self.notes_path, self.rows_path):
            p.unlink(missing_ok=True)

    def get_or_build(self, build: Callable[[ResumableArray], dict[str, Any]]) -> tuple[np.ndarray, dict[str, Any], bool]:
        """(array, meta, built here): the complete artifact, building it under the lock if needed
        (another process building it meanwhile is waited for, not repeated)."""
        loaded = self.load()
        if loaded is not None:
            return loaded[0], loaded[1], False
        ensure_dir(self.folder, f"cache folder for {self.what}")
        with file_lock(self.lock_path, self.what):
            loaded = self.load(repair=True)  # built meanwhile by another process, or corrupt: removed here
            if loaded is not None:
                return loaded[0], loaded[1], False
            build(self)
            loaded = self.load()
        if loaded is None:
            raise ArtifactError(f"{self.what}: built but not readable at {self.folder}")
        return loaded[0], loaded[1], True

    def start(self, shape: tuple[int, ...], dtype: Any, *, checkpoint_every: int,
              on_progress: Callable[[int, int], None] | None = None, row_fields: int = 0) -> Partial:
        """Open the partial build (resuming a compatible one) or preallocate a new one, with
        ``row_fields`` integer attributes per row (``Partial.rows``). Call under the lock
        (inside :meth:`get_or_build`)."""
        dtype = np.dtype(dtype)
        if self.array_path.is_file() and self.state_path.is_file():
            try:
                array = np.load(self.array_path, mmap_mode="r+")
                state = np.load(self.state_path).astype(np.int8)
                notes = json.loads(self.notes_path.read_text()) if self.notes_path.is_file() else {}
                rows = np.load(self.rows_path) if row_fields else None
                if array.shape == tuple(shape) and array.dtype == dtype and state.shape == (shape[0],) and \
                        (rows is None or rows.shape == (shape[0], row_fields)):
                    failed = {str(i) for i in np.flatnonzero(state == STATE_FAILED)}
                    done = int((state != STATE_TODO).sum())
                    if done:
                        log.info("%s: resuming, %d of %d rows left", self.what, shape[0] - done, shape[0])
                    return Partial(self, array, state, {k: v for k, v in notes.items() if k in failed},
                                   checkpoint_every, on_progress, rows)
                log.warning("%s: partial build has another shape; starting again", self.what)
            except (OSError, ValueError) as exc:
                log.warning("%s: unreadable partial build (%s); starting again", self.what, exc)
        self.discard()
        try:
            if self.about is not None:
                write_json_atomic(self.about_path, self.about)
            array = self._allocate(tuple(shape), dtype)
            state = np.zeros(shape[0], dtype=np.int8)
            rows = np.zeros((shape[0], row_fields), dtype=np.int32) if row_fields else None
            if rows is not None:
                save_npy_atomic(self.rows_path, rows)
            save_npy_atomic(self.state_path, state)
        except OutputError:
            self.discard()  # nothing was built yet: leave no preallocated file behind
            raise
        return Partial(self, array, state, {}, checkpoint_every, on_progress, rows)

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A new writable memmap at :attr:`array_path` whose blocks are reserved on disk now:
        on a full disk that is a :class:`DiskFullError` here, not a SIGBUS when a page of the
        memory map is first written."""
        with storage_errors(self.array_path, self.what):
            array = np.lib.format.open_memmap(self.array_path, mode="w+", dtype=dtype, shape=shape)
            fd = os.open(self.array_path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as exc:
                if exc.errno in DISK_FULL:
                    raise
                log.debug("%s: cannot preallocate %s (%s)", self.what, self.array_path, exc)
            finally:
                os.close(fd)
        return array

    def finish(self, part: Partial, meta: dict[str, Any]) -> None:
        """Flush, check every row is done or failed, and write the marker (size + SHA-256)."""
        part.flush()
        left = int((part.state == STATE_TODO).sum())
        if left:
            raise ArtifactError(f"{self.what}: {left} rows left undone")
        shape, dtype = list(part.array.shape), str(part.array.dtype)
        if isinstance(part.array, np.memmap):
            part.array.flush()
        del part.array
        with storage_errors(self.array_path, self.what), open(self.array_path, "rb+") as f:
            os.fsync(f.fileno())
        size = self.array_path.stat().st_size
        marker = {"meta": meta, "shape": shape, "dtype": dtype, "size": size,
                  "sha256": file_sha256(self.array_path), "sample_sha256": sample_sha256(self.array_path, size),
                  "rows_sha256": file_sha256(self.rows_path) if part.rows is not None else None,
                  "created": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        write_json_atomic(self.marker_path, marker)
        self.state_path.unlink(missing_ok=True)
        self.notes_path.unlink(missing_ok=True)

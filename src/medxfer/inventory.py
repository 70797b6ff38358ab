"""What a cache folder holds: find, describe, verify and remove its artifacts.

Every kind of artifact the pipeline writes under the cache root is a :class:`Kind` in
:data:`KINDS` (its folder, how to list it, how to check it). What made an artifact (model,
dataset, transform, key) is read from the artifact's own marker or metadata, never from its
file name. Last use is the artifact's ``last_used`` stamp (written by the pipeline whenever it
opens the artifact for reading) or, without one, the newest modification time of its files;
each row says which.

Removal (:func:`prune`) takes the artifact's own writer lock without waiting and skips an
artifact whose lock is held; it renames the artifact to a hidden temporary name in the same
folder first (so a reader sees it whole or not at all), then deletes it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medxfer.cache import (
    LockHeld,
    ResumableArray,
    file_lock,
    file_sha256,
    is_last_used_stamp,
    last_used_path,
    read_last_used,
)
from medxfer.errors import UsageError
from medxfer.registry import Registry

log = logging.getLogger(__name__)

OK, CORRUPT, INCOMPLETE, UNCHECKED = "OK", "CORRUPT", "INCOMPLETE", "UNCHECKED"
PRUNE_TAG = ".prune-"  # hidden temporary names of artifacts being removed


@dataclass
class Artifact:
    """One artifact in the cache: what it is, what made it, where it lies and how to lock it."""

    kind: str
    path: Path
    key: str
    done: Path | None  # the file whose presence means it is complete (None: never complete)
    model: str | None = None
    dataset: str | None = None
    detail: str = ""
    progress: str = ""
    paths: tuple[Path, ...] = ()  # everything removed with it, in removal order (default: path)
    lock: Path | None = None  # the lock its writers take
    size: int = 0
    last_used: float = 0.0
    last_used_from: str = "mtime"

    def __post_init__(self) -> None:
        self.paths = self.paths or (self.path,)

    @property
    def complete(self) -> bool:
        """Looked up now (a build may finish while we look)."""
        return self.done is not None and self.done.is_file()

    def row(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {"kind": self.kind, "key": self.key, "model": self.model, "dataset": self.dataset,
                "detail": self.detail, "complete": self.complete, "progress": self.progress,
                "size": self.size, "last_used": self.last_used, "last_used_from": self.last_used_from,
                "path": str(self.path), "paths": [str(p) for p in self.paths],
                "lock": str(self.lock) if self.lock else None}


@dataclass(frozen=True)
class Check:
    """The outcome of verifying one artifact: a status and what was found (file named)."""

    status: str
    message: str


@dataclass(frozen=True)
class Kind:
    """A kind of cache artifact: its top-level folder, a scanner and a verifier."""

    name: str
    folder: str
    scan: Callable[[Path], list[Artifact]]
    verify: Callable[[Artifact], Check]
    help: str


KINDS: Registry[Kind] = Registry("artifact kind")


def register_kind(kind: Kind) -> Kind:
    return KINDS.register(kind.name, kind)


# --------------------------------------------------------------------------- helpers

def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` that are not hidden (locks, temporaries, stamps), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _files(paths: tuple[Path, ...]) -> Iterator[Path]:
    for p in paths:
        if p.is_file() or p.is_symlink():
            yield p
        elif p.is_dir():
            yield from (q for q in p.rglob("*") if q.is_file() or q.is_symlink())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finish(a: Artifact) -> Artifact:
    """Fill in size on disk (allocated blocks: a preallocated array is sparse until written)
    and last use."""
    size, newest = 0, 0.0
    for f in _files(a.paths):
        try:
            st = f.lstat()
        except OSError:
            continue
        size += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
        if f.name != ".lock" and not is_last_used_stamp(f):
            newest = max(newest, st.st_mtime)
    a.size = size
    stamps = [t for p in a.paths if p.exists() for t in [read_last_used(p)] if t is not None]
    a.last_used, a.last_used_from = (max(stamps), "stamp") if stamps else (newest, "mtime")
    return a


def _array_artifacts(cache: Path, kind: str, describe: Callable[[dict[str, Any], Path], dict[str, Any]]
                     ) -> list[Artifact]:
    """The :class:`ResumableArray` folders of ``<cache>/<kind>/``, described by ``describe``
    (marker meta, or ``about.json`` while unfinished)."""
    out = []
    for folder in _visible(cache / kind):
        if not folder.is_dir():
            continue
        ra = ResumableArray(folder, f"{kind} {folder.name}")
        marker = ra.marker()
        facts = dict(_read_json(ra.about_path) or {})
        if marker is not None:
            facts.update(marker.get("meta") or {})
        done, total = ra.progress()
        progress = f"{done}/{total} rows" if total is not None else "nothing written"
        out.append(Artifact(kind=kind, path=folder, key=folder.name, done=ra.marker_path, progress=progress,
                            lock=ra.lock_path, **describe(facts, cache)))
    return out


def _verify_array(a: Artifact) -> Check:
    ra = ResumableArray(a.path, f"{a.kind} {a.key}")
    if not ra.complete:
        return Check(INCOMPLETE, f"{a.path}: no completion marker ({a.progress})")
    m = ra.marker()
    if m is None:
        return Check(CORRUPT, f"{ra.marker_path}: unreadable completion marker")
    array, problem = ra.open_verified(full=True, marker=m)
    if array is None:
        return Check(CORRUPT, f"{a.path}{os.sep}{problem}")
    del array
    return Check(OK, f"{ra.array_path}: {m['size']} bytes, SHA-256 matches")


# --------------------------------------------------------------------------- prepared images, features

def _describe_prepared(facts: dict[str, Any], cache: Path) -> dict[str, Any]:
    detail = f"{facts.get('size', '?')}px {facts.get('resize', '?')}"
    if "n" in facts:
        detail += f", {facts['n']} images"
    return {"dataset": facts.get("first_dataset") or facts.get("dataset"), "detail": detail}


def _describe_features(facts: dict[str, Any], cache: Path) -> dict[str, Any]:
    prepared = _read_json(cache / "prepared" / str(facts.get("prepared_key")) / "complete.json") or {}
    pmeta = prepared.get("meta") or {}
    dataset = facts.get("dataset") or pmeta.get("first_dataset")
    detail = f"{facts.get('layer', '?')} {facts.get('precision', '?')}"
    if pmeta:
        detail += f", {pmeta.get('size')}px {pmeta.get('resize')}"
    if "dim" in facts:
        detail += f", {facts['n']} x {facts['dim']}"
    return {"model": facts.get("model"), "dataset": dataset, "detail": detail}


register_kind(Kind("prepared", "prepared", lambda c: _array_artifacts(c, "prepared", _describe_prepared),
                   _verify_array, "decoded images of a dataset at one size and transform"))
register_kind(Kind("features", "features", lambda c: _array_artifacts(c, "features", _describe_features),
                   _verify_array, "a frozen model's features of one prepared dataset"))


# --------------------------------------------------------------------------- in-domain pretraining

def _records(cache: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, r) for p in _visible(cache / "pretrained") if p.suffix == ".json"
            for r in [_read_json(p)] if r is not None]


def _weights_of(cache: Path, record: dict[str, Any]) -> Path | None:
    rel = record.get("weights_file")
    if not rel:
        return None
    p = Path(rel)
    return p if p.is_absolute() else cache / p


def _scan_pretrained(cache: Path) -> list[Artifact]:
    out = []
    for path, rec in _records(cache):
        name, key = str(rec.get("name", path.stem)), str(rec.get("run_key", ""))
        weights = _weights_of(cache, rec)
        workdir = cache / "pretrain" / name / key
        data = rec.get("data") or {}
        labels = ", ".join(str(d.get("label")) for d in data.get("datasets", []))
        detail = f"{rec.get('method')} x{rec.get('steps')} from {rec.get('parent')}, {rec.get('size')}px"
        out.append(Artifact(kind="pretrained", path=path, key=key, done=weights,
                            model=name, dataset=labels or None, detail=detail,
                            paths=tuple(p for p in (path, weights, workdir) if p is not None),
                            lock=workdir / ".lock"))
    return out


def _verify_pretrained(a: Artifact) -> Check:
    rec = _read_json(a.path)
    if rec is None:
        return Check(CORRUPT, f"{a.path}: unreadable pretrained-model record")
    weights = _weights_of(a.path.parent.parent, rec)
    if weights is None or not weights.is_file():
        return Check(CORRUPT, f"{weights or a.path}: weights file missing (named by {a.path})")
    if not rec.get("sha256"):
        return Check(UNCHECKED, f"{weights}: the record has no SHA-256")
    if file_sha256(weights) != rec["sha256"]:
        return Check(CORRUPT, f"{weights}: does not match the SHA-256 recorded in {a.path}")
    return Check(OK, f"{weights}: SHA-256 matches {a.path.name}")


def _scan_pretrain_work(cache: Path) -> list[Artifact]:
    finished = {(str(r.get("name")), str(r.get("run_key"))) for _, r in _records(cache)}
    out = []
    for model_dir in _visible(cache / "pretrain"):
        for workdir in _visible(model_dir):
            if not workdir.is_dir() or (model_dir.name, workdir.name) in finished:
                continue  # a finished model's work folder belongs to its "pretrained" artifact
            ckpt = workdir / "checkpoint.pt"
            out.append(Artifact(kind="pretrain-checkpoint", path=workdir, key=workdir.name, done=None,
                                model=model_dir.name, detail="pretraining checkpoint (pretrain/<name>/<key>)",
                                progress="checkpoint saved" if ckpt.is_file() else "no checkpoint",
                                lock=workdir / ".lock"))
    return out


def _verify_pretrain_work(a: Artifact) -> Check:
    return Check(INCOMPLETE, f"{a.path}: pretraining of {a.model} not finished ({a.progress})")


register_kind(Kind("pretrained", "pretrained", _scan_pretrained, _verify_pretrained,
                   "a model made by `medxfer pretrain`: its record, weights and work folder"))
register_kind(Kind("pretrain-checkpoint", "pretrain", _scan_pretrain_work, _verify_pretrain_work,
                   "an unfinished `medxfer pretrain` (resumable checkpoint)"))


# --------------------------------------------------------------------------- converted weights

def safetensors_header(path: Path) -> tuple[dict[str, str], int]:
    """(metadata, the file size the header implies) of a safetensors file; ValueError when the
    header cannot be read."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"header length {n} is implausible")
        header = json.loads(f.read(n))
    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    return dict(header.get("__metadata__") or {}), 8 + n + end


def _scan_weights(cache: Path) -> list[Artifact]:
    owned = {w.resolve() for _, r in _records(cache) for w in [_weights_of(cache, r)] if w is not None}
    out = []
    for path in _visible(cache / "weights"):
        if path.suffix != ".safetensors" or path.resolve() in owned:
            continue
        try:
            meta, _ = safetensors_header(path)
        except (OSError, ValueError):
            meta = {}
        model = meta.get("medxfer_model")
        out.append(Artifact(kind="weights", path=path, key=path.name, done=path, model=model,
                            detail=f"converted trunk, format {meta.get('format', '?')}",
                            lock=cache / "downloads" / f".{model}.lock" if model else None))
    return out


def _verify_weights(a: Artifact) -> Check:
    try:
        _, expected = safetensors_header(a.path)
    except (OSError, ValueError) as exc:
        return Check(CORRUPT, f"{a.path}: unreadable safetensors header ({exc})")
    size = a.path.stat().st_size
    if size != expected:
        return Check(CORRUPT, f"{a.path}: {size} bytes, its header describes {expected} (truncated?)")
    return Check(UNCHECKED, f"{a.path}: no checksum is recorded for converted weights; header and size agree")


register_kind(Kind("weights", "weights", _scan_weights, _verify_weights,
                   "a pretrained model's converted, headless trunk (safetensors)"))


# --------------------------------------------------------------------------- downloads, auxiliary files

def _spec_of_download(path: Path) -> Any:
    from medxfer.models import MODELS
    from medxfer.models.fetch import original_filename

    name = path.name.removesuffix(".corrupt")
    return next((s for _, s in MODELS.items() if not s.base and not s.path and (s.urls or s.filename)
                 and original_filename(s) == name), None)


def _scan_downloads(cache: Path) -> list[Artifact]:
    out = []
    for path in _visible(cache / "downloads"):
        if not path.is_file() or path.name.endswith(".part"):
            continue
        spec = _spec_of_download(path)
        out.append(Artifact(kind="download", path=path, key=path.name, done=path,
                            model=spec.name if spec is not None else None,
                            detail="original checkpoint" + (" (moved aside as corrupt)"
                                                            if path.suffix == ".corrupt" else ""),
                            lock=cache / "downloads" / f".{spec.name}.lock" if spec is not None else None))
    return out


def _verify_download(a: Artifact) -> Check:
    from medxfer.models.download import verify
    from medxfer.models.errors import HashMismatchError
    from medxfer.models.fetch import expected_hash

    if a.path.suffix == ".corrupt":
        return Check(CORRUPT, f"{a.path}: moved aside by `medxfer fetch` after a failed check")
    spec = _spec_of_download(a.path)
    if spec is None or not (spec.sha256 or spec.hash_prefix):
        return Check(UNCHECKED, f"{a.path}: no published hash to check against")
    try:
        verify(a.path, expected_hash(spec), f"original checkpoint of {spec.name}")
    except HashMismatchError as exc:
        return Check(CORRUPT, str(exc))
    return Check(OK, f"{a.path}: matches the published hash of {spec.name}")


def _scan_auxiliary(cache: Path) -> list[Artifact]:
    from medxfer.models.auxiliary import AUXILIARY

    by_file = {a.filename: n for n, a in AUXILIARY.items()}
    out = []
    for path in _visible(cache / "auxiliary"):
        if not path.is_file() or path.suffix in (".sha256", ".part"):
            continue
        side = path.with_suffix(".sha256")
        out.append(Artifact(kind="auxiliary", path=path, key=path.name, done=side,
                            model=by_file.get(path.name), detail="auxiliary weights (analyses)",
                            paths=(side, path)))
    return out


def _verify_auxiliary(a: Artifact) -> Check:
    side = a.path.with_suffix(".sha256")
    if not side.is_file():
        return Check(INCOMPLETE, f"{a.path}: no recorded SHA-256 ({side.name} missing; fetch again)")
    if file_sha256(a.path) != side.read_text().strip():
        return Check(CORRUPT, f"{a.path}: does not match the SHA-256 recorded in {side.name}")
    return Check(OK, f"{a.path}: SHA-256 matches {side.name}")


register_kind(Kind("download", "downloads", _scan_downloads, _verify_download,
                   "an original checkpoint as published, kept for re-conversion"))
register_kind(Kind("auxiliary", "auxiliary", _scan_auxiliary, _verify_auxiliary,
                   "weights the analyses need (LPIPS trunks)"))


# --------------------------------------------------------------------------- listing and selecting

def scan(cache: Path, kinds: tuple[str, ...] = ()) -> list[Artifact]:
    """Every artifact of ``kinds`` (default: all) in ``cache``; nothing is created."""
    names = [KINDS.canonical(k) for k in kinds] or KINDS.names()
    return [_finish(a) for n in names for a in KINDS.get(n).scan(cache)]


def verify_artifact(a: Artifact) -> Check:
    """Recompute what the cache records about ``a`` (sizes and checksums)."""
    return KINDS.get(a.kind).verify(a)


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z])\s*$")


def parse_age(text: str, option: str = "--older-than") -> float:
    """Seconds in an age like ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``."""
    m = _AGE_RE.match(text.lower())
    if m is None or m.group(2) not in AGE_UNITS:
        raise UsageError(f"{option} {text!r}: expected a number and a unit ({', '.join(AGE_UNITS)}), "
                         "e.g. 30d or 12h")
    return float(m.group(1)) * AGE_UNITS[m.group(2)]


@dataclass(frozen=True)
class Selection:
    """Which artifacts a command acts on: every given filter must match."""

    older_than: float | None = None  # seconds since last use
    model: str | None = None
    dataset: str | None = None
    incomplete: bool = False
    kinds: tuple[str, ...] = ()
    now: float = field(default_factory=time.time)

    @property
    def narrowed(self) -> bool:
        return self.older_than is not None or bool(self.model or self.dataset or self.incomplete or self.kinds)

    def matches(self, a: Artifact) -> bool:
        checks = (
            self.older_than is None or self.now - a.last_used >= self.older_than,
            self.model is None or a.model in _model_names(self.model),
            self.dataset is None or a.dataset == self.dataset
            or self.dataset in (a.dataset or "").split(", "),
            not self.incomplete or not a.complete,
            not self.kinds or a.kind in self.kinds,
        )
        return all(checks)


def _model_names(name: str) -> set[str]:
    """``name`` and, when it is a registered model or alias, its canonical name."""
    from medxfer.models import MODELS

    try:
        return {name, MODELS.canonical(name)}
    except KeyError:
        return {name}


# --------------------------------------------------------------------------- removing

ArtifactLocked = LockHeld  # the artifact's writer lock is held by another process


@contextmanager
def _locked(lock: Path | None) -> Iterator[None]:
    """Hold the artifact's writer lock, without waiting (:class:`ArtifactLocked` when held).
    A lock whose folder does not exist is held by nobody."""
    if lock is None or not lock.parent.is_dir():
        yield
        return
    with file_lock(lock, str(lock), wait=False):
        yield


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f".{path.name}{PRUNE_TAG}{secrets.token_hex(4)}")
    os.rename(path, aside)
    return aside


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune` did with one artifact: ``removed``, ``would remove``, or ``skipped``
    with the reason."""

    artifact: Artifact
    outcome: str
    reason: str = ""


def remove_artifact(a: Artifact, recheck: Callable[[Artifact], bool] | None = None) -> Pruned:
    """Remove ``a`` under its writer lock (skipped when the lock is held, or when ``recheck``
    says it no longer qualifies once the lock is held)."""
    try:
        with _locked(a.lock):
            if recheck is not None and not recheck(a):
                return Pruned(a, "skipped", "it changed while we looked (finished or used meanwhile)")
            stamps = [last_used_path(p) for p in a.paths if p.is_file()]  # a file's stamp lies beside it
            moved = [_move_aside(p) for p in (*a.paths, *stamps) if p.exists() or p.is_symlink()]
    except ArtifactLocked as exc:
        return Pruned(a, "skipped", f"locked by a run in progress (lock {exc} is held)")
    for p in moved:
        _delete(p)
    for p in a.paths:  # an emptied pretrain/<name>/ folder goes too
        if p.parent.parent.name == "pretrain" and p.parent.name == a.model:
            try:
                p.parent.rmdir()
            except OSError:
                pass
    return Pruned(a, "removed")


def leftovers(cache: Path) -> list[Path]:
    """Hidden temporaries of an interrupted prune (already out of every reader's view), in the
    kinds' folders and in ``pretrain/NAME/``."""
    folders = [cache / k for k in sorted({kind.folder for _, kind in KINDS.items()})]
    folders += [d for d in _visible(cache / "pretrain") if d.is_dir()]
    return [p for f in folders if f.is_dir() for p in sorted(f.iterdir()) if PRUNE_TAG in p.name]


def prune(cache: Path, selection: Selection, dry_run: bool = False) -> list[Pruned]:
    """Remove the selected artifacts of ``cache`` (``dry_run``: only say what would go)."""
    chosen = [a for a in scan(cache, selection.kinds) if selection.matches(a)]
    if dry_run:
        return [Pruned(a, "would remove") for a in chosen]
    for p in leftovers(cache):
        log.info("removing the leftover of an interrupted prune: %s", p)
        _delete(p)

    return [remove_artifact(a, lambda b: selection.matches(_finish(b))) for a in chosen]


def human_size(n: float) -> str:
    """Bytes in binary units (``12.3 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

"""Resumable, hash-verified, atomic downloads with a progress bar (urllib only)."""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from medxfer.models.errors import DownloadError, HashMismatchError

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("https", "http", "file")
CHUNK = 1 << 20


@dataclass(frozen=True)
class ExpectedHash:
    """What is published about a file: a full SHA-256 and/or a hex prefix of ``algo``."""

    sha256: str | None = None
    prefix: str | None = None
    algo: str = "sha256"

    def describe(self) -> str:
        if self.sha256:
            return f"sha256 {self.sha256}"
        if self.prefix:
            return f"{self.algo} prefix {self.prefix}"
        return "no published hash"


def hash_file(path: str | os.PathLike[str], algos: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of ``path`` for every algorithm in ``algos``, in one pass."""
    hs = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for h in hs.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hs.items()}


def verify(path: Path, expected: ExpectedHash, what: str) -> str:
    """Check ``path`` against ``expected``; returns its full SHA-256. Error names both digests."""
    algos = tuple(dict.fromkeys(("sha256", expected.algo)))
    digests = hash_file(path, algos)
    if expected.sha256 and digests["sha256"] != expected.sha256.lower():
        raise HashMismatchError(f"{what}: {path} has sha256 {digests['sha256']}, expected {expected.sha256}")
    if expected.prefix and not digests[expected.algo].startswith(expected.prefix.lower()):
        raise HashMismatchError(
            f"{what}: {path} has {expected.algo} {digests[expected.algo][:16]}..., expected a digest starting "
            f"with {expected.prefix} (wrong, truncated or corrupt file)"
        )
    return digests["sha256"]


def download(url: str, dest: str | os.PathLike[str], expected: ExpectedHash = ExpectedHash(), *,
             progress: bool = True, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` and return its SHA-256.

    Data goes to ``dest.part`` first; an existing ``.part`` is resumed with an HTTP Range
    request (restarted if the server ignores it). Only a complete file whose hash matches is
    renamed to ``dest``; a mismatching one is deleted.
    """
    dest = Path(dest)
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ALLOWED_SCHEMES:
        raise DownloadError(f"refusing to download {url!r}: scheme {scheme!r} not in {ALLOWED_SCHEMES}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "medxfer"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to fetch: the .part may be complete
            return _finish(part, dest, expected, url)
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    with resp:
        status = getattr(resp, "status", None)
        if offset and status != 206:
            log.info("%s: server ignored the Range request; restarting the download", url)
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        mode = "ab" if offset else "wb"
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=dest.name, disable=not progress) as bar:
            while block := resp.read(CHUNK):
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and part.stat().st_size != total:
        raise DownloadError(
            f"download of {url} stopped at {part.stat().st_size} of {total} bytes; run the command again to resume"
        )
    return _finish(part, dest, expected, url)


def _finish(part: Path, dest: Path, expected: ExpectedHash, url: str) -> str:
    try:
        sha = verify(part, expected, f"download of {url}")
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return sha

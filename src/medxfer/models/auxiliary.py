"""Auxiliary weight files the analyses need (LPIPS's torchvision trunks), in medxfer's cache.

Like the backbones' weights they are downloaded once, hash-checked (against the SHA-256
prefix in torchvision's file names), kept under ``<cache>/auxiliary/`` and never fetched
implicitly offline: ``medxfer fetch lpips`` (or ``--from DIR`` with the files) puts them
there. Each file's verified SHA-256 is recorded beside it, and users check against it.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from medxfer.cache import resolve_cache_dir, write_text_atomic
from medxfer.models.download import ExpectedHash, download, verify
from medxfer.models.errors import HashMismatchError, WeightsUnavailableError
from medxfer.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuxiliaryFile:
    """One published file: its name in the cache, where it comes from, its hash prefix."""

    name: str
    group: str
    filename: str
    url: str
    sha256_prefix: str
    licence: str = "BSD-3-Clause (torchvision); trained on ImageNet (non-commercial research terms)"


AUXILIARY: Registry[AuxiliaryFile] = Registry("auxiliary weight file")
GROUPS: Registry[tuple[str, ...]] = Registry("auxiliary weight group")

_TV = "https://download.pytorch.org/models/"
for _net, _file, _prefix in (("alex", "alexnet-owt-7be5be79.pth", "7be5be79"),
                             ("squeeze", "squeezenet1_1-b8a52dc0.pth", "b8a52dc0"),
                             ("vgg", "vgg16-397923af.pth", "397923af")):
    AUXILIARY.register(f"lpips-{_net}", AuxiliaryFile(f"lpips-{_net}", "lpips", _file, _TV + _file, _prefix))
GROUPS.register("lpips", tuple(f"lpips-{n}" for n in ("alex", "squeeze", "vgg")))


def auxiliary_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "auxiliary" / AUXILIARY.get(name).filename


def recorded_sha256(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The SHA-256 the cached file was verified to have when it was fetched (None: not fetched)."""
    side = auxiliary_path(name, cache_dir).with_suffix(".sha256")
    return side.read_text().strip() if side.is_file() and auxiliary_path(name, cache_dir).is_file() else None


def fetch_auxiliary(name: str, *, source: str | os.PathLike[str] | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, allow_download: bool | None = None,
                    verify_hash: bool = True, progress: bool = True) -> Path:
    """Make sure auxiliary file ``name`` is in the cache (from ``source``, a file or a folder
    holding it, or downloaded), hash-checked; returns its path."""
    from medxfer.models.fetch import offline

    aux = AUXILIARY.get(name)
    dest = auxiliary_path(name, cache_dir)
    if source is None and recorded_sha256(name, cache_dir):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected = ExpectedHash(prefix=aux.sha256_prefix if verify_hash else None)
    if source is not None:
        src = Path(source).expanduser()
        src = src / aux.filename if src.is_dir() else src
        if not src.is_file():
            raise WeightsUnavailableError(f"{aux.filename} not found at {src}")
        try:
            sha = verify(src, expected, f"{name} ({aux.filename})")
        except HashMismatchError as exc:
            raise WeightsUnavailableError(f"{exc}. If you trust this file, pass --no-verify.") from None
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    else:
        allow = (not offline()) if allow_download is None else allow_download
        if not allow:
            raise WeightsUnavailableError(
                f"{aux.filename} ({name}) is not in the cache and downloads are disabled: download {aux.url} "
                f"on a machine with internet access, then run `medxfer fetch {aux.group} --from DIR`")
        log.info("%s: downloading %s", name, aux.url)
        sha = download(aux.url, dest, expected, progress=progress)
    write_text_atomic(dest.with_suffix(".sha256"), sha + "\n")
    log.info("%s: %s (sha256 %s)", name, dest, sha[:16])
    return dest

"""``fetch``: original checkpoint (cache, local file or download) -> converted trunk in the cache.

The converted file is ``<cache>/weights/<name>-<key>.safetensors``, where ``key`` hashes
everything that determines its content (architecture, format, prefix, heads, source,
published hash, converter version; for a local custom checkpoint also its size and mtime).
Originals are kept in ``<cache>/downloads/`` so a converter update needs no new download.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from medxfer.cache import content_key, file_lock, resolve_cache_dir
from medxfer.models.checkpoint import (
    CONVERTER_VERSION,
    FORMATS,
    convert_checkpoint,
    save_converted,
)
from medxfer.models.download import ExpectedHash, download, verify
from medxfer.models.errors import (
    CheckpointError,
    DownloadError,
    HashMismatchError,
    WeightsUnavailableError,
)
from medxfer.models.spec import MODELS, ModelSpec

log = logging.getLogger(__name__)

OFFLINE_ENV = "MEDXFER_OFFLINE"  # "1": never touch the network


def weights_spec(spec: ModelSpec) -> ModelSpec:
    """The spec that owns the weights (a normalisation variant shares its base's)."""
    return MODELS.get(spec.base) if spec.base else spec


def _source_fingerprint(spec: ModelSpec) -> list[object]:
    if not spec.path:
        return []
    p = Path(spec.path).expanduser()
    st = p.stat() if p.is_file() else None
    return [str(p.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None]


def weights_key(spec: ModelSpec) -> str:
    s = weights_spec(spec)
    return content_key(s.arch, s.fmt, s.prefix, list(s.drop), list(s.urls), s.filename, s.sha256,
                       s.hash_prefix, s.hash_algo, CONVERTER_VERSION, _source_fingerprint(s), length=12)


def weights_path(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted, headless state dict of ``spec`` lives in the cache (for weights
    medxfer wrote itself, ``spec.weights_file``)."""
    s = weights_spec(spec)
    if s.weights_file:
        return Path(s.weights_file)
    return resolve_cache_dir(cache_dir) / "weights" / f"{s.name}-{weights_key(s)}.safetensors"


def is_cached(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether converted weights for ``spec`` are in the cache (no network, no conversion)."""
    return weights_path(spec, cache_dir).is_file()


def original_filename(spec: ModelSpec) -> str:
    if spec.filename:
        return spec.filename
    if spec.urls:
        return spec.urls[0].rstrip("/").rsplit("/", 1)[-1]
    return f"{spec.name}.pth"


def expected_hash(spec: ModelSpec) -> ExpectedHash:
    return ExpectedHash(sha256=spec.sha256, prefix=spec.hash_prefix, algo=spec.hash_algo)


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def unavailable_message(spec: ModelSpec, reason: str) -> str:
    file = original_filename(spec)
    if spec.urls:
        where = f"Download {file} from {spec.urls[0]} on a machine with internet access"
    else:
        where = f"This file cannot be downloaded automatically: {spec.fetch_hint or 'obtain ' + file}"
    return (
        f"pretrained weights for {spec.name!r} are not cached and {reason}. {where}, then run "
        f"`medxfer fetch {spec.name} --from /path/to/{file}` (Python: medxfer.models.fetch.fetch("
        f"{spec.name!r}, source=...)). Or use `--weights random` for a randomly initialised baseline."
    )


def _torch_hub_copy(spec: ModelSpec) -> Path | None:
    """torchvision's own cache (``$TORCH_HOME/hub/checkpoints``) often already holds the file."""
    if spec.fmt != "torchvision":
        return None
    p = Path(torch.hub.get_dir()) / "checkpoints" / original_filename(spec)
    return p if p.is_file() else None


def _obtain_original(spec: ModelSpec, cache: Path, allow_download: bool, progress: bool) -> tuple[Path, str | None]:
    """The original checkpoint on disk, downloading it if needed; (path, sha256 if known)."""
    if spec.path:
        p = Path(spec.path).expanduser()
        if not p.is_file():
            raise CheckpointError(f"checkpoint of custom model {spec.name!r} not found: {p}")
        return p, None
    local = cache / "downloads" / original_filename(spec)
    if local.is_file():
        return local, None
    hub = _torch_hub_copy(spec)
    if hub is not None:
        log.info("%s: using torchvision's cached copy %s", spec.name, hub)
        return hub, None
    if not spec.urls:
        raise WeightsUnavailableError(unavailable_message(spec, "cannot be downloaded automatically"))
    if not allow_download:
        why = f"downloads are disabled ({OFFLINE_ENV}=1)" if offline() else "downloads are disabled"
        raise WeightsUnavailableError(unavailable_message(spec, why))
    errors = []
    for url in spec.urls:
        try:
            log.info("%s: downloading %s", spec.name, url)
            sha = download(url, local, expected_hash(spec), progress=progress)
            return local, sha
        except HashMismatchError:  # not an offline problem: never fall back silently
            raise
        except DownloadError as exc:
            errors.append(str(exc))
        except OSError as exc:  # URLError, timeouts, DNS failures
            errors.append(f"{url}: {exc}")
    raise WeightsUnavailableError(unavailable_message(spec, "the download failed (" + "; ".join(errors) + ")"))


def fetch(
    name: str,
    *,
    source: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_download: bool | None = None,
    verify_hash: bool = True,
    progress: bool = True,
) -> Path:
    """Make sure the converted weights of model ``name`` are in the cache; return their path.

    ``source``: the original checkpoint file (as published) to convert instead of
    downloading; it is always (re)converted. ``allow_download`` defaults to true unless
    ``$MEDXFER_OFFLINE`` is set. The original is verified against the published hash
    (``verify_hash=False`` skips that, e.g. for a re-hosted copy).
    """
    spec = weights_spec(MODELS.get(name))
    if spec.weights_file:
        return _own_weights(spec)
    if spec.fmt not in FORMATS:
        raise WeightsUnavailableError(
            f"{spec.name!r} has no pretrained weights (format {spec.fmt!r}); use `--weights random`"
        )
    cache = resolve_cache_dir(cache_dir)
    out = weights_path(spec, cache)
    if source is None and out.is_file():
        return out
    allow = (not offline()) if allow_download is None else allow_download
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    with file_lock(cache / "downloads" / f".{spec.name}.lock", f"fetching the weights of {spec.name}"):
        if source is None and out.is_file():  # another process finished meanwhile
            return out
        if source is not None:
            original, sha = Path(source).expanduser(), None
            if not original.is_file():
                raise CheckpointError(f"--from file not found: {original}")
        else:
            original, sha = _obtain_original(spec, cache, allow, progress)
        in_cache = original.parent == cache / "downloads"
        try:
            if sha is None:  # anything not verified by a download just now
                if verify_hash and (spec.sha256 or spec.hash_prefix):
                    sha = verify(original, expected_hash(spec), f"original checkpoint of {spec.name}")
                else:
                    sha = verify(original, ExpectedHash(), spec.name)
            sd = convert_checkpoint(original, spec)
        except (HashMismatchError, CheckpointError) as exc:
            if in_cache:  # never reuse a bad download: move it aside so the next run fetches it again
                bad = original.with_name(original.name + ".corrupt")
                os.replace(original, bad)
                raise CheckpointError(
                    f"{exc}. The cached download was moved to {bad}; run the command again to re-download it."
                ) from exc
            if isinstance(exc, HashMismatchError):
                raise CheckpointError(f"{exc}. If you trust this file, pass --no-verify (verify_hash=False).") from exc
            raise
        save_converted(out, sd, {
            "medxfer_model": spec.name, "source": str(original), "source_sha256": sha,
            "format": spec.fmt, "converter_version": str(CONVERTER_VERSION),
        })
    log.info("%s: converted %s -> %s", spec.name, original, out)
    return out


def _own_weights(spec: ModelSpec) -> Path:
    """Weights medxfer wrote (in-domain pretraining): present, and of the recorded SHA-256."""
    path = Path(str(spec.weights_file))
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights of {spec.name!r} are missing: {path} (its record is {spec.extra.get('record', '?')}); "
            f"re-run the `medxfer pretrain` that made it, or remove the record")
    if spec.sha256:
        verify(path, ExpectedHash(sha256=spec.sha256), f"weights of {spec.name}")
    return path

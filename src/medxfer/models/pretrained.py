"""Models made by ``medxfer pretrain``: a small JSON record per model beside its weights.

``<cache>/pretrained/<name>.json`` (schema ``medxfer.pretrained/1``) says what the model is:
architecture, input normalisation (its parent's), parent, method, augmentation, steps, the
data it saw (a fingerprint of the image files), the loss curve, and where its headless
safetensors trunk lies in the weight cache (``weights/<name>-<sha>.safetensors``, relative
to the cache, with its SHA-256). :func:`register_cached` turns every record of a cache into a
registered :class:`ModelSpec` of family ``self-supervised (in-domain)``: ``medxfer.models``
does it for the default cache (``$MEDXFER_CACHE``) at import, a run for its ``--cache-dir``,
so a new process knows every model pretrained before. Reading records is cheap (small JSON
files, no tensors).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from medxfer.cache import default_cache_dir, write_json_atomic
from medxfer.errors import UsageError
from medxfer.models.spec import MODELS, ModelSpec, register_model

log = logging.getLogger(__name__)

RECORD_SCHEMA = "medxfer.pretrained/1"
FAMILY = "self-supervised (in-domain)"
RECORDS = "pretrained"


def records_dir(cache: Path) -> Path:
    return cache / RECORDS


def record_path(cache: Path, name: str) -> Path:
    return records_dir(cache) / f"{name}.json"


def spec_from_record(record: dict[str, Any], where: Path) -> ModelSpec:
    """The spec of a record read from ``where`` (its weights file resolved against the cache
    the record lies in, so a moved cache keeps working)."""
    if record.get("schema") != RECORD_SCHEMA:
        raise UsageError(f"{where}: not a {RECORD_SCHEMA} record (schema {record.get('schema')!r})")
    try:
        cache = where.resolve().parent.parent
        weights = Path(record["weights_file"])
        weights = weights if weights.is_absolute() else cache / weights
        data = record["data"]
        return ModelSpec(
            name=record["name"], arch=record["arch"], family=FAMILY, normalization=record["normalization"],
            fmt="safetensors", weights_file=str(weights), sha256=record["sha256"], parent=record["parent"],
            licence=record["licence"], citation=record["citation"],
            display_name=record.get("display_name"),
            notes=(f"{record['method']} for {record['steps']} steps ({record['augment']} views, {record['size']}px) "
                   f"on {data['images']} images of {', '.join(d['label'] for d in data['datasets'])}, "
                   f"from {record['parent']} ({record['parent_weights']})"),
            extra={"record": str(where), "method": str(record["method"]), "steps": str(record["steps"]),
                   "data_fingerprint": str(data["fingerprint"]), "augment": str(record["augment"]),
                   "run_key": str(record["run_key"])},
        )
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{where}: malformed {RECORD_SCHEMA} record (missing {exc})") from None


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{p}: cannot read pretrained-model record: {exc}") from None


def register_record(path: str | os.PathLike[str]) -> ModelSpec:
    """Register the model of one record (idempotent; a newer record of the same in-domain
    model replaces the old one; a built-in model's name is refused)."""
    p = Path(path).expanduser()
    spec = spec_from_record(read_record(p), p)
    if spec.name in MODELS:
        old = MODELS.get(spec.name)
        if old == spec:
            return old
        if old.family != FAMILY:
            raise UsageError(f"{p}: model name {spec.name!r} is already a {old.family} model; rename the record")
        return register_model(spec, overwrite=True)
    return register_model(spec)


def register_cached(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Register every record in ``<cache>/pretrained/`` (default cache: ``$MEDXFER_CACHE`` or
    ``~/.cache/medxfer``); unreadable records are logged and skipped. Creates nothing."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = records_dir(cache)
    if not folder.is_dir():
        return []
    names = []
    for path in sorted(folder.glob("*.json")):
        try:
            names.append(register_record(path).name)
        except UsageError as exc:
            log.warning("skipping pretrained-model record: %s", exc)
    return names


def write_record(cache: Path, record: dict[str, Any]) -> Path:
    path = record_path(cache, record["name"])
    write_json_atomic(path, record)
    return path


def pretraining_facts(spec: ModelSpec, max_points: int = 50) -> dict[str, Any] | None:
    """What a result says about how an in-domain model was made (None for other models):
    method, steps, augmentation, data, and the loss curve thinned to ``max_points``."""
    if spec.family != FAMILY or "record" not in spec.extra:
        return None
    try:
        rec = read_record(spec.extra["record"])
    except UsageError:
        return {"method": spec.extra.get("method"), "steps": spec.extra.get("steps"), "record": "unreadable"}
    curve = rec.get("loss_curve", [])
    stride = max(1, len(curve) // max_points)
    thin = curve[::stride] + ([curve[-1]] if curve and (len(curve) - 1) % stride else [])
    return {"method": rec["method"], "steps": rec["steps"], "augment": rec["augment"], "size": rec["size"],
            "parent": rec["parent"], "parent_weights": rec["parent_weights"], "data": rec["data"],
            "loss_first": curve[0][1] if curve else None, "loss_last": curve[-1][1] if curve else None,
            "loss_curve": thin, "seconds": rec.get("seconds"), "device": rec.get("device")}

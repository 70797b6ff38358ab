"""A user's own checkpoint as one line of config.

* CLI: ``--models my=resnet50:/path/ckpt.pth[:prefix]``  (:func:`resolve_model_arg`)
* YAML: a ``models:`` list of entries (:func:`load_model_file`)
* Python: ``medxfer.register_model(ModelSpec(...))`` or :func:`register_custom_model`
* plugins: an entry point in group ``medxfer.models`` whose callable receives the registry.

Without a prefix the key prefix is inferred: the one under which the checkpoint holds a
complete trunk; if several do (e.g. MoCo's query and key encoders) the user must choose.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medxfer.errors import UsageError
from medxfer.models.backbone import ARCHS, build_trunk
from medxfer.models.checkpoint import FORMATS
from medxfer.models.errors import CheckpointError
from medxfer.models.normalize import NORMALIZATIONS
from medxfer.models.spec import MODELS, ModelSpec, register_model

log = logging.getLogger(__name__)

DEFAULT_HEADS = ("fc.", "classifier.", "head.", "heads.")


def infer_prefix(sd: dict[str, Any], arch: str, source: str) -> str:
    """The key prefix under which ``sd`` holds every tensor of an ``arch`` trunk."""
    trunk_keys = [k for k in build_trunk(arch).state_dict() if not k.endswith("num_batches_tracked")]
    counts: Counter[str] = Counter()
    for tk in trunk_keys:
        for k in sd:
            if k.endswith(tk) and (len(k) == len(tk) or k[-len(tk) - 1] == "."):
                counts[k[: len(k) - len(tk)]] += 1
    complete = sorted(p for p, n in counts.items() if n == len(trunk_keys))
    if len(complete) == 1:
        return complete[0]
    if not complete:
        best = counts.most_common(3)
        raise CheckpointError(
            f"{source}: no key prefix holds a complete {arch} trunk (best candidates: "
            f"{[(p, f'{n}/{len(trunk_keys)} keys') for p, n in best]}); check the architecture"
        )
    raise CheckpointError(
        f"{source}: several prefixes hold a complete {arch} trunk: {complete}; choose one, e.g. "
        f"--models NAME={arch}:{source}:{complete[0]}"
    )


def register_custom_model(
    name: str, arch: str, path: str | os.PathLike[str], prefix: str | None = None, *,
    fmt: str = "auto", drop: tuple[str, ...] = DEFAULT_HEADS, normalization: str = "imagenet",
    family: str = "custom", licence: str = "user-supplied (check its terms)", citation: str = "",
    notes: str = "",
) -> ModelSpec:
    """Register (idempotently) a spec for a local checkpoint; returns the registered spec."""
    arch = ARCHS.canonical(arch)
    fmt = FORMATS.canonical(fmt)
    normalization = NORMALIZATIONS.canonical(normalization)
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise CheckpointError(f"checkpoint of custom model {name!r} not found: {file}")
    if prefix is None:
        prefix = infer_prefix(FORMATS.get(fmt).state_dict(file), arch, str(file))
        log.info("%s: inferred key prefix %r", name, prefix)
    spec = ModelSpec(
        name=name, arch=arch, family=family, normalization=normalization,
        fmt=fmt, prefix=prefix, drop=tuple(drop), path=str(file), filename=file.name, licence=licence,
        citation=citation, notes=notes or f"custom checkpoint {file}",
    )
    if name in MODELS:
        old = MODELS.get(name)
        if old == spec:
            return old
        if old.path is None:
            raise UsageError(f"model name {name!r} is a built-in model; choose another name")
        raise UsageError(f"custom model {name!r} is already registered with different settings ({old.path})")
    return register_model(spec)


def resolve_model_arg(text: str) -> str:
    """A ``--models`` item -> canonical model name.

    ``NAME`` or an alias returns the registered name; ``my=ARCH:/path/ckpt.pth[:prefix]``
    registers a custom model (idempotently) and returns ``my``.
    """
    text = text.strip()
    if "=" not in text:
        return MODELS.canonical(text)
    name, _, rest = text.partition("=")
    arch, sep, rest = rest.partition(":")
    if not name.strip() or not sep or not rest:
        raise UsageError(f"bad custom model {text!r}: expected NAME=ARCH:/path/to/ckpt.pth[:prefix]")
    path, prefix = rest, None
    if not Path(rest).expanduser().is_file() and ":" in rest:
        path, prefix = rest.rsplit(":", 1)
    register_custom_model(name.strip(), arch.strip(), path, prefix)
    return MODELS.canonical(name.strip())


_YAML_KEYS = {"name", "arch", "checkpoint", "prefix", "format", "drop", "normalization", "family",
              "licence", "license", "citation", "notes", "record"}


def load_model_file(path: str | os.PathLike[str]) -> list[str]:
    """Register every entry of a YAML file ``models: [{name, arch, checkpoint, ...}]``.

    ``checkpoint`` may be relative to the YAML file (``.pth``/``.pt`` or ``.safetensors``). An
    entry ``{record: PATH}`` registers a model made by ``medxfer pretrain`` from its record
    (``<cache>/pretrained/NAME.json``, its weights beside it in that cache). Returns the names.
    """
    from medxfer.config import read_yaml

    path = Path(path)
    doc = read_yaml(path, "model file")
    entries = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise UsageError(f"{path}: expected a top-level 'models:' list")
    names = []
    for i, entry in enumerate(entries):
        where = f"{path}: models[{i}]"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected a mapping, got {type(entry).__name__}")
        if "record" in entry:
            from medxfer.models.pretrained import register_record

            extra = sorted(set(entry) - {"record", "name"})
            if extra:
                raise UsageError(f"{where}: a record entry takes only 'record' (and 'name' to check it), not {extra}")
            rec = Path(str(entry["record"])).expanduser()
            spec = register_record(rec if rec.is_absolute() else path.parent / rec)
            if "name" in entry and str(entry["name"]) != spec.name:
                raise UsageError(f"{where}: the record is model {spec.name!r}, not {entry['name']!r}")
            names.append(spec.name)
            continue
        unknown = sorted(set(entry) - _YAML_KEYS)
        missing = sorted({"name", "arch", "checkpoint"} - set(entry))
        if unknown or missing:
            raise UsageError(f"{where}: unknown keys {unknown}, missing keys {missing} (allowed: {sorted(_YAML_KEYS)})")
        ckpt = Path(str(entry["checkpoint"])).expanduser()
        if not ckpt.is_absolute():
            ckpt = path.parent / ckpt
        try:
            spec = register_custom_model(
                str(entry["name"]), str(entry["arch"]), ckpt, entry.get("prefix"),
                fmt=entry.get("format", "auto"), drop=tuple(entry.get("drop", DEFAULT_HEADS)),
                normalization=entry.get("normalization", "imagenet"), family=entry.get("family", "custom"),
                licence=entry.get("licence", entry.get("license", "user-supplied (check its terms)")),
                citation=entry.get("citation", ""), notes=entry.get("notes", ""),
            )
        except (KeyError, ValueError) as exc:
            raise UsageError(f"{where}: {exc}") from exc
        names.append(spec.name)
    return names


_TUPLE_FIELDS = {f.name for f in dataclasses.fields(ModelSpec) if str(f.type).startswith("tuple")}


def custom_model_records(names: Iterable[str]) -> list[dict[str, Any]]:
    """The full specs (plain dicts) of the models among ``names`` that are the user's own
    checkpoints (a spec with a local ``path``), so that a run spec carries them to workers."""
    out = []
    for name in names:
        spec = MODELS.get(name)
        if spec.path is not None:
            out.append({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()})
    return out


def register_recorded_models(records: Sequence[dict[str, Any]]) -> list[str]:
    """Register the specs recorded by :func:`custom_model_records` (idempotently: a worker or a
    resumed run does this from the run spec). A name registered with other settings is an error."""
    names = []
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    for i, record in enumerate(records):
        unknown = sorted(set(record) - known)
        if unknown:
            raise UsageError(f"custom_models[{i}]: unknown field(s) {', '.join(unknown)}")
        spec = ModelSpec(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in record.items()})
        if spec.name in MODELS:
            old = MODELS.get(spec.name)
            if old != spec:
                raise UsageError(f"custom model {spec.name!r} is already registered with other settings "
                                 f"({old.path or 'a built-in model'})")
        else:
            register_model(spec)
        names.append(spec.name)
    return names

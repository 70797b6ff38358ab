"""The run spec: one frozen object describing a whole grid, from YAML, the CLI or Python."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

GENERIC_KINDS = ("folder", "csv", "medmnist")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class SpecError(ValueError):
    """A run spec (YAML, command line or Python) is invalid; the message says which field."""


@dataclass(frozen=True)
class DatasetArg:
    """One ``--dataset`` entry: a label, a registered adapter (or generic kind) and a root.

    ``chexpert=/data/CheXpert-v1.0-small`` -> label ``chexpert``, kind ``chexpert``;
    ``mine=folder:/data/mine`` -> label ``mine``, kind ``folder``.
    """

    label: str
    kind: str
    root: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "DatasetArg":
        """Parse ``NAME=PATH`` or ``LABEL=KIND:PATH`` (KIND in folder, csv, medmnist)."""
        if "=" not in text:
            raise SpecError(f"--dataset {text!r}: expected NAME=PATH or LABEL=folder:PATH / csv:FILE / medmnist:FILE")
        label, _, rest = text.partition("=")
        label = label.strip()
        if not _LABEL_RE.match(label):
            raise SpecError(f"--dataset {text!r}: label {label!r} must be letters, digits, '-', '_' or '.'")
        kind, sep, path = rest.partition(":")
        if sep and kind in GENERIC_KINDS:
            return cls(label=label, kind=kind, root=path, options={"name": label})
        if not rest:
            raise SpecError(f"--dataset {text!r}: missing path")
        return cls(label=label, kind=label, root=rest)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "root": self.root, "options": dict(self.options)}


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run. Cells = models x datasets x protocols x seeds."""

    models: tuple[str, ...]
    datasets: tuple[DatasetArg, ...]
    protocols: tuple[str, ...] = ("fewshot",)
    protocol_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    weights: str = "pretrained"  # "pretrained" | "random" | "auto" (pretrained if cached, else random)
    out: str = "medxfer-out"
    cache_dir: str | None = None
    device: str | None = None  # None = cuda if available, else cpu
    batch_size: int | None = None  # extraction batch; None = chosen for the device
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast for extraction)
    image_size: int = 224
    resize: str = "aspect"  # "aspect" (correct) | "squash" (the authors' few-shot compat)
    compat: str = "none"  # "none" | "paper"
    skip_bad: bool = False
    workers: int | None = None  # decoding workers; None = all cores

    def __post_init__(self) -> None:
        if not self.models:
            raise SpecError("models: give at least one model")
        if not self.datasets:
            raise SpecError("datasets: give at least one dataset")
        if not self.protocols:
            raise SpecError("protocols: give at least one protocol")
        if self.weights not in ("pretrained", "random", "auto"):
            raise SpecError(f"weights: {self.weights!r} is not 'pretrained', 'random' or 'auto'")
        if self.compat not in ("none", "paper"):
            raise SpecError(f"compat: {self.compat!r} is not 'none' or 'paper'")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise SpecError(f"precision: {self.precision!r} is not fp32, bf16 or fp16")
        if self.resize not in ("aspect", "squash"):
            raise SpecError(f"resize: {self.resize!r} is not 'aspect' or 'squash'")
        labels = [d.label for d in self.datasets]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise SpecError(f"datasets: label(s) used twice: {', '.join(dupes)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["datasets"] = [ds.to_dict() for ds in self.datasets]
        d["models"] = list(self.models)
        d["protocols"] = list(self.protocols)
        d["seeds"] = list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> "RunSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(data)
        ds = d.get("datasets", [])
        parsed = []
        for i, item in enumerate(ds):
            if isinstance(item, str):
                parsed.append(DatasetArg.parse(os.path.expandvars(item)))
            elif isinstance(item, dict):
                try:
                    parsed.append(DatasetArg(label=item["label"], kind=item.get("kind", item["label"]),
                                             root=os.path.expandvars(str(item["root"])), options=dict(item.get("options", {}))))
                except KeyError as exc:
                    raise SpecError(f"{where}: datasets[{i}] lacks {exc.args[0]!r}") from None
            else:
                raise SpecError(f"{where}: datasets[{i}] must be 'NAME=PATH' or a mapping")
        d["datasets"] = tuple(parsed)
        for key in ("models", "protocols", "seeds"):
            if key in d:
                val = d[key]
                if isinstance(val, (str, int)):
                    val = [val]
                d[key] = tuple(val)
        try:
            return cls(**d)
        except TypeError as exc:
            raise SpecError(f"{where}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "RunSpec":
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"{path}: cannot read run spec: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{path}: a run spec must be a mapping")
        return cls.from_dict(data, where=str(path))

    def with_(self, **changes: Any) -> "RunSpec":
        return replace(self, **changes)

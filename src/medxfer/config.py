"""The run spec: one frozen object describing a whole grid, from YAML, the CLI or Python."""
from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from medxfer.errors import SpecError
from medxfer.typed import coerce, type_name

GENERIC_KINDS = ("folder", "csv", "medmnist")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
MIN_IMAGE_SIZE = 32  # five stride-2 stages of a ResNet need at least this much
BLOCK_KEYS = frozenset({"models", "datasets", "protocols"})
OVERRIDE_KEYS = BLOCK_KEYS | {"protocol_params"}

__all__ = ["DatasetArg", "RunSpec", "SpecError"]


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
    def parse(cls, text: str) -> DatasetArg:
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
    """Everything that defines a run. Cells = models x datasets x protocols x seeds.

    Every field is checked for its type and range when the spec is made (from YAML, the
    command line or Python alike); a bad value is one :class:`SpecError` naming the field.
    """

    models: tuple[str, ...]
    datasets: tuple[DatasetArg, ...]
    protocols: tuple[str, ...] = ("fewshot",)
    protocol_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    weights: Literal["pretrained", "random", "auto"] = "pretrained"  # auto: pretrained if cached, else random
    out: str = "medxfer-out"
    cache_dir: str | None = None
    device: str | None = None  # None = cuda if available, else cpu
    batch_size: int | None = None  # extraction batch; None = chosen for the device
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for extraction
    image_size: int = 224
    resize: Literal["aspect", "squash"] = "aspect"  # aspect (correct) | squash (the authors' few-shot compat)
    compat: Literal["none", "paper"] = "none"
    skip_bad: bool = False
    workers: int | None = None  # decoding workers; None = all cores
    executor: str = "local"  # where cells run (see medxfer.executors)
    address: str | None = None  # the Ray cluster (executor ray; None: $RAY_ADDRESS, else a local one)
    cpus_per_task: int = 1  # CPUs (and so threads) each CPU task asks of Ray
    custom_models: tuple[dict[str, Any], ...] = ()  # specs of the user's own checkpoints (workers register them)
    blocks: tuple[dict[str, Any], ...] = ()  # sub-grids {models, datasets, protocols}: cells = their union
    overrides: tuple[dict[str, Any], ...] = ()  # {models, datasets, protocols, protocol_params}: per-cell params

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            given = value = getattr(self, f.name)
            if f.name in ("models", "protocols", "seeds") and isinstance(value, (str, int)) \
                    and not isinstance(value, bool):
                value = (value,)
            if f.name == "datasets":
                if not isinstance(value, (list, tuple)) or not all(isinstance(d, DatasetArg) for d in value):
                    raise SpecError("datasets: expected a list of NAME=PATH entries")
                value = tuple(value)
            else:
                try:
                    value = coerce(value, hints[f.name])
                except TypeError as exc:
                    raise SpecError(f"{f.name}: {given!r}: {exc} (type {type_name(hints[f.name])})") from None
            object.__setattr__(self, f.name, value)
        if not self.models:
            raise SpecError("models: give at least one model")
        if not self.datasets:
            raise SpecError("datasets: give at least one dataset")
        if not self.protocols:
            raise SpecError("protocols: give at least one protocol")
        if not self.seeds:
            raise SpecError("seeds: give at least one seed")
        if self.batch_size is not None and self.batch_size < 1:
            raise SpecError(f"batch_size: {self.batch_size} must be at least 1")
        if self.cpus_per_task < 1:
            raise SpecError(f"cpus_per_task: {self.cpus_per_task} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise SpecError(f"workers: {self.workers} must be 0 or more")
        if self.image_size < MIN_IMAGE_SIZE:
            raise SpecError(f"image_size: {self.image_size} is too small (at least {MIN_IMAGE_SIZE} pixels)")
        for proto, params in self.protocol_params.items():
            if not isinstance(params, dict):
                raise SpecError(f"protocol_params.{proto}: expected a mapping of parameter: value")
        for where, items, allowed in (("blocks", self.blocks, BLOCK_KEYS), ("overrides", self.overrides, OVERRIDE_KEYS)):
            for i, item in enumerate(items):
                unknown = sorted(set(item) - allowed) if isinstance(item, dict) else None
                if unknown is None or unknown:
                    raise SpecError(f"{where}[{i}]: expected a mapping with keys among {', '.join(sorted(allowed))}"
                                    + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
                for key in allowed - {"protocol_params"}:
                    if key in item and not (isinstance(item[key], list | tuple)
                                            and all(isinstance(v, str) for v in item[key])):
                        raise SpecError(f"{where}[{i}].{key}: expected a list of names")
                if "protocol_params" in item and not isinstance(item["protocol_params"], dict):
                    raise SpecError(f"{where}[{i}].protocol_params: expected a mapping")
        for i, item in enumerate(self.custom_models):
            if not isinstance(item.get("name"), str) or not isinstance(item.get("arch"), str):
                raise SpecError(f"custom_models[{i}]: expected a model spec with a name and an arch")
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
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> RunSpec:
        if not isinstance(data, dict):
            raise SpecError(f"{where}: a run spec must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            close = {k: difflib.get_close_matches(str(k), sorted(known), n=1, cutoff=0.6) for k in unknown}
            hints = "".join(f" Did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
            raise SpecError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}.{hints} "
                            f"Known: {', '.join(sorted(known))}")
        d = dict(data)
        ds = d.get("datasets", [])
        if not isinstance(ds, list):
            raise SpecError(f"{where}: datasets: expected a list of NAME=PATH entries or mappings")
        parsed = []
        for i, item in enumerate(ds):
            if isinstance(item, str):
                parsed.append(DatasetArg.parse(os.path.expandvars(item)))
            elif isinstance(item, dict):
                try:
                    label, kind = str(item["label"]), str(item.get("kind", item["label"]))
                    options = dict(item.get("options") or {})
                    if kind in GENERIC_KINDS:  # as LABEL=KIND:PATH does: the user's data is named by its label
                        options.setdefault("name", label)
                    parsed.append(DatasetArg(label=label, kind=kind, root=os.path.expandvars(str(item["root"])),
                                             options=options))
                except KeyError as exc:
                    raise SpecError(f"{where}: datasets[{i}] lacks {exc.args[0]!r}") from None
            else:
                raise SpecError(f"{where}: datasets[{i}] must be 'NAME=PATH' or a mapping")
        d["datasets"] = tuple(parsed)
        try:
            return cls(**d)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None
        except TypeError as exc:
            raise SpecError(f"{where}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> RunSpec:
        """The spec in a YAML file; a missing file, invalid YAML (with its line and column) or a
        bad field or protocol parameter is one :class:`SpecError` naming the file and key."""
        data = read_yaml(path, "run spec")
        if not isinstance(data, dict):
            raise SpecError(f"{path}: a run spec must be a mapping")
        spec = cls.from_dict(data, where=str(path))
        _check_names(spec, where=str(path))
        return spec

    def with_(self, **changes: Any) -> RunSpec:
        return replace(self, **changes)



def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """The YAML document in ``path``; one :class:`SpecError` naming the file (and for invalid
    YAML the line and column) when it cannot be read or parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError(f"{path}: cannot read {what} ({reason})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = yaml_problem(exc)
        context = getattr(exc, "context", None)
        raise SpecError(f"{path}: {where}invalid YAML in {what}: {problem}"
                        + (f" ({context})" if context else "")) from None


def yaml_problem(exc: Exception) -> str:
    """What a YAML parser error says is wrong, in one line."""
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


def _check_names(spec: RunSpec, where: str) -> None:
    """The names in a spec file (models, dataset kinds and options, protocols and their
    parameters), each error naming the file and the key as the file spells it
    (``datasets[0].options.split``, ``protocol_params.fewshot.n_shot``), before the command
    line is merged. ``LABEL=ARCH:CHECKPOINT`` models are checked when they are registered."""
    from medxfer.data.registry import DATASETS, dataset_options
    from medxfer.errors import MedxferError, UnknownNameError
    from medxfer.models.spec import MODELS
    from medxfer.protocols.base import PROTOCOLS

    def check(key: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except UnknownNameError as exc:
            raise UnknownNameError(f"{where}: {key}: {exc}") from None
        except MedxferError as exc:
            raise SpecError(f"{where}: {exc}") from None

    recorded = {d.get("name") for d in spec.custom_models}
    for i, model in enumerate(spec.models):
        if "=" not in model and model not in recorded:
            check(f"models[{i}]", lambda m=model: MODELS.get(m))
    for i, d in enumerate(spec.datasets):
        check(f"datasets[{i}]", lambda d=d: DATASETS.get(d.kind))
        check(f"datasets[{i}]", lambda d=d, i=i: dataset_options(
            d.kind, d.options, spell=lambda key: f"datasets[{i}].options.{key}"))
    for i, name in enumerate(spec.protocols):
        check(f"protocols[{i}]", lambda n=name: PROTOCOLS.get(n))
    for name, values in spec.protocol_params.items():
        check(f"protocol_params.{name}", lambda n=name, v=values: PROTOCOLS.get(n).validate(
            v, spell=lambda key: f"protocol_params.{n}.{key}"))

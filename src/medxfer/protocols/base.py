"""The protocol contract: every protocol and analysis runs the same way.

A :class:`Protocol` is ``(name, version, params, run, needs)``:

- ``params`` is a frozen dataclass (a :class:`Params` subclass) whose fields are the
  protocol's parameters; fields marked ``execution`` (device, batch sizes) never enter run keys.
- ``run(ctx, params, seed) -> EvalResult``: ``ctx`` (:class:`medxfer.cell.Context`) lazily
  provides the model, the dataset, prepared images and features; the protocol never prepares
  or extracts by itself, and nothing branches on what it needs to call it.
- ``needs`` (:class:`Needs`) declares resources and artifacts for planners and executors.
- ``check(view, params, seed)`` (optional) validates what can be known from the labels alone
  (a class too small for the episodes), before any image is decoded.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from medxfer.data.records import LabelView
from medxfer.registry import Registry
from medxfer.typed import as_dict, build, key_fields

if TYPE_CHECKING:
    from medxfer.cell import Context
    from medxfer.data.records import DatasetInfo

__all__ = ["EvalResult", "Headline", "Input", "LabelView", "Needs", "PROTOCOLS", "Params", "Protocol", "register_protocol"]


@dataclass(frozen=True)
class Params:
    """Base class of every protocol's parameter dataclass (frozen; see :mod:`medxfer.typed`)."""

    def key(self) -> dict[str, Any]:
        """The parameters that change the numbers (they, and only they, enter run keys)."""
        return key_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)


@dataclass(frozen=True)
class Headline:
    """The one number a result is ranked by, with its direction."""

    metric: str
    value: float
    ci95: float | None = None
    higher_is_better: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "ci95": self.ci95,
                "higher_is_better": self.higher_is_better}


@dataclass
class EvalResult:
    """What one protocol run on one (model, dataset) produced.

    ``metrics``: numbers (percent for accuracies); ``headline``: the one they are ranked by;
    ``details``: per-episode accuracies, validation curves, chosen hyper-parameters... anything
    needed to audit or reproduce it; ``params``: the parameters used; ``files``: paths the
    protocol wrote into ``ctx.artifact_dir`` (listed, with size and sha256, in the result).
    """

    protocol: str
    metrics: dict[str, float]
    headline: Headline
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Input:
    """One cache artifact a cell reads, for executors that build artifacts before the cells.

    ``kind``: ``"prepared"`` (decoded images at ``size`` x ``resize``; None = the run's
    evaluation size and transform) or ``"features"`` (``layer`` of the run's model, extracted
    from the images prepared with ``resize`` at the run's evaluation size).
    """

    kind: Literal["prepared", "features"]
    layer: str = "pooled"
    size: int | None = None
    resize: str | None = None


@dataclass(frozen=True)
class Needs:
    """What a protocol needs, for planners and executors (never used to call it).

    ``features``: feature layers it reads (extracted first, once per model and dataset);
    ``images``: whether it reads prepared images (at the run's evaluation size); ``model``:
    whether it runs the backbone itself; ``accelerator``: ``"gpu"`` when it should run where a
    GPU is, ``"cpu"`` when CPUs suffice. ``inputs(params)``, when given, lists the cache
    artifacts a cell with these parameters reads (other sizes or transforms than the run's);
    otherwise they follow from ``features`` and ``images``.
    """

    features: tuple[str, ...] = ()
    images: bool = False
    model: bool = False
    accelerator: Literal["cpu", "gpu"] = "cpu"
    inputs: Callable[[Any], tuple[Input, ...]] | None = None

    def artifacts(self, params: Any) -> tuple[Input, ...]:
        """The cache artifacts a cell with ``params`` reads (see the class docstring)."""
        if self.inputs is not None:
            return tuple(self.inputs(params))
        found = [Input("features", layer=layer) for layer in self.features]
        if self.images:
            found.append(Input("prepared"))
        return tuple(found)


RunFn = Callable[["Context", Any, int], EvalResult]
CheckFn = Callable[[LabelView, Any, int], None]


@dataclass(frozen=True)
class Protocol:
    """A registered evaluation protocol or analysis (see the module docstring).

    ``compat`` maps a compat mode (``"paper"``) to parameter overrides; ``dataset_defaults``
    gives a dataset's own settings (the paper's 5-way episodes for EyePACS); ``key_extras``
    returns facts of the execution that change numbers (finetune's autocast precision).
    """

    name: str
    version: str
    params: type[Params]
    run: RunFn
    needs: Needs
    description: str = ""
    compat: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    dataset_defaults: Callable[[DatasetInfo], dict[str, Any]] | None = None
    check: CheckFn | None = None
    key_extras: Callable[[Any, str], dict[str, Any]] | None = None
    analysis: bool = False  # an analysis of what features encode (also runnable as `medxfer analyze NAME`)

    def spell(self, name: str) -> str:
        return f"--set {self.name}.{name}"

    def make_params(self, values: Mapping[str, Any] | None = None, compat: str | None = None,
                    info: DatasetInfo | None = None, spell: Callable[[str], str] | None = None) -> Params:
        """Defaults, then compat overrides, then the dataset's own settings, then ``values``
        (the user's); unknown or mistyped names are one clear :class:`ParamError` (names
        written by ``spell``, default ``--set PROTOCOL.NAME``)."""
        merged: dict[str, Any] = {}
        if compat is not None and compat in self.compat:
            merged.update(self.compat[compat])
        if info is not None and self.dataset_defaults is not None:
            merged.update(self.dataset_defaults(info))
        merged.update(values or {})
        return build(self.params, merged, where=f"protocol {self.name!r}", spell=spell or self.spell)

    def validate(self, values: Mapping[str, Any] | None, spell: Callable[[str], str] | None = None) -> None:
        """Check the user's values alone (names and types), before any dataset is read."""
        self.make_params(values, spell=spell)


def _discover_builtin() -> None:
    """Import every public module of :mod:`medxfer.protocols` and :mod:`medxfer.analysis` so their
    ``register_protocol`` calls run (on the first lookup: ``import medxfer.protocols`` stays light)."""
    import importlib
    import pkgutil

    for package in ("medxfer.protocols", "medxfer.analysis"):
        try:
            pkg = importlib.import_module(package)
        except ModuleNotFoundError:
            continue
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_") and mod.name != "base":
                importlib.import_module(f"{package}.{mod.name}")


PROTOCOLS: Registry[Protocol] = Registry("protocol", "medxfer.protocols", discover=_discover_builtin)


def register_protocol(protocol: Protocol, aliases: tuple[str, ...] = ()) -> Protocol:
    return PROTOCOLS.register(protocol.name, protocol, aliases=aliases)

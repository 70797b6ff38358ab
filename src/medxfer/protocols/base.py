"""The protocol contract: registry entries and the typed result every protocol returns."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medxfer.registry import Registry


@dataclass
class EvalResult:
    """What one protocol run on one (model, dataset) produced.

    ``metrics``: headline numbers (percent for accuracies), e.g. ``accuracy``, ``ci95``.
    ``details``: per-episode accuracies, validation curves, chosen hyper-parameters,
    trials... anything needed to audit or reproduce the number.
    ``params``: the protocol parameters actually used (defaults filled in).
    """

    protocol: str
    metrics: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Protocol:
    """A registered evaluation protocol.

    ``needs`` is ``"features"`` (``run(features: FeatureSet, *, seed, **params)``) or
    ``"images"`` (``run(model, prepared, dataset, *, seed, device, **params)``, finetuning).
    ``defaults`` lists every parameter with its default; unknown parameters are errors.
    ``version`` goes into run keys so a changed protocol invalidates old results.
    ``compat`` maps a compat mode name (e.g. ``"paper"``) to parameter overrides.
    """

    name: str
    needs: str
    run: Callable[..., EvalResult]
    defaults: dict[str, Any]
    version: str = "1"
    description: str = ""
    compat: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset_defaults: Callable[[Any], dict[str, Any]] | None = None

    def resolve_params(self, params: dict[str, Any] | None = None, compat: str | None = None,
                       info: Any = None) -> dict[str, Any]:
        """Defaults, then compat overrides, then the dataset's own settings (``info``, a
        DatasetInfo, e.g. the paper's 5-way episodes for EyePACS), then the user's params.
        Unknown parameter names are errors. A protocol without a variant for ``compat``
        behaves the same in every mode."""
        out = dict(self.defaults)
        if compat is not None and compat in self.compat:
            out.update(self.compat[compat])
        if info is not None and self.dataset_defaults is not None:
            out.update(self.dataset_defaults(info))
        for k, v in (params or {}).items():
            if k not in self.defaults:
                raise ValueError(
                    f"protocol {self.name!r} has no parameter {k!r}; parameters: {', '.join(sorted(self.defaults))}"
                )
            out[k] = v
        return out


PROTOCOLS: Registry[Protocol] = Registry("protocol", "medxfer.protocols")


def register_protocol(protocol: Protocol, aliases: tuple[str, ...] = ()) -> Protocol:
    return PROTOCOLS.register(protocol.name, protocol, aliases=aliases)

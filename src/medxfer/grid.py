"""From a run spec to its grid of cells, checking every name and parameter before any work."""
from __future__ import annotations

import logging
from typing import Any

from medxfer.cell import Cell
from medxfer.config import RunSpec
from medxfer.errors import SpecError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, DEFAULT_PRECISION = 224, "aspect", "fp32"


def protocol_values(spec: RunSpec) -> dict[str, dict[str, Any]]:
    """``spec.protocol_params`` keyed by canonical protocol names; an unknown protocol name
    is an error with a suggestion (``--set fewshto.n_shot=10``)."""
    from medxfer.protocols import PROTOCOLS

    run = {PROTOCOLS.canonical(p) for p in spec.protocols}
    out: dict[str, dict[str, Any]] = {}
    for name, values in spec.protocol_params.items():
        try:
            canonical = PROTOCOLS.canonical(name)
        except KeyError as exc:
            raise SpecError(f"--set {name}.*: {exc}") from None
        if canonical not in run:
            log.warning("parameters given for protocol %r, which this run does not include (protocols: %s)",
                        canonical, ", ".join(sorted(run)))
        out.setdefault(canonical, {}).update(values)
    return out


def variant_of(spec: RunSpec, protocol: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The settings of a cell that differ from the defaults and change numbers: the user's
    protocol parameters, the compat mode, and a non-default evaluation transform or precision."""
    variant = dict(sorted(values.items()))
    if spec.compat != "none" and spec.compat in protocol.compat:
        variant["compat"] = spec.compat
    if spec.image_size != DEFAULT_IMAGE_SIZE:
        variant["image_size"] = spec.image_size
    if spec.resize != DEFAULT_RESIZE:
        variant["resize"] = spec.resize
    if protocol.needs.features and spec.precision != DEFAULT_PRECISION:
        variant["precision"] = spec.precision
    return variant


def _matches(rule: dict[str, Any], model: str, dataset: str, protocol: str, names: dict[str, dict[str, str]]) -> bool:
    """Whether a block or override rule selects this (model, dataset label, protocol)."""
    for key, value in (("models", model), ("datasets", dataset), ("protocols", protocol)):
        if key in rule and value not in {names[key].get(n, n) for n in rule[key]}:
            return False
    return True


def _rule_names(spec: RunSpec, models: list[str]) -> dict[str, dict[str, str]]:
    """For every name a rule may use, the canonical name it stands for; unknown names are errors."""
    from medxfer.protocols import PROTOCOLS

    by_arg = dict(zip(spec.models, models))
    known = {"models": by_arg, "datasets": {d.label: d.label for d in spec.datasets},
             "protocols": {p: PROTOCOLS.canonical(p) for p in spec.protocols}}
    for where, rules in (("blocks", spec.blocks), ("overrides", spec.overrides)):
        for i, rule in enumerate(rules):
            for key in ("models", "datasets", "protocols"):
                for name in rule.get(key, ()):
                    if name not in known[key] and name not in known[key].values():
                        raise SpecError(f"{where}[{i}].{key}: {name!r} is not one of this run's {key} "
                                        f"({', '.join(known[key])})")
    return known


def build_cells(spec: RunSpec) -> list[Cell]:
    """Every cell of ``spec`` (models x datasets x protocols x seeds, model-major; with
    ``blocks``, only cells some block selects), after checking model, dataset and protocol
    names, dataset options and protocol parameters. ``overrides`` add parameters to the cells
    they select (e.g. the paper's finetune batch 16 for DenseNet-121); they are part of the
    cell's parameters and run key, not of its variant (its file name and table)."""
    from medxfer.data.registry import dataset_options
    from medxfer.models import register_pretrained, resolve_model_arg
    from medxfer.protocols import PROTOCOLS

    register_pretrained(spec.cache_dir)  # models `medxfer pretrain` made in this run's cache
    models = [resolve_model_arg(m) for m in spec.models]
    protocols = [PROTOCOLS.get(p) for p in spec.protocols]
    for arg in spec.datasets:
        dataset_options(arg.kind, arg.options)  # unknown datasets and options fail here, before any work
    values = protocol_values(spec)
    for proto in protocols:
        proto.validate(values.get(proto.name))
    names = _rule_names(spec, models)
    cells = []
    for model in models:
        for arg in spec.datasets:
            for proto in protocols:
                if spec.blocks and not any(_matches(b, model, arg.label, proto.name, names) for b in spec.blocks):
                    continue
                user = values.get(proto.name, {})
                variant = variant_of(spec, proto, user)
                params = dict(user)
                for rule in spec.overrides:
                    if _matches(rule, model, arg.label, proto.name, names):
                        params.update(rule.get("protocol_params", {}).get(proto.name, {}))
                proto.validate(params)
                for seed in spec.seeds:
                    cells.append(Cell(model, arg, proto.name, params, seed, spec.compat, variant))
    return cells

"""A run's results, gathered for the report: the paper's models and datasets first (in the
paper's order, the ``paper`` preset's), the user's after; display names from the results'
own model and dataset facts; results grouped into tables (a protocol and its variant)."""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.errors import UsageError
from medxfer.results import DatasetFacts, ModelFacts, Result, load_results

log = logging.getLogger(__name__)

#: Analyses: their results describe the models, they do not measure transfer.
ANALYSES = ("saliency", "invariance", "reconstruction", "transferability")
#: The transfer protocols, in the order the report shows them (others follow, by name).
TRANSFER = ("fewshot", "linear", "finetune")
PROTOCOL_TITLES = {"fewshot": "Few-shot", "linear": "Linear probe", "finetune": "Finetuning",
                   "saliency": "Attentive diffusion", "invariance": "Invariance",
                   "reconstruction": "Perceptual distance", "transferability": "Transferability"}
FAMILIES = ("self-supervised", "supervised", "domain-specific")


@lru_cache(maxsize=1)
def paper_order() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(models, datasets) of the paper, in its order: the ``paper`` preset's lists."""
    from medxfer.presets import load_preset

    preset = load_preset("paper")
    models = tuple(str(m) for m in preset["models"])
    datasets = tuple(str(d).partition("=")[0].strip() for d in preset["datasets"])
    return models, datasets


def table_name(result: Result) -> str:
    """The table a result goes in: its protocol, and its variant when the user changed settings
    (``fewshot (n_shot=10)``), so variants are never averaged together."""
    if not result.variant:
        return result.protocol
    return f"{result.protocol} ({', '.join(f'{k}={v}' for k, v in result.variant.items())})"


def is_analysis(protocol: str) -> bool:
    return protocol in ANALYSES


@dataclass(frozen=True)
class Value:
    """One (model, dataset) number of a table: the mean over seeds, the mean half-width."""

    value: float
    ci95: float | None
    seeds: int


def mean_value(pairs: Iterable[tuple[float, float | None]]) -> Value | None:
    """Mean of the values and of the half-widths that exist; None when there is no value."""
    vals = [(float(v), c) for v, c in pairs if v is not None and np.isfinite(v)]
    if not vals:
        return None
    cis = [float(c) for _, c in vals if c is not None]
    return Value(float(np.mean([v for v, _ in vals])), float(np.mean(cis)) if cis else None, len(vals))


@dataclass
class Collection:
    """Every readable result of a run, ordered and labelled for the report."""

    results: list[Result]
    run_dir: Path | None = None
    run_info: dict[str, Any] | None = None
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    model_facts: dict[str, ModelFacts] = field(default_factory=dict)
    dataset_facts: dict[str, DatasetFacts] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # model name -> its unique display label
    ds_labels: dict[str, str] = field(default_factory=dict)  # dataset label -> its display label
    _random: set[str] | None = field(default=None, repr=False)
    _names: list[str] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, results: list[Result], run_dir: Path | None = None,
           run_info: dict[str, Any] | None = None) -> Collection:
        paper_models, paper_datasets = paper_order()
        model_facts: dict[str, ModelFacts] = {}
        dataset_facts: dict[str, DatasetFacts] = {}
        for r in results:
            model_facts.setdefault(r.model, r.model_info)
            dataset_facts.setdefault(r.dataset, r.dataset_info)
        seen_m = list(model_facts)
        seen_d = list(dataset_facts)

        def m_key(m: str) -> tuple[int, int]:
            return (paper_models.index(m) if m in paper_models else len(paper_models), seen_m.index(m))

        def d_key(d: str) -> tuple[int, str, int]:
            name = dataset_facts[d].name
            pos = paper_datasets.index(name) if name in paper_datasets else len(paper_datasets)
            return (pos, d if pos < len(paper_datasets) else "", seen_d.index(d))

        models = sorted(seen_m, key=m_key)
        datasets = sorted(seen_d, key=d_key)
        return cls(results=list(results), run_dir=run_dir, run_info=run_info, models=models, datasets=datasets,
                   model_facts=model_facts, dataset_facts=dataset_facts,
                   labels=_unique_labels({m: model_facts[m].display_name or m for m in models}),
                   ds_labels=_unique_labels({d: _dataset_label(d, dataset_facts[d]) for d in datasets}))

    # ------------------------------------------------------------------ lookups
    def model_label(self, model: str) -> str:
        return self.labels.get(model, model)

    def dataset_label(self, dataset: str) -> str:
        return self.ds_labels.get(dataset, dataset)

    def random_weights(self, model: str) -> bool:
        """True when any result of ``model`` used random weights (a run folder can mix both)."""
        if self._random is None:
            self._random = {r.model for r in self.results if r.model_info.random_weights}
        return model in self._random

    def synthetic(self, dataset: str) -> bool:
        return bool(self.dataset_facts[dataset].synthetic)

    def family(self, model: str) -> str:
        return self.model_facts[model].family

    @property
    def user_datasets(self) -> list[str]:
        paper = paper_order()[1]
        return [d for d in self.datasets if self.dataset_facts[d].name not in paper]

    def tables(self) -> dict[str, list[Result]]:
        """table name -> its results; transfer protocols first (few-shot, linear, finetune,
        then others by name), analyses last."""
        groups: dict[str, list[Result]] = defaultdict(list)
        for r in self.results:
            groups[table_name(r)].append(r)

        def key(name: str) -> tuple[int, int, str]:
            proto = groups[name][0].protocol
            if proto in TRANSFER:
                return (0, TRANSFER.index(proto), name)
            if is_analysis(proto):
                return (2, ANALYSES.index(proto), name)
            return (1, 0, name)
        return {n: groups[n] for n in sorted(groups, key=key)}

    def table_title(self, name: str) -> str:
        """A table's short title: the protocol's ("Few-shot"), with the variant only when the run
        has several tables of that protocol."""
        proto = name.split(" ", 1)[0]
        base = PROTOCOL_TITLES.get(proto, proto)
        if self._names is None:
            self._names = sorted({table_name(r) for r in self.results})
        if sum(n.split(" ", 1)[0] == proto for n in self._names) <= 1:
            return base
        return base + name[len(proto):]

    @staticmethod
    def variant_note(name: str) -> str | None:
        """"Settings changed from the defaults: ..." for a variant table, else None."""
        _, _, rest = name.partition(" ")
        return f"Settings changed from the protocol's defaults: {rest.strip('()')}." if rest else None

    def transfer_tables(self) -> dict[str, list[Result]]:
        return {n: rs for n, rs in self.tables().items() if not is_analysis(rs[0].protocol)}

    def analysis(self, protocol: str) -> list[Result]:
        """The analysis results of ``protocol`` (its default variant first, others after)."""
        return [r for r in self.results if r.protocol == protocol]

    def grid(self, results: list[Result], metric: str | None = None) -> dict[tuple[str, str], Value]:
        """(model, dataset) -> the headline (or ``metrics[metric]``) averaged over seeds."""
        raw: dict[tuple[str, str], list[tuple[float, float | None]]] = defaultdict(list)
        for r in results:
            if metric is None:
                raw[(r.model, r.dataset)].append((r.headline.value, r.headline.ci95))
            elif isinstance(r.metrics.get(metric), (int, float)):
                raw[(r.model, r.dataset)].append((float(r.metrics[metric]), _metric_ci(r, metric)))
        out = {}
        for key, pairs in raw.items():
            v = mean_value(pairs)
            if v is not None:
                out[key] = v
        return out

    def models_of(self, results: list[Result]) -> list[str]:
        present = {r.model for r in results}
        return [m for m in self.models if m in present]

    def datasets_of(self, results: list[Result]) -> list[str]:
        present = {r.dataset for r in results}
        return [d for d in self.datasets if d in present]


def _metric_ci(r: Result, metric: str) -> float | None:
    for key in (f"{metric}_ci95", f"{metric}.ci95"):
        v = r.metrics.get(key)
        if isinstance(v, (int, float)):
            return float(v)
    if metric == r.headline.metric:
        return r.headline.ci95
    return None


def _dataset_label(label: str, facts: DatasetFacts) -> str:
    """The paper's name for a registered dataset under its own label; the user's label otherwise
    (``pm-normal`` stays ``pm-normal``, not a second ``iChallenge-PM``)."""
    display = facts.display_name or facts.name
    if label == facts.name:
        return display
    if display in (facts.name, label):  # no paper name, or the user chose it
        return label
    return f"{display} ({label})"


def _unique_labels(labels: dict[str, str]) -> dict[str, str]:
    """Display labels made unique: a clash keeps the key in brackets."""
    counts: dict[str, int] = defaultdict(int)
    for v in labels.values():
        counts[v] += 1
    return {k: (v if counts[v] == 1 else f"{v} [{k}]") for k, v in labels.items()}


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """``run.json`` of a run folder, or None when absent or unreadable (with a warning)."""
    path = run_dir / "run.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def collect(run_dir: Path | str) -> Collection:
    """Every valid result under ``RUN_DIR/results`` (files of older schemas are skipped with a
    warning); a folder without any is a :class:`~medxfer.errors.UsageError`."""
    run_dir = Path(run_dir)
    results_dir = run_dir / "results"
    if not results_dir.is_dir():
        raise UsageError(f"{run_dir} is not a run folder: no results/ inside (run `medxfer run --out {run_dir}` first)")
    results = load_results(results_dir)
    if not results:
        raise UsageError(f"no readable result JSONs under {results_dir}")
    return Collection.of(results, run_dir=run_dir, run_info=read_run_info(run_dir))

"""Result tables: one per protocol, models x datasets, best and second best marked."""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from medxfer.report.stats import paired_difference
from medxfer.results import Result


@dataclass(frozen=True)
class TableCell:
    value: float
    ci95: float | None
    seeds: int


def table_name(result: Result) -> str:
    """The table a result goes in: its protocol, and its variant when the user changed settings
    (``fewshot (n_shot=10)``), so variants are never averaged together."""
    if not result.variant:
        return result.protocol
    return f"{result.protocol} ({', '.join(f'{k}={v}' for k, v in result.variant.items())})"


def collect(results: list[Result]) -> dict[str, dict[tuple[str, str], TableCell]]:
    """table -> (model, dataset) -> cell averaged over seeds."""
    raw: dict[str, dict[tuple[str, str], list[tuple[float, float | None]]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        raw[table_name(r)][(r.model, r.dataset)].append((r.headline.value, r.headline.ci95))
    out: dict[str, dict[tuple[str, str], TableCell]] = {}
    for proto, cells in raw.items():
        out[proto] = {}
        for key, vals in cells.items():
            v = float(np.mean([x for x, _ in vals]))
            cis = [c for _, c in vals if c is not None]
            out[proto][key] = TableCell(v, float(np.mean(cis)) if cis else None, len(vals))
    return out


def _ranks(values: list[float | None]) -> list[int]:
    """1 for the best (ties share it), 2 for the second best, 0 otherwise."""
    present = sorted({v for v in values if v is not None}, reverse=True)
    best = present[0] if present else None
    second = present[1] if len(present) > 1 else None
    return [1 if v is not None and v == best else 2 if v is not None and v == second else 0 for v in values]


def _fmt(cell: TableCell | None) -> str:
    if cell is None:
        return "–"
    s = f"{cell.value:.2f}"
    if cell.ci95 is not None:
        s += f" ± {cell.ci95:.2f}"
    if cell.seeds > 1:
        s += f" ({cell.seeds} seeds)"
    return s


def protocol_tables(results: list[Result]) -> dict[str, tuple[list[str], list[str], dict]]:
    """table -> (models, datasets, cells) in first-seen order."""
    tables = {}
    for name, cells in collect(results).items():
        models = list(dict.fromkeys(r.model for r in results if table_name(r) == name))
        datasets = list(dict.fromkeys(r.dataset for r in results if table_name(r) == name))
        tables[name] = (models, datasets, cells)
    return tables


def summary_markdown(results: list[Result]) -> str:
    """The run's summary: a table per protocol (mean ± 95% CI where the protocol has one;
    **best** and _second best_ per dataset), then which weights every model used."""
    if not results:
        return "# medxfer results\n\nNo results yet.\n"
    lines = ["# medxfer results", ""]
    for proto, (models, datasets, cells) in protocol_tables(results).items():
        metric_names = sorted({r.headline.metric for r in results if table_name(r) == proto})
        lines += [f"## {proto} ({', '.join(metric_names)}, percent)", ""]
        synthetic = sorted({r.dataset for r in results if table_name(r) == proto and r.dataset_info.synthetic})
        if synthetic:
            lines += [f"**SYNTHETIC DATA** ({', '.join(synthetic)}): images written by medxfer's generators, "
                      "not real data.", ""]
        lines.append("| model | " + " | ".join(datasets) + " |")
        lines.append("|---|" + "---|" * len(datasets))
        ranks_by_ds = {}
        for ds in datasets:
            vals = [cells[(m, ds)].value if (m, ds) in cells else None for m in models]
            ranks_by_ds[ds] = dict(zip(models, _ranks(vals)))
        for m in models:
            row = []
            for ds in datasets:
                text = _fmt(cells.get((m, ds)))
                rank = ranks_by_ds[ds][m] if len(models) > 1 else 0
                row.append(f"**{text}**" if rank == 1 else f"_{text}_" if rank == 2 else text)
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Best per dataset in **bold**, second best in _italics_.", ""]
    lines += paired_section(results)
    lines += pretraining_section(results)
    lines += ["## Weights", ""]
    seen = {}
    for r in results:
        seen.setdefault(r.model, r.model_info)
    for name, info in seen.items():
        tag = " — RANDOMLY INITIALISED, not pretrained" if info.random_weights else ""
        lines.append(f"- {name}: {info.weights}{tag}")
    warnings = sorted({w for r in results for w in r.warnings})
    problems = sorted({p for r in results for p in r.dataset_info.problems})
    if warnings or problems:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings + problems[:50]]
        if len(problems) > 50:
            lines.append(f"- ... and {len(problems) - 50} more dataset problems (see the result JSONs)")
    return "\n".join(lines) + "\n"


def paired_section(results: list[Result]) -> list[str]:
    """Few-shot: each model against the best one on the same episodes (seed 0 or the first seed)."""
    by_ds: dict[str, dict[str, Result]] = defaultdict(dict)
    for r in results:
        if r.protocol == "fewshot" and r.episode_accuracies is not None:
            by_ds[table_name(r) + "\0" + r.dataset].setdefault(r.model, r)
    rows = []
    for key, per_model in by_ds.items():
        ds = key.split("\0", 1)[1]
        if len(per_model) < 2:
            continue
        best = max(per_model, key=lambda m: per_model[m].headline.value)
        for m, r in per_model.items():
            if m == best:
                continue
            same = r.details.get("episodes_sha256") == per_model[best].details.get("episodes_sha256")
            if not same:
                rows.append(f"| {ds} | {m} | {best} | different episodes: not paired | |")
                continue
            d = paired_difference(r.episode_accuracies, per_model[best].episode_accuracies)
            rows.append(f"| {ds} | {m} | {best} | {d.mean:+.2f} ± {d.ci95:.2f} | {d.p_value:.3g} |")
    if not rows:
        return []
    return ["## Few-shot, paired against the best model (same episodes)", "",
            "| dataset | model | best | difference (points, 95% CI) | p (paired z) |", "|---|---|---|---|---|",
            *rows, ""]


IN_DOMAIN = "self-supervised (in-domain)"
IMAGENET_FAMILIES = ("supervised", "self-supervised")


def _against(r: Result, other: Result) -> str:
    """``difference | p`` of r minus other: paired on shared few-shot episodes, else unpaired."""
    if (r.episode_accuracies is not None and other.episode_accuracies is not None
            and r.details.get("episodes_sha256") == other.details.get("episodes_sha256")
            and len(r.episode_accuracies) == len(other.episode_accuracies)):
        d = paired_difference(r.episode_accuracies, other.episode_accuracies)
        return f"{d.mean:+.2f} ± {d.ci95:.2f} (paired, {d.n} episodes) | {d.p_value:.3g}"
    diff = r.headline.value - other.headline.value
    cis = [c for c in (r.headline.ci95, other.headline.ci95) if c is not None]
    ci = f" (each ± {max(cis):.2f} or less; not paired)" if cis else " (not paired)"
    return f"{diff:+.2f}{ci} | –"


def pretraining_section(results: list[Result]) -> list[str]:
    """Models made by ``medxfer pretrain``: how each was made (method, steps, data, loss curve
    ends) and its difference from its parent and from the best ImageNet-pretrained model of the
    same table and dataset (paired on the same few-shot episodes)."""
    mine = [r for r in results if r.model_info.family == IN_DOMAIN]
    if not mine:
        return []
    lines = ["## In-domain pretraining: against the parent and the best ImageNet model", ""]
    seen: dict[str, Result] = {}
    for r in mine:
        seen.setdefault(r.model, r)
    for name, r in seen.items():
        pt = r.model_info.pretraining or {}
        data = pt.get("data") or {}
        sources = ", ".join(str(d.get("label")) for d in data.get("datasets", []))
        first, last = pt.get("loss_first"), pt.get("loss_last")
        curve = f"; loss {first:.4f} -> {last:.4f}" if first is not None and last is not None else ""
        lines.append(f"- {name}: {pt.get('method', '?')} for {pt.get('steps', '?')} steps ({pt.get('augment', '?')} "
                     f"views) from {r.model_info.parent} on {data.get('images', '?')} images of {sources or '?'} "
                     f"(data {data.get('fingerprint', '?')}){curve}")
    lines += ["", "| table | dataset | model | against | difference (points) | p |", "|---|---|---|---|---|---|"]
    cells: dict[tuple[str, str], dict[str, Result]] = defaultdict(dict)
    for r in results:
        cells[(table_name(r), r.dataset)].setdefault(r.model, r)
    rows = 0
    for (table, ds), per_model in cells.items():
        imagenet = {m: x for m, x in per_model.items() if x.model_info.family in IMAGENET_FAMILIES}
        best = max(imagenet, key=lambda m: imagenet[m].headline.value) if imagenet else None
        for m, r in per_model.items():
            if r.model_info.family != IN_DOMAIN:
                continue
            parent = r.model_info.parent
            for label, other in ((f"parent {parent}", per_model.get(parent or "")),
                                 (f"best ImageNet {best}", per_model.get(best or ""))):
                if other is None or other.model == m or (label.startswith("best") and best == parent):
                    continue
                lines.append(f"| {table} | {ds} | {m} | {label} | {_against(r, other)} |")
                rows += 1
            if parent not in per_model:
                lines.append(f"| {table} | {ds} | {m} | parent {parent} | not in this run | – |")
                rows += 1
    lines += ["", "Positive differences favour the in-domain model. Continued in-domain pretraining gains are "
              "published as small (MoCo-CXR: +0.096 AUC at 0.1% of the labels for a linear model, shrinking as "
              "labels grow), and a strong supervised ImageNet model can win.", ""]
    return lines


def results_csv(results: list[Result]) -> str:
    """One row per result: model, dataset, table (protocol and variant), seed, every metric."""
    metric_names = sorted({k for r in results for k in r.metrics})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "dataset", "protocol", "table", "seed", *metric_names, "weights"])
    for r in results:
        w.writerow([r.model, r.dataset, r.protocol, table_name(r), r.seed,
                    *[r.metrics.get(k, "") for k in metric_names], r.model_info.weights])
    return buf.getvalue()


def latex_table(results: list[Result], protocol: str) -> str:
    """A LaTeX tabular for one protocol, best in bold, second best underlined."""
    models, datasets, cells = protocol_tables(results)[protocol]
    lines = [r"\begin{tabular}{l" + "c" * len(datasets) + "}", r"\toprule",
             "Model & " + " & ".join(datasets) + r" \\", r"\midrule"]
    ranks_by_ds = {ds: dict(zip(models, _ranks([cells[(m, ds)].value if (m, ds) in cells else None
                                                 for m in models]))) for ds in datasets}
    for m in models:
        row = []
        for ds in datasets:
            text = _fmt(cells.get((m, ds))).replace("±", r"$\pm$")
            rank = ranks_by_ds[ds][m]
            row.append(r"\textbf{" + text + "}" if rank == 1 else r"\underline{" + text + "}" if rank == 2 else text)
        lines.append(m + " & " + " & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"

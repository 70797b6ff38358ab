"""``report.html``: one self-contained page (figures embedded as base64 PNG, tables sortable
with a few lines of plain JavaScript, no request to the network: a Content-Security-Policy
meta tag forbids it, so an accidental external reference is a console error), rendered with
jinja2 with autoescaping (a model named ``<script>`` shows as text).

At the top the answer (the best model per dataset and which others are statistically
indistinguishable from it), then the tables, the statistics, the figures, and provenance
(run spec, versions, weights, seeds, episode digests).
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from medxfer.report.collect import Collection, table_name
from medxfer.report.findings import Findings
from medxfer.report.tables import Table

#: Everything from this file itself: inline script and style, images from data: URLs only.
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"


@dataclass(frozen=True)
class PageFigure:
    """A figure as the page shows it: embedded PNG (or None with the reason it is missing)."""

    slug: str
    title: str
    caption: str
    png: Path | None
    svg: Path | None
    missing: list[str]

    @property
    def data_uri(self) -> str | None:
        if self.png is None:
            return None
        return "data:image/png;base64," + base64.b64encode(self.png.read_bytes()).decode("ascii")


def inline_markdown(text: str) -> Markup:
    """Escape ``text``, then render ``**bold**`` and ```code``` (the notes' only markup)."""
    s = str(escape(text))
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return Markup(s)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["md"] = inline_markdown
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    return env


def template_text() -> str:
    return resources.files("medxfer.report").joinpath("templates", "report.html.j2").read_text(encoding="utf-8")


def provenance(coll: Collection, f: Findings) -> dict[str, Any]:
    """Run spec, versions, device, git revision, weights, datasets, seeds and episode digests."""
    first = coll.results[0]
    info = coll.run_info or {}
    spec = info.get("spec") or first.spec
    versions = info.get("versions") or first.versions
    weights = [{"label": coll.model_label(m), "name": m, "family": coll.family(m), "weights": mf.weights,
                "random": mf.random_weights, "hash": mf.weights_hash, "licence": mf.licence,
                "top1": mf.imagenet_top1}
               for m in coll.models for mf in [coll.model_facts[m]]]
    datasets = [{"label": coll.dataset_label(d), "key": d, "name": df.name, "root": df.root, "images": df.images,
                 "modality": df.modality, "in_domain": df.in_domain, "synthetic": df.synthetic,
                 "fingerprint": df.fingerprint[:16]}
                for d in coll.datasets for df in [coll.dataset_facts[d]]]
    digests = [{"table": p.table, "dataset": coll.dataset_label(p.dataset), "seed": p.seed,
                "sha256": p.episodes_sha256 or "–", "models": len(p.results)}
               for ps in f.pairs.values() for p in ps]
    created = sorted(r.created for r in coll.results)
    seeds = sorted({r.seed for r in coll.results})
    revs = sorted({r.git_revision or "unknown" for r in coll.results})
    devices = sorted({r.device for r in coll.results})
    tables = sorted({table_name(r) for r in coll.results})
    return {"spec": spec, "versions": versions, "weights": weights, "datasets": datasets, "digests": digests,
            "created": (created[0], created[-1]), "seeds": seeds, "git_revisions": revs, "devices": devices,
            "tables": tables, "cache_dir": info.get("cache_dir"), "results": len(coll.results)}


def _across_statements(coll: Collection, f: Findings) -> list[tuple[str, str]]:
    """(tables, statement) with the tables that share a statement named together."""
    grouped: dict[str, list[str]] = {}
    for name, a in f.across.items():
        text = a.result.statement if a.result is not None else f"not computed: {a.reason}."
        grouped.setdefault(text, []).append(coll.table_title(name).lower())
    return [(", ".join(names), text) for text, names in grouped.items()]


def render_html(coll: Collection, f: Findings, *, answer: Table | None, tables: list[Table],
                stats_tables: list[Table], figures: list[PageFigure], files: list[str]) -> str:
    """The page (a string); nothing in it depends on the time it was made."""
    template = _environment().from_string(template_text())
    run = coll.run_dir.name if coll.run_dir is not None else "results"
    return template.render(
        csp=Markup(CSP), run=run, coll=coll, f=f, answer=answer, tables=tables, stats_tables=stats_tables,
        figures=[g for g in figures if g.png is not None], missing_figures=[g for g in figures if g.png is None],
        files=files, prov=provenance(coll, f),
        random_models=[coll.model_label(m) for m in coll.models if coll.random_weights(m)],
        synthetic_datasets=[coll.dataset_label(d) for d in coll.datasets if coll.synthetic(d)],
        across=_across_statements(coll, f),
    )

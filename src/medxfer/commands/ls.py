"""``medxfer ls models|datasets|protocols [--json]``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from medxfer.commands import Command, register_command
from medxfer.typed import type_name


def settings_rows(cls: type) -> list[dict[str, Any]]:
    """name, type, default, help (and whether it is execution-only) of a settings dataclass."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append({"name": f.name, "type": type_name(hints[f.name]), "default": default,
                     "help": f.metadata.get("help", ""), "execution_only": bool(f.metadata.get("execution"))})
    return rows


def _models(cache_dir: str | None) -> list[dict[str, Any]]:
    from medxfer.models import MODELS, is_cached, register_pretrained

    register_pretrained(cache_dir)
    rows = []
    for name, spec in MODELS.items():
        rows.append({
            "name": name, "aliases": MODELS.aliases_of(name), "arch": spec.arch, "family": spec.family,
            "feature_dim": spec.feature_dim, "normalization": spec.normalization,
            "imagenet_top1": spec.imagenet_top1, "imagenet_top1_paper": spec.imagenet_top1_paper,
            "in_paper": spec.in_paper, "licence": spec.licence,
            "cached": bool(spec.urls or spec.fmt != "none") and is_cached(spec, cache_dir),
            "source": spec.urls[0] if spec.urls else (spec.fetch_hint or spec.path or spec.weights_file or ""),
            "parent": spec.parent, "method": spec.extra.get("method"), "steps": spec.extra.get("steps"),
            "data_fingerprint": spec.extra.get("data_fingerprint"),
            "pretraining": (f"{spec.extra['method']} x{spec.extra['steps']} from {spec.parent} on data "
                            f"{spec.extra['data_fingerprint']}" if spec.parent and "method" in spec.extra else ""),
        })
    return rows


def _datasets(cache_dir: str | None = None) -> list[dict[str, Any]]:
    from medxfer.data import DATASETS

    rows = []
    for name, ad in DATASETS.items():
        i = ad.info
        rows.append({
            "name": name, "generic": ad.generic, "task": i.task, "classes": list(i.class_names),
            "modality": i.modality, "in_domain": i.in_domain, "expected_images": i.expected_images,
            "fewshot": f"{i.fewshot_way}-way {i.fewshot_shot}-shot", "headline_metric": i.headline_metric,
            "options": settings_rows(ad.options), "licence": i.licence, "layout": i.layout,
        })
    return rows


def _protocols(cache_dir: str | None = None) -> list[dict[str, Any]]:
    from medxfer.protocols import PROTOCOLS

    return [{"name": n, "version": p.version, "needs": dataclasses.asdict(p.needs),
             "uses": ", ".join([*(f"features:{x}" for x in p.needs.features), *(["images"] if p.needs.images else []),
                               *(["model"] if p.needs.model else [])]) + f" ({p.needs.accelerator})",
             "params": settings_rows(p.params), "compat": sorted(p.compat), "description": p.description}
            for n, p in PROTOCOLS.items()]


LISTERS = {"models": _models, "datasets": _datasets, "protocols": _protocols}
COLUMNS = {
    "models": ("name", "arch", "family", "feature_dim", "normalization", "imagenet_top1", "cached", "licence",
               "pretraining"),
    "datasets": ("name", "task", "modality", "expected_images", "fewshot", "headline_metric", "layout"),
    "protocols": ("name", "uses", "version", "description"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=sorted(LISTERS))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cache-dir", help="cache folder to check for weights")


def text_table(rows: list[dict[str, Any]], cols: tuple[str, ...]) -> str:
    """Rows as plain left-aligned columns under a header line."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    lister = LISTERS[args.what]
    rows = lister(args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(text_table(rows, COLUMNS[args.what]))
    return 0


register_command(Command("ls", "list registered models, datasets or protocols", add_arguments, run))

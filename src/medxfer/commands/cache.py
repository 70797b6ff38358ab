"""``medxfer cache ls|verify|prune``: what the cache holds, whether it is intact, and removing
what you name (never an artifact a run in progress has locked)."""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from medxfer.cache import default_cache_dir
from medxfer.commands import Command, register_command
from medxfer.commands.ls import text_table
from medxfer.errors import UsageError
from medxfer.inventory import (
    CORRUPT,
    KINDS,
    Artifact,
    Selection,
    human_size,
    parse_age,
    prune,
    scan,
    verify_artifact,
)

log = logging.getLogger(__name__)

LS_COLUMNS = ("kind", "key", "model", "dataset", "detail", "state", "size", "last_used", "from")
EXIT_CORRUPT = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=sorted(ACTIONS), help="ls: list; verify: recompute checksums; prune: remove")
    p.add_argument("--cache-dir", help="the cache folder (default: $MEDXFER_CACHE or ~/.cache/medxfer, as `run`)")
    p.add_argument("--older-than", metavar="AGE", help="only artifacts last used at least AGE ago (30d, 12h, 90m)")
    p.add_argument("--model", help="only artifacts made by this model")
    p.add_argument("--dataset", help="only artifacts of this dataset (its name or label)")
    p.add_argument("--kind", action="append", default=[], choices=KINDS.names(),
                   help="only this kind of artifact (repeatable)")
    p.add_argument("--incomplete", action="store_true", help="only unfinished artifacts")
    p.add_argument("--all", action="store_true", help="prune: everything selected, even with no filter")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would be removed, remove nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _selection(args: argparse.Namespace) -> Selection:
    age = parse_age(args.older_than) if args.older_than is not None else None
    return Selection(older_than=age, model=args.model, dataset=args.dataset, incomplete=args.incomplete,
                     kinds=tuple(args.kind))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "never"


def _state(a: Artifact) -> str:
    return "complete" if a.complete else f"in progress ({a.progress})" if a.progress else "in progress"


def _table_row(a: Artifact) -> dict[str, str]:
    return {"kind": a.kind, "key": a.key, "model": a.model or "-", "dataset": a.dataset or "-", "detail": a.detail,
            "state": _state(a), "size": human_size(a.size), "last_used": _when(a.last_used),
            "from": a.last_used_from}


def _selected(cache: Path, sel: Selection) -> list[Artifact]:
    if not cache.is_dir():
        log.info("cache folder %s does not exist: nothing cached", cache)
        return []
    return [a for a in scan(cache, sel.kinds) if sel.matches(a)]


def _ls(args: argparse.Namespace, cache: Path, sel: Selection) -> int:
    found = _selected(cache, sel)
    if args.json:
        print(json.dumps([a.row() for a in found], indent=2))
        return 0
    print(f"cache {cache}")
    if found:
        print(text_table([_table_row(a) for a in found], LS_COLUMNS))
    print(f"{len(found)} artifact(s), {human_size(sum(a.size for a in found))} on disk "
          "(last use from: stamp = recorded when the pipeline read it, mtime = newest file time)")
    return 0


def _verify(args: argparse.Namespace, cache: Path, sel: Selection) -> int:
    checks = [(a, verify_artifact(a)) for a in _selected(cache, sel)]
    if args.json:
        print(json.dumps([dict(a.row(), status=c.status, message=c.message) for a, c in checks], indent=2))
    else:
        for a, c in checks:
            print(f"{c.status:<10}  {a.kind:<19}  {a.key}  {a.model or '-'}  {a.dataset or '-'}  {c.message}")
        counts = {s: sum(c.status == s for _, c in checks) for s in dict.fromkeys(c.status for _, c in checks)}
        print(f"{len(checks)} artifact(s) checked: " + (", ".join(f"{n} {s}" for s, n in counts.items()) or "none"))
    return EXIT_CORRUPT if any(c.status == CORRUPT for _, c in checks) else 0


def _prune(args: argparse.Namespace, cache: Path, sel: Selection) -> int:
    if not sel.narrowed and not args.all:
        raise UsageError("cache prune: name what to remove (--older-than, --model, --dataset, --kind, "
                         "--incomplete), or pass --all to remove every artifact")
    done = prune(cache, sel, dry_run=args.dry_run) if cache.is_dir() else []
    if args.json:
        print(json.dumps([dict(p.artifact.row(), outcome=p.outcome, reason=p.reason) for p in done], indent=2))
        return 0
    for p in done:
        a = p.artifact
        why = f": {p.reason}" if p.reason else ""
        print(f"{p.outcome} {a.kind} {a.key} ({a.model or '-'}, {a.dataset or '-'}, {human_size(a.size)}){why}")
    gone = [p for p in done if p.outcome != "skipped"]
    skipped = len(done) - len(gone)
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(gone)} artifact(s) {'to remove' if args.dry_run else 'removed'}, {verb} "
          f"{human_size(sum(p.artifact.size for p in gone))}" + (f"; {skipped} skipped" if skipped else ""))
    return 0


ACTIONS: dict[str, Callable[[argparse.Namespace, Path, Selection], int]] = {
    "ls": _ls, "verify": _verify, "prune": _prune}


def run(args: argparse.Namespace) -> int:
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    return ACTIONS[args.action](args, cache, _selection(args))


register_command(Command("cache", "list, verify or prune the cache (prepared images, features, weights)",
                         add_arguments, run))

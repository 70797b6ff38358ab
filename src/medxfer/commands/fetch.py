"""``medxfer fetch NAME [NAME...] [--from FILE] [--cache-dir DIR]``: download/convert weights once."""
from __future__ import annotations

import argparse
import logging
import sys

from medxfer.commands import Command, register_command
from medxfer.errors import UsageError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="model name or alias (see `medxfer ls models`), or NAME=ARCH:/path/ckpt.pth[:prefix]")
    p.add_argument("--from", dest="source", metavar="FILE",
                   help="convert this original checkpoint file (as published) instead of downloading; one NAME only")
    p.add_argument("--cache-dir", metavar="DIR", help="cache directory (default $MEDXFER_CACHE or ~/.cache/medxfer)")
    p.add_argument("--paper", action="store_true", help="fetch the thirteen backbones of the paper")
    p.add_argument("--no-verify", action="store_true",
                   help="convert even if the file does not match the published hash (e.g. a re-hosted copy)")
    p.add_argument("--offline", action="store_true", help="never touch the network (only --from and the cache)")


def run(args: argparse.Namespace) -> int:
    from medxfer.models import MODELS, resolve_model_arg
    from medxfer.models.errors import (
        CheckpointError,
        DownloadError,
        WeightsUnavailableError,
    )
    from medxfer.models.fetch import fetch

    names = [resolve_model_arg(n) for n in args.names]
    if args.paper:
        names += [n for n, s in MODELS.items() if s.in_paper and n not in names]
    if not names:
        raise UsageError("name at least one model (or --paper); `medxfer ls models` lists them")
    if args.source and len(names) != 1:
        raise UsageError(f"--from converts one file for one model, got {len(names)} names")
    failed = 0
    for name in names:
        try:
            path = fetch(name, source=args.source, cache_dir=args.cache_dir,
                         allow_download=False if args.offline else None, verify_hash=not args.no_verify,
                         progress=not getattr(args, "quiet", False))
        except (WeightsUnavailableError, CheckpointError, DownloadError) as exc:
            failed += 1
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            continue
        print(f"{name}: {path}  (licence: {MODELS.get(name).licence}; do not redistribute the weights)")
    return 1 if failed else 0


register_command(Command("fetch", "download (or convert with --from) pretrained weights into the cache",
                         add_arguments, run))

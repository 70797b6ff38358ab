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
                   help="model name or alias (see `medxfer ls models`), NAME=ARCH:/path/ckpt.pth[:prefix], "
                        "or lpips (the torchvision trunks the reconstruction analysis needs)")
    p.add_argument("--from", dest="source", metavar="FILE",
                   help="convert this original checkpoint file (as published) instead of downloading; one NAME "
                        "only (for lpips: a folder holding the three torchvision files)")
    p.add_argument("--cache-dir", metavar="DIR", help="cache directory (default $MEDXFER_CACHE or ~/.cache/medxfer)")
    p.add_argument("--paper", action="store_true", help="fetch the thirteen backbones of the paper")
    p.add_argument("--no-verify", action="store_true",
                   help="convert even if the file does not match the published hash (e.g. a re-hosted copy)")
    p.add_argument("--offline", action="store_true", help="never touch the network (only --from and the cache)")


def _fetch_group(group: str, args: argparse.Namespace) -> int:
    """``medxfer fetch lpips``: the auxiliary files of a group (LPIPS's torchvision trunks)."""
    from medxfer.models.auxiliary import AUXILIARY, GROUPS, fetch_auxiliary
    from medxfer.models.errors import DownloadError, WeightsUnavailableError

    failed = 0
    for name in GROUPS.get(group):
        try:
            path = fetch_auxiliary(name, source=args.source, cache_dir=args.cache_dir,
                                   allow_download=False if args.offline else None, verify_hash=not args.no_verify,
                                   progress=not getattr(args, "quiet", False))
        except (WeightsUnavailableError, DownloadError) as exc:
            failed += 1
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            continue
        print(f"{name}: {path}  (licence: {AUXILIARY.get(name).licence})")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    from medxfer.models import MODELS, resolve_model_arg
    from medxfer.models.auxiliary import GROUPS
    from medxfer.models.errors import CheckpointError, DownloadError, WeightsUnavailableError
    from medxfer.models.fetch import fetch

    groups = [n for n in args.names if n in GROUPS]
    if groups:
        if len(groups) != len(args.names):
            raise UsageError(f"fetch {', '.join(groups)} on its own (a group of auxiliary files, not a model)")
        return max(_fetch_group(g, args) for g in groups)
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

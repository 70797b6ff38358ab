"""``medxfer pretrain``: continue self-supervised pretraining of a backbone on your images and
register the result as a model (``medxfer ls models`` lists it; ``medxfer run --models NAME``
evaluates it)."""
from __future__ import annotations

import argparse
from typing import Any

import yaml

from medxfer.commands import Command, register_command
from medxfer.errors import SpecError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="moco-v2", help="moco-v2 (default), simclr, byol or dino")
    p.add_argument("--init", required=True, help="the zoo model to continue from (e.g. supervised-r50, moco-v2)")
    p.add_argument("--weights", choices=["pretrained", "random"], default="pretrained",
                   help="start from its pretrained weights (default) or from a random initialisation")
    p.add_argument("--data", action="append", default=[], required=True, metavar="LABEL=SOURCE",
                   help="images to train on (labels ignored; repeatable): LABEL=images:DIR (any folder of images), "
                        "LABEL=folder:DIR, LABEL=csv:FILE, or a registered dataset NAME=PATH")
    p.add_argument("--data-option", action="append", default=[], metavar="LABEL.KEY=VALUE",
                   help="a dataset adapter option, e.g. eyepacs.allow_missing=true (repeatable)")
    p.add_argument("--out", required=True, metavar="NAME", help="name of the new model")
    p.add_argument("--steps", type=int, help="optimiser steps (default 200)")
    p.add_argument("--batch-size", type=int, help="images per micro-batch (default 32)")
    p.add_argument("--accumulate", type=int, help="micro-batches per step, for a large effective batch (default 1)")
    p.add_argument("--lr", type=float, help="learning rate (default: the method's base rate x batch / 256)")
    p.add_argument("--augment", help="views: cxr, fundus, histology or natural (default: natural, the method's own)")
    p.add_argument("--size", type=int, help="view size in pixels (default 224)")
    p.add_argument("--splits", help="comma-separated splits whose images are used (default train,val; 'all')")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16/fp16 autocast on CUDA, fp32 on a CPU")
    p.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                   help="any other setting, e.g. queue=1024, n_local=8, warmup_steps=0 (repeatable)")
    p.add_argument("--device", help="cuda, cpu ... (default: cuda if available)")
    p.add_argument("--workers", type=int, help="decoding workers (default: all cores)")
    p.add_argument("--cache-dir", help="cache folder (default $MEDXFER_CACHE or ~/.cache/medxfer)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and record them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model of this name")


def _params(args: argparse.Namespace) -> Any:
    from medxfer.pretrain import PretrainParams
    from medxfer.typed import build

    values: dict[str, Any] = {}
    for item in args.set:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise SpecError(f"--set {item!r}: expected PARAM=VALUE")
        values[k.strip()] = yaml.safe_load(v)
    for field_name, value in (("method", args.method), ("steps", args.steps), ("batch_size", args.batch_size),
                              ("accumulate", args.accumulate), ("lr", args.lr), ("augment", args.augment),
                              ("size", args.size), ("seed", args.seed), ("precision", args.precision)):
        if value is not None:
            values[field_name] = value
    if args.splits:
        values["splits"] = [s.strip() for s in args.splits.split(",") if s.strip()]
    return build(PretrainParams, values, where="medxfer pretrain", spell=lambda n: f"--set {n}")


def run(args: argparse.Namespace) -> int:
    from medxfer.commands.run import _parse_assignments
    from medxfer.pretrain import loss_curve_text, parse_data, pretrain

    params = _params(args)
    data = [parse_data(d) for d in args.data]
    for label, opts in _parse_assignments(args.data_option, "--data-option").items():
        for d in data:
            if d.label == label:
                d.options.update(opts)
                break
        else:
            raise SpecError(f"--data-option: no --data labelled {label!r}")
    out = pretrain(args.out, args.init, data, params, weights=args.weights, cache_dir=args.cache_dir,
                   device=args.device, workers=args.workers, skip_bad=args.skip_bad, overwrite=args.overwrite)
    rec = out.record
    print(f"model {out.name}: {rec['method']} for {rec['steps']} steps from {rec['parent']} ({rec['parent_weights']}) "
          f"on {rec['data']['images']} images (data {rec['data']['fingerprint']})"
          + ("" if out.computed else " — reused: an identical run was already registered"))
    print(f"weights: {out.weights_path}\nrecord:  {out.record_path}")
    if rec.get("images_per_second"):
        print(f"speed:   {rec['images_per_second']:.1f} images/s on {rec['device']} ({rec['precision']})")
    print("loss curve:\n" + loss_curve_text(rec["loss_curve"]))
    print(f"next: medxfer run --models {out.name},{rec['parent']} --dataset ... --protocols fewshot,linear "
          "(the summary compares it with its parent and the best ImageNet model)")
    return 0


register_command(Command("pretrain", "continue self-supervised pretraining of a backbone on your images "
                         "and register it as a model", add_arguments, run))

"""``medxfer run``: evaluate models x datasets x protocols x seeds; write results and a summary."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import yaml

from medxfer.commands import Command, register_command
from medxfer.config import DatasetArg, RunSpec, SpecError, yaml_problem
from medxfer.presets import load_preset

log = logging.getLogger(__name__)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML run spec; command-line options override its fields")
    p.add_argument("--preset", help="a packaged run spec: paper (the full grid; roots from $MEDXFER_DATA)")
    p.add_argument("--models", help="comma-separated model names (see `medxfer ls models`), or "
                                    "LABEL=ARCH:CHECKPOINT[:PREFIX] for your own checkpoint")
    p.add_argument("--model-file", help="a YAML file of your own checkpoints (models: [{name, arch, checkpoint, ...}])")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH",
                   help="a registered dataset NAME=PATH, or LABEL=folder:DIR / LABEL=csv:FILE / "
                        "LABEL=medmnist:FILE (repeatable)")
    p.add_argument("--dataset-option", action="append", default=[], metavar="LABEL.KEY=VALUE",
                   help="an adapter option, e.g. chexpert.uncertain=u_zeros (repeatable)")
    p.add_argument("--protocols", help="comma-separated protocols (default fewshot)")
    p.add_argument("--set", action="append", default=[], metavar="PROTOCOL.PARAM=VALUE",
                   help="a protocol parameter, e.g. fewshot.n_shot=10 (repeatable)")
    p.add_argument("--out", help="output folder (results/ and summary.md); default medxfer-out")
    p.add_argument("--weights", choices=["pretrained", "random", "auto"],
                   help="pretrained (default), random (labelled as such) or auto (pretrained if cached)")
    p.add_argument("--seed", type=int, action="append", help="seed (repeatable; default 0)")
    p.add_argument("--compat", choices=["none", "paper"], help="reproduce the authors' code where it differs")
    p.add_argument("--search", action="store_true", help="finetune: search learning rate and weight decay")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable/missing images and record them")
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, help="extraction batch size (default: chosen for the device)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="extraction precision (default fp32)")
    p.add_argument("--image-size", type=int, help="evaluation crop size (default 224)")
    p.add_argument("--resize", choices=["aspect", "squash"], help="aspect (default) or the authors' squash")
    p.add_argument("--workers", type=int, help="decoding workers (default: all cores)")
    p.add_argument("--cache-dir", help="cache folder (default $MEDXFER_CACHE or ~/.cache/medxfer)")
    p.add_argument("--executor", help="where cells run: local (default, this process) or ray (a Ray cluster; "
                                      'pip install "medxfer[ray]")')
    p.add_argument("--address", help="the Ray cluster's head, HOST:PORT (default $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--cpus-per-task", type=int, help="Ray: CPUs each CPU task (prepare, few-shot, linear ...) asks for "
                                                   "(default 1; the task runs that many threads)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run recorded in RUN_DIR/run.json (its spec; "
                                                       "only --executor, --address, --cpus-per-task, --device and --workers may change)")
    p.add_argument("--plan", action="store_true", help="print the grid, what is cached and a time estimate; "
                                                       "run and download nothing")


def _parse_assignments(items: list[str], flag: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, value = item.partition("=")
        group, dot, key = head.partition(".")
        if not eq or not dot or not group or not key:
            raise SpecError(f"{flag} {item!r}: expected GROUP.KEY=VALUE")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SpecError(f"{flag} {item!r}: {key}: the value is not valid YAML ({yaml_problem(exc)})") from None
        out.setdefault(group, {})[key] = parsed
    return out


_RESUME_CHANGES = ("executor", "address", "device", "workers", "cpus_per_task")


def _resume_from_args(args: argparse.Namespace) -> RunSpec:
    from medxfer.pipeline import resume_spec

    given = [flag for flag, value in (("--config", args.config), ("--preset", args.preset), ("--models", args.models),
                                      ("--model-file", args.model_file), ("--dataset", args.dataset),
                                      ("--dataset-option", args.dataset_option), ("--protocols", args.protocols),
                                      ("--set", args.set), ("--out", args.out), ("--weights", args.weights),
                                      ("--seed", args.seed), ("--compat", args.compat), ("--search", args.search),
                                      ("--skip-bad", args.skip_bad), ("--batch-size", args.batch_size),
                                      ("--precision", args.precision), ("--image-size", args.image_size),
                                      ("--resize", args.resize), ("--cache-dir", args.cache_dir)) if value]
    if given:
        raise SpecError(f"--resume {args.resume} continues the recorded run spec; {', '.join(given)} cannot change it "
                        f"(only {', '.join('--' + c.replace('_', '-') for c in _RESUME_CHANGES)} can)")
    changes = {c: getattr(args, c) for c in _RESUME_CHANGES if getattr(args, c) is not None}
    return resume_spec(args.resume, **changes)


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """Merge a YAML spec (if any) with command-line options into one validated RunSpec
    (``--resume RUN_DIR``: the spec recorded in the run folder)."""
    if getattr(args, "resume", None):
        return _resume_from_args(args)
    base: dict[str, Any] = {}
    if args.config and args.preset:
        raise SpecError("give --config or --preset, not both")
    file_models: list[str] = []
    if args.model_file:  # registered first: a --config may name these models
        from medxfer.models.custom import load_model_file

        file_models = load_model_file(args.model_file)
    if args.config:
        base = RunSpec.from_yaml(args.config).to_dict()
    elif args.preset:
        base = RunSpec.from_dict(load_preset(args.preset), where=f"preset {args.preset}").to_dict()
    if args.models:
        base["models"] = _csv(args.models)
    if args.dataset:
        base["datasets"] = [DatasetArg.parse(d).to_dict() for d in args.dataset]
    for label, opts in _parse_assignments(args.dataset_option, "--dataset-option").items():
        for d in base.get("datasets", []):
            if isinstance(d, dict) and d["label"] == label:
                d.setdefault("options", {}).update(opts)
                break
        else:
            raise SpecError(f"--dataset-option: no dataset labelled {label!r}")
    if args.protocols:
        base["protocols"] = _csv(args.protocols)
    params = dict(base.get("protocol_params", {}))
    for proto, kv in _parse_assignments(args.set, "--set").items():
        params.setdefault(proto, {}).update(kv)
    if args.search:
        params.setdefault("finetune", {})["search"] = True
    base["protocol_params"] = params
    if args.seed:
        base["seeds"] = args.seed
    for field_name, value in (("out", args.out), ("weights", args.weights), ("compat", args.compat),
                              ("device", args.device), ("batch_size", args.batch_size),
                              ("precision", args.precision), ("image_size", args.image_size),
                              ("resize", args.resize), ("workers", args.workers), ("cache_dir", args.cache_dir),
                              ("executor", args.executor), ("address", args.address),
                              ("cpus_per_task", args.cpus_per_task)):
        if value is not None:
            base[field_name] = value
    if args.skip_bad:
        base["skip_bad"] = True
    if args.model_file:
        base.setdefault("models", file_models)
    if "models" not in base:
        raise SpecError("give --models (or --model-file, or a --config with models)")
    base["models"] = [_resolve_model(m) for m in base["models"]]
    return RunSpec.from_dict(base, where="command line")


def _resolve_model(text: str) -> str:
    """A registered name, or a custom LABEL=ARCH:CHECKPOINT[:PREFIX] registered on the fly."""
    from medxfer.models import resolve_model_arg

    return resolve_model_arg(text)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.plan:
        from medxfer.plan import make_plan

        plan = make_plan(spec)
        print(plan.text)
        return 0 if plan.runnable else 1
    from medxfer.pipeline import run as run_pipeline

    outcome = run_pipeline(spec)
    return report_outcome(outcome)


def report_outcome(outcome: Any) -> int:
    """Print the summary and what happened to every cell; 1 when some cell failed."""
    if outcome.summary:
        print(outcome.summary)
    where = (f"; results in {outcome.out / 'results'}, summary in {outcome.summary_path}"
             + (f", report in {outcome.report_path}" if outcome.report_path else "")
             if outcome.summary_path else "; nothing was written")
    print(f"computed {len(outcome.computed)} cell(s), reused {len(outcome.reused)}, failed "
          f"{len(outcome.failed)}{where}", file=sys.stderr)
    for o in outcome.failed:
        print(f"FAILED {o.cell.describe()}: {o.error}", file=sys.stderr)
    return 1 if outcome.failed else 0


register_command(Command("run", "evaluate models x datasets x protocols and write results", add_arguments, run))

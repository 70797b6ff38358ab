"""Pretraining throughput: medxfer's loop (views from a decode-once whole-image store, channels-last and
bf16 where supported) against a plain PyTorch loop of the same method over a torchvision ImageFolder
DataLoader that decodes every JPEG at every step (contiguous fp32).

Both sides run the same method with lightly's loss and heads (MoCo v2: projection head, momentum
encoder, a queue of negatives) on the same ResNet-18 (random weights: throughput does not depend on
them), the same micro-batch and view size, on the real EyePACS sample (full-size JPEGs, 2560x1920 to
4752x3168). Images per second are measured over the same number of steps on both sides (the first
step included on both); the one-off decode of the store is reported separately (it is cached and
shared by every later run). The baseline is timed with DataLoader workers 0 and 2 and the faster is
the reference.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms as T

from _common import bf16_supported, load_average, machine, ratio_line, shared_data_dir
from medxfer.config import DatasetArg
from medxfer.pretrain import PretrainParams, pretrain


def reference_transform(size: int) -> T.Compose:
    """MoCo v2's ImageNet views as the plain torchvision recipe writes them (PIL, every step)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=0.5), T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


class TwoViews:
    def __init__(self, tf: T.Compose) -> None:
        self.tf = tf

    def __call__(self, img):  # one decode, two views (as MoCo's TwoCropsTransform)
        return self.tf(img), self.tf(img)


def reference_loop(root: Path, size: int, batch: int, steps: int, workers: int, queue: int) -> float:
    """Images per second of the plain loop (decode every JPEG every step, contiguous fp32)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import update_momentum

    torch.manual_seed(0)  # benchmark script, not library code: the baseline's own global seed
    ds = torchvision.datasets.ImageFolder(str(root), transform=TwoViews(reference_transform(size)))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    backbone = torchvision.models.resnet18()
    backbone.fc = torch.nn.Identity()
    head = MoCoProjectionHead(512, 512, 128)
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    for p in [*backbone_m.parameters(), *head_m.parameters()]:
        p.requires_grad_(False)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(queue, 128))
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.03 * batch / 256, momentum=0.9,
                          weight_decay=1e-4)
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for (x0, x1), _ in loader:
            q = head(backbone(x0))
            with torch.no_grad():
                k = head_m(backbone_m(x1))
            loss = criterion(q, k)
            opt.zero_grad()
            loss.backward()
            opt.step()
            update_momentum(backbone, backbone_m, 0.999)
            update_momentum(head, head_m, 0.999)
            done += 1
            if done == steps:
                break
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="view size")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="steps measured on each side")
    ap.add_argument("--precision", default="bf16" if bf16_supported() else "fp32",
                    help="ours: bf16 where supported (default here), else fp32")
    ap.add_argument("--no-channels-last", action="store_true", help="ours: contiguous memory format")
    ap.add_argument("--workers", default="0,2", help="DataLoader workers tried for the baseline")
    ap.add_argument("--queue", type=int, default=1024)
    args = ap.parse_args()
    root = shared_data_dir() / "eyepacs-sample"
    if not (root / "sample").is_dir():
        raise SystemExit(f"EyePACS sample not found under {root}")
    print(machine())
    print(load_average())
    print(f"data: {len(list((root / 'sample').glob('*.jpeg')))} EyePACS JPEGs; ResNet-18 (random weights), MoCo v2, "
          f"batch {args.batch}, views {args.size}px, {args.steps} steps per side")
    work = Path(tempfile.mkdtemp(prefix="medxfer-bench-pretrain-"))
    try:
        data = [DatasetArg(label="eyepacs", kind="images", root=str(root / "sample"))]
        params = PretrainParams(method="moco-v2", steps=args.steps, batch_size=args.batch, size=args.size,
                                queue=args.queue, precision=args.precision, channels_last=not args.no_channels_last,
                                checkpoint_every=10 ** 6, splits=("all",))
        from medxfer.pretrain.data import view_source

        t0 = time.perf_counter()
        view_source(data, store_size=int(round(args.size * 320 / 224)), splits=("all",), cache_dir=work)
        prep = time.perf_counter() - t0
        out = pretrain("bench", "supervised-r18", data, params, weights="random", cache_dir=work, device="cpu")
        ours = out.record["images_per_second"]
        print(f"ours: {ours:.2f} images/s ({out.record['precision']}, channels_last={out.record['channels_last']}); "
              f"one-off decode of the store {prep:.1f}s ({prep / 50 * 1000:.0f} ms per image, cached afterwards)")
        refs = {}
        for w in (int(x) for x in args.workers.split(",")):
            refs[w] = reference_loop(root, args.size, args.batch, args.steps, w, args.queue)
            print(f"baseline (ImageFolder + DataLoader, {w} workers, decode every step, contiguous fp32): "
                  f"{refs[w]:.2f} images/s")
        best = max(refs.values())
        with_prep = args.steps * args.batch / (args.steps * args.batch / ours + prep)
        print(f"ours including the one-off decode over these {args.steps} steps: {with_prep:.2f} images/s "
              f"({with_prep / best:.2f}x)")
        print("target=2")
        print(ratio_line(ours / best))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Extraction throughput: medxfer's prepare+extract vs a straightforward torchvision pipeline.

Baseline (what most evaluation scripts do): an ImageFolder-style dataset that opens every
file with PIL at full size, Resize(224, bicubic) + CenterCrop + ToTensor + Normalize, a
DataLoader (in-process on CPU, where the forward pass needs every core; worker processes on
CUDA, started before timing), and a contiguous fp32 ResNet-50.
Ours: images decoded once into the prepared uint8 memmap (reduced-size JPEG decoding,
greyscale kept 1-channel), then the cached extraction (background loading, normalisation on
the device, channels-last, BatchNorm folded, inference mode, bf16 where the hardware has it).
Compute limit: the same trunk, precision and batches on one real prepared batch in memory.

Datasets: the real EyePACS sample (full-size fundus JPEGs) and synthetic 1024x1024 greyscale
chest-X-ray PNGs. ResNet-50 with RANDOM weights (throughput does not depend on the values).
ratio = baseline seconds / our seconds once prepared (worst of the datasets).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from _common import Timing, bf16_supported, eyepacs_sample, load_average, machine, ratio_line, synthetic_xrays, timed
from medxfer.data.records import Dataset
from medxfer.extract import extract_features
from medxfer.models import load_model
from medxfer.models.normalize import IMAGENET_MEAN, IMAGENET_STD
from medxfer.prepare import default_workers, prepare
from medxfer.runtime import AUTOCAST_TOLERANCE, autocast_context
from medxfer.runtime import runtime_module as runtime_trunk

TARGET_RATIO = 3.0
TARGET_FRACTION = 0.8


class ImageFolderStyle(torch.utils.data.Dataset):
    """The baseline's dataset: full PIL decode and the evaluation transform on every access."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths = paths
        self.tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                             T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            return self.tf(img.convert("RGB"))


def baseline(model: torch.nn.Module, ds: Dataset, batch: int, workers: int, device: str,
             size: int) -> tuple[np.ndarray, Timing]:
    """The baseline's features and time. Worker processes (if any) are started and warmed up
    before the clock starts: a real run pays their start-up once, not per 50 images."""
    loader = DataLoader(ImageFolderStyle([r.path for r in ds.records], size), batch_size=batch,
                        num_workers=workers, shuffle=False, persistent_workers=workers > 0)
    if workers > 0:
        next(iter(loader))  # spawns the persistent workers

    def run() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for x in loader:
                out.append(model(x.to(device)).float().cpu())
        return torch.cat(out).numpy()

    return timed(run)


def decode_only(ds: Dataset, size: int) -> Timing:
    """The baseline's per-image decoding and transform alone (no model), in this process."""
    data = ImageFolderStyle([r.path for r in ds.records], size)
    return timed(lambda: [data[i] for i in range(len(data))])[1]


def forward_limit(model: torch.nn.Module, dtype: torch.dtype, images: np.ndarray, n: int, batch: int,
                  device: str, precision: str, normalize) -> Timing:
    """Seconds for n images through the trunk alone (same batches, precision, channels-last),
    on one batch of the real prepared images already normalised on the device."""
    u8 = torch.from_numpy(np.array(images[:batch])).to(device).permute(0, 3, 1, 2)
    x = normalize(u8).to(dtype).contiguous(memory_format=torch.channels_last)
    if len(x) < batch:
        x = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch].contiguous(memory_format=torch.channels_last)
    batches = [min(batch, n - s) for s in range(0, n, batch)]
    autocast = precision if dtype == torch.float32 else "fp32"  # a bf16 copy needs no autocast

    def run() -> None:
        with torch.inference_mode(), autocast_context(device, autocast):
            for b in batches:
                model(x[:b])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return timed(run)[1]


def pixel_difference(ds: Dataset, array: np.ndarray, size: int, limit: int = 8) -> float:
    """Mean absolute difference between our prepared crops and a full decode + torchvision crop."""
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    diffs = []
    for i, r in enumerate(ds.records[:limit]):
        with Image.open(r.path) as img:
            ref = np.asarray(tf(img.convert("RGB")), dtype=np.int16)
        ours = np.broadcast_to(array[i], ref.shape).astype(np.int16)
        diffs.append(np.abs(ours - ref).mean())
    return float(np.mean(diffs))


def warm_up(model: torch.nn.Module, batch: int, device: str, precision: str, size: int,
            channels_last: bool, dtype: torch.dtype = torch.float32) -> None:
    """One untimed batch per configuration (kernel selection, allocator), as any long run has."""
    x = torch.zeros(batch, 3, size, size, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_context(device, precision if dtype == torch.float32 else "fp32"):
        model(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="images per dataset (EyePACS: at most its 50)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--arch", default="supervised-r50")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=None,
                    help="baseline DataLoader workers (default: 0 on cpu, where the forward pass needs every "
                         "core and CPU time must include the decoding; min(8, cores) on cuda)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is kept")
    args = ap.parse_args()
    if args.workers is None:
        args.workers = 0 if args.device == "cpu" else min(8, default_workers())
    precision = "bf16" if bf16_supported() else "fp32"
    use_cpu = args.device == "cpu"
    if use_cpu and args.workers > 0:
        print("warning: CPU seconds of persistent loader workers are not counted (they are not reaped "
              "while timing); compare wall times")
    unit = "CPU seconds (this process + loader workers)" if use_cpu else "wall seconds"
    print(machine())
    print(load_average())
    print(f"model: {args.arch} with RANDOM weights, batch {args.batch}, size {args.size}, device {args.device}; "
          f"ours at fp32 and at {precision} (autocast where the hardware supports it)")
    print(f"speed-ups are computed from {unit}: the benchmark machine may be shared, and CPU time "
          f"measures the work each pipeline needs; wall times are printed too. Every timing is the "
          f"best of {args.repeat} runs (baseline, ours and the forward limit alike; ours at fp32, shown for "
          f"information, runs once)")
    base_model = load_model(args.arch, weights="random").to(args.device)  # contiguous fp32
    ours_model = load_model(args.arch, weights="random")  # same seed -> same weights
    warm_up(base_model, args.batch, args.device, "fp32", args.size, channels_last=False)
    _, t_fold = timed(lambda: [runtime_trunk(ours_model, args.device, p) for p in ("fp32", precision)])
    print(f"one-time per model: BatchNorm folding (and the {precision} copy) ({t_fold}), "
          f"reused by every extraction of this model")

    ratios, fractions = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        sets = {"eyepacs (real JPEGs)": eyepacs_sample(limit=args.images)}
        xr, t_gen = timed(lambda: synthetic_xrays(tmp_path / "cxr", args.images))
        sets["synthetic chest X-ray PNGs 1024x1024"] = xr
        print(f"generated {len(xr)} synthetic X-rays ({t_gen})")
        for name, ds in sets.items():
            n = len(ds)
            print(f"\n== {name}: {n} images ==")
            runs = [baseline(base_model, ds, args.batch, args.workers, args.device, args.size)
                    for _ in range(args.repeat)]
            feats_base, t_base = min(runs, key=lambda r: r[1].pick(use_cpu))
            b = t_base.pick(use_cpu)
            print(f"baseline (PIL full decode every time, contiguous fp32, DataLoader with {args.workers} workers): "
                  f"{t_base}; {n / b:.2f} img/s")
            dec = decode_only(ds, args.size).pick(use_cpu)
            print(f"  of which decoding + transform (measured alone): {dec:.2f}s = {100 * dec / b:.0f}%; "
                  f"decoding once can by itself give at most {b / max(b - dec, 1e-9):.2f}x, the rest must "
                  f"come from the forward pass")
            cache = tmp_path / f"cache-{len(ratios)}"
            prep, t_prep = timed(lambda: prepare(ds, size=args.size, cache_dir=cache, progress=False))
            print(f"ours prepare (decode once, {prep.meta['workers']} workers, {prep.channels} channel(s)): "
                  f"{t_prep}; {n / t_prep.pick(use_cpu):.1f} img/s")
            results = {}
            for prec in dict.fromkeys(("fp32", precision)):
                trunk, dtype = runtime_trunk(ours_model, args.device, prec)  # exactly what extract runs
                trunk.to(args.device, memory_format=torch.channels_last)  # extract moves it back to the cpu
                warm_up(trunk, args.batch, args.device, prec, args.size, channels_last=True, dtype=dtype)
                reps = args.repeat if prec == precision else 1  # fp32 is for information: one run
                runs = [timed(lambda: extract_features(  # a fresh feature cache each time: really extracts
                    ours_model, prep, cache_dir=cache / f"{prec}-{r}", batch_size=args.batch, device=args.device,
                    precision=prec, progress=False)) for r in range(reps)]
                fs, t_ext = min(runs, key=lambda r: r[1].pick(use_cpu))
                trunk.to(args.device, memory_format=torch.channels_last)
                t_lim = min((forward_limit(trunk, dtype, prep.array, n, args.batch, args.device, prec,
                                           ours_model.normalize) for _ in range(reps)),
                            key=lambda t: t.pick(use_cpu))
                e, lim = t_ext.pick(use_cpu), t_lim.pick(use_cpu)
                results[prec] = (np.asarray(fs.features), e, lim)
                print(f"ours extract {prec} (prepared): {t_ext}; {n / e:.2f} img/s; forward limit {n / lim:.2f} "
                      f"img/s ({t_lim}); fraction of limit {lim / e:.3f}; speed-up vs baseline {b / e:.2f}x")
            f32 = results["fp32"][0]
            diff = pixel_difference(ds, prep.array, args.size)
            print(f"our prepared crops vs the baseline's full-decode crops: mean |difference| {diff:.2f} "
                  f"grey levels of 255 (reduced-size JPEG decoding; PNGs are identical)")
            rel = np.linalg.norm(f32 - feats_base, axis=1) / np.linalg.norm(feats_base, axis=1)
            print(f"our fp32 features vs the baseline's: max relative L2 difference {rel.max():.2e}")
            if precision != "fp32":
                fb = results[precision][0]
                rel_b = float(np.abs(fb - f32).max() / np.abs(f32).max())
                tol = AUTOCAST_TOLERANCE[precision]
                print(f"{precision} vs fp32 features: max |diff| / max |fp32| = {rel_b:.4f} "
                      f"(stated tolerance {tol}) -> {'ok' if rel_b < tol else 'OUT OF TOLERANCE'}")
            _, e, lim = results[precision]
            ratios.append(b / e)
            fractions.append(lim / e)
            k, p = 13, t_prep.pick(use_cpu)
            print(f"grid of {k} models: baseline {k * b:.0f}s vs ours {p + k * e:.0f}s "
                  f"(prepare once + {k} extractions) -> {k * b / (p + k * e):.2f}x; "
                  f"first model incl. prepare: {b / (p + e):.2f}x")
    ratio = min(ratios)
    frac = min(fractions)
    print(f"\nsummary ({precision}, {unit}): speed-up once prepared, worst dataset {ratio:.2f}x "
          f"(target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'}); "
          f"fraction of the forward limit, worst {frac:.3f} "
          f"(target >= {TARGET_FRACTION}: {'met' if frac >= TARGET_FRACTION else 'NOT met'})")
    print(load_average())
    print(f"target={TARGET_RATIO}")
    print(ratio_line(ratio))


if __name__ == "__main__":
    main()

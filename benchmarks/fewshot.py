"""Few-shot: 600 episodes on cached features vs the authors' method (backbone run per episode).

The authors' code re-ran the backbone on every episode's images (load, transform, forward,
prototypes): 2-way 20-shot with 15 queries is 70 forward passes per episode, 42,000 for 600
episodes. In eval mode with a deterministic transform every image has one feature, so
medxfer prepares the images once, extracts each feature once and evaluates all episodes on
the cached features. Both sides run the SAME episodes here, and their accuracies are compared.

Data: a few hundred synthetic greyscale chest-X-ray PNGs (lossless, so both pipelines see
identical pixels). Model: ResNet-18 with RANDOM weights at a reduced evaluation size (64 px)
so the baseline finishes in reasonable time. Times are CPU seconds (both sides run in this
process), robust to other load on a shared machine; wall seconds are printed too. The baseline is measured on the first
``--baseline-episodes`` episodes and its per-episode cost extrapolated to 600 (stated below).
ratio = baseline seconds for 600 episodes / ours for 600 episodes (prepare + extract + evaluate).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from _common import load_average, machine, ratio_line, synthetic_xrays, timed
from medxfer.extract import extract_features
from medxfer.models import load_model
from medxfer.models.normalize import IMAGENET_MEAN, IMAGENET_STD
from medxfer.prepare import prepare
from medxfer.protocols.fewshot import episode_accuracies, sample_episodes

TARGET = 50.0


def baseline_episode(model: torch.nn.Module, paths: list[str], support: np.ndarray, query: np.ndarray,
                     tf: T.Compose) -> float:
    """One episode the authors' way: decode + transform its images, forward, prototypes, accuracy."""
    k, n = support.shape
    q = query.shape[1]
    order = np.concatenate([support.reshape(-1), query.reshape(-1)])
    x = torch.stack([tf(Image.open(paths[i]).convert("RGB")) for i in order])
    with torch.inference_mode():
        f = model(x).double()
    protos = f[: k * n].reshape(k, n, -1).mean(1)
    d2 = ((f[k * n:, None, :] - protos[None]) ** 2).sum(-1)
    truth = torch.arange(k).repeat_interleave(q)
    return float((d2.argmin(1) == truth).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--baseline-episodes", type=int, default=30)
    ap.add_argument("--signal", type=float, default=0.25, help="class signal of the synthetic images")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--arch", default="supervised-r18")
    args = ap.parse_args()
    print(machine())
    print(load_average())
    print(f"2-way 20-shot, 15 queries, {args.episodes} episodes on {args.images} synthetic X-ray PNGs; "
          f"model {args.arch} with RANDOM weights at {args.size}px, fp32, cpu")
    base_model = load_model(args.arch, weights="random")
    ours_model = load_model(args.arch, weights="random")
    tf = T.Compose([T.Resize(args.size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(args.size),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with tempfile.TemporaryDirectory() as tmp:
        ds = synthetic_xrays(Path(tmp) / "cxr", args.images, side=256, signal=args.signal)
        labels = np.array(ds.labels)
        paths = [r.path for r in ds.records]
        eps, _ = sample_episodes(labels, n_way=2, n_shot=20, n_query=15, episodes=args.episodes, seed=0)

        def ours() -> np.ndarray:
            prep = prepare(ds, size=args.size, cache_dir=Path(tmp) / "cache", progress=False)
            fs = extract_features(ours_model, prep, cache_dir=Path(tmp) / "cache", precision="fp32", progress=False)
            return episode_accuracies(np.asarray(fs.features), eps)

        acc_ours, t_ours = timed(ours)
        print(f"ours: prepare {args.images} images once + extract once + {args.episodes} episodes on cached "
              f"features: {t_ours}")
        m = min(args.baseline_episodes, args.episodes)
        with torch.inference_mode():
            base_model(torch.zeros(70, 3, args.size, args.size))  # warm-up, untimed
        acc_base, t_base = timed(lambda: np.array([
            baseline_episode(base_model, paths, eps.support[e], eps.query[e], tf) for e in range(m)]))
        per_ep = t_base.cpu / m
        print(f"baseline (backbone on every episode's images, {eps.support.shape[1] * 35} forward passes each): "
              f"{m} episodes measured, {t_base}; {per_ep:.3f} CPU s per episode")
        full = per_ep * args.episodes
        note = "measured" if m == args.episodes else f"extrapolated from {m} measured episodes"
        print(f"baseline for {args.episodes} episodes: {full:.1f} CPU s ({note})")
        same = int(np.sum(np.isclose(acc_base, acc_ours[:m], atol=1e-12)))
        print(f"same episodes, same accuracies: {same}/{m} episodes identical "
              f"(max |difference| {np.abs(acc_base - acc_ours[:m]).max():.4f}); "
              f"mean accuracy ours {100 * acc_ours[:m].mean():.2f}% vs baseline {100 * acc_base.mean():.2f}% "
              f"on those; ours over all {args.episodes}: {100 * acc_ours.mean():.2f}%")
        ratio = full / t_ours.cpu
        print(f"speed-up {ratio:.1f}x (CPU seconds, robust to other load on a shared machine; target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})")
    print(load_average())
    print(f"target={TARGET}")
    print(ratio_line(ratio))


if __name__ == "__main__":
    main()

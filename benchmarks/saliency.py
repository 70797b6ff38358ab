"""Occlusion saliency: medxfer (batched, exact incremental inference) vs the authors' method.

The authors ran every occluded image through the model one at a time: normalise the image,
set the window to 0 (after normalisation), forward at batch 1, for each of the (S - w + 1)^2
positions (54,289 for 242 px and a 10 px window). medxfer builds the occluded images of a batch
of positions by broadcasting a window mask, runs a BatchNorm-folded, oneDNN-packed,
channels-last copy of the trunk, and runs its leading stages node by node on the blocks the
window changes only, pasting them into the clean maps (exact up to float rounding). Both use the same occluder here (``zero-after-normalize``), the same
image and the same random-weight model in eval mode, fp32, so their scores are compared.

Timing: the window rows are processed in chunks of ``--chunk-rows``; for every chunk medxfer
computes all of its positions, then the baseline is timed, in the same process right after,
on the chunk's first ``--baseline-rows`` rows (all columns). Interleaving keeps both sides
under the same load on a shared machine; the ratio uses wall seconds (CPU seconds are printed
too: under contention they overstate the batch-1 baseline, whose threads spin between small
kernels). The baseline's per-position cost is extrapolated to all positions (stated below).
With ``--threads 1`` the CPU-seconds ratio measures the work saved, nearly independent of load.

Agreement: the map pixels whose every covering window the baseline computed (rows
``window - 1`` and after of each baseline block, the columns of the cropped map) are compared:
max |ours - theirs| / theirs must be <= 1e-4. Individual scores are compared too, and both
sides against a float64 run on the baseline rows (the fp32 noise floor of each).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import (
    cpu_seconds,
    load_average,
    machine,
    ratio_line,
    shared_data_dir,
    timed,
)
from medxfer.analysis.saliency import (
    accumulate_scores,
    occlusion_scores,
    prepare_trunk,
    window_starts,
)
from medxfer.models import load_model
from medxfer.prepare import decode_record

TARGET = 5.0
TOLERANCE = 1e-4


def say(line: str) -> None:
    """Print now (the partial output of a run that is killed still shows)."""
    print(line, flush=True)


def test_image(size: int) -> tuple[torch.Tensor, str]:
    """A real EyePACS fundus photo at ``size`` (the evaluation resize + crop), else a seeded random one."""
    files = sorted((shared_data_dir() / "eyepacs-sample" / "sample").glob("*.jpeg"))
    if files:
        return torch.from_numpy(decode_record(str(files[0]), size, "aspect", 3).copy()).permute(2, 0, 1).contiguous(), \
            f"EyePACS {files[0].name}"
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8), "seeded random pixels"


def baseline_scores(model: torch.nn.Module, clean: torch.Tensor, f0: torch.Tensor, ys: np.ndarray,
                    xs: np.ndarray, window: int) -> np.ndarray:
    """The authors' loop: one occluded (zeroed after normalisation) image per forward pass."""
    out = np.empty((len(ys), len(xs)))
    with torch.no_grad():
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                occ = clean.clone()
                occ[:, :, y:y + window, x:x + window] = 0.0
                f = model(occ).double()
                out[i, j] = float((f - f0).norm() / f0.norm())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="supervised-r18")
    ap.add_argument("--size", type=int, default=114, help="image side (the paper: 242)")
    ap.add_argument("--window", type=int, default=5, help="window side (the paper: 10 at 242)")
    ap.add_argument("--chunk-rows", type=int, default=22, help="window rows per interleaved chunk")
    ap.add_argument("--baseline-rows", type=int, default=6,
                    help="baseline on the first rows of each chunk (window + 1: two full map rows per chunk)")
    ap.add_argument("--max-rows", type=int, default=None,
                    help="process only this many window rows and extrapolate both sides (full-size runs)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the protocol's automatic choice")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the float64 run on the baseline rows")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own); 1 gives a load-robust work ratio in CPU seconds")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 and measure its difference from fp32")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides run there)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    say(machine())
    say(load_average())
    image, source = test_image(args.size)
    ys, xs = window_starts(args.size, args.window), window_starts(args.size, args.window)
    n_rows = len(ys) if args.max_rows is None else min(args.max_rows, len(ys))
    total = len(ys) * len(xs)
    device = torch.device(args.device)
    say(f"occlusion saliency, {args.arch} with RANDOM weights, eval mode, fp32, {device}; image {source} at "
          f"{args.size} x {args.size}, window {args.window}, stride 1: {len(ys)} x {len(xs)} = {total} positions; "
          f"occluder zero-after-normalize on both sides")
    base_model = load_model(args.arch, weights="random").to(device)
    ours_model = load_model(args.arch, weights="random")
    staged, t_prep = timed(lambda: prepare_trunk(ours_model.trunk, device=device))
    say(f"ours: {staged.description}; prepared in {t_prep}")
    clean = base_model.normalize(image[None].to(device))
    with torch.no_grad():
        f0 = base_model(clean).double()
        for _ in range(3):
            base_model(clean.clone())  # warm-up, untimed
    occlusion_scores(staged, image, normalize=ours_model.normalize, window=args.window, occluder="paper",
                     rows=(0, 1), batch_size=args.batch_size)  # warm-up, untimed

    ours = np.full((len(ys), len(xs)), np.nan)
    theirs = np.full((len(ys), len(xs)), np.nan)
    wall_o = cpu_o = wall_b = cpu_b = 0.0
    measured = 0
    blocks = []
    for r0 in range(0, n_rows, args.chunk_rows):
        r1 = min(r0 + args.chunk_rows, n_rows)
        c0, t0 = cpu_seconds(), time.perf_counter()
        ours[r0:r1] = occlusion_scores(staged, image, normalize=ours_model.normalize, window=args.window,
                                       occluder="paper", rows=(r0, r1), batch_size=args.batch_size)
        wall_o += time.perf_counter() - t0
        cpu_o += cpu_seconds() - c0
        b1 = min(r0 + args.baseline_rows, r1)
        c0, t0 = cpu_seconds(), time.perf_counter()
        theirs[r0:b1] = baseline_scores(base_model, clean, f0, ys[r0:b1], xs, args.window)
        wall_b += time.perf_counter() - t0
        cpu_b += cpu_seconds() - c0
        measured += (b1 - r0) * len(xs)
        blocks.append((r0, b1))
    done = n_rows * len(xs)
    scale = total / done
    ours_wall, ours_cpu = wall_o * scale + t_prep.wall, cpu_o * scale + t_prep.cpu
    say(f"ours: {done} positions in wall {wall_o:.2f}s, cpu {cpu_o:.2f}s ({1e3 * wall_o / done:.3f} wall-ms "
          f"per position); all {total} positions + preparation: wall {ours_wall:.1f}s, cpu {ours_cpu:.1f}s"
          + ("" if scale == 1 else f" (extrapolated from {n_rows} of {len(ys)} rows)"))
    per_b = wall_b / measured
    base_wall, base_cpu = per_b * total, cpu_b / measured * total
    say(f"baseline (batch 1, one occluded image per forward): {measured} positions measured (rows "
          f"{', '.join(f'{a}-{b - 1}' for a, b in blocks)}, interleaved), wall {wall_b:.2f}s, cpu {cpu_b:.2f}s; "
          f"{1e3 * per_b:.3f} wall-ms per position; extrapolated to {total}: wall {base_wall:.1f}s, cpu {base_cpu:.1f}s")
    # maps over the pixels every covering window of which the baseline computed
    map_o, map_b = [], []
    for a, b in blocks:
        if b - a >= args.window:
            shape = (b - a + args.window - 1, args.size)
            map_o.append(accumulate_scores(ours[a:b], shape, args.window))
            map_b.append(accumulate_scores(theirs[a:b], shape, args.window))
    ok = ~np.isnan(theirs)
    rel_s = np.abs(ours[ok] - theirs[ok]) / theirs[ok]
    if map_b:
        mo, mb = np.concatenate(map_o), np.concatenate(map_b)
        rel = float(np.max(np.abs(mo - mb) / mb))
        say(f"agreement of the maps on {mb.size} pixels ({mb.shape[0]} full map rows): max relative difference "
              f"{rel:.2e} (tolerance {TOLERANCE:g}: {'ok' if rel <= TOLERANCE else 'FAILED'}); map mean {mb.mean():.4g}")
    else:
        rel = float(rel_s.max())
        say(f"baseline blocks shorter than the window: no full map rows; scores decide (tolerance {TOLERANCE:g})")
    say(f"agreement of the {int(ok.sum())} scores: max relative difference {rel_s.max():.2e}, median "
          f"{np.median(rel_s):.2e}; scores {theirs[ok].min():.3g} to {theirs[ok].max():.3g}")
    if args.reference:
        ref = prepare_trunk(ours_model.trunk, dtype=torch.float64, device=device)
        exact = np.full_like(theirs, np.nan)
        for a, b in blocks:
            exact[a:b] = occlusion_scores(ref, image, normalize=ours_model.normalize, window=args.window,
                                          occluder="paper", rows=(a, b), batch_size=args.batch_size)
        eo, eb = np.abs(ours[ok] / exact[ok] - 1), np.abs(theirs[ok] / exact[ok] - 1)
        say(f"fp32 noise floor (float64 run on the baseline rows): ours max {eo.max():.2e} (median "
              f"{np.median(eo):.2e}), baseline max {eb.max():.2e} (median {np.median(eb):.2e})")
    if n_rows == len(ys):
        smap = accumulate_scores(ours, args.size, args.window)
        say(f"ours' map: {smap.shape[0]} x {smap.shape[1]}, mean {smap.mean():.4g}, max {smap.max():.4g}")
    if args.bf16:
        fast = prepare_trunk(ours_model.trunk, dtype=torch.bfloat16, device=device)
        rr = (0, n_rows)
        b16, t16 = timed(lambda: occlusion_scores(fast, image, normalize=ours_model.normalize, window=args.window,
                                                  occluder="paper", rows=rr, batch_size=args.batch_size))
        d = np.abs(b16 - ours[:n_rows]) / ours[:n_rows]
        corr = float(np.corrcoef(b16.ravel(), ours[:n_rows].ravel())[0, 1])
        say(f"bf16 (weights and activations): {t16} for {done} positions ({t16.wall / wall_o:.2f}x the fp32 wall "
              f"time); relative score difference from fp32: median {np.median(d):.2e}, max {d.max():.2e}; "
              f"correlation {corr:.4f}")
    ratio = base_wall / ours_wall
    say(f"speed-up {ratio:.2f}x (wall seconds, interleaved; cpu-seconds ratio {base_cpu / ours_cpu:.2f}); "
          f"target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'}")
    say(load_average())
    say(f"target={TARGET}")
    say(ratio_line(ratio))
    if rel > TOLERANCE:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

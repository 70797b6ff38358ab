"""The seeded toy inputs the golden regression tests pin (never change them: goldens depend on them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_stripes_blobs(root: Path, n_per_class: int = 24, size: int = 48, seed: int = 0) -> Path:
    """Two classes of greyscale PNGs: sinusoidal stripes ("normal") vs a central blob ("abnormal")."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for cls in ("normal", "abnormal"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            if cls == "normal":
                img = 127 + 100 * np.sin(xx / (2.0 + rng.random()))
            else:
                img = 60 + 150 * np.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size * (2 + rng.random())))
            img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(root / cls / f"{cls}_{i:03d}.png")
    return root


def write_pm_csv(pm_root: Path, dest: Path) -> Path:
    """Copy the real iChallenge-PM training images into ``dest`` with a ``path,label`` CSV
    (PM if the file name starts with P, else non-PM): the CSV route on real images."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for p in sorted((pm_root / "PALM-Training400").glob("*.jpg")):
        shutil.copyfile(p, dest / p.name)
        rows.append(f"{p.name},{'PM' if p.name.startswith('P') else 'non-PM'}")
    csv = dest / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv

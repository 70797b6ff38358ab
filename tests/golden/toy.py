"""The seeded toy inputs the golden regression tests pin (never change them: goldens depend on them)."""
from __future__ import annotations

from pathlib import Path

from medxfer.testing import write_stripes_blobs  # noqa: F401  (the pinned toy set)


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

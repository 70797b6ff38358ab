"""``medxfer validate``: load a dataset and check that every image opens and decodes."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from medxfer.data.build import drop_records
from medxfer.data.common import MAX_LISTED
from medxfer.data.images import ImageReadError, open_image
from medxfer.data.records import Dataset, DatasetError
from medxfer.data.registry import load_dataset
from medxfer.progress import bar

log = logging.getLogger(__name__)

CHECK_DRAFT_SIZE = 32  # JPEGs are decoded at reduced size: enough to prove the data is intact


def check_image(path: str) -> str | None:
    """None when ``path`` decodes, else the error message (naming the file)."""
    try:
        img = open_image(path, draft_size=CHECK_DRAFT_SIZE)
    except ImageReadError as exc:
        return str(exc)
    if img.width < 1 or img.height < 1:
        return f"{path}: empty image ({img.width}x{img.height})"
    return None


def find_unreadable(dataset: Dataset, workers: int | None = None, progress: bool | None = None) -> dict[int, str]:
    """Decode every record's image in a thread pool; ``{record index: error}`` for the failures."""
    n_workers = workers or min(16, (os.cpu_count() or 2) * 2)
    paths = [r.path for r in dataset.records]
    failures: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results = pool.map(check_image, paths, chunksize=16)
        for i, err in enumerate(bar(iterable=results, total=len(paths), desc=f"checking {dataset.info.name}",
                                    unit="img", enabled=False if len(paths) < 200 else progress)):
            if err is not None:
                failures[i] = err
    return failures


def validate_dataset(name: str, root: str | os.PathLike[str], /, *, skip_bad: bool = False,
                     check_images: bool = True,
                     progress: bool | None = None, **options: Any) -> Dataset:
    """Load dataset ``name`` at ``root`` and verify its images.

    Without ``skip_bad`` any problem raises one :class:`DatasetError` listing every bad file
    and row; with ``skip_bad`` bad records are dropped and described in ``Dataset.problems``.
    """
    dataset = load_dataset(name, root, skip_bad=skip_bad, **options)
    if not check_images:
        return dataset
    failures = find_unreadable(dataset, progress=progress)
    if not failures:
        return dataset
    messages = [failures[i] for i in sorted(failures)]
    if not skip_bad:
        listed = "\n  ".join(messages[:MAX_LISTED])
        more = f"\n  ... and {len(messages) - MAX_LISTED} more" if len(messages) > MAX_LISTED else ""
        raise DatasetError(f"dataset {dataset.info.name!r}: {len(messages)} image(s) cannot be read "
                           f"(pass skip_bad=True / --skip-bad to skip them):\n  {listed}{more}")
    log.warning("%s: skipping %d unreadable image(s)", dataset.info.name, len(messages))
    shown = [f"skipped: {m}" for m in messages[:MAX_LISTED]]
    if len(messages) > MAX_LISTED:
        shown.append(f"... and {len(messages) - MAX_LISTED} more unreadable images ({len(messages)} in all)")
    return drop_records(dataset, failures, shown)


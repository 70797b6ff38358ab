"""Helpers shared by the dataset adapters: problem collection, CSV reading, image listing."""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from medxfer.data.records import DatasetError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"})
MAX_LISTED = 50  # messages listed per kind of problem before summarising the rest


class Issues:
    """Collects what is wrong with a dataset while an adapter reads it.

    ``bad`` marks a record that cannot be used (missing file, unknown label...): it is an
    error, or with ``skip_bad`` a recorded skip. ``note`` records a harmless fact. Call
    :meth:`finish` at the end: it raises one :class:`DatasetError` listing every error, or
    returns the problem messages for ``Dataset.problems``.
    """

    def __init__(self, dataset: str, skip_bad: bool = False) -> None:
        self.dataset = dataset
        self.skip_bad = skip_bad
        self._bad: dict[str, list[str]] = defaultdict(list)
        self._notes: list[str] = []
        self._hints: dict[str, str] = {}

    def bad(self, message: str, kind: str = "bad record", hint: str | None = None) -> None:
        """Record a bad record; ``hint`` (once per kind) tells the user how to fix or allow it."""
        self._bad[kind].append(message)
        if hint is not None:
            self._hints.setdefault(kind, hint)

    def note(self, message: str) -> None:
        self._notes.append(message)

    def missing_file(self, message: str, name: str, allowed: bool, missing: list[str], hint: str) -> None:
        """A labelled row whose image is absent: appended to ``missing`` when ``allowed`` (a
        partial download, summarised by the caller), else a bad record of kind "missing file"."""
        if allowed:
            missing.append(name)
        else:
            self.bad(message, kind="missing file", hint=hint)

    @property
    def n_bad(self) -> int:
        return sum(len(v) for v in self._bad.values())

    def _listed(self) -> list[str]:
        out: list[str] = []
        for kind, messages in self._bad.items():
            out.extend(messages[:MAX_LISTED])
            if len(messages) > MAX_LISTED:
                out.append(f"... and {len(messages) - MAX_LISTED} more ({kind}, {len(messages)} in all)")
        return out

    def finish(self) -> list[str]:
        """Raise if there were errors (unless skipping); else return the problem list."""
        if self._bad and not self.skip_bad:
            listed = "\n  ".join(self._listed())
            hints = "".join(f"\n  hint ({kind}): {h}" for kind, h in self._hints.items())
            raise DatasetError(
                f"dataset {self.dataset!r}: {self.n_bad} problem(s) "
                f"(pass skip_bad=True / --skip-bad to skip these records):\n  {listed}{hints}"
            )
        skipped = [f"skipped: {m}" if not m.startswith("... and") else m for m in self._listed()]
        return list(self._notes) + skipped


def read_csv_rows(path: Path, required: Iterable[str], header: bool = True,
                  fieldnames: list[str] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, row)`` from a CSV, checking the required columns first.

    ``header=False`` reads a headerless file with the given ``fieldnames``. Line numbers are
    1-based file lines, so messages can say ``file:line``.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open: {exc}") from exc
    with f:
        reader = csv.DictReader(f, fieldnames=None if header else fieldnames)
        try:
            columns = [c for c in (reader.fieldnames or [])]
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: not a readable CSV file: {exc}") from exc
        missing = [c for c in required if c not in columns]
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                f"found {', '.join(repr(c) for c in columns) or 'no columns'}"
            )
        try:
            for row in reader:
                if not any((v or "").strip() for k, v in row.items() if isinstance(v, str)):
                    continue  # blank line
                yield reader.line_num, {k: (v.strip() if isinstance(v, str) else "") for k, v in row.items() if k}
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}:{reader.line_num}: cannot parse CSV: {exc}") from exc


def csv_columns(path: Path) -> list[str]:
    """The header of a CSV file (empty list when unreadable)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (hidden files and folders skipped), sorted."""
    if not folder.is_dir():
        return []
    found: list[Path] = []
    walker = folder.rglob("*") if recursive else folder.iterdir()
    for p in walker:
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel):
            continue
        if p.is_file() and is_image(p):
            found.append(p)
    return sorted(found)


def index_by_stem(folders: Iterable[Path], extensions: Iterable[str] | None = None) -> dict[str, Path]:
    """File stem -> path for the images directly inside ``folders`` (first occurrence wins)."""
    exts = {e.lower() for e in extensions} if extensions is not None else IMAGE_EXTENSIONS
    out: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.suffix.lower() in exts and not entry.name.startswith(".") and entry.is_file():
                out.setdefault(entry.stem, entry.resolve())
    return out


def read_table(path: Path, required: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Like :func:`read_csv_rows` for ``.csv``, and also reads the first sheet of ``.xlsx`` files."""
    if path.suffix.lower() != ".xlsx":
        yield from read_csv_rows(path, required)
        return
    try:
        import openpyxl

        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for corrupt files
        raise DatasetError(f"{path}: cannot read spreadsheet: {exc}") from exc
    try:
        rows = wb.worksheets[0].iter_rows(values_only=True)
        header = [str(c).strip() if c is not None else "" for c in next(rows, ())]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                               f"found {', '.join(repr(c) for c in header if c) or 'no columns'}")
        for line, values in enumerate(rows, start=2):
            cells = ["" if v is None else _cell_text(v) for v in values]
            if not any(cells):
                continue
            yield line, {k: v for k, v in zip(header, cells) if k}
    finally:
        wb.close()


def _cell_text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def table_columns(path: Path) -> list[str]:
    """Header of a CSV or xlsx file (empty when unreadable)."""
    if path.suffix.lower() != ".xlsx":
        return csv_columns(path)
    try:
        import openpyxl

        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            first = next(wb.worksheets[0].iter_rows(values_only=True), ())
        finally:
            wb.close()
    except Exception:  # unreadable spreadsheets simply do not match
        return []
    return [str(c).strip() for c in first if c is not None]


def find_table(candidates: Iterable[Path], required: Iterable[str]) -> Path | None:
    """The first existing CSV/xlsx among ``candidates`` whose header has the required columns."""
    need = list(required)
    for c in candidates:
        if c.is_file() and all(col in table_columns(c) for col in need):
            return c
    return None


def join_inside(base: str, rel: str) -> str | None:
    """``base/rel`` normalised, or None when ``rel`` is absolute or ``..`` leads out of ``base``.

    A purely lexical check (no file-system calls), for tables with hundreds of thousands of
    rows where resolving every path would take minutes; ``base`` must already be resolved.
    """
    if os.path.isabs(rel):
        return None
    joined = os.path.normpath(os.path.join(base, rel))
    return joined if joined.startswith(base.rstrip(os.sep) + os.sep) else None

"""The user's own data: an image folder (one subfolder per class) or a CSV (path,label[,split,patient]).

Folder: ``ROOT/<class>/**/*.png`` (classes = subfolder names, sorted), or with split folders
``ROOT/{train,val,test}/<class>/...`` (the splits are then kept). CSV: columns ``path`` and
``label`` (optional ``split``, ``patient``); relative paths resolve against the CSV's folder
and may not escape it. Class names are the label strings, sorted (numerically when every
label is an integer).

Symbolic links, both routes: a link is followed when its target lies inside the dataset
folder (ROOT, or the CSV's folder) and refused when it points outside (a bad record naming
the link and its target: an error, or skipped with ``skip_bad``). In a folder the rule
applies to split, class and sub-folder links and to image links alike; a link inside ROOT
counts as a copy of its target at the link's place (its class is the folder the link is in),
a broken image link is a bad record, and a link back to a folder above it is not followed
(it would loop; noted in ``problems``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medxfer.data.build import default_split_fn, finish_dataset, keep_given_or
from medxfer.data.common import Issues, is_image, read_csv_rows
from medxfer.data.records import (
    Dataset,
    DatasetError,
    DatasetInfo,
    Record,
    SymlinkError,
    check_inside,
    is_inside,
)
from medxfer.data.registry import DatasetAdapter, DatasetOptions, register_dataset
from medxfer.data.splits import normalise_split_name, paper_80_20
from medxfer.typed import setting


@dataclass(frozen=True)
class GenericOptions(DatasetOptions):
    """The user's own data: ``name`` labels it in results (default: the folder or file name)."""

    name: str | None = setting(None, help="the dataset's name in results")


def generic_info(name: str, class_names: tuple[str, ...], layout: str) -> DatasetInfo:
    """A DatasetInfo for user data: binary or multiclass; 2-way few-shot up to 4 classes
    (like the paper's BACH), 5-way from 5 classes (like ChestX-ray14 and EyePACS)."""
    k = len(class_names)
    return DatasetInfo(name=name, task="binary" if k == 2 else "multiclass", class_names=class_names,
                       fewshot_way=2 if k <= 4 else 5, layout=layout,
                       licence="the user's data", citation="")


LINK_OUTSIDE = "symbolic link outside the dataset folder"
LINK_HINT = "copy the target into the dataset folder, or point at a folder that holds both"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _link_allowed(entry: Path, root_r: Path, issues: Issues) -> bool:
    """The folder route's link rule for one entry (see the module docstring): True when it is
    not a link, or a link to an existing target inside the root."""
    if not entry.is_symlink():
        return True
    target = entry.resolve()
    if not is_inside(root_r, target):
        issues.bad(f"{entry}: symbolic link to {target}, outside the dataset folder {root_r}", kind=LINK_OUTSIDE,
                   hint=LINK_HINT)
        return False
    if not target.exists():
        issues.bad(f"{entry}: broken symbolic link (to {target})", kind="broken symbolic link")
        return False
    return True


def _walk_images(folder: Path, root_r: Path, issues: Issues, above: frozenset[Path] = frozenset()) -> list[Path]:
    """Image files under ``folder`` by the folder route's link rule, sorted; hidden entries skipped."""
    real = folder.resolve()
    if real in above:
        issues.note(f"{folder}: links back to {real}, a folder above it; not followed")
        return []
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        is_dir = entry.is_dir()
        if not is_dir and not is_image(entry):
            continue  # not a record, link or not
        if not _link_allowed(entry, root_r, issues):
            continue
        if is_dir:
            found.extend(_walk_images(entry, root_r, issues, above | {real}))
        elif entry.is_file():
            found.append(entry)
    return found


def load_folder(root: Path, o: GenericOptions, skip_bad: bool = False) -> Dataset:
    """Read an image folder with one subfolder per class (optionally inside split folders)."""
    name, split, seed = o.name, o.split, o.seed
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found" if not root.exists() else f"{root}: not a folder")
    name = name or root.resolve().name
    root_r = root.resolve()
    issues = Issues(name, skip_bad)
    subdirs = [d for d in _visible_dirs(root) if _link_allowed(d, root_r, issues)]
    split_dirs = {p.name: normalise_split_name(p.name) for p in subdirs}
    by_split = bool(subdirs) and all(s is not None for s in split_dirs.values())
    # (split, class folder) for every class folder
    class_dirs: list[tuple[str | None, Path]] = []
    if by_split:
        for sd in subdirs:
            class_dirs.extend((split_dirs[sd.name], c) for c in _visible_dirs(sd) if _link_allowed(c, root_r, issues))
    else:
        class_dirs = [(None, c) for c in subdirs]
    class_names = tuple(sorted({c.name for _, c in class_dirs}))
    if len(class_names) < 2 and issues.n_bad:
        issues.finish()  # say why folders were refused (links outside ROOT) before counting classes
    if len(class_names) < 2:
        found = ", ".join(class_names) or "none"
        hint = ""
        if len(class_names) == 1:
            hint = f"; did you mean to point at {root / class_dirs[0][1].name}?"
        raise DatasetError(f"{root}: an image folder needs one subfolder per class (at least 2); "
                           f"found {len(class_names)} ({found}){hint}")
    label_of = {c: i for i, c in enumerate(class_names)}
    records: list[Record] = []
    given: list[str | None] = []
    for sp, cdir in class_dirs:
        images = _walk_images(cdir, root_r, issues, frozenset({root_r, cdir.parent.resolve()}))
        if not images:
            issues.note(f"{cdir}: class folder has no images")
        for p in images:
            records.append(Record(path=str(p.resolve()), label=label_of[cdir.name], split=sp or "train"))
            given.append(sp)
    info = generic_info(name, class_names, "ROOT/<class>/*.png or ROOT/{train,val,test}/<class>/*.png")
    return finish_dataset(info, records, root, issues, {"source": "folder", "seed": seed}, split=split,
                          default=keep_given_or(default_split_fn(seed), given), paper=paper_80_20)


def _class_order(labels: set[str]) -> tuple[str, ...]:
    if labels and all(lbl.lstrip("-").isdigit() for lbl in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def load_csv(root: Path, o: GenericOptions, skip_bad: bool = False) -> Dataset:
    """Read a CSV of ``path,label[,split,patient]`` rows; ``root`` is the CSV file."""
    name, split, seed = o.name, o.split, o.seed
    csv_file = root
    if root.is_dir():
        raise DatasetError(f"{root}: expected a CSV file (path,label[,split,patient]), got a folder")
    name = name or csv_file.stem
    base = csv_file.resolve().parent
    issues = Issues(name, skip_bad)
    rows: list[tuple[Path, str, str | None, str | None]] = []
    for line, row in read_csv_rows(csv_file, ["path", "label"]):
        where = f"{csv_file}:{line}"
        if not row["path"]:
            issues.bad(f"{where}: empty path", kind="bad row")
            continue
        if not row["label"]:
            issues.bad(f"{where}: empty label for {row['path']!r}", kind="bad row")
            continue
        try:
            path = check_inside(base, base / row["path"], where)
        except SymlinkError as exc:
            issues.bad(str(exc), kind=LINK_OUTSIDE, hint=LINK_HINT)
            continue
        except DatasetError as exc:
            issues.bad(str(exc), kind="path outside the CSV folder")
            continue
        sp: str | None = None
        if row.get("split"):
            sp = normalise_split_name(row["split"])
            if sp is None:
                issues.bad(f"{where}: unknown split {row['split']!r} (expected train, val or test)", kind="bad row")
                continue
        if not path.is_file():
            issues.bad(f"{where}: image file not found: {path}", kind="missing file")
            continue
        rows.append((path, row["label"], sp, row.get("patient") or None))
    class_names = _class_order({lbl for _, lbl, _, _ in rows})
    if len(class_names) < 2 and not issues.n_bad:
        raise DatasetError(f"{csv_file}: needs at least 2 distinct labels; found {list(class_names)}")
    label_of = {c: i for i, c in enumerate(class_names)}
    records = [Record(path=str(p), label=label_of[lbl], split=sp or "train", patient=pat)
               for p, lbl, sp, pat in rows]
    given = [sp for _, _, sp, _ in rows]
    n_given = sum(sp is not None for sp in given)
    if 0 < n_given < len(given):
        issues.note(f"{csv_file}: only {n_given} of {len(given)} rows have a split; "
                    f"all rows get the seeded 80/20 split instead")
    info = generic_info(name, class_names, "a CSV file with columns path,label[,split,patient]")
    return finish_dataset(info, records, base, issues, {"source": "csv", "seed": seed}, split=split,
                          default=keep_given_or(default_split_fn(seed), given), paper=paper_80_20)


def _placeholder(kind: str) -> DatasetInfo:
    return DatasetInfo(name=kind, task="multiclass", class_names=(), layout=f"{kind}:PATH")


register_dataset(DatasetAdapter(info=_placeholder("folder"), loader=load_folder, options=GenericOptions,
                                generic=True))
register_dataset(DatasetAdapter(info=_placeholder("csv"), loader=load_csv, options=GenericOptions, generic=True))

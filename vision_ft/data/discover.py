"""Find the labelled images of a dataset and the class names, whatever the layout.

Three layouts are understood:

* ImageFolder: ``root/<class>/**/<image>`` (images may sit in sub-folders of a class folder);
* pre-split: ``root/{train,val,test}/<class>/**/<image>`` (``val`` and ``test`` are optional;
  the splitter makes the missing ones from ``train``);
* a CSV manifest (``source`` is a ``.csv`` file) with ``path`` and ``label`` columns, paths
  relative to the CSV's folder (absolute paths work too), and an optional ``split`` column
  holding ``train``/``val``/``test``.

Hidden files and folders and OS junk (``.DS_Store``, ``Thumbs.db``, ``__MACOSX``...) are ignored
silently; any other file that is not an image is recorded in ``DatasetIndex.skipped`` so the
caller can tell the user. Problems that make training meaningless (no images, an empty class
folder, a single class) raise ``VisionFTError`` naming the folder or file.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from vision_ft.data.dicom import DICOM_SUFFIXES, is_dicom_file
from vision_ft.errors import VisionFTError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", *DICOM_SUFFIXES})
SPLIT_NAMES = ("train", "val", "test")
# Files and folders that operating systems and archivers leave behind; never worth a warning.
_OS_JUNK = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx", "$recycle.bin", "system volume information"})


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path  # absolute
    label: int  # index into DatasetIndex.class_names (multi-label/regression: a stratum for splitting)
    # Multi-label: one 0/1 per label; regression: one value per target (None for classification).
    target: tuple[float, ...] | None = None


@dataclass
class DatasetIndex:
    """Everything discovery found under one data source."""

    root: Path
    class_names: list[str]
    samples: list[Sample]
    presplit: dict[str, list[Sample]] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # {image path: group (patient)} when data.group_by is set; see vision_ft.data.groups.
    groups: dict[Path, str] | None = None


def is_image_file(path: Path) -> bool:
    """True when the file name has one of the supported image extensions (any case), or when a
    file without an extension is DICOM (archives often store DICOM files without one)."""
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or (suffix == "" and is_dicom_file(path))


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _OS_JUNK


def discover(source: Path | str, every_class_trains: bool = True) -> DatasetIndex:
    """Index the images under `source`: a folder (ImageFolder or pre-split) or a CSV manifest.

    `every_class_trains=False` (anomaly detection, which fits one class and only evaluates the
    others) accepts a single class and classes absent from the train split.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise VisionFTError(f"{source} does not exist; pass a folder of class folders or a CSV manifest")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise VisionFTError(f"{source} is a file but not a .csv manifest; pass a folder of class folders or a CSV file")
        return _discover_csv(source.resolve(), every_class_trains)
    root = source.resolve()
    subfolders = _subfolders(root)
    split_folders = [d for d in subfolders if d.name in SPLIT_NAMES]
    if split_folders:
        others = [d.name for d in subfolders if d.name not in SPLIT_NAMES]
        if others:
            raise VisionFTError(
                f"{root} mixes split folders ({', '.join(d.name for d in split_folders)}) with other folders "
                f"({', '.join(others[:5])}); use either root/<class>/ or root/{{train,val,test}}/<class>/"
            )
        return _discover_presplit(root, split_folders, every_class_trains)
    return _discover_image_folder(root, every_class_trains)


# ------------------------------------------------------------------ folders


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _ignored(p.name) and not _is_run_folder(p))


# Written by `vision-ft train` into every run folder (vision_ft.run_folder.MARKER): a run folder
# inside the data folder (`--out data/run1`) holds plots, never a class's images.
_RUN_MARKER = ".vision-ft-run"


def _is_run_folder(folder: Path) -> bool:
    return (folder / _RUN_MARKER).is_file()


def _walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder`, sorted, following symlinked folders once and
    skipping run folders. Files reached twice (links) are resolved over the whole dataset by
    `_drop_duplicates`."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or the same folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d) and not _is_run_folder(Path(dirpath) / d))
        found.extend(Path(dirpath) / name for name in filenames if not _ignored(name))
    return sorted(found)


def _drop_duplicates(groups: dict[tuple[str, str], list[Path]]) -> tuple[dict[tuple[str, str], list[Path]], list[tuple[Path, str]]]:
    """Resolve every path to its real file once over the whole dataset; `groups` is keyed by
    (split, class). A file reached twice within one class (a symlink, a folder linked twice) is
    kept once; a file under two classes or two splits is an error, since it would be trained
    with a wrong label or tested on what was trained."""
    owner: dict[str, tuple[tuple[str, str], Path]] = {}
    kept: dict[tuple[str, str], list[Path]] = {}
    skipped: list[tuple[Path, str]] = []
    for group, paths in groups.items():
        kept[group] = []
        for path in paths:
            real = os.path.realpath(path)
            if real not in owner:
                owner[real] = (group, path)
                kept[group].append(path)
                continue
            first_group, first = owner[real]
            if first_group == group:
                skipped.append((path, f"same file as {first}"))
                continue
            what = "classes" if first_group[0] == group[0] else "splits"
            raise VisionFTError(
                f"{path} and {first} are the same file ({real}) in two {what} ({'/'.join(filter(None, first_group))} "
                f"and {'/'.join(filter(None, group))}); a symbolic link or a copy by link puts it under both: "
                "keep it in one place"
            )
    return kept, skipped


def _scan_class_folders(root: Path) -> tuple[dict[str, list[Path]], list[tuple[Path, str]]]:
    """{class name: image paths} for every class folder of `root`, and the files skipped."""
    images: dict[str, list[Path]] = {}
    skipped: list[tuple[Path, str]] = []
    for entry in sorted(root.iterdir()):
        if _ignored(entry.name):
            continue
        if entry.is_file():
            reason = "image outside any class folder" if is_image_file(entry) else "not an image"
            skipped.append((entry, reason))
            continue
        if not entry.is_dir():
            continue
        if _is_run_folder(entry):
            skipped.append((entry, "a vision-ft run folder, not a class"))
            continue
        files = _walk_files(entry)
        images[entry.name] = [f for f in files if is_image_file(f)]
        skipped.extend((f, f"not an image ({f.suffix or 'no extension'})") for f in files if not is_image_file(f))
    return images, skipped


def _check_class_folders(where: Path, images: dict[str, list[Path]], skipped: list[tuple[Path, str]]) -> None:
    if not any(images.values()):
        extra = f" ({len(skipped)} other files were ignored)" if skipped else ""
        raise VisionFTError(
            f"{where} holds no images{extra}; expected {where}/<class>/*.jpg|png|... "
            f"(or train/val/test/<class>/...) with extensions {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    empty = [name for name, paths in images.items() if not paths]
    if empty:
        raise VisionFTError(
            f"class folder {where / empty[0]} holds no images"
            + (f" (nor do {', '.join(empty[1:4])})" if len(empty) > 1 else "")
            + "; add images to it or remove the folder"
        )


def _check_class_count(where: Path, class_names: list[str]) -> None:
    if len(class_names) < 2:
        raise VisionFTError(
            f"{where} has only one class ({class_names[0]!r}); classification needs at least two class folders"
        )


def _discover_image_folder(root: Path, every_class_trains: bool = True) -> DatasetIndex:
    images, skipped = _scan_class_folders(root)
    unique, duplicates = _drop_duplicates({("", name): paths for name, paths in images.items()})
    images = {name: unique[("", name)] for name in images}
    skipped.extend(duplicates)
    _check_class_folders(root, images, skipped)
    class_names = sorted(images)
    if every_class_trains:
        _check_class_count(root, class_names)
    samples = [Sample(path, label) for label, name in enumerate(class_names) for path in images[name]]
    return DatasetIndex(root=root, class_names=class_names, samples=samples, presplit=None, skipped=skipped)


def _discover_presplit(root: Path, split_folders: list[Path], every_class_trains: bool = True) -> DatasetIndex:
    names = {d.name for d in split_folders}
    if "train" not in names:
        raise VisionFTError(f"{root} has {', '.join(sorted(names))} folders but no train folder; add {root / 'train'}")
    per_split: dict[str, dict[str, list[Path]]] = {}
    skipped: list[tuple[Path, str]] = []
    for split in SPLIT_NAMES:
        if split not in names:
            continue
        images, split_skipped = _scan_class_folders(root / split)
        _check_class_folders(root / split, images, split_skipped)
        per_split[split] = images
        skipped.extend(split_skipped)
    unique, duplicates = _drop_duplicates(
        {(split, name): paths for split, images in per_split.items() for name, paths in images.items()})
    per_split = {split: {name: unique[(split, name)] for name in images} for split, images in per_split.items()}
    skipped.extend(duplicates)
    # Root-level files next to the split folders are not part of any split.
    skipped.extend((f, "not inside a split folder") for f in sorted(root.iterdir()) if f.is_file() and not _ignored(f.name))

    class_names = sorted(set().union(*(images.keys() for images in per_split.values())))
    missing_in_train = [name for name in class_names if name not in per_split["train"]]
    if missing_in_train and every_class_trains:
        raise VisionFTError(
            f"class {missing_in_train[0]!r} appears in another split but not in {root / 'train'}; "
            "every class needs training images: add a train folder for it or remove it from the other splits"
        )
    if every_class_trains:
        _check_class_count(root / "train", class_names)
    label_of = {name: label for label, name in enumerate(class_names)}
    presplit = {
        split: [Sample(path, label_of[name]) for name in sorted(images) for path in images[name]]
        for split, images in per_split.items()
    }
    samples = [s for split in SPLIT_NAMES for s in presplit.get(split, [])]
    return DatasetIndex(root=root, class_names=class_names, samples=samples, presplit=presplit, skipped=skipped)


# ------------------------------------------------------------------ CSV manifest


def _sorted_labels(labels: set[str]) -> list[str]:
    # Numeric labels sort as numbers, so "10" comes after "9" and label indices read naturally.
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _read_manifest(csv_path: Path) -> tuple[dict[str, str], list[tuple[int, dict[str, str]]]]:
    """({lower-case column name: column as written}, [(line number, row)]) of a CSV manifest."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: tolerate Excel's byte-order mark
            reader = csv.DictReader(fh)
            columns = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise VisionFTError(
                    f"{csv_path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                    f"(found: {', '.join(columns) or 'none'}); the manifest needs a header row with path,label[,split]"
                )
            rows = [(line, row) for line, row in enumerate(reader, start=2)]
    except UnicodeDecodeError as exc:
        raise VisionFTError(f"{csv_path} is not UTF-8 text ({exc.reason}); save the manifest as UTF-8 CSV") from None
    except csv.Error as exc:
        raise VisionFTError(f"{csv_path} is not a readable CSV file ({exc}); fix the manifest") from None
    return columns, rows


def _manifest_presplit(csv_path: Path, samples: list[Sample], splits: list[str | None],
                       class_names: list[str], every_class_trains: bool = True) -> dict[str, list[Sample]]:
    """The manifest's own train/val/test split (rows without a split value train)."""
    presplit: dict[str, list[Sample]] = {}
    for sample, split in zip(samples, splits):
        presplit.setdefault(split or "train", []).append(sample)
    if "train" not in presplit:
        raise VisionFTError(f"{csv_path} has no rows with split 'train'; mark the training images as train")
    in_train = {s.label for s in presplit["train"]}
    lacking = [class_names[label] for label in range(len(class_names)) if label not in in_train]
    if lacking and every_class_trains:
        raise VisionFTError(
            f"{csv_path}: class {lacking[0]!r} has no rows with split 'train'; every class needs training images"
        )
    return {name: presplit[name] for name in SPLIT_NAMES if name in presplit}


def _discover_csv(csv_path: Path, every_class_trains: bool = True) -> DatasetIndex:
    root = csv_path.parent
    columns, rows = _read_manifest(csv_path)
    split_column = columns.get("split")
    entries: list[tuple[Path, str, str | None]] = []
    skipped: list[tuple[Path, str]] = []
    not_found: list[str] = []
    seen: dict[Path, int] = {}
    for line, row in rows:
        raw_path = (row.get(columns["path"]) or "").strip()
        label = (row.get(columns["label"]) or "").strip()
        if not raw_path and not label and not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        if not raw_path or not label:
            raise VisionFTError(f"{csv_path} line {line}: empty {'path' if not raw_path else 'label'}; every row needs both")
        split: str | None = None
        if split_column is not None:
            split = (row.get(split_column) or "").strip().lower()
            if split not in SPLIT_NAMES:
                raise VisionFTError(
                    f"{csv_path} line {line}: split {split!r} is not one of train, val, test; fix the split column"
                )
        path = Path(os.path.normpath(root / raw_path))
        real = Path(os.path.realpath(path))  # two spellings or a link of one file are one image
        if real in seen:
            raise VisionFTError(
                f"{csv_path} line {line}: {raw_path} is already listed on line {seen[real]} (the same file); "
                "list each image once"
            )
        seen[real] = line
        if not is_image_file(path):
            skipped.append((path, f"not an image ({path.suffix or 'no extension'}), {csv_path.name} line {line}"))
            continue
        if not path.is_file():
            not_found.append(f"{raw_path} (line {line})")
            continue
        entries.append((path, label, split))

    if not_found:
        more = f" and {len(not_found) - 3} more" if len(not_found) > 3 else ""
        raise VisionFTError(
            f"{csv_path}: {len(not_found)} listed image{'s' if len(not_found) > 1 else ''} not found: "
            f"{', '.join(not_found[:3])}{more}; paths are relative to the CSV's folder {root}"
        )
    if not entries:
        raise VisionFTError(f"{csv_path} lists no images; add rows of path,label")
    class_names = _sorted_labels({label for _, label, _ in entries})
    if every_class_trains:
        _check_class_count(csv_path, class_names)
    label_of = {name: index for index, name in enumerate(class_names)}
    samples = [Sample(path, label_of[label]) for path, label, _ in entries]

    presplit = None
    if split_column is not None:
        presplit = _manifest_presplit(csv_path, samples, [split for _, _, split in entries], class_names,
                                     every_class_trains)
    return DatasetIndex(root=root, class_names=class_names, samples=samples, presplit=presplit, skipped=skipped)

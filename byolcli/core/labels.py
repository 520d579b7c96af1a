"""Read a labels CSV: image paths, labels and an optional split, strictly.

Accepted: a header naming a path column (path, file, filename, image, …) and a
label column (label, class, category); an optional `split` column (train /
val / test). UTF-8 with or without BOM, any line ends, quoted fields. Every
problem is reported with the row it is on.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from byolcli.core.errors import UserError
from byolcli.core.inputs import require_file

PATH_COLUMNS = ("path", "file", "filename", "file_name", "filepath", "image", "image_path", "img")
LABEL_COLUMNS = ("label", "class", "category", "class_name", "target")
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
SHOWN = 5


@dataclass
class LabelledImages:
    paths: list[Path]  # absolute
    labels: list[str]
    splits: list[str] | None  # "train" / "val" / "test" per row, or None without a split column
    rows: list[int]  # CSV line number of each entry, for messages
    missing: list[tuple[int, str]]  # (line, path) of files that do not exist
    repeated: list[tuple[int, int, str]] = field(default_factory=list)  # (first line, line, path) listed twice alike

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def subset(self, keep: list[int]) -> LabelledImages:
        """The rows numbered `keep`, in that order (nothing missing among them)."""
        return LabelledImages(
            [self.paths[i] for i in keep],
            [self.labels[i] for i in keep],
            [self.splits[i] for i in keep] if self.splits is not None else None,
            [self.rows[i] for i in keep],
            [],
        )


def _read_table(csv_path: Path) -> list[list[str]]:
    """The CSV's non-blank rows; UserError for a file that is missing, empty, binary or not CSV."""
    require_file(csv_path)
    raw = csv_path.read_bytes()
    if not raw.strip():
        raise UserError(f"{csv_path}: empty file")
    if b"\x00" in raw[:8192]:
        raise UserError(f"{csv_path}: a binary file, not a CSV")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as exc:
            raise UserError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        table = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise UserError(f"{csv_path}: not a valid CSV ({exc})") from None
    return [row for row in table if any(cell.strip() for cell in row)]


def read_labels(csv_path: Path, root: Path | None = None) -> LabelledImages:
    table = _read_table(csv_path)
    header = [cell.strip().lower() for cell in table[0]]
    path_col = _find(header, PATH_COLUMNS)
    label_col = _find(header, LABEL_COLUMNS)
    if path_col is None or label_col is None:
        absent = (
            f"image path column ({'/'.join(PATH_COLUMNS[:4])})"
            if path_col is None
            else f"label column ({'/'.join(LABEL_COLUMNS[:3])})"
        )
        raise UserError(f"{csv_path}: line 1: the header has no {absent}; it reads: {','.join(table[0])[:120]}")
    split_col = _find(header, ("split", "subset", "set", "fold_name"))
    base = root if root is not None else csv_path.parent

    paths: list[Path] = []
    labels: list[str] = []
    splits: list[str] = []
    rows: list[int] = []
    missing: list[tuple[int, str]] = []
    repeated: list[tuple[int, int, str]] = []
    seen: dict[str, int] = {}  # normalised absolute path -> index of its row
    for line, row in enumerate(table[1:], start=2):
        if len(row) < len(header):
            raise UserError(f"{csv_path}: line {line}: {len(row)} fields, the header has {len(header)}")
        path, label = row[path_col].strip(), row[label_col].strip()
        if not path:
            raise UserError(f"{csv_path}: line {line}: empty image path")
        if not label:
            raise UserError(f"{csv_path}: line {line}: empty label for {path}")
        split = None
        if split_col is not None:
            split = SPLIT_NAMES.get(row[split_col].strip().lower())
            if split is None:
                raise UserError(f"{csv_path}: line {line}: split {row[split_col]!r} is not train, val or test")
        full = Path(path) if Path(path).is_absolute() else base / path
        key = os.path.abspath(full)  # ./a.jpg, a.jpg and x/../a.jpg are one image
        if key in seen:
            # Two rows of one image could sit in a training fold and a test fold: kNN would find the image itself.
            first = seen[key]
            before, now = (
                (labels[first], label)
                if labels[first] != label
                else (splits[first], split)
                if split_col is not None
                else (None, None)
            )
            if before != now:
                raise UserError(
                    f"{csv_path}: lines {rows[first]} and {line} both list {path}, as {before!r} and "
                    f"{now!r}; list each image once"
                )
            repeated.append((rows[first], line, path))
            continue
        seen[key] = len(paths)
        if not full.is_file():
            missing.append((line, path))
        paths.append(full)
        if split is not None:
            splits.append(split)
        labels.append(label)
        rows.append(line)
    if not paths:
        raise UserError(f"{csv_path}: a header but no rows")
    return LabelledImages(paths, labels, splits if split_col is not None else None, rows, missing, repeated)


def repeated_warning(data: LabelledImages, csv_path: Path) -> str | None:
    """What to tell the user about images listed twice with the same label (each is used once)."""
    if not data.repeated:
        return None
    shown = ", ".join(f"lines {first} and {line}: {path}" for first, line, path in data.repeated[:SHOWN])
    more = f" and {len(data.repeated) - SHOWN} more" if len(data.repeated) > SHOWN else ""
    return (
        f"{csv_path}: {len(data.repeated)} images listed twice with the same label ({shown}{more}); each is used once"
    )


def drop_missing(data: LabelledImages, csv_path: Path, skip_missing: bool) -> LabelledImages:
    """Refuse missing files with a list of them, or (with --skip-missing) drop them."""
    if not data.missing:
        return data
    if not skip_missing:
        shown = ", ".join(f"line {line}: {path}" for line, path in data.missing[:SHOWN])
        more = f" and {len(data.missing) - SHOWN} more" if len(data.missing) > SHOWN else ""
        raise UserError(
            f"{csv_path}: {len(data.missing)} listed files do not exist ({shown}{more}); "
            "fix the paths or --root, or pass --skip-missing to evaluate the rest"
        )
    gone = {line for line, _ in data.missing}
    return data.subset([i for i, line in enumerate(data.rows) if line not in gone])


def _find(header: list[str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in header:
            return header.index(name)
    return None

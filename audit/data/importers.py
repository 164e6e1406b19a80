"""Importers: write a manifest for data in common layouts, beside the data, touching nothing else.

- `import_imagefolder(ROOT)`: torchvision's ImageFolder layout (class = top-level folder name,
  images at any depth below it) or ROOT/<split>/<class>/ (recognised where every top-level folder
  is named like a split, refused naming --layout where the tree could be either), optionally
  joined with an attribute table.
- `import_table(TABLE)`: an attribute table - CSV (FairFace, UTKFace-as-CSV style) or CelebA's
  whitespace layout (`list_attr_celeba.txt`: a count, the attribute names, then `file v1 v2 ...`
  with -1/1) - with the label and protected attributes taken from its columns.
- `import_coco(ANNOTATIONS.json)`: COCO instance annotations (polygons, uncompressed and compressed
  RLE) turned into one mask PNG per image and region, in a new folder beside the file; labels and
  attributes from a joined table.

What each reads from a table is a `TableSpec`: the key, the label, the attributes and one source of
the split (`--split`, `--split-column`, CelebA's `list_eval_partition.txt` via `--partition`, or
the split/class layout). A table's own manifest columns (`group:*`, `twin`, `twin:*`, `mask:*`,
`box:*`) are carried into the manifest, paths made relative to it.

Manifest columns written: `image`, `label`, `split`, one `group:<attribute>` per protected
attribute, the carried columns, one `mask:<region>` per COCO region. Paths are relative to the
manifest's folder, which must lie above every file it names.

The importers refuse to guess: a key that names no image, a table `split` column nothing asks for,
a table `label` or `split` that disagrees with the folders, two sources of the split, an ambiguous
folder tree are errors naming the file, line or option.

Every importer checks its inputs before writing, then writes the manifest under a temporary name,
validates it as `audit data validate` does (`audit.data.manifest.validate`) and only then moves it
into place. Each problem names the source record (table line, image file, COCO annotation id).
On any problem nothing is left behind: the temporary manifest and any masks written are removed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image

from audit.data.manifest import validate

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MANIFEST_NAME = "manifest.csv"
SHOWN_PROBLEMS = 20


class ImporterError(ValueError):
    """Bad importer input, in one line naming the file, record, column or option."""


class ImportProblems(ImporterError):
    """The manifest an importer built has problems; `problems` lists each, naming its record."""

    def __init__(self, source: Path, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        super().__init__(f"{source}: {len(problems)} problem(s), nothing written: {shown}")


@dataclass
class ImportResult:
    """What an importer wrote: the manifest, its row count and columns, the mask files written,
    and warnings (e.g. table rows that match no image) that did not stop the import."""

    manifest: Path
    rows: int
    columns: list[str]
    masks: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layout: str = ""


@dataclass(frozen=True)
class BinaryAttribute:
    """A -1/1 (or 0/1) attribute column turned into names: `[NAME=]ATTR[:NEG,POS]`.

    `Eyeglasses` gives `Eyeglasses` / `not_Eyeglasses`; `sex=Male:female,male` reads column
    `Male` into an attribute named `sex` with values `female` (-1 or 0) and `male` (1).
    """

    name: str
    column: str
    negative: str
    positive: str

    @classmethod
    def parse(cls, spec: str, option: str = "--label-from") -> BinaryAttribute:
        match = re.fullmatch(
            r"\s*(?:([^=:,]+?)\s*=)?\s*([^=:,]+?)\s*(?::\s*([^,]*?)\s*,\s*([^,]*?))?\s*", spec
        )
        if not match or (match.group(3) is not None and not (match.group(3) and match.group(4))):
            raise ImporterError(
                f"{option}: {spec!r} is not ATTR, NAME=ATTR or [NAME=]ATTR:NEGATIVE,POSITIVE"
            )
        name, column, negative, positive = match.groups()
        if negative is not None and negative == positive:
            raise ImporterError(f"{option}: {spec!r} gives both values the same name")
        return cls(
            name=name or column,
            column=column,
            negative=negative if negative is not None else f"not_{column}",
            positive=positive if positive is not None else column,
        )

    def convert(self, values: pd.Series, origins: Sequence[str], problems: list[str]) -> pd.Series:
        """The named values; an empty cell stays empty, anything but -1/0/1 is a problem."""
        out = pd.Series("", index=values.index, dtype=object)
        positive = values.isin(["1", "+1", "1.0"])
        negative = values.isin(["-1", "0", "-1.0", "0.0"])
        out[positive] = self.positive
        out[negative] = self.negative
        bad = ~(positive | negative | values.eq(""))
        for position in np.flatnonzero(bad.to_numpy()):
            problems.append(
                f"{origins[position]}, column {self.column}: {values.iloc[position]!r} is not -1, 0 or 1"
            )
        return out


def parse_columns(text: str | Sequence[str] | None) -> list[str]:
    """'a,b' (or a list) -> ['a', 'b'], empty entries dropped."""
    if not text:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [c.strip() for c in items if c.strip()]


# -- reading tables -----------------------------------------------------------------------------
@dataclass
class AttributeTable:
    """A table as strings (empty cells ""), its layout, and each row's line in the file."""

    path: Path
    frame: pd.DataFrame
    layout: str  # "csv" or "celeba"
    lines: list[int]

    def origin(self, position: int) -> str:
        return f"{self.path.name} line {self.lines[position]}"

    def require(self, column: str, option: str) -> None:
        if column not in self.frame.columns:
            known = list(self.frame.columns)
            shown = ", ".join(known[:12]) + (
                f", ... ({len(known)} columns)" if len(known) > 12 else ""
            )
            raise ImporterError(
                f"{option}: {self.path} has no column {column!r} (columns: {shown})"
            )


def _text_head(path: Path, what: str) -> str:
    if not path.exists():
        raise ImporterError(f"file not found: {path} ({what} expected)")
    if not path.is_file():
        raise ImporterError(f"{path}: not a file ({what} expected)")
    head = path.read_bytes()[:4096]
    if b"\0" in head or head.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"PK\x03\x04")):
        raise ImporterError(f"{path}: a binary file, not {what}")
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character cut at 4096 bytes is fine; anything else is not UTF-8 text
        try:
            head[:-4].decode("utf-8")
        except UnicodeDecodeError:
            raise ImporterError(f"{path}: not UTF-8 text ({what} expected)") from None
        return head[:-4].decode("utf-8")


def read_attribute_table(path: str | Path) -> AttributeTable:
    """Read a CSV table or a CelebA-layout attribute file, all values as stripped strings.

    CelebA layout: line 1 the number of images, line 2 the attribute names, then one line per
    image: the file name and one value per attribute, separated by spaces. Its file column is
    called `image`. Raises ImporterError for anything else (JSON, binary, ragged rows).
    """
    path = Path(path)
    head = _text_head(path, "an attribute table (CSV or CelebA layout)")
    stripped = head.lstrip()
    if stripped.startswith(("{", "[")):
        raise ImporterError(
            f"{path}: JSON, not an attribute table (CSV or CelebA layout); for COCO annotations "
            "use `audit data import coco`"
        )
    first_lines = head.splitlines()
    if first_lines and re.fullmatch(r"\s*\d+\s*", first_lines[0]):
        return _read_celeba(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImporterError(f"{path}: not a readable CSV table: {first}") from None
    if frame.shape[1] < 2:
        raise ImporterError(
            f"{path}: one column only; expected a CSV table with a header (or the CelebA layout)"
        )
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in frame.columns:
        frame[column] = frame[column].str.strip()
    return AttributeTable(path, frame, "csv", list(range(2, len(frame) + 2)))


def _read_celeba(path: Path) -> AttributeTable:
    with path.open(encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    count = int(lines[0])
    if len(lines) < 2 or not lines[1].split():
        raise ImporterError(f"{path}, line 2: expected the attribute names (CelebA layout)")
    names = lines[1].split()
    if len(set(names)) != len(names):
        raise ImporterError(f"{path}, line 2: an attribute name is repeated")
    rows, numbers = [], []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise ImporterError(
                f"{path}, line {number}: {len(fields)} fields, expected {len(names) + 1} "
                "(a file name and one value per attribute)"
            )
        rows.append(fields)
        numbers.append(number)
    if len(rows) != count:
        raise ImporterError(f"{path}, line 1: says {count} images, but {len(rows)} rows follow")
    frame = pd.DataFrame(rows, columns=["image", *names], dtype=str)
    return AttributeTable(path, frame, "celeba", numbers)


# -- what to read from a table --------------------------------------------------------------------
@dataclass(frozen=True)
class TableSpec:
    """What an importer reads from an attribute table, and where each row's split comes from.

    key: the column naming the image (a path relative to the image folder, or a unique file
    name); label_column / label_from: the class (a column of names, or a binary attribute, see
    BinaryAttribute); group_columns / group_from: protected attributes (None: for imagefolder,
    every plain column); the split from at most one of `split` (one name for every row),
    `split_column` (a column of the table) and `partition` (CelebA's list_eval_partition.txt).
    """

    key: str = "image"
    label_column: str | None = None
    label_from: str | None = None
    group_columns: Sequence[str] | str | None = None
    group_from: Sequence[str] = ()
    split: str = ""
    split_column: str | None = None
    partition: str | Path | None = None

    def split_sources(self, *, layout: bool = False) -> list[str]:
        """The options that give the split; more than one is an error (the importer cannot choose)."""
        given = [
            name
            for name, on in (
                ("--split", bool(self.split)),
                ("--split-column", bool(self.split_column)),
                ("--partition", self.partition is not None),
                ("--layout split/class", layout),
            )
            if on
        ]
        if len(given) > 1:
            raise ImporterError(f"{' and '.join(given)} each give the split: give one of them")
        return given


RESERVED = ("image", "label", "split", "twin")  # manifest columns never read as attributes
CARRIED = ("twin:", "mask:", "box:")  # manifest columns a table may hold, copied as they are


def _is_path_column(column: str) -> bool:
    """Carried columns holding image paths (rewritten relative to the manifest)."""
    return column == "twin" or column.startswith(("twin:", "mask:"))


# -- labels and attributes ----------------------------------------------------------------------
def _labels_and_groups(
    table: AttributeTable,
    spec: TableSpec,
    *,
    need_label: bool = True,
    all_columns: bool = False,
) -> tuple[pd.DataFrame, list[str]]:
    """The label, `group:<attribute>` and carried columns read from a table, and the problems found.

    Attributes in order: the table's own `group:<attribute>` columns, then `group_columns` (with
    `all_columns` and neither option given: every column that is not the key, the split column, a
    manifest column or prefixed), then `group_from`. Carried: `twin`, `twin:*`, `mask:*`, `box:*`.
    """
    frame = table.frame
    origins = [table.origin(i) for i in range(len(frame))]
    problems: list[str] = []
    out = pd.DataFrame(index=frame.index)
    if spec.label_column and spec.label_from:
        raise ImporterError("give --label-column or --label-from, not both")
    if spec.label_column:
        table.require(spec.label_column, "--label-column")
        out["label"] = frame[spec.label_column]
    elif spec.label_from:
        binary = BinaryAttribute.parse(spec.label_from, "--label-from")
        table.require(binary.column, "--label-from")
        out["label"] = binary.convert(frame[binary.column], origins, problems)
    elif need_label:
        hint = " (this table has one: --label-column label)" if "label" in frame.columns else ""
        raise ImporterError(
            f"give --label-column (a column of class names) or --label-from ATTR{hint}"
        )
    declared = [c for c in frame.columns if c.startswith("group:")]
    columns = parse_columns(spec.group_columns)
    if all_columns and spec.group_columns is None and not spec.group_from:
        skip = {spec.key, spec.split_column, *RESERVED}
        columns = [c for c in frame.columns if c not in skip and ":" not in c]
    for column in declared:
        _add_group(out, column.partition(":")[2].strip(), frame[column], column)
    for column in columns:
        if column in declared:
            continue  # already read as the attribute it declares
        table.require(column, "--group-columns")
        _add_group(out, column, frame[column], "--group-columns")
    for spec_text in spec.group_from:
        binary = BinaryAttribute.parse(spec_text, "--group-from")
        table.require(binary.column, "--group-from")
        values = binary.convert(frame[binary.column], origins, problems)
        _add_group(out, binary.name, values, f"--group-from {spec_text}")
    for column in frame.columns:
        if column == "twin" or column.startswith(CARRIED):
            out[column] = frame[column]
    return out, problems


def _add_group(out: pd.DataFrame, name: str, values: pd.Series, source: str) -> None:
    if ":" in name or not name:
        raise ImporterError(f"{source}: attribute name {name!r} must be non-empty and without ':'")
    column = f"group:{name}"
    if column in out.columns:
        raise ImporterError(
            f"{source}: attribute {name!r} is given twice (the table's column {column!r}, "
            "--group-columns or --group-from)"
        )
    out[column] = values


def _rebase(values: Sequence[str], base: Path, manifest: Path) -> list[str]:
    """Paths relative to `base` made relative to the manifest's folder (posix); one that leaves
    the folder keeps its '..' and the validator names it."""
    root = manifest.parent.resolve()
    return [
        Path(os.path.relpath(os.path.abspath(base / value), root)).as_posix() if value else ""
        for value in values
    ]


def _pick(values: pd.Series, matched: Sequence[int | None]) -> list[str]:
    """For each manifest row, the value of its table row ("" for a row without one)."""
    return [values.iloc[m] if m is not None else "" for m in matched]


def _agreement(
    table: AttributeTable,
    column: str,
    matched: Sequence[int | None],
    values: Sequence[str],
    what: str,
) -> list[str]:
    """Where the table's `column` (not the source of the manifest's `what`) differs from it."""
    if column not in table.frame.columns:
        return []
    problems = []
    for row, value in zip(matched, values, strict=True):
        if row is not None and (given := table.frame[column].iloc[row]) and given != value:
            problems.append(
                f"{table.origin(row)}, column {column}: {given!r} but the {what} is {value!r}"
            )
    return problems


def _unused_split_column(table: AttributeTable, spec: TableSpec, sources: list[str]) -> None:
    """A table with a `split` column when nothing asks for a split: refuse rather than drop it."""
    if "split" in table.frame.columns and not sources:
        raise ImporterError(
            f"{table.path} has a 'split' column but no split was asked for: pass "
            "--split-column split to take each row's split from it (or --split NAME, which "
            "is checked against it)"
        )


def _table_splits(
    table: AttributeTable,
    spec: TableSpec,
    matched: Sequence[int | None],
    origins: Sequence[str],
) -> tuple[list[str], list[str]]:
    """Each manifest row's split from `--split-column`; a row without one is a problem."""
    table.require(spec.split_column, "--split-column")
    values = table.frame[spec.split_column]
    splits, problems = [], []
    for row, origin in zip(matched, origins, strict=True):
        if row is None:
            problems.append(f"{origin}: no row in {table.path.name}, so no split (--split-column)")
            splits.append("")
        elif not values.iloc[row]:
            problems.append(f"{table.origin(row)}, column {spec.split_column}: empty split")
            splits.append("")
        else:
            splits.append(values.iloc[row])
    return splits, problems


def _join(
    table: AttributeTable,
    key: str,
    images: Sequence[str],
    option: str = "--key",
) -> tuple[list[int | None], list[str]]:
    """For each image path (posix, relative), the table row whose `key` names it, or None.

    A key matches an image by its relative path, or by its file name when that name is unique
    among the images. Returns the row positions and warnings (rows that match no image). A key
    that matches no image at all is an error: the join would only leave every attribute unknown.
    """
    table.require(key, option)
    by_path = {p: i for i, p in enumerate(images)}
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(images):
        by_name.setdefault(PurePosixPath(p).name, []).append(i)
    matched: list[int | None] = [None] * len(images)
    unmatched: list[str] = []
    for position, value in enumerate(table.frame[key]):
        value = value.replace("\\", "/").removeprefix("./")
        hits = [by_path[value]] if value in by_path else by_name.get(value, [])
        if len(hits) > 1:
            raise ImporterError(
                f"{table.origin(position)}: {value!r} names {len(hits)} images "
                f"({images[hits[0]]}, {images[hits[1]]}); use paths relative to the root"
            )
        if not hits:
            unmatched.append(table.origin(position))
            continue
        if matched[hits[0]] is not None:
            raise ImporterError(
                f"{table.origin(position)}: {value!r} is also on {table.origin(matched[hits[0]])}"
            )
        matched[hits[0]] = position
    if images and all(m is None for m in matched):
        first = table.frame[key].iloc[0] if len(table.frame) else ""
        raise ImporterError(
            f"{option}: no value of {table.path.name}'s column {key!r} names one of the "
            f"{len(images)} images (its first value {first!r}, the first image {images[0]!r}); "
            "a key is a path relative to the image folder or a file name unique in it"
            + _prefix_hint(table.frame[key], by_path)
        )
    warnings = []
    if unmatched:
        warnings.append(
            f"{len(unmatched)} row(s) of {table.path.name} match no image "
            f"(first: {', '.join(unmatched[:3])})"
        )
    return matched, warnings


def _prefix_hint(keys: pd.Series, by_path: Mapping[str, int]) -> str:
    """Where keys are paths from a folder above the images (e.g. the whole tree's table joined to
    one split folder), say which prefix they carry."""
    for value in keys.head(1000):
        parts = value.replace("\\", "/").removeprefix("./").split("/")
        for cut in range(1, len(parts)):
            if "/".join(parts[cut:]) in by_path:
                prefix = "/".join(parts[:cut])
                return (
                    f"; the keys look like paths from a folder above (they start with "
                    f"'{prefix}/'): import that folder, or join on a column of file names"
                )
    return ""


# -- CelebA's list_eval_partition.txt -------------------------------------------------------------
PARTITION_SPLITS = {"0": "train", "1": "val", "2": "test"}


def read_partition(path: str | Path) -> AttributeTable:
    """CelebA's split file as a table (`image`, `partition`): `list_eval_partition.txt` (a file
    name and 0, 1 or 2 per line) or its CSV form with a header (`image_id,partition`)."""
    path = Path(path)
    head = _text_head(path, "a partition file (FILE 0|1|2 per line, CelebA layout)")
    if "," in (head.splitlines() or [""])[0]:
        table = read_attribute_table(path)
        if table.frame.shape[1] != 2:
            raise ImporterError(
                f"--partition: {path}: {table.frame.shape[1]} columns, expected 2 (file, partition)"
            )
        table.frame.columns = ["image", "partition"]
        return table
    rows, numbers = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ImporterError(
                    f"--partition: {path}, line {number}: {len(fields)} fields, expected 2 "
                    "(a file name and 0, 1 or 2)"
                )
            rows.append(fields)
            numbers.append(number)
    if not rows:
        raise ImporterError(f"--partition: {path}: no lines")
    return AttributeTable(
        path, pd.DataFrame(rows, columns=["image", "partition"]), "partition", numbers
    )


def _partition_splits(
    path: str | Path, images: Sequence[str], origins: Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """Each image's split from a partition file (0 train, 1 val, 2 test): splits, problems, warnings."""
    table = read_partition(path)
    matched, warnings = _join(table, "image", images, "--partition")
    splits, problems = [], []
    for row, origin in zip(matched, origins, strict=True):
        value = table.frame["partition"].iloc[row] if row is not None else None
        if row is None:
            problems.append(f"{origin}: not in {table.path.name}, so no split (--partition)")
        elif value not in PARTITION_SPLITS:
            problems.append(f"{table.origin(row)}: partition {value!r} is not 0, 1 or 2")
        splits.append(PARTITION_SPLITS.get(value or "", ""))
    return splits, problems, warnings


# -- writing and validating ---------------------------------------------------------------------
def _manifest_path(out: Path | None, default_folder: Path, overwrite: bool) -> Path:
    path = Path(out) if out is not None else Path(default_folder) / MANIFEST_NAME
    if path.exists() and not overwrite:
        raise ImporterError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_file():
        raise ImporterError(f"{path} exists and is not a file")
    if not path.parent.is_dir():
        raise ImporterError(f"{path.parent}: folder not found (the manifest goes there)")
    return path


def _relative(file: Path, manifest: Path, what: str) -> str:
    """`file` relative to the manifest's folder, in posix form; it must lie below that folder."""
    root = manifest.parent.resolve()
    full = Path(os.path.abspath(file))
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        raise ImporterError(
            f"{what} {file} is not below {root}, the manifest's folder; put the manifest (--out) "
            "in a folder that contains it"
        ) from None


_LINE = re.compile(r"^line (\d+)(.*)$", re.S)


def _commit(
    frame: pd.DataFrame,
    manifest: Path,
    origins: Sequence[str],
    source: Path,
    problems: list[str],
) -> None:
    """Write, validate and move the manifest into place; on any problem remove the manifest.

    `problems` found earlier are reported with the validator's; the validator's "line N" becomes
    the source record (`origins[N - 2]`) so the user can fix the file they gave.
    """
    tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
    try:
        frame.to_csv(tmp, index=False, lineterminator="\n")
        for problem in validate(tmp):
            match = _LINE.match(problem)
            if match and 2 <= int(match.group(1)) < len(origins) + 2:
                problem = f"{origins[int(match.group(1)) - 2]}{match.group(2)}"
            problems.append(problem.replace(tmp.name, manifest.name))
        if problems:
            raise ImportProblems(source, problems)
        os.replace(tmp, manifest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- ImageFolder --------------------------------------------------------------------------------
LAYOUTS = ("auto", "class", "split/class")
SPLIT_LIKE = re.compile(
    r"(train|training|val|valid|validation|dev|test|testing|eval|evaluation|holdout)([_\-.].*)?",
    re.IGNORECASE,
)


def _images_below(folder: Path, root: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _shown(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)})" if len(names) > limit else "")


def _folder_layout(root: Path, layout: str) -> tuple[str, list[tuple[str, str, Path]]]:
    """The layout used and every image as (split, class, path); ImporterError where unsure.

    "class": ROOT/<class>/**/<image>. "split/class": ROOT/<split>/<class>/**/<image>. "auto"
    takes split/class where every top-level folder is named like a split (train, val, test,
    train_biased, ...) and holds only class folders, class otherwise, and refuses (naming
    --layout) a tree that could be either: split-like top-level names, or top-level folders that
    hold only folders, some of them under more than one top-level folder.
    """
    tops = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {t: files for t in tops if (files := _images_below(root / t, root))}
    parts = {t: [p.relative_to(root).parts for p in files] for t, files in found.items()}
    two_level = bool(found) and all(len(q) > 2 for ps in parts.values() for q in ps)
    inner = Counter(c for ps in parts.values() for c in {q[1] for q in ps if len(q) > 2})
    repeated = sorted(c for c, n in inner.items() if n > 1)
    split_named = [t for t in found if SPLIT_LIKE.fullmatch(t)]
    if layout == "auto":
        if two_level and split_named and len(split_named) == len(found):
            layout = "split/class"
        elif split_named:
            raise ImporterError(
                f"{root}: the top-level folders {_shown(split_named)} are named like splits; "
                "pass --layout split/class to read ROOT/<split>/<class>/<image>, or --layout "
                "class to take them as classes"
            )
        elif two_level and repeated:
            raise ImporterError(
                f"{root}: the top-level folders {_shown(list(found))} hold only folders, and "
                f"{_shown(repeated)} appear under more than one of them; pass --layout "
                "split/class to read ROOT/<split>/<class>/<image>, or --layout class to take "
                "the top-level folders as classes"
            )
        else:
            layout = "class"
    if layout == "class":
        return layout, [("", t, p) for t, files in found.items() for p in files]
    images = []
    for split, files in found.items():
        for path in files:
            parts = path.relative_to(root).parts
            if len(parts) < 3:
                raise ImporterError(
                    f"{path}: an image directly in the split folder {split!r}; --layout "
                    "split/class reads ROOT/<split>/<class>/<image>"
                )
            images.append((split, parts[1], path))
    return layout, images


def import_imagefolder(
    root: str | Path,
    *,
    attributes: str | Path | None = None,
    spec: TableSpec | None = None,
    layout: str = "auto",
    out: str | Path | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Manifest for ROOT/<class>/**/<image> (label = the class folder's name) or, with the
    split/class layout, ROOT/<split>/<class>/**/<image>.

    attributes: a table (CSV or CelebA layout) joined on `spec.key` (a path relative to ROOT, or
    a file name unique under ROOT) that gives the attributes (default: every plain column; see
    _labels_and_groups), the carried twin:/mask:/box: columns (paths relative to ROOT) and, with
    `spec.split_column`, the split. Its `label` and `split` columns, where present and not the
    source, must agree with the folders. Images without a row get empty attribute cells
    (unknown), reported as a warning.
    """
    spec = spec or TableSpec()
    root = Path(root)
    if layout not in LAYOUTS:
        raise ImporterError(f"--layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    if not root.exists():
        raise ImporterError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ImporterError(f"{root}: not a folder (an ImageFolder root: one folder per class)")
    manifest = _manifest_path(Path(out) if out else None, root, overwrite)
    spec.split_sources(layout=layout == "split/class")  # before scanning: the options conflict
    layout, files = _folder_layout(root, layout)
    sources = spec.split_sources(layout=layout == "split/class")
    if spec.split_column and attributes is None:
        raise ImporterError("--split-column needs --attributes (the table holding the column)")
    used = sorted({c for _, c, _ in files})
    if len(used) < 2:
        what = f"one class ({used[0]!r})" if used else "no images"
        where = (
            "ROOT/<split>/<class>/<image>" if layout == "split/class" else "ROOT/<class>/<image>"
        )
        raise ImporterError(
            f"{root}: {what} in the ImageFolder layout ({where}); a classifier audit needs at "
            "least two class folders with images"
        )
    names = [p.relative_to(root).as_posix() for _, _, p in files]
    labels = [c for _, c, _ in files]
    splits = [s or spec.split for s, _, _ in files]
    frame = pd.DataFrame(
        {"image": [_relative(p, manifest, "image") for _, _, p in files], "label": labels}
    )
    origins = [str(p) for _, _, p in files]
    warnings: list[str] = []
    problems: list[str] = []
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        warnings.append(
            f"{len(loose)} image(s) directly in {root} are in no class folder and left out "
            f"(first: {', '.join(sorted(loose)[:3])})"
        )
    if layout == "split/class":
        cells = set(zip(splits, labels, strict=True))
        warnings += [
            f"split {s!r} has no images of class {c!r}"
            for s in sorted(set(splits))
            for c in used
            if (s, c) not in cells
        ]
    if spec.partition is not None:
        splits, found, notes = _partition_splits(spec.partition, names, origins)
        problems += found
        warnings += notes
    if attributes is not None:
        table = read_attribute_table(attributes)
        matched, notes = _join(table, spec.key, names)
        _unused_split_column(table, spec, sources)
        warnings += notes
        origins = [
            f"{o} ({table.origin(m)})" if m is not None else o
            for o, m in zip(origins, matched, strict=True)
        ]
        columns, found = _labels_and_groups(table, spec, need_label=False, all_columns=True)
        problems += found + _agreement(table, "label", matched, labels, "class folder")
        if spec.split_column:
            splits, found = _table_splits(table, spec, matched, origins)
            problems += found
        elif "split" in table.frame.columns:
            problems += _agreement(table, "split", matched, splits, f"split ({sources[0]})")
        missing = sum(m is None for m in matched)
        if missing:
            warnings.append(
                f"{missing} image(s) have no row in {table.path.name}: attributes unknown"
            )
        for column in columns.columns:
            values = _pick(columns[column], matched)
            frame[column] = _rebase(values, root, manifest) if _is_path_column(column) else values
    frame.insert(2, "split", splits)
    _commit(frame, manifest, origins, root, problems)
    return ImportResult(manifest, len(frame), list(frame.columns), [], warnings, layout)


# -- attribute tables ---------------------------------------------------------------------------
def import_table(
    table: str | Path,
    *,
    spec: TableSpec,
    images: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Manifest from an attribute table: one row per table row.

    images: the folder the key column's paths (and twin:/mask: paths) are relative to (default:
    the table's folder); the manifest goes there unless `out` says otherwise. Label, attributes
    and split as `spec` says (see TableSpec, _labels_and_groups).
    """
    attr = read_attribute_table(table)
    image_dir = Path(images) if images is not None else attr.path.parent
    if not image_dir.is_dir():
        raise ImporterError(f"--images: folder not found: {image_dir}")
    manifest = _manifest_path(Path(out) if out else None, image_dir, overwrite)
    attr.require(spec.key, "--image-column")
    sources = spec.split_sources()
    _unused_split_column(attr, spec, sources)
    columns, problems = _labels_and_groups(attr, spec)
    keys = [v.replace("\\", "/").removeprefix("./") for v in attr.frame[spec.key]]
    origins = [attr.origin(i) for i in range(len(keys))]
    rows = list(range(len(keys)))
    warnings: list[str] = []
    if spec.split_column:
        splits, found = _table_splits(attr, spec, rows, origins)
        problems += found
    elif spec.partition is not None:
        splits, found, warnings = _partition_splits(spec.partition, keys, origins)
        problems += found
    else:
        splits = [spec.split] * len(keys)
    if sources and not spec.split_column and "split" in attr.frame.columns:
        problems += _agreement(attr, "split", rows, splits, f"split ({sources[0]})")
    frame = pd.DataFrame(
        {
            "image": _rebase(list(attr.frame[spec.key]), image_dir, manifest),
            "label": columns.pop("label"),
            "split": splits,
        }
    )
    for column in columns.columns:
        values = list(columns[column])
        frame[column] = _rebase(values, image_dir, manifest) if _is_path_column(column) else values
    _commit(frame, manifest, origins, attr.path, problems)
    return ImportResult(manifest, len(frame), list(frame.columns), [], warnings)


# -- COCO ---------------------------------------------------------------------------------------
def parse_regions(text: str | Mapping[str, Sequence[str | int]]) -> dict[str, list[str]]:
    """'hair=12,face=3,face=4' -> {'hair': ['12'], 'face': ['3', '4']}: region -> category ids or
    names (one region may gather several categories)."""
    if isinstance(text, Mapping):
        return {r: [str(c) for c in cats] for r, cats in text.items()}
    regions: dict[str, list[str]] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        region, sep, category = (s.strip() for s in item.partition("="))
        if not sep or not region or not category:
            raise ImporterError(
                f"--regions: {item.strip()!r} is not REGION=CATEGORY (e.g. hair=12)"
            )
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", region):
            raise ImporterError(f"--regions: region name {region!r}: use letters, digits, _ and -")
        regions.setdefault(region, []).append(category)
    if not regions:
        raise ImporterError("--regions: no region given (e.g. --regions 'hair=12,face=3')")
    return regions


def _load_coco(path: Path) -> dict:
    head = _text_head(path, "a COCO annotation file (JSON)")
    if not head.lstrip().startswith("{"):
        raise ImporterError(f"{path}: not a COCO annotation file (a JSON object expected)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ImporterError(f"{path}: not valid JSON: {error}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ImporterError(f"{path}: not a COCO annotation file: no {key!r} list")
    return data


def _decode_segmentation(segmentation: object, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an (H, W) bool mask."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        polygons = [list(map(float, p)) for p in segmentation]
        if not polygons or any(len(p) < 6 or len(p) % 2 for p in polygons):
            raise ValueError("a polygon needs an even number (>= 6) of coordinates")
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(s) for s in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image's [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise ValueError(f"RLE counts sum to {sum(counts)}, not {height}x{width}")
            rle = coco_mask.frPyObjects(segmentation, height, width)
        elif isinstance(counts, str):
            rle = {"size": size, "counts": counts.encode("ascii")}
        else:
            raise ValueError("RLE counts must be a list or a string")
    else:
        raise ValueError("segmentation must be a list of polygons or an RLE object")
    with warnings.catch_warnings():  # pycocotools' NumPy 2 copy-keyword deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = coco_mask.decode(rle)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    return mask.astype(bool)


def import_coco(
    annotations: str | Path,
    *,
    regions: str | Mapping[str, Sequence[str | int]],
    table: str | Path | None = None,
    spec: TableSpec | None = None,
    images: str | Path | None = None,
    masks_dir: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Manifest and region masks from COCO annotations, labels and attributes from a table.

    regions: REGION=CATEGORY pairs (id or name); every category used by an annotation must be
    mapped. Masks: `<masks_dir>/<region>/<image id>.png` (0 outside, 255 inside the union of the
    region's annotations), masks_dir a new or empty folder (default: `masks` beside the
    annotation file), never over existing files. An image without an annotation of a region
    gets an empty cell. images: the folder `file_name`s (and the table's twin:/mask: paths) are
    relative to (default: the annotation file's folder). The table is joined on `spec.key` (the
    `file_name`, or its unique file name) and must give every image a label; attributes, carried
    columns and the split as `spec` says (see TableSpec). The manifest goes into the deepest
    folder above both the images and the masks unless `out` says otherwise.
    """
    spec = spec or TableSpec()
    path = Path(annotations)
    data = _load_coco(path)
    sources = spec.split_sources()
    if table is None:
        raise ImporterError(
            f"{path}: COCO files carry no class labels: give --table with --label-column or "
            "--label-from"
        )
    image_dir = Path(images) if images is not None else path.parent
    if not image_dir.is_dir():
        raise ImporterError(f"--images: folder not found: {image_dir}")
    masks_root = Path(masks_dir) if masks_dir is not None else path.parent / "masks"
    if masks_root.exists() and (not masks_root.is_dir() or any(masks_root.iterdir())):
        raise ImporterError(
            f"{masks_root} already exists and is not an empty folder; masks are never written "
            "over existing files: choose another --masks-dir"
        )
    default_folder = Path(
        os.path.commonpath([os.path.abspath(image_dir), os.path.abspath(masks_root.parent)])
    )
    manifest = _manifest_path(Path(out) if out else None, default_folder, overwrite)

    categories = {}
    for record in data["categories"]:
        if not isinstance(record, dict) or "id" not in record:
            raise ImporterError(f"{path}: a category without an id: {record!r}")
        categories[str(record["id"])] = str(record.get("name", record["id"]))
    by_name = {name: cid for cid, name in categories.items()}
    region_of: dict[str, str] = {}
    for region, wanted in parse_regions(regions).items():
        for category in wanted:
            cid = category if category in categories else by_name.get(category)
            if cid is None:
                raise ImporterError(
                    f"--regions: {region}={category}: {path.name} has no category {category!r} "
                    f"(categories: {', '.join(f'{n}={i}' for i, n in categories.items())})"
                )
            if region_of.setdefault(cid, region) != region:
                raise ImporterError(
                    f"--regions: category {category} is given to {region_of[cid]!r} and {region!r}"
                )
    region_names = sorted(set(region_of.values()))

    records: dict[str, dict] = {}
    for record in data["images"]:
        if not isinstance(record, dict) or not {"id", "file_name", "width", "height"} <= set(
            record
        ):
            raise ImporterError(
                f"{path}: an image record without id, file_name, width and height: {record!r:.120}"
            )
        if str(record["id"]) in records:
            raise ImporterError(f"{path}: image id {record['id']} is listed twice")
        records[str(record["id"])] = record
    if not records:
        raise ImporterError(f"{path}: no images")
    ids = list(records)

    def origin(image_id: str) -> str:
        return f"{path.name} image id {image_id} ({records[image_id]['file_name']})"

    problems: list[str] = []
    unmapped: dict[str, int] = {}
    by_image: dict[tuple[str, str], list[dict]] = {}
    for record in data["annotations"]:
        aid = record.get("id", "?") if isinstance(record, dict) else "?"
        if not isinstance(record, dict) or "segmentation" not in record:
            problems.append(f"{path.name} annotation id {aid}: no segmentation")
            continue
        image_id, cid = str(record.get("image_id")), str(record.get("category_id"))
        if image_id not in records:
            problems.append(f"{path.name} annotation id {aid}: unknown image_id {image_id}")
            continue
        if cid not in region_of:
            unmapped[cid] = unmapped.get(cid, 0) + 1
            continue
        by_image.setdefault((image_id, region_of[cid]), []).append(record)
    if unmapped:
        named = ", ".join(
            f"{categories.get(c, 'unknown category')}={c} ({n} annotation(s))"
            for c, n in sorted(unmapped.items())
        )
        raise ImporterError(
            f"{path}: categories not in --regions: {named}; map each to a region "
            "(e.g. --regions 'hair=12,...')"
        )

    # labels and attributes, joined on the file name
    names = [str(records[i]["file_name"]).replace("\\", "/") for i in ids]
    origins = [origin(i) for i in ids]
    images_rel = [_relative(image_dir / name, manifest, "image") for name in names]
    attr = read_attribute_table(table)
    matched, warnings = _join(attr, spec.key, names)
    _unused_split_column(attr, spec, sources)
    columns, table_problems = _labels_and_groups(attr, spec)
    clash = [c for c in columns.columns if c.startswith("mask:") and c[5:] in region_names]
    if clash:
        raise ImporterError(
            f"{attr.path}: column {clash[0]!r} and --regions both give the masks of "
            f"{clash[0][5:]!r}: drop one"
        )
    problems += table_problems
    for position, row in enumerate(matched):
        if row is None:
            problems.append(f"{origins[position]}: no row in {attr.path.name} (no label)")
    if spec.split_column:
        splits, found = _table_splits(attr, spec, matched, origins)
        problems += [p for p in found if "no row in" not in p]  # already named above
    elif spec.partition is not None:
        splits, found, notes = _partition_splits(spec.partition, names, origins)
        problems += found
        warnings += notes
    else:
        splits = [spec.split] * len(ids)
    if sources and not spec.split_column:
        problems += _agreement(attr, "split", matched, splits, f"split ({sources[0]})")
    frame = pd.DataFrame({"image": images_rel, "label": _pick(columns.pop("label"), matched)})
    frame["split"] = splits
    for column in columns.columns:
        values = _pick(columns[column], matched)
        frame[column] = _rebase(values, image_dir, manifest) if _is_path_column(column) else values

    # decode every mask before writing any
    masks: dict[tuple[str, str], np.ndarray] = {}
    for (image_id, region), anns in by_image.items():
        record = records[image_id]
        height, width = int(record["height"]), int(record["width"])
        union = np.zeros((height, width), bool)
        for ann in anns:
            try:
                union |= _decode_segmentation(ann["segmentation"], height, width)
            except (ValueError, TypeError, OverflowError) as error:
                problems.append(
                    f"{path.name} annotation id {ann.get('id', '?')} (image id {image_id}): "
                    f"bad segmentation: {error}"
                )
        masks[image_id, region] = union
    if problems:
        raise ImportProblems(path, problems)

    written: list[Path] = []
    made = [] if masks_root.exists() else [masks_root]
    try:
        for region in region_names:
            column = []
            for image_id in ids:
                mask = masks.get((image_id, region))
                if mask is None:
                    column.append("")
                    continue
                target = masks_root / region / f"{image_id}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.parent not in made:
                    made.append(target.parent)
                with open(target, "xb") as handle:  # never over an existing file
                    written.append(target)
                    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(
                        handle, format="PNG"
                    )
                column.append(_relative(target, manifest, "mask"))
            frame[f"mask:{region}"] = column
        _commit(frame, manifest, origins, path, problems)
    except BaseException:  # remove the masks written, and the folders made for them
        for file in written:
            file.unlink(missing_ok=True)
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return ImportResult(manifest, len(frame), list(frame.columns), written, warnings)

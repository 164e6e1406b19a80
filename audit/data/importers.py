"""Importers: write a manifest for data in common layouts, beside the data, touching nothing else.

- `import_imagefolder(ROOT)`: torchvision's ImageFolder layout (class = top-level folder name,
  images at any depth below it), optionally joined with an attribute table.
- `import_table(TABLE)`: an attribute table - CSV (FairFace, UTKFace-as-CSV style) or CelebA's
  whitespace layout (`list_attr_celeba.txt`: a count, the attribute names, then `file v1 v2 ...`
  with -1/1) - with the label and protected attributes taken from its columns.
- `import_coco(ANNOTATIONS.json)`: COCO instance annotations (polygons, uncompressed and compressed
  RLE) turned into one mask PNG per image and region, in a new folder beside the file; labels and
  attributes from a joined table.

Manifest columns written: `image`, `label`, `split`, one `group:<attribute>` per protected
attribute, one `mask:<region>` per region. Paths are relative to the manifest's folder, which must
lie above every file it names.

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


# -- labels and attributes ----------------------------------------------------------------------
def _labels_and_groups(
    table: AttributeTable,
    *,
    label_column: str | None,
    label_from: str | None,
    group_columns: Sequence[str],
    group_from: Sequence[str],
    need_label: bool = True,
) -> tuple[pd.DataFrame, list[str]]:
    """The label and `group:<attribute>` columns read from a table, and the problems found."""
    frame = table.frame
    origins = [table.origin(i) for i in range(len(frame))]
    problems: list[str] = []
    out = pd.DataFrame(index=frame.index)
    if label_column and label_from:
        raise ImporterError("give --label-column or --label-from, not both")
    if label_column:
        table.require(label_column, "--label-column")
        out["label"] = frame[label_column]
    elif label_from:
        spec = BinaryAttribute.parse(label_from, "--label-from")
        table.require(spec.column, "--label-from")
        out["label"] = spec.convert(frame[spec.column], origins, problems)
    elif need_label:
        raise ImporterError("give --label-column (a column of class names) or --label-from ATTR")
    for column in group_columns:
        table.require(column, "--group-columns")
        _add_group(out, column, frame[column])
    for spec_text in group_from:
        spec = BinaryAttribute.parse(spec_text, "--group-from")
        table.require(spec.column, "--group-from")
        _add_group(out, spec.name, spec.convert(frame[spec.column], origins, problems))
    return out, problems


def _add_group(out: pd.DataFrame, name: str, values: pd.Series) -> None:
    if ":" in name or not name:
        raise ImporterError(f"attribute name {name!r}: must be non-empty and without ':'")
    column = f"group:{name}"
    if column in out.columns:
        raise ImporterError(f"attribute {name!r} is given twice")
    out[column] = values


def _join(
    table: AttributeTable,
    key: str,
    images: Sequence[str],
    option: str = "--key",
) -> tuple[list[int | None], list[str]]:
    """For each image path (posix, relative), the table row whose `key` names it, or None.

    A key matches an image by its relative path, or by its file name when that name is unique
    among the images. Returns the row positions and warnings (rows that match no image).
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
    warnings = []
    if unmatched:
        warnings.append(
            f"{len(unmatched)} row(s) of {table.path.name} match no image "
            f"(first: {', '.join(unmatched[:3])})"
        )
    return matched, warnings


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
def import_imagefolder(
    root: str | Path,
    *,
    attributes: str | Path | None = None,
    key: str = "image",
    group_columns: Sequence[str] | str | None = None,
    group_from: Sequence[str] = (),
    split: str = "",
    out: str | Path | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Manifest for ROOT/<class>/**/<image>: label = the class folder's name.

    attributes: a table (CSV or CelebA layout) joined on `key` (a path relative to ROOT, or a
    file name unique under ROOT); `group_columns` (default: every column but the key) become
    `group:<column>`, `group_from` binary attributes (see BinaryAttribute). Images without a row
    get empty attribute cells (unknown), reported as a warning.
    """
    root = Path(root)
    if not root.exists():
        raise ImporterError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ImporterError(f"{root}: not a folder (an ImageFolder root: one folder per class)")
    manifest = _manifest_path(Path(out) if out else None, root, overwrite)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[str, Path]] = []
    for name in classes:
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        files += [(name, p) for p in found]
    used = sorted({c for c, _ in files})
    if len(used) < 2:
        what = f"one class ({used[0]!r})" if used else "no images"
        raise ImporterError(
            f"{root}: {what} in the ImageFolder layout (ROOT/<class>/<image>); a classifier "
            "audit needs at least two class folders with images"
        )
    images = [_relative(p, manifest, "image") for _, p in files]
    frame = pd.DataFrame({"image": images, "label": [c for c, _ in files], "split": split})
    origins = [str(p) for _, p in files]
    warnings: list[str] = []
    problems: list[str] = []
    if attributes is not None:
        table = read_attribute_table(attributes)
        names = [p.relative_to(root).as_posix() for _, p in files]
        matched, warnings = _join(table, key, names)
        columns = parse_columns(group_columns)
        if group_columns is None and not group_from:
            columns = [c for c in table.frame.columns if c != key]
        groups, problems = _labels_and_groups(
            table,
            label_column=None,
            label_from=None,
            group_columns=columns,
            group_from=group_from,
            need_label=False,
        )
        missing = sum(m is None for m in matched)
        if missing:
            warnings.append(
                f"{missing} image(s) have no row in {table.path.name}: attributes unknown"
            )
        for column in groups.columns:
            frame[column] = [groups[column].iloc[m] if m is not None else "" for m in matched]
    _commit(frame, manifest, origins, root, problems)
    return ImportResult(manifest, len(frame), list(frame.columns), [], warnings)


# -- attribute tables ---------------------------------------------------------------------------
def import_table(
    table: str | Path,
    *,
    image_column: str = "image",
    label_column: str | None = None,
    label_from: str | None = None,
    group_columns: Sequence[str] | str | None = None,
    group_from: Sequence[str] = (),
    split_column: str | None = None,
    split: str = "",
    images: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Manifest from an attribute table: one row per table row.

    images: the folder the image column's paths are relative to (default: the table's folder);
    the manifest goes there unless `out` says otherwise. Label from `label_column` or the binary
    `label_from`; attributes from `group_columns` (values as written) and `group_from`; split
    from `split_column` or the constant `split`.
    """
    attr = read_attribute_table(table)
    image_dir = Path(images) if images is not None else attr.path.parent
    if not image_dir.is_dir():
        raise ImporterError(f"--images: folder not found: {image_dir}")
    manifest = _manifest_path(Path(out) if out else None, image_dir, overwrite)
    attr.require(image_column, "--image-column")
    columns, problems = _labels_and_groups(
        attr,
        label_column=label_column,
        label_from=label_from,
        group_columns=parse_columns(group_columns),
        group_from=group_from,
    )
    if split_column:
        attr.require(split_column, "--split-column")
        split_values = attr.frame[split_column]
    else:
        split_values = pd.Series(split, index=attr.frame.index)
    root = manifest.parent.resolve()
    # relative to the manifest's folder; one outside it keeps its '..' and the validator names it
    image_paths = [
        Path(os.path.relpath(os.path.abspath(image_dir / value), root)).as_posix() if value else ""
        for value in attr.frame[image_column]
    ]
    frame = pd.DataFrame(
        {"image": image_paths, "label": columns.pop("label"), "split": split_values}
    )
    for column in columns.columns:
        frame[column] = columns[column]
    origins = [attr.origin(i) for i in range(len(frame))]
    _commit(frame, manifest, origins, attr.path, problems)
    return ImportResult(manifest, len(frame), list(frame.columns))


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
    key: str = "image",
    label_column: str | None = None,
    label_from: str | None = None,
    group_columns: Sequence[str] | str | None = None,
    group_from: Sequence[str] = (),
    split: str = "",
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
    gets an empty cell. images: the folder `file_name`s are relative to (default: the annotation
    file's folder). The table is joined on `key` (the `file_name`, or its unique file name) and
    must give every image a label. The manifest goes into the deepest folder above both the
    images and the masks unless `out` says otherwise.
    """
    path = Path(annotations)
    data = _load_coco(path)
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
    frame = pd.DataFrame({"image": [""] * len(ids), "label": "", "split": split})
    for position, name in enumerate(names):
        frame.loc[position, "image"] = _relative(image_dir / name, manifest, "image")
    attr = read_attribute_table(table)
    matched, warnings = _join(attr, key, names)
    columns, table_problems = _labels_and_groups(
        attr,
        label_column=label_column,
        label_from=label_from,
        group_columns=parse_columns(group_columns),
        group_from=group_from,
    )
    problems += table_problems
    for position, row in enumerate(matched):
        if row is None:
            problems.append(f"{origin(ids[position])}: no row in {attr.path.name} (no label)")
    for column in columns.columns:
        frame[column] = [columns[column].iloc[m] if m is not None else "" for m in matched]

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
        origins = [origin(i) for i in ids]
        _commit(frame, manifest, origins, path, problems)
    except BaseException:  # remove the masks written, and the folders made for them
        for file in written:
            file.unlink(missing_ok=True)
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return ImportResult(manifest, len(frame), list(frame.columns), written, warnings)

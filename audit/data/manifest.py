"""The manifest format: one CSV row per image with label, group, split, region masks/boxes, twin.

`read_manifest` validates the whole file and reports every problem at once, with line numbers
(line 1 is the header), before anything else reads the data. Nothing on disk is modified.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import pandas as pd
from PIL import Image, ImageFile

CORE_COLUMNS = ("image", "label", "group", "split", "twin")
REGION_PREFIXES = ("mask", "box")


class ManifestError(ValueError):
    """A manifest with problems; `problems` lists each as one line naming the row and column."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        super().__init__(f"{path}: {len(problems)} problem(s): {shown}")


class EmptySplitError(ValueError):
    """A split asked for by name that has no rows in the manifest."""


@dataclass
class Manifest:
    """A validated manifest: its table (strings, empty cells as ""), folder and region names."""

    path: Path
    table: pd.DataFrame
    regions: list[str]

    @property
    def root(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path:
        return self.root / relative

    def split(self, name: str | None) -> pd.DataFrame:
        """Rows of one split (all rows for None); raises if the split is empty."""
        if name is None:
            return self.table
        rows = self.table[self.table["split"] == name]
        if rows.empty:
            known = sorted(set(self.table["split"]) - {""})
            raise EmptySplitError(
                f"{self.path}: split {name!r} has no rows (splits: {', '.join(known) or 'none'})"
            )
        return rows

    def checksum(self) -> str:
        """SHA-256 over the manifest and every file it references, in order: the data set's identity."""
        digest = hashlib.sha256(self.path.read_bytes())
        columns = [c for c in self.table.columns if c in ("image", "twin") or c.startswith("mask:")]
        for value in self.table[columns].to_numpy().ravel():
            if value:
                digest.update(value.encode("utf-8") + b"\0")
                digest.update(hashlib.sha256(self.resolve(value).read_bytes()).digest())
        return digest.hexdigest()

    @property
    def extra_columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in CORE_COLUMNS and not _region_column(c)]


def _region_column(column: str) -> tuple[str, str] | None:
    kind, sep, region = column.partition(":")
    if sep and kind in REGION_PREFIXES and region:
        return kind, region
    return None


def _looks_like_region_typo(column: str) -> str | None:
    """The column a misspelt header probably meant (e.g. 'mask_hair', 'msk:hair', 'lable')."""
    match = re.match(r"^\s*([A-Za-z]+)\s*[:_\-. ]\s*(\S.*)$", column)
    if match:
        prefixes = ("mask", "masks", "box", "boxes", "bbox")
        close = difflib.get_close_matches(match.group(1).lower(), prefixes, n=1, cutoff=0.7)
        if close:
            kind = "box" if close[0].startswith("b") else "mask"
            return f"{kind}:{match.group(2).strip()}"
    close = difflib.get_close_matches(column.strip().lower(), CORE_COLUMNS, n=1, cutoff=0.75)
    return close[0] if close else None


def _unsafe_path(value: str) -> str | None:
    if (
        PurePosixPath(value).is_absolute()
        or PureWindowsPath(value).is_absolute()
        or value.startswith("~")
    ):
        return "is an absolute path; paths must be relative to the manifest's folder"
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        return "leaves the manifest's folder ('..')"
    return None


@contextmanager
def strict_decoding() -> Iterator[None]:
    """Make Pillow refuse truncated files, whatever another library set globally.

    WeasyPrint sets `ImageFile.LOAD_TRUNCATED_IMAGES = True` when imported, which would let a
    truncated image through validation in any process that has rendered a PDF.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a fully decodable image; raises OSError for unreadable or truncated files."""
    with warnings.catch_warnings(), strict_decoding():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            return image.size


def parse_box(value: str) -> tuple[float, float, float, float]:
    """Parse 'x0 y0 x1 y1' (pixels, end-exclusive); raise ValueError when it is not four numbers."""
    parts = value.replace(",", " ").split()
    if len(parts) != 4:
        raise ValueError("must be four numbers 'x0 y0 x1 y1'")
    x0, y0, x1, y1 = (float(p) for p in parts)
    return x0, y0, x1, y1


def read_manifest(path: str | Path, *, check_files: bool = True) -> Manifest:
    """Load and validate a manifest; raise ManifestError listing every problem found."""
    path = Path(path)
    problems = validate(path, check_files=check_files)
    if problems:
        raise ManifestError(path, problems)
    return _load(path)


def _read_table(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=False)
    table.columns = [str(c).strip() for c in table.columns]
    for column in table.columns:
        table[column] = table[column].str.strip()
    for column in ("group", "split", "twin"):
        if column not in table.columns:
            table[column] = ""
    return table


def _load(path: Path) -> Manifest:
    table = _read_table(path)
    regions = sorted({r[1] for c in table.columns if (r := _region_column(c))})
    return Manifest(path=path, table=table, regions=regions)


def validate(path: str | Path, *, check_files: bool = True) -> list[str]:
    """Every problem of a manifest, one line each, naming the line (header = line 1) and column."""
    path = Path(path)
    if not path.is_file():
        return [f"manifest not found: {path}"]
    try:
        table = _read_table(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [f"not a readable CSV file: {first}"]
    problems: list[str] = []
    for column in ("image", "label"):
        if column not in table.columns:
            problems.append(f"missing required column {column!r}")
    for column in table.columns:
        if column in CORE_COLUMNS or _region_column(column):
            continue
        meant = _looks_like_region_typo(column)
        if meant:
            problems.append(f"column {column!r} is not a known column; did you mean {meant!r}?")
    if problems:
        return problems
    root = path.parent.resolve()
    sizes: dict[str, tuple[int, int] | None] = {}

    def check_file(
        line: int, column: str, value: str, expected_size: tuple[int, int] | None
    ) -> tuple[int, int] | None:
        unsafe = _unsafe_path(value)
        if unsafe:
            problems.append(f"line {line}, {column}: {value!r} {unsafe}")
            return None
        full = (root / value).resolve()
        if not full.is_relative_to(root):
            problems.append(f"line {line}, {column}: {value!r} leaves the manifest's folder")
            return None
        if not check_files:
            return None
        if not full.is_file():
            problems.append(f"line {line}, {column}: file not found: {value}")
            return None
        if value not in sizes:
            try:
                sizes[value] = _image_size(full)
            except (OSError, SyntaxError, Image.DecompressionBombWarning, ValueError) as error:
                sizes[value] = None
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                problems.append(
                    f"line {line}, {column}: unreadable or truncated image {value}: {reason}"
                )
        size = sizes[value]
        if size is not None and expected_size is not None and size != expected_size:
            problems.append(
                f"line {line}, {column}: {value} is {size[0]}x{size[1]} but the image is "
                f"{expected_size[0]}x{expected_size[1]}"
            )
        return size

    duplicated_rows = table.duplicated(keep="first")
    first_line = {}
    for index, row in enumerate(table.itertuples(index=False)):
        line = index + 2
        values = dict(zip(table.columns, row, strict=True))
        if duplicated_rows.iloc[index]:
            problems.append(f"line {line}: duplicate of an earlier row")
            continue
        if not values["label"]:
            problems.append(f"line {line}, label: empty label")
        image = values["image"]
        if not image:
            problems.append(f"line {line}, image: empty image path")
            continue
        key = (image, values.get("split", ""))
        if key in first_line:
            problems.append(
                f"line {line}, image: {image} is listed twice in split {key[1]!r} (also line {first_line[key]})"
            )
        first_line.setdefault(key, line)
        size = check_file(line, "image", image, None)
        if values.get("twin"):
            check_file(line, "twin", values["twin"], size)
        for column, value in values.items():
            kind_region = _region_column(column)
            if not kind_region or not value:
                continue
            if kind_region[0] == "mask":
                check_file(line, column, value, size)
                continue
            try:
                x0, y0, x1, y1 = parse_box(value)
            except ValueError as error:
                problems.append(f"line {line}, {column}: {value!r} {error}")
                continue
            if x1 <= x0 or y1 <= y0:
                problems.append(f"line {line}, {column}: box {value!r} has x1<=x0 or y1<=y0")
            elif size is not None and (x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]):
                problems.append(
                    f"line {line}, {column}: box {value!r} lies outside the {size[0]}x{size[1]} image"
                )
    if table.empty:
        problems.append("the manifest has no rows")
    return problems

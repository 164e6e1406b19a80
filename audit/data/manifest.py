"""The manifest format: one CSV row per image with label, protected attributes, split, regions, twins.

Columns (paths are relative to the manifest's folder and may not leave it):

- `image`, `label` (required); `split` (e.g. train, val, test); any other column is kept as extra.
- Protected attributes: any number of `group:<attribute>` columns (`group:sex`, `group:age`,
  `group:skin_tone`), in the order they should be reported. A plain `group` column is the
  one-attribute shorthand: without `group:<attribute>` columns it is the attribute named "group".
  Given beside `group:<attribute>` columns it is only a compatibility copy of the first one and must
  equal it on every row (a row where they differ is an error), so tools that read `group` see the
  first attribute. An empty cell means "not known" for that image.
- Counterfactual twins: `twin:<attribute>` holds an image of the same scene with only that attribute
  changed; it needs a `group:<attribute>` column. A plain `twin` column is the twin for the first
  (or only) attribute; beside `twin:<first>` it must equal it on every row.
- Regions: `mask:<region>` (a mask image of the image's size, nonzero inside) and `box:<region>`
  (`x0 y0 x1 y1` in pixels, end-exclusive).

`read_manifest` validates the whole file and reports every problem at once, with line numbers
(line 1 is the header), before anything else reads the data. Nothing on disk is modified. The loaded
`Manifest` names its attributes (`attributes`, `group_column`, `twin_columns`); for code that knows
one attribute, `table["group"]` and `table["twin"]` always hold the first attribute and its twin.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import pandas as pd
from PIL import Image

from audit.data.images import (
    UnsupportedImageError,
    oriented_size,
    read_mask,
    read_pixels,
    strict_decoding,
)

CORE_COLUMNS = ("image", "label", "group", "split", "twin")
REGION_PREFIXES = ("mask", "box")
ATTRIBUTE_PREFIXES = ("group", "twin")
SHORTHAND = "group"  # the attribute's name when only the plain `group` column is given


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
    """A validated manifest: its table (strings, empty cells as ""), folder, regions and attributes.

    `attributes` are the protected attributes in column order (["group"] for the shorthand);
    `attribute_columns` maps each to its column and `twin_columns` each attribute that has
    counterfactual twins to the column holding them. `table["group"]` and `table["twin"]` hold the
    first attribute's value and twin whatever the file's layout.
    """

    path: Path
    table: pd.DataFrame
    regions: list[str]
    attributes: list[str] = field(default_factory=lambda: [SHORTHAND])
    attribute_columns: dict[str, str] = field(default_factory=lambda: {SHORTHAND: "group"})
    twin_columns: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None  # the folder the paths are relative to; None: the manifest's own

    def group_column(self, attribute: str) -> str:
        """The column holding one attribute's values; ManifestError (one line) for an unknown one."""
        if attribute not in self.attribute_columns:
            known = ", ".join(self.attributes) or "none"
            raise ManifestError(self.path, [f"no attribute {attribute!r} (attributes: {known})"])
        return self.attribute_columns[attribute]

    @property
    def root(self) -> Path:
        return self.folder if self.folder is not None else self.path.parent

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
        columns = [
            c
            for c in self.table.columns
            if c in ("image", "twin") or c.startswith(("mask:", "twin:"))
        ]
        root = str(self.root)
        for value in self.table[columns].to_numpy().ravel():
            if value:
                digest.update(value.encode("utf-8") + b"\0")
                with open(os.path.join(root, value), "rb") as file:
                    digest.update(hashlib.sha256(file.read()).digest())
        return digest.hexdigest()

    @property
    def extra_columns(self) -> list[str]:
        return [
            c
            for c in self.table.columns
            if c not in CORE_COLUMNS and not _region_column(c) and not _attribute_column(c)
        ]


def _region_column(column: str) -> tuple[str, str] | None:
    kind, sep, region = column.partition(":")
    if sep and kind in REGION_PREFIXES and region:
        return kind, region
    return None


def _attribute_column(column: str) -> tuple[str, str] | None:
    """('group' or 'twin', attribute) for a `group:<attribute>` or `twin:<attribute>` header.

    The attribute may be empty here (validation reports it); surrounding spaces are dropped.
    """
    kind, sep, attribute = column.partition(":")
    if sep and kind in ATTRIBUTE_PREFIXES:
        return kind, attribute.strip()
    return None


def _attributes(columns: list[str]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Attributes in column order, the column of each, and the twin column of each that has one.

    Columns with an empty attribute name, and twins of an attribute without a column, are left out
    (validation reports them).
    """
    parsed = [(a, c) for c in columns if (a := _attribute_column(c)) and a[1]]
    groups = [(a[1], c) for a, c in parsed if a[0] == "group"]
    twins = {a[1]: c for a, c in parsed if a[0] == "twin"}
    attribute_columns: dict[str, str] = {}
    for attribute, column in groups:
        attribute_columns.setdefault(attribute, column)
    attribute_columns = attribute_columns or {SHORTHAND: "group"}
    attributes = list(attribute_columns)
    twin_columns = {a: c for a, c in twins.items() if a in attribute_columns}
    if "twin" in columns and attributes[0] not in twin_columns:
        twin_columns = {attributes[0]: "twin", **twin_columns}
    return attributes, attribute_columns, twin_columns


def _header(path: Path) -> list[str]:
    """The header as written (pandas renames repeated names, which would hide them)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return [c.strip() for c in next(csv.reader(handle), [])]


def _header_problems(header: list[str]) -> list[str]:
    """Empty attribute names and twins of attributes that have no `group:<attribute>` column."""
    problems = []
    attributes = [a[1] for c in header if (a := _attribute_column(c)) and a[0] == "group"]
    for column in header:
        parsed = _attribute_column(column)
        if parsed is None:
            continue
        kind, attribute = parsed
        if not attribute:
            problems.append(
                f"column {column!r} has an empty attribute name; write {kind}:<attribute>, "
                f"e.g. {kind}:sex"
            )
        elif kind == "twin" and attribute not in attributes:
            known = ", ".join(attributes) or "none"
            problems.append(
                f"column {column!r} gives twins for attribute {attribute!r}, which has no "
                f"'group:{attribute}' column (attributes: {known})"
            )
    named = [a for a in attributes if a]
    for attribute in sorted({a for a in named if named.count(a) > 1}):
        problems.append(f"attribute {attribute!r} is given by more than one group: column")
    return problems


def _looks_like_region_typo(column: str) -> str | None:
    """The column a misspelt header probably meant (e.g. 'mask_hair', 'msk:hair', 'lable')."""
    attribute = re.match(r"^\s*([A-Za-z]+)\s*:\s*(\S.*)$", column)
    if attribute:
        close = difflib.get_close_matches(
            attribute.group(1).lower(), ("group", "groups", "twin", "twins"), n=1, cutoff=0.6
        )
        if close:
            return f"{close[0].rstrip('s')}:{attribute.group(2).strip()}"
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
    # String tests first: pathlib's parsing cost more than the rest of a header-only check.
    if value.startswith(("/", "\\", "~")) or (
        ":" in value and PureWindowsPath(value).is_absolute()
    ):
        return "is an absolute path; paths must be relative to the manifest's folder"
    if ".." in value.replace("\\", "/").split("/"):
        return "leaves the manifest's folder ('..')"
    return None


class _RealPaths:
    """Where a manifest path really points, with each folder's real path looked up once.

    Same answer as `Path.resolve()` (symbolic links followed, in the folders and for the file
    itself) at a fraction of its cost on a set of many files in few folders."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.folders: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        folder, name = os.path.split(os.path.join(self.root, value))
        real = self.folders.get(folder)
        if real is None:
            real = self.folders[folder] = os.path.realpath(folder)
        candidate = os.path.join(real, name)
        return os.path.realpath(candidate) if os.path.islink(candidate) else candidate

    def inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (its CRC checked), or None where the file is not a
    PNG with a well-formed IHDR or is larger than Pillow allows: Pillow then decides. With the
    folder cache below it brought the demo's header check from 4-5 s to 1 s of CPU."""
    with open(path, "rb") as file:
        head = file.read(33)
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[8:16] != b"\x00\x00\x00\rIHDR":
        return None
    if zlib.crc32(head[12:29]) != int.from_bytes(head[29:33], "big"):
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    limit = Image.MAX_IMAGE_PIXELS
    if width == 0 or height == 0 or (limit is not None and width * height > limit):
        return None
    return width, height


def _image_size(path: str | Path, decode: bool = True, mask: bool = False) -> tuple[int, int]:
    """(width, height) of an image as the audit reads it (EXIF orientation applied); raises OSError
    for an unreadable file, and with `decode` (the whole file decoded by audit.data.images, as the
    audit will, as a mask with `mask`) for a truncated one or pixels it refuses (ValueError)."""
    if decode:
        pixels = read_mask(path) if mask else read_pixels(path)
        return pixels.shape[1], pixels.shape[0]
    if (size := _png_header_size(path)) is not None:
        return size
    with warnings.catch_warnings(), strict_decoding():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return oriented_size(image)


def parse_box(value: str) -> tuple[float, float, float, float]:
    """Parse 'x0 y0 x1 y1' (pixels, end-exclusive); raise ValueError when it is not four numbers."""
    parts = value.replace(",", " ").split()
    if len(parts) != 4:
        raise ValueError("must be four numbers 'x0 y0 x1 y1'")
    x0, y0, x1, y1 = (float(p) for p in parts)
    return x0, y0, x1, y1


def read_manifest(
    path: str | Path,
    *,
    check_files: bool = True,
    decode: bool = True,
    root: str | Path | None = None,
) -> Manifest:
    """Load and validate a manifest; raise ManifestError listing every problem found.

    `decode=False` reads only the images' headers (existence, format, size), not their pixels: an
    audit run decodes every image anyway, and names a file that fails then with its manifest line
    (stopping, or skipping it with --skip-bad-images), so the run does not decode the set twice.
    `root`: the folder the paths are relative to, when not the manifest's own (a manifest the
    Python API wrote from a DataFrame into the run folder).
    """
    path = Path(path)
    problems = validate(path, check_files=check_files, decode=decode, root=root)
    if problems:
        raise ManifestError(path, problems)
    manifest = _load(path)
    if root is not None:
        manifest.folder = Path(root)
    return manifest


def _read_raw(path: Path) -> pd.DataFrame:
    """The cells as written (headers stripped of surrounding spaces, cells not)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=False)
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _read_table(path: Path, raw: pd.DataFrame | None = None) -> pd.DataFrame:
    table = (_read_raw(path) if raw is None else raw).copy()
    for column in table.columns:
        table[column] = table[column].str.strip()
    for column in ("group", "split", "twin"):
        if column not in table.columns:
            table[column] = ""
    return table


def _load(path: Path) -> Manifest:
    header = _header(path)
    table = _read_table(path)
    regions = sorted({r[1] for c in table.columns if (r := _region_column(c))})
    attributes, attribute_columns, twin_columns = _attributes(header)
    first = attributes[0]
    table["group"] = table[attribute_columns[first]]
    table["twin"] = table[twin_columns[first]] if first in twin_columns else ""
    return Manifest(
        path=path,
        table=table,
        regions=regions,
        attributes=attributes,
        attribute_columns=attribute_columns,
        twin_columns=twin_columns,
    )


def _turned_note(path: str, upright: tuple[int, int]) -> str:
    """' upright (its EXIF orientation turns ...)' where the image's file stores it turned, else ''."""
    try:
        with Image.open(path) as image:
            stored = image.size
    except (OSError, SyntaxError, ValueError):
        return ""
    if stored == upright:
        return ""
    return (
        f" upright (its EXIF orientation turns the {stored[0]}x{stored[1]} pixels the file stores)"
    )


def _not_utf8(path: Path) -> str:
    """The first line of a file that is not UTF-8, its offending byte, and how to re-save it."""
    data = path.read_bytes()
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            shown = line.decode("utf-8", errors="replace").strip()
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return (
                f"line {number} is not UTF-8 (byte 0x{line[error.start]:02X} at byte "
                f"{error.start + 1} of the line: {shown!r}); re-save the file as UTF-8 (a "
                "spreadsheet's 'CSV UTF-8' format, or `iconv -f cp1252 -t utf-8 old.csv > "
                "new.csv` when it came from Windows)"
            )
    return "not UTF-8"  # not reached: pandas found an undecodable byte somewhere


def _lines(positions: pd.Index | list[int], shown: int = 3) -> str:
    """'lines 2, 5, 9 and 4 more' for row positions (line = position + 2)."""
    lines = [str(p + 2) for p in positions]
    more = f" and {len(lines) - shown} more" if len(lines) > shown else ""
    return f"line{'s' if len(lines) > 1 else ''} {', '.join(lines[:shown])}{more}"


def _spelling_problems(values: pd.Series, column: str) -> list[str]:
    """Values of one column that differ only by case or surrounding spaces ('Doctor ', 'doctor'):
    one line per such set, each spelling with the lines it is on."""
    values = values.reset_index(drop=True)
    keys = values.str.strip().str.casefold()
    spellings = values[keys != ""].groupby(keys[keys != ""], sort=True).unique()
    problems = []
    for variants in spellings[spellings.map(len) > 1]:
        where = "; ".join(
            f"{v!r} on {_lines(values.index[values == v].tolist())}" for v in sorted(variants)
        )
        problems.append(
            f"{column}: {where}: these differ only by case or surrounding spaces; write one "
            "spelling (as they are, they would be separate "
            f"{'classes' if column == 'label' else 'groups'} or merged without notice)"
        )
    return problems


def unseen_classes(train: pd.DataFrame, evaluated: pd.DataFrame) -> dict[str, str]:
    """Labels of the evaluated rows that no training row has, each with its manifest lines
    ('lines 40, 41 and 3 more'): a model never trained on a class cannot predict it."""
    missing = sorted(set(evaluated["label"]) - set(train["label"]))
    return {
        label: _lines(evaluated.index[evaluated["label"] == label].tolist()) for label in missing
    }


def one_valued(rows: pd.DataFrame, columns: dict[str, str]) -> dict[str, list[str]]:
    """Attributes (name -> column) with fewer than two known values in `rows`, with those values:
    no group can be compared with another, so they carry no fairness figure or gate."""
    out = {}
    for attribute, column in columns.items():
        known = sorted(set(rows[column]) - {""})
        if len(known) < 2:
            out[attribute] = known
    return out


def validate(
    path: str | Path,
    *,
    check_files: bool = True,
    decode: bool = True,
    root: str | Path | None = None,
) -> list[str]:
    """Every problem of a manifest, one line each, naming the line (header = line 1) and column.

    With `decode` every image is decoded in full, so truncated files are found too; without it
    only their headers are read. Paths are relative to `root` (default: the manifest's folder)."""
    path = Path(path)
    if not path.is_file():
        return [f"manifest not found: {path}"]
    try:
        raw = _read_raw(path)
    except UnicodeDecodeError:
        return [_not_utf8(path)]
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [f"not a readable CSV file: {first}"]
    table = _read_table(path, raw)
    problems: list[str] = []
    for column in ("image", "label"):
        if column not in table.columns:
            problems.append(f"missing required column {column!r}")
    header = _header(path)
    repeated = [c for i, c in enumerate(header) if c in header[:i]]
    for column in dict.fromkeys(repeated):
        where = [str(i) for i, c in enumerate(header, start=1) if c == column]
        problems.append(f"column {column!r} appears more than once (columns {', '.join(where)})")
    for column in table.columns:
        if column in CORE_COLUMNS or _region_column(column) or _attribute_column(column):
            continue
        meant = _looks_like_region_typo(column)
        if meant:
            problems.append(f"column {column!r} is not a known column; did you mean {meant!r}?")
    if problems:
        return problems
    problems += _header_problems(header)
    spelled = ["label", *(c for c in raw.columns if c == "group" or c.startswith("group:"))]
    for column in spelled:
        problems += _spelling_problems(raw[column], column)
    real_path = _RealPaths(str(Path(root if root is not None else path.parent).resolve()))
    sizes: dict[tuple[str, bool], tuple[int, int] | None] = {}

    def check_file(
        line: int, column: str, value: str, expected_size: tuple[int, int] | None
    ) -> tuple[int, int] | None:
        unsafe = _unsafe_path(value)
        if unsafe:
            problems.append(f"line {line}, {column}: {value!r} {unsafe}")
            return None
        full = real_path(value)
        if not real_path.inside(full):
            problems.append(f"line {line}, {column}: {value!r} leaves the manifest's folder")
            return None
        if not check_files:
            return None
        if not os.path.isfile(full):
            problems.append(f"line {line}, {column}: file not found: {value}")
            return None
        key = (value, column.startswith("mask:"))
        if key not in sizes:
            try:
                sizes[key] = _image_size(full, decode, mask=key[1])
            except UnsupportedImageError as error:
                sizes[key] = None
                problems.append(f"line {line}, {column}: {value}: {error}")
            except (OSError, SyntaxError, Image.DecompressionBombWarning, ValueError) as error:
                sizes[key] = None
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                problems.append(
                    f"line {line}, {column}: unreadable or truncated image {value}: {reason}"
                )
        size = sizes[key]
        if size is not None and expected_size is not None and size != expected_size:
            turned = _turned_note(real_path(image), expected_size)  # `image`: this row's image
            problems.append(
                f"line {line}, {column}: {value} is {size[0]}x{size[1]} but the image is "
                f"{expected_size[0]}x{expected_size[1]}{turned}"
            )
        return size

    attributes, attribute_columns, twin_columns = _attributes(header)
    first = attributes[0]
    # Plain `group` / `twin` beside the first attribute's own columns: compatibility copies.
    own_twin = f"twin:{first}" if f"twin:{first}" in header else "twin"
    copies = [
        (plain, own)
        for plain, own in (("group", attribute_columns[first]), ("twin", own_twin))
        if plain in header and own != plain
    ]
    # Every twin column's files are checked, the copy `twin` only when it differs from its own.
    twin_files = [c for c in header if c == "twin" or c.startswith("twin:")]
    plain_twin_is_copy = any(plain == "twin" for plain, _ in copies)
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
        for plain, own in copies:
            if values[plain] != values[own]:
                problems.append(
                    f"line {line}, {plain}: {values[plain]!r} differs from {own} "
                    f"{values[own]!r}; beside {own}, the {plain!r} column must be a copy of it"
                )
        size = check_file(line, "image", image, None)
        for column in twin_files:
            value = values.get(column)
            if not value or (column == "twin" and plain_twin_is_copy and value == values[own_twin]):
                continue
            check_file(line, column, value, size)
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

"""`audit data import imagefolder|table|coco`: the importers of audit.data.importers on the command
line. Bad input ends with one line `error: ...` and exit code 2 (problems found in the data are
listed one per line first, naming the table line, image or annotation), and nothing is written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # the importers (pandas, PIL) load only when a command runs
    from audit.data.importers import ImportResult, TableSpec

BINARY_HELP = (
    "turns a -1/1 (or 0/1) attribute column into names: ATTR gives ATTR / not_ATTR; "
    "ATTR:NEG,POS names the -1 and 1 values; NAME=... renames the attribute"
)


def _importer(func: Callable[..., ImportResult]) -> Callable[..., None]:
    """Run an importer: print what it wrote, or its problems and one `error:` line (exit 2)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from audit.cli_errors import BadInput
        from audit.data.importers import ImporterError, ImportProblems

        try:
            result = func(*args, **kwargs)
        except ImportProblems as error:
            for problem in error.problems:
                click.echo(problem, err=True)
            raise BadInput(
                f"{error.source}: {len(error.problems)} problem(s) above; nothing written"
            ) from None
        except (ImporterError, PermissionError) as error:
            raise BadInput(" ".join(str(error).split())) from None
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
        if result.layout:
            click.echo(f"layout: {result.layout}", err=True)
        masks = f", {len(result.masks)} mask files" if result.masks else ""
        click.echo(
            f"wrote {result.manifest} ({result.rows} rows{masks}; columns: "
            f"{', '.join(result.columns)})"
        )

    return wrapper


def _out_option(default: str) -> Callable:
    return click.option(
        "--out",
        type=click.Path(path_type=Path),
        default=None,
        help=f"Manifest to write [default: {default}]. It must lie above every file it names.",
    )


_overwrite = click.option("--overwrite", is_flag=True, help="Replace an existing manifest.")
_group_columns = click.option(
    "--group-columns",
    default=None,
    help="Comma-separated table columns written as protected attributes `group:<column>`.",
)
_group_from = click.option(
    "--group-from",
    multiple=True,
    help=f"A binary attribute as a protected attribute (repeatable); {BINARY_HELP}, "
    "e.g. sex=Male:female,male.",
)
_label_column = click.option("--label-column", default=None, help="Column holding the class name.")
_label_from = click.option(
    "--label-from",
    default=None,
    help=f"Class from a binary attribute instead; {BINARY_HELP}, e.g. Eyeglasses.",
)
_split = click.option(
    "--split",
    default="",
    help="Split written on every row (e.g. test); checked against a "
    "table's `split` column where it has one.",
)
_split_column = click.option(
    "--split-column", default=None, help="The table's column holding each image's split."
)
_partition = click.option(
    "--partition",
    type=click.Path(path_type=Path),
    default=None,
    help="Splits from CelebA's list_eval_partition.txt (FILE 0|1|2: train, val, test), joined "
    "on the image's path or file name.",
)


def _spec(**options: Any) -> TableSpec:
    """The TableSpec of the command's table options."""
    from audit.data.importers import TableSpec

    return TableSpec(**options)


@click.group("import")
def import_() -> None:
    """Write a manifest for an ImageFolder tree, an attribute table or COCO annotations.

    Each importer writes only the manifest (and, for COCO, a new masks folder), validates it as
    `audit data validate` does, and names the source record of every problem.
    """


@import_.command(
    "imagefolder",
    short_help="Manifest for ROOT/<class>/<image> (class = folder name), attributes from a table.",
)
@click.argument("root", type=click.Path(path_type=Path))
@click.option(
    "--attributes",
    type=click.Path(path_type=Path),
    default=None,
    help="Attribute table (CSV or CelebA layout) to join protected attributes from.",
)
@click.option(
    "--key",
    default="image",
    help="The table's column naming the image: a path relative to ROOT, or a unique file name.",
)
@click.option(
    "--layout",
    default="auto",
    show_default=True,
    help="auto, class (ROOT/<class>/<image>) or split/class (ROOT/<split>/<class>/<image>); auto takes split/class only "
    "where every top-level folder is named like a split and holds class folders, and refuses a "
    "tree that could be either.",
)
@_group_columns
@_group_from
@_split
@_split_column
@_partition
@_out_option("ROOT/manifest.csv")
@_overwrite
@_importer
def imagefolder(
    root: Path,
    attributes: Path | None,
    key: str,
    layout: str,
    group_columns: str | None,
    group_from: tuple[str, ...],
    split: str,
    split_column: str | None,
    partition: Path | None,
    out: Path | None,
    overwrite: bool,
) -> ImportResult:
    """Manifest for ROOT/<class>/<image> (class = folder name), attributes from a table.

    Without --group-columns or --group-from, every plain table column but the key, `label` and
    `split` becomes an attribute; `group:`, `twin:`, `mask:` and `box:` columns are carried over
    (twin and mask paths relative to ROOT). A table's `label` and `split` columns must agree with
    the folders.
    """
    from audit.data.importers import import_imagefolder

    spec = _spec(
        key=key,
        group_columns=group_columns,
        group_from=group_from,
        split=split,
        split_column=split_column,
        partition=partition,
    )
    return import_imagefolder(
        root, attributes=attributes, spec=spec, layout=layout, out=out, overwrite=overwrite
    )


@import_.command(
    "table",
    short_help="Manifest from an attribute table: CSV, or CelebA's list_attr_celeba.txt layout.",
)
@click.argument("table", type=click.Path(path_type=Path))
@click.option(
    "--image-column",
    default="image",
    help="Column holding the image path (the CelebA layout's file column is `image`).",
)
@_label_column
@_label_from
@_group_columns
@_group_from
@_split_column
@_split
@_partition
@click.option(
    "--images",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder the image paths are relative to [default: the table's folder].",
)
@_out_option("IMAGES/manifest.csv")
@_overwrite
@_importer
def table(
    table: Path,
    image_column: str,
    label_column: str | None,
    label_from: str | None,
    group_columns: str | None,
    group_from: tuple[str, ...],
    split_column: str | None,
    split: str,
    partition: Path | None,
    images: Path | None,
    out: Path | None,
    overwrite: bool,
) -> ImportResult:
    """Manifest from an attribute table: CSV, or CelebA's list_attr_celeba.txt layout.

    Example (CelebA):

    \b
    audit data import table Anno/list_attr_celeba.txt \\
        --images img_align_celeba --label-from Eyeglasses \\
        --group-from sex=Male:female,male --group-from age=Young:old,young \\
        --partition Eval/list_eval_partition.txt

    The table's `group:`, `twin:`, `mask:` and `box:` columns are carried over (twin and mask
    paths relative to IMAGES).
    """
    from audit.data.importers import import_table

    spec = _spec(
        key=image_column,
        label_column=label_column,
        label_from=label_from,
        group_columns=group_columns,
        group_from=group_from,
        split=split,
        split_column=split_column,
        partition=partition,
    )
    return import_table(table, spec=spec, images=images, out=out, overwrite=overwrite)


@import_.command(
    "coco",
    short_help="Manifest and region masks from COCO segmentations (polygons and RLE), labels "
    "from a table.",
)
@click.argument("annotations", type=click.Path(path_type=Path))
@click.option(
    "--regions",
    required=True,
    help="REGION=CATEGORY pairs (category id or name), e.g. 'hair=12,face=3'; every category "
    "used by an annotation must be mapped; a region may gather several (face=3,face=4).",
)
@click.option(
    "--table",
    "table_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Table (CSV or CelebA layout) with each image's label and attributes.",
)
@click.option(
    "--key",
    default="image",
    help="The table's column naming the image: COCO's file_name, or a unique file name.",
)
@_label_column
@_label_from
@_group_columns
@_group_from
@_split
@_split_column
@_partition
@click.option(
    "--images",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder COCO's file_names are relative to [default: the annotation file's folder].",
)
@click.option(
    "--masks-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="New (or empty) folder for the masks [default: masks/ beside the annotation file].",
)
@_out_option("manifest.csv in the deepest folder above both the images and the masks")
@_overwrite
@_importer
def coco(
    annotations: Path,
    regions: str,
    table_path: Path,
    key: str,
    label_column: str | None,
    label_from: str | None,
    group_columns: str | None,
    group_from: tuple[str, ...],
    split: str,
    split_column: str | None,
    partition: Path | None,
    images: Path | None,
    masks_dir: Path | None,
    out: Path | None,
    overwrite: bool,
) -> ImportResult:
    """Manifest and region masks from COCO segmentations (polygons and RLE), labels from a table.

    Masks are written as MASKS_DIR/<region>/<image id>.png (255 inside); an image without an
    annotation of a region gets an empty cell.
    """
    from audit.data.importers import import_coco

    spec = _spec(
        key=key,
        label_column=label_column,
        label_from=label_from,
        group_columns=group_columns,
        group_from=group_from,
        split=split,
        split_column=split_column,
        partition=partition,
    )
    return import_coco(
        annotations,
        regions=regions,
        table=table_path,
        spec=spec,
        images=images,
        masks_dir=masks_dir,
        out=out,
        overwrite=overwrite,
    )

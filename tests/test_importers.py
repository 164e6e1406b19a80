"""The importers on small hand-built fixtures in the real formats: an ImageFolder tree with an
attribute CSV, a CelebA-layout attribute file, and a COCO file with polygon and RLE masks.

Masks are checked against independent rasterisations: the polygon drawn with PIL's ImageDraw
(the two rasterisers may differ only on boundary pixels), the RLEs against the arrays they were
encoded from by hand. Bad input must give one `error:` line, exit code 2, and write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from audit.data.import_cli import import_
from audit.data.importers import (
    BinaryAttribute,
    ImporterError,
    TableSpec,
    import_imagefolder,
    import_table,
    read_attribute_table,
)
from audit.data.manifest import validate


def invoke(*args: object):
    return CliRunner().invoke(import_, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    } | {str(p.relative_to(folder)) + "/": b"" for p in folder.rglob("*") if p.is_dir()}


def assert_bad_input(result, folder: Path, before: dict, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert snapshot(folder) == before, "an importer wrote files on bad input"
    return lines[-1]


def image(path: Path, size: tuple[int, int], colour: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 255 - colour, 90)).save(path)
    return path


def read(manifest: Path) -> pd.DataFrame:
    return pd.read_csv(manifest, dtype=str, keep_default_na=False)


# -- ImageFolder ------------------------------------------------------------------------------
@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    for i, rel in enumerate(["doctor/a.png", "doctor/b.jpg", "nurse/c.png", "nurse/deep/d.png"]):
        image(root / rel, (16, 12), 40 * i)
    (root / "nurse" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("top-level files are not classes")
    (root / "attributes.csv").write_text(
        "image,sex,age\n"
        "a.png,female,young\n"
        "doctor/b.jpg,male,old\n"  # a path relative to the root also joins
        "d.png,male,young\n"
        "zzz.png,female,old\n"  # no such image: a warning, not an error
    )
    return root


def test_imagefolder_with_attribute_table(imagefolder: Path):
    result = invoke(
        "imagefolder",
        imagefolder,
        "--attributes",
        imagefolder / "attributes.csv",
        "--split",
        "test",
    )
    assert result.exit_code == 0, result.output
    assert "1 row(s) of attributes.csv match no image" in result.output
    assert "1 image(s) have no row" in result.output
    manifest = imagefolder / "manifest.csv"
    table = read(manifest)
    assert list(table.columns) == ["image", "label", "split", "group:sex", "group:age"]
    assert table.to_dict("records") == [
        {
            "image": "doctor/a.png",
            "label": "doctor",
            "split": "test",
            "group:sex": "female",
            "group:age": "young",
        },
        {
            "image": "doctor/b.jpg",
            "label": "doctor",
            "split": "test",
            "group:sex": "male",
            "group:age": "old",
        },
        {
            "image": "nurse/c.png",
            "label": "nurse",
            "split": "test",
            "group:sex": "",
            "group:age": "",
        },
        {
            "image": "nurse/deep/d.png",
            "label": "nurse",
            "split": "test",
            "group:sex": "male",
            "group:age": "young",
        },
    ]
    assert validate(manifest) == []


def test_imagefolder_chosen_columns_and_binary_attribute(imagefolder: Path, tmp_path: Path):
    (tmp_path / "flags.csv").write_text(
        "image,Male,x\na.png,-1,1\nb.jpg,1,1\nc.png,1,0\nd.png,-1,0\n"
    )
    result = import_imagefolder(
        imagefolder,
        attributes=tmp_path / "flags.csv",
        spec=TableSpec(group_columns=[], group_from=["sex=Male:female,male"]),
        out=imagefolder / "by_sex.csv",
    )
    table = read(result.manifest)
    assert result.manifest == imagefolder / "by_sex.csv" and result.warnings == []
    assert list(table.columns) == ["image", "label", "split", "group:sex"]
    assert table["group:sex"].tolist() == ["female", "male", "male", "female"]


# -- CelebA layout ------------------------------------------------------------------------------
CELEBA = {  # file -> (Eyeglasses, Male, Young), as in list_attr_celeba.txt
    "000001.jpg": (-1, -1, 1),
    "000002.jpg": (1, 1, 1),
    "000003.jpg": (-1, 1, -1),
    "000004.jpg": (1, -1, -1),
    "000005.jpg": (-1, 1, 1),
}


@pytest.fixture
def celeba(tmp_path: Path) -> Path:
    images = tmp_path / "celeba" / "img_align_celeba"
    for i, name in enumerate(CELEBA):
        image(images / name, (18, 22), 30 * i)
    anno = tmp_path / "celeba" / "Anno"
    anno.mkdir()
    lines = [str(len(CELEBA)), "5_o_Clock_Shadow Eyeglasses Male Young "]
    for name, (glasses, male, young) in CELEBA.items():
        lines.append(f"{name}  -1 {glasses:2d} {male:2d} {young:2d}")
    (anno / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return anno / "list_attr_celeba.txt"


def test_celeba_layout_is_read_with_line_numbers(celeba: Path):
    table = read_attribute_table(celeba)
    assert table.layout == "celeba"
    assert list(table.frame.columns) == ["image", "5_o_Clock_Shadow", "Eyeglasses", "Male", "Young"]
    assert table.frame["Male"].tolist() == [str(v[1]) for v in CELEBA.values()]
    assert table.origin(0) == "list_attr_celeba.txt line 3"


def test_table_import_of_celeba(celeba: Path):
    images = celeba.parent.parent / "img_align_celeba"
    result = invoke(
        "table",
        celeba,
        "--images",
        images,
        "--label-from",
        "Eyeglasses",
        "--group-from",
        "sex=Male:female,male",
        "--group-from",
        "Young",
        "--split",
        "test",
    )
    assert result.exit_code == 0, result.output
    table = read(images / "manifest.csv")
    assert list(table.columns) == ["image", "label", "split", "group:sex", "group:Young"]
    assert table["image"].tolist() == list(CELEBA)
    assert table["label"].tolist() == [
        "Eyeglasses" if g == 1 else "not_Eyeglasses" for g, _, _ in CELEBA.values()
    ]
    assert table["group:sex"].tolist() == [
        "male" if m == 1 else "female" for _, m, _ in CELEBA.values()
    ]
    assert table["group:Young"].tolist() == [
        "Young" if y == 1 else "not_Young" for _, _, y in CELEBA.values()
    ]
    assert validate(images / "manifest.csv") == []
    assert sorted(p.name for p in celeba.parent.iterdir()) == ["list_attr_celeba.txt"]


def test_csv_table_with_label_and_group_columns(tmp_path: Path):
    for i, name in enumerate(["p/1.png", "p/2.png", "q/3.png"]):
        image(tmp_path / name, (10, 10), 60 * i)
    (tmp_path / "faces.csv").write_text(
        "file,job,gender,race,part\np/1.png,doctor,Female,Black,train\n"
        "p/2.png,nurse,Male,White,test\nq/3.png,nurse,Female,East Asian,test\n"
    )
    result = import_table(
        tmp_path / "faces.csv",
        spec=TableSpec(
            key="file", label_column="job", group_columns="gender,race", split_column="part"
        ),
    )
    table = read(result.manifest)
    assert result.manifest == tmp_path / "manifest.csv"
    assert table.to_dict("list") == {
        "image": ["p/1.png", "p/2.png", "q/3.png"],
        "label": ["doctor", "nurse", "nurse"],
        "split": ["train", "test", "test"],
        "group:gender": ["Female", "Male", "Female"],
        "group:race": ["Black", "White", "East Asian"],
    }


def test_binary_attribute_forms():
    assert BinaryAttribute.parse("Eyeglasses") == BinaryAttribute(
        "Eyeglasses", "Eyeglasses", "not_Eyeglasses", "Eyeglasses"
    )
    assert BinaryAttribute.parse("sex=Male:female,male") == BinaryAttribute(
        "sex", "Male", "female", "male"
    )
    assert BinaryAttribute.parse("Male:female,male") == BinaryAttribute(
        "Male", "Male", "female", "male"
    )
    for bad in ("", "a:b", "a:b,b", "=x"):
        with pytest.raises(ImporterError):
            BinaryAttribute.parse(bad)


# -- COCO ---------------------------------------------------------------------------------------
POLYGON = [3.2, 2.7, 25.6, 4.1, 20.3, 19.8, 6.1, 16.4]  # hair on image 1 (40 x 24)


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE by hand: column-major runs, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return counts


@pytest.fixture
def coco(tmp_path: Path) -> dict:
    root = tmp_path / "coco"
    image(root / "images" / "one.png", (40, 24), 10)
    image(root / "images" / "two.png", (32, 32), 200)
    face = np.zeros((24, 40), bool)
    face[5:15, 10:22] = True
    face[8:10, 30:33] = True  # a second blob
    hair = np.zeros((32, 32), bool)
    yy, xx = np.mgrid[:32, :32]
    hair[(yy - 12) ** 2 + (xx - 16) ** 2 < 60] = True
    from pycocotools import mask as coco_mask

    compressed = coco_mask.encode(np.asfortranarray(hair.astype(np.uint8)))
    data = {
        "images": [
            {"id": 1, "file_name": "one.png", "width": 40, "height": 24},
            {"id": 2, "file_name": "two.png", "width": 32, "height": 32},
        ],
        "categories": [
            {"id": 12, "name": "hair"},
            {"id": 3, "name": "face"},
            {"id": 7, "name": "hat"},
        ],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 12, "segmentation": [POLYGON], "iscrowd": 0},
            {
                "id": 101,
                "image_id": 1,
                "category_id": 3,
                "segmentation": {"size": [24, 40], "counts": uncompressed_rle(face)},
                "iscrowd": 1,
            },
            {
                "id": 102,
                "image_id": 2,
                "category_id": 12,
                "segmentation": {"size": [32, 32], "counts": compressed["counts"].decode()},
                "iscrowd": 1,
            },
        ],
    }
    annotations = root / "annotations" / "instances.json"
    annotations.parent.mkdir(parents=True)
    annotations.write_text(json.dumps(data))
    (root / "people.csv").write_text("image,job,sex\none.png,doctor,female\ntwo.png,nurse,male\n")
    return {"root": root, "json": annotations, "data": data, "face": face, "hair2": hair}


def test_coco_masks_from_polygon_and_rle(coco: dict):
    root = coco["root"]
    result = invoke(
        "coco",
        coco["json"],
        "--regions",
        "hair=12,face=face",
        "--images",
        root / "images",
        "--table",
        root / "people.csv",
        "--label-column",
        "job",
        "--group-columns",
        "sex",
        "--split",
        "test",
    )
    assert result.exit_code == 0, result.output
    manifest = root / "manifest.csv"  # the folder above both images/ and annotations/masks/
    table = read(manifest)
    assert table.to_dict("records") == [
        {
            "image": "images/one.png",
            "label": "doctor",
            "split": "test",
            "group:sex": "female",
            "mask:face": "annotations/masks/face/1.png",
            "mask:hair": "annotations/masks/hair/1.png",
        },
        {
            "image": "images/two.png",
            "label": "nurse",
            "split": "test",
            "group:sex": "male",
            "mask:face": "",
            "mask:hair": "annotations/masks/hair/2.png",
        },
    ]
    assert validate(manifest) == []

    def mask(rel: str) -> np.ndarray:
        return np.asarray(Image.open(root / rel)) > 0

    # RLEs: exactly the arrays they were encoded from
    np.testing.assert_array_equal(mask("annotations/masks/face/1.png"), coco["face"])
    np.testing.assert_array_equal(mask("annotations/masks/hair/2.png"), coco["hair2"])
    # polygon: PIL's rasterisation; the two may differ only on pixels the outline passes through
    # (a shift of the polygon by half a pixel already breaks this)
    drawn, outline = Image.new("L", (40, 24)), Image.new("L", (40, 24))
    ImageDraw.Draw(drawn).polygon(POLYGON, fill=1)
    ImageDraw.Draw(outline).line([*POLYGON, *POLYGON[:2]], fill=1, width=1)
    drawn, outline = np.asarray(drawn) > 0, np.asarray(outline) > 0
    hair = mask("annotations/masks/hair/1.png")
    assert not ((hair != drawn) & ~outline).any()
    assert (drawn & ~outline).sum() > 150 and hair.sum() > 200
    values = np.unique(np.asarray(Image.open(root / "annotations/masks/hair/1.png")))
    assert values.tolist() == [0, 255]


def test_coco_category_missing_from_regions_is_named(coco: dict):
    root = coco["root"]
    coco["data"]["annotations"].append(
        {"id": 103, "image_id": 2, "category_id": 7, "segmentation": [[1, 1, 5, 1, 5, 5]]}
    )
    coco["json"].write_text(json.dumps(coco["data"]))
    before = snapshot(root)
    result = invoke(
        "coco",
        coco["json"],
        "--regions",
        "hair=12,face=3",
        "--images",
        root / "images",
        "--table",
        root / "people.csv",
        "--label-column",
        "job",
    )
    line = assert_bad_input(result, root, before, "hat=7")
    assert len(result.output.strip().splitlines()) == 1 and "--regions" in line


def test_coco_never_writes_over_existing_masks(coco: dict):
    root = coco["root"]
    (root / "annotations" / "masks").mkdir()
    (root / "annotations" / "masks" / "mine.png").write_bytes(b"user's file")
    before = snapshot(root)
    result = invoke(
        "coco",
        coco["json"],
        "--regions",
        "hair=12,face=3",
        "--images",
        root / "images",
        "--table",
        root / "people.csv",
        "--label-column",
        "job",
    )
    assert_bad_input(result, root, before, "masks", "--masks-dir")


def test_coco_validation_problem_removes_the_masks(coco: dict):
    root = coco["root"]
    (root / "images" / "two.png").unlink()  # the manifest would name a missing image
    before = snapshot(root)
    result = invoke(
        "coco",
        coco["json"],
        "--regions",
        "hair=12,face=3",
        "--images",
        root / "images",
        "--table",
        root / "people.csv",
        "--label-column",
        "job",
    )
    assert_bad_input(
        result, root, before, "instances.json image id 2 (two.png), image: file not found"
    )
    assert not (root / "annotations" / "masks").exists()


# -- bad input: one line, exit 2, nothing written -------------------------------------------------
def test_imagefolder_with_one_class(tmp_path: Path):
    image(tmp_path / "only" / "a.png", (8, 8), 1)
    image(tmp_path / "only" / "b.png", (8, 8), 2)
    before = snapshot(tmp_path)
    result = invoke("imagefolder", tmp_path)
    line = assert_bad_input(result, tmp_path, before, "one class ('only')")
    assert len(result.output.strip().splitlines()) == 1, line


def test_existing_manifest_needs_overwrite(imagefolder: Path):
    (imagefolder / "manifest.csv").write_text("mine\n")
    before = snapshot(imagefolder)
    result = invoke("imagefolder", imagefolder)
    assert_bad_input(result, imagefolder, before, "manifest.csv already exists", "--overwrite")
    result = invoke("imagefolder", imagefolder, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(read(imagefolder / "manifest.csv")) == 4


@pytest.mark.parametrize(
    ("command", "file", "message"),
    [
        ("table", "picture.png", "a binary file, not an attribute table"),
        ("table", "instances.json", "JSON, not an attribute table"),
        ("coco", "people.csv", "not a COCO annotation file"),
        ("coco", "missing.json", "not found"),
        ("table", "ragged.txt", "line 4: 3 fields, expected 2"),
    ],
)
def test_wrong_format_is_one_line(coco: dict, command: str, file: str, message: str):
    root = coco["root"]
    image(root / "picture.png", (8, 8), 3)
    (root / "instances.json").write_text(json.dumps(coco["data"]))
    (root / "ragged.txt").write_text("2\nMale\na.png 1\nb.png 1 -1\n")
    before = snapshot(root)
    extra = ["--regions", "hair=12", "--table", root / "people.csv", "--label-column", "job"]
    args = extra if command == "coco" else ["--label-column", "job"]
    result = invoke(command, root / file, *args)
    line = assert_bad_input(result, root, before, message)
    assert len(result.output.strip().splitlines()) == 1, line


def test_table_problems_name_their_lines(celeba: Path):
    text = celeba.read_text().replace("000003.jpg  -1 -1", "000003.jpg  -1  2")
    celeba.write_text(text)
    (celeba.parent.parent / "img_align_celeba" / "000005.jpg").unlink()
    folder = celeba.parent.parent
    before = snapshot(folder)
    result = invoke(
        "table", celeba, "--images", folder / "img_align_celeba", "--label-from", "Eyeglasses"
    )
    assert_bad_input(
        result,
        folder,
        before,
        "list_attr_celeba.txt line 5, column Eyeglasses: '2' is not -1, 0 or 1",
        "list_attr_celeba.txt line 7, image: file not found: 000005.jpg",
        "list_attr_celeba.txt line 5, label: empty label",
        "3 problem(s) above; nothing written",
    )

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

from audit.cli_import import import_
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


# -- issue 24: split/class trees, keys, twins and boxes, splits for every importer ---------------
@pytest.fixture
def split_tree(tmp_path: Path) -> Path:
    """ROOT/<split>/<class>/<image> with a whole-data table: file, label, split, sex, twins, box."""
    root = tmp_path / "data"
    rows = ["file,label,split,sex,twin:sex,box:person"]
    for s, split in enumerate(["train", "test"]):
        for c, job in enumerate(["doctor", "nurse"]):
            for k in range(2):
                name = f"{split}_{job}_{k}.png"
                image(root / split / job / name, (20, 16), 20 * s + 10 * c + k)
                image(tmp_path / "twins" / f"sex_{name}", (20, 16), 100 + k)
                sex = "female" if k else "male"  # twins beside the tree: paths relative to ROOT
                rows.append(f"{name},{job},{split},{sex},../twins/sex_{name},2 3 12 14")
    (tmp_path / "people.csv").write_text("\n".join(rows) + "\n")
    return root


def test_split_class_tree_is_recognised_and_the_table_checked(split_tree: Path, tmp_path: Path):
    result = invoke(
        "imagefolder",
        split_tree,
        "--attributes",
        tmp_path / "people.csv",
        "--key",
        "file",
        "--out",
        tmp_path / "manifest.csv",
    )
    assert result.exit_code == 0, result.output
    assert "layout: split/class" in result.output
    table = read(tmp_path / "manifest.csv")
    assert list(table.columns) == ["image", "label", "split", "group:sex", "twin:sex", "box:person"]
    expected = pd.read_csv(tmp_path / "people.csv", dtype=str)  # independent: from the table
    expected["image"] = (
        "data/" + expected["split"] + "/" + expected["label"] + "/" + expected["file"]
    )
    expected = expected.sort_values("image").reset_index(drop=True)
    assert table["image"].tolist() == expected["image"].tolist()
    assert table["label"].tolist() == expected["label"].tolist()
    assert table["split"].tolist() == expected["split"].tolist()
    assert table["group:sex"].tolist() == expected["sex"].tolist()
    assert table["twin:sex"].tolist() == expected["twin:sex"].str.removeprefix("../").tolist()
    assert set(table["box:person"]) == {"2 3 12 14"}
    assert validate(tmp_path / "manifest.csv") == []


def test_table_label_and_split_must_agree_with_the_folders(split_tree: Path, tmp_path: Path):
    people = tmp_path / "people.csv"
    text = people.read_text().replace(
        "train_doctor_1.png,doctor,train", "train_doctor_1.png,nurse,test"
    )
    people.write_text(text)
    before = snapshot(tmp_path)
    result = invoke(
        "imagefolder",
        split_tree,
        "--attributes",
        people,
        "--key",
        "file",
        "--layout",
        "split/class",
        "--out",
        tmp_path / "manifest.csv",
    )
    assert_bad_input(
        result,
        tmp_path,
        before,
        "people.csv line 3, column label: 'nurse' but the class folder is 'doctor'",
        "people.csv line 3, column split: 'test' but the split (--layout split/class) is 'train'",
        "2 problem(s) above",
    )


def test_split_class_warns_of_missing_classes_and_loose_images(split_tree: Path):
    for file in (split_tree / "test" / "nurse").iterdir():
        file.unlink()
    (split_tree / "test" / "nurse").rmdir()
    image(split_tree / "stray.png", (8, 8), 1)
    result = invoke("imagefolder", split_tree)
    assert result.exit_code == 0, result.output
    assert "split 'test' has no images of class 'nurse'" in result.output
    assert "1 image(s) directly in" in result.output and "stray.png" in result.output
    assert len(read(split_tree / "manifest.csv")) == 6


def test_ambiguous_two_level_tree_is_refused_with_the_flag(tmp_path: Path):
    for site in ("site_a", "site_b"):
        for job in ("doctor", "nurse"):
            image(tmp_path / site / job / f"{site}_{job}.png", (8, 8), 5)
    before = snapshot(tmp_path)
    result = invoke("imagefolder", tmp_path)
    line = assert_bad_input(result, tmp_path, before, "--layout split/class", "--layout class")
    assert "doctor, nurse appear under more than one" in line
    assert invoke("imagefolder", tmp_path, "--layout", "split/class").exit_code == 0
    assert read(tmp_path / "manifest.csv")["split"].tolist() == ["site_a"] * 2 + ["site_b"] * 2
    result = invoke("imagefolder", tmp_path, "--layout", "class", "--overwrite")
    assert result.exit_code == 0, result.output
    assert read(tmp_path / "manifest.csv")["label"].tolist() == ["site_a"] * 2 + ["site_b"] * 2


def test_split_named_class_folders_are_refused(tmp_path: Path):
    image(tmp_path / "train" / "a.png", (8, 8), 1)
    image(tmp_path / "test" / "b.png", (8, 8), 2)
    before = snapshot(tmp_path)
    line = assert_bad_input(invoke("imagefolder", tmp_path), tmp_path, before, "named like splits")
    assert "test, train" in line and "--layout class" in line
    line = assert_bad_input(
        invoke("imagefolder", tmp_path, "--layout", "split/class"), tmp_path, before, "directly in"
    )
    assert "train" in line or "test" in line
    # split/class below, but one top-level folder is not named like a split: auto refuses too
    (tmp_path / "train" / "a.png").rename(tmp_path / "train" / "x.png")
    for folder in ("train", "test", "extras"):
        image(tmp_path / folder / "doctor" / "d.png", (8, 8), 1)
        image(tmp_path / folder / "nurse" / "n.png", (8, 8), 1)
    for stray in (tmp_path / "train" / "x.png", tmp_path / "test" / "b.png"):
        stray.unlink()
    before = snapshot(tmp_path)
    line = assert_bad_input(invoke("imagefolder", tmp_path), tmp_path, before, "named like splits")
    assert "--layout split/class" in line


def test_one_split_with_the_whole_table(split_tree: Path, tmp_path: Path):
    """Keys written from the whole tree's root name nothing under one split: an error, not 8
    rows with empty attributes; file names join, and the table's split is then checked."""
    people = tmp_path / "people.csv"
    table = pd.read_csv(people, dtype=str)
    table["path"] = table["split"] + "/" + table["label"] + "/" + table["file"]
    table.drop(columns=["twin:sex"]).to_csv(people, index=False)
    one = split_tree / "test"
    before = snapshot(tmp_path)
    result = invoke("imagefolder", one, "--attributes", people, "--key", "path", "--split", "test")
    line = assert_bad_input(
        result, tmp_path, before, "--key: no value of people.csv's column 'path'"
    )
    assert "'train/doctor/train_doctor_0.png'" in line and "'doctor/test_doctor_0.png'" in line
    assert "they start with 'test/'" in line
    result = invoke("imagefolder", one, "--attributes", people, "--key", "file")
    assert_bad_input(result, tmp_path, before, "'split' column", "--split-column split")
    result = invoke("imagefolder", one, "--attributes", people, "--key", "file", "--split", "train")
    assert_bad_input(result, tmp_path, before, "but the split (--split) is 'train'")
    result = invoke("imagefolder", one, "--attributes", people, "--key", "file", "--split", "test")
    assert result.exit_code == 0, result.output
    assert "4 row(s) of people.csv match no image" in result.output
    written = read(one / "manifest.csv")
    assert written["group:sex"].tolist() == ["male", "female"] * 2
    assert set(written["split"]) == {"test"} and "group:path" in written.columns


def test_split_column_for_imagefolder_needs_a_row_per_image(imagefolder: Path, tmp_path: Path):
    (tmp_path / "parts.csv").write_text("image,part\na.png,train\nb.jpg,test\nc.png,test\nd.png,\n")
    before = snapshot(imagefolder)
    args = ["--attributes", tmp_path / "parts.csv", "--split-column", "part"]
    result = invoke("imagefolder", imagefolder, *args)
    assert_bad_input(result, imagefolder, before, "parts.csv line 5, column part: empty split")
    (tmp_path / "parts.csv").write_text("image,part\na.png,train\nb.jpg,test\nd.png,val\n")
    result = invoke("imagefolder", imagefolder, *args)
    assert_bad_input(result, imagefolder, before, "nurse/c.png: no row in parts.csv, so no split")
    (tmp_path / "parts.csv").write_text(
        "image,part\na.png,train\nb.jpg,test\nc.png,test\nd.png,val\n"
    )
    result = invoke("imagefolder", imagefolder, *args)
    assert result.exit_code == 0, result.output
    table = read(imagefolder / "manifest.csv")
    assert table["split"].tolist() == ["train", "test", "test", "val"]
    assert list(table.columns) == ["image", "label", "split"]  # the split column is no attribute


def test_table_import_carries_twins_and_boxes(tmp_path: Path):
    images = tmp_path / "imgs"
    for name in ["p/1.png", "p/2.png", "twins/1_sex.png", "twins/2_sex.png"]:
        image(images / name, (10, 10), len(name))
    (tmp_path / "t.csv").write_text(
        "file,job,sex,twin:sex,box:badge,mask:face\n"
        "p/1.png,doctor,female,twins/1_sex.png,1 1 5 5,\n"
        "p/2.png,nurse,male,twins/2_sex.png,,twins/1_sex.png\n"
    )
    result = import_table(
        tmp_path / "t.csv",
        spec=TableSpec(key="file", label_column="job", group_columns="sex", split="test"),
        images=images,
        out=tmp_path / "manifest.csv",
    )
    table = read(result.manifest)
    assert table.to_dict("list") == {
        "image": ["imgs/p/1.png", "imgs/p/2.png"],
        "label": ["doctor", "nurse"],
        "split": ["test", "test"],
        "group:sex": ["female", "male"],
        "twin:sex": ["imgs/twins/1_sex.png", "imgs/twins/2_sex.png"],
        "box:badge": ["1 1 5 5", ""],
        "mask:face": ["", "imgs/twins/1_sex.png"],
    }
    from audit.data.manifest import read_manifest

    loaded = read_manifest(result.manifest)
    assert loaded.twin_columns == {"sex": "twin:sex"} and loaded.regions == ["badge", "face"]


def test_table_twin_problems_name_the_table_line(tmp_path: Path):
    image(tmp_path / "a.png", (10, 10), 1)
    image(tmp_path / "b.png", (10, 10), 2)
    image(tmp_path / "small.png", (6, 6), 2)
    (tmp_path / "t.csv").write_text(
        "image,job,group:sex,twin:sex,twin:age,box:x\n"
        "a.png,doctor,f,gone.png,,0 0 11 4\nb.png,nurse,m,small.png,a.png,\n"
    )
    before = snapshot(tmp_path)
    result = invoke("table", tmp_path / "t.csv", "--label-column", "job")
    assert_bad_input(
        result,
        tmp_path,
        before,
        "t.csv line 2, twin:sex: file not found: gone.png",
        "t.csv line 3, twin:sex: small.png is 6x6 but the image is 10x10",
        "t.csv line 2, box:x: box '0 0 11 4' lies outside the 10x10 image",
        "column 'twin:age' gives twins for attribute 'age', which has no 'group:age' column",
    )


CELEBA_PARTITION = "000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n000005.jpg 2\n"


@pytest.mark.parametrize("form", ["txt", "csv"])
def test_celeba_partition_gives_the_splits(celeba: Path, form: str):
    folder = celeba.parent.parent
    if form == "txt":
        partition = folder / "Eval" / "list_eval_partition.txt"
        partition.parent.mkdir()
        partition.write_text(CELEBA_PARTITION)
    else:  # the CSV form of the same file (Kaggle's list_eval_partition.csv)
        partition = folder / "list_eval_partition.csv"
        partition.write_text("image_id,partition\n" + CELEBA_PARTITION.replace(" ", ","))
    images = folder / "img_align_celeba"
    args = ["--images", images, "--label-from", "Eyeglasses", "--group-from", "Male"]
    result = invoke("table", celeba, *args, "--partition", partition)
    assert result.exit_code == 0, result.output
    expected = dict(line.split() for line in CELEBA_PARTITION.splitlines())
    names = {"0": "train", "1": "val", "2": "test"}
    table = read(images / "manifest.csv")
    assert table["split"].tolist() == [names[expected[f]] for f in table["image"]]
    assert table["split"].tolist() == ["train", "train", "val", "test", "test"]


def test_celeba_partition_problems(celeba: Path):
    folder = celeba.parent.parent
    partition = folder / "list_eval_partition.txt"
    partition.write_text(
        CELEBA_PARTITION.replace("000003.jpg 1", "000003.jpg 3").replace("000005.jpg 2\n", "")
    )
    images = folder / "img_align_celeba"
    args = ["--images", images, "--label-from", "Eyeglasses", "--partition", partition]
    before = snapshot(folder)
    assert_bad_input(
        invoke("table", celeba, *args),
        folder,
        before,
        "list_eval_partition.txt line 3: partition '3' is not 0, 1 or 2",
        "list_attr_celeba.txt line 7: not in list_eval_partition.txt, so no split",
    )
    partition.write_text("000001.jpg 0 extra\n")
    before = snapshot(folder)
    line = assert_bad_input(invoke("table", celeba, *args), folder, before, "line 1: 3 fields")
    assert line.startswith("error: --partition:")


@pytest.mark.parametrize(
    "options",
    [
        ["--split", "test", "--split-column", "sex"],
        ["--split", "test", "--partition", "p.txt"],
        ["--layout", "split/class", "--split", "test"],
        ["--layout", "splits"],
    ],
)
def test_one_split_source_only(imagefolder: Path, options: list[str]):
    before = snapshot(imagefolder)
    args = ["--attributes", imagefolder / "attributes.csv", *options]
    result = invoke("imagefolder", imagefolder, *args)
    expected = "choose from auto, class" if "splits" in options else "each give the split"
    line = assert_bad_input(result, imagefolder, before, expected)
    assert len(result.output.strip().splitlines()) == 1, line


def test_coco_split_column_and_partition(coco: dict):
    root = coco["root"]
    (root / "people.csv").write_text(
        "image,job,sex,part\none.png,doctor,female,train\ntwo.png,nurse,male,test\n"
    )
    base = [
        "--regions",
        "hair=12,face=3",
        "--images",
        root / "images",
        "--table",
        root / "people.csv",
        "--label-column",
        "job",
    ]
    result = invoke("coco", coco["json"], *base, "--split-column", "part")
    assert result.exit_code == 0, result.output
    table = read(root / "manifest.csv")
    assert table["split"].tolist() == ["train", "test"] and "group:part" not in table.columns
    (root / "partition.txt").write_text("one.png 2\ntwo.png 1\n")
    (root / "manifest.csv").unlink()
    for file in (root / "annotations" / "masks").rglob("*.png"):
        file.unlink()
    result = invoke(
        "coco",
        coco["json"],
        *base,
        "--partition",
        root / "partition.txt",
        "--masks-dir",
        root / "masks2",
    )
    assert result.exit_code == 0, result.output
    assert read(root / "manifest.csv")["split"].tolist() == ["test", "val"]


def test_coco_table_masks_clash_with_regions(coco: dict):
    root = coco["root"]
    (root / "people.csv").write_text(
        "image,job,mask:hair\none.png,doctor,images/one.png\ntwo.png,nurse,\n"
    )
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
    assert_bad_input(result, root, before, "column 'mask:hair' and --regions both give")


def test_imagefolder_partition_and_table_split_column_refusal(imagefolder: Path, tmp_path: Path):
    (tmp_path / "part.txt").write_text("a.png 0\nb.jpg 1\nc.png 2\nd.png 2\nnot_here.png 0\n")
    result = invoke("imagefolder", imagefolder, "--partition", tmp_path / "part.txt")
    assert result.exit_code == 0, result.output
    assert "1 row(s) of part.txt match no image" in result.output
    assert read(imagefolder / "manifest.csv")["split"].tolist() == ["train", "val", "test", "test"]
    (tmp_path / "t.csv").write_text("image,job,split\ndoctor/a.png,doctor,train\n")
    image(tmp_path / "doctor" / "a.png", (8, 8), 1)
    before = snapshot(tmp_path)
    result = invoke("table", tmp_path / "t.csv", "--label-column", "job")
    assert_bad_input(result, tmp_path, before, "t.csv has a 'split' column", "--split-column split")
    result = invoke("table", tmp_path / "t.csv", "--label-column", "job", "--split", "test")
    assert_bad_input(result, tmp_path, before, "column split: 'train' but the split (--split) is")

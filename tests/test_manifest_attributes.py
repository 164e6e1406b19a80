"""Several protected attributes in a manifest: `group:<attribute>` and `twin:<attribute>` columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from audit.cli import main
from audit.data.manifest import ManifestError, read_manifest, validate


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def _write(root: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    """A manifest from rows; `columns` gives the header as written (repeats allowed)."""
    path = root / "manifest.csv"
    if columns is None:
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        lines = [",".join(columns)] + [",".join(row) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for index in range(3):
        _image(tmp_path / f"i{index}.png", (10 * index, 0, 0))
        _image(tmp_path / f"s{index}.png", (0, 10 * index, 0))  # sex twins
        _image(tmp_path / f"a{index}.png", (0, 0, 10 * index))  # age twins
    return tmp_path


def _rows() -> list[dict[str, str]]:
    return [
        {
            "image": f"i{i}.png",
            "label": label,
            "group:sex": sex,
            "group:age": age,
            "split": "test",
            "twin:sex": f"s{i}.png",
            "twin:age": f"a{i}.png",
            "note": "n",
        }
        for i, (label, sex, age) in enumerate(
            [("cat", "male", "old"), ("dog", "female", "young"), ("dog", "female", "old")]
        )
    ]


def test_attributes_in_column_order_with_their_columns_and_twins(root):
    manifest = read_manifest(_write(root, _rows()))
    assert manifest.attributes == ["sex", "age"]
    assert manifest.group_column("sex") == "group:sex"
    assert manifest.group_column("age") == "group:age"
    assert manifest.twin_columns == {"sex": "twin:sex", "age": "twin:age"}
    # One-attribute readers see the first attribute and its twin.
    assert manifest.table["group"].tolist() == ["male", "female", "female"]
    assert manifest.table["twin"].tolist() == ["s0.png", "s1.png", "s2.png"]
    assert manifest.extra_columns == ["note"]
    with pytest.raises(ManifestError, match=r"no attribute 'skin_tone' \(attributes: sex, age\)"):
        manifest.group_column("skin_tone")


def test_the_first_column_decides_which_attribute_group_means(root):
    rows = [
        {k: row[k] for k in ("image", "label", "group:age", "group:sex", "twin:age")}
        for row in _rows()
    ]
    manifest = read_manifest(_write(root, rows))
    assert manifest.attributes == ["age", "sex"]
    assert manifest.twin_columns == {"age": "twin:age"}
    assert manifest.table["group"].tolist() == ["old", "young", "old"]
    assert manifest.table["twin"].tolist() == ["a0.png", "a1.png", "a2.png"]
    # With no twin for the first attribute, `twin` is empty even if another attribute has twins.
    rows = [
        {k: row[k] for k in ("image", "label", "group:sex", "group:age", "twin:age")}
        for row in _rows()
    ]
    manifest = read_manifest(_write(root, rows))
    assert manifest.twin_columns == {"age": "twin:age"}
    assert manifest.table["twin"].tolist() == ["", "", ""]


def test_plain_twin_is_the_first_attributes_twin(root):
    rows = [
        {"image": r["image"], "label": r["label"], "group:sex": r["group:sex"],
         "group:age": r["group:age"], "twin": r["twin:sex"], "twin:age": r["twin:age"]}
        for r in _rows()
    ]  # fmt: skip
    manifest = read_manifest(_write(root, rows))
    assert manifest.twin_columns == {"sex": "twin", "age": "twin:age"}
    assert manifest.table["twin"].tolist() == ["s0.png", "s1.png", "s2.png"]


def test_the_shorthand_is_one_attribute_named_group(root):
    rows = [{"image": r["image"], "label": r["label"], "group": r["group:sex"]} for r in _rows()]
    manifest = read_manifest(_write(root, rows))
    assert manifest.attributes == ["group"] and manifest.group_column("group") == "group"
    assert manifest.twin_columns == {}
    assert manifest.table["twin"].tolist() == ["", "", ""]
    for row, twin in zip(rows, ("s0.png", "s1.png", "s2.png"), strict=True):
        row["twin"] = twin
    manifest = read_manifest(_write(root, rows))
    assert manifest.twin_columns == {"group": "twin"}
    # No group column at all: the shorthand attribute, every value unknown.
    rows = [{"image": r["image"], "label": r["label"]} for r in _rows()]
    manifest = read_manifest(_write(root, rows))
    assert manifest.attributes == ["group"] and manifest.table["group"].tolist() == ["", "", ""]


def test_group_beside_group_columns_must_copy_the_first(root):
    rows = _rows()
    for row in rows:
        row["group"] = row["group:sex"]
        row["twin"] = row["twin:sex"]
    path = _write(root, rows)
    manifest = read_manifest(path)
    assert manifest.attributes == ["sex", "age"]  # `group` is no attribute of its own
    rows[1]["group"] = "young"
    rows[2]["twin"] = "a2.png"
    problems = validate(_write(root, rows))
    assert problems == [
        "line 3, group: 'young' differs from group:sex 'female'; beside group:sex, the 'group' "
        "column must be a copy of it",
        "line 4, twin: 'a2.png' differs from twin:sex 's2.png'; beside twin:sex, the 'twin' "
        "column must be a copy of it",
    ]


def test_the_checksum_covers_every_twin_column(root):
    path = _write(root, _rows())
    before = read_manifest(path).checksum()
    _image(root / "a1.png", (1, 2, 3))
    assert read_manifest(path).checksum() != before


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda rows, root: [r.pop("group:age") for r in rows],
            ["column 'twin:age' gives twins for attribute 'age', which has no 'group:age' column "
             "(attributes: sex)"],
        ),
        (
            lambda rows, root: rows[1].__setitem__("twin:age", "gone.png"),
            ["line 3, twin:age: file not found: gone.png"],
        ),
        (
            lambda rows, root: [
                _image(root / "big.png", (0, 0, 0), size=(30, 30)),
                rows[0].__setitem__("twin:sex", "big.png"),
            ],
            ["line 2, twin:sex: big.png is 30x30 but the image is 24x16"],
        ),
        (
            lambda rows, root: rows[2].__setitem__("twin:age", "../a2.png"),
            ["line 4, twin:age: '../a2.png' leaves the manifest's folder ('..')"],
        ),
        (
            lambda rows, root: [r.__setitem__("group:", "x") for r in rows],
            ["column 'group:' has an empty attribute name; write group:<attribute>, e.g. group:sex"],
        ),
        (
            lambda rows, root: [r.__setitem__("twin: ", "") for r in rows],
            ["column 'twin:' has an empty attribute name; write twin:<attribute>, e.g. twin:sex"],
        ),
        (
            lambda rows, root: [r.__setitem__("group: sex", r["group:sex"]) for r in rows],
            ["attribute 'sex' is given by more than one group: column"],
        ),
        (
            lambda rows, root: [r.__setitem__("grp:skin", "dark") for r in rows],
            ["column 'grp:skin' is not a known column; did you mean 'group:skin'?"],
        ),
        (
            lambda rows, root: [r.__setitem__("twins:age", "") for r in rows],
            ["column 'twins:age' is not a known column; did you mean 'twin:age'?"],
        ),
    ],
)  # fmt: skip
def test_each_attribute_problem_is_named(root, edit, expected):
    rows = _rows()
    edit(rows, root)
    path = _write(root, rows)
    assert validate(path) == expected
    with pytest.raises(ManifestError, match="1 problem"):
        read_manifest(path)


def test_a_repeated_column_is_named_with_its_positions(root):
    rows = [[r["image"], r["label"], r["group:sex"], r["group:sex"]] for r in _rows()]
    path = _write(root, rows, ["image", "label", "group:sex", "group:sex"])
    assert validate(path) == ["column 'group:sex' appears more than once (columns 3, 4)"]


def test_every_problem_at_once_and_through_the_cli(root):
    rows = _rows()
    for row in rows:
        row["twin:skin"] = ""
        row["group"] = row["group:sex"]
    rows[0]["twin:age"] = "nope.png"
    rows[2]["group"] = "x"
    path = _write(root, rows)
    problems = validate(path)
    assert problems == [
        "column 'twin:skin' gives twins for attribute 'skin', which has no 'group:skin' column "
        "(attributes: sex, age)",
        "line 2, twin:age: file not found: nope.png",
        "line 4, group: 'x' differs from group:sex 'female'; beside group:sex, the 'group' column "
        "must be a copy of it",
    ]
    result = CliRunner().invoke(main, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert [line.split(": ", 1)[1] for line in result.output.splitlines()] == problems

"""The doctor/nurse generator and the manifest loader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit.data.doctor_nurse import DoctorNurseSpec, generate, split_plan
from audit.data.draw import (
    AGES,
    ATTRIBUTE_PARTS,
    JOB_CUES,
    PROTECTED_PARTS,
    SEXES,
    render,
    sample_params,
)
from audit.data.manifest import ManifestError, read_manifest, validate
from benchmarks.in_memory import ManifestDataset, load_samples
from tests.conftest import SMALL


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_split_proportions_match_the_request(small_dataset):
    table = pd.read_csv(small_dataset, keep_default_na=False)
    counts = table.groupby(["split", "label", "group:sex", "group:age"]).size()
    for split, cells in split_plan(SMALL).items():
        for cell, expected in cells.items():
            assert counts.get((split, *cell), 0) == expected
    biased = table[table["split"] == "train_biased"]
    doctors = biased[biased["label"] == "doctor"]
    nurses = biased[biased["label"] == "nurse"]
    assert abs((doctors["group:sex"] == "male").mean() - 0.78) <= 0.5 / len(doctors)
    assert abs((nurses["group:sex"] == "female").mean() - 0.93) <= 0.5 / len(nurses)
    # Age is rounded within each sex: at most one image off per sex.
    assert abs((doctors["group:age"] == "old").mean() - 0.7) <= 1 / len(doctors)
    assert abs((nurses["group:age"] == "young").mean() - 0.7) <= 1 / len(nurses)
    assert (table["group"] == table["group:sex"]).all()
    for split in ("train_balanced", "val", "test"):
        rows = table[table["split"] == split]
        sizes = rows.groupby(["label", "group:sex", "group:age"]).size()
        assert len(sizes) == 8 and sizes.nunique() == 1  # balanced over the 8 cells


def test_custom_bias_is_respected():
    spec = DoctorNurseSpec(
        n_train=1000, doctor_male=0.9, nurse_female=0.6, doctor_old=0.8, nurse_young=0.5
    )
    plan = split_plan(spec)["train_biased"]
    assert plan["doctor", "male", "young"] + plan["doctor", "male", "old"] == 450
    assert plan["nurse", "female", "young"] + plan["nurse", "female", "old"] == 300
    assert plan["doctor", "male", "old"] == 360 and plan["doctor", "female", "old"] == 40
    assert plan["nurse", "female", "young"] == 150 and plan["nurse", "male", "young"] == 100
    assert sum(plan.values()) == 1000


def test_masks_are_non_empty_and_inside_the_person_box(small_dataset):
    table = pd.read_csv(small_dataset, keep_default_na=False)
    root = small_dataset.parent
    for row in table.sample(60, random_state=0).to_dict("records"):
        x0, y0, x1, y1 = (int(v) for v in row["box:person"].split())
        job = "stethoscope" if row["label"] == "doctor" else "badge"
        assert (
            row[f"mask:{job}"]
            and not row[f"mask:{'badge' if job == 'stethoscope' else 'stethoscope'}"]
        )
        assert bool(row["mask:wrinkles"]) == (row["group:age"] == "old")
        columns = ["mask:hair", "mask:face", "mask:clothes", f"mask:{job}"]
        for column in columns + (["mask:wrinkles"] if row["mask:wrinkles"] else []):
            mask = np.asarray(Image.open(root / row[column])) > 0
            assert mask.any(), (row["image"], column)
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        if row["mask:wrinkles"]:  # the wrinkles are drawn on the face and counted in its mask
            wrinkles = np.asarray(Image.open(root / row["mask:wrinkles"])) > 0
            face = np.asarray(Image.open(root / row["mask:face"])) > 0
            assert not (wrinkles & ~face).any()


def _union(masks: list[dict[str, np.ndarray]], parts: tuple[str, ...]) -> np.ndarray:
    union = np.zeros_like(masks[0]["person"])
    for m in masks:
        for part in parts:
            union |= m[part]
    return union


def test_twins_differ_only_inside_their_attribute_regions():
    for seed in range(40):
        params = sample_params(np.random.default_rng(seed), 64)
        for label, cue in JOB_CUES.items():
            for age in AGES:  # sex twins, at either age
                a, masks_a = render(params, label, "male", age)
                b, masks_b = render(params, label, "female", age)
                diff = (np.asarray(a) != np.asarray(b)).any(axis=2)
                assert diff.any()
                assert not (diff & ~_union([masks_a, masks_b], PROTECTED_PARTS)).any()
                assert not (diff & ~_union([masks_a, masks_b], ATTRIBUTE_PARTS["sex"])).any()
                assert (masks_a[cue] == masks_b[cue]).all() and not (diff & masks_a[cue]).any()
            for sex in SEXES:  # age twins, of either sex: only hair colour and wrinkles change
                a, masks_a = render(params, label, sex, "young")
                b, masks_b = render(params, label, sex, "old")
                diff = (np.asarray(a) != np.asarray(b)).any(axis=2)
                assert diff.any() and masks_b["wrinkles"].any() and not masks_a["wrinkles"].any()
                assert not (diff & ~_union([masks_a, masks_b], ATTRIBUTE_PARTS["age"])).any()
                assert (masks_a["hair"] == masks_b["hair"]).all()
                assert (masks_a[cue] == masks_b[cue]).all() and not (diff & masks_a[cue]).any()


def test_every_test_image_has_a_sex_twin_and_an_age_twin(small_dataset):
    table = pd.read_csv(small_dataset, keep_default_na=False)
    test = table[table["split"] == "test"]
    for column in ("twin", "twin:sex", "twin:age"):
        assert (test[column] != "").all()
        assert (table[table["split"] != "test"][column] == "").all()
    assert (table["twin"] == table["twin:sex"]).all()
    root = small_dataset.parent

    def read(value: str) -> np.ndarray:
        return np.asarray(Image.open(root / value))

    for row in test.head(10).to_dict("records"):
        original = read(row["image"])
        hair_face = (read(row["mask:hair"]) > 0) | (read(row["mask:face"]) > 0)
        changed = (original != read(row["twin:sex"])).any(axis=2)
        assert changed.any()
        # Outside the original's protected regions a change can only come from the twin's longer
        # (or shorter) hair, which lies in the upper body; the lower image is identical.
        assert not changed[48:][~hair_face[48:]].any()
        # The age twin keeps the hair's shape: only hair colour and the wrinkles change.
        changed = (original != read(row["twin:age"])).any(axis=2)
        assert changed.any() and not (changed & ~hair_face).any()


def test_twins_leave_every_pixel_of_the_job_cue_unchanged(small_dataset):
    table = pd.read_csv(small_dataset, keep_default_na=False)
    test = table[table["split"] == "test"]
    root = small_dataset.parent

    def read(value: str) -> np.ndarray:
        return np.asarray(Image.open(root / value))

    checked = 0
    for row in test.to_dict("records"):
        cue = read(row[f"mask:{JOB_CUES[row['label']]}"]) > 0
        assert cue.sum() >= 10
        original = read(row["image"])
        for column in ("twin:sex", "twin:age"):
            assert (read(row[column])[cue] == original[cue]).all(), (row["image"], column)
            checked += 1
    assert checked == 2 * len(test) > 0


def test_the_job_cue_is_equally_visible_in_every_group(small_dataset):
    """Mean visible cue pixels (from the mask files) within 5% between the groups of each
    attribute, per split and class; the old drawing, with long hair over the stethoscope, gave
    about 20 pixels for women against 37 for men."""
    table = pd.read_csv(small_dataset, keep_default_na=False)
    root = small_dataset.parent
    table["cue"] = [
        int((np.asarray(Image.open(root / row[f"mask:{JOB_CUES[row['label']]}"])) > 0).sum())
        for row in table.to_dict("records")
    ]
    for attribute in ("group:sex", "group:age"):
        means = table.groupby(["split", "label", attribute])["cue"].mean().unstack(attribute)
        assert means.shape == (8, 2) and not means.isna().any().any()
        gap = (means.max(axis=1) - means.min(axis=1)) / means.mean(axis=1)
        assert (gap <= 0.05).all(), means


def test_generated_manifest_has_two_valid_attributes(small_dataset):
    assert validate(small_dataset) == []
    manifest = read_manifest(small_dataset)
    assert manifest.attributes == ["sex", "age"]
    assert manifest.group_column("age") == "group:age"
    assert manifest.twin_columns == {"sex": "twin:sex", "age": "twin:age"}
    assert set(manifest.table["group:age"]) == set(AGES)
    assert (manifest.table["group"] == manifest.table["group:sex"]).all()
    assert "wrinkles" in manifest.regions
    assert manifest.extra_columns == ["job_cue"]


def test_same_seed_gives_identical_files_and_another_seed_other_people(tmp_path):
    spec = DoctorNurseSpec(seed=11, n_train=20, n_val=8, n_test=8)
    first = generate(spec, tmp_path / "a", progress=False)
    second = generate(spec, tmp_path / "b", progress=False, workers=1)
    assert first.read_bytes() == second.read_bytes()
    assert _hashes(first.parent) == _hashes(second.parent)
    other = generate(
        DoctorNurseSpec(seed=12, n_train=20, n_val=8, n_test=8), tmp_path / "c", progress=False
    )
    a = _hashes(first.parent)
    c = _hashes(other.parent)
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != c.get(k) for k in images) == len(images)


def test_generation_refuses_to_overwrite_and_leaves_no_partial_folder(tmp_path):
    spec = DoctorNurseSpec(n_train=8, n_val=4, n_test=4)
    generate(spec, tmp_path / "d", progress=False)
    with pytest.raises(FileExistsError):
        generate(spec, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="doctor_male"):
        generate(DoctorNurseSpec(doctor_male=1.5), tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="doctor_old"):
        generate(DoctorNurseSpec(doctor_old=-0.1), tmp_path / "e", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_the_data_set_carries_the_shortcut(demo_run):
    """The demo trains the same CNN on train_biased and on train_balanced (same recipe)."""
    metrics = json.loads((demo_run / "metrics.json").read_text())
    biased = metrics["models"]["biased"]["performance"]["per_cell"]
    balanced = metrics["models"]["unbiased"]["performance"]["per_cell"]
    minority = ("doctor / female", "nurse / male")
    majority = ("doctor / male", "nurse / female")
    for cell in minority:
        assert biased[cell]["value"] < min(biased[m]["value"] for m in majority) - 0.15, cell
        assert biased[cell]["ci_high"] < balanced[cell]["ci_low"], cell
    for cell in minority + majority:
        assert balanced[cell]["value"] >= 0.85, cell


# -- the manifest loader ----------------------------------------------------------------------


def _image(path: Path, size=(40, 20), colour=(200, 10, 10)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def _noise(path: Path, size=(40, 20)) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path: Path, size=(40, 20), box=(10, 4, 20, 8)) -> None:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    mask.save(path)


@pytest.fixture
def valid_manifest(tmp_path: Path) -> Path:
    for name in ("a", "b"):
        _image(tmp_path / f"{name}.png")
        _mask(tmp_path / f"{name}_hair.png")
    Image.new("L", (40, 20), 120).save(tmp_path / "grey.png")  # greyscale image
    rows = [
        {
            "image": "a.png",
            "label": "cat",
            "group": "x",
            "split": "test",
            "mask:hair": "a_hair.png",
            "box:face": "10 4 20 8",
            "twin": "b.png",
            "note": "kept",
        },
        {
            "image": "b.png",
            "label": "dog",
            "group": "",
            "split": "test",
            "mask:hair": "b_hair.png",
            "box:face": "",
            "twin": "",
            "note": "",
        },
        {
            "image": "grey.png",
            "label": "dog",
            "group": "y",
            "split": "train",
            "mask:hair": "",
            "box:face": "0 0 40 20",
            "twin": "",
            "note": "",
        },
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def test_valid_manifest_loads_with_masks_and_boxes_scaled(valid_manifest):
    before = _hashes(valid_manifest.parent)
    manifest = read_manifest(valid_manifest)
    assert manifest.regions == ["face", "hair"]
    assert manifest.extra_columns == ["note"]
    samples = load_samples(manifest, manifest.split("test"), ["cat", "dog"], 20)
    assert samples.images.shape == (2, 3, 20, 20)
    # 40x20 -> 20x20: x is halved, y kept; the box "10 4 20 8" becomes x 5..10, y 4..8.
    assert samples.region_boxes["face"][0].tolist() == [5, 4, 10, 8]
    assert samples.region_boxes["hair"][0].tolist() == [5, 4, 10, 8]
    assert int(samples.regions["face"][0].sum()) == 5 * 4
    assert int(samples.regions["hair"][0].sum()) == 5 * 4
    assert samples.region_present["face"].tolist() == [True, False]
    assert samples.twin_present.tolist() == [True, False]
    image, label, position = ManifestDataset(samples)[1]
    assert image.shape == (3, 20, 20) and int(label) == 1 and position == 1
    grey = load_samples(manifest, manifest.split("train"), ["cat", "dog"], 20)
    assert grey.images.shape == (1, 3, 20, 20)
    assert _hashes(valid_manifest.parent) == before  # nothing modified


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda t, root: t.loc.__setitem__((0, "image"), "missing.png"),
            "line 2, image: file not found: missing.png",
        ),
        (
            lambda t, root: [
                (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"),
                t.loc.__setitem__((0, "image"), "bad.png"),
            ],
            "line 2, image: unreadable or truncated image bad.png",
        ),
        (
            lambda t, root: [
                (root / "cut.png").write_bytes((root / "a.png").read_bytes()[:60]),
                t.loc.__setitem__((1, "image"), "cut.png"),
            ],
            "line 3, image: unreadable or truncated image cut.png",
        ),
        (
            lambda t, root: [
                _mask(root / "small.png", size=(10, 10)),
                t.loc.__setitem__((0, "mask:hair"), "small.png"),
            ],
            "line 2, mask:hair: small.png is 10x10 but the image is 40x20",
        ),
        (
            lambda t, root: t.loc.__setitem__((0, "box:face"), "30 4 50 8"),
            "line 2, box:face: box '30 4 50 8' lies outside the 40x20 image",
        ),
        (
            lambda t, root: t.loc.__setitem__((0, "box:face"), "20 4 10 8"),
            "line 2, box:face: box '20 4 10 8' has x1<=x0",
        ),
        (
            lambda t, root: t.loc.__setitem__((0, "box:face"), "1 2 3"),
            "line 2, box:face: '1 2 3' must be four numbers",
        ),
        (
            lambda t, root: setattr(
                t, "columns", ["mask_hair" if c == "note" else c for c in t.columns]
            ),
            "column 'mask_hair' is not a known column; did you mean 'mask:hair'?",
        ),
        (
            lambda t, root: setattr(
                t, "columns", ["msk:face" if c == "note" else c for c in t.columns]
            ),
            "did you mean 'mask:face'?",
        ),
        (lambda t, root: t.loc.__setitem__((1, "label"), ""), "line 3, label: empty label"),
        (
            lambda t, root: t.loc.__setitem__((0, "image"), "../outside.png"),
            "line 2, image: '../outside.png' leaves the manifest's folder",
        ),
        (
            lambda t, root: t.loc.__setitem__((0, "mask:hair"), "/etc/passwd"),
            "line 2, mask:hair: '/etc/passwd' is an absolute path",
        ),
        (
            lambda t, root: t.loc.__setitem__((0, "twin"), "sub/../../x.png"),
            "leaves the manifest's folder",
        ),
        (
            lambda t, root: t.loc.__setitem__(2, t.loc[1].tolist()),
            "line 4: duplicate of an earlier row",
        ),
    ],
)
def test_broken_manifests_name_the_row_and_the_problem(valid_manifest, edit, expected):
    table = pd.read_csv(valid_manifest, dtype=str, keep_default_na=False)
    edit(table, valid_manifest.parent)
    table.to_csv(valid_manifest, index=False)
    problems = validate(valid_manifest)
    assert any(expected in p for p in problems), problems
    with pytest.raises(ManifestError, match="problem"):
        read_manifest(valid_manifest)


def test_truncated_images_are_caught_even_after_weasyprint_is_imported(valid_manifest):
    import weasyprint  # noqa: F401 - it sets PIL's LOAD_TRUNCATED_IMAGES globally
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES
    root = valid_manifest.parent
    _noise(root / "full.png")
    (root / "a.png").write_bytes((root / "full.png").read_bytes()[:-300])
    assert any(
        "line 2, image: unreadable or truncated image a.png" in p for p in validate(valid_manifest)
    )


def test_without_decoding_only_headers_are_read(valid_manifest):
    root = valid_manifest.parent
    _noise(root / "full.png")
    (root / "a.png").write_bytes((root / "full.png").read_bytes()[:-300])  # truncated pixels
    _mask(root / "small.png", size=(10, 10))
    table = pd.read_csv(valid_manifest, dtype=str, keep_default_na=False)
    table.loc[1, "mask:hair"] = "small.png"
    table.loc[1, "twin"] = "gone.png"
    table.to_csv(valid_manifest, index=False)
    decoded = validate(valid_manifest)
    headers = validate(valid_manifest, decode=False)
    assert any("line 2, image: unreadable or truncated image a.png" in p for p in decoded)
    assert not any("a.png" in p for p in headers)  # the map will name it when it decodes it
    for problem in ("line 3, mask:hair: small.png is 10x10", "line 3, twin: file not found"):
        assert any(problem in p for p in headers), headers


def test_all_problems_are_reported_at_once(valid_manifest):
    table = pd.read_csv(valid_manifest, dtype=str, keep_default_na=False)
    table.loc[0, "image"] = "nope.png"
    table.loc[1, "label"] = ""
    table.loc[2, "box:face"] = "5 5 1 1"
    table.to_csv(valid_manifest, index=False)
    problems = validate(valid_manifest)
    assert [p.split(",")[0] for p in problems] == ["line 2", "line 3", "line 4"]


def test_unreadable_or_missing_manifest(tmp_path):
    assert validate(tmp_path / "none.csv") == [f"manifest not found: {tmp_path / 'none.csv'}"]
    (tmp_path / "m.csv").write_text("label\ncat\n")
    assert validate(tmp_path / "m.csv") == ["missing required column 'image'"]


def test_header_sizes_read_from_png_bytes_equal_pillows(tmp_path):
    """The header-only check reads a PNG's IHDR itself; every PNG mode gives Pillow's size, and
    whatever it cannot vouch for (another format, a bad CRC, not a PNG) goes to Pillow."""
    from audit.data.manifest import _image_size, _png_header_size

    modes = {"RGB": (37, 21), "RGBA": (5, 64), "L": (40, 20), "1": (9, 3), "I;16": (12, 7)}
    for mode, size in modes.items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        Image.new(mode, size).save(path)
        assert _png_header_size(path) == size == Image.open(path).size, mode
    Image.new("P", (8, 6)).save(tmp_path / "p.png")
    assert _png_header_size(tmp_path / "p.png") == (8, 6)
    Image.new("RGB", (30, 10)).save(tmp_path / "x.jpg")
    assert _png_header_size(tmp_path / "x.jpg") is None
    assert _image_size(tmp_path / "x.jpg", decode=False) == (30, 10)  # through Pillow
    broken = bytearray((tmp_path / "RGB.png").read_bytes())
    broken[30] ^= 0xFF  # the IHDR's CRC no longer matches
    (tmp_path / "crc.png").write_bytes(bytes(broken))
    assert _png_header_size(tmp_path / "crc.png") is None
    with pytest.raises((OSError, SyntaxError)):  # what validate() reports as unreadable
        _image_size(tmp_path / "crc.png", decode=False)


def test_symbolic_links_are_followed_before_the_root_check(valid_manifest, tmp_path_factory):
    from audit.data.manifest import _RealPaths

    root = valid_manifest.parent
    outside = tmp_path_factory.mktemp("outside")
    _image(outside / "secret.png")
    (root / "inner").mkdir()
    (root / "inner" / "link.png").symlink_to(root / "a.png")  # stays inside: fine
    (root / "out.png").symlink_to(outside / "secret.png")
    (root / "away").symlink_to(outside, target_is_directory=True)
    real = _RealPaths(str(root.resolve()))
    for value in ("a.png", "inner/link.png", "out.png", "away/secret.png", "inner/../a.png"):
        assert real(value) == str((root / value).resolve()), value
    table = pd.read_csv(valid_manifest, dtype=str, keep_default_na=False)
    table.loc[0, "image"] = "inner/link.png"
    table.loc[1, "image"] = "out.png"
    table.loc[2, "image"] = "away/secret.png"
    table.to_csv(valid_manifest, index=False)
    for decode in (True, False):
        problems = validate(valid_manifest, decode=decode)
        assert not any("line 2" in p for p in problems), problems
        assert any("line 3, image: 'out.png' leaves the manifest's folder" in p for p in problems)
        assert any("line 4, image: 'away/secret.png' leaves" in p for p in problems)


@pytest.mark.parametrize(
    ("value", "unsafe"),
    [
        ("a/b.png", None),
        ("a/../b.png", "('..')"),
        ("a\\..\\b.png", "('..')"),
        ("/etc/x.png", "absolute"),
        ("C:\\x.png", "absolute"),
        ("\\\\server\\share\\x.png", "absolute"),
        ("~/x.png", "absolute"),
        ("a:b.png", None),
        ("..x.png", None),
    ],
)
def test_unsafe_paths_by_string(value, unsafe):
    from audit.data.manifest import _unsafe_path

    found = _unsafe_path(value)
    assert (found is None) if unsafe is None else (unsafe in found)

"""Input faults that used to pass silently (issue 19): label spellings, classes training never saw,
attributes with a single value, manifests that are not UTF-8. Each is refused with one line
naming the file and the lines, or handled exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from audit.cli import main
from audit.config import from_dict
from audit.data.manifest import ManifestError, read_manifest, validate
from audit.metrics.groups import group_metrics
from audit.pipeline.plan import check_eval_split
from audit.runner import AuditError
from tests.conftest import to_toml


def _write(root: Path, rows: list[dict[str, str]]) -> Path:
    for row in rows:
        if not (root / row["image"]).exists():
            shade = sum(map(ord, row["image"])) % 256
            Image.fromarray(np.full((16, 16, 3), shade, np.uint8)).save(root / row["image"])
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _rows(labels: list[str], split: str, sexes: list[str], start: int = 0) -> list[dict[str, str]]:
    return [
        {"image": f"i{start + i}.png", "label": label, "group:sex": sex, "split": split}
        for i, (label, sex) in enumerate(zip(labels, sexes, strict=True))
    ]


# -- labels that differ only by case or surrounding spaces ------------------------------------
def test_label_spellings_that_differ_by_case_or_spaces_are_refused_with_their_lines(tmp_path):
    rows = _rows(
        ["doctor", "nurse", "Doctor ", "doctor", "nurse"], "test", ["f", "m", "f", "m", "f"]
    )
    path = _write(tmp_path, rows)
    assert validate(path) == [
        "label: 'Doctor ' on line 4; 'doctor' on lines 2, 5: these differ only by case or "
        "surrounding spaces; write one spelling (as they are, they would be separate classes or "
        "merged without notice)"
    ]
    with pytest.raises(ManifestError, match="line 4"):
        read_manifest(path)


def test_group_spellings_are_refused_and_a_consistent_padding_is_not(tmp_path):
    rows = _rows(["a", "b", "a", "b"], "test", ["female", "Female", "male", "male"])
    problems = validate(_write(tmp_path, rows))
    assert problems == [
        "group:sex: 'Female' on line 3; 'female' on line 2: these differ only by case or "
        "surrounding spaces; write one spelling (as they are, they would be separate groups or "
        "merged without notice)"
    ]
    # The same spelling everywhere, padded or not, is one value (cells are stripped).
    rows = _rows([" a", " b", " a", " b"], "test", ["f", "m", "f", "m"])
    path = _write(tmp_path, rows)
    assert validate(path) == []
    assert sorted(set(read_manifest(path).table["label"])) == ["a", "b"]


# -- classes the training split never has -----------------------------------------------------
def _config(path: Path, **data: object) -> dict:
    return {
        "data": {"manifest": str(path), "protected_regions": ["hair"], "core_regions": [], **data},
        "model": [{"name": "m", "train_split": "train", "epochs": 1}],
    }


def _unseen_manifest(root: Path) -> Path:
    train = _rows(["doctor", "nurse", "doctor", "nurse"], "train", ["f", "m", "m", "f"])
    test = _rows(["doctor", "surgeon", "nurse", "surgeon"], "test", ["f", "m", "m", "f"], start=4)
    return _write(root, train + test)


def test_a_class_training_never_saw_is_refused_naming_its_lines(tmp_path):
    path = _unseen_manifest(tmp_path)
    config = from_dict(_config(path), tmp_path)
    with pytest.raises(AuditError) as caught:
        check_eval_split(config, read_manifest(path), [], print)
    message = str(caught.value)
    assert (
        "eval split 'test' has class(es) that model 'm' never saw in its train_split 'train'"
        in message
    )
    assert "'surgeon' on lines 7, 9" in message
    assert "data.allow_unseen_classes = true" in message


def test_the_cli_refuses_it_in_one_line_exit_2(tmp_path):
    path = _unseen_manifest(tmp_path)
    config = tmp_path / "audit.toml"
    config.write_text(to_toml(_config(path)))
    # The manifest has no regions: give it a box column so the config's region exists.
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table["box:hair"] = "0 0 4 4"
    table.to_csv(path, index=False)
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "'surgeon' on lines 7, 9" in lines[-1]
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_explicit_key_allows_unseen_classes_and_says_so(tmp_path):
    path = _unseen_manifest(tmp_path)
    config = from_dict(_config(path, allow_unseen_classes=True), tmp_path)
    said: list[str] = []
    assert check_eval_split(config, read_manifest(path), [], said.append) == ([], {})
    assert len(said) == 1 and "'surgeon' on lines 7, 9" in said[0]
    assert "allowed by data.allow_unseen_classes" in said[0]


# -- attributes with a single value -----------------------------------------------------------
def _attribute_manifest(root: Path) -> Path:
    rows = [
        {
            "image": f"i{i}.png",
            "label": "ab"[i % 2],
            "group:sex": "fm"[i // 2 % 2],
            "group:site": "lab" if i < 8 else "home",
            "split": "test" if i < 8 else "train",
        }
        for i in range(12)
    ]
    return _write(root, rows)


def test_an_attribute_with_one_value_is_left_out_of_gates_and_intersections(tmp_path):
    path = _attribute_manifest(tmp_path)
    manifest = read_manifest(path)
    said: list[str] = []
    kept, left_out = check_eval_split(from_dict(_config(path), tmp_path), manifest, [], said.append)
    assert (kept, left_out) == (["sex"], {"site": ["lab"]})
    assert said == [
        "warning: attribute 'site' has only the value 'lab' in eval split 'test': left out of "
        "the fairness figures, gates and intersections"
    ]
    # What the runner then measures: one block for sex, no "sex x site" intersection.
    table = manifest.split("test").assign(prediction=lambda t: t["label"])
    blocks = group_metrics(table, kept, ["a", "b"], np.ones((1, len(table))))
    assert list(blocks) == ["sex"]
    # Named explicitly, it is left out too; when nothing is left the audit is refused.
    kept = check_eval_split(
        from_dict(_config(path, attributes=["sex", "site"]), tmp_path),
        manifest,
        ["sex", "site"],
        said.append,
    )[0]
    assert kept == ["sex"]
    with pytest.raises(AuditError, match="no protected attribute has two or more groups"):
        check_eval_split(from_dict(_config(path), tmp_path), manifest, ["site"], said.append)


def test_attributes_with_two_values_are_kept_as_given(tmp_path):
    path = _attribute_manifest(tmp_path)
    config = from_dict(_config(path, eval_split="train"), tmp_path)
    config.model[0].train_split = "test"
    said: list[str] = []
    # In the train split site has one value too (home): only sex has two there as well.
    assert check_eval_split(config, read_manifest(path), [], said.append)[0] == ["sex"]
    table = pd.read_csv(path, dtype=str)
    table.loc[table["split"] == "train", "group:site"] = ["home", "clinic", "home", "clinic"]
    table.to_csv(path, index=False)
    said.clear()
    assert check_eval_split(config, read_manifest(path), [], said.append) == ([], {})
    assert said == []  # nothing left out: the attributes stay as given ([] = all)


# -- a manifest that is not UTF-8 -------------------------------------------------------------
def test_a_manifest_that_is_not_utf8_names_the_line_and_how_to_resave(tmp_path):
    path = _write(tmp_path, _rows(["a", "b", "a"], "test", ["f", "m", "m"]))
    text = path.read_text(encoding="utf-8").splitlines()
    text[3] = text[3].replace(",m,", ",Müller,")
    path.write_bytes(("\n".join(text) + "\n").encode("cp1252"))
    (problem,) = validate(path)
    assert problem.startswith("line 4 is not UTF-8 (byte 0xFC at byte ")
    assert "re-save the file as UTF-8" in problem and "CSV UTF-8" in problem
    result = CliRunner().invoke(main, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == f"{path}: {problem}"
    with pytest.raises(ManifestError, match="line 4 is not UTF-8"):
        read_manifest(path)


@pytest.mark.slow
def test_a_run_leaves_a_one_valued_attribute_out_of_metrics_and_gates(small_dataset, tmp_path):
    import json
    import shutil

    from tests.conftest import write_config

    data = tmp_path / "data"
    shutil.copytree(small_dataset.parent, data)
    table = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    table["group:site"] = np.where(table["split"] == "test", "clinic", "home")
    table.to_csv(data / "manifest.csv", index=False)
    config = write_config(
        tmp_path / "audit.toml",
        data / "manifest.csv",
        bootstrap=20,
        model=[{"name": "a", "train_split": "train_biased", "epochs": 1}],
        explain={"methods": ["gradcam"], "samples_per_cell": 1},
        trust={"enabled": False},
    )
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["run", str(config), "--out", str(run), "--no-report", "--quiet", "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "attribute 'site' has only the value 'clinic'" in (run / "run.log").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["models"]["a"]["fairness"]) == ["sex", "age", "sex x age"]
    assert metrics["data"]["attributes_left_out"] == {"site": ["clinic"]}
    assert not [g for g in metrics["gates"] if "site" in json.dumps(g)]
    from audit.report.render import render_html
    from tests.test_report_trust import _text

    assert (
        "Not audited (left out of the fairness figures, gates and intersections, for want of two "
        "groups in split “test”): attribute “site”, only the value “clinic”."
    ) in _text(render_html(run))

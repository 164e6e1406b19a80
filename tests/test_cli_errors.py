"""The command line on a newcomer's mistakes and outputs (issue 8, items 1, 3, 4 and 8).

Bad input gives one line `error: ...` naming the file, exit code 2 and no traceback; `explain`
writes only under --out; a `[gates]` table applies exactly the gates it names; help is not cut.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from audit.cli import main
from audit.config import GateConfig, from_dict
from audit.metrics.gates import GATES, evaluate_gates, resolve_gates
from audit.models.io import save_checkpoint
from audit.models.zoo import SmallCNN

MODEL = {"model": [{"name": "m", "train_split": "train"}]}


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(SmallCNN(2), path, arch="small_cnn", classes=["a", "b"], meta={})
    return path


def _png(path: Path, colour: tuple[int, int, int], size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size, size, 3), np.uint8)
    array[:] = colour
    array[size // 4 : size // 2, size // 4 : size // 2] = 255 - np.array(colour, np.uint8)
    Image.fromarray(array).save(path)
    return path


# -- 1. explain on a file that is not an image, or a missing file -----------------------------
@pytest.mark.parametrize("kind", ["text", "missing", "folder", "truncated"])
def test_explain_bad_image_is_one_line_exit_2(tmp_path, checkpoint, kind):
    bad = tmp_path / "x.png"
    if kind == "text":
        bad.write_text("hi\n")
    elif kind == "folder":
        bad.mkdir()
    elif kind == "truncated":
        _png(tmp_path / "full.png", (10, 200, 30))
        bad.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    good = _png(tmp_path / "good.png", (200, 10, 30))
    out = tmp_path / "out"
    result = invoke(
        "explain", good, bad, "--checkpoint", checkpoint, "--classes", "a,b", "--out", out
    )
    assert_one_line_error(result, str(bad))
    assert not out.exists()


# -- 3. explain writes everything under --out, named after the inputs -------------------------
def test_explain_writes_only_under_out_named_after_inputs(tmp_path, checkpoint):
    first = _png(tmp_path / "in" / "a" / "x.png", (200, 20, 20), size=40)
    second = _png(tmp_path / "in" / "b" / "x.png", (20, 20, 200), size=40)
    third = _png(tmp_path / "in" / "y.jpg", (20, 200, 20), size=40)
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "explain"
    result = invoke(
        "explain",
        first,
        second,
        third,
        "--checkpoint",
        checkpoint,
        "--classes",
        "a,b",
        "--method",
        "gradcam",
        "--method",
        "guided_gradcam",
        "--image-size",
        "32",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in parent.iterdir()] == ["explain"]  # nothing beside --out
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(
        [
            "predictions.csv",
            *[
                f"{d}/{f}"
                for d in ("x", "x-2", "y")
                for f in ("gradcam.png", "guided_gradcam.png", "image.png")
            ],
        ]
    )
    table = pd.read_csv(out / "predictions.csv")
    assert table["image"].tolist() == [str(first), str(second), str(third)]
    assert table["folder"].tolist() == ["x", "x-2", "y"]
    # each folder holds its own input: the saved image is the input resized to 32 and upscaled 4x
    for source, folder in ((first, "x"), (second, "x-2"), (third, "y")):
        saved = np.asarray(Image.open(out / folder / "image.png"))
        assert saved.shape == (128, 128, 3)
        expected = F.interpolate(
            torch.from_numpy(np.array(Image.open(source).convert("RGB")))
            .permute(2, 0, 1)[None]
            .float(),
            size=(32, 32),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        expected = expected.round().repeat_interleave(4, 1).repeat_interleave(4, 2)
        assert np.abs(saved.astype(float) - expected.permute(1, 2, 0).numpy()).max() <= 1
    # a second run into another folder of the same parent does not touch the first
    before = (out / "x" / "image.png").read_bytes()
    result = invoke(
        "explain", third, "--checkpoint", checkpoint, "--classes", "a,b", "--out", parent / "other"
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in parent.iterdir()) == ["explain", "other"]
    assert (out / "x" / "image.png").read_bytes() == before


# -- 4. gates: without a table the defaults; with one only its keys; `defaults = true` adds ----
def test_gates_without_table_are_the_defaults():
    config = from_dict(MODEL)
    assert resolve_gates(config.gates.table()) == {
        k: (g.default, "default") for k, g in GATES.items() if not g.opt_in
    }
    assert config.gates.min_worst_group_accuracy == GATES["min_worst_group_accuracy"].default


def test_gates_table_applies_only_its_keys():
    config = from_dict({**MODEL, "gates": {"max_flip_rate": 0.2}})
    assert resolve_gates(config.to_dict()["gates"]) == {"max_flip_rate": (0.2, "config")}
    assert config.gates.min_worst_group_accuracy is None
    assert resolve_gates(from_dict({**MODEL, "gates": {}}).to_dict()["gates"]) == {}


def test_gates_defaults_true_adds_the_rest():
    config = from_dict({**MODEL, "gates": {"max_flip_rate": 0.2, "defaults": True}})
    resolved = resolve_gates(config.to_dict()["gates"])
    expected = {k: (g.default, "default") for k, g in GATES.items() if not g.opt_in}
    expected["max_flip_rate"] = (0.2, "config")
    assert resolved == expected
    # config.json records the resolved gates and reads back to the same gates and sources
    recorded = config.to_dict()["gates"]
    assert recorded["defaults"] is False
    assert {k: recorded[k] for k in expected} == {k: v[0] for k, v in expected.items()}
    assert "min_slice_accuracy" not in recorded  # an opt-in gate is never a default
    again = from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict()["gates"] == recorded


def test_gate_config_has_one_field_per_gate_and_bad_thresholds_are_named():
    fields = [f.name for f in dataclasses.fields(GateConfig)]
    assert fields == [*GATES, "defaults", "from_defaults"]
    for gate in GATES.values():
        assert gate.protects.strip() and gate.why_default.strip() and gate.op in (">=", "<=")
    from audit.config import ConfigError

    with pytest.raises(ConfigError, match="gates.max_flip_rate must be between 0 and 1"):
        from_dict({**MODEL, "gates": {"max_flip_rate": 1.5}})
    with pytest.raises(ConfigError, match="unknown gate 'max_flips'"):
        from_dict({**MODEL, "gates": {"from_defaults": ["max_flips"]}})


def test_accuracy_gap_default_explanation_matches_the_arithmetic():
    # why_default says: 400 per group at 90% accuracy -> 95% interval of a difference ~ +/-4 points
    half_width = 1.96 * math.sqrt(2 * 0.9 * 0.1 / 400)
    assert "400 test images per group at 90%" in GATES["max_accuracy_gap"].why_default
    assert round(half_width * 100) == 4 < GATES["max_accuracy_gap"].default * 100


def _metrics(worst: float, flips: float) -> dict:
    return {
        "models": {
            "m": {
                "performance": {
                    "worst_group_accuracy": {"value": worst, "ci_low": 0.0, "ci_high": 1.0},
                    "accuracy_gap": {"value": 0.01},
                },
                "attention": {"gradcam": {"overall": {"protected": {"share": {"value": 0.1}}}}},
                "counterfactual": {"flip_rate": {"value": flips}},
            }
        }
    }


def test_gate_rows_carry_source_protects_and_why_default():
    config = from_dict({**MODEL, "gates": {"max_flip_rate": 0.2, "defaults": True}})
    rows = evaluate_gates(_metrics(0.5, 0.15), config.to_dict()["gates"])
    by_gate = {r["gate"]: r for r in rows}
    assert list(by_gate) == [k for k, g in GATES.items() if not g.opt_in]
    assert by_gate["max_flip_rate"]["source"] == "config"
    assert by_gate["max_flip_rate"]["passed"] is True  # 0.15 <= 0.2 (the default 0.10 would fail)
    assert by_gate["min_worst_group_accuracy"]["source"] == "default"
    assert by_gate["min_worst_group_accuracy"]["passed"] is False
    for key, row in by_gate.items():
        assert row["protects"] == GATES[key].protects
        assert row["why_default"] == GATES[key].why_default
    only = evaluate_gates(
        _metrics(0.5, 0.15),
        from_dict({**MODEL, "gates": {"max_flip_rate": 0.2}}).to_dict()["gates"],
    )
    assert [(r["gate"], r["passed"]) for r in only] == [("max_flip_rate", True)]


def test_check_applies_the_recorded_gates_and_names_defaults(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics(0.5, 0.15)))
    config = from_dict({**MODEL, "gates": {"max_flip_rate": 0.2}})
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    result = invoke("check", run)
    assert result.exit_code == 0, result.output  # the failing worst-group gate was left out
    assert result.output.strip() == "PASS m: counterfactual flip rate = 15.0% (must be <= 20%)"
    config = from_dict(MODEL)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    result = invoke("check", run)
    assert result.exit_code == 1
    assert "FAIL m: worst-group accuracy = 50.0% (must be >= 85% (default))" in result.output


# -- 8. small ones ----------------------------------------------------------------------------
def test_data_validate_missing_file_exits_2(tmp_path):
    assert_one_line_error(
        invoke("data", "validate", tmp_path / "nope.csv"), "nope.csv", "not found"
    )
    assert_one_line_error(invoke("data", "validate", tmp_path), str(tmp_path), "is a folder")


def test_check_missing_path_says_not_found(tmp_path):
    line = assert_one_line_error(invoke("check", tmp_path / "nowhere"), "nowhere", "not found")
    assert "metrics.json" not in line
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("check", tmp_path / "empty"), "metrics.json is missing")


def test_doctor_nurse_quiet_hides_the_progress_bar(tmp_path):
    args = ["data", "doctor-nurse", "--n-train", 4, "--n-val", 4, "--n-test", 4, "--image-size", 32]
    loud = invoke(*args, "--out", tmp_path / "loud")
    assert loud.exit_code == 0, loud.output
    assert "doctor/nurse:" in loud.output and "img/s" in loud.output  # the bar, shown by default
    quiet = invoke(*args, "--out", tmp_path / "quiet", "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output.strip() == f"wrote {tmp_path / 'quiet' / 'manifest.csv'}"


@pytest.mark.parametrize("group", [(), ("data",)])
def test_help_does_not_cut_command_descriptions(group):
    from audit.cli import data

    commands = main.commands if not group else data.commands
    result = CliRunner().invoke(main, [*group, "--help"], terminal_width=80)
    assert result.exit_code == 0
    listed = " ".join(result.output.split("Commands:")[1].split())
    assert "..." not in listed
    for command in commands.values():
        first_paragraph = " ".join(command.help.split("\n\n")[0].split())
        assert first_paragraph in listed, first_paragraph

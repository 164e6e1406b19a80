"""Selection and DFR through `audit run`: the record in metrics.json, the harm judgement, and the
one-line errors before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit.cli import main


def invoke(*args: object):  # noqa: ANN201
    return CliRunner().invoke(main, [str(a) for a in args])


def write(path: Path, manifest: Path, models: str, val_split: str = "val") -> Path:
    """A small config: the given [[model]] tables, no trust checks, no discovery."""
    path.write_text(
        f"""seed = 0
bootstrap = 50
[data]
manifest = "{manifest}"
core_regions = ["stethoscope", "badge"]
min_cell_size = 5
val_split = "{val_split}"
{models}
[explain]
methods = ["gradcam"]
samples_per_cell = 1
[trust]
enabled = false
[discovery]
enabled = false
"""
    )
    return path


MODELS = """
[[model]]
name = "plain"
train_split = "train_biased"
epochs = 1
[[model]]
name = "jtt"
train_split = "train_biased"
epochs = 2
mitigation = "jtt"
jtt_epochs = 1
grid = { jtt_upweight = [2, 4] }
[[model]]
name = "dfr"
train_split = "train_biased"
epochs = 1
mitigation = "dfr"
"""


@pytest.mark.slow
def test_a_run_records_selection_dfr_and_harm(small_dataset, tmp_path) -> None:
    config = write(tmp_path / "m.toml", small_dataset, MODELS)
    result = invoke("run", config, "--out", tmp_path / "run", "--no-report", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    models = metrics["models"]
    selection = models["jtt"]["history"]["selection"]
    assert selection["grid"] == {"jtt_upweight": [2, 4]}
    assert [c["values"] for c in selection["candidates"]] == [
        {"jtt_upweight": 2},
        {"jtt_upweight": 4},
    ]
    chosen = selection["candidates"][selection["chosen_index"]]
    assert chosen["val_worst_group_accuracy"] == max(
        c["val_worst_group_accuracy"] for c in selection["candidates"]
    )
    assert 1 <= chosen["best_epoch"] <= 2 and len(chosen["curve"]) == 2
    # the model's entry (and so the report) names the chosen point's values, not the defaults
    assert (
        models["jtt"]["jtt_upweight"]
        == selection["chosen"]["jtt_upweight"]
        == chosen["values"]["jtt_upweight"]
    )
    assert "selection" not in models["plain"]["history"]  # plain training is not selected
    dfr = models["dfr"]["dfr"]
    assert models["dfr"]["mitigation"] == "dfr" and dfr["layer"] == "fc"
    assert dfr["n"] == 40 and dfr["C"] in dfr["C_grid"]
    harm = metrics["mitigation_harm"]
    assert set(harm) == {"jtt", "dfr"} and all(h["baseline"] == "plain" for h in harm.values())


def test_dfr_without_val_groups_is_one_line_error(small_dataset, tmp_path) -> None:
    models = '[[model]]\nname = "d"\ntrain_split = "train_biased"\nmitigation = "dfr"\n'
    config = write(tmp_path / "m.toml", small_dataset, models, val_split="")
    out = tmp_path / "out"
    result = invoke("run", config, "--out", out, "--quiet")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [
        "error: model 'd': dfr needs the val split (data.val_split) with a group label for "
        "every image"
    ]
    assert not out.exists()


def test_a_bad_grid_is_one_line_error(small_dataset, tmp_path) -> None:
    models = (
        '[[model]]\nname = "j"\ntrain_split = "train_biased"\nmitigation = "jtt"\n'
        "grid = { rrr_lambda = [1] }\n"
    )
    config = write(tmp_path / "m.toml", small_dataset, models)
    result = invoke("run", config, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error: ") and "grid key 'rrr_lambda' is not a hyperparameter" in line
    assert "\n" not in line

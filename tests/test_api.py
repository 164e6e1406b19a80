"""The Python API (audit.run, AuditResult), JUnit output and the example notebook."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import audit
from audit.api import AuditResult, _preprocess, table_manifest
from audit.cli import main
from audit.data.manifest import ManifestError, read_manifest
from audit.models.io import save_checkpoint
from audit.models.zoo import SmallCNN
from audit.report.words import gate_figure, threshold_text
from audit.runner import AuditError, RunOptions
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = RunOptions(progress=False, render=False, workers=0)
GATES = {"max_flip_rate": 1.0, "min_worst_group_accuracy": 0.99}


def _config(manifest: Path, **overrides: object) -> dict:
    config = {
        "seed": 0,
        "bootstrap": 50,
        "data": {"manifest": str(manifest), "min_cell_size": 5},
        "explain": {"methods": ["gradcam"], "samples_per_cell": 1},
        "trust": {"enabled": False},
        "gates": GATES,
    }
    return config | overrides


@pytest.fixture(scope="module")
def given_run(small_dataset, tmp_path_factory):
    """One run of a module given in memory beside the same weights loaded from a checkpoint,
    on a DataFrame of 60 test images; with what the caller passed, to check it is unchanged."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    net = SmallCNN(num_classes=2)
    save_checkpoint(net, root / "net.pt", arch="small_cnn", classes=["doctor", "nurse"], meta={})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    table = pd.read_csv(small_dataset, dtype=str, keep_default_na=False)
    frame = table[table["split"] == "test"].iloc[:60]
    frame_before = frame.copy()
    config = _config(
        small_dataset,
        model=[
            {"name": "loaded", "arch": "small_cnn", "checkpoint": str(root / "net.pt")},
            # A table for the given model may say how to train it: the module given replaces it.
            {"name": "given", "train_split": "train_biased", "epochs": 3},
        ],
    )
    config_before = copy.deepcopy(config)
    result = audit.run(
        config, models={"given": net}, data=frame, out=root / "run", options=QUIET, echo=print
    )
    return {
        "result": result,
        "net": net,
        "weights": before,
        "frame": frame,
        "frame_before": frame_before,
        "config": config,
        "config_before": config_before,
        "dataset": small_dataset,
    }


def _direct_predictions(net: nn.Module, folder: Path, images: list[str]) -> tuple:
    """The model run by hand on the image files: [0, 1] pixels, no resize (64 px already)."""
    pixels = np.stack([np.asarray(Image.open(folder / p).convert("RGB")) for p in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    model = copy.deepcopy(net).eval()
    with torch.no_grad():
        probs = model(x).softmax(1)
    return probs.argmax(1).numpy(), probs.max(1).values.numpy()


def test_a_module_given_in_memory_is_audited_as_its_checkpoint(given_run):
    result = given_run["result"]
    samples = result.samples
    given = samples[samples["model"] == "given"].drop(columns="model").reset_index(drop=True)
    loaded = samples[samples["model"] == "loaded"].drop(columns="model").reset_index(drop=True)
    assert len(given) == 60
    pd.testing.assert_frame_equal(given, loaded)
    metrics = result.metrics["models"]
    for key in ("performance", "fairness", "attention"):
        assert metrics["given"][key] == metrics["loaded"][key], key
    assert metrics["given"]["source"] == "given" and "history" not in metrics["given"]
    assert metrics["given"]["arch"] == "small_cnn"
    assert (result.folder / "models" / "given.pt").is_file()
    recorded = json.loads((result.folder / "config.json").read_text())["model"][1]
    assert recorded["name"] == "given" and recorded["train_split"] == ""  # not trained


def test_predictions_match_the_model_run_by_hand(given_run):
    samples = given_run["result"].samples
    given = samples[samples["model"] == "given"]
    folder = given_run["dataset"].parent
    predicted, confidence = _direct_predictions(given_run["net"], folder, list(given["image"]))
    classes = np.array(["doctor", "nurse"])
    assert (given["prediction"].to_numpy() == classes[predicted]).all()
    np.testing.assert_allclose(given["confidence"].to_numpy(), confidence, atol=2e-6)
    accuracy = given_run["result"].metrics["models"]["given"]["performance"]["accuracy"]["value"]
    assert accuracy == pytest.approx((classes[predicted] == given["label"].to_numpy()).mean())


def test_nothing_the_caller_passed_is_modified(given_run):
    net = given_run["net"]
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in given_run["weights"].items())
    assert net.training  # the audit put its own copy in eval mode
    assert not net._forward_hooks and not net._forward_pre_hooks
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in net.parameters())
    pd.testing.assert_frame_equal(given_run["frame"], given_run["frame_before"])
    assert given_run["config"] == given_run["config_before"]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_a_dataframe_becomes_the_run_folders_manifest(given_run):
    """The table is written into the run folder (manifest.csv), nothing beside the images."""
    result = given_run["result"]
    manifest = Path(result.metrics["data"]["manifest"])
    assert manifest == (result.folder / "manifest.csv").resolve() and manifest.is_file()
    dataset = given_run["dataset"].parent
    assert not [p for p in _files(dataset) if "manifest-" in p or p.endswith(".tmp")]
    written = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert list(written["image"]) == list(given_run["frame_before"]["image"])
    assert "manifest.csv" in json.loads((result.folder / "run.json").read_text())["files"]


def test_a_dataframes_paths_absolute_or_relative_to_root(given_run, tmp_path):
    frame = given_run["frame_before"]
    folder = given_run["dataset"].parent
    before = _files(folder)
    # Relative paths are read from `root`.
    table = table_manifest(frame, folder)
    assert table.root == folder.resolve()
    path = tmp_path / "elsewhere" / "manifest.csv"
    path.parent.mkdir()
    path.write_text(table.text)
    read = read_manifest(path, decode=False, root=table.root)
    assert list(read.table["image"]) == list(frame["image"])
    assert read.resolve(read.table["image"].iloc[0]) == folder.resolve() / frame["image"].iloc[0]
    # Absolute paths (and one relative to root): the same files, from their common folder.
    absolute = frame.copy()
    for column in ("image", "mask:hair"):
        absolute[column] = [str(folder / p) if p else "" for p in absolute[column]]
    absolute.loc[absolute.index[0], "image"] = frame["image"].iloc[0]
    table = table_manifest(absolute, folder)
    assert table.root == folder.resolve()
    path.write_text(table.text)
    read = read_manifest(path, decode=False, root=table.root)
    assert list(read.table["image"]) == list(frame["image"])
    assert list(read.table["mask:hair"]) == list(frame["mask:hair"])
    # Read from the wrong root, the manifest names the missing files (one line per problem).
    with pytest.raises(ManifestError, match="file not found"):
        read_manifest(path, decode=False, root=tmp_path)
    assert _files(folder) == before  # nothing written beside the images


def test_gates_passed_and_the_assertion_message(given_run, tmp_path):
    result = given_run["result"]
    rows = result.metrics["gates"]
    assert len(result.gates) == len(rows) and set(result.gates["gate"]) == set(GATES)
    failed = [r for r in rows if not r["passed"]]
    assert failed and not result.passed  # a random model is not right for 99% of every group
    with pytest.raises(AssertionError) as caught:
        result.assert_passes()
    message = str(caught.value)
    assert f"{len(failed)} of {len(rows)} audit gates failed" in message
    lines = message.splitlines()[1:]
    assert len(lines) == len(failed)
    for line, row in zip(lines, failed, strict=True):
        assert line.strip().startswith(f"{row['model']}: {row['label']} = {gate_figure(row)}")
        assert f"must be {row['op']} {threshold_text(row)}" in line
    # The same run with every gate row passing passes.
    folder = tmp_path / "passing"
    folder.mkdir()
    metrics = dict(result.metrics, gates=[dict(r, passed=True, status="pass") for r in rows])
    (folder / "metrics.json").write_text(json.dumps(metrics))
    passing = AuditResult.load(folder)
    assert passing.passed
    passing.assert_passes()
    (folder / "metrics.json").write_text(json.dumps(dict(metrics, gates=[])))
    with pytest.raises(AssertionError, match="no gate is configured"):
        AuditResult.load(folder).assert_passes()


def test_junit_xml_from_the_api_and_audit_check(given_run, tmp_path):
    from junitparser import Failure, JUnitXml

    result = given_run["result"]
    path = result.write_junit(tmp_path / "api.xml")
    suites = list(JUnitXml.fromfile(str(path)))
    rows = result.metrics["gates"]
    assert [s.name for s in suites] == ["audit gates: loaded", "audit gates: given"]
    for suite in suites:
        model = suite.name.split(": ")[1]
        mine = [r for r in rows if r["model"] == model]
        cases = list(suite)
        assert suite.tests == len(cases) == len(mine)
        assert suite.failures == sum(not r["passed"] for r in mine)
        for case, row in zip(cases, mine, strict=True):
            assert case.classname == f"audit.{model}"
            where = f"[{row['attribute']}]" if "attribute" in row else ""
            assert case.name == row["gate"] + where
            failures = [r for r in case.result if isinstance(r, Failure)]
            assert bool(failures) == (not row["passed"])
            if failures:
                # In the report's units: 0.85 is "85%", a gap of 0.05 "5 pts".
                assert gate_figure(row) in failures[0].message
                assert f"{row['op']} {100 * row['threshold']:g}" in failures[0].message
    cli = tmp_path / "reports" / "cli.xml"
    invoked = CliRunner().invoke(main, ["check", str(result.folder), "--junit", str(cli)])
    assert invoked.exit_code == 1, invoked.output
    assert cli.read_text() == path.read_text()
    blocked = tmp_path / "file"
    blocked.write_text("")
    invoked = CliRunner().invoke(main, ["check", str(result.folder), "--junit", f"{blocked}/x.xml"])
    assert invoked.exit_code == 2
    assert invoked.output.strip().splitlines()[-1].startswith(f"error: --junit {blocked}/x.xml")


def test_save_writes_the_run_folder_and_refuses_foreign_files(given_run, tmp_path):
    result = given_run["result"]
    saved = result.save(tmp_path / "copy")
    names = json.loads((result.folder / "run.json").read_text())["files"]
    assert sorted(
        p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()
    ) == sorted(names)
    assert (saved / "metrics.json").read_bytes() == (result.folder / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match="holds an earlier run; pass force=True"):
        result.save(tmp_path / "copy")
    result.save(tmp_path / "copy", force=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not an audit run folder"):
        result.save(tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_the_notebook_summary_and_the_report(given_run):
    result = given_run["result"]
    summary = result._repr_html_()
    for name in ("given", "loaded"):
        assert f"Do not ship {name}" in summary
    assert summary.count("<tr>") == len(result.metrics["gates"]) + 1
    page = result.report_html()  # the run skipped the report: rendered, not written
    assert page.startswith("<!DOCTYPE html>") and not (result.folder / "report.html").exists()


def test_metrics_json_is_byte_identical_from_the_api_and_audit_run(small_dataset, tmp_path):
    config = write_config(
        tmp_path / "audit.toml",
        small_dataset,
        model=[{"name": "a", "train_split": "train_biased", "epochs": 1}],
        bootstrap=100,
        trust={"enabled": False},
        explain={"methods": ["gradcam"], "samples_per_cell": 1},
    )
    invoked = CliRunner().invoke(
        main, ["run", str(config), "--out", str(tmp_path / "cli"), "--no-report", "--quiet"]
    )
    assert invoked.exit_code == 0, invoked.output
    options = RunOptions(progress=False, render=False)  # as --quiet --no-report
    result = audit.run(config, out=tmp_path / "api", options=options, echo=lambda _: None)
    assert result.folder == tmp_path / "api"
    assert (tmp_path / "api" / "metrics.json").read_bytes() == (
        tmp_path / "cli" / "metrics.json"
    ).read_bytes()
    assert result.metrics["models"]["a"]["source"] == "trained"


class ThreeWay(nn.Module):
    """A classifier with one output too many for the two-class data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    ("models", "data", "message"),
    [
        ({"m": "a string"}, None, r"models\['m'\]: give a torch nn.Module"),
        ({"m": (SmallCNN(2), 42)}, None, r"models\['m'\]: preprocessing must be"),
        ({"m": ThreeWay()}, None, r"model 'm' gives outputs of shape \(1, 3\); the data has 2"),
        ({"m": SmallCNN(2)}, 7, "data must be a manifest path or a pandas DataFrame"),
    ],
)
def test_bad_input_is_one_clear_error(models, data, message, small_dataset, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AuditError, match=message):
        audit.run(_config(small_dataset), models=models, data=data, out=out, options=QUIET)
    assert not out.exists() and not any(tmp_path.iterdir())


def test_preprocessing_from_timm_and_hugging_face():
    net = SmallCNN(2)
    timm_config = {
        "input_size": (3, 48, 48),
        "interpolation": "bicubic",
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.2, 0.2),
        "crop_pct": 0.75,
        "crop_mode": "center",
    }
    pre = _preprocess("m", net, timm_config, 64, None)
    assert (pre.resize, pre.crop, pre.mode) == (64, (48, 48), "crop")  # floor(48 / 0.75) = 64
    assert (pre.interpolation, pre.mean, pre.origin) == ("bicubic", (0.5, 0.4, 0.3), "timm")
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(
        size={"height": 40, "width": 40}, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5]
    )
    pre = _preprocess("m", net, processor, 64, None)
    assert (pre.frame, pre.mode, pre.backend, pre.origin) == ((40, 40), "squash", "torch", "hf")
    image = torch.randint(0, 256, (3, 57, 71), dtype=torch.uint8)
    ours = pre.normalize(pre.geometry(image)[None].float() / 255)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"]
    assert (ours - theirs).abs().max() < 0.02  # one grey level at most (torch backend)
    keys = _preprocess("m", net, {"resize": 32, "mean": [0.5] * 3, "std": [0.25] * 3}, 64, None)
    assert keys.frame == (32, 32) and keys.origin == "user"


@pytest.mark.slow
def test_the_example_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's data and run folders
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two shared cores: fewer threads, less waiting
    notebook = nbformat.read(ROOT / "examples" / "audit_in_a_notebook.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o["output_type"] == "error"]
    shown = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("audit-result" in h and "ship" in h and "balanced" in h for h in shown)
    runs = list(tmp_path.glob("audit-example-*/run/metrics.json"))
    assert len(runs) == 1
    metrics = json.loads(runs[0].read_text())
    assert list(metrics["models"]) == ["biased", "balanced"]
    assert all(m["source"] == "given" for m in metrics["models"].values())


def test_config_forms_with_given_models(small_dataset, tmp_path):
    from audit.api import _config
    from audit.config import from_dict

    # A TOML table for a given model needs neither train_split nor checkpoint.
    toml = tmp_path / "sub" / "audit.toml"
    toml.parent.mkdir()
    toml.write_text(
        f'seed = 3\n[data]\nmanifest = "{small_dataset}"\n'
        '[[model]]\nname = "m"\nlayer = "features"\n'
        '[[model]]\nname = "t"\ntrain_split = "train_biased"\n'
    )
    built = _config(toml, {"m": SmallCNN(2), "extra": ThreeWay()}, None)
    assert built.base_dir == toml.parent and built.seed == 3
    specs = {s.name: s for s in built.model}
    assert list(specs) == ["m", "t", "extra"]
    assert (specs["m"].arch, specs["m"].layer, specs["m"].checkpoint) == (
        "small_cnn",
        "features",
        "",
    )
    assert specs["t"].train_split == "train_biased"  # not given: trained as configured
    assert (specs["extra"].arch, specs["extra"].train_split) == ("given:ThreeWay", "")
    # An AuditConfig is copied, not changed; a data path replaces its manifest.
    config = from_dict({"model": [{"name": "m", "train_split": "train_biased"}]})
    built = _config(config, {"m": SmallCNN(2)}, small_dataset)
    assert config.model[0].train_split == "train_biased" and built.model[0].train_split == ""
    assert built.data.manifest == str(small_dataset.resolve())
    assert config.data.manifest != built.data.manifest


def test_a_dataframe_read_from_the_wrong_root_names_its_files(given_run, tmp_path):
    """`root=` is where relative paths are read from: a wrong one fails before any work, with
    nothing left in the run folder's place."""
    config = _config(given_run["dataset"], model=[{"name": "m", "checkpoint": "x"}])
    frame = given_run["frame_before"]
    with pytest.raises(ManifestError, match="file not found") as error:
        audit.run(
            config,
            models={"m": SmallCNN(2)},
            data=frame,
            root=tmp_path,
            out=tmp_path / "run",
            options=QUIET,
            echo=lambda _: None,
        )
    assert frame["image"].iloc[0] in str(error.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()

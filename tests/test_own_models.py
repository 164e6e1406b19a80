"""`audit run` end to end on models from every source, checked against an independent computation.

For each source (torchvision with ImageNet normalisation and a center crop, `timm:`, `hf:`,
`python:`) a model with random weights is written to disk as a team would ship it (a state dict, a
safetensors file, a `save_pretrained` folder), audited with `audit run`, and its predictions are
computed again here, outside the audit, with the library's own preprocessing
(torchvision.transforms.v2, timm's `create_transform`, the Hugging Face image processor) on the
same test images: samples.csv must agree on every prediction, and on the confidence to 1e-4. Each
check also shows that it can fail: the same model fed the audit's old default (a squash to 64 x 64,
no normalisation) or read with the labels in the folder's order gives other confidences.

Bad input through `audit run`: one line `error: ...` naming the thing, exit code 2, no run folder
and no hidden work folder left behind.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from audit.cli import main
from audit.data.doctor_nurse import DoctorNurseSpec, generate

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLASSES = ["doctor", "nurse"]  # the manifest's labels, sorted: the audit's class order

TEAM_MODULE = '''
"""A team's own model code, imported by the audit through arch = "python:MODULE:build"."""
from torch import nn


class TeamNet(nn.Module):
    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def build(num_classes: int, width: int = 8) -> nn.Module:
    return TeamNet(num_classes, width)
'''


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 test images (8 per class x group cell), each with masks and a twin."""
    spec = DoctorNurseSpec(seed=3, n_train=40, n_val=8, n_test=32)
    return generate(spec, tmp_path_factory.mktemp("own") / "dn", progress=False)


@pytest.fixture(scope="module")
def resnet18_pt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-weights resnet18 state dict (absolute path), shared by the bad-input cases."""
    path = tmp_path_factory.mktemp("resnet18") / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), path)
    return str(path)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def to_toml(spec: dict[str, Any]) -> str:
    """TOML for the config shapes used here: tables, and [[model]] tables with sub-tables
    ([model.kwargs], [model.preprocess])."""
    lines = [f"{k} = {_value(v)}" for k, v in spec.items() if not isinstance(v, (dict, list))]
    for key, value in spec.items():
        if isinstance(value, dict):
            lines += [f"[{key}]", *(f"{k} = {_value(v)}" for k, v in value.items())]
    for table in spec.get("model", []):
        lines.append("[[model]]")
        lines += [f"{k} = {_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for sub, values in table.items():
            if isinstance(values, dict):
                lines += [f"[model.{sub}]", *(f"{k} = {_value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def write_config(folder: Path, manifest: Path, model: dict[str, Any]) -> Path:
    """A one-model audit of the test split, kept fast: Grad-CAM only, no trust stage."""
    spec = {
        "seed": 0,
        "bootstrap": 20,
        "data": {
            "manifest": str(manifest),
            "core_regions": ["stethoscope", "badge"],
            "min_cell_size": 2,
        },
        "explain": {"methods": ["gradcam"], "samples_per_cell": 1},
        "trust": {"enabled": False},
        "model": [{"name": "m", **model}],
    }
    path = folder / "audit.toml"
    path.write_text(to_toml(spec))
    return path


def audit_run(config: Path, out: Path) -> Any:
    return CliRunner().invoke(
        main,
        ["run", str(config), "--out", str(out), "--no-report", "--quiet", "--workers", "0"],
    )


def eval_images(manifest: Path) -> tuple[list[str], list[Image.Image]]:
    """The test split's image paths (as samples.csv writes them) and the images, opened with PIL."""
    table = pd.read_csv(manifest, keep_default_na=False)
    paths = list(table.loc[table["split"] == "test", "image"])
    images = []
    for path in paths:
        with Image.open(manifest.parent / path) as image:
            images.append(image.convert("RGB"))
    return paths, images


def predict(logits: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Class names and confidences (max softmax) of logits in the manifest's class order."""
    confidence, index = logits.double().softmax(1).max(1)
    return [CLASSES[i] for i in index.tolist()], confidence.float()


def audited(out: Path, paths: list[str]) -> tuple[list[str], torch.Tensor]:
    """samples.csv's predictions and confidences, in the order of `paths`."""
    samples = pd.read_csv(out / "samples.csv", keep_default_na=False).set_index("image")
    assert sorted(samples.index) == sorted(paths)
    rows = samples.loc[paths]
    return list(rows["prediction"]), torch.tensor(rows["confidence"].to_numpy(), dtype=torch.float)


def assert_agrees(out: Path, paths: list[str], logits: torch.Tensor) -> None:
    predictions, confidence = audited(out, paths)
    expected, expected_confidence = predict(logits)
    agreement = sum(a == b for a, b in zip(predictions, expected, strict=True)) / len(paths)
    assert agreement == 1.0, f"{agreement:.1%} of the predictions agree"
    torch.testing.assert_close(confidence, expected_confidence, rtol=0, atol=1e-4)


def assert_sensitive(out: Path, paths: list[str], wrong_logits: torch.Tensor) -> None:
    """The check can fail: a wrong preprocessing or class order gives other confidences or
    other predictions (with two classes, swapped logits keep the confidence)."""
    predictions, confidence = audited(out, paths)
    other, wrong = predict(wrong_logits)
    assert (confidence - wrong).abs().max() > 1e-3 or predictions != other


def squash64(images: list[Image.Image]) -> torch.Tensor:
    """The audit's old default for every model: 64 x 64, [0, 1], no normalisation."""
    to_tensor = v2.Compose([v2.Resize((64, 64)), v2.ToImage(), v2.ToDtype(torch.float32, True)])
    return torch.stack([to_tensor(image) for image in images])


def run_ok(config: Path, out: Path) -> dict[str, Any]:
    result = audit_run(config, out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads((out / "metrics.json").read_text())["models"]["m"]


# -- one source each: the audit's predictions are the model's own --------------------------
def test_torchvision_with_imagenet_normalisation_and_center_crop(
    manifest: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    keys = {"resize": 40, "crop": 32, "mode": "crop", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    config = write_config(
        tmp_path,
        manifest,
        {"arch": "resnet18", "checkpoint": "resnet18.pt", "preprocess": keys},
    )
    info = run_ok(config, tmp_path / "run")
    assert info["preprocess"]["frame"] == [32, 32] and info["source_kind"] == "torchvision"

    transform = v2.Compose(
        [
            v2.Resize(40),  # the shorter side, bilinear, as the audit's "crop" mode
            v2.CenterCrop(32),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    paths, images = eval_images(manifest)
    with torch.no_grad():
        logits = model(torch.stack([transform(image) for image in images]))
        wrong = model(squash64(images))
    assert_agrees(tmp_path / "run", paths, logits)
    assert_sensitive(tmp_path / "run", paths, wrong)


def test_timm_vision_transformer_with_timms_own_preprocessing(
    manifest: Path, tmp_path: Path
) -> None:
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    from timm.data import create_transform, resolve_data_config

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2}
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=2, **kwargs).eval()
    safetensors.save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    config = write_config(
        tmp_path,
        manifest,
        {"arch": "timm:vit_tiny_patch16_224", "checkpoint": "vit.safetensors", "kwargs": kwargs},
    )
    info = run_ok(config, tmp_path / "run")
    assert info["preprocess"]["defaults_from"] == "timm"

    # timm's eval transform (bicubic resize to 32 / crop_pct, center crop, mean/std 0.5) at the
    # size the model was built for: its pretrained config still says 224.
    data_config = resolve_data_config({}, model=model)
    data_config["input_size"] = (3, *model.patch_embed.img_size)
    transform = create_transform(**data_config)
    paths, images = eval_images(manifest)
    with torch.no_grad():
        logits = model(torch.stack([transform(image) for image in images]))
        wrong = model(torch.nn.functional.interpolate(squash64(images), size=32))
    assert_agrees(tmp_path / "run", paths, logits)
    assert_sensitive(tmp_path / "run", paths, wrong)


def save_hf_vit(
    folder: Path, labels: list[str], processor: bool = True, seed: int = 2
) -> nn.Module:
    """A tiny ViTForImageClassification with random weights and (optionally) its image
    processor, written with save_pretrained as a team would ship them."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    if processor:
        transformers.ViTImageProcessor(
            size={"height": 32, "width": 32},
            image_mean=[0.4, 0.5, 0.6],
            image_std=[0.2, 0.25, 0.3],
        ).save_pretrained(folder)
    return model


def test_hf_folder_with_labels_in_another_order(manifest: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "models" / "vit"
    model = save_hf_vit(folder, ["nurse", "doctor"])  # not the manifest's sorted order
    config = write_config(tmp_path, manifest, {"arch": "hf:models/vit"})
    info = run_ok(config, tmp_path / "run")
    assert info["preprocess"]["defaults_from"] == "hf"

    processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    paths, images = eval_images(manifest)
    with torch.no_grad():
        raw = model(**processor(images=images, return_tensors="pt")).logits
    by_name = torch.stack([raw[:, model.config.label2id[name]] for name in CLASSES], 1)
    assert_agrees(tmp_path / "run", paths, by_name)
    assert_sensitive(tmp_path / "run", paths, raw)  # the folder's order, not matched by name


def test_python_factory_from_the_configs_folder(manifest: Path, tmp_path: Path) -> None:
    module = "ownmodels_team_models_ok"
    (tmp_path / f"{module}.py").write_text(TEAM_MODULE)
    namespace: dict[str, Any] = {}
    exec(compile(TEAM_MODULE, "team", "exec"), namespace)  # the same code, outside the audit
    torch.manual_seed(3)
    model = namespace["build"](num_classes=2, width=12).eval()
    torch.save(model.state_dict(), tmp_path / "team.pt")
    keys = {
        "resize": [48, 48],
        "mode": "squash",
        "interpolation": "bicubic",
        "mean": [0.5, 0.4, 0.3],
        "std": [0.25, 0.2, 0.3],
    }
    config = write_config(
        tmp_path,
        manifest,
        {
            "arch": f"python:{module}:build",
            "checkpoint": "team.pt",
            "kwargs": {"width": 12},
            "preprocess": keys,
            "layer": "features",
        },
    )
    try:
        info = run_ok(config, tmp_path / "run")
    finally:
        sys.modules.pop(module, None)
    assert info["preprocess"]["frame"] == [48, 48] and info["source_kind"] == "python"

    transform = v2.Compose(
        [
            v2.Resize((48, 48), interpolation=v2.InterpolationMode.BICUBIC),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(keys["mean"], keys["std"]),
        ]
    )
    paths, images = eval_images(manifest)
    with torch.no_grad():
        logits = model(torch.stack([transform(image) for image in images]))
        wrong = model(squash64(images))
    assert_agrees(tmp_path / "run", paths, logits)
    assert_sensitive(tmp_path / "run", paths, wrong)


# -- bad input: one line, exit 2, nothing left behind ---------------------------------------
def _unknown_timm(tmp: Path, resnet18: str) -> dict[str, Any]:
    return {"arch": "timm:vit_tiny_patch16_22", "checkpoint": resnet18}


def _hf_missing_files(tmp: Path, resnet18: str) -> dict[str, Any]:
    save_hf_vit(tmp / "vit", CLASSES, processor=False)
    return {"arch": "hf:vit"}


def _hf_other_labels(tmp: Path, resnet18: str) -> dict[str, Any]:
    save_hf_vit(tmp / "vit", ["doctor", "surgeon"])
    return {"arch": "hf:vit"}


def _python_import_error(tmp: Path, resnet18: str) -> dict[str, Any]:
    (tmp / "ownmodels_team_broken.py").write_text("import ownmodels_no_such_package\n")
    return {"arch": "python:ownmodels_team_broken:build", "checkpoint": resnet18}


def _python_call_error(tmp: Path, resnet18: str) -> dict[str, Any]:
    (tmp / "ownmodels_team_models_call.py").write_text(TEAM_MODULE)
    return {
        "arch": "python:ownmodels_team_models_call:build",
        "checkpoint": resnet18,
        "kwargs": {"depth": 3},
    }


def _mean_length(tmp: Path, resnet18: str) -> dict[str, Any]:
    keys = {"mean": [0.5, 0.5], "std": [0.5, 0.5]}
    return {"arch": "resnet18", "checkpoint": resnet18, "preprocess": keys}


def _crop_larger(tmp: Path, resnet18: str) -> dict[str, Any]:
    keys = {"resize": 32, "crop": 40}
    return {"arch": "resnet18", "checkpoint": resnet18, "preprocess": keys}


def _state_dict_shape(tmp: Path, resnet18: str) -> dict[str, Any]:
    state = torchvision.models.resnet18(num_classes=2).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # a 3x3 stem instead of 7x7
    torch.save(state, tmp / "model.pt")
    return {"arch": "resnet18", "checkpoint": "model.pt"}


def _layer_not_a_map(tmp: Path, resnet18: str) -> dict[str, Any]:
    # The head's (N, 2) logits: neither a map nor tokens.
    return {"arch": "resnet18", "checkpoint": resnet18, "layer": "fc"}


BAD: dict[str, tuple[Callable[[Path, str], dict[str, Any]], list[str]]] = {
    "unknown timm name": (_unknown_timm, ["vit_tiny_patch16_22", "close names", "_224"]),
    "hf folder missing files": (_hf_missing_files, ["hf:vit", "preprocessor_config.json"]),
    "hf labels not the manifest's": (_hf_other_labels, ["hf:vit", "nurse", "surgeon"]),
    "python import error": (
        _python_import_error,
        ["ownmodels_team_broken", "ownmodels_no_such_package"],
    ),
    "python call error": (_python_call_error, ["ownmodels_team_models_call.build", "depth"]),
    "mean of the wrong length": (_mean_length, ["'m'", "preprocess.mean", "3 input channels"]),
    "crop larger than resize": (_crop_larger, ["'m'", "preprocess.crop", "larger"]),
    "state dict of the wrong shape": (_state_dict_shape, ["model.pt", "conv1.weight"]),
    "layer neither a map nor tokens": (_layer_not_a_map, ["'m'", "'fc'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    case: str, manifest: Path, resnet18_pt: str, tmp_path: Path
) -> None:
    make, words = BAD[case]
    config = write_config(tmp_path, manifest, make(tmp_path, resnet18_pt))
    runs = tmp_path / "runs"
    runs.mkdir()
    try:
        result = audit_run(config, runs / "run")
    finally:
        for name in [m for m in sys.modules if m.startswith("ownmodels_team")]:
            sys.modules.pop(name)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert list(runs.iterdir()) == []  # no run folder and no hidden .run.partial

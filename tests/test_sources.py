"""Model sources (audit.models.sources) and checkpoint loading (audit.models.io).

For each source, the predictions through the audit's path (prepare_model -> Preprocess.geometry ->
/255 -> the attached model) must equal the model's predictions under the same preprocessing computed
independently: torchvision.transforms.v2 / timm's eval transform on PIL images, or the Hugging Face
image processor loaded from the folder.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from audit.config import ModelConfig, PreprocessConfig, from_dict
from audit.models import sources
from audit.models.io import CheckpointError, is_valid_pickle, read_state_dict, save_checkpoint
from audit.models.sources import (
    Prepared,
    build_model,
    check_arch,
    load_model,
    parse_arch,
    prepare_model,
)
from audit.models.zoo import ArchError, SmallCNN, default_layer

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CLASSES = ["cat", "dog", "fox"]


def pil_images(n: int = 6, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 40 + 7 * i, 60 - 3 * i  # non-square, both orientations
        steps = rng.integers(-30, 31, size=(h, w, 3))
        out.append(Image.fromarray(np.clip(np.cumsum(steps, 0) + 128, 0, 255).astype(np.uint8)))
    return out


def audit_logits(prepared: Prepared, images: list[Image.Image]) -> torch.Tensor:
    """The audit's path: geometry per image, [0, 1] batch, normalisation and class order by hooks."""
    pre = prepared.preprocess
    frames = [
        pre.geometry(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)) for im in images
    ]
    handle = pre.attach(prepared.model)
    try:
        with torch.no_grad():
            return prepared.model(torch.stack(frames).float() / 255)
    finally:
        handle.remove()


def assert_same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    assert torch.equal(ours.argmax(1), reference.argmax(1))  # 100% agreement
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def spec(**kw: object) -> ModelConfig:
    return ModelConfig(**{"name": "m", **kw})


def test_torchvision_with_imagenet_normalisation_and_center_crop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    table = PreprocessConfig(resize=40, crop=32, **IMAGENET)
    prepared = prepare_model(
        spec(arch="torchvision:resnet18", checkpoint="r18.pt", preprocess=table),
        CLASSES,
        base_dir=tmp_path,
        image_size=64,
    )
    reference_transform = T.Compose(
        [T.Resize(40), T.CenterCrop(32), T.ToImage(), T.ToDtype(torch.float32, scale=True),
         T.Normalize(**IMAGENET)]
    )  # fmt: skip
    images = pil_images()
    with torch.no_grad():
        reference = model(torch.stack([reference_transform(im) for im in images]))
    ours = audit_logits(prepared, images)
    assert_same(ours, reference)
    # The test can fail: without the normalisation the logits are not the same.
    with torch.no_grad():
        raw = model(torch.stack([T.ToDtype(torch.float32, scale=True)(T.ToImage()(
            T.CenterCrop(32)(T.Resize(40)(im)))) for im in images]))  # fmt: skip
    assert not torch.allclose(raw, reference, atol=1e-3)


def test_timm_with_its_own_data_config(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(1)
    kwargs = {"img_size": 32}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **kwargs).eval()
    save_file(model.state_dict(), tmp_path / "vit.safetensors")
    prepared = prepare_model(
        spec(arch="timm:vit_tiny_patch16_224", checkpoint="vit.safetensors", kwargs=kwargs),
        CLASSES,
        base_dir=tmp_path,
        image_size=64,
    )
    assert prepared.preprocess.to_dict()["defaults_from"] == "timm"
    config = resolve_data_config({}, model=model) | {"input_size": (3, 32, 32)}
    transform = create_transform(**config)  # timm's eval transform at the model's own size
    images = pil_images(seed=1)
    with torch.no_grad():
        reference = model(torch.stack([transform(im) for im in images]))
    assert_same(audit_logits(prepared, images), reference)


def save_hf(folder: Path, labels: list[str], size: int = 32) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(2)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]
    ).save_pretrained(folder)
    return model


def test_hf_folder_matches_labels_by_name_and_reorders(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "models" / "vit"
    model = save_hf(folder, ["fox", "cat", "dog"])  # another order than the manifest's
    prepared = prepare_model(spec(arch="hf:models/vit"), CLASSES, base_dir=tmp_path, image_size=64)
    assert prepared.preprocess.class_order == (1, 2, 0)
    processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    images = pil_images(seed=2)
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    by_name = {model.config.id2label[i]: logits[:, i] for i in range(3)}
    reference = torch.stack([by_name[c] for c in CLASSES], 1)
    assert_same(audit_logits(prepared, images), reference)


def test_hf_folder_errors(tmp_path: Path) -> None:
    save_hf(tmp_path / "vit", ["nurse", "doctor", "cook"])
    with pytest.raises(ArchError) as caught:
        prepare_model(
            spec(arch="hf:vit"), ["doctor", "nurse", "pilot"], base_dir=tmp_path, image_size=32
        )
    message = str(caught.value)
    assert (
        "classes without a label: ['pilot']" in message
        and "labels without a class: ['cook']" in message
    )
    assert "\n" not in message
    (tmp_path / "vit" / "preprocessor_config.json").unlink()
    with pytest.raises(ArchError, match="lacks preprocessor_config.json"):
        check_arch("hf:vit", tmp_path)
    with pytest.raises(ArchError, match="folder not found"):
        check_arch("hf:nowhere", tmp_path)


def test_hf_trained_here_gets_a_head_for_the_classes(tmp_path: Path) -> None:
    saved = save_hf(tmp_path / "vit", ["a", "b"])
    prepared = prepare_model(
        spec(arch="hf:vit", train_split="train"),
        ["doctor", "nurse"],
        base_dir=tmp_path,
        image_size=32,
    )
    model = prepared.model
    assert model.config.id2label == {0: "doctor", 1: "nurse"}
    assert prepared.preprocess.class_order is None and "head re-initialised" in prepared.messages[0]
    assert not torch.equal(model.classifier.weight, saved.classifier.weight)  # a fresh head ...
    body = "vit.layers.1.mlp.fc2.weight"  # ... on the folder's body
    assert torch.equal(model.state_dict()[body], saved.state_dict()[body])


def test_hf_folder_without_the_head_weights_is_refused(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    saved = save_hf(tmp_path / "vit", ["a", "b"])
    transformers.ViTModel(saved.config).save_pretrained(tmp_path / "vit")  # the body only
    with pytest.raises(ArchError, match=r"lack 2 tensors of the model \(e.g. classifier.bias\)"):
        prepare_model(spec(arch="hf:vit"), ["a", "b"], base_dir=tmp_path, image_size=32)


TEAM_MODULE = """
import torch
from torch import nn


class TeamNet(nn.Module):
    def __init__(self, num_classes, width):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def build(num_classes, width=4):
    return TeamNet(num_classes, width)


def broken(num_classes):
    raise RuntimeError("no GPU here")
"""


def test_python_factory(tmp_path: Path) -> None:
    (tmp_path / "team_models_h4.py").write_text(TEAM_MODULE)
    table = PreprocessConfig(resize=[24, 30], **IMAGENET)
    torch.manual_seed(3)
    factory_model = build_model(
        "python:team_models_h4:build", 3, base_dir=tmp_path, kwargs={"width": 5}
    )
    assert type(factory_model).__name__ == "TeamNet" and factory_model.head.in_features == 5
    torch.save(factory_model.state_dict(), tmp_path / "team.pt")
    prepared = prepare_model(
        spec(arch="python:team_models_h4:build", checkpoint="team.pt", kwargs={"width": 5},
             preprocess=table),
        CLASSES,
        base_dir=tmp_path,
        image_size=64,
    )  # fmt: skip
    transform = T.Compose(
        [
            T.Resize([24, 30]),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(**IMAGENET),
        ]
    )
    images = pil_images(seed=3)
    with torch.no_grad():
        reference = factory_model.eval()(torch.stack([transform(im) for im in images]))
    assert_same(audit_logits(prepared, images), reference)


@pytest.mark.parametrize(
    ("arch", "words"),
    [
        ("python:no_such_module_h4:build", "cannot import module 'no_such_module_h4': ModuleNotFoundError"),
        ("python:team_models_h4:missing", "module 'team_models_h4' has no callable 'missing'"),
        ("python:team_models_h4:broken", "calling team_models_h4.broken(num_classes=3) failed: RuntimeError: no GPU here"),
        ("python:bad_import_h4:build", "cannot import module 'bad_import_h4': ZeroDivisionError: division by zero"),
        ("python:team_models_h4", "write python:MODULE:CALLABLE"),
        ("timm:resnet10", "unknown timm model 'resnet10' in arch 'timm:resnet10'; close names: resnet10t"),
        ("resnet19", "did you mean resnet18"),
        ("keras:resnet", "unknown source 'keras'"),
    ],
)  # fmt: skip
def test_source_errors_are_one_line(tmp_path: Path, arch: str, words: str) -> None:
    (tmp_path / "team_models_h4.py").write_text(TEAM_MODULE)
    (tmp_path / "bad_import_h4.py").write_text("x = 1 / 0\n")
    with pytest.raises(ArchError) as caught:
        build_model(arch, 3, base_dir=tmp_path)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_parse_arch() -> None:
    assert parse_arch("resnet50").arch == parse_arch("torchvision:resnet50").arch == "resnet50"
    assert parse_arch("timm:convnext_atto").kind == "timm"
    assert parse_arch("hf:m", "/x").path == Path("/x/m").resolve()
    assert default_layer("small_cnn") == "features" and default_layer("timm:x") is None


def test_state_dict_mismatch_names_keys(tmp_path: Path) -> None:
    state = SmallCNN(num_classes=3).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    state["features.0.weight"] = torch.zeros(1, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as caught:
        load_model(tmp_path / "bad.pt", "small_cnn", 3)
    message = str(caught.value)
    assert "1 missing keys (e.g. fc.bias)" in message
    assert "1 unexpected keys (e.g. extra.weight)" in message
    assert "features.0.weight: (1, 3, 3, 3) in the file, (16, 3, 3, 3) in the model" in message


def test_safetensors_checkpoint_loads(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = SmallCNN(num_classes=3).eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors", "small_cnn", 3)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "bad.safetensors", "small_cnn", 3)


def test_init_reinitialises_a_head_of_another_size(tmp_path: Path) -> None:
    torch.manual_seed(5)
    donor = build_model("resnet18", 5)
    torch.save({"state_dict": donor.state_dict()}, tmp_path / "backbone.pt")
    prepared = prepare_model(
        spec(arch="resnet18", train_split="train", init="backbone.pt"),
        CLASSES,
        base_dir=tmp_path,
        image_size=32,
    )
    model = prepared.model
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, donor.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (3, 512)
    assert prepared.messages == [
        f"init {tmp_path / 'backbone.pt'}: head fc.weight, fc.bias re-initialised (5 outputs in the file, 3 classes here)"
    ]
    save_file(build_model("resnet34", 3).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(
        CheckpointError, match=r"does not fit the model: .*unexpected keys \(e.g. layer1.2"
    ):
        prepare_model(spec(arch="resnet18", train_split="t", init="other.safetensors"), CLASSES,
                      base_dir=tmp_path, image_size=32)  # fmt: skip


def test_init_pretrained_offline_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network in tests: detected without a download
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    for arch in ("timm:resnet10t", "resnet18"):
        with pytest.raises(ArchError) as caught:
            prepare_model(spec(arch=arch, train_split="t", init="pretrained"), CLASSES, base_dir=tmp_path,
                          image_size=32)  # fmt: skip
        assert "offline" in str(caught.value) and 'init = "PATH"' in str(caught.value)
    with pytest.raises(ArchError, match="needs a torchvision or timm arch"):
        prepare_model(spec(arch="small_cnn", train_split="t", init="pretrained"), CLASSES,
                      base_dir=tmp_path, image_size=32)  # fmt: skip


def test_offline_detection_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(sources.socket, "create_connection", refuse)
    assert sources._offline("huggingface.co")


# -- issue 8, item 2: what is and is not a checkpoint -------------------------------------------
class Payload:
    """A pickled object that weights_only refuses (unpickling it would import this module)."""


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"hi\n", "text"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "random"),
        (b"", "empty"),
        (b"PK\x03\x04" + b"\x00" * 40, "broken zip"),
    ],
)
def test_non_checkpoints_are_one_line_without_trust_advice(
    tmp_path: Path, content: bytes, kind: str
) -> None:
    path = tmp_path / "fake.pt"
    path.write_bytes(content)
    assert not is_valid_pickle(path)
    for load in (lambda: load_model(path, "small_cnn", 2), lambda: read_state_dict(path)):
        with pytest.raises(CheckpointError) as caught:
            load()
        message = str(caught.value)
        assert "is not a PyTorch checkpoint" in message, kind
        assert "trust" not in message and "\n" not in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol", "ignore:`torch.jit")
def test_trust_is_advised_only_for_a_refused_pickle(tmp_path: Path) -> None:
    for name, write in (
        ("zip.pt", lambda p: torch.save({"model": Payload()}, p)),  # torch's zip format
        (
            "legacy.pt",
            lambda p: torch.save({"m": Payload()}, p, _use_new_zipfile_serialization=False),
        ),
        ("plain.pkl", lambda p: p.write_bytes(pickle.dumps(Payload()))),
    ):
        path = tmp_path / name
        write(path)
        assert is_valid_pickle(path), name
        with pytest.raises(CheckpointError) as caught:
            load_model(path, "small_cnn", 2)
        message = str(caught.value)
        assert "set trust = true" in message and "runs code from the file" in message, name
        assert "only for files you made" in message and "\n" not in message
    whole = tmp_path / "whole.pt"
    torch.save(SmallCNN(2), whole)
    with pytest.raises(CheckpointError, match="set trust = true"):
        load_model(whole, "small_cnn", 2)
    assert isinstance(load_model(whole, "small_cnn", 2, trust=True), SmallCNN)  # the user's choice
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(SmallCNN(2)).save(str(scripted))
    assert isinstance(load_model(scripted, "small_cnn", 2), torch.jit.ScriptModule)


def test_arch_mismatch_is_worded_neutrally(tmp_path: Path) -> None:
    save_checkpoint(
        SmallCNN(num_classes=2), tmp_path / "m.pt", arch="small_cnn", classes=["a", "b"], meta={}
    )
    with pytest.raises(CheckpointError) as caught:
        load_model(tmp_path / "m.pt", "resnet18", 2)
    assert (
        str(caught.value) == f"{tmp_path / 'm.pt'} was saved from arch 'small_cnn', not 'resnet18'"
    )
    save_checkpoint(
        build_model("resnet18", 2), tmp_path / "r.pt", arch="resnet18", classes=["a", "b"], meta={}
    )
    assert isinstance(load_model(tmp_path / "r.pt", "torchvision:resnet18", 2), nn.Module)


def test_explain_cli_on_a_text_checkpoint(tmp_path: Path) -> None:
    from audit.cli import main

    (tmp_path / "fake.pt").write_text("hi\n")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    result = CliRunner().invoke(
        main,
        ["explain", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "fake.pt"),
         "--classes", "doctor,nurse", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path / 'fake.pt'} is not a PyTorch checkpoint (neither a state dict, a "
                     "safetensors file nor a TorchScript file); give the state dict saved from the model"]  # fmt: skip


def test_config_accepts_the_new_keys(tmp_path: Path) -> None:
    raw = {
        "data": {"manifest": "m.csv"},
        "model": [
            {
                "name": "vit",
                "arch": "hf:models/vit",
            },  # no train_split / checkpoint: the folder has weights
            {
                "name": "t",
                "arch": "timm:resnet10t",
                "train_split": "train",
                "init": "backbone.pt",
                "kwargs": {"drop_rate": 0.1},
                "preprocess": {"resize": 72, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
            },
        ],
    }
    config = from_dict(raw, tmp_path)
    assert config.model[1].preprocess.crop == 64 and config.model[1].kwargs == {"drop_rate": 0.1}
    assert json.dumps(config.to_dict())  # config.json stays serialisable
    bad = json.loads(json.dumps(raw))
    bad["model"][1]["preprocess"]["croop"] = 3
    with pytest.raises(
        ValueError, match="unknown config key 'model\\[1\\].preprocess.croop'; did you mean 'crop'"
    ):
        from_dict(bad, tmp_path)
    bad = json.loads(json.dumps(raw))
    del bad["model"][1]["train_split"]
    bad["model"][1]["checkpoint"] = "x.pt"
    with pytest.raises(ValueError, match="init sets the starting weights of training"):
        from_dict(bad, tmp_path)
    assert os.path.basename(str(config.base_dir)) == tmp_path.name

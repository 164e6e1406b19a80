"""Grad-CAM on vision transformers and channels-last maps, against pytorch-grad-cam and by hand.

pytorch-grad-cam (`pytorch_grad_cam.GradCAM`) is the independent computation: it is given the
reshape transform its README / tutorials document (`vit_reshape_transform`: drop the class token,
reshape to the grid, channels first; `swinT_reshape_transform`: reshape to the grid, channels
first), with the prefix-token count and grid of each model written in by hand. It clips at 0,
normalises each map to [0, 1] and resizes it with cv2 to the input size. The engine's low-resolution
map is passed through the very same `scale_cam_image` (so both sides are resized alike) and the
per-image Pearson correlation must be >= 0.999; the engine's own bilinear (torch) upsampling is
checked the same way against pytorch-grad-cam's full-size output.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import swinT_reshape_transform
from torch import nn

from audit.explain import CAMNotApplicableError, LayerError, explain, explain_many
from audit.explain.layout import Layout

warnings.filterwarnings("ignore", category=UserWarning)


def vit_reshape(prefix: int, height: int, width: int):
    """pytorch-grad-cam's documented `vit_reshape_transform`, with the prefix count as a parameter
    (1 for ViT; DeiT-distilled carries 2 prefix tokens, a class and a distillation token)."""

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return transform


def nhwc_reshape(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()


def _hf_vit(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    folder = tmp_path_factory.mktemp("hf_vit")
    ViTForImageClassification(config).save_pretrained(folder)
    return ViTForImageClassification.from_pretrained(folder, local_files_only=True).eval()


# name -> (model builder, image size, layer (None: the default), expected layer, expected layout,
#          reshape transform for pytorch-grad-cam)
CASES = {
    "vit_tiny": (
        lambda f: _timm("vit_tiny_patch16_224", img_size=64),
        64,
        None,
        "blocks.11.norm1",
        Layout("tokens", 1, (4, 4)),
        vit_reshape(1, 4, 4),
    ),
    "vit_tiny_block5": (
        lambda f: _timm("vit_tiny_patch16_224", img_size=64),
        64,
        "blocks.5.norm1",
        "blocks.5.norm1",
        Layout("tokens", 1, (4, 4)),
        vit_reshape(1, 4, 4),
    ),
    "deit_tiny_distilled": (
        lambda f: _timm("deit_tiny_distilled_patch16_224", img_size=64),
        64,
        None,
        "blocks.11.norm1",
        Layout("tokens", 2, (4, 4)),
        vit_reshape(2, 4, 4),
    ),
    "vit_registers": (
        lambda f: _timm("vit_tiny_patch16_224", img_size=48, reg_tokens=4, depth=2),
        48,
        None,
        "blocks.1.norm1",
        Layout("tokens", 5, (3, 3)),
        vit_reshape(5, 3, 3),
    ),
    "swin_tiny": (
        lambda f: _timm("swin_tiny_patch4_window7_224", img_size=96),
        96,
        None,
        "layers.3.blocks.1.norm2",
        Layout("tokens", 0, (3, 3)),
        lambda t: swinT_reshape_transform(t, 3, 3),
    ),
    "swin_tiny_stage_nhwc": (
        lambda f: _timm("swin_tiny_patch4_window7_224", img_size=96),
        96,
        "layers.2",
        "layers.2",
        Layout("nhwc"),
        nhwc_reshape,
    ),
    "convnext_atto": (
        lambda f: _timm("convnext_atto"),
        64,
        None,
        "stages",
        Layout("nchw"),
        None,
    ),
    "convnext_atto_block_nchw": (
        lambda f: _timm("convnext_atto"),
        64,
        "stages.2.blocks.1",
        "stages.2.blocks.1",
        Layout("nchw"),
        None,
    ),
    "convnext_atto_layernorm2d": (  # convnext_atto has conv_mlp: its block norm is LayerNorm2d
        lambda f: _timm("convnext_atto"),
        64,
        "stages.2.blocks.1.norm",
        "stages.2.blocks.1.norm",
        Layout("nchw"),
        None,
    ),
    "convnext_atto_norm_nhwc": (  # without conv_mlp the block norm is a channels-last LayerNorm
        lambda f: _timm("convnext_atto", conv_mlp=False),
        64,
        "stages.2.blocks.1.norm",
        "stages.2.blocks.1.norm",
        Layout("nhwc"),
        nhwc_reshape,
    ),
    "hf_vit": (
        _hf_vit,
        32,
        None,
        "vit.layers.1.layernorm_before",
        Layout("tokens", 1, (4, 4)),
        vit_reshape(1, 4, 4),
    ),
}

_MODELS: dict[str, nn.Module] = {}


def model_for(case: str, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """One model per builder for the whole module (creating them is the slow part)."""
    builder = CASES[case][0]
    key = {"vit_tiny_block5": "vit_tiny", "swin_tiny_stage_nhwc": "swin_tiny"}.get(case, case)
    if key in ("convnext_atto_block_nchw", "convnext_atto_layernorm2d"):
        key = "convnext_atto"
    if key not in _MODELS:
        _MODELS[key] = builder(tmp_path_factory)
    return _MODELS[key]


def images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


class Scaled(nn.Module):
    """The logits tensor (pytorch-grad-cam needs one, Hugging Face returns an output object),
    multiplied by `factor`."""

    def __init__(self, net: nn.Module, factor: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.factor = factor

    def forward(self, x):  # noqa: ANN001, ANN201
        return default_logits(self.net(x)) * self.factor


def default_logits(out) -> torch.Tensor:  # noqa: ANN001
    return out if isinstance(out, torch.Tensor) else out.logits


def _pgc(method, model, layer, transform, x, targets, factor=1.0) -> np.ndarray:  # noqa: ANN001
    """pytorch-grad-cam's map (it fills parameters' .grad, cleared afterwards)."""
    wrapped = Scaled(model, factor)
    target = dict(wrapped.named_modules())["net." + layer]
    try:
        with method(model=wrapped, target_layers=[target], reshape_transform=transform) as cam:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcam_equals_pytorch_grad_cam(case, tmp_path_factory):
    _, size, layer, expected_layer, expected_layout, transform = CASES[case]
    model = model_for(case, tmp_path_factory)
    x = images(size)
    targets = torch.tensor([0, 1, 2])
    result = explain_many(model, x, ["gradcam", "gradcam++"], targets, layer=layer)
    assert result.layer == expected_layer
    assert result.layout == expected_layout
    low = result.low_res["gradcam", "target"].numpy()
    assert low.shape[1:] == (
        expected_layout.grid if expected_layout.kind == "tokens" else low.shape[1:]
    )
    # Non-degenerate maps, or the correlation would test nothing.
    assert (low.reshape(3, -1).std(1) > 0).all()
    reference = _pgc(GradCAM, model, expected_layer, transform, x, targets)
    ours_resized = scale_cam_image(low, (size, size))  # pytorch-grad-cam's own cv2 resize
    assert pearson(ours_resized, reference).min() >= 0.999
    assert pearson(result.maps["gradcam", "target"].numpy(), reference).min() >= 0.999
    if case in ("vit_tiny", "convnext_atto_norm_nhwc"):
        # pytorch-grad-cam adds 1e-6 to Grad-CAM++'s denominator 2 g^2 + sum(A) g^3, which is of
        # that order for the tiny gradients of random weights (ConvNeXt's layer scale starts at
        # 1e-6); scaled logits make it negligible.
        scaled = Scaled(model, 1e10)
        plus = explain_many(scaled, x, ["gradcam++"], targets, layer="net." + expected_layer)
        plus = plus.low_res["gradcam++", "target"].numpy()
        reference_pp = _pgc(GradCAMPlusPlus, model, expected_layer, transform, x, targets, 1e10)
        assert pearson(scale_cam_image(plus, (size, size)), reference_pp).min() >= 0.999


class ToyViT(nn.Module):
    """A hint-free token model (no num_prefix_tokens, no patch_size): a class token, 4x4 patches."""

    def __init__(self, prefix: int = 1, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.tokens = nn.Parameter(torch.randn(1, prefix, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(dim), "mix": nn.Linear(dim, dim)}) for _ in range(2)
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.tokens.expand(len(x), -1, -1), t], dim=1)
        for block in self.blocks:
            normed = block["norm"](t)
            # Patch tokens are mixed into the class token, so they get gradients.
            t = t + torch.tanh(block["mix"](normed)) + normed.mean(1, keepdim=True)
        return self.head(t[:, 0])


def hand_gradcam(model, layer_name, x, targets, to_map):  # noqa: ANN001
    """Grad-CAM written out with an explicit reshape of the layer output to (N, C, h, w)."""
    saved = {}
    layer = dict(model.named_modules())[layer_name]
    handle = layer.register_forward_hook(lambda _m, _i, out: saved.setdefault("A", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(logits[torch.arange(len(x)), targets].sum(), saved["A"])
    activation, grads = to_map(saved["A"].detach()), to_map(grads)
    return F.relu((grads.mean(dim=(2, 3))[:, :, None, None] * activation).sum(1))


@pytest.mark.parametrize(("prefix", "height", "width"), [(1, 32, 32), (3, 32, 32), (1, 16, 40)])
def test_hint_free_tokens_use_the_smallest_prefix_that_tiles_the_input(prefix, height, width):
    torch.manual_seed(1)
    model = ToyViT(prefix).eval()
    x = torch.randn(2, 3, height, width)
    grid = (height // 4, width // 4)
    targets = torch.tensor([0, 2])
    result = explain_many(model, x, ["gradcam"], targets)
    assert result.layer == "blocks.1.norm"
    assert result.layout == Layout("tokens", prefix, grid)

    def to_map(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:].reshape(len(t), *grid, t.shape[2]).permute(0, 3, 1, 2)

    expected = hand_gradcam(model, "blocks.1.norm", x, targets, to_map)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(result.low_res["gradcam", "target"], expected)
    assert result.maps["gradcam", "target"].shape == (2, height, width)


class ChannelsLastNet(nn.Module):
    """Conv -> NHWC -> LayerNorm/Linear -> GAP -> Linear; H == W == C so shapes cannot tell."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.stage = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.GELU())
        self.fc = nn.Linear(c, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        t = self.stage(self.conv(x).permute(0, 2, 3, 1))
        return self.fc(t.mean(dim=(1, 2)))


class ChannelsFirstNet(nn.Module):
    """A plain NCHW CNN whose map also has H == W == C, with a container as the layer."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Identity())
        self.fc = nn.Linear(c, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.fc(self.stage(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("net", "kind"), [(ChannelsLastNet, "nhwc"), (ChannelsFirstNet, "nchw")], ids=["nhwc", "nchw"]
)
def test_channels_last_is_decided_from_the_model_not_the_shape(net, kind):
    torch.manual_seed(2)
    model = net().eval()
    x = torch.randn(4, 3, 8, 8)  # the map is 8 x 8 x 8 channels: ambiguous by shape alone
    targets = torch.tensor([0, 1, 2, 0])
    result = explain_many(model, x, ["gradcam", "cam"], targets, layer="stage")
    assert result.layout == Layout(kind)
    to_map = (lambda t: t.permute(0, 3, 1, 2)) if kind == "nhwc" else (lambda t: t)
    expected = hand_gradcam(model, "stage", x, targets, to_map)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(result.low_res["gradcam", "target"], expected)
    # Both heads are GAP + one linear layer, so CAM applies and equals h*w x Grad-CAM.
    torch.testing.assert_close(result.low_res["cam", "target"], expected * 64, rtol=1e-4, atol=1e-5)


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("case", ["vit_tiny", "hf_vit"])
def test_transformer_model_is_left_unchanged(case, tmp_path_factory):
    model = model_for(case, tmp_path_factory)
    size = CASES[case][1]
    x = images(size, 1)
    model.blocks[0].train(True) if case == "vit_tiny" else None  # a mixed mode must survive
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = default_logits(model(x))
    explain_many(model, x, ["gradcam", "gradcam++", "saliency", "guided_gradcam"])
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert _hook_count(model) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(default_logits(model(x)), before)
    assert torch.is_grad_enabled()
    model.eval()


class TupleLayer(nn.Module):
    def forward(self, x):  # noqa: ANN001, ANN201
        return x, x.mean()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("head", r"layer 'head' must output a \(N, C, h, w\) map.*got \(2, 3\)"),
        (
            "blocks.0.pair",
            r"layer 'blocks.0.pair' must output .*got a tuple of \(2, 17, 192\), \(\)",
        ),
        ("odd", r"layer 'odd' must output .*\(2, 60, 4\).*60 tokens less 1 prefix tokens"),
    ],
)
def test_a_layer_that_is_neither_map_nor_tokens_is_one_clear_error(
    layer, message, tmp_path_factory
):
    model = copy.deepcopy(model_for("vit_tiny", tmp_path_factory))
    model.blocks[0].pair = TupleLayer()
    model.odd = nn.Linear(192, 4)
    inner = model.blocks[0].forward

    def forward(x):  # noqa: ANN001, ANN202
        model.odd(x.repeat(1, 4, 1)[:, :60])  # a (N, 60, 4) output that fills no patch grid
        return inner(model.blocks[0].pair(x)[0])

    model.blocks[0].forward = forward
    with pytest.raises(LayerError, match=message):
        explain(model, images(64, 2), "gradcam", layer=layer)
    assert _hook_count(model) == 0


def test_cam_is_refused_on_transformer_heads_with_the_reason(tmp_path_factory):
    for case in ("vit_tiny", "swin_tiny"):
        model = model_for(case, tmp_path_factory)
        with pytest.raises(CAMNotApplicableError, match="not Linear\\(global average pool"):
            explain(model, images(CASES[case][1], 1), "cam")

"""The attribution engine against independent computations of the papers' formulas."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy import ndimage
from torch import nn

from audit.explain import (
    METHODS,
    CAMNotApplicableError,
    cam_boxes,
    explain,
    explain_many,
    largest_component,
    normalize_maps,
)
from audit.explain.boxes import (  # the two labellings behind largest_component
    _largest_component_scipy,
    _largest_component_torch,
)
from audit.models.zoo import SmallCNN

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(num_classes=3).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def reference_gradcam(model: nn.Module, layer_name: str, x: torch.Tensor, targets: torch.Tensor):
    """Grad-CAM written out from the paper: alpha = mean_ij dy/dA, ReLU(sum_k alpha_k A^k)."""
    model = copy.deepcopy(model)
    layer = dict(model.named_modules())[layer_name]
    saved = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: saved.setdefault("A", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    activation = saved["A"]
    score = logits[torch.arange(len(x)), targets].sum()
    (grads,) = torch.autograd.grad(score, activation)
    alpha = grads.mean(dim=(2, 3))
    low = F.relu((alpha[:, :, None, None] * activation).sum(dim=1))
    return F.interpolate(low[:, None], size=x.shape[2:], mode="bilinear")[:, 0].detach()


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_cam_equals_gradcam_up_to_a_positive_factor_on_gap_networks(arch, images):
    torch.manual_seed(0)
    model = SmallCNN(3) if arch == "small_cnn" else torchvision.models.resnet18(num_classes=3)
    model.eval()
    result = explain_many(model, images, ["cam", "gradcam"], {"pred": None, "other": 2})
    for name in ("pred", "other"):
        cam, gradcam = result.low_res["cam", name], result.low_res["gradcam", name]
        h, w = cam.shape[1:]
        assert gradcam.abs().sum() > 0
        # Grad-CAM's alpha is w_c^k / Z, so CAM = Z * Grad-CAM exactly.
        torch.testing.assert_close(cam, gradcam * (h * w), rtol=1e-4, atol=1e-5 * float(cam.max()))


def test_gradcam_matches_an_independent_computation(small_cnn, images):
    targets = torch.tensor([0, 1, 2, 1, 0])
    ours = explain(small_cnn, images, "gradcam", layer="features", targets=targets)
    expected = reference_gradcam(small_cnn, "features", images, targets)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_gradcam_on_resnet_layer3_matches_reference(images):
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=4).eval()
    targets = torch.tensor([3, 0, 1, 2, 3])
    ours = explain(model, images, "gradcam", layer=model.layer3, targets=targets)
    expected = reference_gradcam(model, "layer3", images, targets)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_gradcam_plus_plus_matches_the_papers_formula(images):
    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=3).eval()
    targets = torch.tensor([0, 1, 2, 0, 1])
    ours = explain_many(model, images, ["gradcam++"], targets, layer="layer3").low_res[
        "gradcam++", "target"
    ]
    saved = {}
    handle = model.layer3.register_forward_hook(lambda _m, _i, out: saved.setdefault("A", out))
    logits = model(images)
    handle.remove()
    activation = saved["A"]
    (g,) = torch.autograd.grad(logits[torch.arange(5), targets].sum(), activation)
    activation, g = activation.detach(), g.detach()
    numerator = g**2
    denominator = 2 * g**2 + activation.sum(dim=(2, 3), keepdim=True) * g**3
    alpha = numerator / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    weights = (alpha * F.relu(g)).sum(dim=(2, 3))
    expected = F.relu((weights[:, :, None, None] * activation).sum(dim=1))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


class TinyNet(nn.Module):
    """conv1x1 -> nn.ReLU(inplace) -> conv1x1 -> F.relu -> conv1x1 -> torch.relu -> GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.c1 = nn.Conv2d(2, 3, 1, bias=False)
        self.c2 = nn.Conv2d(3, 3, 1, bias=False)
        self.c3 = nn.Conv2d(3, 2, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2, 2, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen)

    def forward(self, x):
        x = self.act(self.c1(x))
        x = F.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


def hand_backprop(net: TinyNet, x: torch.Tensor, target: int, guided: bool) -> torch.Tensor:
    """Backpropagation written out layer by layer, with the guided rule at each ReLU if asked."""
    w1, w2, w3 = (c.weight[:, :, 0, 0].detach() for c in (net.c1, net.c2, net.c3))
    fc = net.fc.weight.detach()
    h1 = torch.einsum("oc,nchw->nohw", w1, x)
    a1 = h1.clamp(min=0)
    h2 = torch.einsum("oc,nchw->nohw", w2, a1)
    a2 = h2.clamp(min=0)
    h3 = torch.einsum("oc,nchw->nohw", w3, a2)
    hw = x.shape[2] * x.shape[3]

    def through_relu(grad, pre):
        grad = grad * (pre > 0)
        return grad.clamp(min=0) if guided else grad

    g_a3 = fc[target][None, :, None, None].expand_as(h3) / hw
    g_h3 = through_relu(g_a3, h3)
    g_h2 = through_relu(torch.einsum("oc,nohw->nchw", w3, g_h3), h2)
    g_h1 = through_relu(torch.einsum("oc,nohw->nchw", w2, g_h2), h1)
    return torch.einsum("oc,nohw->nchw", w1, g_h1)


def test_guided_backprop_zeroes_negative_gradients_at_every_relu_module_or_functional():
    net = TinyNet().eval()
    x = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    for target in (0, 1):
        guided = explain(net, x, "guided_backprop", targets=target)
        plain = hand_backprop(net, x, target, guided=False)
        expected = hand_backprop(net, x, target, guided=True)
        torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(guided, plain)  # the guided rule changed something
        saliency = explain(net, x, "saliency", targets=target)
        torch.testing.assert_close(saliency, plain.abs(), rtol=1e-5, atol=1e-6)


def test_saliency_is_abs_input_gradient(small_cnn, images):
    x = images.clone().requires_grad_(True)
    model = copy.deepcopy(small_cnn)
    logits = model(x)
    targets = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits[torch.arange(len(x)), targets].sum(), x)
    ours = explain(small_cnn, images, "saliency")
    assert ours.shape == images.shape
    torch.testing.assert_close(ours, grad.abs(), rtol=1e-4, atol=1e-7)


def test_guided_gradcam_is_the_product_and_shares_the_forward(small_cnn, images):
    result = explain_many(small_cnn, images, ["gradcam", "guided_backprop", "guided_gradcam"])
    gradcam = result.maps["gradcam", "target"]
    guided = result.maps["guided_backprop", "target"]
    torch.testing.assert_close(result.maps["guided_gradcam", "target"], guided * gradcam[:, None])
    alone = explain(small_cnn, images, "guided_gradcam")
    torch.testing.assert_close(alone, guided * gradcam[:, None])


def test_batched_maps_equal_one_image_at_a_time(small_cnn, images):
    batch = explain_many(small_cnn, images, METHODS[1:], {"t": 1})
    for i in range(len(images)):
        single = explain_many(small_cnn, images[i : i + 1], METHODS[1:], {"t": 1})
        for key, value in single.maps.items():
            torch.testing.assert_close(batch.maps[key][i : i + 1], value, rtol=1e-4, atol=1e-7)


def test_several_target_sets_equal_separate_calls(small_cnn, images):
    true = torch.tensor([2, 2, 0, 1, 0])
    together = explain_many(
        small_cnn, images, ["gradcam", "gradcam++", "cam"], {"pred": None, "true": true}
    )
    for method in ("gradcam", "gradcam++", "cam"):
        torch.testing.assert_close(
            together.maps[method, "true"], explain(small_cnn, images, method, targets=true)
        )
        torch.testing.assert_close(
            together.maps[method, "pred"], explain(small_cnn, images, method)
        )
    assert torch.equal(together.targets["pred"], small_cnn(images).argmax(1))
    torch.testing.assert_close(together.probs, small_cnn(images).softmax(1))


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("method", METHODS)
def test_model_is_left_exactly_as_it_was(method, images):
    torch.manual_seed(0)
    model = SmallCNN(3)
    model.train(False)
    model.features[0].train(True)  # a mixed mode must survive too
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(images)
    explain(model, images, method)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert _hook_count(model) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(images), before)
    assert torch.is_grad_enabled()


def test_hooks_are_removed_when_an_exception_is_raised(small_cnn, images):
    def broken(_output):
        raise RuntimeError("selector failed")

    for method in METHODS:
        with pytest.raises(RuntimeError, match="selector failed"):
            explain(small_cnn, images, method, output=broken)
        assert _hook_count(small_cnn) == 0
        assert torch.is_grad_enabled()
    # The ReLU interception is gone too: an ordinary backward is the plain one.
    x = images.clone().requires_grad_(True)
    small_cnn(x).sum().backward()


class Wrapped(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = SmallCNN(3)
        self.kind = kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, x.mean()
        if self.kind == "dict":
            return {"aux": x.mean(), "logits": logits}
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("kind", ["tuple", "dict", "object"])
def test_models_returning_tuples_dicts_or_logits_objects(kind, images):
    torch.manual_seed(0)
    model = Wrapped(kind).eval()
    maps = explain(model, images, "gradcam", layer="net.features")
    torch.testing.assert_close(maps, explain(model.net, images, "gradcam", layer="features"))
    custom = explain(
        model,
        images,
        "saliency",
        output=lambda out: (
            out[0] if kind == "tuple" else (out["logits"] if kind == "dict" else out.logits)
        ),
    )
    assert custom.shape == images.shape


def test_zero_gradients_give_zero_maps_not_nan(images):
    model = SmallCNN(3).eval()
    nn.init.zeros_(model.fc.weight)
    for method in METHODS:
        maps = explain(model, images, method)
        assert torch.isfinite(maps).all(), method
        assert torch.count_nonzero(maps) == 0, method
        assert torch.count_nonzero(normalize_maps(maps)) == 0


@pytest.mark.parametrize(
    "arch",
    ["resnet18", "vgg11", "densenet121", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"],
)
def test_torchvision_classifiers(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    result = explain_many(model, x, ["gradcam", "gradcam++", "saliency", "guided_gradcam"])
    for (method, _), value in result.maps.items():
        expected = (2, 64, 64) if method.startswith("gradcam") else (2, 3, 64, 64)
        assert value.shape == expected
        assert torch.isfinite(value).all()
    assert _hook_count(model) == 0


def test_densenet_functional_relu_is_guided():
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=2).eval()
    x = torch.randn(1, 3, 32, 32)
    guided = explain(model, x, "guided_backprop")
    plain = explain(model, x, "saliency")
    # Guided backprop must differ from the plain gradient, and its output from the last
    # (functional) ReLU onwards cannot be negative: check the head-side gradient directly.
    assert not torch.allclose(guided.abs(), plain)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_each_device(device, small_cnn, images):
    model = copy.deepcopy(small_cnn).to(device)
    maps = explain_many(model, images.to(device), METHODS)
    assert all(value.device.type == device for value in maps.maps.values())


def test_cam_refuses_a_network_without_gap_head(images):
    model = torchvision.models.vgg11(num_classes=3).eval()
    with pytest.raises(CAMNotApplicableError, match="global average pooling"):
        explain(model, images, "cam")
    densenet = torchvision.models.densenet121(num_classes=3).eval()
    with pytest.raises(CAMNotApplicableError, match="not Linear"):
        explain(densenet, images, "cam")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": torch.randn(3, 64, 64)}, "shape \\(N, C, H, W\\)"),
        ({"targets": [0, 1]}, "2 entries for 5 images"),
        ({"targets": 3}, "class 3 out of range for 3 classes"),
        ({"targets": [0, 1, 2, 0, -1]}, "class -1 out of range"),
        ({"layer": "featurs"}, "unknown layer 'featurs'.*did you mean 'features'"),
        ({"method": "gradcam+"}, "unknown method 'gradcam\\+'"),
        ({"layer": "fc"}, "must output a \\(N, C, h, w\\) map"),
        ({"layer": "features.2"}, "runs more than once"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, message, small_cnn, images):
    args = {"images": images, "method": "gradcam", "targets": None, "layer": None} | kwargs
    if kwargs.get("layer") == "features.2":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        shared = nn.Sequential(
            model, model[1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
        )
        small_cnn = shared
        args["layer"] = "0.1"
    with pytest.raises((ValueError, TypeError), match=message):
        explain(
            small_cnn, args["images"], args["method"], layer=args["layer"], targets=args["targets"]
        )


def _blob_maps() -> torch.Tensor:
    maps = torch.zeros(3, 32, 32)
    maps[0, 2:6, 2:6] = 1.0  # 16 pixels, brightest
    maps[0, 15:25, 10:20] = 0.5  # 100 pixels, larger
    maps[1, 20:30, 1:4] = 0.9  # 30 pixels, larger
    maps[1, 3:7, 25:30] = 1.0  # 20 pixels, brightest
    maps[1, 10, 10] = 0.1  # below 20% of the max: ignored
    return maps


def test_cam_box_picks_the_larger_blob():
    boxes = cam_boxes(_blob_maps())
    assert boxes[0].tolist() == [10, 15, 20, 25]
    assert boxes[1].tolist() == [1, 20, 4, 30]
    assert boxes[2].tolist() == [-1, -1, -1, -1]  # an all-zero map has no box


def test_cam_box_agrees_with_scipy_on_random_maps():
    gen = torch.Generator().manual_seed(4)
    maps = F.avg_pool2d(torch.rand(20, 1, 40, 40, generator=gen), 5, 1, 2)[:, 0] ** 4
    boxes = cam_boxes(maps)
    for i, m in enumerate(maps.numpy()):
        labels, count = ndimage.label(m >= 0.2 * m.max(), structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())[1:]
        comp = labels == (np.argmax(sizes) + 1)  # ties: the component scipy numbers first
        ys, xs = np.nonzero(comp)
        assert boxes[i].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_largest_component_equals_scipy_on_blobs_ties_and_a_snake():
    gen = torch.Generator().manual_seed(7)
    maps = F.avg_pool2d(torch.rand(16, 1, 48, 48, generator=gen), 7, 1, 3)[:, 0] ** 4
    masks = maps >= 0.2 * maps.flatten(1).amax(1).view(-1, 1, 1)
    ties = torch.zeros(2, 20, 20, dtype=torch.bool)
    ties[:, 2:5, 2:5] = True  # two 9-pixel squares: the first in raster order wins
    ties[:, 12:15, 12:15] = True
    ties[1, 2:5, 2:5] = False
    ties[1, 15:18, 2:5] = True
    snake = torch.zeros(1, 20, 20, dtype=torch.bool)  # one long winding component
    for row in range(0, 20, 4):
        snake[0, row, :] = True
        snake[0, row : row + 4, 19 if (row // 4) % 2 == 0 else 0] = True
    snake[0, 18:, :] = False
    snake[0, 19, 5] = True  # and a separate pixel
    for batch in (masks, ties, snake):
        got = largest_component(batch)
        for i, mask in enumerate(batch.numpy()):
            labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
            sizes = np.bincount(labels.ravel())[1:]
            assert (got[i].numpy() == (labels == np.argmax(sizes) + 1)).all()


def test_torchscript_models_get_saliency_and_a_clear_refusal_otherwise(small_cnn, images):
    scripted = torch.jit.script(copy.deepcopy(small_cnn))
    torch.testing.assert_close(
        explain(scripted, images, "saliency"), explain(small_cnn, images, "saliency")
    )
    for method in ("gradcam", "guided_backprop"):
        with pytest.raises(ValueError, match="TorchScript model cannot be hooked"):
            explain(scripted, images, method)


def test_guided_backprop_through_relu6():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 1, bias=False)
    nn.init.normal_(conv.weight, std=6.0)  # some pre-activations above 6
    fc = nn.Linear(4, 2, bias=False)
    net = nn.Sequential(
        conv, nn.ReLU6(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc
    ).eval()
    x = torch.randn(3, 2, 5, 5)
    h = conv(x).detach()
    assert (h > 6).any() and ((h > 0) & (h < 6)).any()
    g_a = (fc.weight[1] / 25).detach()[None, :, None, None].expand_as(h)
    g_h = g_a.clamp(min=0) * ((h > 0) & (h < 6))
    expected = torch.einsum("oc,nohw->nchw", conv.weight[:, :, 0, 0].detach(), g_h)
    torch.testing.assert_close(explain(net, x, "guided_backprop", targets=1), expected)


def test_largest_component_scipy_and_torch_labellings_agree():
    """The CPU (scipy, whole batch in one call) and device (torch rounds) labellings keep the same
    pixels: smooth and speckled masks, empty and full ones, ties, and an empty batch."""
    gen = torch.Generator().manual_seed(11)
    smooth = F.interpolate(torch.rand(24, 1, 8, 8, generator=gen), size=(40, 40), mode="bilinear")
    masks = [
        smooth[:, 0] >= 0.2 * smooth.flatten(1).amax(1).view(-1, 1, 1) + 0.5,
        torch.rand(24, 33, 17, generator=gen) > 0.55,  # many small speckles: many ties
        torch.zeros(3, 9, 9, dtype=torch.bool),
        torch.ones(2, 9, 9, dtype=torch.bool),
        torch.zeros(0, 9, 9, dtype=torch.bool),
    ]
    for mask in masks:
        scipy_kept = _largest_component_scipy(mask)
        assert scipy_kept.shape == mask.shape and scipy_kept.dtype == torch.bool
        assert torch.equal(scipy_kept, _largest_component_torch(mask))
        assert not (scipy_kept & ~mask).any()

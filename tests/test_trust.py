"""Trust checks: randomization test, deletion / insertion and region occlusion.

Checked against independent computations: Quantus (MPRT, PixelFlipping), scipy (ranks, blur),
scikit-image (SSIM) and cases computed by hand; plus properties, determinism and config errors.
Everything runs on tiny models and 16-32 images of 32x32 (a few seconds on two cores).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from audit.explain import explain
from audit.metrics.attention import as_heat
from audit.metrics.bootstrap import resample_weights
from audit.metrics.trust import (
    TrustConfig,
    cascade_steps,
    deletion_insertion,
    faithfulness_summary,
    gaussian_blur,
    occlusion_difference,
    occlusion_summary,
    randomization_cascade,
    randomization_test,
    region_occlusion,
    spearman_rows,
    ssim_rows,
)
from audit.metrics.trust.faithfulness import merge_curves, random_permutations, ranks_of
from audit.metrics.trust.occlusion import merge_occlusion, overlap_by_offset, roll_masks
from audit.metrics.trust.randomization import cut_steps, merge_cascades
from audit.models.zoo import SmallCNN

SIZE = 32
LAYER = "6"  # the tiny CNN's last conv block output (after its ReLU)


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with one 8x8 square, red (class 0) or green (class 1), at a random place."""
    g = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.rand((n, 3, SIZE, SIZE), generator=g)
    labels = torch.arange(n) % 2
    ys = torch.randint(0, SIZE - 8, (n,), generator=g)
    xs = torch.randint(0, SIZE - 8, (n,), generator=g)
    for i in range(n):  # test data only
        images[i, int(labels[i]), ys[i] : ys[i] + 8, xs[i] : xs[i] + 8] = 1.0
    return images, labels


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor]:
    """The tiny CNN trained for a few steps to tell the square's colour (eval mode), and 24 images."""
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = squares(640, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(20):
        batch = slice(step * 32, (step + 1) * 32)
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    model.eval()
    test, labels = squares(24, seed=2)
    with torch.no_grad():
        accuracy = (model(test).argmax(1) == labels).float().mean()
    assert accuracy > 0.9  # the fixture really learnt the task
    return model, test


# ---------------------------------------------------------------------------------------------
# Building blocks against scipy / scikit-image


def test_spearman_matches_scipy_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (5, 200), generator=g).float()  # many ties, as in ReLU'd CAM maps
    b = a + torch.randint(0, 4, (5, 200), generator=g).float()
    expected = [scipy.stats.spearmanr(a[i].numpy(), b[i].numpy())[0] for i in range(5)]
    np.testing.assert_allclose(spearman_rows(a, b).numpy(), expected, rtol=0, atol=1e-12)
    assert torch.isnan(spearman_rows(torch.zeros(1, 10), a[:1, :10]))[0]  # constant map


def test_ssim_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand((3, SIZE, SIZE), generator=g)
    b = (a + 0.3 * torch.rand((3, SIZE, SIZE), generator=g)).clamp(0, 1)
    expected = [
        structural_similarity(
            a[i].double().numpy(),
            b[i].double().numpy(),
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(ssim_rows(a, b).numpy(), expected, atol=1e-6)
    assert torch.allclose(ssim_rows(a, a), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("sigma", [1.1, 5.0])
def test_blur_matches_scipy(sigma: float) -> None:
    x = torch.rand((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0)).double()
    radius = math.ceil(3 * sigma)
    expected = scipy.ndimage.gaussian_filter(
        x.numpy(), sigma=(0, 0, sigma, sigma), radius=(0, 0, radius, radius), mode="mirror"
    )
    np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), expected, atol=1e-12)


def test_control_overlap_and_roll_match_torch_roll() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand((3, 8, 10), generator=g) > 0.8
    union = torch.rand((3, 8, 10), generator=g) > 0.5
    overlap = overlap_by_offset(masks, union)
    for n in range(3):  # brute force over every offset
        for dy in range(8):
            for dx in range(10):
                rolled = torch.roll(masks[n], (dy, dx), (0, 1))
                assert int((rolled & union[n]).sum()) == int(overlap[n, dy, dx])
    dy, dx = torch.tensor([1, 7, 3]), torch.tensor([4, 0, 9])
    rolled = roll_masks(masks, dy, dx)
    for n in range(3):
        assert torch.equal(rolled[n], torch.roll(masks[n], (int(dy[n]), int(dx[n])), (0, 1)))


# ---------------------------------------------------------------------------------------------
# Randomization test against Quantus MPRT


def test_cascade_steps_of_small_cnn_are_blocks() -> None:
    steps = cascade_steps(SmallCNN(), "block")
    assert [name for name, _ in steps] == [
        "fc",
        "features.11+features.12",
        "features.8+features.9",
        "features.4+features.5",
        "features.0+features.1",
    ]
    modules = cascade_steps(SmallCNN(), "module")
    assert [name for name, _ in modules][:3] == ["fc", "features.12", "features.11"]
    assert len(modules) == 9


@pytest.mark.parametrize("method", ["gradcam", "guided_backprop"])
def test_randomization_matches_quantus_mprt(trained, method: str) -> None:
    import quantus

    model, images = trained
    images = images[:16]
    targets = model(images).argmax(1)

    def explain_func(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_) -> np.ndarray:
        maps = explain(
            model,
            torch.as_tensor(inputs),
            method,
            layer=LAYER,
            targets=torch.as_tensor(targets).long(),
        )
        return as_heat(maps).abs()[:, None].detach().numpy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.MPRT(
            layer_order="top_down",
            seed=7,
            abs=True,
            normalise=False,
            disable_warnings=True,
        )
        theirs = metric(
            model=model,
            x_batch=images.numpy(),
            y_batch=targets.numpy(),
            a_batch=None,
            channel_first=True,
            explain_func=explain_func,
            batch_size=len(images),
        )
    ours = randomization_cascade(model, images, [method], layer=LAYER, cascade="module", seed=7)
    layers = [k for k in theirs if k != "original"]
    assert ours.layers == layers  # same modules, same order (output -> input)
    expected = np.array([theirs[k] for k in layers], dtype=np.float64)
    np.testing.assert_allclose(ours.spearman[method].numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(theirs["original"], 1.0, atol=1e-9)


def test_randomization_of_an_edge_detector_keeps_correlation_high() -> None:
    """Saliency of a model whose only parameters scale a fixed edge map: the map ignores the
    weights, so the test must fail it; Grad-CAM of a trained CNN must pass."""

    class EdgeModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
            self.register_buffer("kernel", torch.stack([sobel, sobel.T])[:, None])
            self.fc = nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            edges = F.conv2d(x.mean(1, keepdim=True), self.kernel, padding=1).pow(2).sum(1)
            return self.fc(edges.mean(dim=(1, 2))[:, None])

    torch.manual_seed(0)
    images, _ = squares(16, seed=3)
    summaries, strip = randomization_test(
        EdgeModel().eval(), images, ["saliency", "guided_backprop"], n_boot=200
    )
    for method in ("saliency", "guided_backprop"):
        assert summaries[method]["final_spearman"]["value"] > 0.99
        assert summaries[method]["passed"] is False
        assert len(strip[method]) == 2 and strip[method][0].shape == (SIZE, SIZE)


def test_gradcam_passes_and_model_is_restored(trained) -> None:
    model, images = trained
    images = images[:16]
    model.train()  # the check must not leave the model in another mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summaries, strip = randomization_test(
        model, images, ["gradcam", "guided_gradcam"], layer=LAYER, n_boot=200, seed=3
    )
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model.eval()
    gradcam = summaries["gradcam"]
    assert gradcam["passed"] is True
    assert gradcam["final_spearman"]["value"] < 0.5
    assert len(gradcam["steps"]) == 3  # fc, conv+bn, conv+bn
    assert [s["layer"] for s in gradcam["steps"]] == ["9", "4+5", "0+1"]
    low, high = gradcam["final_spearman"]["ci_low"], gradcam["final_spearman"]["ci_high"]
    assert low <= gradcam["final_spearman"]["value"] <= high
    assert len(strip["gradcam"]) == 4
    assert all(float(t.min()) >= 0 and float(t.max()) <= 1 for t in strip["gradcam"])
    again, _ = randomization_test(
        model, images, ["gradcam", "guided_gradcam"], layer=LAYER, n_boot=200, seed=3
    )
    assert again == summaries  # deterministic for a seed
    json.dumps(summaries, allow_nan=False)  # JSON-ready


# ---------------------------------------------------------------------------------------------
# Deletion / insertion against Quantus PixelFlipping and by hand


def _pixel_flipping(model, x, y, heat, steps, **kwargs) -> np.ndarray:
    import quantus

    channels = x.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.PixelFlipping(
            features_in_step=channels * SIZE * SIZE // steps,
            abs=False,
            normalise=False,
            disable_warnings=True,
            **kwargs,
        )
        curves = metric(
            model=model,
            x_batch=x.numpy(),
            y_batch=y.numpy(),
            a_batch=heat[:, None].numpy(),
            channel_first=True,
            softmax=True,
            batch_size=len(x),
        )
    return np.asarray(curves, dtype=np.float64)


def _quantus_to_our_auc(curves: np.ndarray, start: np.ndarray, steps: int) -> np.ndarray:
    """Quantus integrates the curve without the unperturbed point, with dx = 1 per step; ours is
    the trapezoid over fractions 0..1 with the unperturbed point: add the first trapezoid, scale."""
    return (np.trapezoid(curves, dx=1, axis=1) + (start + curves[:, 0]) / 2) / steps


class Grey(nn.Module):
    """The trained CNN on one-channel images (repeated to RGB)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(-1, 3, -1, -1))


def test_deletion_and_insertion_match_quantus_pixel_flipping(trained) -> None:
    """PixelFlipping flips single features (channel values) and asserts that its step divides
    H * W, not C * H * W, so whole RGB pixels cannot be flipped per step with it (64 pixels = 192
    features does not divide 1024): the comparison runs on one-channel images, where a feature is
    a pixel. Deletion = PixelFlipping with baseline 0; insertion = PixelFlipping started from the
    blurred image with a perturbation that puts the original pixel back."""
    model, images = trained
    model = Grey(model).eval()
    steps, sigma = 16, 3.0
    images = images[:16].mean(1, keepdim=True)
    heat = as_heat(explain(model, images, "saliency")).detach()
    # Saliency has exact zeros; ties are ordered differently (ours: seeded random, Quantus: argsort)
    # so a tiny distinct jitter makes the order unique for both.
    heat = heat + 1e-6 * torch.rand(heat.shape, generator=torch.Generator().manual_seed(9))
    result = deletion_insertion(
        model, images, {"saliency": heat}, steps=steps, baseline="zero", blur_sigma=sigma, seed=5
    )
    y = torch.as_tensor(result["targets"])
    probs = model(images).softmax(1).detach().numpy()[np.arange(16), result["targets"]]
    blurred = gaussian_blur(images, sigma)
    blur_probs = model(blurred).softmax(1).detach().numpy()[np.arange(16), result["targets"]]
    original = images.flatten(1).numpy()

    def reveal(arr: np.ndarray, indices: np.ndarray, **_) -> np.ndarray:
        out = arr.copy()
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = original[rows, indices]
        return out

    # The random order, as a map that Quantus sorts into the same order.
    perm = random_permutations(16, SIZE * SIZE, torch.Generator().manual_seed(5))
    random_heat = (SIZE * SIZE - ranks_of(perm)).float().view(16, SIZE, SIZE)
    cases = {
        "saliency/deletion": (images, heat, {"perturb_baseline": 0.0}, probs),
        "saliency/insertion": (blurred, heat, {"perturb_func": reveal}, blur_probs),
        "random/deletion": (images, random_heat, {"perturb_baseline": 0.0}, probs),
        "random/insertion": (blurred, random_heat, {"perturb_func": reveal}, blur_probs),
    }
    for key, (x, h, kwargs, start) in cases.items():
        theirs = _pixel_flipping(model, x, y, h, steps, **kwargs)
        np.testing.assert_allclose(result["curves"][key][:, 1:], theirs, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(result["curves"][key][:, 0], start, atol=1e-5, err_msg=key)
        expected_auc = _quantus_to_our_auc(theirs, start, steps)
        np.testing.assert_allclose(result["auc"][key], expected_auc, atol=1e-5, err_msg=key)


class Linear(nn.Module):
    """logit_1 = sum(w * x[:, 0]), logit_0 = 0: p_1 = sigmoid(sum(w * x[:, 0]))."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x[:, 0] * self.weight).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_deletion_insertion_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    h = w = 8
    weight = torch.rand((h, w), generator=g, dtype=torch.float64) * 0.2
    image = torch.rand((1, 3, h, w), generator=g, dtype=torch.float64)
    steps, sigma = 16, 1.5
    result = deletion_insertion(
        Linear(weight), image, {"w": weight[None]}, steps=steps, blur_sigma=sigma, seed=0
    )
    # By hand in numpy: pixels by descending weight, 4 per step.
    wv, xv = weight.numpy().ravel(), image[0, 0].numpy().ravel()
    radius = math.ceil(3 * sigma)
    bv = scipy.ndimage.gaussian_filter(image[0, 0].numpy(), sigma, radius=radius, mode="mirror")
    bv = bv.ravel()
    order = np.argsort(-wv)
    k = np.arange(steps + 1) * (h * w // steps)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    removed = np.concatenate([[0.0], np.cumsum((wv * xv)[order])])[k]
    deletion = sigmoid((wv * xv).sum() - removed)
    gained = np.concatenate([[0.0], np.cumsum((wv * (xv - bv))[order])])[k]
    insertion = sigmoid((wv * bv).sum() + gained)
    fractions = k / (h * w)
    np.testing.assert_allclose(result["fractions"], fractions)
    np.testing.assert_allclose(result["curves"]["w/deletion"][0], deletion, atol=1e-12)
    np.testing.assert_allclose(result["curves"]["w/insertion"][0], insertion, atol=1e-12)
    np.testing.assert_allclose(result["auc"]["w/deletion"][0], np.trapezoid(deletion, fractions))
    np.testing.assert_allclose(result["auc"]["w/insertion"][0], np.trapezoid(insertion, fractions))


def test_gradcam_is_more_faithful_than_random_and_deterministic(trained) -> None:
    model, images = trained
    images = images[:16]
    maps = {"gradcam": explain(model, images, "gradcam", layer=LAYER)}
    a = deletion_insertion(model, images, maps, seed=1, batch_size=100)
    b = deletion_insertion(model, images, maps, seed=1, batch_size=37)  # chunking is invisible
    for key in a["auc"]:
        np.testing.assert_allclose(a["auc"][key], b["auc"][key], atol=1e-6)
    c = deletion_insertion(model, images, maps, seed=2)
    assert not np.allclose(a["auc"]["random/deletion"], c["auc"]["random/deletion"])
    summary = faithfulness_summary(a, "gradcam", resample_weights(len(images), 200, 0))
    assert summary["deletion_auc"]["value"] < summary["random_deletion_auc"]["value"]
    assert summary["insertion_auc"]["value"] > summary["random_insertion_auc"]["value"]
    assert summary["faithful"] is True
    json.dumps(summary, allow_nan=False)
    assert len(summary["deletion_curve"]) == 21 and summary["fractions"][-1] == 1.0


# ---------------------------------------------------------------------------------------------
# Region occlusion


class LooksAtBox(nn.Module):
    """logit_1 = a * (mean of channel 0 inside rows/cols 4:12 - 0.5), logit_0 = 0."""

    def __init__(self, a: float = 6.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.a * (x[:, 0, 4:12, 4:12].mean(dim=(1, 2)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_occlusion_by_hand() -> None:
    n, a, sigma = 4, 6.0, 4.0
    g = torch.Generator().manual_seed(0)
    images = torch.zeros((n, 3, SIZE, SIZE))
    images[:, 1:] = torch.rand((n, 2, SIZE, SIZE), generator=g)
    images[:, 0, 4:12, 4:12] = 1.0
    box = torch.zeros((n, SIZE, SIZE), dtype=torch.bool)
    box[:, 4:12, 4:12] = True
    other = torch.zeros_like(box)
    other[:, 20:26, 18:30] = True
    present = {"box": torch.ones(n, dtype=torch.bool), "other": torch.tensor([1, 1, 1, 0]).bool()}
    result = region_occlusion(
        LooksAtBox(a), images, {"box": box, "other": other}, present, blur_sigma=sigma, seed=0
    )
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    p = sigmoid(a * 0.5)
    mean_drop = p - sigmoid(a * (64 / SIZE**2 - 0.5))  # the mean colour of channel 0 is 64 / 1024
    radius = math.ceil(3 * sigma)
    blurred = scipy.ndimage.gaussian_filter(
        images[0, 0].double().numpy(), sigma, radius=radius, mode="mirror"
    )
    blur_mean = blurred[4:12, 4:12].mean()
    blur_drop = p - sigmoid(a * (blur_mean - 0.5))
    assert blur_mean < 0.5  # so the blurred box flips the prediction too
    for fill, drop in (("mean", mean_drop), ("blur", blur_drop)):
        columns = result["regions"]["box"][fill]
        np.testing.assert_allclose(columns["drop"], drop, atol=1e-6)
        np.testing.assert_allclose(columns["control_drop"], 0.0, atol=1e-7)
        np.testing.assert_allclose(columns["effect"], drop, atol=1e-6)
        np.testing.assert_array_equal(columns["flipped"], 1.0)
        np.testing.assert_array_equal(columns["control_flipped"], 0.0)
        elsewhere = result["regions"]["other"][fill]
        np.testing.assert_allclose(elsewhere["drop"][:3], 0.0, atol=1e-7)
        assert np.isnan(elsewhere["drop"][3]) and np.isnan(elsewhere["effect"][3])
    assert result["no_control"] == {"box": 0, "other": 0}


def test_control_avoids_every_region_and_is_seeded(trained) -> None:
    model, images = trained
    n = len(images)
    g = torch.Generator().manual_seed(4)
    regions = {f"r{i}": torch.rand((n, SIZE, SIZE), generator=g) > 0.97 for i in range(2)}
    # A region covering most of the image leaves no room for a control on image 0.
    big = torch.zeros((n, SIZE, SIZE), dtype=torch.bool)
    big[0, 2:30, 2:30] = True
    big[1:, :4, :4] = True
    regions["big"] = big
    present = {k: torch.ones(n, dtype=torch.bool) for k in regions}
    a = region_occlusion(model, images, regions, present, seed=0)
    b = region_occlusion(model, images, regions, present, seed=0, batch_size=7)
    for region, by_fill in a["regions"].items():
        for fill, columns in by_fill.items():
            for measure, values in columns.items():
                np.testing.assert_allclose(values, b["regions"][region][fill][measure], atol=1e-6)
    assert a["no_control"]["big"] == 1
    union = torch.stack(list(regions.values())).any(0)
    for region, mask in regions.items():
        offsets = torch.as_tensor(a["control_offsets"][region])
        found = offsets[:, 0] >= 0
        assert found[1:].all()  # image 0 is nearly covered by "big": no room for its control
        assert int((~found).sum()) == a["no_control"][region]
        control = roll_masks(mask[found], offsets[found, 0], offsets[found, 1])
        assert not (control & union[found]).any()  # the control lies off every region
        assert torch.equal(control.sum((1, 2)), mask[found].sum((1, 2)))  # with the same area
        assert (offsets[found] != 0).any(1).all()
    assert np.isnan(a["regions"]["big"]["mean"]["control_drop"][0])
    assert np.isfinite(a["regions"]["big"]["mean"]["drop"][0])


def test_occlusion_summary_and_paired_difference(trained) -> None:
    model, images = trained
    n = len(images)
    squares_mask = images.amax(1) > 0.99  # the coloured square
    corner = torch.zeros((n, SIZE, SIZE), dtype=torch.bool)
    corner[:, -6:, -6:] = True
    corner &= ~squares_mask
    regions = {"square": squares_mask, "corner": corner}
    present = {k: torch.ones(n, dtype=torch.bool) for k in regions}
    result = region_occlusion(model, images, regions, present, seed=0)
    groups = np.array(["a", "b", ""] * (n // 3))
    labels = np.array(["x", "y"] * (n // 2))
    weights = resample_weights(n, 300, 0)
    summary = occlusion_summary(result, groups, labels, weights)
    square = summary["square"]["mean"]["overall"]
    # The model decides by the square: removing it costs far more than a control of its shape.
    assert square["effect"]["ci_low"] > 0.2
    assert square["flip_rate"]["value"] > square["control_flip_rate"]["value"]
    assert set(summary["square"]["blur"]["per_group"]) == {"(none)", "a", "b"}
    assert "x / a" in summary["square"]["blur"]["per_cell"]
    json.dumps(summary, allow_nan=False)
    effect = result["regions"]["square"]["mean"]["effect"]
    assert square["effect"]["value"] == pytest.approx(np.nanmean(effect))
    # Paired difference: a model that ignores every pixel has zero effect.
    blind = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2))
    nn.init.zeros_(blind[1].weight)
    other = region_occlusion(
        blind, images, regions, present, seed=0, targets=torch.tensor(result["targets"])
    )
    diff = occlusion_difference(result, other, weights)["square"]["mean"]["effect_difference"]
    assert diff["value"] == pytest.approx(-np.nanmean(effect))
    assert diff["ci_high"] < 0


# ---------------------------------------------------------------------------------------------
# Config


def test_default_config_is_valid() -> None:
    TrustConfig().check()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"samples": 0}, "trust.samples"),
        ({"samples": -5}, "trust.samples"),
        ({"max_randomized_correlation": 1.5}, "trust.max_randomized_correlation"),
        ({"max_randomized_correlation": -0.1}, "trust.max_randomized_correlation"),
        ({"steps": 0}, "trust.steps"),
        ({"blur_sigma": 0.0}, "trust.blur_sigma"),
        ({"deletion_baseline": "black"}, "trust.deletion_baseline"),
        ({"occlusion_fills": []}, "trust.occlusion_fills"),
        ({"occlusion_fills": ["mean", "noise"]}, "trust.occlusion_fills"),
        ({"cascade": "independent"}, "trust.cascade"),
        ({"batch_size": 0}, "trust.batch_size"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(changes: dict, key: str) -> None:
    from audit.config import ConfigError

    config = TrustConfig(**changes)
    with pytest.raises(ConfigError) as error:
        config.check()
    message = str(error.value)
    assert message.startswith(key + " ") and "\n" not in message


# ---------------------------------------------------------------------------------------------
# Cut points and streaming: batches merged give what the whole sample gives


def test_cut_steps_are_evenly_spaced_and_end_at_the_last_step() -> None:
    assert cut_steps(21, 5) == [4, 8, 12, 16, 20]  # ceil(21 k / 5) - 1, k = 1..5
    assert cut_steps(5, 2) == [2, 4]
    assert cut_steps(3, 1) == [2]
    assert cut_steps(3, 3) == cut_steps(3, 10) == cut_steps(3, None) == [0, 1, 2]


def test_cut_points_measure_the_full_cascade_at_those_steps(trained) -> None:
    """With cuts the cascade randomizes every step but measures some: the same values as the
    full cascade's rows at those steps (computed independently, every step measured)."""
    model, images = trained
    images = images[:12]
    full = randomization_cascade(model, images, ["gradcam"], layer=LAYER, cascade="module", seed=5)
    cut = randomization_cascade(
        model, images, ["gradcam"], layer=LAYER, cascade="module", seed=5, cuts=2
    )
    rows = cut_steps(len(full.layers), 2)
    assert len(full.layers) == 5 and rows == [2, 4]
    assert cut.layers == [full.layers[i] for i in rows]
    torch.testing.assert_close(cut.spearman["gradcam"], full.spearman["gradcam"][rows])
    torch.testing.assert_close(cut.ssim["gradcam"], full.ssim["gradcam"][rows])
    assert len(cut.strip["gradcam"]) == 3  # the original map and one per measured step


def test_cascades_of_batches_merge_into_the_whole_samples(trained) -> None:
    model, images = trained
    whole = randomization_cascade(model, images, ["gradcam", "guided_gradcam"], layer=LAYER)
    parts = [
        randomization_cascade(model, images[a:b], ["gradcam", "guided_gradcam"], layer=LAYER)
        for a, b in ((0, 10), (10, 24))
    ]
    merged = merge_cascades(parts)
    assert merged.layers == whole.layers and torch.equal(merged.targets, whole.targets)
    for method in ("gradcam", "guided_gradcam"):
        torch.testing.assert_close(merged.spearman[method], whole.spearman[method])
        torch.testing.assert_close(merged.ssim[method], whole.ssim[method])
    with pytest.raises(ValueError, match="different steps"):
        merge_cascades([parts[0], randomization_cascade(model, images[:2], ["gradcam"], cuts=1)])


def test_curves_and_occlusion_of_batches_merge(trained) -> None:
    """Merging keeps each batch's per-image values in order; the mean curves are over all."""
    model, images = trained
    maps = {"gradcam": explain(model, images, "gradcam", layer=LAYER)}
    parts = [
        deletion_insertion(model, images[a:b], {"gradcam": maps["gradcam"][a:b]}, steps=4, seed=a)
        for a, b in ((0, 10), (10, 24))
    ]
    merged = merge_curves(parts)
    for key, curve in merged["curves"].items():
        np.testing.assert_array_equal(curve, np.concatenate([p["curves"][key] for p in parts]))
        np.testing.assert_allclose(merged["mean_curves"][key], curve.mean(axis=0))
        np.testing.assert_allclose(merged["auc"][key], np.trapezoid(curve, merged["fractions"]))
    regions = {"left": torch.zeros(24, SIZE, SIZE, dtype=torch.bool)}
    regions["left"][:, :, :8] = True
    present = {"left": torch.arange(24) % 3 > 0}
    occ = [
        region_occlusion(
            model, images[a:b], {"left": regions["left"][a:b]}, {"left": present["left"][a:b]}
        )
        for a, b in ((0, 10), (10, 24))
    ]
    joined = merge_occlusion(occ)
    assert joined["no_control"]["left"] == sum(p["no_control"]["left"] for p in occ)
    np.testing.assert_array_equal(
        joined["regions"]["left"]["mean"]["effect"],
        np.concatenate([p["regions"]["left"]["mean"]["effect"] for p in occ]),
    )
    assert joined["control_offsets"]["left"].shape == (24, 2)

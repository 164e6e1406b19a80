"""The streamed trust stage gives what the checks give when called directly on the whole sample
(randomization) or on each batch with its seed (deletion / insertion, occlusion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.explain import explain
from audit.metrics.trust import (
    TrustConfig,
    deletion_insertion,
    randomization_test,
    region_occlusion,
)
from audit.models.zoo import SmallCNN
from audit.pipeline.map import MapSpec
from audit.pipeline.trust_stage import TrustJob, TrustSample, batch_seed, run_trust

SIZE = 32
REGIONS = ["hair", "face"]
METHODS = ["gradcam", "guided_gradcam"]


class Made(torch.utils.data.Dataset):
    """Seeded noise images with two fixed regions (the second absent from every third image)."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(100 + int(i))
        masks = torch.zeros(len(REGIONS), SIZE, SIZE, dtype=torch.bool)
        masks[0, 2:10, 4:20] = True
        masks[1, 12:22, 8:24] = True
        present = torch.tensor([True, i % 3 != 0])
        image = torch.rand((3, SIZE, SIZE), generator=g)
        return {"image": image, "regions": masks, "present": present, "index": i, "label": i % 2}


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    torch.manual_seed(0)
    model = SmallCNN(2).eval()
    config = TrustConfig(
        samples=20,
        randomization_samples=12,
        faithfulness_samples=6,
        steps=4,
        cascade_cuts=2,
        occlusion_fills=["mean"],
        batch_size=8,
    )
    spec = MapSpec(layer="features", regions=REGIONS, unions={}, batch_size=64)
    positions = np.arange(20)
    folder = tmp_path_factory.mktemp("trust")
    out = run_trust(
        model,
        spec,
        Made(),
        TrustSample(positions, np.array(["a", "b"] * 10), np.array(["x"] * 20)),
        TrustJob("m", METHODS, config, 50, 0, folder, torch.device("cpu")),
    )
    images = torch.stack([Made()[i]["image"] for i in range(20)])
    return model, images, out, folder


def test_randomization_is_that_of_the_whole_prefix(streamed) -> None:
    model, images, (block, _, _), folder = streamed
    assert (block["n_images"], block["n_randomization_images"]) == (20, 12)
    direct, _ = randomization_test(
        model, images[:12], METHODS, n_boot=50, seed=0, layer="features", cuts=2
    )
    for method in METHODS:
        ours = block["methods"][method]["randomization"]
        assert [s["layer"] for s in ours["steps"]] == [s["layer"] for s in direct[method]["steps"]]
        assert ours["cascade_steps"] == 5 and len(ours["steps"]) == 2
        for key in ("value", "ci_low", "ci_high"):
            assert ours["final_spearman"][key] == pytest.approx(
                direct[method]["final_spearman"][key], abs=1e-9
            )
        assert (folder / "trust" / "m" / f"{method}.png").exists()


def test_faithfulness_and_occlusion_are_those_of_each_batch(streamed) -> None:
    model, images, (block, columns, occlusion), _ = streamed
    maps = {m: explain(model, images[:6], m, layer="features") for m in METHODS}
    curves = deletion_insertion(model, images[:6], maps, steps=4, seed=batch_seed(0, 0))
    for method in METHODS:
        ours = block["methods"][method]["faithfulness"]
        for curve in ("deletion", "insertion"):
            assert ours[f"{curve}_auc"]["value"] == pytest.approx(
                float(curves["auc"][f"{method}/{curve}"].mean()), abs=1e-6
            )
            assert ours[f"{curve}_auc"]["n"] == 6
    batches = [(0, 8), (8, 16), (16, 20)]
    masks = torch.stack([Made()[i]["regions"] for i in range(20)])
    present = torch.stack([Made()[i]["present"] for i in range(20)])
    for a, b in batches:
        direct = region_occlusion(
            model,
            images[a:b],
            {r: masks[a:b, i] for i, r in enumerate(REGIONS)},
            {r: present[a:b, i] for i, r in enumerate(REGIONS)},
            fills=["mean"],
            seed=batch_seed(0, a),
            avoid=masks[a:b].any(dim=1),
        )
        for region in REGIONS:
            np.testing.assert_allclose(
                columns[f"occlusion_effect:mean:{region}"][a:b],
                direct["regions"][region]["mean"]["effect"],
                atol=1e-9,
            )
            np.testing.assert_array_equal(
                occlusion["control_offsets"][region][a:b], direct["control_offsets"][region]
            )
    assert np.isnan(columns["occlusion_effect:mean:face"][::3]).all()  # absent: no value
    assert len(columns["occlusion_drop:mean:hair"]) == 20


def test_only_the_unions_are_occluded_by_default(tmp_path) -> None:
    """The default occludes the unions the gate and report read; their figures (controls drawn per
    region name, off every annotated region) are those of occluding every region."""
    torch.manual_seed(0)
    model = SmallCNN(2).eval()
    spec = MapSpec(layer="features", regions=REGIONS, unions={"protected": REGIONS}, batch_size=64)
    results = {}
    for which in ("unions", "all"):
        config = TrustConfig(
            samples=10, randomization_samples=2, faithfulness_samples=2, steps=2, cascade_cuts=1,
            batch_size=8, occlusion_regions=which,
        )  # fmt: skip
        sample = TrustSample(np.arange(10), np.array(["a", "b"] * 5), np.array(["x"] * 10))
        job = TrustJob("m", ["gradcam"], config, 20, 0, tmp_path / which, torch.device("cpu"))
        results[which] = run_trust(model, spec, Made(), sample, job)
    assert TrustConfig().occlusion_fills == ["mean"]
    assert TrustConfig().occlusion_regions == "unions"
    (block, columns, raw), (_, all_columns, all_raw) = results["unions"], results["all"]
    assert set(raw["regions"]) == {"protected"}
    assert set(all_raw["regions"]) == {"hair", "face", "protected"}
    assert set(block["occlusion"]) == {"no_control", "protected"}
    for key, values in columns.items():
        np.testing.assert_array_equal(values, all_columns[key])
    np.testing.assert_array_equal(
        raw["control_offsets"]["protected"], all_raw["control_offsets"]["protected"]
    )
    # By hand: the union's mask is hair | face (MapSpec.region_tensors), present where either is.
    masks = torch.stack([Made()[i]["regions"] for i in range(8)])
    present = torch.stack([Made()[i]["present"] for i in range(8)])
    direct = region_occlusion(
        model,
        torch.stack([Made()[i]["image"] for i in range(8)]),
        {"protected": masks.any(dim=1)},
        {"protected": present.any(dim=1)},
        fills=["mean"],
        seed=batch_seed(0, 0),
        avoid=masks.any(dim=1),
    )
    np.testing.assert_allclose(
        columns["occlusion_effect:mean:protected"][:8],
        direct["regions"]["protected"]["mean"]["effect"],
        atol=1e-9,
    )


def test_randomization_stops_when_every_interval_is_clear_of_the_threshold(tmp_path) -> None:
    """At 8 images every method's interval lies below 0.5: the test stops there (and gives what
    the test gives on those 8); with the threshold inside an interval it goes on to 16."""
    torch.manual_seed(0)
    model = SmallCNN(2).eval()
    spec = MapSpec(layer="features", regions=REGIONS, unions={}, batch_size=64)
    images = torch.stack([Made()[i]["image"] for i in range(20)])
    sample = TrustSample(np.arange(20), np.array(["a", "b"] * 10), np.array(["x"] * 20))

    def run(threshold: float, folder: str) -> dict:
        config = TrustConfig(
            samples=20, randomization_samples=16, randomization_min_samples=8,
            faithfulness_samples=4, steps=2, cascade_cuts=1, batch_size=8,
            max_randomized_correlation=threshold,
        )  # fmt: skip
        job = TrustJob("m", METHODS, config, 200, 0, tmp_path / folder, torch.device("cpu"))
        return run_trust(model, spec, Made(), sample, job)[0]

    clear = run(0.5, "clear")
    assert clear["n_randomization_images"] == 8
    direct, _ = randomization_test(
        model, images[:8], METHODS, threshold=0.5, n_boot=200, seed=0, layer="features", cuts=1
    )
    for method in METHODS:
        ours = clear["methods"][method]["randomization"]["final_spearman"]
        assert ours["ci_high"] < 0.5
        for key in ("value", "ci_low", "ci_high"):
            assert ours[key] == pytest.approx(direct[method]["final_spearman"][key], abs=1e-9)
    inside = clear["methods"]["gradcam"]["randomization"]["final_spearman"]["value"]
    unclear = run(inside, "unclear")
    assert unclear["n_randomization_images"] == 16
    direct, _ = randomization_test(
        model, images[:16], METHODS, threshold=inside, n_boot=200, seed=0, layer="features", cuts=1
    )
    ours = unclear["methods"]["gradcam"]["randomization"]["final_spearman"]
    assert ours["value"] == pytest.approx(direct["gradcam"]["final_spearman"]["value"], abs=1e-9)

"""Slice and strategy discovery against independent computations and planted answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from audit.metrics.discovery import (
    SliceSettings,
    accuracy_estimate,
    best_matches,
    choose_clusters,
    error_slices,
    normalized_maps,
    overlap,
    strategies,
)
from audit.metrics.gates import resolve_gates


def blobs(rng: np.random.Generator, centers: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    return np.concatenate(
        [c + rng.normal(size=(n, c.size)) for c, n in zip(centers, sizes, strict=True)]
    )


def test_wilson_interval_matches_the_formula() -> None:
    correct = np.array([True] * 37 + [False] * 13)
    est = accuracy_estimate(correct)
    n, p, z = 50, 37 / 50, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert est["value"] == pytest.approx(p)
    assert est["ci_low"] == pytest.approx(centre - half, abs=1e-9)
    assert est["ci_high"] == pytest.approx(centre + half, abs=1e-9)


def test_clusters_are_scikit_learns_kmeans_with_the_best_silhouette_k() -> None:
    rng = np.random.default_rng(0)
    centers = [np.array([0.0, 0.0]), np.array([8.0, 0.0]), np.array([0.0, 8.0])]
    points = blobs(rng, centers, [60, 50, 40])
    labels = choose_clusters(points, seed=0)
    scores = {}
    for k in range(2, 7):
        ref = KMeans(n_clusters=k, n_init=4, random_state=0).fit_predict(points)
        scores[k] = silhouette_score(points, ref, sample_size=len(points), random_state=0)
    best = max(scores, key=scores.get)
    assert best == 3
    reference = KMeans(n_clusters=best, n_init=4, random_state=0).fit_predict(points)
    assert np.array_equal(labels, reference)


def test_one_cluster_when_nothing_separates() -> None:
    rng = np.random.default_rng(1)
    points = rng.uniform(size=(200, 2))
    assert choose_clusters(points, seed=0, min_silhouette=0.5).max() == 0


def test_strategies_split_two_kinds_of_maps_per_class() -> None:
    rng = np.random.default_rng(2)
    left = np.zeros((8, 8))
    left[:, :2] = 1
    right = np.zeros((8, 8))
    right[:, -2:] = 1
    maps = np.stack([left] * 30 + [right] * 20) + rng.uniform(0, 0.05, size=(50, 8, 8))
    labels = np.zeros(50, dtype=np.int64)
    correct = np.array([True] * 30 + [False] * 20)
    found = strategies(maps, labels, correct, ["only"], seed=0)
    assert sorted(s["size"] for s in found) == [20, 30]
    by_size = {s["size"]: s for s in found}
    assert by_size[20]["accuracy"]["value"] == 0.0
    assert np.array_equal(np.sort(by_size[20]["members"]), np.arange(30, 50))
    mean = by_size[30]["mean_map"].reshape(8, 8)
    assert mean[:, :2].sum() > 0.9
    assert np.allclose(normalized_maps(maps).sum(axis=1), 1.0)


def test_error_mixture_finds_a_planted_failing_slice() -> None:
    rng = np.random.default_rng(3)
    d = 12
    a, b = np.zeros(d), np.zeros(d)
    b[:3] = 3.0
    emb = blobs(rng, [a, b], [300, 100])
    planted = np.arange(300, 400)
    correct = np.ones(400, dtype=bool)
    correct[rng.choice(300, 15, replace=False)] = False  # 5% errors in the big group
    correct[300 + rng.choice(100, 60, replace=False)] = False  # 60% errors in the slice
    labels = np.zeros(400, dtype=np.int64)
    found = error_slices(emb, labels, correct, ["c"], SliceSettings(), seed=0)
    worst = found[0]
    match = overlap(worst["members"], planted)
    assert match["precision"] >= 0.9 and match["recall"] >= 0.9
    assert worst["accuracy"]["value"] == pytest.approx(0.4, abs=0.1)
    assert worst["gap"] < -0.4


def test_scattered_errors_give_no_far_worse_slice() -> None:
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(400, 12))
    correct = rng.uniform(size=400) > 0.05
    labels = np.zeros(400, dtype=np.int64)
    found = error_slices(emb, labels, correct, ["c"], SliceSettings(), seed=0)
    assert found, "the mixture's components are still reported"
    assert min(s["gap"] for s in found) > -0.10


def test_slices_are_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(200, 6))
    correct = rng.uniform(size=200) > 0.3
    labels = (rng.uniform(size=200) > 0.5).astype(np.int64)
    one = error_slices(emb, labels, correct, ["a", "b"], SliceSettings(), seed=7)
    two = error_slices(emb, labels, correct, ["a", "b"], SliceSettings(), seed=7)
    assert [s["members"].tolist() for s in one] == [s["members"].tolist() for s in two]


def test_overlap_by_hand() -> None:
    members = np.array([1, 2, 3, 4])
    group = np.array([3, 4, 5, 6, 7, 8])
    assert overlap(members, group) == pytest.approx(
        {"precision": 0.5, "recall": 2 / 6, "f1": 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)}
    )
    ranked = best_matches(members, {"g": group, "all": np.array([1, 2, 3, 4])})
    assert ranked[0]["group"] == "all" and ranked[0]["f1"] == 1.0


def test_the_slice_gate_applies_only_when_named() -> None:
    assert "min_slice_accuracy" not in resolve_gates(None)
    assert "min_slice_accuracy" not in resolve_gates({"defaults": True})
    assert resolve_gates({"min_slice_accuracy": 0.6}) == {"min_slice_accuracy": (0.6, "config")}


def test_the_demo_discovers_the_biased_models_failing_cells(demo_run) -> None:
    """Slices use no group column (embeddings, labels and errors only), so the demo's slices are
    those of the demo with its group columns removed; the groups only name them afterwards."""
    metrics = json.loads((demo_run / "metrics.json").read_text())
    biased = metrics["models"]["biased"]["discovery"]
    worst = next(s for s in biased["slices"] if s["id"] == biased["worst_slice"]["id"])
    assert worst["matches"][0]["group"] in ("nurse / sex=male", "doctor / sex=female")
    assert worst["matches"][0]["precision"] >= 0.8
    assert worst["gap"] < -0.5
    assert not biased["unnamed_failure"]  # the data set names the cell it fails on
    # The unbiased model has no slice that fails the way the biased one does (its worst slice is
    # under 1%): every slice's accuracy interval reaches above 50%. A small cluster of its few
    # errors may still be found and reported (e.g. 4 errors in a 20-image slice).
    unbiased = metrics["models"]["unbiased"]["discovery"]
    assert all(s["accuracy"]["ci_high"] > 0.5 for s in unbiased["slices"])
    assert min(s["gap"] for s in unbiased["slices"]) > worst["gap"] + 0.5
    samples = pd.read_csv(demo_run / "samples.csv")
    rows = samples[samples["model"] == "biased"]
    members = rows[rows["slice"] == worst["id"]]
    assert len(members) == worst["size"]
    assert members["correct"].mean() == pytest.approx(worst["accuracy"]["value"])
    html = (demo_run / "report.html").read_text()
    assert "Slices and strategies found from the model" in html
    assert 'id="slice-biased-' in html


def test_a_hidden_shortcut_no_column_names_is_found(tmp_path) -> None:
    """A corner mark on 95% of the nurses a model trains on and on half the test nurses, named by
    no manifest column: the audit finds the unmarked test nurses as a failing slice."""
    from click.testing import CliRunner

    from audit.cli import main
    from audit.data.doctor_nurse import DoctorNurseSpec, generate
    from tests.conftest import write_config

    spec = DoctorNurseSpec(seed=1, n_train=600, n_val=40, n_test=200, mark_class="nurse")
    manifest = generate(spec, tmp_path / "dn", progress=False)
    assert "hidden_mark" not in pd.read_csv(manifest, nrows=1).columns
    config = write_config(
        tmp_path / "audit.toml",
        manifest,
        model=[{"name": "marked", "train_split": "train_marked", "epochs": 5}],
        trust={"enabled": False},
    )
    result = CliRunner().invoke(
        main, ["run", str(config), "--out", str(tmp_path / "run"), "--no-report", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    samples = pd.read_csv(tmp_path / "run" / "samples.csv")
    marks = pd.read_csv(manifest.parent / "hidden_mark.csv")
    samples = samples.merge(marks, on="image")
    unmarked = np.flatnonzero((samples["label"] == "nurse") & ~samples["hidden_mark"])
    block = json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]["marked"]
    discovery = block["discovery"]
    worst = discovery["worst_slice"]["id"]
    members = np.flatnonzero(samples["slice"] == worst)
    match = overlap(members, unmarked)
    assert match["precision"] >= 0.8 and match["recall"] >= 0.8, match
    assert discovery["worst_slice"]["accuracy"]["value"] < 0.5
    assert discovery["unnamed_failure"]

"""The streaming pipeline: frames, the map's rows, shards and resume, interruption, Ray, run folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import audit.pipeline.map as mapping
import audit.pipeline.rundir as rundir
from audit.cli import main
from audit.data.manifest import read_manifest
from audit.explain import explain, mask_boxes
from audit.metrics.attention import region_attention
from audit.models.zoo import SmallCNN
from audit.pipeline.frames import FrameDataset, ImageDecodeError, float_pixels, squash
from audit.pipeline.map import MapSpec, map_batch
from tests.conftest import write_config


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_model_config(path: Path, manifest: Path, **overrides: object) -> Path:
    """One model, one epoch, few resamples and a small batch (so the eval split has 3 shards)."""
    return write_config(
        path,
        manifest,
        bootstrap=50,
        model=[{"name": "a", "train_split": "train_biased", "epochs": 1}],
        explain={"methods": ["gradcam", "saliency"], "samples_per_cell": 1, "batch_size": 2},
        **overrides,
    )


@pytest.fixture(scope="module")
def reference(small_dataset, tmp_path_factory) -> Path:
    """An uninterrupted local run to compare every other way of running against."""
    root = tmp_path_factory.mktemp("reference")
    config = one_model_config(root / "audit.toml", small_dataset)
    result = invoke("run", config, "--out", root / "run", "--no-report", "--quiet", "--workers", 0)
    assert result.exit_code == 0, result.output
    return root / "run"


def same_results(a: Path, b: Path) -> None:
    assert (a / "samples.csv").read_bytes() == (b / "samples.csv").read_bytes()
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()


def test_frames_follow_the_model_geometry(small_dataset):
    manifest = read_manifest(small_dataset)
    rows = manifest.split("test").head(4)
    frames = FrameDataset(
        manifest, rows, ["doctor", "nurse"], squash(32), regions=["hair", "person"], twins=["twin"]
    )
    item = frames[1]
    assert item["image"].shape == (3, 32, 32) and item["image"].max() <= 1
    assert item["regions"].shape == (2, 32, 32) and item["regions"].dtype == torch.bool
    assert item["twins"].shape == (1, 3, 32, 32) and bool(item["twins_present"][0])
    # The person box becomes a mask of the box's pixels, scaled like the image (64 -> 32): a
    # frame pixel is inside when its centre's source pixel is (nearest-exact).
    x0, y0, x1, y1 = (float(v) for v in rows.iloc[1]["box:person"].split())
    box = mask_boxes(item["regions"][1][None])[0].tolist()
    centre = lambda v: int(np.ceil((v - 1) / 2))  # first i with floor(2 i + 1) >= v  # noqa: E731
    assert box == [centre(x0), centre(y0), centre(x1), centre(y1)]


def test_uint8_batches_give_exactly_the_float_rows(small_dataset):
    """The map reads uint8 pixels from its workers (a quarter of the bytes) and makes the floats
    itself: the same floats, so the same rows, as a dataset that makes them."""
    torch.manual_seed(0)
    model = SmallCNN(2).eval()
    manifest = read_manifest(small_dataset)
    rows = manifest.split("test").head(6)
    kwargs = {"regions": ["hair", "face"], "twins": ["twin"]}
    floats = FrameDataset(manifest, rows, ["doctor", "nurse"], squash(48), **kwargs)
    small = FrameDataset(
        manifest, rows, ["doctor", "nurse"], squash(48), uint8_pixels=True, **kwargs
    )
    a = torch.utils.data.default_collate([floats[i] for i in range(6)])
    b = torch.utils.data.default_collate([small[i] for i in range(6)])
    assert b["image"].dtype == torch.uint8 and b["twins"].dtype == torch.uint8
    assert torch.equal(float_pixels(b["image"]), a["image"])
    assert torch.equal(float_pixels(b["twins"]), a["twins"])
    assert float_pixels(a["image"]) is a["image"]  # floats pass through
    spec = MapSpec(
        layer="features", regions=["hair", "face"], unions={"protected": ["hair", "face"]}
    )
    out_a = map_batch(model, spec, a, torch.device("cpu"))
    out_b = map_batch(model, spec, b, torch.device("cpu"))
    assert out_a.keys() == out_b.keys()
    for key in out_a:
        np.testing.assert_array_equal(out_a[key], out_b[key], err_msg=key)


def test_a_frame_dataset_holds_arrays_not_tables_and_pickles_small(small_dataset):
    """Workers get the dataset by fork or pickle: it holds no DataFrame, Manifest or per-row Python
    objects (a worker touching those copies their pages), only arrays, and an unpickled copy gives
    the same items."""
    import pickle

    manifest = read_manifest(small_dataset)
    rows = manifest.split("test")
    frames = FrameDataset(
        manifest, rows, ["doctor", "nurse"], squash(32), regions=["hair", "person"], twins=["twin"]
    )
    kinds = {type(v) for v in vars(frames).values()}
    assert not kinds & {pd.DataFrame, pd.Series, type(manifest)}
    assert all(isinstance(v, np.ndarray) for v in frames.cells.values())
    assert frames.cell(2, "image") == rows.iloc[2]["image"]
    assert frames.cell(2, "box:person") == rows.iloc[2]["box:person"]
    assert frames.cell(2, "mask:nothing") == ""
    blob = pickle.dumps(frames)
    assert len(blob) < len(pickle.dumps(rows))
    copy = pickle.loads(blob)
    for key, value in frames[5].items():
        other = copy[5][key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value


def test_a_bad_image_names_the_file_and_line(small_dataset, monkeypatch):
    manifest = read_manifest(small_dataset)
    rows = manifest.split("test")
    frames = FrameDataset(manifest, rows, ["doctor", "nurse"], squash(32))
    bad = rows.iloc[3]["image"]
    import audit.pipeline.frames as frames_module

    real = frames_module.read_image

    def failing(path: str, mode: str = "RGB"):
        if path.endswith(bad):
            raise OSError("broken data stream")
        return real(path, mode)

    monkeypatch.setattr(frames_module, "read_image", failing)
    with pytest.raises(
        ImageDecodeError, match=f"{bad} \\(manifest line {rows.index[3] + 2}, image\\)"
    ):
        frames[3]
    skipping = FrameDataset(manifest, rows, ["doctor", "nurse"], squash(32), skip_bad=True)
    assert skipping[3]["ok"] is False and skipping[2]["ok"] is True


def test_map_batch_rows_equal_an_independent_computation(small_dataset):
    torch.manual_seed(0)
    model = SmallCNN(2).eval()
    manifest = read_manifest(small_dataset)
    rows = manifest.split("test").head(6)
    frames = FrameDataset(
        manifest, rows, ["doctor", "nurse"], squash(64), regions=["hair", "face"], twins=["twin"]
    )
    batch = torch.utils.data.default_collate([frames[i] for i in range(6)])
    spec = MapSpec(
        layer="features", regions=["hair", "face"], unions={"protected": ["hair", "face"]}
    )
    out = map_batch(model, spec, batch, torch.device("cpu"))
    x = batch["image"]
    maps = explain(model, x, "gradcam", layer="features")
    logits = model(x)
    protected = batch["regions"].any(dim=1)
    expected = region_attention(
        maps,
        {"hair": batch["regions"][:, 0], "protected": protected},
        {"hair": batch["present"][:, 0], "protected": batch["present"].any(dim=1)},
        {"hair": mask_boxes(batch["regions"][:, 0]), "protected": mask_boxes(protected)},
    )
    np.testing.assert_allclose(out["share:gradcam:hair"], expected["hair"]["share"], rtol=1e-5)
    np.testing.assert_allclose(
        out["share:gradcam:protected"], expected["protected"]["share"], rtol=1e-5
    )
    np.testing.assert_array_equal(out["prediction"], logits.argmax(1).numpy())
    twin_prediction = model(batch["twins"][:, 0]).argmax(1).numpy()
    np.testing.assert_array_equal(out["counterfactual_prediction"], twin_prediction)
    np.testing.assert_array_equal(out["flipped"], twin_prediction != logits.argmax(1).numpy())


def test_an_interrupted_map_resumes_to_the_same_results(
    reference, small_dataset, tmp_path, monkeypatch
):
    config = one_model_config(tmp_path / "audit.toml", small_dataset)
    real = mapping.map_batch
    calls = {"n": 0}

    def interrupted_after_a_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:  # 16 batches make a shard: the first shard is written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mapping, "map_batch", interrupted_after_a_shard)
    args = ("run", config, "--out", tmp_path / "run", "--no-report", "--quiet", "--workers", 0)
    result = invoke(*args)
    assert result.exit_code == 130 and "--resume" in result.output
    work = tmp_path / ".run.partial"
    assert not (tmp_path / "run").exists() and len(list(work.glob("shards/a/*.parquet"))) == 1
    # Without --resume the unfinished run is neither silently resumed nor discarded.
    again = invoke(*args)
    assert again.exit_code == 2 and "--resume" in again.output
    monkeypatch.setattr(mapping, "map_batch", real)
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "1 of 3 shards resumed" in resumed.output
    assert not work.exists()
    same_results(tmp_path / "run", reference)


def test_sigterm_stops_the_run_like_ctrl_c(small_dataset, tmp_path, monkeypatch):
    config = one_model_config(tmp_path / "audit.toml", small_dataset)
    real = mapping.map_batch
    calls = {"n": 0}

    def terminated(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(mapping, "map_batch", terminated)
    result = invoke("run", config, "--out", tmp_path / "run", "--quiet", "--workers", 0)
    assert (
        result.exit_code == 143 and "continue with the same command and --resume" in result.output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial", "audit.toml"]
    assert signal.getsignal(signal.SIGTERM) is not rundir._terminated  # restored


def test_run_folders_are_not_replaced_without_force(reference, small_dataset, tmp_path):
    config = one_model_config(tmp_path / "audit.toml", small_dataset)
    out = tmp_path / "run"
    first = invoke("run", config, "--out", out, "--no-report", "--quiet")
    assert first.exit_code == 0, first.output
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode & 0o055 == 0o055, oct(mode)  # readable by others, as any folder the user makes
    (out / "my-notes.txt").write_text("mine")
    refused = invoke("run", config, "--out", out, "--no-report", "--quiet")
    assert refused.exit_code == 2 and "--force" in refused.output
    forced = invoke("run", config, "--out", out, "--no-report", "--quiet", "--force")
    assert forced.exit_code == 0, forced.output
    assert (out / "my-notes.txt").read_text() == "mine"  # never deletes what it did not write
    same_results(out, reference)
    # A folder that is not a run is never written into.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("x")
    result = invoke("run", config, "--out", foreign, "--quiet", "--force")
    assert result.exit_code == 2 and "not an audit run folder" in result.output
    assert [p.name for p in foreign.iterdir()] == ["data.csv"]


def test_messages_and_logs_name_no_temporary_or_absolute_paths(reference):
    log = (reference / "run.log").read_text()
    assert ".partial" not in log and str(reference.parent) not in log
    metrics = json.loads((reference / "metrics.json").read_text())
    assert not Path(metrics["data"]["manifest"]).is_absolute() or "tmp" not in log


def test_a_bad_image_stops_cleanly_or_is_skipped(small_dataset, tmp_path):
    # A real truncated PNG: the run reads only headers up front, so the map finds it.
    data = tmp_path / "data"
    shutil.copytree(small_dataset.parent, data)
    manifest = read_manifest(data / "manifest.csv")
    bad = manifest.split("test").iloc[5]["image"]
    whole = (data / bad).read_bytes()
    (data / bad).write_bytes(whole[: len(whole) // 2])
    config = one_model_config(tmp_path / "audit.toml", data / "manifest.csv")
    args = ("run", config, "--out", tmp_path / "run", "--no-report", "--quiet", "--workers", 0)
    result = invoke(*args)
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and bad in line and "manifest line" in line
    assert "--skip-bad-images" in line and not (tmp_path / "run").exists()
    skipped = invoke(*args, "--force", "--skip-bad-images")
    assert skipped.exit_code == 0, skipped.output
    samples = pd.read_csv(tmp_path / "run" / "samples.csv")
    assert len(samples) == 79 and bad not in set(samples["image"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["models"]["a"]["bad_images"] == 1


def test_ray_gives_the_same_results_as_a_local_run(reference, small_dataset, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # "--ray local" starts its own Ray even where another cluster is announced (RAY_ADDRESS, or
    # /tmp/ray/ray_current_cluster left by an earlier `ray start`).
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    config = one_model_config(tmp_path / "audit.toml", small_dataset)
    result = invoke(
        "run", config, "--out", tmp_path / "run", "--no-report", "--quiet", "--ray", "--workers", 2
    )
    assert result.exit_code == 0, result.output
    same_results(tmp_path / "run", reference)
    import ray

    assert not ray.is_initialized()  # the local Ray the run started is shut down


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray", "127.0.0.1:9"], "--ray 127.0.0.1:9: cannot reach the Ray cluster"),
        (["--ray", "nonsense"], "expected HOST:PORT"),
        (
            ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"],
            "--device",
        ),
    ],
)
def test_bad_run_options_fail_before_any_work(args, message, small_dataset, tmp_path):
    config = one_model_config(tmp_path / "audit.toml", small_dataset)
    result = invoke("run", config, "--out", tmp_path / "run", "--quiet", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.toml"]


def test_bf16_is_used_only_where_it_keeps_the_predictions(reference, small_dataset, tmp_path):
    config = one_model_config(tmp_path / "audit.toml", small_dataset)
    args = ("run", config, "--out", tmp_path / "run", "--no-report", "--quiet", "--workers", 0)
    result = invoke(*args, "--precision", "bf16")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "bfloat16" in x)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["precision"] == "bf16"
    assert "autocast used (same predictions on 8 images)" in line or "float32 kept" in line
    mixed = pd.read_csv(tmp_path / "run" / "samples.csv")
    exact = pd.read_csv(reference / "samples.csv")
    assert (mixed["prediction"] == exact["prediction"]).mean() > 0.95
    if "float32 kept" in line:
        same_results(tmp_path / "run", reference)


def test_the_training_cache_returns_exactly_what_decoding_gives(small_dataset):
    manifest = read_manifest(small_dataset)
    rows = manifest.split("test").head(6)
    kwargs = {"regions": ["hair", "face"], "twins": ["twin"], "protected": ["hair", "face"]}
    cached = FrameDataset(
        manifest, rows, ["doctor", "nurse"], squash(32), cache_bytes=1 << 20, **kwargs
    )
    plain = FrameDataset(manifest, rows, ["doctor", "nurse"], squash(32), **kwargs)
    assert cached.cache is not None and plain.cache is None
    for _ in range(2):  # the second pass reads the cache
        for i in range(6):
            a, b = cached[i], plain[i]
            assert a.keys() == b.keys()
            for key, value in b.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(a[key], value), key
    assert len(cached.cache) == 6
    too_small = FrameDataset(manifest, rows, ["doctor", "nurse"], squash(32), cache_bytes=100)
    assert too_small.cache is None  # a split larger than the budget is streamed

"""Shared fixtures: generated data sets and one full demo run, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.data.doctor_nurse import DoctorNurseSpec, generate

SMALL = DoctorNurseSpec(seed=3, n_train=200, n_val=40, n_test=80)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small doctor/nurse set (manifest path) for fast runner and CLI tests."""
    return generate(SMALL, tmp_path_factory.mktemp("small") / "dn", progress=False)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`audit demo` exactly as a user runs it: default data set, both models, report and PDF."""
    root = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(
        main, ["demo", "--out", str(root / "run"), "--data", str(root / "data"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    return root / "run"


def write_config(path: Path, manifest: Path, **overrides: object) -> Path:
    """A small audit config (two models, 2 epochs) with overrides merged in, written as TOML."""
    model_a = {"name": "a", "train_split": "train_biased", "epochs": 2}
    model_b = {"name": "b", "train_split": "train_balanced", "epochs": 2}
    spec: dict = {
        "seed": 0,
        "bootstrap": 200,
        "data": {
            "manifest": str(manifest),
            "core_regions": ["stethoscope", "badge"],
            "min_cell_size": 5,
        },
        "model": [model_a, model_b],
        "explain": {"methods": ["gradcam", "guided_gradcam"], "samples_per_cell": 2},
        "trust": {"samples": 24, "faithfulness_samples": 8, "steps": 5},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path.write_text(to_toml(spec))
    return path


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def to_toml(spec: dict) -> str:
    """A minimal TOML writer for the config shapes used in tests."""
    lines = [
        f"{k} = {_value(v)}"
        for k, v in spec.items()
        if not isinstance(v, (dict, list))
        or (isinstance(v, list) and not (v and isinstance(v[0], dict)))
    ]
    for key, value in spec.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for table in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"

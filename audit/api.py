"""The Python API: `run` an audit and get an `AuditResult` (metrics, samples, gates, report, JUnit).

`run(config, models=None, data=None)` runs the audit `audit run` runs - the command line calls it
too, so the two cannot drift apart - with three additions for notebooks and test suites:

- `config` may be a TOML path, a dict shaped like the TOML file, or an `AuditConfig`;
- `models` gives `torch.nn.Module`s by name (trained in the notebook) instead of training or loading
  them: `{"biased": module}` or `{"biased": (module, preprocessing)}`, the preprocessing being a timm
  data config (`timm.data.resolve_data_config(...)`), a Hugging Face image processor, a dict of the
  config's `[model.preprocess]` keys, or an `audit.data.preprocess.Preprocess`;
- `data` gives the manifest path, or a pandas DataFrame with the manifest's columns; its image,
  mask and twin paths are absolute, or relative to `root` (by default the folder of the config's
  `data.manifest`). The table is written into the run folder as manifest.csv, never beside the
  images.

The modules given are copied before the audit moves them to its device or puts them in eval mode;
nothing a user passes is modified.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import html
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import tomllib
import torch
from torch import nn

from audit.config import AuditConfig, ConfigError, ModelConfig, from_dict
from audit.data.preprocess import Preprocess, hf_keys, resolve_preprocess, timm_defaults
from audit.models.sources import Prepared, Source, hf_class_order
from audit.models.zoo import SmallCNN
from audit.pipeline.plan import TableManifest
from audit.pipeline.rundir import RunFolderError, check_target, install
from audit.report.junit import gate_text, write_junit
from audit.report.words import gate_figure, threshold_text
from audit.runner import AuditError, GivenModel, RunOptions, run_audit

GIVEN = "(given in memory)"  # stands for train_split / checkpoint while a dict config is checked
PATH_COLUMNS = ("image", "twin")  # with every twin:<attribute> and mask:<region> column
ConfigLike = str | os.PathLike | Mapping[str, Any] | AuditConfig


def run(
    config: ConfigLike,
    models: Mapping[str, Any] | None = None,
    data: str | os.PathLike | pd.DataFrame | None = None,
    *,
    root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    options: RunOptions | None = None,
    echo: Callable[[str], None] = print,
) -> AuditResult:
    """Run one audit and return its result; `out`: the run folder (None: a temporary one that
    lives as long as the result; `result.save(folder)` keeps it). See the module docstring."""
    models = dict(models or {})
    options = options or RunOptions()
    if models and options.resume:
        raise AuditError(
            "resume: a run with models given in memory cannot be resumed; run it again"
        )
    audit_config = _config(config, models, data)
    specs = {spec.name: spec for spec in audit_config.model}
    given = {
        name: _given(name, value, specs[name].preprocess, audit_config.data.image_size)
        for name, value in models.items()
    }
    table = None
    if isinstance(data, pd.DataFrame):
        table = table_manifest(data, Path(root) if root else audit_config.manifest_path.parent)
    keep = None
    if out is None:
        keep = tempfile.TemporaryDirectory(prefix="audit-")
        out = Path(keep.name) / "run"
    if table is not None:  # the run folder's copy of the table is the manifest it records
        audit_config.data.manifest = str(Path(out).resolve() / TableManifest.NAME)
    folder = run_audit(
        audit_config, Path(out), echo=echo, options=options, models=given, table=table
    )
    return AuditResult(folder, _keep=keep)


# -- config ------------------------------------------------------------------------------------
def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML document, with load_config's errors."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def _config(config: ConfigLike, models: Mapping[str, Any], data: Any) -> AuditConfig:
    """The AuditConfig to run: the user's, copied, with the given models and data put in."""
    if isinstance(config, AuditConfig):
        built = copy.deepcopy(config)
    elif isinstance(config, (str, os.PathLike)):
        built = _from_raw(_read_toml(Path(config)), Path(config).parent, models)
    elif isinstance(config, Mapping):
        built = _from_raw(copy.deepcopy(dict(config)), Path("."), models)
    else:
        raise AuditError(
            f"config must be a TOML path, a dict or an AuditConfig, not {type(config).__name__}"
        )
    for name in models:
        if not isinstance(name, str) or not name:
            raise AuditError(f"models: names must be non-empty strings, got {name!r}")
        if name not in {spec.name for spec in built.model}:
            built.model.append(ModelConfig(name=name))
    built.model = [
        _given_spec(spec, models[spec.name]) if spec.name in models else spec
        for spec in built.model
    ]
    if isinstance(data, (str, os.PathLike)):
        built.data.manifest = str(Path(data).resolve())
    elif data is not None and not isinstance(data, pd.DataFrame):
        raise AuditError(
            f"data must be a manifest path or a pandas DataFrame, not {type(data).__name__}"
        )
    return built


def _from_raw(raw: dict[str, Any], base_dir: Path, models: Mapping[str, Any]) -> AuditConfig:
    """from_dict, where the tables of given models need neither train_split nor checkpoint."""
    tables = raw.get("model", [])
    if models and isinstance(tables, list):
        named = {t.get("name") for t in tables if isinstance(t, dict)}
        tables = tables + [{"name": name} for name in models if name not in named]
        for table in tables:
            if isinstance(table, dict) and table.get("name") in models:
                table.update(train_split="", checkpoint=GIVEN, init="", mitigation="none")
        raw["model"] = tables
    return from_dict(raw, base_dir)


def _module(name: str, value: Any) -> nn.Module:
    module = value[0] if isinstance(value, tuple) and len(value) == 2 else value
    if not isinstance(module, nn.Module):
        raise AuditError(
            f"models[{name!r}]: give a torch nn.Module or (module, preprocessing), "
            f"not {type(value).__name__}"
        )
    return module


def _arch(module: nn.Module) -> str:
    """What the run records as a given model's arch (the built-in CNN keeps its own name)."""
    return "small_cnn" if type(module) is SmallCNN else f"given:{type(module).__name__}"


def _given_spec(spec: ModelConfig, value: Any) -> ModelConfig:
    """A [[model]] table for a given module: nothing to train or load (its layer and
    preprocessing keys are kept)."""
    return dataclasses.replace(
        spec,
        arch=_arch(_module(spec.name, value)),
        train_split="",
        checkpoint="",
        init="",
        trust=False,
        mitigation="none",
        kwargs={},
    )


# -- models ------------------------------------------------------------------------------------
def _given(name: str, value: Any, keys: Any, image_size: int) -> GivenModel:
    """What the runner calls with the data's classes: a copy of the module, prepared."""
    module = _module(name, value)
    preprocessing = value[1] if isinstance(value, tuple) else None

    def prepare(classes: list[str]) -> Prepared:
        model = copy.deepcopy(module)  # the audit moves it, sets eval mode, may change its layout
        arch = _arch(model)
        order = _class_order(model, classes, arch)
        preprocess = _preprocess(name, model, preprocessing or keys, image_size, order)
        _check_outputs(name, model, preprocess, classes)
        return Prepared(model, preprocess, Source("given", type(model).__name__, written=arch))

    return prepare


def _class_order(model: nn.Module, classes: list[str], arch: str) -> tuple[int, ...] | None:
    """A Hugging Face model's outputs matched to the classes by its label names (None: in order)."""
    labels = getattr(getattr(model, "config", None), "id2label", None)
    if not labels or all(str(v) == f"LABEL_{k}" for k, v in labels.items()):
        return None
    order = hf_class_order(model, classes, arch)
    return None if order == tuple(range(len(classes))) else order


def _preprocess(
    name: str, model: nn.Module, given: Any, image_size: int, order: tuple[int, ...] | None
) -> Preprocess:
    """The given preprocessing (timm data config, HF image processor, keys, Preprocess) resolved."""
    if isinstance(given, Preprocess):
        return dataclasses.replace(given, class_order=order)
    origin = None
    if isinstance(given, Mapping) and "input_size" in given:
        keys, origin = timm_defaults(model, given), "timm"
    elif callable(getattr(given, "to_json_string", None)):
        where = f"the image processor of model {name!r}"
        keys, origin = hf_keys(json.loads(given.to_json_string()), where, name), "hf"
    elif given is None or isinstance(given, Mapping) or dataclasses.is_dataclass(given):
        keys = given
    else:
        raise AuditError(
            f"models[{name!r}]: preprocessing must be a timm data config, a Hugging Face image "
            f"processor, a dict of [model.preprocess] keys or a Preprocess, not {type(given).__name__}"
        )
    preprocess = resolve_preprocess(
        keys, model, "given", image_size, source_defaults=False, name=name, class_order=order
    )
    return dataclasses.replace(preprocess, origin=origin) if origin else preprocess


def _check_outputs(name: str, model: nn.Module, preprocess: Preprocess, classes: list) -> None:
    """One blank frame through the model: it must run and score every class (one line if not)."""
    height, width = preprocess.frame
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    probe = torch.zeros(1, len(preprocess.mean), height, width, device=device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), preprocess.attach(model):
            output = model(probe)
    except Exception as error:  # noqa: BLE001 - a user's module may raise anything
        line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise AuditError(
            f"model {name!r}: a {height}x{width} frame fails in forward: "
            f"{type(error).__name__}: {line} (set its preprocessing to the input size it expects)"
        ) from None
    finally:
        model.train(training)
    if isinstance(output, torch.Tensor) and (output.ndim != 2 or output.shape[1] != len(classes)):
        raise AuditError(
            f"model {name!r} gives outputs of shape {tuple(output.shape)}; the data has "
            f"{len(classes)} classes {classes} (in this order)"
        )


# -- data --------------------------------------------------------------------------------------
def _path_columns(table: pd.DataFrame) -> list[str]:
    return [
        c
        for c in table.columns
        if str(c).strip() in PATH_COLUMNS or str(c).startswith(("twin:", "mask:"))
    ]


def table_manifest(table: pd.DataFrame, root: Path) -> TableManifest:
    """A DataFrame with a manifest's columns as the text of a manifest file (the run writes it
    into its own folder).

    Relative paths in it are read from `root`, absolute ones as they are; the manifest's paths are
    made relative to the folder all of them share. The caller's DataFrame is not modified.
    """
    table = table.astype(object).where(table.notna(), "").astype(str)  # a copy
    columns = _path_columns(table)
    values = pd.unique(table[columns].to_numpy().ravel()) if columns else []
    absolute = [v for v in values if v and os.path.isabs(v)]
    base = common = Path(root).resolve()
    if absolute:
        relative = any(v and not os.path.isabs(v) for v in values)
        parents = [os.path.dirname(v) for v in absolute] + ([str(base)] if relative else [])
        common = Path(os.path.commonpath(parents))
        for column in columns:
            table[column] = [
                os.path.relpath(os.path.join(base, v), common) if v else "" for v in table[column]
            ]
    return TableManifest(table.to_csv(index=False, lineterminator="\n"), common)


def _api_words(message: str) -> str:
    """A run folder message in the API's words (folder, force=True) instead of the options'."""
    return message.replace("--out ", "folder ").replace("add --force", "pass force=True")


# -- the result --------------------------------------------------------------------------------
class AuditResult:
    """A finished audit: its metrics.json, samples.csv and gates, read from its run folder."""

    def __init__(self, folder: str | os.PathLike, *, _keep: Any = None) -> None:
        self.folder = Path(folder)
        self._keep = _keep  # the temporary folder the run lives in, deleted with the result
        try:
            self.metrics: dict[str, Any] = json.loads((self.folder / "metrics.json").read_text())
        except FileNotFoundError:
            raise AuditError(
                f"{self.folder} is not a finished audit run: metrics.json is missing"
            ) from None
        except ValueError as error:
            raise AuditError(f"{self.folder}: unreadable metrics.json: {error}") from None

    @classmethod
    def load(cls, folder: str | os.PathLike) -> AuditResult:
        """The result of a finished run folder (e.g. one `audit run` wrote)."""
        return cls(folder)

    @functools.cached_property
    def samples(self) -> pd.DataFrame:
        """samples.csv: one row per model and evaluated image (read as the report reads it)."""
        return pd.read_csv(
            self.folder / "samples.csv",
            dtype={"image": str, "label": str, "group": str, "prediction": str},
            keep_default_na=False,
        )

    @property
    def gates(self) -> pd.DataFrame:
        """One row per model x gate (x attribute): value, interval, limit, whether it passed."""
        columns = ["model", "gate", "label", "attribute", "value", "ci_low", "ci_high", "op"]
        columns += ["threshold", "passed", "status", "note"]
        table = pd.DataFrame(self.metrics["gates"])
        return table.reindex(columns=columns + [c for c in table.columns if c not in columns])

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The gate rows that did not pass (failed, not measured, or not trusted)."""
        return [g for g in self.metrics["gates"] if not g["passed"]]

    @property
    def passed(self) -> bool:
        """True when gates are configured and every one passes for every model."""
        return bool(self.metrics["gates"]) and not self.failures

    def assert_passes(self) -> None:
        """Raise an AssertionError listing each failed gate with its value and limit (for pytest)."""
        gates = self.metrics["gates"]
        if not gates:
            raise AssertionError(
                f"{self.folder}: no gate is configured, so the audit clears nothing"
            )
        failed = self.failures
        if failed:
            lines = "\n".join(f"  {gate_text(g)}" for g in failed)
            raise AssertionError(
                f"{len(failed)} of {len(gates)} audit gates failed ({self.folder}):\n{lines}"
            )

    def write_junit(self, path: str | os.PathLike) -> Path:
        """The gates as JUnit XML (one test case per model x gate), as `audit check --junit`."""
        return write_junit(self.metrics["gates"], Path(path))

    def save(self, folder: str | os.PathLike, *, force: bool = False) -> Path:
        """Copy the run folder to `folder` - the files `audit run` writes; force=True replaces an
        earlier run there (only the files the audit wrote), never a user's own files."""
        target = Path(folder)
        if target.exists() and target.resolve() == self.folder.resolve():
            return target
        try:
            check_target(target, force)
            staging = target.with_name(f".{target.name}.saving")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(self.folder, staging)
            install(staging, target)
        except RunFolderError as error:
            raise RunFolderError(_api_words(str(error))) from None
        return target

    def report_html(self) -> str:
        """The HTML report: the run's report.html, or rendered now when the run skipped it."""
        page = self.folder / "report.html"
        if page.is_file():
            return page.read_text(encoding="utf-8")
        from audit.report.render import render_html

        return render_html(self.folder)

    def __repr__(self) -> str:
        gates = self.metrics["gates"]
        return (
            f"AuditResult({str(self.folder)!r}, models={list(self.metrics['models'])}, "
            f"passed={self.passed}, failed gates={len(self.failures)} of {len(gates)})"
        )

    def _repr_html_(self) -> str:
        return summary_html(self.metrics, self.folder)


def summary_html(metrics: dict[str, Any], folder: Path) -> str:
    """The decision summary (the report's own sentences) and the gates, for a notebook cell."""
    from audit.report.words import decisions

    parts = [
        f"<div class='audit-result'><p>Run folder: <code>{html.escape(str(folder))}</code></p>"
    ]
    for decision in decisions(metrics, {}, {}):
        mark = "PASS" if decision["ship"] else "FAIL"
        colour = "#1a7f37" if decision["ship"] else "#cf222e"
        parts.append(
            f"<p><b style='color:{colour}'>{mark}</b> {decision['headline']}</p><ul>"
            + "".join(f"<li>{why}</li>" for why in decision["why"] if why)
            + "".join(f"<li>{step}</li>" for step in decision["next"])
            + "</ul>"
        )
    rows = []
    for gate in metrics["gates"]:
        value = gate_figure(gate)  # the report's units and intervals
        status = gate.get("status") or ("pass" if gate["passed"] else "fail")
        cells = [
            gate["model"],
            gate["label"],
            value,
            f"{gate['op']} {threshold_text(gate)}",
            status,
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>" for h in ("model", "gate", "value [95% CI]", "must be", "status")
    )
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "".join(parts) + "</div>"

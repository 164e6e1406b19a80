"""The TOML audit spec, validated: every key has a documented default; unknown keys are errors.

```toml
seed = 0                      # seeds training, sampling and bootstrap
bootstrap = 1000              # bootstrap resamples for 95% confidence intervals
title = "Bias audit"          # report title
[data]
manifest = "datasets/doctor_nurse/manifest.csv"   # relative to this file
image_size = 64               # images are resized to image_size x image_size
eval_split = "test"           # the split audited
val_split = "val"             # validation during training ("" for none)
protected_regions = ["hair", "face"]   # regions tied to the protected attribute
core_regions = ["stethoscope", "badge"]   # regions that should decide the class
allow_unseen_classes = false  # true: audit eval-split classes a model's train_split lacks
[[model]]                     # one table per model; two or more are compared
name = "biased"
arch = "small_cnn"            # small_cnn, a torchvision name, timm:NAME, hf:FOLDER, python:MODULE:FN
train_split = "train_biased"  # train on this split ...
checkpoint = ""               # ... or load this file (a state dict, read with weights_only)
trust = false                 # allow a pickled whole model (runs code from the file!)
init = ""                     # training starts from a state dict PATH, or "pretrained" (downloads)
layer = ""                    # explained layer; "" = the last conv feature map
epochs = 10
batch_size = 64
lr = 0.003
min_accuracy = 0.6            # optional: "too weak to judge" unless its accuracy's CI clears this (default: chance)
[model.kwargs]                # passed to the timm / torchvision / python: factory, e.g. img_size = 96
[model.preprocess]            # unset keys: the source's own (timm, hf:), else squash, no normalisation
resize = 64                   # int: shorter side; or [h, w]
crop = 56                     # center crop, int or [h, w]
mode = "crop"                 # "squash" | "crop" | "pad"
interpolation = "bilinear"    # "bilinear" | "bicubic" | "nearest"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[explain]
methods = ["gradcam", "guided_gradcam"]
samples_per_cell = 8          # per class x group cell, besides every misclassified image
batch_size = 128
[gates]                       # without this table every gate applies at its default;
min_worst_group_accuracy = 0.85   # with it, only the gates given here apply
max_accuracy_gap = 0.05
max_protected_attention = 0.30
max_flip_rate = 0.10
defaults = false              # true: also every gate not given, at its default
```
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from audit.errors import ConfigError
from audit.explain import METHODS
from audit.metrics.discovery import SliceSettings
from audit.metrics.gates import GATES, resolve_gates
from audit.metrics.trust.config import TrustConfig
from audit.models.mitigations import MitigationConfig, MitigationError


@dataclass
class DataConfig:
    manifest: str = "datasets/doctor_nurse/manifest.csv"
    image_size: int = 64
    eval_split: str = "test"
    val_split: str = "val"
    protected_regions: list[str] = field(default_factory=lambda: ["hair", "face"])
    core_regions: list[str] = field(default_factory=lambda: ["stethoscope", "badge"])
    attributes: list[str] = field(default_factory=list)  # protected attributes; [] = all present
    intersections: bool = True  # also every figure for the intersection of the attributes
    min_cell_size: int = 30  # smaller cells are shown but "too few to judge", skipped by gates
    allow_unseen_classes: bool = False  # audit eval classes a trained model's split lacks


@dataclass
class PreprocessConfig:
    """`[model.preprocess]`: unset keys (None / "") take the model source's defaults (timm's data
    config, the hf: folder's image processor) or, without one, a squash to data.image_size with no
    normalisation. Resolved and checked by audit.data.preprocess.resolve_preprocess."""

    resize: int | list[int] | None = None  # int: the shorter side ("crop" mode); or [h, w]
    crop: int | list[int] | bool | None = None  # center crop; false: none, the whole image
    mode: str = ""  # "squash" | "crop" | "pad"
    interpolation: str = ""  # "bilinear" | "bicubic" | "nearest"
    mean: list[float] | None = None  # per input channel, subtracted from [0, 1] pixels
    std: list[float] | None = None  # per input channel, divides after the mean
    backend: str = ""  # "pil" (torchvision / timm on PIL images) | "torch" (transformers)


@dataclass
class ModelConfig:
    name: str = ""  # required; names the model in the report and in metrics.json
    arch: str = "small_cnn"  # small_cnn | torchvision name | timm:NAME | hf:FOLDER | python:MOD:FN
    train_split: str = ""
    checkpoint: str = ""
    trust: bool = False
    layer: str = ""
    epochs: int = 10  # training epochs (AdamW, one-cycle schedule)
    batch_size: int = 64  # training batch size
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    init: str = ""  # training starts from: "" (random), a state dict PATH, or "pretrained"
    kwargs: dict = field(default_factory=dict)  # passed to timm / torchvision / python: factories
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # Below this accuracy (the 95% CI's lower end) the model is "too weak to judge"; None: chance.
    min_accuracy: float | None = None
    # Training with a mitigation (audit.models.mitigations): none | group_balanced | group_dro |
    # jtt | right_reasons | attention_penalty, and their hyperparameters (defaults chosen on the
    # doctor/nurse val split; where each comes from: MitigationConfig's docstring, whose defaults
    # these are).
    mitigation: str = "none"  # how to train: see "Mitigations"
    dro_eta: float = MitigationConfig.dro_eta  # group_dro: step size of the online group weights
    dro_weight_decay: float = MitigationConfig.dro_weight_decay  # group_dro: weight decay
    jtt_epochs: int = MitigationConfig.jtt_epochs  # jtt: epochs of the first (error-finding) model
    jtt_upweight: float = MitigationConfig.jtt_upweight  # jtt: weight of the first model's errors
    rrr_lambda: float = MitigationConfig.rrr_lambda  # right_reasons: input-gradient penalty
    attention_lambda: float = MitigationConfig.attention_lambda  # attention_penalty: penalty weight
    attention_layer: str = ""  # "" in TOML; MitigationConfig's None (the last feature map)
    dro_adjustment: float = MitigationConfig.dro_adjustment  # group_dro: C of C / sqrt(n_g)
    select: str = MitigationConfig.select  # auto | on | off: choose by val worst-group accuracy
    grid: dict = field(default_factory=dict)  # hyperparameter -> values tried; {}: the defaults
    patience: int = MitigationConfig.patience  # stop after N epochs without a better val score

    def mitigation_config(self) -> MitigationConfig:
        """This model's mitigation with its hyperparameters."""
        return MitigationConfig(
            name=self.mitigation,
            dro_eta=self.dro_eta,
            dro_weight_decay=self.dro_weight_decay,
            jtt_epochs=self.jtt_epochs,
            jtt_upweight=self.jtt_upweight,
            rrr_lambda=self.rrr_lambda,
            attention_lambda=self.attention_lambda,
            attention_layer=self.attention_layer or None,
            dro_adjustment=self.dro_adjustment,
            select=self.select,
            grid=dict(self.grid),
            patience=self.patience,
        )


@dataclass
class ExplainConfig:
    methods: list[str] = field(default_factory=lambda: ["gradcam", "guided_gradcam"])  # see below
    samples_per_cell: int = 8
    mistakes_per_cell: int = 4  # most confident mistakes shown per cell; the rest in mistakes.csv
    batch_size: int = 128  # images per forward pass of the map and the gallery


@dataclass
class DiscoveryConfig:
    """`[discovery]`: slices and explanation strategies found from the model itself."""

    enabled: bool = True  # false: no slice or strategy discovery
    components: int = 2  # mixture components per class (the failing region and the rest)
    error_weight: float = 3.0  # weight of "the model was wrong" in the mixture's likelihood
    min_slice_size: int = 20  # smaller components are not reported as slices

    def slice_settings(self) -> SliceSettings:
        """The discovery module's settings from this table."""
        return SliceSettings(
            components=self.components, error_weight=self.error_weight, min_size=self.min_slice_size
        )


@dataclass
class GateConfig:
    """The `[gates]` table: one field per gate of `audit.metrics.gates.GATES` (same name), None
    when not given. Which gates apply is resolved by `check` (see audit.metrics.gates): without a
    table all at their defaults, with one only those given (plus the defaults if `defaults`).
    After `check`, every applying gate holds its threshold, `from_defaults` names those that
    took the default, and `defaults` is False, so config.json records exactly what applied."""

    min_worst_group_accuracy: float | None = None
    max_accuracy_gap: float | None = None
    max_protected_attention: float | None = None
    max_flip_rate: float | None = None
    max_attention_gap_between_groups: float | None = None
    max_protected_occlusion_effect: float | None = None
    min_slice_accuracy: float | None = None
    defaults: bool = False
    from_defaults: list[str] = field(default_factory=list)

    def table(self) -> dict[str, Any]:
        """The gates table as given: set thresholds and the two meta keys."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None}


@dataclass
class AuditConfig:
    seed: int = 0
    bootstrap: int = 1000
    title: str = "Bias audit"
    data: DataConfig = field(default_factory=DataConfig)
    model: list[ModelConfig] = field(default_factory=list)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    gates: GateConfig = field(default_factory=lambda: GateConfig(defaults=True))
    trust: TrustConfig = field(default_factory=TrustConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    base_dir: Path = field(default=Path("."), metadata={"internal": True})

    @property
    def manifest_path(self) -> Path:
        return (self.base_dir / self.data.manifest).resolve()

    def resolve(self, relative: str) -> Path:
        return (self.base_dir / relative).resolve()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        data["gates"] = self.gates.table()
        return data


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            )
            raise ConfigError(f"unknown config key {name!r}{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            values[key] = _build(hint_type, value, name)
        elif typing.get_origin(hint_type) is list and dataclasses.is_dataclass(
            typing.get_args(hint_type)[0]
        ):
            if not isinstance(value, list):
                raise ConfigError(f"{name} must be an array of tables ([[{key}]])")
            values[key] = [
                _build(typing.get_args(hint_type)[0], v, f"{name}[{i}]")
                for i, v in enumerate(value)
            ]
        else:
            if not _type_ok(value, hint_type):
                raise ConfigError(
                    f"config key {name!r} must be {_describe(hint_type)}, got {value!r}"
                )
            values[key] = float(value) if hint_type is float else value
    return cls(**values)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def from_dict(raw: dict[str, Any], base_dir: Path = Path(".")) -> AuditConfig:
    """Build and check an AuditConfig from a parsed TOML document."""
    config = _build(AuditConfig, raw, "")
    config.base_dir = Path(base_dir)
    check(config)
    return config


def load_config(path: str | Path) -> AuditConfig:
    """Read and validate a TOML audit spec; paths inside are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return from_dict(raw, path.parent)


def check(config: AuditConfig) -> None:
    """Cross-field rules that types alone cannot express."""
    if not config.model:
        raise ConfigError("no [[model]] table: an audit needs at least one model")
    names = [m.name for m in config.model]
    for i, model in enumerate(config.model):
        if model.mitigation not in ("none", "dfr") and not model.train_split:
            raise ConfigError(
                f"model {model.name!r}: mitigation {model.mitigation!r} is a way of training; "
                "it needs train_split"
            )
        try:
            model.mitigation_config().check(has_groups=True, has_masks=True)
        except MitigationError as error:
            raise ConfigError(f"model {model.name!r}: {error}") from None
        if not model.name:
            raise ConfigError(f"model[{i}].name is required")
        if names.count(model.name) > 1:
            raise ConfigError(f"model name {model.name!r} is used twice")
        if not model.train_split and not model.checkpoint and not model.arch.startswith("hf:"):
            raise ConfigError(
                f"model {model.name!r} needs train_split (to train it) or checkpoint (to load it)"
            )
        if model.train_split and model.checkpoint:
            raise ConfigError(
                f"model {model.name!r} has both train_split and checkpoint; choose one"
            )
        if model.epochs < 1 or model.batch_size < 1 or model.lr <= 0:
            raise ConfigError(f"model {model.name!r}: epochs, batch_size and lr must be positive")
        if model.min_accuracy is not None and not 0.0 <= model.min_accuracy <= 1.0:
            raise ConfigError(
                f"model {model.name!r}: min_accuracy must be in [0, 1], got {model.min_accuracy}"
            )
        if model.init and not model.train_split:
            raise ConfigError(
                f"model {model.name!r}: init sets the starting weights of training; give train_split"
            )
    for method in config.explain.methods:
        if method not in METHODS:
            raise ConfigError(
                f"explain.methods: unknown method {method!r}; choose from {', '.join(METHODS)}"
            )
    if "gradcam" not in config.explain.methods:
        config.explain.methods.insert(0, "gradcam")  # attention metrics are measured on Grad-CAM
    if config.explain.samples_per_cell < 0:
        raise ConfigError("explain.samples_per_cell must be >= 0")
    if config.explain.mistakes_per_cell < 0:
        raise ConfigError("explain.mistakes_per_cell must be >= 0")
    if config.explain.batch_size < 1:
        raise ConfigError("explain.batch_size must be >= 1")
    config.trust.check()
    if config.discovery.components < 2 or config.discovery.min_slice_size < 1:
        raise ConfigError("discovery.components must be >= 2 and discovery.min_slice_size >= 1")
    if config.discovery.error_weight < 0:
        raise ConfigError("discovery.error_weight must be >= 0")
    if config.data.min_cell_size < 0:
        raise ConfigError("data.min_cell_size must be >= 0")
    if config.data.image_size < 8:
        raise ConfigError("data.image_size must be at least 8")
    if config.bootstrap < 0:
        raise ConfigError("bootstrap must be >= 0")
    _check_gates(config.gates)
    if not config.data.protected_regions:
        raise ConfigError(
            "data.protected_regions is empty: name the regions tied to the protected attribute"
        )


def _check_gates(gates: GateConfig) -> None:
    """Resolve which gates apply (see audit.metrics.gates) and check their thresholds' range."""
    missing = [k for k in GATES if not hasattr(gates, k)]
    if missing:  # a gate added to GATES without its GateConfig field
        raise ConfigError(f"GateConfig lacks a field for gate(s) {', '.join(missing)}")
    try:
        resolved = resolve_gates(gates.table())
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for key, (threshold, _source) in resolved.items():
        low, high = GATES[key].bounds
        if not low <= threshold <= high:
            raise ConfigError(f"gates.{key} must be between {low:g} and {high:g}, got {threshold}")
    for key in GATES:
        setattr(gates, key, resolved[key][0] if key in resolved else None)
    gates.from_defaults = [k for k, (_t, source) in resolved.items() if source == "default"]
    gates.defaults = False

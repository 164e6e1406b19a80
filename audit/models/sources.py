"""Where a model comes from: `arch` strings, building the model, starting weights, its preprocessing.

`arch` is one of
- `small_cnn` (the built-in GAP CNN) or a torchvision classifier (`resnet50`, `torchvision:resnet50`);
- `timm:NAME`: `timm.create_model(NAME, pretrained=False, num_classes=K, **kwargs)`;
- `hf:FOLDER`: a folder written by transformers' `save_pretrained` (config.json, safetensors weights,
  preprocessor_config.json), loaded offline; its `id2label` names are matched to the manifest's;
- `python:MODULE:CALLABLE`: the team's own factory, called with `num_classes=K` and the kwargs. MODULE
  is imported from the config file's folder or PYTHONPATH: this runs the team's code.

`prepare_model` is what a pipeline calls: it builds or loads the model of one `[[model]]` table and
resolves its Preprocess. Every user mistake raises ArchError, CheckpointError or PreprocessError
(ValueError subclasses) with one line naming the model, the arch and the cause.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from audit.models.io import (
    CheckpointError,
    read_checkpoint,
    read_state_dict,
    state_dict_mismatch,
)
from audit.models.zoo import (  # noqa: F401 - default_layer is re-exported
    SMALL_CNN,
    ArchError,
    SmallCNN,
    default_layer,
    torchvision_classifiers,
)

KINDS = ("small_cnn", "torchvision", "timm", "hf", "python")
HF_FILES = ("config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class Source:
    """A parsed `arch`: kind (one of KINDS), name (model name, or MODULE:CALLABLE), path (hf: folder)."""

    kind: str
    name: str
    path: Path | None = None
    written: str = ""

    @property
    def arch(self) -> str:
        """The canonical arch string (`torchvision:` dropped, as checkpoints record it)."""
        if self.kind in ("small_cnn", "torchvision"):
            return self.name
        if self.kind == "hf":
            return self.written
        return f"{self.kind}:{self.name}"


def parse_arch(arch: str, base_dir: Path | str | None = None) -> Source:
    """Split an arch string into its source; hf: folders are resolved against `base_dir`."""
    if not isinstance(arch, str) or not arch.strip():
        raise ArchError(f"arch must be a non-empty string, got {arch!r}")
    arch = arch.strip()
    prefix, _, rest = arch.partition(":")
    if not _:
        return Source(SMALL_CNN if arch == SMALL_CNN else "torchvision", arch, written=arch)
    if prefix == "torchvision":
        return Source("torchvision", rest, written=arch)
    if prefix == "timm":
        return Source("timm", rest, written=arch)
    if prefix == "hf":
        if not rest:
            raise ArchError(f"arch {arch!r}: give the folder, e.g. hf:models/vit")
        return Source("hf", rest, path=(Path(base_dir or ".") / rest).resolve(), written=arch)
    if prefix == "python":
        module, _, func = rest.rpartition(":")
        if not module or not func or not all(p.isidentifier() for p in [*module.split("."), func]):
            raise ArchError(
                f"arch {arch!r}: write python:MODULE:CALLABLE, e.g. python:mymodels:build"
            )
        return Source("python", rest, written=arch)
    raise ArchError(
        f"arch {arch!r}: unknown source {prefix!r}; use small_cnn, a torchvision name, "
        "timm:NAME, hf:FOLDER or python:MODULE:CALLABLE"
    )


def _hf_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return f"folder not found: {folder}"
    missing = [f for f in HF_FILES if not (folder / f).is_file()]
    if (
        not any(folder.glob("*.safetensors"))
        and not (folder / "model.safetensors.index.json").is_file()
    ):
        missing.append("model.safetensors")
    if missing:
        return f"{folder} lacks {', '.join(missing)} (write it with save_pretrained)"
    return None


def check_arch(arch: str, base_dir: Path | str | None = None) -> Source:
    """Raise ArchError for an arch that cannot be built; cheap (nothing is built or imported)."""
    source = parse_arch(arch, base_dir)
    if source.kind == "torchvision":
        names = torchvision_classifiers()
        if source.name not in names:
            close = difflib.get_close_matches(source.name, [SMALL_CNN, *names], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ArchError(
                f"unknown arch {arch!r}: use {SMALL_CNN!r}, a torchvision classifier, timm:NAME, "
                f"hf:FOLDER or python:MODULE:CALLABLE{hint}"
            )
    elif source.kind == "timm":
        import timm

        names = timm.list_models()
        if source.name not in names:
            close = difflib.get_close_matches(source.name, names, n=3, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ArchError(f"unknown timm model {source.name!r} in arch {arch!r}{hint}")
    elif source.kind == "hf":
        problem = _hf_problem(source.path)
        if problem:
            raise ArchError(f"arch {arch!r}: {problem}")
    return source


@contextlib.contextmanager
def _import_path(base_dir: Path | str | None) -> Iterator[None]:
    """Put the config's folder first on sys.path while a python: module is imported."""
    folder = str(Path(base_dir or ".").resolve())
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _python_factory(source: Source, base_dir: Path | str | None) -> Any:
    module_name, _, func_name = source.name.rpartition(":")
    with _import_path(base_dir):
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 - the team's code may raise anything
            raise ArchError(
                f"arch {source.written!r}: cannot import module {module_name!r}: "
                f"{type(error).__name__}: {_line(error)}"
            ) from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ArchError(
            f"arch {source.written!r}: module {module_name!r} has no callable {func_name!r}"
        )
    return factory


def _line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def build_model(
    arch: str,
    num_classes: int,
    *,
    base_dir: Path | str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A classifier with `num_classes` outputs; random weights (nothing is downloaded), except hf:,
    which loads the folder's weights (its number of labels must be num_classes)."""
    source = check_arch(arch, base_dir)
    kwargs = dict(kwargs or {})
    try:
        if source.kind == SMALL_CNN:
            return SmallCNN(num_classes=num_classes, **kwargs)
        if source.kind == "torchvision":
            return torchvision.models.get_model(
                source.name, weights=None, num_classes=num_classes, **kwargs
            )
        if source.kind == "timm":
            import timm

            return timm.create_model(
                source.name, pretrained=False, num_classes=num_classes, **kwargs
            )
    except (TypeError, ValueError, RuntimeError, AssertionError) as error:
        raise ArchError(
            f"arch {arch!r} with kwargs {kwargs}: {type(error).__name__}: {_line(error)}"
        ) from None
    if source.kind == "hf":
        model = load_hf_model(source, kwargs=kwargs)
        if model.config.num_labels != num_classes:
            raise ArchError(
                f"arch {arch!r}: the model has {model.config.num_labels} labels, the data {num_classes} classes"
            )
        return model
    factory = _python_factory(source, base_dir)
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise ArchError(
            f"arch {arch!r}: calling {source.name.replace(':', '.')}(num_classes={num_classes}"
            f"{''.join(f', {k}={v!r}' for k, v in kwargs.items())}) failed: "
            f"{type(error).__name__}: {_line(error)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchError(
            f"arch {arch!r}: the factory returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


# -- Hugging Face --------------------------------------------------------------------------
def load_hf_model(
    source: Source, *, kwargs: dict[str, Any] | None = None, labels: list[str] | None = None
) -> nn.Module:
    """The model saved in an hf: folder, offline. With `labels`, a head for exactly those labels
    (re-initialised where the folder's labels differ) - used to train from the folder's weights."""
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    problem = _hf_problem(source.path)
    if problem:
        raise ArchError(f"arch {source.written!r}: {problem}")
    extra: dict[str, Any] = dict(kwargs or {})
    if labels is not None:
        extra |= {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
            "ignore_mismatched_sizes": True,
        }
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading is quick; the audit shows its own progress
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            source.path, local_files_only=True, output_loading_info=True, **extra
        )
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        raise ArchError(
            f"arch {source.written!r}: cannot load the model in {source.path}: "
            f"{type(error).__name__}: {_line(error)}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    # transformers fills weights missing from the folder with random ones and only warns: refuse,
    # except the head that `labels` asked to re-initialise.
    missing = sorted(info.get("missing_keys", []))
    mismatched = [] if labels is not None else [k for k, *_ in info.get("mismatched_keys", [])]
    if missing or mismatched:
        keys = missing or mismatched
        raise ArchError(
            f"arch {source.written!r}: the weights in {source.path} lack {len(keys)} tensors of the "
            f"model (e.g. {keys[0]}); save the whole classifier with save_pretrained"
        )
    if labels is not None:  # a fresh head also where the label count happens to be the same
        prefix = getattr(model, "base_model_prefix", "")
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not (prefix and name.startswith(prefix)):
                module.reset_parameters()
    return model.eval()


def hf_class_order(model: nn.Module, classes: list[str], arch: str = "hf:") -> tuple[int, ...]:
    """For each manifest class, the output index of the hf model's label with that name.

    Names match exactly, or else ignoring case and surrounding spaces. Any class without a label or
    label without a class is an error that lists them.
    """
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(model.config.num_labels)]
    exact = {name: i for i, name in enumerate(names)}
    loose = {name.strip().casefold(): i for i, name in enumerate(names)}
    order = []
    unmatched = []
    for cls in classes:
        index = exact.get(cls, loose.get(cls.strip().casefold()))
        if index is None:
            unmatched.append(cls)
        else:
            order.append(index)
    extra = [names[i] for i in range(len(names)) if i not in order]
    if unmatched or extra or len(set(order)) != len(order):
        raise ArchError(
            f"arch {arch!r}: the model's labels do not match the manifest's classes: "
            f"classes without a label: {unmatched or 'none'}; labels without a class: {extra or 'none'} "
            f"(model labels: {names}; set id2label in its config.json)"
        )
    return tuple(order)


# -- starting weights ----------------------------------------------------------------------
def _offline(host: str) -> bool:
    """True when downloads are off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or `host` is unreachable."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        socket.create_connection((host, 443), timeout=2).close()
    except OSError:
        return True
    return False


def _head_keys(model: nn.Module, given: dict[str, torch.Tensor], num_classes: int) -> list[str]:
    """Tensors of the classifier head (a Linear or 1x1 conv with num_classes outputs) whose shape
    in `given` differs from the model's only in the number of classes."""
    heads = [
        name + "."
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) and module.out_features == num_classes)
        or (
            isinstance(module, nn.Conv2d)
            and module.out_channels == num_classes
            and module.kernel_size == (1, 1)
        )
    ]
    own = model.state_dict()
    return [
        k
        for k in own
        if k in given
        and any(k.startswith(prefix) for prefix in heads)
        and own[k].shape != given[k].shape
        and own[k].shape[1:] == given[k].shape[1:]
    ]


def apply_init(
    model: nn.Module, state: dict[str, torch.Tensor], num_classes: int, where: str
) -> str | None:
    """Load `state` into `model`, keeping the model's fresh head where the file's head has another
    number of classes. Returns a message saying which tensors were re-initialised, or None."""
    own = model.state_dict()
    head = _head_keys(model, state, num_classes)
    kept = {k: v for k, v in state.items() if k not in head}
    problem = state_dict_mismatch({k: v for k, v in own.items() if k not in head}, kept)
    if problem:
        raise CheckpointError(f"{where} does not fit the model: {problem}")
    model.load_state_dict(kept, strict=False)
    if not head:
        return None
    return (
        f"{where}: head {', '.join(head)} re-initialised "
        f"({state[head[0]].shape[0]} outputs in the file, {num_classes} classes here)"
    )


def pretrained_model(
    source: Source, num_classes: int, kwargs: dict[str, Any]
) -> tuple[nn.Module, str | None]:
    """A torchvision or timm model with the library's own weights (downloaded if not cached)."""
    if source.kind == "torchvision":
        try:
            weights = torchvision.models.get_model_weights(source.name).DEFAULT
        except (ValueError, KeyError, AttributeError):
            raise ArchError(
                f"init = 'pretrained': torchvision has no weights for {source.name!r}"
            ) from None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.is_file() and _offline("download.pytorch.org"):
            raise ArchError(
                f"init = 'pretrained' for {source.arch!r}: this machine is offline and the weights are not "
                f'cached ({cached}); give init = "PATH" to a state dict instead'
            )
        try:
            full = torchvision.models.get_model(source.name, weights=weights, **kwargs)
        except Exception as error:  # noqa: BLE001 - network and hub errors
            raise ArchError(
                f"init = 'pretrained' for {source.arch!r}: download failed: {_line(error)}"
            ) from None
        model = build_model(source.arch, num_classes, kwargs=kwargs)
        return model, apply_init(
            model, full.state_dict(), num_classes, f"{source.arch} pretrained weights"
        )
    if source.kind == "timm":
        if _offline("huggingface.co"):
            raise ArchError(
                f"init = 'pretrained' for {source.arch!r}: this machine is offline (or HF_HUB_OFFLINE is set); "
                'give init = "PATH" to a state dict instead'
            )
        import timm

        try:
            model = timm.create_model(
                source.name, pretrained=True, num_classes=num_classes, **kwargs
            )
        except Exception as error:  # noqa: BLE001
            raise ArchError(
                f"init = 'pretrained' for {source.arch!r}: download failed: {_line(error)}"
            ) from None
        return model, f"{source.arch}: timm pretrained weights, head for {num_classes} classes"
    raise ArchError(
        f"init = 'pretrained' needs a torchvision or timm arch, not {source.written!r}; "
        'give init = "PATH" to a state dict instead'
    )


# -- what a pipeline calls -----------------------------------------------------------------
@dataclass
class Prepared:
    """A model ready for the audit: call `preprocess.attach(model)` and feed [0, 1] frames of size
    `preprocess.frame` made with `preprocess.geometry`. messages: what to log (e.g. a re-initialised head)."""

    model: nn.Module
    preprocess: Any  # audit.data.preprocess.Preprocess
    source: Source
    messages: list[str] = field(default_factory=list)


def prepare_model(
    spec: Any,
    classes: list[str],
    *,
    base_dir: Path | str,
    image_size: int,
    for_training: bool | None = None,
) -> Prepared:
    """Build or load the model of one `[[model]]` table (a ModelConfig) and resolve its Preprocess.

    - `checkpoint`: the state dict is loaded into `arch` (load_model);
    - hf: without checkpoint: the folder's model; its labels must match `classes` unless it is
      trained here (then a head for `classes` is made where they differ, and logged);
    - otherwise a fresh model, started from `init` ("PATH" or "pretrained") if given.
    The source's own preprocessing (timm, hf) is the default for models with outside weights
    (checkpoint, init, hf:); a model trained here from scratch keeps today's default.
    """
    from audit.data.preprocess import resolve_preprocess

    name = getattr(spec, "name", "") or "model"
    base_dir = Path(base_dir)
    kwargs = dict(getattr(spec, "kwargs", None) or {})
    init = getattr(spec, "init", "") or ""
    checkpoint = getattr(spec, "checkpoint", "") or ""
    training = bool(getattr(spec, "train_split", "")) if for_training is None else for_training
    source = check_arch(spec.arch, base_dir)
    num_classes = len(classes)
    messages: list[str] = []
    outside_weights = bool(checkpoint or init or source.kind == "hf")
    if checkpoint:
        model = load_model(
            base_dir / checkpoint,
            spec.arch,
            num_classes,
            trust=bool(getattr(spec, "trust", False)),
            base_dir=base_dir,
            kwargs=kwargs,
        )
    elif source.kind == "hf":
        if init:
            raise ArchError(
                f"model {name!r}: init does not apply to hf: models (the folder holds the weights)"
            )
        model = load_hf_model(source, kwargs=kwargs)
        try:
            hf_class_order(model, classes, spec.arch)
        except ArchError:
            if not training:
                raise
            model = load_hf_model(source, kwargs=kwargs, labels=list(classes))
            messages.append(
                f"model {name!r}: the labels of {spec.arch} differ from the classes {classes}: head re-initialised"
            )
    elif init == "pretrained":
        model, message = pretrained_model(source, num_classes, kwargs)
        messages += [message] if message else []
    else:
        model = build_model(spec.arch, num_classes, base_dir=base_dir, kwargs=kwargs)
        if init:
            path = base_dir / init
            message = apply_init(model, read_state_dict(path), num_classes, f"init {path}")
            messages += [message] if message else []
    order = hf_class_order(model, classes, spec.arch) if source.kind == "hf" else None
    preprocess = resolve_preprocess(
        getattr(spec, "preprocess", None),
        model,
        source,
        image_size,
        source_defaults=outside_weights,
        name=name,
        class_order=None if order == tuple(range(num_classes)) else order,
    )
    return Prepared(model=model, preprocess=preprocess, source=source, messages=messages)


def load_model(
    path: Path,
    arch: str,
    num_classes: int,
    *,
    trust: bool = False,
    base_dir: Path | str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Load a state dict (torch file or .safetensors) into `arch`, a TorchScript file, or (only with
    trust) a pickled model (audit.models.io.read_checkpoint reads the file)."""
    path = Path(path)
    source = check_arch(arch, base_dir)
    read = read_checkpoint(path, trust=trust)
    if isinstance(read, nn.Module):
        return read
    state, saved_arch = read
    if saved_arch is not None and saved_arch != arch:
        try:
            same = parse_arch(saved_arch).arch == source.arch or (
                source.kind == "hf" and saved_arch.startswith("hf:")
            )
        except ValueError:
            same = False
        if not same:
            raise CheckpointError(f"{path} was saved from arch {saved_arch!r}, not {arch!r}")
    model = build_model(arch, num_classes, base_dir=base_dir, kwargs=kwargs)
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"{path} does not fit arch {arch!r} with {num_classes} classes: {problem}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()

"""Saving and loading classifiers. Checkpoints are untrusted: weights_only unless `trust` is set."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from audit.models.zoo import build_model


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason in one line."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    model: nn.Module, path: Path, *, arch: str, classes: list[str], meta: dict[str, Any]
) -> None:
    """A state dict with what is needed to rebuild the model; loadable with weights_only=True."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": model.state_dict(),
        "arch": arch,
        "classes": list(classes),
        "meta": meta,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def load_model(path: Path, arch: str, num_classes: int, *, trust: bool = False) -> nn.Module:
    """Load a state dict into `arch`, a TorchScript file, or (only with trust) a pickled model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as error:
            raise CheckpointError(
                f"{path}: not a loadable TorchScript file: {str(error).splitlines()[0]}"
            ) from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds pickled objects, not only weights; it was not loaded. If you trust this file, "
            "set trust = true for this model (this runs code from the file)"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint: {str(error).splitlines()[0]}"
        ) from None
    if isinstance(payload, nn.Module):
        return payload.eval()
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    saved_arch = payload.get("arch") if isinstance(payload, dict) else None
    if isinstance(saved_arch, str) and saved_arch != arch:
        raise CheckpointError(
            f"{path} was saved from arch {saved_arch!r}, but the config says {arch!r}"
        )
    model = build_model(arch, num_classes)
    problem = _state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"{path} does not fit arch {arch!r} with {num_classes} classes: {problem}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _state_dict_mismatch(
    own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]
) -> str | None:
    """A one-line summary of how a state dict differs from the model's, or None if it fits."""
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    resized = [k for k in own if k in given and own[k].shape != given[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if resized:
        k = resized[0]
        parts.append(
            f"{len(resized)} tensors of another shape (e.g. {k}: {tuple(given[k].shape)} in the file, {tuple(own[k].shape)} in the model)"
        )
    return "; ".join(parts) or None

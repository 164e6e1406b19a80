"""Saving and loading classifiers. Checkpoints are untrusted: weights_only unless `trust` is set.

A file that is not a checkpoint is one line naming it; `trust` is suggested only for a well-formed
pickle (checked by reading its opcodes, never by running it) that weights_only loading refused.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


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


def _is_safetensors(path: Path) -> bool:
    """A .safetensors file, or a file that starts like one (8-byte header length, then a JSON object)."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= path.stat().st_size - 8


def _pickle_bytes(path: Path) -> bytes | None:
    """The pickle a torch file holds (data.pkl inside a zip archive, or the file itself); None if none."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                return archive.read(names[0]) if names else None
        except (zipfile.BadZipFile, OSError, KeyError):
            return None
    return path.read_bytes()


def is_valid_pickle(path: Path) -> bool:
    """Whether a file holds a well-formed pickle, decided by reading its opcodes (pickletools), never
    by executing it: the only case where `trust` can help."""
    data = _pickle_bytes(path)
    if not data:
        return False
    try:
        pickletools.dis(data, out=io.StringIO())
    except Exception:  # noqa: BLE001 - any decoding problem means "not a pickle"
        return False
    return True


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _refused(path: Path, error: BaseException) -> CheckpointError:
    """The one-line error for a file that weights_only loading refused."""
    if isinstance(error, pickle.UnpicklingError) and is_valid_pickle(path):
        return CheckpointError(
            f"{path} holds pickled Python objects, not only weights, so it was not loaded. If you made "
            "this file yourself, set trust = true for this model (--trust on the command line): "
            "trusting runs code from the file, so do it only for files you made"
        )
    return CheckpointError(
        f"{path} is not a PyTorch checkpoint (neither a state dict, a safetensors file nor a "
        "TorchScript file); give the state dict saved from the model"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file read with weights_only=True.

    A torch file may hold the state dict itself or a dict with a "state_dict" entry (as this tool's
    checkpoints do). Anything else is a CheckpointError in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        return _load_safetensors(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - weights_only runs no code; any failure is a bad file
        raise _refused(path, error) from None
    return _state_of(path, payload)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file: {_first_line(error)}"
        ) from None


def _state_of(path: Path, payload: Any) -> dict[str, torch.Tensor]:
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CheckpointError(
            f"{path}: expected a state dict (names -> tensors), found {type(payload).__name__}"
        )
    return state


def read_checkpoint(path: Path, *, trust: bool = False) -> nn.Module | tuple[dict, str | None]:
    """A checkpoint file as a ready model (TorchScript, or a pickled model with `trust`) or as
    (state dict, the arch it records or None). Every unusable file is a one-line CheckpointError;
    `trust` is advised only for a well-formed pickle that weights_only loading refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        payload: Any = _load_safetensors(path)
    elif _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch's deprecation notice is not the user's business
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as error:
            raise CheckpointError(
                f"{path}: not a loadable TorchScript file: {str(error).splitlines()[0]}"
            ) from None
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=not trust)
        except Exception as error:  # noqa: BLE001 - see _refused; trusted files may raise anything
            if trust:
                raise CheckpointError(
                    f"{path}: cannot be loaded, even trusted: {_first_line(error)}"
                ) from None
            raise _refused(path, error) from None
    if isinstance(payload, nn.Module):
        return payload.eval()
    saved_arch = payload.get("arch") if isinstance(payload, dict) else None
    return _state_of(path, payload), saved_arch if isinstance(saved_arch, str) else None


def state_dict_mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
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

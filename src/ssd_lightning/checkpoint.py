"""Checkpoints from other people are data: reading one never runs code it names.

- ``load_checkpoint`` reads with ``torch.load(weights_only=True)`` (tensors and plain containers
  only), turns every failure into ``CheckpointError("not a valid checkpoint: <path>: <why>")``
  and checks the content hash of the weights that training stored (``weights_digest``), so a
  file corrupted on disk is refused instead of silently giving wrong detections.
- ``build_network`` rebuilds the network from the checkpoint's stored config without
  ``hydra.utils.instantiate``: every ``_target_`` must be one of this project's network classes
  (``NETWORK_CLASSES``), looked up in a dict, never imported by name. A researcher's own network
  class is allowed by calling ``register_network(MyNet)`` in their code: the decision to trust
  a class is made in code, not by the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ssd_lightning.models import (
    SSD,
    SSD300VGG16,
    SSD512VGG16,
    ResNet50Features,
    SSD300ResNet50,
    VGG16Features,
)
from ssd_lightning.models.layers import ExtraSpec


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and the reason."""


def _names(cls: type) -> list[str]:
    """The dotted names a config may use for ``cls``: where it is defined and the package."""
    return [f"{cls.__module__}.{cls.__qualname__}", f"ssd_lightning.models.{cls.__qualname__}"]


# _target_ name -> class; nothing outside this table is ever built from a checkpoint.
NETWORK_CLASSES: dict[str, type] = {
    name: cls
    for cls in (
        SSD,
        SSD300VGG16,
        SSD512VGG16,
        SSD300ResNet50,
        VGG16Features,
        ResNet50Features,
        ExtraSpec,
    )
    for name in _names(cls)
}
# Hydra flags that change nothing for plain keyword construction.
_IGNORED_KEYS = {"_convert_", "_recursive_"}


def register_network(cls: type, name: str | None = None) -> None:
    """Allow checkpoints to rebuild ``cls`` (a network or backbone class of your own).

    Args:
        cls: the class; its ``_target_`` in configs is ``module.QualName`` unless ``name``.
        name: the ``_target_`` string to accept instead.
    """
    NETWORK_CLASSES[name or f"{cls.__module__}.{cls.__qualname__}"] = cls


def build_network(config: Mapping[str, Any], where: str = "net_config") -> nn.Module:
    """Build a network from a plain config whose ``_target_`` entries are allow-listed.

    Raises:
        CheckpointError: a ``_target_`` outside ``NETWORK_CLASSES``, an unsupported Hydra key,
            a value that is not plain data, or arguments the class does not take.
    """
    return _build(config, where)


def _build(node: Any, where: str) -> Any:
    if isinstance(node, Mapping):
        if "_target_" not in node:
            return {k: _build(v, f"{where}.{k}") for k, v in node.items()}
        target = node["_target_"]
        cls = NETWORK_CLASSES.get(target) if isinstance(target, str) else None
        if cls is None:
            raise CheckpointError(
                f"{where}._target_={target!r} is not one of this project's network classes; "
                "a checkpoint may only name those (register your own with "
                "ssd_lightning.checkpoint.register_network). Known: "
                + ", ".join(sorted({c.__qualname__ for c in NETWORK_CLASSES.values()}))
            )
        special = sorted(k for k in node if k.startswith("_") and k not in _IGNORED_KEYS)
        if special != ["_target_"]:
            raise CheckpointError(f"{where}: unsupported keys {special[1:]} next to _target_")
        kwargs = {k: _build(v, f"{where}.{k}") for k, v in node.items() if not k.startswith("_")}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise CheckpointError(f"{where}: cannot build {target}: {e}") from e
    if isinstance(node, list | tuple):
        return [_build(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if node is None or isinstance(node, bool | int | float | str):
        return node
    raise CheckpointError(f"{where}: {type(node).__name__} is not a plain config value")


def weights_digest(state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 of the weights: every tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(flat.numpy()))
    return digest.hexdigest()


def verify_weights(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Raise if the weights differ from the digest stored when the checkpoint was written."""
    stored = (checkpoint.get("ssd") or {}).get("weights_sha256")
    if stored is None:  # written before digests existed
        return
    if weights_digest(checkpoint["state_dict"]) != stored:
        raise CheckpointError(
            f"not a valid checkpoint: {os.fspath(path)}: the weights do not match the content "
            "hash stored when it was saved (the file was modified or corrupted on disk)"
        )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A training checkpoint, loaded safely (tensors and plain containers only) and verified.

    Raises:
        CheckpointError: "not a valid checkpoint: <path>: <why>" for a missing, empty,
            truncated or foreign file, pickled code, or weights that fail their hash.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"not a valid checkpoint: {path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"not a valid checkpoint: {path}: the file is empty")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"not a valid checkpoint: {path}: {why}") from e
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in checkpoint]
    if not isinstance(checkpoint, dict) or missing:
        what = f"no {', '.join(missing)}" if isinstance(checkpoint, dict) else "not a dict"
        raise CheckpointError(f"not a valid checkpoint: {path}: {what} (not written by ssd-train)")
    verify_weights(checkpoint, path)
    return checkpoint


__all__ = [
    "NETWORK_CLASSES",
    "CheckpointError",
    "build_network",
    "load_checkpoint",
    "register_network",
    "verify_weights",
    "weights_digest",
]

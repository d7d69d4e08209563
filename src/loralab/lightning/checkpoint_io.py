"""Lightning checkpoints as safetensors: tensors in the file, the rest of the checkpoint as JSON metadata.

No pickle is ever written or read, so a checkpoint from elsewhere cannot run code when loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors import safe_open
from safetensors.torch import save_file

from ..store import atomic_write

_META_KEY = "loralab.checkpoint"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a safetensors checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_checkpoint_file(checkpoint: dict, path: str | Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_encode(checkpoint, tensors))
    # atomic: a crash mid-write never leaves a truncated "last" checkpoint
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={_META_KEY: meta}))


def load_checkpoint_file(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()[_META_KEY]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _decode(json.loads(meta), tensors)


class SafetensorsCheckpointIO(CheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)

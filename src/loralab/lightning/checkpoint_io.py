"""Lightning checkpoints as safetensors: tensors in the file, the rest of the checkpoint as JSON metadata.

No pickle is ever written or read, so a checkpoint from elsewhere cannot run code when loaded. Each file carries the
sha256 of its tensors, and the file it replaces is kept as `prev-<name>`: a checkpoint that does not load (truncated,
bad header, checksum not matching) is set aside and the run resumes from the one before, or starts over.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors import safe_open
from safetensors.torch import save_file

from ..store import atomic_write, set_aside

log = logging.getLogger("loralab")
_META_KEY = "loralab.checkpoint"
_SHA_KEY = "loralab.sha256"
PREVIOUS = "prev-"


class DamagedCheckpoint(ValueError):
    pass


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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def previous(path: Path) -> Path:
    return path.with_name(PREVIOUS + path.name)


def save_checkpoint_file(checkpoint: dict, path: str | Path) -> None:
    """Write atomically (a crash mid-write never leaves half a file), keeping the file it replaces as prev-<name>."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_encode(checkpoint, tensors))
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + len(meta)
    if path.exists():
        os.replace(path, previous(path))  # a crash or full disk before the next rename leaves prev: still resumable
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={_META_KEY: meta,
                                                                      _SHA_KEY: tensors_sha256(tensors)}),
                 need_bytes=size)


def load_checkpoint_file(path: str | Path) -> dict:
    """The checkpoint, checked against the checksum written with it; DamagedCheckpoint says why when it cannot be."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if _META_KEY not in meta:
            raise DamagedCheckpoint("no loralab checkpoint metadata")
        expected = meta.get(_SHA_KEY)
        if expected is not None and tensors_sha256(tensors) != expected:
            raise DamagedCheckpoint("its tensors do not match the checksum written with them")
        return _decode(json.loads(meta[_META_KEY]), tensors)
    except DamagedCheckpoint:
        raise
    except Exception as e:  # safetensors' header errors, truncation, bad JSON, a missing tensor key
        raise DamagedCheckpoint(f"{type(e).__name__}: {e}") from e


def resume_point(path: Path) -> Optional[Path]:
    """The checkpoint to resume from: `path`, else the one it replaced (prev-), else None (start over). A file that
    does not load is set aside (renamed, never deleted) with one line saying why and what happens next."""
    candidates = [c for c in (path, previous(path)) if c.exists()]
    for i, candidate in enumerate(candidates):
        try:
            load_checkpoint_file(candidate)
            return candidate
        except DamagedCheckpoint as e:
            rest = candidates[i + 1:]
            set_aside(candidate, str(e), f"resuming from {rest[0].name}" if rest else "starting over")
    return None
class SafetensorsCheckpointIO(CheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)

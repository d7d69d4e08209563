"""Reading LoRA adapters and the frozen base weights they were trained on, as float64 numpy arrays.

A "source" is a run folder (``adapter/`` + ``results.json``), a Hydra job folder that links its run, or a peft
adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AnalysisError
from ..run.names import split_layer
from ..store import ADAPTER_FILES, adapter_folder, run_folder

Key = tuple[int, str]  # (layer index, module path inside the layer); layer -1 = not in a numbered block

ADAPTER_CONFIG, ADAPTER_WEIGHTS = ADAPTER_FILES
# `<module>.lora_A[.default].weight`: the LoRA factor of one adapted module.
_LORA_FACTOR = re.compile(r"^(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Adapter:
    """LoRA factors of one adapter: ``pairs[(layer, module)] = (A, B)``, A (r, in), B (out, r)."""

    path: Path
    config: dict
    pairs: dict[Key, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.config.get("r", 8)))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def scaling(self, r: int | None = None) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA; ``r`` defaults to the config's r."""
        r = int(r if r is not None else self.config.get("r", 8))
        return self.lora_alpha / (math.sqrt(r) if self.use_rslora else r)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def only(self, keys: Iterable[Key]) -> Adapter:
        """The same adapter restricted to ``keys``."""
        return Adapter(self.path, self.config, {k: self.pairs[k] for k in keys})


def adapter_dir(source: str | Path, arg: str = "source") -> Path:
    """The peft adapter folder of a run, job or adapter folder, or raise AnalysisError."""
    path = Path(source)
    if not path.exists():
        raise AnalysisError(f"{arg}: '{source}' does not exist; pass a run folder or a peft adapter folder.")
    if not path.is_dir():
        raise AnalysisError(f"{arg}: '{source}' is not a folder; pass a run folder or a peft adapter folder.")
    folder = adapter_folder(path)
    if folder is not None:
        return folder
    run = run_folder(path)
    if run is not None:
        raise AnalysisError(
            f"{arg}: run folder '{source}' has no LoRA adapter ({run / 'adapter'} is missing or incomplete); "
            "only runs with method=lora save an adapter."
        )
    raise AnalysisError(
        f"{arg}: '{source}' is neither a run folder (adapter/ + results.json) nor a peft adapter folder "
        f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); point it at one of those."
    )


def lora_key(name: str) -> tuple[Key, str] | None:
    """Map a peft state-dict key to ((layer, module), "A"|"B"); None for non-LoRA keys."""
    m = _LORA_FACTOR.match(name)
    if m is None:
        return None
    layer, module = split_layer(m["module"])
    if layer is None:
        return (-1, module.removeprefix("base_model.model.")), m["ab"]
    return (layer, module), m["ab"]


def base_key(name: str) -> Key | None:
    """(layer, module) of a base-model weight name like ``bert.encoder.layer.3.attention.self.query.weight``."""
    if not name.endswith(".weight"):
        return None
    layer, module = split_layer(name.removesuffix(".weight"))
    return (-1 if layer is None else layer), module


def lora_pairs(state: Mapping[str, object]) -> dict[Key, tuple[np.ndarray, np.ndarray]]:
    """Group a peft state dict into (layer, module) -> (A, B) float64 arrays."""
    found: dict[Key, dict[str, np.ndarray]] = {}
    for name, tensor in state.items():
        parsed = lora_key(name)
        if parsed is not None:
            found.setdefault(parsed[0], {})[parsed[1]] = to_f64(tensor)
    return {k: (v["A"], v["B"]) for k, v in sorted(found.items()) if "A" in v and "B" in v}


def load_adapter(source: str | Path, arg: str = "source") -> Adapter:
    """Load the LoRA factors and config of a run, job or peft adapter folder."""
    from safetensors import safe_open

    folder = adapter_dir(source, arg)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    pairs = lora_pairs(state)
    if not pairs:
        raise AnalysisError(f"{arg}: '{source}' contains no lora_A/lora_B weights; pass the folder of a LoRA run "
                            f"(lora.method=lora) or of a peft LoRA adapter.")
    return Adapter(path=folder, config=config, pairs=pairs)


def to_f64(tensor: object) -> np.ndarray:
    if hasattr(tensor, "detach"):  # torch tensor (bf16 has no numpy dtype, so cast in torch first)
        import torch

        return tensor.detach().to(torch.float64).cpu().numpy()
    return np.asarray(tensor, dtype=np.float64)


def select(keys: Iterable[Key], module: str | None = None, layer: int | None = None) -> list[Key]:
    """Filter keys; ``module`` matches the full module path or its trailing components ("query")."""
    return [
        (lay, mod)
        for lay, mod in keys
        if (layer is None or lay == layer) and (module is None or mod == module or mod.endswith("." + module))
    ]


def resolve_base_dir(adapter: Adapter, base: str | Path | None = None) -> Path:
    """Folder (or file) holding the base model's model.safetensors for ``adapter``."""
    if base is not None:
        path = Path(base)
        if not path.exists():
            raise AnalysisError(f"--base: '{base}' does not exist; pass a folder with model.safetensors.")
        return path
    name = adapter.base_model
    if not name:
        raise AnalysisError(
            f"{adapter.path / ADAPTER_CONFIG} has no base_model_name_or_path; pass --base PATH to the base model folder."
        )
    if (Path(name) / "model.safetensors").is_file():
        return Path(name)
    from ..run.weights import resolve_model_path

    try:
        return Path(resolve_model_path(name))
    except Exception as exc:  # resolver errors vary; surface them as a user-facing message
        raise AnalysisError(f"cannot resolve base model '{name}': {exc}; pass --base PATH.") from exc


def base_weights(
    source: str | Path | Adapter,
    keys: Iterable[Key] | None = None,
    base: str | Path | None = None,
) -> dict[Key, np.ndarray]:
    """Frozen base weights (layer, module) -> W (out, in) read straight from model.safetensors.

    ``source`` is a run/adapter folder (or a loaded Adapter) whose adapter_config.json names the
    base model; ``keys`` defaults to the adapter's LoRA modules. Names with or without a model
    prefix (``bert.``, ``model.``) are matched by (layer, module).
    """
    from safetensors import safe_open

    adapter = source if isinstance(source, Adapter) else load_adapter(source)
    wanted = set(adapter.pairs if keys is None else keys)
    out: dict[Key, np.ndarray] = {}
    for file in _weight_files(resolve_base_dir(adapter, base)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                key = base_key(name)
                if key in wanted and key not in out:
                    out[key] = to_f64(f.get_tensor(name))
    return out


def _weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    if path.is_file():
        return [path]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    raise AnalysisError(
        f"base model: no model.safetensors in '{path}'; pass --base PATH to a folder with one."
    )

"""Subspace analysis of LoRA updates (LoRA paper, section 7).

All linear algebra runs in float64 numpy. A "source" is a run folder
(``adapter/`` + ``results.json``) or a peft adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import AnalysisError

Key = tuple[int, str]  # (layer index, module path inside the layer); layer -1 = not in a numbered block
Side = Literal["A", "B"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# `<prefix>.layer.3.attention.self.query.lora_A[.default].weight`; the block names cover
# BERT (layer), Llama/Mistral (layers), GPT-2 (h) and ViT-style (blocks).
_LORA_KEY = re.compile(
    r"^(?:(?P<prefix>.*?)\.)?(?:layers?|h|blocks?)\.(?P<layer>\d+)\.(?P<module>.+?)"
    r"\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
_LORA_KEY_FLAT = re.compile(r"^(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_BASE_KEY = re.compile(r"^(?:.*?\.)?(?:layers?|h|blocks?)\.(?P<layer>\d+)\.(?P<module>.+)\.weight$")


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


@contextlib.contextmanager
def blas_single_thread():
    """Run BLAS/LAPACK single-threaded: small SVDs get ~10-50x slower when BLAS threads
    contend with a training job for a few cores. No-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------- loading


def adapter_dir(source: str | Path, arg: str = "source") -> Path:
    """Return the peft adapter folder of a run folder or adapter folder, or raise AnalysisError."""
    path = Path(source)
    if not path.exists():
        raise AnalysisError(f"{arg}: '{source}' does not exist; pass a run folder or a peft adapter folder.")
    if not path.is_dir():
        raise AnalysisError(f"{arg}: '{source}' is not a folder; pass a run folder or a peft adapter folder.")
    for cand in (path, path / "adapter"):
        if (cand / ADAPTER_CONFIG).is_file() and (cand / ADAPTER_WEIGHTS).is_file():
            return cand
    if (path / "results.json").is_file():
        raise AnalysisError(
            f"{arg}: run folder '{source}' has no LoRA adapter ({path / 'adapter'} is missing or incomplete); "
            "only runs with method=lora save an adapter."
        )
    raise AnalysisError(
        f"{arg}: '{source}' is neither a run folder (adapter/ + results.json) nor a peft adapter folder "
        f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); point it at one of those."
    )


def parse_lora_key(key: str) -> tuple[Key, str] | None:
    """Map a peft state-dict key to ((layer, module), "A"|"B"); None for non-LoRA keys."""
    m = _LORA_KEY.match(key)
    if m:
        return (int(m["layer"]), m["module"]), m["ab"]
    m = _LORA_KEY_FLAT.match(key)
    if m:
        return (-1, m["module"].removeprefix("base_model.model.")), m["ab"]
    return None


def lora_pairs(state: Mapping[str, object]) -> dict[Key, tuple[np.ndarray, np.ndarray]]:
    """Group a peft state dict into (layer, module) -> (A, B) float64 arrays."""
    found: dict[Key, dict[str, np.ndarray]] = {}
    for name, tensor in state.items():
        parsed = parse_lora_key(name)
        if parsed is not None:
            found.setdefault(parsed[0], {})[parsed[1]] = _to_f64(tensor)
    return {k: (v["A"], v["B"]) for k, v in sorted(found.items()) if "A" in v and "B" in v}


def load_adapter(source: str | Path, arg: str = "source") -> Adapter:
    """Load the LoRA factors and config of a run folder or peft adapter folder."""
    from safetensors import safe_open

    folder = adapter_dir(source, arg)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    pairs = lora_pairs(state)
    if not pairs:
        raise AnalysisError(f"{arg}: '{source}' contains no lora_A/lora_B weights.")
    return Adapter(path=folder, config=config, pairs=pairs)


def _to_f64(tensor: object) -> np.ndarray:
    if hasattr(tensor, "detach"):  # torch tensor (bf16 has no numpy dtype, so cast in torch first)
        import torch

        return tensor.detach().to(torch.float64).cpu().numpy()
    return np.asarray(tensor, dtype=np.float64)


def select(keys: Iterable[Key], module: str | None = None, layer: int | None = None) -> list[Key]:
    """Filter keys; ``module`` matches the full module path or its trailing components ("query")."""
    out = []
    for lay, mod in keys:
        if layer is not None and lay != layer:
            continue
        if module is not None and not (mod == module or mod.endswith("." + module)):
            continue
        out.append((lay, mod))
    return out


# ----------------------------------------------------------------------------- subspace similarity


def subspace_basis(M: np.ndarray, side: Side = "A") -> np.ndarray:
    """Orthonormal basis (columns, by decreasing singular value) of a LoRA factor's subspace.

    side="A": right singular vectors of lora_A (r, in) -> (in, r).
    side="B": left singular vectors of lora_B (out, r) -> (out, r).
    """
    M = np.asarray(M, dtype=np.float64)
    if side == "A":
        _, _, vh = np.linalg.svd(M, full_matrices=False)
        return vh.T
    if side == "B":
        u, _, _ = np.linalg.svd(M, full_matrices=False)
        return u
    raise ValueError(f"side must be 'A' or 'B', got {side!r}")


def phi_grid_from_bases(U1: np.ndarray, U2: np.ndarray) -> np.ndarray:
    """grid[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) for all i, j."""
    sq = (U1.T @ U2) ** 2
    cum = sq.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, U1.shape[1] + 1)[:, None]
    j = np.arange(1, U2.shape[1] + 1)[None, :]
    return np.clip(cum / np.minimum(i, j), 0.0, 1.0)


def phi_grid(M1: np.ndarray, M2: np.ndarray, side: Side = "A") -> np.ndarray:
    """Normalized subspace similarity phi(i, j) for i in 1..r1, j in 1..r2 (shape (r1, r2))."""
    return phi_grid_from_bases(subspace_basis(M1, side), subspace_basis(M2, side))


def phi(M1: np.ndarray, M2: np.ndarray, i: int, j: int, side: Side = "A") -> float:
    """phi(A1, A2, i, j) = ||U1_i^T U2_j||_F^2 / min(i, j) (paper eq. 4), in [0, 1]."""
    U1, U2 = subspace_basis(M1, side), subspace_basis(M2, side)
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise ValueError(f"i, j must be in 1..{U1.shape[1]}, 1..{U2.shape[1]}; got {i}, {j}")
    return float(np.clip(np.sum((U1[:, :i].T @ U2[:, :j]) ** 2) / min(i, j), 0.0, 1.0))


def projection_distance(U1: np.ndarray, U2: np.ndarray) -> float:
    """Projection (Grassmann) distance ||P1 - P2||_F / sqrt(2) between span(U1) and span(U2).

    Equals sqrt(sum sin^2 theta_k) over principal angles when the dimensions match; 0 = same subspace.
    """
    p, q = U1.shape[1], U2.shape[1]
    overlap = float(np.sum((U1.T @ U2) ** 2))
    return math.sqrt(max(0.0, (p + q) / 2.0 - overlap))


def random_factor(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Gaussian matrix of a LoRA factor's shape (the paper's random baseline)."""
    return rng.standard_normal(shape)


def random_phi_grid(
    shape1: tuple[int, int], shape2: tuple[int, int], side: Side = "A", seed: int = 0
) -> np.ndarray:
    """phi grid between two seeded random Gaussian factors with the given shapes."""
    rng = np.random.default_rng(seed)
    return phi_grid(random_factor(shape1, rng), random_factor(shape2, rng), side)


@dataclass
class Similarity:
    """Similarity of one (layer, module) between two adapters."""

    grid: np.ndarray
    random_grid: np.ndarray
    distance: float  # projection distance between the full r1- and r2-dim subspaces

    def to_dict(self) -> dict:
        return {
            "r1": int(self.grid.shape[0]),
            "r2": int(self.grid.shape[1]),
            "grid": self.grid.tolist(),
            "random_grid": self.random_grid.tolist(),
            "projection_distance": self.distance,
            "mean": float(self.grid.mean()),
            "random_mean": float(self.random_grid.mean()),
        }


def compare(
    a1: Adapter,
    a2: Adapter,
    side: Side = "A",
    module: str | None = None,
    layer: int | None = None,
    seed: int = 0,
) -> dict[Key, Similarity]:
    """phi grids (plus random baseline) for every (layer, module) present in both adapters."""
    keys = select(sorted(set(a1.pairs) & set(a2.pairs)), module, layer)
    idx = 0 if side == "A" else 1
    out: dict[Key, Similarity] = {}
    with blas_single_thread():
        for n, key in enumerate(keys):
            out[key] = _similarity(a1.pairs[key][idx], a2.pairs[key][idx], side, seed + n)
    return out


def _similarity(m1: np.ndarray, m2: np.ndarray, side: Side, seed: int) -> Similarity:
    U1, U2 = subspace_basis(m1, side), subspace_basis(m2, side)
    return Similarity(
        grid=phi_grid_from_bases(U1, U2),
        random_grid=random_phi_grid(m1.shape, m2.shape, side, seed),
        distance=projection_distance(U1, U2),
    )


# ----------------------------------------------------------------------------- amplification (Table 7)


def top_r_norm(W: np.ndarray, U: np.ndarray, Vh: np.ndarray) -> float:
    """||U^T W V^T||_F with U (d, r) and V given as rows Vh (r, k)."""
    return float(np.linalg.norm(U.T @ W @ Vh.T))


def low_rank_svd(B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors U (d, r) and right ones Vh (r, k) of B @ A, via QR of the factors (cheap)."""
    Qb, Rb = np.linalg.qr(B)
    Qa, Ra = np.linalg.qr(A.T)
    u, _, vh = np.linalg.svd(Rb @ Ra.T)
    return Qb @ u, vh @ Qa.T


def amplification(
    A: np.ndarray,
    B: np.ndarray,
    W: np.ndarray,
    scaling: float = 1.0,
    include_scaling: bool = True,
    r: int | None = None,
    seed: int = 0,
) -> dict[str, float | int | bool]:
    """Feature amplification of dW = B@A (times ``scaling`` if ``include_scaling``) on base weight W.

    Returns ||dW||_F, ||W||_F, ||U^T W V^T||_F for U,V = top-r singular vectors of dW (``proj_dW``),
    of W itself (``proj_W``) and of a seeded Gaussian matrix (``proj_random``), and
    ``amplification`` = ||dW||_F / proj_dW. ``r`` defaults to the LoRA rank.
    """
    A, B, W = (np.asarray(x, dtype=np.float64) for x in (A, B, W))
    dW = B @ A * (scaling if include_scaling else 1.0)
    if dW.shape != W.shape:
        raise ValueError(f"dW shape {dW.shape} does not match W shape {W.shape}")
    r = int(r or A.shape[0])
    if not 1 <= r <= A.shape[0]:
        raise ValueError(f"r must be in 1..{A.shape[0]} (the LoRA rank), got {r}")
    U, Vh = low_rank_svd(B * (scaling if include_scaling else 1.0), A)
    Uw, _, Vhw = np.linalg.svd(W, full_matrices=False)
    # A Gaussian matrix's top-r singular subspaces are Haar-random, so sample them directly (no big SVD).
    rng = np.random.default_rng(seed)
    Ur = np.linalg.qr(rng.standard_normal((W.shape[0], r)))[0]
    Vr = np.linalg.qr(rng.standard_normal((W.shape[1], r)))[0]
    proj_dw = top_r_norm(W, U[:, :r], Vh[:r])
    norm_dw = float(np.linalg.norm(dW))
    return {
        "r": r,
        "include_scaling": include_scaling,
        "scaling": float(scaling),
        "norm_W": float(np.linalg.norm(W)),
        "norm_dW": norm_dw,
        "proj_dW": proj_dw,
        "proj_W": top_r_norm(W, Uw[:, :r], Vhw[:r]),
        "proj_random": top_r_norm(W, Ur, Vr.T),
        "amplification": norm_dw / proj_dw if proj_dw > 0 else float("inf"),
    }


def amplification_table(
    adapter: Adapter,
    weights: Mapping[Key, object],
    include_scaling: bool = True,
    r: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """One amplification row per (layer, module) of ``adapter`` that has a base weight in ``weights``."""
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False))
    rows = []
    with blas_single_thread():
        for n, (key, (A, B)) in enumerate(adapter.pairs.items()):
            if key not in weights:
                continue
            W = _to_f64(weights[key])
            if fan_in_fan_out:  # GPT-2 Conv1D stores W as (in, out)
                W = W.T
            if W.shape != (B.shape[0], A.shape[1]):
                raise AnalysisError(
                    f"base weight for {key} has shape {W.shape} but B@A is {(B.shape[0], A.shape[1])}; "
                    "is --base the model this adapter was trained on?"
                )
            if r is not None and not 1 <= r <= A.shape[0]:
                raise AnalysisError(f"--r: {r} must be between 1 and the LoRA rank {A.shape[0]} of {key}.")
            row = amplification(A, B, W, adapter.scaling(A.shape[0]), include_scaling, r, seed + n)
            rows.append({"layer": key[0], "module": key[1], **row})
    return rows


# ----------------------------------------------------------------------------- base weights


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
    try:
        from ..run.weights import resolve_model_path
    except ImportError as exc:
        raise AnalysisError(f"cannot resolve base model '{name}' ({exc}); pass --base PATH.") from exc
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
                    out[key] = _to_f64(f.get_tensor(name))
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


def base_key(name: str) -> Key | None:
    """(layer, module) of a base-model weight name like ``bert.encoder.layer.3.attention.self.query.weight``."""
    m = _BASE_KEY.match(name)
    if m:
        return int(m["layer"]), m["module"]
    if name.endswith(".weight"):
        return -1, name.removesuffix(".weight")
    return None

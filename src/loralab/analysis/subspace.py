"""Subspace analysis of LoRA updates (LoRA paper, section 7): subspace similarity phi, projection distance and
feature amplification. All linear algebra runs in float64 numpy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import AnalysisError
from .adapter_weights import Adapter, Key, select, to_f64

Side = Literal["A", "B"]


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
            W = to_f64(weights[key])
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

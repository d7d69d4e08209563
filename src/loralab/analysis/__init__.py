"""Post-hoc analysis of LoRA runs: subspace similarity, amplification, results tables and plots."""

from ..errors import AnalysisError
from .adapter_weights import Adapter, base_weights, load_adapter
from .subspace import (
    amplification,
    compare,
    phi,
    phi_grid,
    projection_distance,
    random_phi_grid,
)

__all__ = [
    "Adapter",
    "AnalysisError",
    "amplification",
    "base_weights",
    "compare",
    "load_adapter",
    "phi",
    "phi_grid",
    "projection_distance",
    "random_phi_grid",
]

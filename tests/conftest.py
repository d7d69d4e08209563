"""Shared test setup: offline environment, a session-wide tokenization cache, config composition helpers."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before loralab is imported: configs read GLUE_DIR when composed, hub checks read HF_HUB_OFFLINE.
os.environ.setdefault("GLUE_DIR", str((REPO.parent / "shared" / "glue").resolve()))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_MODE"] = "disabled"
# On a shared 2-core machine, OpenMP's default spin-waiting makes torch ~20x slower whenever another process
# competes for the cores (measured: 2.8 vs 73 samples/s); passive waiting costs little on a quiet machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

GLUE_DIR = os.environ["GLUE_DIR"]

from loralab.config import Config, compose

Compose = Callable[..., Config]


def needs_glue(*tasks: str) -> pytest.MarkDecorator:
    """Skip when the local GLUE mirror lacks a task (tests that read real data)."""
    missing = [t for t in tasks if not (Path(GLUE_DIR) / t).is_dir()]
    return pytest.mark.skipif(bool(missing), reason=f"GLUE mirror {GLUE_DIR} lacks {missing}")


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenization cache for the whole session, so each split is tokenized once: under xdist the workers'
    temporary folders share a parent, and so share the cache (its files are written atomically)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "token_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def compose_cfg(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> Compose:
    """`compose_cfg(overrides, root=None)`: a validated Config with a tmp run store and no progress bar."""

    def _compose(overrides: Sequence[str] = (), root: Path | None = None) -> Config:
        root = root or tmp_path_factory.mktemp("runs")
        return compose([f"store.root={root}", f"data.cache_dir={token_cache}",
                        "trainer.enable_progress_bar=false", *overrides])

    return _compose


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on a shared 2-core machine: one torch thread beats two under load (params/quant/variants)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The slowest files first (seconds per file in a full run, 2026-12-05): `make test` runs two xdist workers that take
# whole files (--dist loadfile --no-loadscope-reorder: xdist would otherwise start with the files of most tests) in
# this order, so the long ones start at once and the run ends on short ones.
SLOW_FIRST = ("test_slurm.py",  # ~300
              "test_launchers.py", "test_packed.py", "test_faults.py",  # ~140-200
              "test_train.py", "test_reproduce.py", "test_sweeps.py", "test_optuna_search.py",  # ~80-120
              "test_analysis_wandb.py", "test_experiments.py", "test_config.py", "test_predict.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file keeps its order

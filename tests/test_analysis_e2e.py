"""Real end-to-end analysis: two short real runs at r=2 and r=8 -> phi grids, a heatmap, a table."""
from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from loralab.cli import main as cli
from loralab.store import run_dir
from loralab.run.train import run

# make test-full: the default suite builds similarity grids and heatmaps from real runs in test_reproduce.py (the
# figures part) and tables from a real sweep in test_analysis_wandb.py.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(compose_cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis_runs")
    folders = []
    for r in (2, 8):
        cfg = compose_cfg(["task=rte", f"lora.r={r}", "data.train_limit=64", "data.val_limit=32",
                           "trainer.max_steps=3", "optim.lr=2e-3"], root=root)
        run(cfg)
        folders.append(run_dir(cfg))
    return root, folders


def test_similarity_grid_from_real_runs(two_runs, tmp_path):
    _, (r2, r8) = two_runs
    assert cli(["similarity", str(r2), str(r8), "--module", "query", "--layer", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "similarity.json").read_text())
    (result,) = data["results"]
    grid = result["grid"]
    assert (len(grid), len(grid[0])) == (2, 8)
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in grid for v in row)
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and mpimg.imread(pngs[0]).ndim == 3


def test_table_from_real_runs(two_runs, tmp_path, capsys):
    root, _ = two_runs
    prefix = tmp_path / "t"
    assert cli(["table", str(root), "--rows", "task.name", "--cols", "lora.r", "--out", str(prefix)]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "2" in md and "8" in md and "rte" in md
    assert (tmp_path / "t.csv").exists() and (tmp_path / "t.tex").exists()

"""Subspace similarity, amplification and the similarity/amplification CLI (no training, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import numpy as np
import pytest

from loralab.analysis import adapter_weights, subspace
from loralab.analysis.subspace import (
    amplification,
    phi,
    phi_grid,
    phi_grid_from_bases,
    projection_distance,
    subspace_basis,
)
from loralab.cli import main
from loralab.run.names import split_layer
from loralab.store import link_job


def orthonormal(d: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def factor(Q: np.ndarray, cols: list[int], sv: list[float]) -> np.ndarray:
    """lora_A-shaped (r, d) matrix whose row space is span(Q[:, cols]) with singular values sv."""
    return np.diag(sv) @ Q[:, cols].T


# ----------------------------------------------------------------------------- phi


def test_phi_identical_is_one() -> None:
    A = np.random.default_rng(1).standard_normal((8, 64))
    grid = phi_grid(A, A)
    assert grid.shape == (8, 8)
    assert np.allclose(np.diag(grid), 1.0)
    assert phi(A, A, 8, 8) == pytest.approx(1.0)


def test_phi_orthogonal_is_zero() -> None:
    Q = orthonormal(32)
    A1, A2 = factor(Q, [0, 1, 2, 3], [4, 3, 2, 1]), factor(Q, [4, 5, 6, 7], [4, 3, 2, 1])
    assert np.allclose(phi_grid(A1, A2), 0.0, atol=1e-12)
    assert projection_distance(subspace_basis(A1), subspace_basis(A2)) == pytest.approx(2.0)


def test_phi_partial_overlap() -> None:
    Q = orthonormal(40, seed=2)
    r, k = 6, 2
    A1 = factor(Q, list(range(r)), [6, 5, 4, 3, 2, 1])
    # shares Q[:, 0:2] (A1's top-2 directions) and adds 4 directions orthogonal to A1
    A2 = factor(Q, [0, 1, 10, 11, 12, 13], [6, 5, 4, 3, 2, 1])
    assert phi(A1, A2, r, r) == pytest.approx(k / r)
    assert phi(A1, A2, 2, 2) == pytest.approx(1.0)  # top-2 subspaces coincide
    assert phi(A1, A2, 4, 6) == pytest.approx(k / 4)
    # different ranks: r1=2 fully inside A2's 6-dim subspace
    assert phi(A1[:2], A2, 2, 6) == pytest.approx(1.0)


def test_phi_invariant_to_sign_and_rotation() -> None:
    rng = np.random.default_rng(3)
    A1, A2 = rng.standard_normal((4, 50)), rng.standard_normal((8, 50))
    base = phi_grid(A1, A2)
    # left-multiplying by an orthogonal matrix (incl. sign flips) keeps the right singular vectors
    R = orthonormal(8, seed=4) @ np.diag([1, -1, 1, -1, 1, 1, -1, 1])
    assert np.allclose(phi_grid(A1, R @ A2), base, atol=1e-10)
    assert np.allclose(phi_grid(-A1, A2), base, atol=1e-10)
    # rotating basis vectors inside the top-k subspace leaves phi(., k) unchanged
    U1, U2 = subspace_basis(A1), subspace_basis(A2)
    k = 5
    U2_rot = U2.copy()
    U2_rot[:, :k] = U2[:, :k] @ orthonormal(k, seed=5)
    U2_rot[:, k:] *= -1
    g1, g2 = phi_grid_from_bases(U1, U2), phi_grid_from_bases(U1, U2_rot)
    assert np.allclose(g1[:, k - 1 :], g2[:, k - 1 :], atol=1e-10)


def test_phi_random_near_expected() -> None:
    d = 1024
    grid = subspace.random_phi_grid((8, d), (64, d), seed=0)
    i, j = np.meshgrid(np.arange(1, 9), np.arange(1, 65), indexing="ij")
    expected = np.maximum(i, j) / d
    assert np.all(grid >= 0) and np.all(grid <= 1)
    assert abs(grid.mean() - expected.mean()) < 0.25 * expected.mean()
    assert grid[-1, -1] == pytest.approx(64 / d, rel=0.35)


def test_side_b_uses_left_vectors() -> None:
    rng = np.random.default_rng(6)
    B = rng.standard_normal((30, 4))
    assert np.allclose(phi_grid(B, B, side="B").diagonal(), 1.0)
    assert phi_grid(B, rng.standard_normal((30, 2)), side="B").shape == (4, 2)
    with pytest.raises(ValueError):
        subspace_basis(B, side="C")  # type: ignore[arg-type]


def test_projection_distance_zero_for_same_span() -> None:
    A = np.random.default_rng(7).standard_normal((5, 20))
    R = orthonormal(5, seed=8)
    assert projection_distance(subspace_basis(A), subspace_basis(R @ A)) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- amplification


def amp_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W = Q1 diag(10,5,3,2,1,.5) Q2^T; dW = 3 * q1_4 q2_4^T, so U^T W V^T = sigma_4 = 1."""
    Q1, Q2 = orthonormal(6, 10), orthonormal(6, 11)
    W = Q1 @ np.diag([10, 5, 3, 2, 1, 0.5]) @ Q2.T
    A = Q2[:, [4]].T  # (1, 6)
    B = 3.0 * Q1[:, [4]]  # (6, 1)
    return A, B, W


def test_amplification_known_value() -> None:
    A, B, W = amp_case()
    out = amplification(A, B, W, scaling=2.0, include_scaling=True)
    assert out["norm_dW"] == pytest.approx(6.0)
    assert out["proj_dW"] == pytest.approx(1.0)
    assert out["amplification"] == pytest.approx(6.0)
    assert out["proj_W"] == pytest.approx(10.0)  # W's own top-1 direction
    assert out["norm_W"] == pytest.approx(np.sqrt(100 + 25 + 9 + 4 + 1 + 0.25))
    assert 0 <= out["proj_random"] <= 10.0
    raw = amplification(A, B, W, scaling=2.0, include_scaling=False)
    assert raw["amplification"] == pytest.approx(3.0) and raw["include_scaling"] is False


# ----------------------------------------------------------------------------- adapters + CLI


def write_adapter(
    folder: Path,
    r: int,
    seed: int,
    d: int = 16,
    layers: int = 2,
    alpha: int = 16,
    prefix: str = "base_model.model.bert.encoder.layer",
) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for lay in range(layers):
        for mod in ("attention.self.query", "attention.self.value"):
            state[f"{prefix}.{lay}.{mod}.lora_A.weight"] = torch.randn(r, d, generator=g)
            state[f"{prefix}.{lay}.{mod}.lora_B.weight"] = torch.randn(d, r, generator=g)
    state["base_model.model.classifier.modules_to_save.default.weight"] = torch.randn(2, d, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    config = {
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "peft_type": "LORA",
        "base_model_name_or_path": str(folder.parent / "base"),
        "target_modules": ["query", "value"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_base(folder: Path, d: int = 16, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {
        f"encoder.layer.{lay}.attention.self.{m}.{p}": torch.randn(d, d, generator=g)
        if p == "weight"
        else torch.zeros(d)
        for lay in range(layers)
        for m in ("query", "key", "value")
        for p in ("weight", "bias")
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def run_cli(*argv: str) -> int:
    return main(list(argv))


def test_split_layer_of_each_model_family() -> None:
    assert split_layer("bert.encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert split_layer("model.layers.12.self_attn.q_proj.lora_A.default") == (12, "self_attn.q_proj.lora_A.default")
    assert split_layer("transformer.h.0.attn.c_attn") == (0, "attn.c_attn")
    assert split_layer("blocks.7.attn.qkv") == (7, "attn.qkv")
    assert split_layer("classifier.dense") == (None, "classifier.dense")
    assert split_layer("model.layers.3") == (None, "model.layers.3")  # the block itself, no module inside


def test_parse_keys_bert_and_decoder() -> None:
    bert = "base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.weight"
    llama = "base_model.model.model.layers.12.self_attn.q_proj.lora_B.default.weight"
    assert adapter_weights.lora_key(bert) == ((3, "attention.self.query"), "A")
    assert adapter_weights.lora_key(llama) == ((12, "self_attn.q_proj"), "B")
    assert adapter_weights.lora_key("base_model.model.score.lora_A.default.weight") == ((-1, "score"), "A")
    assert adapter_weights.lora_key("base_model.model.classifier.weight") is None
    assert adapter_weights.base_key("bert.encoder.layer.3.attention.self.query.weight") == (
        3,
        "attention.self.query",
    )
    assert adapter_weights.base_key("encoder.layer.3.attention.self.query.weight") == (3, "attention.self.query")
    assert adapter_weights.base_key("classifier.weight") == (-1, "classifier")
    assert adapter_weights.base_key("classifier.bias") is None


def test_load_adapter_and_scaling(tmp_path: Path) -> None:
    ad = adapter_weights.load_adapter(write_adapter(tmp_path / "a", r=4, seed=0))
    assert sorted(ad.pairs) == [
        (0, "attention.self.query"),
        (0, "attention.self.value"),
        (1, "attention.self.query"),
        (1, "attention.self.value"),
    ]
    A, B = ad.pairs[(0, "attention.self.query")]
    assert A.shape == (4, 16) and B.shape == (16, 4) and A.dtype == np.float64
    assert ad.scaling() == pytest.approx(4.0)
    ad.config["use_rslora"] = True
    assert ad.scaling() == pytest.approx(8.0)


def test_similarity_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_adapter(tmp_path / "r2", r=2, seed=0)
    run = tmp_path / "run8"
    write_adapter(run / "adapter", r=8, seed=1)
    (run / "results.json").write_text(json.dumps({"status": "finished"}))
    out = tmp_path / "out"
    assert run_cli("similarity", str(a), str(run), "--module", "query", "--out", str(out)) == 0
    data = json.loads((out / "similarity.json").read_text())
    assert [(r["layer"], r["module"]) for r in data["results"]] == [
        (0, "attention.self.query"),
        (1, "attention.self.query"),
    ]
    for res in data["results"]:
        grid, rnd = np.array(res["grid"]), np.array(res["random_grid"])
        assert grid.shape == (2, 8) and rnd.shape == (2, 8)
        assert np.all((grid >= 0) & (grid <= 1))
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1 and mpimg.imread(pngs[0]).ndim == 3
    assert "phi(1,1)" in capsys.readouterr().out
    job = tmp_path / "sweep" / "0"
    link_job(job, run)  # a Hydra job folder links its run: it names the same adapter
    assert adapter_weights.adapter_dir(job).resolve() == (run / "adapter").resolve()
    assert run_cli("similarity", str(a), str(job), "--module", "query", "--out", str(tmp_path / "via_job")) == 0
    again = json.loads((tmp_path / "via_job" / "similarity.json").read_text())
    assert again["results"] == data["results"]


def test_amplification_cli(tmp_path: Path) -> None:
    write_base(tmp_path / "base")
    a = write_adapter(tmp_path / "ad", r=2, seed=3)  # base_model_name_or_path -> tmp_path/base
    out = tmp_path / "amp"
    assert run_cli("amplification", str(a), "--layer", "1", "--out", str(out)) == 0
    rows = json.loads((out / "amplification.json").read_text())["rows"]
    assert {(r["layer"], r["module"]) for r in rows} == {
        (1, "attention.self.query"),
        (1, "attention.self.value"),
    }
    assert all(r["amplification"] > 0 and r["include_scaling"] for r in rows)
    assert run_cli("amplification", str(a), "--r", "3", "--out", str(out)) == 2  # r > LoRA rank


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_bad_source_exit_2(tmp_path: Path, make: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    if make == "empty":
        bad.mkdir()
    elif make == "file":
        bad.write_text("x")
    good = write_adapter(tmp_path / "good", r=2, seed=0)
    assert run_cli("similarity", str(good), str(bad), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "B:" in err and str(bad) in err and "Traceback" not in err
    assert run_cli("amplification", str(bad)) == 2
    assert "RUN:" in capsys.readouterr().err


def test_run_without_adapter_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "full_run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"status": "finished", "method": "full"}))
    job = tmp_path / "job"
    link_job(job, run)
    for source in (run, job):
        assert run_cli("amplification", str(source), "--out", str(tmp_path / "o")) == 2
        err = capsys.readouterr().err
        assert "has no LoRA adapter" in err and "method=lora" in err and "Traceback" not in err

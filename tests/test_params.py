"""`loralab params`: exact LoRA parameter counts (the paper's figures), meta vs real counts, memory estimate checks."""
from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from loralab import cli
from loralab.config import ConfigError, compose
from loralab.run.estimate import estimate

QV = "lora.target_modules=[query,value]"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("overrides, lora_params", [
    (["model=roberta-base", "lora.r=8", QV], 294_912),          # the paper's 0.3M (Table 2)
    (["model=roberta-large", "lora.r=8", QV], 786_432),         # the paper's 0.8M
    (["model=llama-2-7b", "lora.r=8", "lora.target_modules=[q_proj,v_proj]"], 4_194_304),
    (["model=minilm", "lora.r=8", QV], 73_728),
])
def test_paper_lora_counts(offline, overrides, lora_params):
    est = estimate(compose(overrides))
    assert est["params"]["lora"] == lora_params
    assert est["adapter_bytes"]["lora_only_fp32"] == 4 * lora_params
    assert est["adapter_bytes"]["lora_only_bf16"] == 2 * lora_params


def test_llama7b_per_layer(offline):
    est = estimate(compose(["model=llama-7b", "lora.r=8", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]))
    per_layer = est["params"]["lora_per_layer"]
    assert len(per_layer) == 32 and set(per_layer.values()) == {262_144}
    assert est["params"]["base_total"] > 6.6e9  # 6.74B LLaMA-7B minus the LM head, plus the 2-class score


def test_gqa_and_all_linear(offline):
    """Mistral's k/v project to 8 KV heads x 128 = 1024, so r=8 on k costs 8*(4096+1024) per layer."""
    k = estimate(compose(["model=mistral-7b", "lora.r=8", "lora.target_modules=[k_proj]"]))
    assert k["params"]["lora"] == 32 * 8 * (4096 + 1024)
    every = estimate(compose(["model=tiny-qwen", "lora.r=4", "lora.target_modules=[all-linear]"]))
    assert every["params"]["adapted_modules"] == 2 * 7  # q k v o gate up down per layer; the score head excluded


def test_minilm_meta_count_equals_loaded_model(offline):
    """The meta-device estimate counts exactly what the real pretrained model + peft gives (head: classifier+pooler)."""
    from loralab.run.model import build_model, count_params
    from loralab.run.weights import load_tokenizer, resolve_model_path

    cfg = compose(["task=mrpc", QV])
    est = estimate(cfg)
    resolved = resolve_model_path(cfg.model.path)
    model = build_model(cfg, resolved, load_tokenizer(cfg.model, resolved))
    trainable, total = count_params(model)
    assert est["params"]["trainable"] == trainable == 222_338  # 73,728 LoRA + 770 classifier + 147,840 pooler
    assert est["params"]["total"] == total
    real_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert est["memory"]["weights"] == real_weights  # fp32, duplicated head copies included


def test_baseline_counts(offline):
    full = estimate(compose(["lora.method=full"]))
    head = estimate(compose(["lora.method=head"]))
    bitfit = estimate(compose(["lora.method=bitfit"]))
    assert full["params"]["trainable"] == full["params"]["total"] == full["params"]["base_total"]
    assert head["params"]["trainable"] == 147_840 + 770
    assert head["params"]["trainable"] < bitfit["params"]["trainable"] < 0.01 * full["params"]["total"]
    assert head["memory"]["activations"]["total"] == 0  # no gradient flows into the frozen encoder
    assert bitfit["memory"]["activations"]["total"] < full["memory"]["activations"]["total"]


def _saved_activation_bytes(model, batch, precision: str = "32-true") -> int:
    """Bytes of the tensors autograd keeps for backward in one forward pass (parameters excluded), under the autocast
    Lightning runs the forward in for `precision` (bf16-mixed: its 16-bit copies of the weights count)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    autocast = MixedPrecision(precision, "cpu").forward_context() if precision.endswith("-mixed") else nullcontext()
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("precision, overrides", [
    ("32-true", ["model=minilm", QV]),
    ("32-true", ["model=minilm", "lora.method=full"]),
    ("32-true", ["model=tiny-llama", "lora.target_modules=[q_proj,v_proj]"]),
    ("32-true", ["model=tiny-qwen", "lora.target_modules=[all-linear]", "lora.dropout=0"]),
    # bf16 autocast (what `auto` picks on a CPU with native bf16; emulated, hence slower, elsewhere): fp32 stream,
    # 16-bit matmul outputs, fp32 sdpa math path, and a bf16 copy of every weight a matmul reads.
    ("bf16-mixed", ["model=minilm", QV]),
    ("bf16-mixed", ["model=minilm", QV, "lora.dtype=bfloat16"]),
    ("bf16-mixed", ["model=minilm", "lora.method=full"]),
    ("bf16-mixed", ["model=tiny-qwen", "lora.target_modules=[all-linear]", "lora.dropout=0"]),
])
def test_activation_estimate_matches_autograd(offline, precision, overrides):
    """Pinned precision: the same numbers whether or not this CPU has native bf16."""
    from loralab.run.model import build_model
    from loralab.run.weights import load_tokenizer, resolve_model_path

    b, s = 4, 64
    cfg = compose(["task=mrpc", f"trainer.precision={precision}", f"data.batch_size={b}", f"data.max_length={s}",
                   *overrides])
    resolved = resolve_model_path(cfg.model.path)
    model = build_model(cfg, resolved, load_tokenizer(cfg.model, resolved))
    batch = {"input_ids": torch.randint(1000, 5000, (b, s)), "attention_mask": torch.ones(b, s, dtype=torch.long)}
    real = _saved_activation_bytes(model, batch, precision)
    acts = estimate(cfg)["memory"]["activations"]
    assert acts["precision"] == precision and acts["autocast"] is precision.endswith("-mixed")
    assert 0.85 < acts["total"] / real < 1.15, (acts["total"], real)


def test_quantized_and_8bit_optimizer_bytes(offline):
    fp32 = estimate(compose([QV]))["memory"]
    nf4 = estimate(compose([QV, "quant=nf4"]))["memory"]
    int8 = estimate(compose([QV, "quant=int8", "optim.name=adamw8bit"]))["memory"]
    assert nf4["weights_mode"] == "nf4" and nf4["weights"] == nf4["weights_by_mode"]["nf4"]
    # MiniLM: 10.6M quantizable linear weights, 12.1M embeddings/norms/head that stay fp32 (FACTS.md: 86.7/55.9/50.7 MB)
    assert fp32["weights"] / 2**20 == pytest.approx(87.5, abs=0.1)
    assert int8["weights"] / 2**20 == pytest.approx(57.2, abs=0.1)
    assert nf4["weights"] / 2**20 == pytest.approx(52.2, abs=0.1)
    # bitsandbytes keeps fp32 states below 4096 elements: every MiniLM LoRA matrix (8 x 384 = 3072) and the classifier;
    # only the 384 x 384 pooler weight gets uint8 states (+ one fp32 absmax per 256 values per state).
    assert int8["optimizer"] == 8 * (73_728 + 770 + 384) + 2 * 147_456 + 2 * 4 * 147_456 // 256
    assert fp32["optimizer"] == 2 * fp32["gradients"]  # AdamW: two fp32 states per trainable parameter


def test_eight_bit_optimizer_estimate_matches_bitsandbytes(offline):
    pytest.importorskip("bitsandbytes")
    from loralab.run.model import build_model
    from loralab.run.weights import load_tokenizer, resolve_model_path
    from loralab.run.optim import build_optimizer

    cfg = compose(["lora.method=full", "optim.name=adamw8bit"])
    resolved = resolve_model_path(cfg.model.path)
    model = build_model(cfg, resolved, load_tokenizer(cfg.model, resolved))
    opt = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)}
    real = sum(storages.values())
    est = estimate(cfg)["memory"]["optimizer"]
    assert est == pytest.approx(real, rel=0.01)


def test_cli_table_and_json(offline, capsys):
    assert cli.main(["params", "model=roberta-base", QV]) == 0
    table = capsys.readouterr().out
    assert "294,912" in table and "activations" in table and "<- this config" in table
    assert cli.main(["params", "--json", "model=roberta-large", QV, "quant=nf4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["lora"] == 786_432 and data["memory"]["weights_mode"] == "nf4"
    assert data["memory"]["total"] == sum(data["memory"][k] if k != "activations" else data["memory"][k]["total"]
                                          for k in ("weights", "gradients", "optimizer", "activations"))


def test_cli_bad_target_names_the_field(offline, capsys):
    assert cli.main(["params", "model=llama-2-7b", "lora.target_modules=[query]"]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules" in err and "q_proj" in err
    with pytest.raises(ConfigError, match="layers_to_transform"):
        estimate(compose(["lora.layers_to_transform=[0,6]"]))

"""LoRA variants and baselines as config fields, each checked on the real MiniLM with a few steps on real MRPC data;
and `loralab merge`: merged and unmerged models agree on a real batch."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from loralab.config import compose
from loralab.run.data import GlueDataModule
from loralab.run.model import build_model, save_trained
from loralab.run.weights import load_tokenizer, resolve_model_path
from loralab.run.optim import build_optimizer

pytestmark = pytest.mark.skipif(not os.environ.get("GLUE_DIR") and not Path("/work/shared/glue").is_dir(),
                                reason="needs the local GLUE mirror (GLUE_DIR)")
GLUE = os.environ["GLUE_DIR"]
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Three real MRPC training batches of 8, tokenized by the MiniLM tokenizer."""
    cfg = compose(["task=mrpc", f"data.dir={GLUE}", "data.train_limit=64", "data.batch_size=8",
                   f"data.cache_dir={tmp_path_factory.mktemp('tok')}"])
    resolved = resolve_model_path(cfg.model.path)
    dm = GlueDataModule(cfg.task, cfg.data, load_tokenizer(cfg.model, resolved), cfg.seed)
    dm.setup()
    loader = iter(dm.train_dataloader())
    return [next(loader) for _ in range(STEPS)]


def inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def build(*overrides: str):
    cfg = compose(["task=mrpc", "optim.lr=1e-3", *overrides])
    resolved = resolve_model_path(cfg.model.path)
    return cfg, build_model(cfg, resolved, load_tokenizer(cfg.model, resolved))


def train(cfg, model, batches) -> dict[str, torch.Tensor]:
    """A few real AdamW steps; returns every parameter's value from before them."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg)
    model.train()
    for batch in batches:
        loss = torch.nn.functional.cross_entropy(model(**inputs(batch)).logits, batch["labels"])
        assert math.isfinite(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return before


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def test_rslora_scaling(batches):
    _, plain = build("lora.r=16", "lora.alpha=16")
    cfg, rs = build("lora=rslora", "lora.r=16", "lora.alpha=16")
    assert {m.scaling["default"] for m in lora_layers(plain)} == {1.0}         # alpha / r
    assert {m.scaling["default"] for m in lora_layers(rs)} == {16 / math.sqrt(16)}  # alpha / sqrt(r)
    before = train(cfg, rs, batches[:1])
    assert any("lora_B" in n for n in changed(rs, before))


def test_dora_magnitudes_train(batches):
    cfg, model = build("lora=dora")
    mags = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(mags) == 12 and all(p.requires_grad and p.shape == (384,) for p in mags.values())
    q = lora_layers(model)[0]
    assert torch.allclose(q.lora_magnitude_vector["default"].weight, q.base_layer.weight.norm(dim=1), atol=1e-5)
    before = train(cfg, model, batches)
    assert set(mags) <= changed(model, before)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_rewrite_the_base(batches, tmp_path, init):
    _, default = build()
    cfg, model = build(f"lora.init={init}")
    d, m = lora_layers(default)[0], lora_layers(model)[0]
    assert not torch.allclose(m.base_layer.weight, d.base_layer.weight)  # the base now holds the residual
    assert not torch.allclose(m.lora_A["default"].weight, d.lora_A["default"].weight)
    assert m.lora_B["default"].weight.abs().sum() > 0  # unlike default init, B starts non-zero...
    rebuilt = m.base_layer.weight + m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
    assert torch.allclose(rebuilt, d.base_layer.weight, atol=1e-4)  # ...and residual + BA is W0 exactly
    train(cfg, model, batches)
    # Saved as a plain rank-2r LoRA against the untouched base: it reloads on the original weights exactly.
    save_trained(model, cfg, tmp_path / "adapter")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["r"] == 16 and conf["init_lora_weights"] is True
    from transformers import AutoModelForSequenceClassification

    from loralab.adapters.merge import merge_adapter

    merged = tmp_path / "merged"
    merge_adapter(tmp_path / "adapter", merged, task="mrpc")
    standalone = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    model.eval()
    with torch.no_grad():
        x = inputs(batches[0])
        assert torch.allclose(model(**x).logits, standalone(**x).logits, atol=1e-4)


def test_loraplus_b_learns_ratio_times_faster(batches):
    cfg, model = build("lora=loraplus", "lora.lr_ratio=8", "optim.weight_decay=0.01")
    opt = build_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    a = [p for n, p in named.items() if "lora_A" in n]
    b = [p for n, p in named.items() if "lora_B" in n]
    assert {lr_of[id(p)] for p in a} == {1e-3}
    assert {lr_of[id(p)] for p in b} == {8e-3}
    assert {wd_of[id(p)] for p in a + b} == {0.01}  # optim.weight_decay reaches peft's LoRA+ groups
    before = train(cfg, model, batches)
    assert any("lora_B" in n for n in changed(model, before))


def test_rank_pattern(batches):
    cfg = compose(["task=mrpc"])
    cfg.lora.rank_pattern = {"encoder.layer.0.attention.self.query": 2, "layer.5.attention.self.value": 4}
    resolved = resolve_model_path(cfg.model.path)
    model = build_model(cfg, resolved, load_tokenizer(cfg.model, resolved))
    ranks = {n: m.r["default"] for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert ranks.pop("base_model.model.bert.encoder.layer.0.attention.self.query") == 2
    assert ranks.pop("base_model.model.bert.encoder.layer.5.attention.self.value") == 4
    assert set(ranks.values()) == {8} and len(ranks) == 10
    before = train(cfg, model, batches[:1])
    assert any("layer.0.attention.self.query.lora_B" in n for n in changed(model, before))


def test_layers_to_transform(batches):
    cfg, model = build("lora.layers_to_transform=[0,5]")
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert {n.split(".layer.")[1].split(".")[0] for n in adapted} == {"0", "5"} and len(adapted) == 4
    before = train(cfg, model, batches)
    lora_changed = {n for n in changed(model, before) if "lora_" in n}
    assert lora_changed and all(".layer.0." in n or ".layer.5." in n for n in lora_changed)


def test_full_finetuning(batches):
    cfg, model = build("lora=full", "optim.lr=1e-4")
    assert all(p.requires_grad for p in model.parameters())
    before = train(cfg, model, batches)
    moved = changed(model, before)
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved
    assert "bert.embeddings.word_embeddings.weight" in moved
    assert "classifier.weight" in moved


def test_head_only(batches):
    cfg, model = build("lora=head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    before = train(cfg, model, batches)
    assert changed(model, before) == trainable  # the encoder and embeddings stay exactly as loaded


def test_head_without_pooler_keeps_pooler_frozen(batches):
    cfg, model = build("lora=head", "model.head_modules=[classifier]")
    before = train(cfg, model, batches)
    assert changed(model, before) == {"classifier.weight", "classifier.bias"}


def test_bitfit(batches):
    cfg, model = build("lora=bitfit")
    before = train(cfg, model, batches)
    moved = changed(model, before)
    assert "bert.encoder.layer.0.attention.self.query.bias" in moved and "classifier.weight" in moved
    assert all(n.endswith(".bias") or n.startswith(("classifier.", "bert.pooler.")) for n in moved)
    assert "bert.encoder.layer.0.attention.self.query.weight" not in moved


def test_merge_matches_unmerged(batches, tmp_path, capsys):
    """`loralab merge`: the merged standalone model gives the adapter model's logits on a real batch."""
    from transformers import AutoModelForSequenceClassification

    from loralab import cli

    cfg, model = build("lora.target_modules=[query,key,value,dense]")
    train(cfg, model, batches)
    assert any(m.lora_B["default"].weight.abs().sum() > 0 for m in lora_layers(model))
    save_trained(model, cfg, tmp_path / "adapter")
    parser = cli.build_parser()
    args = parser.parse_args(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--task", "mrpc"])
    assert args.func(args) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    model.eval()
    with torch.no_grad():
        for batch in batches:
            x = inputs(batch)
            assert torch.allclose(model(**x).logits, merged(**x).logits, atol=1e-4)


@pytest.fixture(scope="module")
def random_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("random-models"))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
def test_tiny_decoders_pad_with_eos_and_train(monkeypatch, random_cache, arch):
    """Random-init decoders (`random:<arch>`): no pad token, so eos pads and the score head reads the last real token."""
    monkeypatch.setenv("LORALAB_CACHE", random_cache)
    cfg, model = build(f"model={arch}", "lora.target_modules=[q_proj,v_proj]")
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))
    enc = tok("The company said profits rose.", "Profits increased.")
    assert tok.pad_token == tok.eos_token == "[SEP]" and "token_type_ids" not in enc
    assert enc["input_ids"][:3] == [101, 1996, 2194]  # word pieces of the embedded vocabulary, not characters
    assert model.config.pad_token_id == tok.eos_token_id == 102
    texts = ["Shares rose.", "The weather was sunny and warm all week."]
    padded = tok(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():  # right padding must not change a sequence's logits
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
        assert torch.allclose(model(**padded).logits[:1], alone, atol=1e-5)
    batch = {**tok(texts, padding=True, return_tensors="pt"), "labels": torch.tensor([0, 1])}
    before = train(cfg, model, [batch, batch])
    assert any("lora_B" in n for n in changed(model, before))

"""Memory levers (issue 11): gradient checkpointing, 8-bit (paged) AdamW, bf16 LoRA weights, micro-batches at a fixed
effective batch. Each changes what it should, trains on real MiniLM + real SST-2, is counted by `loralab params`, and
impossible combinations stop before anything loads."""
from __future__ import annotations

import math
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Compose, needs_glue
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import loralab.run.optim
import loralab.run.train
from loralab.lightning.checkpoint_io import load_checkpoint_file
from loralab.config import ConfigError, compose
from loralab.run.data import LengthGroupedBatches
from loralab.run.model import build_model
from loralab.run.weights import load_tokenizer, resolve_model_path
from loralab.run.estimate import estimate
from loralab.store import read_results, run_dir
from loralab.sweep.summary import write_summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Tensor memory created inside the mode and still alive (`now`) and its maximum (`peak`), over forward and
    backward: every op's output storage is counted until it is freed. Exact where RSS is noise (allocator slack, other
    jobs); the storages of `modules`' parameters and buffers (views of them included) are not counted."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
        self.live: dict[int, int] = {}
        self.refs: list[weakref.ref] = []
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in self.existing:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.refs.append(weakref.ref(storage, lambda _, k=key: self._free(k)))
        self.peak = max(self.peak, self.now)
        return out


def real_model(cfg):
    resolved = resolve_model_path(cfg.model.path)
    torch.manual_seed(0)
    model = build_model(cfg, resolved, load_tokenizer(cfg.model, resolved))
    model.train()
    return model


def checkpointed_layers(model: nn.Module) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())


# --- presets and refusals (no loading) --------------------------------------------------------------------------

def test_presets_set_their_levers() -> None:
    expect = {"default": (False, "adamw", "float32", 1), "checkpointing": (True, "adamw", "float32", 1),
              "adamw8bit": (False, "adamw8bit", "float32", 1), "paged_adamw8bit": (False, "paged_adamw8bit", "float32", 1),
              "lora_bf16": (False, "adamw", "bfloat16", 1), "micro_batch": (False, "adamw", "float32", 4),
              "all": (True, "adamw8bit", "bfloat16", 4)}
    for preset, levers in expect.items():
        cfg = compose([f"memory={preset}"])
        assert (cfg.memory.gradient_checkpointing, cfg.optim.name, cfg.lora.dtype, cfg.data.grad_accum) == levers
        assert cfg.trainer["accumulate_grad_batches"] == cfg.data.grad_accum  # wired to Lightning
        assert cfg.data.batch_size == 32  # the effective batch never moves
    # Fields override a preset like any other value.
    assert compose(["memory=all", "memory.gradient_checkpointing=false"]).memory.gradient_checkpointing is False


@pytest.mark.parametrize("overrides,named", [
    (["data.grad_accum=3"], "data.grad_accum=3"),              # 32 is not 3 equal micro-batches
    (["data.batch_size=8", "data.grad_accum=16"], "data.grad_accum=16"),
    (["lora.method=head", "memory.gradient_checkpointing=true"], "memory.gradient_checkpointing"),
    (["lora.method=full", "lora.dtype=bfloat16"], "lora.dtype='bfloat16'"),
    (["lora.dtype=float16"], "lora.dtype='float16'"),
    (["trainer.accumulate_grad_batches=4"], "trainer.accumulate_grad_batches=4"),  # would bypass the micro-batching
])
def test_impossible_combinations_fail_in_validation(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match="invalid: ") as info:
        compose(overrides)
    assert named in str(info.value)


def test_bitsandbytes_levers_need_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    for overrides, named in ((["optim.name=adamw8bit"], "optim.name='adamw8bit'"),
                             (["memory=paged_adamw8bit"], "optim.name='paged_adamw8bit'"),
                             (["quant=nf4"], "quant.mode='nf4'")):
        with pytest.raises(ConfigError, match="bitsandbytes") as info:
            compose(overrides)
        assert named in str(info.value) and "pip install" in str(info.value)


def test_checkpointing_on_a_model_without_support_stops_before_loading(compose_cfg: Compose, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked on the meta skeleton in preflight (the architecture's `supports_gradient_checkpointing`)."""
    real_skeleton = loralab.run.preflight.skeleton

    def unsupported(*args, **kwargs):
        model = real_skeleton(*args, **kwargs)
        model.supports_gradient_checkpointing = False
        return model

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad combination was reported")

    monkeypatch.setattr(loralab.run.preflight, "skeleton", unsupported)  # preflight builds the skeleton
    monkeypatch.setattr(loralab.run.train, "build_model", no_loading)
    cfg = compose_cfg(["memory=checkpointing"], root=tmp_path)
    with pytest.raises(ConfigError, match="memory.gradient_checkpointing=true: minilm .* does not support"):
        loralab.run.train.run(cfg)
    assert not list(tmp_path.rglob("*.safetensors"))


# --- each lever does what it says ----------------------------------------------------------------------------

def test_micro_batches_partition_each_effective_batch() -> None:
    """grad_accum=4 yields each batch of 32 as 4 consecutive micro-batches of 8: an optimizer step sees exactly the
    examples it sees without accumulation; a last partial batch too small to split is dropped, on every rank alike."""
    lengths = np.random.default_rng(0).integers(5, 60, size=203)
    whole = list(LengthGroupedBatches(lengths, 32, seed=0))
    micro = list(LengthGroupedBatches(lengths, 32, seed=0, accum=4))
    assert len(micro) == len(LengthGroupedBatches(lengths, 32, seed=0, accum=4)) == 4 * len(whole)
    assert [sum(micro[i:i + 4], []) for i in range(0, len(micro), 4)] == whole
    assert {len(b) for b in micro[:-4]} == {8}
    tiny_tail = LengthGroupedBatches(np.ones(66, int), 32, seed=0, accum=4)  # 32 + 32 + 2: the 2 cannot make 4
    assert len(list(tiny_tail)) == len(tiny_tail) == 8
    ranks = [LengthGroupedBatches(lengths, 32, seed=0, rank=r, world=2, accum=4) for r in (0, 1)]
    assert len(list(ranks[0])) == len(list(ranks[1])) == len(ranks[0])


def test_checkpointing_lowers_activation_memory_same_gradients(compose_cfg: Compose) -> None:
    """A long batch (4 x 256 tokens): the live-tensor peak of forward + backward drops by more than half with
    checkpointing, the LoRA gradients stay the same, and `loralab params` predicts both peaks. fp32 pinned: `auto`
    would estimate bf16 autocast on a CPU with native bf16 (test_estimate_follows_bf16_autocast covers that)."""
    b, s = 4, 256
    results: dict[bool, dict[str, Any]] = {}
    batch = {"input_ids": torch.randint(1000, 5000, (b, s), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(b, s, dtype=torch.long)}
    for ckpt in (False, True):
        cfg = compose_cfg([f"data.batch_size={b}", f"data.max_length={s}", f"memory.gradient_checkpointing={ckpt}",
                           "trainer.precision=32-true"])
        assert estimate(cfg)["memory"]["activations"]["precision"] == "32-true"
        model = real_model(cfg)
        assert checkpointed_layers(model) == (6 if ckpt else 0)
        torch.manual_seed(1)  # the same dropout draws (non-reentrant checkpointing replays the RNG state)
        with LiveTensorBytes(model) as tracker:
            model(**batch).logits.float().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
        results[ckpt] = {"peak": tracker.peak, "grads": grads,
                         "estimate": estimate(cfg)["memory"]["activations"]["kept"]}
    plain, ckpt = results[False], results[True]
    assert ckpt["peak"] < 0.5 * plain["peak"], (ckpt["peak"] / MB, plain["peak"] / MB)
    for name, g in plain["grads"].items():
        assert torch.allclose(g, ckpt["grads"][name], rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in ckpt["grads"].values())
    for r in (plain, ckpt):  # the estimate (activations kept) is within 20% of the measured peak
        assert 0.8 < r["estimate"] / r["peak"] < 1.2, (r["estimate"] / MB, r["peak"] / MB)


def test_estimate_follows_bf16_autocast(compose_cfg: Compose) -> None:
    """trainer.precision=bf16-mixed (what `auto` picks on a CPU with native bf16), forced whatever this CPU has: the
    forward runs in Lightning's own autocast context, and the estimate, which counts the fp32 residual stream, the
    fp32 sdpa math path and autocast's bf16 copies of every weight a matmul reads, predicts the live-tensor peak with
    and without checkpointing as closely as in fp32. Small (2 x 128) so that emulated bf16 stays quick."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    b, s = 2, 128
    batch = {"input_ids": torch.randint(1000, 5000, (b, s), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(b, s, dtype=torch.long)}
    for ckpt in (False, True):
        cfg = compose_cfg([f"data.batch_size={b}", f"data.max_length={s}", f"memory.gradient_checkpointing={ckpt}",
                           "trainer.precision=bf16-mixed"])
        acts = estimate(cfg)["memory"]["activations"]
        assert acts["precision"] == "bf16-mixed" and acts["autocast"] and acts["weight_copies"] > 0
        model = real_model(cfg)
        torch.manual_seed(1)
        with LiveTensorBytes(model) as tracker:
            with MixedPrecision("bf16-mixed", "cpu").forward_context():
                logits = model(**batch).logits
            assert logits.dtype == torch.bfloat16  # autocast really ran the matmuls in bf16
            logits.float().sum().backward()
        assert 0.8 < acts["kept"] / tracker.peak < 1.2, (ckpt, acts["kept"] / MB, tracker.peak / MB)


def test_eight_bit_optimizers_keep_uint8_states_paged_falls_back_on_cpu() -> None:
    pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(384, 384), nn.Linear(8, 2))  # 147,456 weights get 8-bit states; 16 do not
    for name in ("adamw8bit", "paged_adamw8bit"):
        cfg = compose([f"optim.name={name}", "lora.method=full"])
        paged = name.startswith("paged")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = loralab.run.optim.build_optimizer(model, cfg)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        messages = " ".join(str(w.message) for w in caught)
        assert ("Paged optimizers are not supported on CPU" in messages) is paged  # bitsandbytes' own fallback
        assert ("paged optimizers need CUDA" in messages) is paged  # and loralab's, naming the field
        assert type(opt).__name__ == ("PagedAdamW8bit" if paged else "AdamW8bit")
        big, small = opt.state[model[0].weight], opt.state[model[1].weight]
        assert big["state1"].dtype == big["state2"].dtype == torch.uint8
        assert small["state1"].dtype == torch.float32  # bitsandbytes keeps fp32 states below 4096 values


def test_estimate_follows_the_levers() -> None:
    fp32 = "trainer.precision=32-true"  # pinned: `auto` is bf16 autocast on a CPU with native bf16
    base = estimate(compose([fp32]))["memory"]
    accum = estimate(compose([fp32, "data.grad_accum=4"]))["memory"]
    ckpt = estimate(compose([fp32, "memory=checkpointing"]))["memory"]
    bf16 = estimate(compose([fp32, "memory=lora_bf16"]))["memory"]
    eight = estimate(compose([fp32, "memory=adamw8bit"]))["memory"]
    assert accum["activations"]["batch_size"] == 8 and base["activations"]["batch_size"] == 32
    assert accum["activations"]["kept"] == pytest.approx(base["activations"]["kept"] / 4, rel=0.01)
    assert ckpt["activations"]["kept"] == base["activations"]["checkpointed"] < base["activations"]["total"] / 3
    assert ckpt["total"] == base["total_checkpointed"]
    lora = 73_728
    assert base["gradients"] - bf16["gradients"] == 2 * lora  # LoRA grads 4 -> 2 bytes
    assert base["optimizer"] - bf16["optimizer"] == 4 * lora  # AdamW states follow the parameter dtype
    assert base["weights"] - bf16["weights"] == 2 * lora
    assert eight["optimizer"] < base["optimizer"]


# --- every lever at once, on real data ---------------------------------------------------------------------------

@needs_glue("sst2")
def test_all_levers_train_on_real_sst2(compose_cfg: Compose, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """memory=all (checkpointing + 8-bit AdamW + bf16 LoRA + 4 micro-batches): 64 examples at effective batch 16 are
    4 optimizer steps of 4 micro-batches of 4; LoRA stays bf16 and moves, optimizer states are uint8, the checkpoint
    round-trips them, and results.json / summary.csv put the measured memory beside the estimate."""
    pytest.importorskip("bitsandbytes")
    built: dict[str, Any] = {}
    real_build, real_save = loralab.run.optim.build_optimizer, loralab.run.train.save_trained

    def capture_optimizer(model, cfg):
        built["optimizer"] = real_build(model, cfg)
        built["initial"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        return built["optimizer"]

    def capture_model(model, cfg, out):
        built["model"] = model
        return real_save(model, cfg, out)

    monkeypatch.setattr(loralab.run.optim, "build_optimizer", capture_optimizer)
    monkeypatch.setattr(loralab.run.train, "save_trained", capture_model)
    cfg = compose_cfg(["memory=all", "task=sst2", "data.train_limit=64", "data.val_limit=64", "data.batch_size=16",
                       "trainer.max_epochs=1", "optim.lr=1e-3", "trainer.log_every_n_steps=1",
                       "trainer.precision=32-true"], root=tmp_path / "runs")  # the same run on any CPU
    value = loralab.run.train.run(cfg)
    r = read_results(run_dir(cfg))
    assert r is not None and r["status"] == "finished" and 0 <= value <= 1

    # Micro-batches at a fixed effective batch: samples / effective batch optimizer steps.
    assert r["global_steps"] == 64 // 16 and r["train_samples"] == 64
    assert r["memory_estimate_seen"]["micro_batch"] == 4
    # bf16 LoRA weights, trained; heads stay fp32.
    model = built["model"]
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.bfloat16 for p in lora.values())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert any(not torch.equal(p, built["initial"][n]) for n, p in lora.items() if "lora_B" in n)
    # Every step's loss was finite (log_every_n_steps=1: the module's guard checks each step), and so is the output.
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(1000, 5000, (2, 12)), attention_mask=torch.ones(2, 12, dtype=torch.long))
    assert all(math.isfinite(x) for x in logits.logits.float().flatten().tolist())
    # Checkpointing was on in the trained model.
    assert checkpointed_layers(model) == 6
    # 8-bit states: uint8 for the 384 x 384 pooler weight (>= 4096 values), fp32 for the small LoRA matrices.
    opt = built["optimizer"]
    pooler = next(p for n, p in model.named_parameters() if "pooler" in n and n.endswith("weight") and p.requires_grad)
    assert opt.state[pooler]["state1"].dtype == torch.uint8 and opt.state[pooler]["state2"].dtype == torch.uint8
    a = next(p for n, p in lora.items() if "lora_A" in n)
    assert opt.state[a]["state1"].dtype == torch.float32
    # The resume checkpoint holds those states and loads back into a fresh 8-bit optimizer.
    ckpt = load_checkpoint_file(run_dir(cfg) / "checkpoints" / "last.safetensors")
    fresh = real_build(model, cfg)
    fresh.load_state_dict(ckpt["optimizer_states"][0])
    assert fresh.state[pooler]["state1"].dtype == torch.uint8
    assert torch.equal(fresh.state[pooler]["state1"], opt.state[pooler]["state1"])

    # Memory: the estimate recorded at start and at the largest batch seen, beside what was measured.
    est = r["memory_estimate"]
    assert est["gradient_checkpointing"] is True and est["optimizer_name"] == "adamw8bit" and est["micro_batch"] == 4
    assert r["estimated_peak_memory_mb"] == est["total_mb"] > est["weights_mb"] > 80  # fp32 MiniLM: 87.4 MB
    assert r["estimated_seen_memory_mb"] <= r["estimated_peak_memory_mb"]
    assert r["measured_memory_mb"] > 0 and r["train_peak_memory_mb"] <= r["peak_memory_mb"]
    assert r["memory_baseline_mb"] + r["measured_memory_mb"] == pytest.approx(r["train_peak_memory_mb"], abs=0.2)
    row, = write_summary(tmp_path / "runs")
    assert row["measured_memory_mb"] == r["measured_memory_mb"]
    assert row["estimated_seen_memory_mb"] == r["estimated_seen_memory_mb"]
    assert row["memory_estimate.activations_mb"] == est["activations_mb"]
    assert row["train_samples_per_s"] > 0 and row["main_value"] == value

"""Exact parameter counts, adapter size and a training-memory estimate, from dimensions alone (`loralab params`).

The model is built on the meta device from loralab/model_configs/<arch>.json (no weights, no network) and the adapter
is applied there by peft itself, so the counts are peft's own. Memory estimate, in bytes:

- weights: every parameter in fp32 (4 B; loralab loads fp32), or frozen base weights in bf16 (2 B, trainable ones
  stay fp32), or bitsandbytes int8 (1 B per weight + one fp32 scale per output row) or nf4/fp4 (0.5 B per weight +
  one fp32 absmax per 64 weights; with double quantization one uint8 absmax per 64 and one fp32 per 256 blocks).
  Only the linear layers of the base are quantized: embeddings, norms, biases and head modules stay fp32.
  LoRA weights take lora.dtype (4 B, or 2 B in bfloat16); head modules stay fp32.
- gradients: one per trainable parameter, in its dtype (4 B; 2 B for bf16 LoRA weights).
- optimizer: AdamW 2 states in the parameter's dtype = 8 B per fp32 trainable parameter (4 B per bf16 one);
  bitsandbytes 8-bit AdamW (and its paged variant) 2 uint8 states + one fp32 absmax per 256 values per state, for
  tensors of >= 4096 elements (smaller ones keep fp32 states, whatever the parameter's dtype).
- activations (what autograd saves in one forward pass), per layer, after Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models", sec. 4.1), generalized to GQA, gated MLPs, fused attention
  and frozen weights. b = batch, s = data.max_length (an upper bound: batches are padded dynamically), h = hidden,
  i = intermediate, a = heads, d_q = a * head_dim, d_kv = kv_heads * head_dim, e = bytes per activation
  (4 in fp32, 2 under bf16/fp16), f = bytes of the residual stream (e; 4 under autocast, see below), m = bytes per
  dropout mask (1 on GPU; on CPU torch keeps masks as floats of the dropout input's dtype, e).
  b is the micro-batch, data.batch_size / data.grad_accum (gradient accumulation runs one micro-batch at a time):
    2sbh f                       inputs of the two norms (full fine-tuning of RMSNorm models: 4sbh f)
    sb(d_q + 2 d_kv) e           Q, K, V kept by the attention kernel
    fused attention: sb d_q e    its output (flash / memory-efficient sdpa: no s^2 scores)
    else: a s^2 b (2e + m)       softmax output, attention-dropout mask and output (a s^2 b e without dropout)
    2sbh m                       the two hidden-dropout masks (when hidden dropout > 0)
    sbi e  (gated MLP: 3 sbi e)  activation-function inputs (SwiGLU: gate, up and act outputs)
  plus the inputs of the projection groups, which autograd keeps only when something needs them: the input of q/k/v
  (sbh), of the output projection (sb d_q; kept anyway by fused attention), of the up/gate projection (sbh) and of the
  down projection (sbi). Full fine-tuning keeps all four; LoRA keeps a group's input when one of its modules is adapted
  (lora dropout 0) or, with lora dropout, one dropped-out copy (e) and mask (m) per adapted module; plus each adapter's
  s b r e intermediate. Plus 2sbh f for the embeddings. bf16 LoRA weights under fp32 training (lora.dtype=bfloat16):
  peft casts the LoRA input to bf16, so the LoRA branch keeps its tensors at 2 B (and, with lora dropout 0, its own
  bf16 copy of the input per adapted module). BitFit keeps none (bias gradients need no inputs); head-only training
  keeps no layer activations. bitsandbytes int8 layers keep their input as an attribute of their autograd node
  (`ctx.A`), so under int8 every group input is kept, as in full fine-tuning. Gradient checkpointing
  (memory.gradient_checkpointing) keeps each layer's input (sbh f; under int8 also the o, up and down inputs) plus, at
  the backward peak, one layer's recomputed activations and its gradients (CHECKPOINT_BACKWARD = 1.4 layers).
  Autocast (precision bf16-mixed / 16-mixed, resolved as the run resolves `auto`: what it picks on a CPU with native
  bf16 or a GPU) keeps weights fp32 and runs matmuls in 16 bit, so it halves less than it seems (MiniLM + LoRA,
  4 x 256 on CPU: 340 MB kept vs 360 MB in fp32). Matmul outputs and what follows them are 16-bit (e = 2: MLP
  activations, hidden-dropout masks, attention output, the LoRA branch), but a 16-bit output plus an fp32 residual is
  fp32, so the stream and the inputs of norms, q/k/v and up/gate stay fp32 (f = 4); each module casts such an fp32
  input itself (full fine-tuning keeps one 16-bit copy per module; LoRA dropout masks the fp32 input, then the copy
  is cast). sdpa's math path (CPU with attention dropout) computes 16-bit inputs in fp32: its Q, K, V, scores and
  masks take 4 B. And autograd keeps the 16-bit copy of every fp32 weight a matmul reads (frozen ones too: their
  input's gradient needs them), 2 B per linear, LoRA and head weight (not for bitsandbytes-quantized layers); under
  full fine-tuning autocast's cache holds them all until the forward ends, a floor for the checkpointed peak.
  Checked against tensors autograd really saves for MiniLM, tiny Llama and tiny Qwen in fp32 and under bf16 autocast,
  and checkpointing against the live tensor peak (tests/test_params.py, tests/test_memory_levers.py).

Not counted: the runtime itself (Python, torch and the other libraries, the tokenizer and data; several hundred MB of
process memory on a CPU), autograd's temporaries in backward, and allocator slack. A run records this estimate
beside what it measured (results.json: `memory_estimate`, `estimated_peak_memory_mb`, `measured_memory_mb`).
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..lightning.precision import resolve_precision
from .model import _is_head, cast_adapter, count_params, mark_trainable, peft_config
from .names import split_layer
from .preflight import check_modules
from .weights import skeleton

QUANT_MODES = ("fp32", "bf16", "int8", "nf4")
BNB_4BIT_BLOCK = 64       # bitsandbytes 4-bit blocksize (weights per absmax)
BNB_NESTED_BLOCK = 256    # double quantization: absmax values per second-level fp32 absmax
BNB_OPTIM_BLOCK = 256     # bitsandbytes 8-bit optimizer state blocksize
BNB_OPTIM_MIN_SIZE = 4096  # bitsandbytes keeps fp32 states for tensors smaller than this
# Checkpointed backward: the recomputed layer's activations plus the gradients flowing through it. The live-tensor
# peak measured 1.1-1.45x one layer's activations (LoRA on MiniLM at several batch/length shapes, tiny Llama, tiny Qwen).
CHECKPOINT_BACKWARD = 1.4
ROLES = (("qkv", re.compile(r"(query|key|value|[qkv]_proj|query_proj|key_proj|value_proj|qkv_proj|in_proj)$")),
         ("o", re.compile(r"(attention\.output\.dense|o_proj|out_proj)$")),
         ("up", re.compile(r"(intermediate\.dense|up_proj|gate_proj|fc1)$")),
         ("down", re.compile(r"(output\.dense|down_proj|fc2)$")))


def meta_model(cfg: Config) -> tuple[nn.Module, nn.Module, int]:
    """(trainable model, its base classifier, the base's parameter count) on the meta device: the peft model for
    LoRA, else the baseline's requires_grad masking."""
    base = skeleton(cfg.model, cfg.task.num_labels)
    check_modules(cfg, base)
    base_total = sum(p.numel() for p in base.parameters())
    if cfg.lora.method != "lora":
        return mark_trainable(base, cfg.lora.method, list(cfg.model.head_modules)), base, base_total
    from peft import get_peft_model

    # Initializations only change values, except MiCA, which freezes B; the decompositions are skipped on meta anyway.
    lora = cfg.lora if cfg.lora.init == "mica" else replace(cfg.lora, init="default")
    with torch.device("meta"):
        model = get_peft_model(base, peft_config(replace(cfg, lora=lora)))
    cast_adapter(model, cfg.lora.dtype)
    return model, model.get_base_model(), base_total


def _role(name: str) -> str:
    return next((role for role, pattern in ROLES if pattern.search(name)), "other")


def adapted_modules(model: nn.Module) -> list[dict[str, Any]]:
    """Every LoRA-adapted module: name, layer, role, in/out features and rank."""
    out = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
            a = lora_a["default"]
            out.append({"name": name, "layer": split_layer(name)[0], "role": _role(name),
                        "in": a.in_features, "out": module.lora_B["default"].out_features, "r": a.out_features})
    return out


def lora_param_counts(model: nn.Module) -> tuple[int, dict[int, int]]:
    """LoRA-only parameters (A, B, DoRA magnitudes): total and per layer."""
    total, per_layer = 0, {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            total += p.numel()
            layer = split_layer(name)[0]
            if layer is not None:
                per_layer[layer] = per_layer.get(layer, 0) + p.numel()
    return total, dict(sorted(per_layer.items()))


def weight_bytes(model: nn.Module, heads: list[str], double_quant: bool) -> dict[str, int]:
    """Bytes of all weights under each storage mode (see the module docstring)."""
    skip = [*heads, "score"]
    quantized: set[int] = set()
    out = dict.fromkeys(QUANT_MODES, 0)
    for name, module in model.named_modules():
        parts = name.split(".")
        if (isinstance(module, nn.Linear) and not _is_head(name, skip)
                and not {"lora_A", "lora_B", "lora_magnitude_vector"} & set(parts)):
            w = module.weight
            quantized.add(id(w))
            n, rows = w.numel(), w.shape[0]
            blocks = math.ceil(n / BNB_4BIT_BLOCK)
            absmax = blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCK) if double_quant else 4 * blocks
            out["fp32"] += 4 * n
            out["bf16"] += 2 * n
            out["int8"] += n + 4 * rows
            out["nf4"] += math.ceil(n / 2) + absmax
    for p in model.parameters():
        if id(p) in quantized:
            continue
        n = p.numel()
        for mode in QUANT_MODES:
            out[mode] += 2 * n if (mode == "bf16" and not p.requires_grad) else p.element_size() * n
    return out


def optimizer_bytes(model: nn.Module, name: str) -> int:
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        n = p.numel()
        if name == "adamw":  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype
            total += 2 * p.element_size() * n
        elif n < BNB_OPTIM_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCK)
    return total


def resolved_precision(cfg: Config) -> str:
    precision, acc = cfg.trainer.get("precision"), str(cfg.trainer.get("accelerator", "auto"))
    if precision in (None, "auto") and acc in ("gpu", "cuda"):
        return "bf16-mixed"  # what `auto` picks on any bf16-capable GPU, whether or not this machine has one
    return resolve_precision(precision, acc)


def _dims(conf) -> dict[str, Any]:
    h, a = conf.hidden_size, conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or h // a
    kv = getattr(conf, "num_key_value_heads", None) or a
    p_attn = getattr(conf, "attention_probs_dropout_prob", None) or getattr(conf, "attention_dropout", None) or 0.0
    return {"h": h, "a": a, "L": conf.num_hidden_layers, "i": conf.intermediate_size, "dq": a * head_dim,
            "dkv": kv * head_dim, "p_hidden": getattr(conf, "hidden_dropout_prob", None) or 0.0,
            "p_attn": float(p_attn)}


def activation_bytes(cfg: Config, base: nn.Module, adapted: list[dict[str, Any]], batch: int | None = None,
                     seq_len: int | None = None) -> dict[str, Any]:
    """Per-layer and total activation memory for one micro-batch (formula in the module docstring); `batch` and
    `seq_len` default to the micro-batch data.batch_size / data.grad_accum and data.max_length."""
    d = _dims(base.config)
    precision = resolved_precision(cfg)
    gpu = str(cfg.trainer.get("accelerator", "auto")) in ("gpu", "cuda")
    autocast = precision.endswith("-mixed")  # bf16-mixed / 16-mixed: fp32 weights, matmuls autocast to 16 bit
    e = 2 if precision.startswith(("bf16", "16")) else 4  # what a matmul (and what follows it) produces
    f = 4 if autocast else e  # the residual stream: a 16-bit output plus an fp32 residual is fp32

    def mask(nbytes: int) -> int:  # CUDA keeps dropout masks as bool; CPU as floats of the dropout input's dtype
        return 1 if gpu else nbytes

    m = mask(e)
    bf16_lora = cfg.lora.dtype == "bfloat16"
    e_lora = 2 if bf16_lora else e  # peft runs the LoRA branch in the adapter's dtype; autocast in 16 bit anyway
    int8 = cfg.quant.mode == "int8"
    b = batch or cfg.data.batch_size // cfg.data.grad_accum
    s = seq_len or cfg.data.max_length
    gated = any(n.endswith("gate_proj") for n, _ in base.named_modules())
    rms_norm = any("RMSNorm" in type(mod).__name__ for mod in base.modules())
    sdpa = bool(getattr(base, "_supports_sdpa", False)) and base.config.model_type != "deberta-v2"
    fused = sdpa and (gpu or d["p_attn"] == 0)
    e_attn = 4 if sdpa and not fused else e  # sdpa's math path computes 16-bit inputs in fp32
    method, p_lora = cfg.lora.method, cfg.lora.dropout
    sbh = s * b * d["h"]
    groups = {"qkv": sbh, "o": s * b * d["dq"], "up": sbh, "down": s * b * d["i"]}
    e_in = {"qkv": f, "o": e, "up": f, "down": e}  # q/k/v and up/gate read the stream, o and down a 16-bit output
    # Autocast saves a 16-bit copy of every fp32 weight a matmul uses (frozen ones too: the weight's gradient is not
    # needed, the input's is); a group's fp32 input is cast once per module that reads it.
    heads = [*cfg.model.head_modules, "score"]
    linears = [(n.removesuffix(".base_layer"), mod) for n, mod in base.named_modules()
               if isinstance(mod, nn.Linear) and not {"lora_A", "lora_B"} & set(n.split("."))]
    modules = {g: sum(_role(n) == g for n, _ in linears if not _is_head(n, heads)) / d["L"] for g in groups}
    layer_copies = e * sum(mod.weight.numel() for n, mod in linears if not _is_head(n, heads)) // d["L"] if (
        autocast and cfg.quant.mode == "none") else 0
    head_copies = e * sum(mod.weight.numel() for n, mod in linears if _is_head(n, heads)) if autocast else 0
    per_layer, copies = [], []
    for layer in range(d["L"]):
        if method == "head":
            per_layer.append(0)
            copies.append(0)
            continue
        el = 2 * sbh * f + (3 if gated else 1) * s * b * d["i"] * e
        if method == "full" and rms_norm:  # python RMSNorms also keep their normalized output for the weight's grad
            el += 2 * sbh * f
        el += 2 * sbh * m if d["p_hidden"] > 0 else 0
        qkv = s * b * (d["dq"] + 2 * d["dkv"])
        if fused:
            el += (qkv + s * b * d["dq"]) * e
        else:
            scores = d["a"] * s * s * b
            el += qkv * e_attn + scores * e_attn * (2 if d["p_attn"] > 0 else 1)
            el += scores * mask(e_attn) if d["p_attn"] > 0 else 0
        mine = [x for x in adapted if x["layer"] == layer]
        copy = layer_copies + (e * sum(x["r"] * (x["in"] + x["out"]) for x in mine) if autocast and not bf16_lora
                               else 0)
        el += copy
        for group, size in groups.items():
            users = [x for x in mine if x["role"] == group]
            if not (group == "o" and fused):  # else kept anyway as the fused kernel's output
                if method == "full" and e_in[group] != e:
                    el += modules[group] * size * e  # one 16-bit copy per module
                elif method == "full" or int8 or (users and p_lora == 0 and e_in[group] == e_lora):
                    el += size * e_in[group]
            for x in users:
                el += s * b * x["r"] * e_lora
                if p_lora > 0:  # the dropped-out copy and its mask (peft casts to bf16 LoRA before the dropout)
                    el += size * (e_lora + mask(e_lora if bf16_lora else e_in[group]))
                elif e_in[group] != e_lora:
                    el += size * e_lora  # the LoRA branch's own copy of the input
        per_layer.append(int(el))
        copies.append(copy)
    extra = 0 if method == "head" else 2 * sbh * f + head_copies
    total = sum(per_layer) + extra
    # int8 layers hold the inputs of o, up and down outside autograd's saved tensors: checkpointing keeps them too.
    held = d["L"] * (groups["o"] + groups["up"] + groups["down"]) * e if int8 else 0
    # Autocast caches its copies of trainable weights until the forward ends: all layers' under full fine-tuning.
    cached = sum(copies) if method == "full" else 0
    checkpointed = (d["L"] * sbh * f + held + max(CHECKPOINT_BACKWARD * max(per_layer, default=0), cached) + extra
                    if method != "head" else 0)
    kept = checkpointed if cfg.memory.gradient_checkpointing else total
    return {"total": total, "checkpointed": checkpointed, "kept": kept, "per_layer": per_layer, "batch_size": b,
            "gradient_checkpointing": cfg.memory.gradient_checkpointing, "seq_len": s,
            "precision": precision, "autocast": autocast, "bytes_per_activation": e, "bytes_per_mask": m,
            "bytes_stream": f, "weight_copies": sum(copies) + (head_copies if method != "head" else 0),
            "fused_attention": fused, "gated_mlp": gated}


def weights_mode(cfg: Config) -> str:
    return {"none": "fp32", "int8": "int8", "nf4": "nf4", "fp4": "nf4"}[cfg.quant.mode]


def estimate(cfg: Config, batch: int | None = None, seq_len: int | None = None) -> dict[str, Any]:
    """Parameter counts, adapter size and the training-memory breakdown (bytes) for a config, without weights.

    Activations are for one micro-batch of `batch` x `seq_len` (default: data.batch_size / data.grad_accum x
    data.max_length, an upper bound under dynamic padding); `total` counts them as the config keeps them (checkpointed
    when memory.gradient_checkpointing is on), `total_checkpointed` as checkpointing would."""
    model, base, base_total = meta_model(cfg)
    trainable, total = count_params(model)
    lora_total, lora_per_layer = lora_param_counts(model)
    adapted = adapted_modules(model)
    weights = weight_bytes(model, list(cfg.model.head_modules), cfg.quant.double_quant)
    mode = weights_mode(cfg)
    acts = activation_bytes(cfg, base, adapted, batch, seq_len)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    optim = optimizer_bytes(model, cfg.optim.name)
    memory = {"weights": weights[mode], "gradients": grads, "optimizer": optim, "activations": acts["kept"]}
    memory["total"] = sum(memory.values())
    memory["total_checkpointed"] = memory["total"] - acts["kept"] + acts["checkpointed"]
    return {
        "model": cfg.model.name, "arch": cfg.model.arch, "method": cfg.lora.method,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules),
                 "use_dora": cfg.lora.use_dora, "use_rslora": cfg.lora.use_rslora} if cfg.lora.method == "lora" else None,
        "params": {"trainable": trainable, "total": total, "base_total": base_total,
                   "lora": lora_total, "lora_per_layer": lora_per_layer, "head": trainable - lora_total,
                   "adapted_modules": len(adapted), "trainable_pct": 100.0 * trainable / total},
        "adapter_bytes": {"fp32": 4 * trainable, "bf16": 2 * trainable,
                          "lora_only_fp32": 4 * lora_total, "lora_only_bf16": 2 * lora_total},
        "memory": {**memory, "weights_mode": mode, "weights_by_mode": weights, "optimizer_name": cfg.optim.name,
                   "activations": acts},
    }


def memory_estimate_mb(cfg: Config, batch: int | None = None, seq_len: int | None = None) -> dict[str, Any]:
    """The training-memory estimate of a run in MiB, as results.json records it (no weights are loaded)."""
    mem = estimate(cfg, batch, seq_len)["memory"]
    acts = mem["activations"]

    def mb(n: float) -> float:
        return round(n / 2**20, 1)

    return {"weights_mb": mb(mem["weights"]), "gradients_mb": mb(mem["gradients"]),
            "optimizer_mb": mb(mem["optimizer"]), "activations_mb": mb(acts["kept"]), "total_mb": mb(mem["total"]),
            "micro_batch": acts["batch_size"], "seq_len": acts["seq_len"],
            "gradient_checkpointing": acts["gradient_checkpointing"], "optimizer_name": mem["optimizer_name"],
            "weights_mode": mem["weights_mode"]}

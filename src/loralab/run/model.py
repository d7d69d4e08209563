"""Base model (+ bitsandbytes quantization) -> peft adapter or a baseline (full, head only, BitFit)."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..lightning import precision

RESIDUAL_INITS = ("pissa", "olora")  # inits that leave a residual W - BA in the base layer


def on_gpu(cfg: Config) -> bool:
    acc = str(cfg.trainer.get("accelerator", "auto"))
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def compute_dtype(cfg: Config) -> torch.dtype:
    """The 4-bit matmul dtype. `auto`: bf16 where the hardware runs it natively, else fp32.

    On a CPU without avx512_bf16/AMX, bf16 is emulated: an nf4 step took ~5x longer with bf16 than with fp32 compute.
    """
    name = cfg.quant.compute_dtype
    fast_bf16 = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if on_gpu(cfg) else precision.cpu_has_fast_bf16()
    if name == "auto":
        return torch.bfloat16 if fast_bf16 else torch.float32
    if name == "bfloat16" and not fast_bf16:
        warnings.warn("quant.compute_dtype=bfloat16 on hardware without native bf16: 4-bit layers run ~5x slower "
                      "than with quant.compute_dtype=float32")
    return getattr(torch, name)


def quantization_config(cfg: Config):
    if cfg.quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    # The new classification head (and any other trained head module) must stay out of quantization: bitsandbytes
    # 0.50 fails on freshly initialized quantized heads (FACTS.md), and head modules are trained in full anyway.
    # Patterns match a head at any depth ("pooler" -> "bert.pooler.dense"); a bare name only matches a prefix/suffix.
    skip = [rf"(?:.*\.)?{re.escape(h)}" for h in dict.fromkeys([*cfg.model.head_modules, "score"])]
    if cfg.quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.mode,
                              bnb_4bit_use_double_quant=cfg.quant.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(cfg), llm_int8_skip_modules=skip)


def peft_config(cfg: Config):
    from peft import LoraConfig, TaskType

    lo = cfg.lora
    init: Any = True if lo.init == "default" else lo.init
    targets: Any = "all-linear" if lo.target_modules == ["all-linear"] else list(lo.target_modules)
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                      target_modules=targets, bias=lo.bias, use_rslora=lo.use_rslora, use_dora=lo.use_dora,
                      init_lora_weights=init, layers_to_transform=lo.layers_to_transform,
                      rank_pattern=dict(lo.rank_pattern), alpha_pattern=dict(lo.alpha_pattern),
                      modules_to_save=list(cfg.model.head_modules))


def _is_head(name: str, heads: list[str]) -> bool:
    return any(part in heads for part in name.split("."))


# The base model's dropout probabilities, by the names transformers configs give them (BERT/RoBERTa/DeBERTa: hidden and
# attention; Llama/Qwen/Mistral: attention; GPT-2 style: resid/embd/attn). BERT's classifier dropout falls back to
# hidden_dropout_prob when its own is null.
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attention_dropout",
                  "hidden_dropout", "dropout", "activation_dropout", "pooler_dropout", "resid_pdrop", "embd_pdrop",
                  "attn_pdrop")


def dropout_overrides(resolved: str, cfg: Config) -> dict[str, float]:
    """model.dropout as from_pretrained overrides of every dropout field the checkpoint's config has."""
    from .weights import model_config

    conf = model_config(cfg.model, cfg.task.num_labels, resolved)
    return {f: float(cfg.model.dropout) for f in DROPOUT_FIELDS if isinstance(getattr(conf, f, None), (int, float))}


def load_pretrained(cfg: Config, resolved: str, tokenizer=None, gpu: int | None = None) -> nn.Module:
    """The pretrained classifier with the task's head size, in fp32, quantized as configured. `gpu`: the CUDA device
    that bitsandbytes quantizes onto while loading (quantized weights cannot be moved afterwards)."""
    from transformers import AutoModelForSequenceClassification

    quant = quantization_config(cfg)
    extra: dict[str, Any] = {"device_map": {"": gpu}} if quant is not None and gpu is not None else {}
    if cfg.model.dropout is not None:
        extra.update(dropout_overrides(resolved, cfg))
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved, num_labels=cfg.task.num_labels, revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code, quantization_config=quant, dtype=torch.float32, **extra)
    if tokenizer is not None and model.config.pad_token_id is None:  # decoders: the head reads the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.quant.mode == "int8":  # bitsandbytes' CPU int8 path warns on every forward; it is expected there
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    return model


def build_model(cfg: Config, resolved: str, tokenizer) -> nn.Module:
    """Load the pretrained classifier and make exactly the parameters of `lora.method` trainable."""
    import lightning as L

    gpu = int(os.environ.get("LOCAL_RANK", "0")) if on_gpu(cfg) and torch.cuda.is_available() else None
    model = load_pretrained(cfg, resolved, tokenizer, gpu)
    method, heads = cfg.lora.method, list(cfg.model.head_modules)
    if method == "lora":
        from peft import get_peft_model, prepare_model_for_kbit_training

        if cfg.quant.mode != "none":  # checkpointing follows memory.gradient_checkpointing (below), not peft's default
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        enable_checkpointing(model, cfg)
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # A's random init depends on the seed alone
        peft_model = get_peft_model(model, peft_config(cfg))
        cast_adapter(peft_model, cfg.lora.dtype)
        if cfg.lora.init_from:  # e.g. the paper's MRPC/RTE/STS-B runs start from the MNLI adapter
            from .init_from import load_init_adapter

            load_init_adapter(peft_model, cfg)
        if cfg.lora.init.startswith(RESIDUAL_INITS):
            # PiSSA/OLoRA rewrite W into W - BA; keep the initial adapter so save_trained can export a plain LoRA
            # delta against the untouched base weights (rebuilt identically on resume: same seed, same SVD/QR).
            peft_model.loralab_initial_adapter = {k: v.detach().clone() for k, v in peft_model.state_dict().items()
                                                  if "lora_" in k or "modules_to_save" in k}
        return peft_model
    enable_checkpointing(model, cfg)
    return mark_trainable(model, method, heads)


def enable_checkpointing(model: nn.Module, cfg: Config) -> None:
    """memory.gradient_checkpointing: transformers' activation checkpointing, non-reentrant (it needs no input that
    requires grad, so frozen embeddings are fine; transformers still hooks the embeddings to require grads)."""
    if not cfg.memory.gradient_checkpointing:
        return
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5; the old name is deprecated
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def cast_adapter(model: nn.Module, dtype: str) -> None:
    """lora.dtype: store the LoRA tensors (A, B, DoRA magnitudes) in `dtype`; their gradients and optimizer states
    follow. peft casts a LoRA layer's input to its weight dtype and the result back, so fp32 training still works."""
    if dtype == "float32":
        return
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(getattr(torch, dtype))


def mark_trainable(model: nn.Module, method: str, heads: list[str]) -> nn.Module:
    """The baselines: full (everything), head (head modules only), bitfit (every bias + head modules)."""
    for name, p in model.named_parameters():
        p.requires_grad = (method == "full" or _is_head(name, heads)
                           or (method == "bitfit" and name.endswith(".bias")))
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count their logical size, not their packed storage."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _restore_head_tensors(model: nn.Module, path: Path) -> None:
    """peft 0.21's PiSSA/OLoRA conversion writes only the LoRA tensors; put the trained head modules back."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    saved = load_file(str(path))
    missing = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
               if "lora_" not in k and k not in saved}
    if missing:
        save_file({**saved, **missing}, str(path), metadata={"format": "pt"})


def save_trained(model: nn.Module, cfg: Config, out: Path) -> int:
    """Write what training changed, as safetensors; returns its size in bytes.

    LoRA: `adapter/` in peft's format (reloads with PeftModel.from_pretrained). PiSSA/OLoRA adapters are converted
    by peft to a plain LoRA of rank 2r relative to the original base weights, so they load on the unmodified base.
    Full fine-tuning: the whole model (`save_pretrained`). Head only and BitFit: `trained.safetensors` with just the
    trained tensors.
    """
    import tempfile

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if cfg.lora.method == "lora":
        initial = getattr(model, "loralab_initial_adapter", None)
        with tempfile.TemporaryDirectory() as tmp:
            kwargs: dict[str, Any] = {}
            if initial is not None:  # peft writes the initial adapter in its own format, then converts against it
                model.save_pretrained(str(Path(tmp) / "initial"), state_dict=initial, safe_serialization=True)
                kwargs["path_initial_model_for_weight_conversion"] = str(Path(tmp) / "initial")
            model.save_pretrained(str(out), safe_serialization=True, **kwargs)
        if initial is not None:
            _restore_head_tensors(model, out / "adapter_model.safetensors")
        conf_path = out / "adapter_config.json"
        conf = json.loads(conf_path.read_text())
        conf["base_model_name_or_path"] = cfg.model.path  # portable: "package:..." or a hub id, not this machine's path
        conf_path.write_text(json.dumps(conf, indent=2))
    elif cfg.lora.method == "full":
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        save_file(trained_state(model), str(out / "trained.safetensors"))
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors")

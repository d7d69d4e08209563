"""Fold a trained adapter into its base model and save a standalone transformers model (`loralab merge RUN OUT`).

LoRA: W + (alpha/r) B A via peft's `merge_and_unload` (PiSSA/OLoRA runs were saved as plain LoRA deltas against the
original base, so they merge the same way). Head-only and BitFit runs: the trained tensors are loaded into the base.
Full fine-tuning: the saved model is re-saved. The base is always loaded in fp32 and unquantized: an adapter trained
on a quantized base is merged into the full-precision weights (the output then differs from the quantized model by
the quantization error, not by the adapter).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..run.weights import RANDOM_MARKER, load_tokenizer, resolve_model_path
from .loader import load_base, load_standalone, resolve_source

MERGE_INFO = "loralab_merge.json"


def merged_model(source: str | Path, task: str | None = None) -> tuple[nn.Module, object, dict]:
    """(merged classifier in eval mode, tokenizer, provenance) for a run folder or a bare peft adapter folder."""
    src = resolve_source(source, task)
    cfg = replace(src.cfg, quant=replace(src.cfg.quant, mode="none"))
    tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path, cfg.model.revision))
    cpu = torch.device("cpu")
    if src.method == "lora":
        from peft import PeftModel

        base = load_base(cfg, cpu, tokenizer)
        model = PeftModel.from_pretrained(base, str(src.weights)).merge_and_unload()
    else:
        model = load_standalone(replace(src, cfg=cfg), cpu, tokenizer)
    info = {"source": str(Path(source).resolve()), "name": src.name, "method": src.method,
            "base_model": cfg.model.path, "task": cfg.task.name, "num_labels": cfg.task.num_labels,
            "trained_quant_mode": src.cfg.quant.mode}
    return model.eval(), tokenizer, info


def merge_adapter(run_or_adapter: str | Path, out: str | Path, task: str | None = None) -> Path:
    """Write the merged model (safetensors + config + tokenizer) to `out`; it loads with
    `AutoModelForSequenceClassification.from_pretrained(out)`, no peft needed."""
    model, tokenizer, info = merged_model(run_or_adapter, task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    base = Path(resolve_model_path(info["base_model"]))
    if (base / RANDOM_MARKER).exists():  # keep the random model's tokenizer loading as saved (see run/weights.py)
        shutil.copy(base / RANDOM_MARKER, out / RANDOM_MARKER)
    (out / MERGE_INFO).write_text(json.dumps(info, indent=2))
    return out

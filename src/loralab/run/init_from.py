"""`lora.init_from`: start a LoRA run from another run's adapter (the LoRA paper starts MRPC, RTE and STS-B from its
MNLI adapter, Appendix D.1).

Every LoRA tensor of the new model is copied from the source adapter, which must therefore have the same rank and
target modules. Head modules (`model.head_modules`, trained in full) are copied one module at a time, and only when
all of a module's tensors have the same shapes: a classifier for a different label count (MNLI's 3 labels -> MRPC's 2,
STS-B's 1) keeps its fresh initialization, as in the paper; a same-shape module (e.g. BERT's pooler) is copied.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from ..store import adapter_folder

log = logging.getLogger("loralab")


def head_module(key: str, heads: list[str]) -> str | None:
    """The head module a tensor belongs to: the key up to its first component named in `heads` (else None)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in heads:
            return ".".join(parts[: i + 1])
    return None


def load_init_adapter(model: nn.Module, cfg: Config) -> dict[str, list[str]]:
    """Copy the source adapter's tensors into `model` (a fresh peft model); returns what was copied and skipped."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = adapter_folder(cfg.lora.init_from)
    if folder is None:  # validated before; the folder may have gone since
        raise ConfigError(f"lora.init_from={cfg.lora.init_from!r}: no peft adapter there any more; pass a finished "
                          f"run's folder or lora.init_from=null")
    source = load_file(str(folder / "adapter_model.safetensors"))
    own = get_peft_model_state_dict(model)
    lora_keys = [k for k in own if "lora_" in k]
    missing = [k for k in lora_keys if k not in source]
    wrong = [k for k in lora_keys if k in source and source[k].shape != own[k].shape]
    if missing or wrong:
        k = (missing or wrong)[0]
        what = "has no tensor" if missing else f"has shape {tuple(source[k].shape)} (this run: {tuple(own[k].shape)})"
        raise ConfigError(f"lora.init_from={cfg.lora.init_from!r}: the adapter {what} for {k} "
                          f"({len(missing)} missing, {len(wrong)} of another shape); it must come from a run with the "
                          f"same model, lora.r={cfg.lora.r} and lora.target_modules={list(cfg.lora.target_modules)}")
    heads = list(cfg.model.head_modules)
    by_head: dict[str, list[str]] = {}
    for k in own:
        h = head_module(k, heads) if "lora_" not in k else None
        if h is not None:
            by_head.setdefault(h, []).append(k)
    copied_heads, skipped_heads = [], []
    take = {k: source[k] for k in lora_keys}
    for h, keys in by_head.items():
        if all(k in source and source[k].shape == own[k].shape for k in keys):
            take.update({k: source[k] for k in keys})
            copied_heads.append(h.removeprefix("base_model.model."))
        else:  # peft loads head modules as a whole: hand back this model's own fresh tensors for them
            take.update({k: own[k].detach().clone() for k in keys})
            skipped_heads.append(h.removeprefix("base_model.model."))
    with torch.no_grad():
        set_peft_model_state_dict(model, take)
    log.info("lora.init_from %s: copied %d LoRA tensors%s%s", folder, len(lora_keys),
             f", head modules {copied_heads}" if copied_heads else "",
             f"; kept the fresh {skipped_heads} (shapes differ, e.g. another label count)" if skipped_heads else "")
    return {"lora": lora_keys, "heads_copied": copied_heads, "heads_skipped": skipped_heads, "source": [str(folder)]}

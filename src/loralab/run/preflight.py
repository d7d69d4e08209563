"""Preflight: everything about a run that can fail cheaply fails here, before weights or data load.

The model source, the data splits, module names and layer indices (on the meta-device skeleton), the positions the
model can take, and the folder `lora.init_from` points at. Messages name the field, the value and the fix.
"""
from __future__ import annotations

from torch import nn

from ..config import Config
from ..errors import ConfigError
from ..store import adapter_folder
from .data import check_split
from .weights import resolve_model_path, skeleton

# Models whose position ids start after the padding index (fairseq heritage): two positions are never usable.
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}


def linear_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})


# Inits that read the base weight through an SVD/QR (and may rewrite it): they need float, unquantized weights.
WEIGHT_INITS = ("pissa", "olora", "orthogonal", "mica", "corda")
# Inits peft accepts but that need a data pass loralab does not run (corda raises without it; eva and lora_ga
# silently fall back to the default init) or CUDA (loftq with bitsandbytes 0.50).
UNSUPPORTED_INITS = {"corda": "a calibration pass (peft preprocess_corda)",
                     "eva": "a data pass (peft initialize_lora_eva_weights)",
                     "lora_ga": "a gradient pass (peft preprocess_loraga)",
                     "loftq": "CUDA and a LoftQConfig"}


def num_layers(model: nn.Module) -> int:
    conf = getattr(model, "config", None)
    return int(getattr(conf, "num_hidden_layers", 0) or 0)


def check_modules(cfg: Config, model: nn.Module) -> None:
    """Target/head modules must exist, layer indices must be in range and the init must suit the weights.

    Runs on the meta skeleton (preflight), before anything loads; messages name the field and what the model has.
    """
    names = linear_names(model)
    paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    lo = cfg.lora
    if lo.method == "lora" and lo.target_modules != ["all-linear"]:
        for t in lo.target_modules:
            # peft matches a name or a dotted path suffix (attention.output.dense: the attention output only)
            if not any(p == t or p.endswith("." + t) for p in paths):
                raise ConfigError(f"lora.target_modules contains {t!r}, which {cfg.model.name} does not have. "
                                  f"Its linear modules are: {', '.join(names)} (or use [all-linear])")
    top = {n.split(".")[0] for n, _ in model.named_modules() if n} | {n.split(".")[-1] for n, _ in model.named_modules()}
    for h in cfg.model.head_modules:
        if h not in top:
            raise ConfigError(f"model.head_modules contains {h!r}, which {cfg.model.name} does not have; "
                              f"remove it (e.g. model.head_modules=[classifier])")
    if cfg.memory.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"memory.gradient_checkpointing=true: {cfg.model.name} ({type(model).__name__}) does not "
                          f"support activation checkpointing in transformers; set memory.gradient_checkpointing=false")
    if lo.method != "lora":
        return
    n = num_layers(model)
    for i in lo.layers_to_transform or []:
        if n and not 0 <= i < n:
            raise ConfigError(f"lora.layers_to_transform contains {i}, but {cfg.model.name} has layers 0..{n - 1}")
    init = lo.init.split("_niter_")[0]
    if init in UNSUPPORTED_INITS:
        raise ConfigError(f"lora.init={lo.init!r} needs {UNSUPPORTED_INITS[init]}, which loralab does not run; "
                          f"use default, gaussian, pissa, pissa_niter_<n>, olora, orthogonal or mica")
    if init in WEIGHT_INITS and cfg.quant.mode != "none":
        raise ConfigError(f"lora.init={lo.init!r} decomposes the base weight and needs it in float, but "
                          f"quant.mode={cfg.quant.mode!r}; use quant=none with it, or lora.init=default/gaussian")




def max_positions(conf) -> int | None:
    """How many tokens the model can take (None: no fixed limit, e.g. rotary decoders without the attribute)."""
    n = getattr(conf, "max_position_embeddings", None)
    if not n:
        return None
    return int(n) - POSITION_OFFSET.get(conf.model_type, 0)


def check_positions(cfg: Config, conf) -> None:
    limit = max_positions(conf)
    # Learned absolute positions (BERT, RoBERTa) have a table that ends; rotary and relative ones do not.
    if limit is not None and cfg.data.max_length > limit and getattr(conf, "position_embedding_type", None) == "absolute":
        raise ConfigError(f"data.max_length={cfg.data.max_length} is invalid: {cfg.model.name} has {limit} positions "
                          f"(max_position_embeddings), so a longer input would crash mid-run; use "
                          f"data.max_length<={limit}")


def check_init_from(cfg: Config) -> None:
    if cfg.lora.init_from is not None and adapter_folder(cfg.lora.init_from) is None:
        raise ConfigError(f"lora.init_from={cfg.lora.init_from!r} is invalid: no peft adapter there "
                          f"(adapter_config.json + adapter_model.safetensors, in the folder or its adapter/); pass a "
                          f"finished run's folder, e.g. lora.init_from=runs/mnli/<run_id>, or lora.init_from=null")


def preflight(cfg: Config) -> str:
    """Check what can fail cheaply; returns the resolved model folder (or hub id)."""
    check_init_from(cfg)
    resolved = resolve_model_path(cfg.model.path, cfg.model.revision)
    for split in ("train", *cfg.task.eval_splits):
        check_split(cfg.task, split, cfg.data.dir)
    model = skeleton(cfg.model, cfg.task.num_labels, resolved)  # its config is read once, here
    check_positions(cfg, model.config)
    check_modules(cfg, model)
    return resolved

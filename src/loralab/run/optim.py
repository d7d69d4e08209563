"""Optimizers (AdamW, bitsandbytes 8-bit, LoRA+) and the paper's linear warmup/decay schedule (transformers')."""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import Config

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(_NO_DECAY) else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def optimizer_class(cfg: Config):
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW, {o.impl: True} if o.impl != "for" else {"foreach": False}
    import bitsandbytes as bnb

    if o.name == "paged_adamw8bit" and not torch.cuda.is_available():
        warnings.warn("optim.name=paged_adamw8bit: paged optimizers need CUDA; bitsandbytes falls back to "
                      "non-paged 8-bit AdamW on CPU")
    return (bnb.optim.PagedAdamW8bit if o.name == "paged_adamw8bit" else bnb.optim.AdamW8bit), {}


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    cls, extra = optimizer_class(cfg)
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, **extra)
    if cfg.lora.method == "lora" and cfg.lora.lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        # LoRA+ (Hayou et al. 2024): lr_B = lr_ratio * lr_A. peft puts lora_B and every 1-D trainable tensor (biases,
        # DoRA magnitudes) in the fast group; its groups carry their own weight decay (`loraplus_weight_decay`), so a
        # plain `weight_decay` would be silently overridden to 0.
        return create_loraplus_optimizer(model=model, optimizer_cls=cls, loraplus_lr_ratio=cfg.lora.lr_ratio,
                                         loraplus_weight_decay=o.weight_decay, **kwargs)
    return cls(param_groups(model, o.weight_decay), **kwargs)


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: int) -> LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then linear decay to zero (the LoRA paper's schedule)."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)

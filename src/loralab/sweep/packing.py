"""Which jobs of a sweep can train packed together (run/packed.py), and why the others train solo.

Runs pack when they share the frozen base and its inputs: the model (path, revision, base dropout, head modules),
quantization, task data (task, mirror, max length), precision and device. Anything else may differ per run: rank,
alpha, targets, layers, init, LoRA dropout, optimizer settings, seed, batch size, epochs and steps.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from ..config import Config, as_dict
from ..lightning.precision import resolve_precision

PACKED_PRECISIONS = ("32-true", "32", "bf16-mixed")
# Lightning arguments the packed loop implements; any other one set away from Lightning's default trains solo.
TRAINER_DEFAULTS: dict[str, Any] = {
    "strategy": ("auto", None), "num_nodes": (1, None), "fast_dev_run": (False, 0, None), "min_epochs": (None,),
    "min_steps": (None,), "max_time": (None,), "overfit_batches": (0, 0.0, None), "val_check_interval": (None, 1.0),
    "check_val_every_n_epoch": (1, None), "accumulate_grad_batches": (1, None), "detect_anomaly": (False, None),
    "profiler": (None,), "reload_dataloaders_every_n_epochs": (0, None),
}


def pack_key(cfg: Config) -> str:
    """The shared-base key: runs with equal keys can train in one pack."""
    d = as_dict(cfg)
    t = cfg.trainer
    return json.dumps({"model": d["model"], "quant": d["quant"], "task": d["task"]["name"],
                       "data": {k: d["data"][k] for k in ("dir", "max_length", "cache_dir")},
                       "precision": resolve_precision(t.get("precision"), str(t.get("accelerator"))),
                       "accelerator": str(t.get("accelerator")), "devices": str(t.get("devices"))}, sort_keys=True)


def solo_reason(cfg: Config) -> Optional[str]:
    """Why this run cannot train in a pack (None: it can)."""
    lo, t = cfg.lora, cfg.trainer
    if lo.method != "lora":
        return f"lora.method={lo.method}: packing shares a frozen base among LoRA adapters; {lo.method} trains base weights"
    if lo.use_dora:
        return "lora.use_dora=true: DoRA rescales each adapted weight by its own column norms, which the packed layer does not compute"
    if lo.bias != "none":
        return f"lora.bias={lo.bias}: trained biases belong to the shared base"
    if lo.init.startswith(("pissa", "olora")):
        return f"lora.init={lo.init}: it rewrites the base weights per run (W - BA)"
    if cfg.quant.mode != "none":
        return f"quant={cfg.quant.mode}: the packed layer shares plain (unquantized) linear layers"
    if cfg.compile:
        return "compile=true: a compiled pack would recompile whenever a run joins or leaves"
    if cfg.memory.gradient_checkpointing:
        return "memory.gradient_checkpointing=true: not implemented in the packed trainer"
    if cfg.data.grad_accum != 1:
        return f"data.grad_accum={cfg.data.grad_accum}: the packed trainer steps once per batch"
    if cfg.logger.wandb:
        return "logger=wandb: W&B keeps one active run per process"
    precision = resolve_precision(t.get("precision"), str(t.get("accelerator")))
    if precision not in PACKED_PRECISIONS:
        return f"trainer.precision={precision}: the packed trainer runs fp32 or bf16 autocast"
    devices = t.get("devices")
    if devices not in (1, "1", "auto", None) and not (isinstance(devices, list) and len(devices) == 1):
        return f"trainer.devices={devices}: a pack trains on one device"
    for key, allowed in TRAINER_DEFAULTS.items():
        if key in t and t[key] not in allowed:
            return f"trainer.{key}={t[key]}: not implemented in the packed trainer"
    if t.get("gradient_clip_algorithm") not in (None, "norm", "value"):
        return f"trainer.gradient_clip_algorithm={t['gradient_clip_algorithm']}: use norm or value"
    return None


def group(cfgs: list[Config]) -> tuple[list[list[int]], dict[int, str]]:
    """(packs: lists of indices into cfgs sharing a base, in first-seen order; solo: index -> reason)."""
    packs: dict[str, list[int]] = {}
    solo: dict[int, str] = {}
    for i, cfg in enumerate(cfgs):
        reason = solo_reason(cfg)
        if reason is not None:
            solo[i] = reason
        else:
            packs.setdefault(pack_key(cfg), []).append(i)
    return list(packs.values()), solo


def auto_pack_size(cfg: Config, cap: int = 16) -> int:
    """A pack size that fits the device: the free memory (GPU, else available RAM) left after the base, divided by
    one run's training memory (`loralab params`' estimate at data.max_length: adapter, gradients, optimizer states,
    activations), with a 30 % margin; between 1 and `cap`."""
    import torch

    from ..run.estimate import memory_estimate_mb  # sweep > run: a downward import
    from ..run.model import on_gpu

    try:
        est = memory_estimate_mb(cfg)
    except Exception:  # noqa: BLE001 - an estimate that fails leaves a safe default
        return 4
    per_run = max(1.0, est["total_mb"] - est["weights_mb"])
    if on_gpu(cfg) and torch.cuda.is_available():
        free_mb = torch.cuda.mem_get_info()[0] / 2**20
    else:
        free_mb = _available_ram_mb()
    return max(1, min(cap, int((0.7 * free_mb - est["weights_mb"]) // per_run)))


def _available_ram_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 4096.0

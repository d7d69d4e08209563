"""Switching tasks on one resident base: swapping adapters (set_adapter) vs reloading a merged model per task."""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..run.module import MODEL_INPUTS
from .loader import ModelBank, Source, load_base, pick_device, resolve_sources


def _dir_bytes(folder: Path, suffixes: tuple[str, ...] = (".safetensors", ".json")) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in suffixes)


def _probe_batch(s: Source, tokenizer, device: torch.device) -> dict[str, torch.Tensor]:
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat."][:len(s.cfg.task.text_fields)]
    enc = tokenizer(*[[t] for t in texts], return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in MODEL_INPUTS}


def swap_vs_reload(sources: Sequence[str | Path | Source], task: str | None = None, device: str = "cpu",
                   repeats: int = 5) -> dict[str, Any]:
    """Switching tasks by swapping a resident adapter vs loading that task's merged model from disk.

    Per source: set_adapter time (median of `repeats`, switching in from another adapter of the same base when
    there is one: `swapped_from`),
    load_adapter time (adding it from disk to a resident base), from_pretrained time of its merged model
    (merge_and_unload + save_pretrained once, untimed; median of `repeats`, so the file is in the page cache: a
    lower bound on a cold load), disk bytes of adapter vs merged
    model, and the max |logit| difference between the merged model and the adapter (should be ~1e-6).
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    srcs = resolve_sources(sources, task)
    for s in srcs:
        if s.method != "lora" or s.cfg.quant.mode != "none":
            raise ConfigError(f"source {str(s.path)!r} (lora.method={s.method}, quant.mode={s.cfg.quant.mode}): "
                              f"swap-vs-reload times LoRA adapters on an unquantized base; pass only such runs")
    dev = pick_device(device)
    bank = ModelBank(dev)
    loads = {s.name: bank.add(s) for s in srcs}
    rows = []
    for s in srcs:
        peers = [o for o in srcs if o is not s and bank.loaded[o.name] == bank.loaded[s.name]]
        swaps = []
        for _ in range(repeats):
            if peers:
                bank.activate(peers[0])
            start = time.perf_counter()
            model = bank.activate(s)
            swaps.append(time.perf_counter() - start)
        probe = _probe_batch(s, bank.tokenizer(s), dev)
        with torch.inference_mode():
            adapter_logits = model(**probe).logits.float()
        with tempfile.TemporaryDirectory(prefix="loralab-merged-") as tmp:
            fresh = PeftModel.from_pretrained(load_base(s.cfg, dev, bank.tokenizer(s)), str(s.weights))
            fresh.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            del fresh
            reloads = []
            for _ in range(repeats):
                start = time.perf_counter()
                merged = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=torch.float32).to(dev).eval()
                reloads.append(time.perf_counter() - start)
            with torch.inference_mode():
                diff = float((merged(**probe).logits.float() - adapter_logits).abs().max())
            merged_bytes = _dir_bytes(Path(tmp))
            del merged
        rows.append({"source": s.name, "task": s.cfg.task.name, "swapped_from": peers[0].name if peers else None,
                     "swap_s": statistics.median(swaps),
                     "adapter_load_s": loads[s.name]["adapter_load_s"], "reload_merged_s": statistics.median(reloads),
                     "adapter_bytes": _dir_bytes(s.weights), "merged_bytes": merged_bytes,
                     "max_abs_logit_diff": diff})
    swap = statistics.median(r["swap_s"] for r in rows)
    reload = statistics.median(r["reload_merged_s"] for r in rows)
    return {"device": str(dev), "bases": bank.bases, "repeats": repeats, "tasks": rows,
            "base_load_s": max(v["base_load_s"] for v in loads.values()),
            "median_swap_s": swap, "median_adapter_load_s": statistics.median(r["adapter_load_s"] for r in rows),
            "median_reload_merged_s": reload, "reload_over_swap": reload / swap if swap > 0 else float("inf"),
            "adapter_bytes": sum(r["adapter_bytes"] for r in rows),
            "merged_bytes": sum(r["merged_bytes"] for r in rows)}

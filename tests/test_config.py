"""Every shipped config composes; a bad input fails before any model or data loads, naming the field."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import GLUE_DIR, REPO, Compose
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

import loralab.run.data
import loralab.run.train
from loralab.config import CONF_DIR, Config, ConfigError, compose
from loralab.run.weights import hub_reachable

GROUPS = ("model", "task", "lora", "quant", "optim", "trainer", "logger", "experiment", "memory")
SHIPPED = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def raw_config(overrides: list[str]) -> DictConfig:
    """Hydra's composition alone, unvalidated: what train.py hands to `loralab.run.train.run`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


class Loaded(AssertionError):
    """Raised by the guards below: something tried to load a model, a tokenizer or data."""


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading weights, tokenizers, data or starting training fails the test."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def guard(what: str):
        def _raise(*args, **kwargs):
            raise Loaded(f"{what} was called before the bad value was reported")
        return _raise

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", guard("model load"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", guard("tokenizer load"))
    monkeypatch.setattr(loralab.run.data, "load_split", guard("data load"))
    monkeypatch.setattr(loralab.run.train, "train", guard("training"))


def run_fails(overrides: list[str], tmp_path: Path, token_cache: Path) -> str:
    """`loralab.run.train.run` on the raw config raises ConfigError and starts no run; returns the message."""
    raw = raw_config([f"store.root={tmp_path / 'runs'}", f"data.cache_dir={token_cache}", *overrides])
    with pytest.raises(ConfigError) as info:
        loralab.run.train.run(raw)
    message = str(info.value)
    for path in tmp_path.rglob("results.json"):  # a failure may be recorded, but no run may start
        record = json.loads(path.read_text())
        assert record["status"] == "failed" and message in record["error"]
    assert not list(tmp_path.rglob("*.safetensors"))
    return message


# --- every shipped config composes --------------------------------------------------------------------------

@pytest.mark.parametrize("group,name", SHIPPED, ids=[f"{g}={n}" for g, n in SHIPPED])
def test_shipped_config_composes(group: str, name: str, compose_cfg: Compose) -> None:
    override = f"+experiment={name}" if group == "experiment" else f"{group}={name}"
    cfg = compose_cfg([override])
    assert isinstance(cfg, Config)
    data = yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text()) or {}
    if group in ("model", "task"):  # the file's name field is what the run is called
        assert getattr(cfg, group).name == data["name"] == name
    if group == "quant":
        assert cfg.quant.mode == data["mode"]
    if group == "trainer":
        assert cfg.trainer["enable_progress_bar"] is False and "accelerator" in cfg.trainer


def test_hub_models_compose_offline(compose_cfg: Compose, no_loading: None) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cfg = compose_cfg(["model=roberta-base", "task=mnli"])
    assert cfg.model.path == "FacebookAI/roberta-base" and cfg.task.num_labels == 3


def test_defaults_follow_the_task(compose_cfg: Compose) -> None:
    cfg = compose_cfg(["task=cola"])
    assert cfg.optim.lr == cfg.task.lr and cfg.trainer["max_epochs"] == cfg.task.epochs
    assert cfg.data.dir == GLUE_DIR
    assert compose_cfg(["lora.enabled=false"]).lora.method == "full"


# --- bad values fail in validation --------------------------------------------------------------------------

BAD_VALUES = [
    (["task.name=foo"], "task.name", "foo"),
    (["lora.r=0"], "lora.r", "0"),
    (["lora.r=-4"], "lora.r", "-4"),
    (["lora.alpha=0"], "lora.alpha", "0"),
    (["lora.alpha=-1"], "lora.alpha", "-1"),
    (["lora.dropout=1.0"], "lora.dropout", "1.0"),
    (["lora.dropout=-0.1"], "lora.dropout", "-0.1"),
    (["lora.dropout=1.5"], "lora.dropout", "1.5"),
    (["lora.r=abc"], "lora.r", "abc"),
    (["+trainer.max_step=5"], "trainer.max_step", "max_steps"),  # the message suggests the real name
    (["+trainer.callbacks=[]"], "trainer.callbacks", "loralab sets this itself"),
    (["optim.lr=0"], "optim.lr", "0"),
    (["optim.warmup_ratio=1.0"], "optim.warmup_ratio", "1.0"),
    (["data.batch_size=0"], "data.batch_size", "0"),
    (["data.train_limit=0"], "data.train_limit", "0"),
    (["quant=nf4", "lora.method=full"], "quant.mode", "nf4"),
    (["lora.init=eva"], "lora.init", "eva"),
]


@pytest.mark.parametrize("overrides,field,value", BAD_VALUES, ids=[o[0] for o, _, _ in BAD_VALUES])
def test_bad_value_fails_before_loading(overrides: list[str], field: str, value: str, tmp_path: Path,
                                        token_cache: Path, no_loading: None) -> None:
    message = run_fails(overrides, tmp_path, token_cache)
    assert field in message and value in message


def test_unknown_task_group_names_it() -> None:
    with pytest.raises(MissingConfigException, match="foo"):
        compose(["task=foo"])


# --- preflight: checks that need the model's shape or the data source, still before any load ----------------

def test_missing_target_module_lists_the_real_ones(compose_cfg: Compose, no_loading: None) -> None:
    cfg = compose_cfg(["task=mrpc", "lora.target_modules=[nonexistent]"])
    with pytest.raises(ConfigError) as info:
        loralab.run.train.preflight(cfg)
    message = str(info.value)
    assert "lora.target_modules" in message and "nonexistent" in message
    for real in ("query", "key", "value", "dense"):
        assert real in message


@pytest.mark.parametrize("preset", ["o_r8", "qkvo_r2"])
def test_a_module_path_suffix_adapts_only_that_module(preset: str, compose_cfg: Compose) -> None:
    """`attention.output.dense` (the paper's W_o; plain `dense` would also hit the FFN and the pooler) passes the
    preflight and peft adapts exactly the six attention-output projections."""
    from loralab.run.model import build_model
    from loralab.run.weights import load_tokenizer, resolve_model_path

    cfg = compose_cfg(["task=sst2", f"lora=budget/{preset}"])
    loralab.run.train.preflight(cfg)
    resolved = resolve_model_path(cfg.model.path)
    model = build_model(cfg, resolved, load_tokenizer(cfg.model, resolved))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    outputs = {n for n in adapted if n.endswith("attention.output.dense")}
    assert len(outputs) == 6 and not any("intermediate" in n or "pooler" in n for n in adapted)
    assert len(adapted) == 6 * len(cfg.lora.target_modules)


def test_missing_head_module_is_named(compose_cfg: Compose, no_loading: None) -> None:
    cfg = compose_cfg(["task=mrpc", "model.head_modules=[classifier,score_head]"])
    with pytest.raises(ConfigError, match="model.head_modules.*score_head"):
        loralab.run.train.preflight(cfg)


@pytest.mark.parametrize("task,split", [("qqp", "train"), ("mnli", "train"), ("qnli", "train")])
def test_split_missing_from_the_mirror(task: str, split: str, tmp_path: Path, token_cache: Path,
                                       no_loading: None) -> None:
    if list((Path(GLUE_DIR) / task).glob(f"{split}-*.parquet")):
        pytest.skip(f"the mirror {GLUE_DIR} has {task}/{split}")
    message = run_fails([f"task={task}"], tmp_path, token_cache)
    assert f"split {split!r}" in message and "data.dir" in message and GLUE_DIR in message
    assert "data.dir=null" in message  # the fix


def test_data_dir_that_is_not_a_folder(tmp_path: Path, token_cache: Path, no_loading: None) -> None:
    message = run_fails(["task=rte", f"data.dir={tmp_path / 'nowhere'}"], tmp_path, token_cache)
    assert "data.dir" in message and "nowhere" in message


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 and an empty hub cache, whatever this machine has downloaded before."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def test_hub_model_offline_names_the_fix(tmp_path: Path, token_cache: Path, offline_hub: None,
                                         no_loading: None) -> None:
    message = run_fails(["model=roberta-base", "task=rte"], tmp_path, token_cache)
    assert "model.path" in message and "FacebookAI/roberta-base" in message
    assert "hub" in message and "HF_HUB_OFFLINE" in message and "model=minilm" in message


def test_hub_data_offline_names_the_fix(tmp_path: Path, token_cache: Path, offline_hub: None,
                                        no_loading: None) -> None:
    message = run_fails(["task=rte", "data.dir=null"], tmp_path, token_cache)
    assert "data.dir" in message and "hub" in message and "GLUE_DIR" in message


# --- the command line ---------------------------------------------------------------------------------------

def test_cli_bad_value_exits_nonzero_naming_the_field(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "train.py"), "lora.r=0", f"store.root={tmp_path / 'runs'}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    out = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert out.returncode == 2
    # The message alone: no traceback, no Hydra HYDRA_FULL_ERROR hint.
    assert out.stderr.strip().splitlines() == ["train.py: error: lora.r=0 is invalid: it must be a number > 0"]
    assert "Traceback" not in out.stdout + out.stderr and "HYDRA_FULL_ERROR" not in out.stdout + out.stderr
    assert not (tmp_path / "runs").exists()


def test_max_length_beyond_the_model_positions_is_refused(compose_cfg: Compose, no_loading: None) -> None:
    cfg = compose_cfg(["task=rte", "data.max_length=100000"])
    with pytest.raises(ConfigError, match=r"data.max_length=100000 .*512 positions.*data.max_length<=512"):
        loralab.run.train.preflight(cfg)
    loralab.run.train.preflight(compose_cfg(["task=rte", "data.max_length=512"]))  # the limit itself is fine


def test_schema_defaults_are_the_default_composition() -> None:
    """One set of defaults: the typed schema's own defaults equal what conf/ composes (environment-set paths and
    the Lightning arguments aside)."""
    from loralab.config import as_dict, validate
    from loralab.store import flatten

    schema, composed = flatten(as_dict(validate(Config()))), flatten(as_dict(compose([])))
    differ = {k for k in set(schema) | set(composed) if schema.get(k) != composed.get(k)}
    assert {k for k in differ if not k.startswith(("trainer", "data.dir", "data.cache_dir", "store.root"))} == set()


@pytest.mark.parametrize("task", sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml")))
def test_task_config_takes_its_facts_from_the_task_table(task: str) -> None:
    from loralab.tasks import TASKS

    cfg, row = compose([f"task={task}"]).task, TASKS[task]
    assert cfg.text_fields == list(row.text_fields) and cfg.num_labels == row.num_labels
    assert cfg.main_metric == row.main_metric and cfg.eval_splits == list(row.eval_splits)
    assert compose([f"task={task}", "task.num_labels=7"]).task.num_labels == 7  # an override still wins


def test_trainer_group_mirrors_lightning_trainer_arguments() -> None:
    """conf/trainer/default.yaml lists every lightning.Trainer argument (so each is overridable without `+`) and
    nothing else; a Lightning upgrade that adds or drops one fails here instead of drifting."""
    import inspect

    import lightning

    from loralab.config import _RESERVED_TRAINER_ARGS

    keys = set(yaml.safe_load((CONF_DIR / "trainer" / "default.yaml").read_text()))
    args = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"} - _RESERVED_TRAINER_ARGS
    assert keys == args

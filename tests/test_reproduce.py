"""`loralab reproduce`: the parts' grids compose to the stated schedule, blocks splice into the report without
touching its prose, and the figures part runs end to end on real (tiny) runs."""
from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest

from loralab.cli import main as cli
from loralab.config import Config, compose
from loralab.analysis.reproduction import PARTS, Paths, part_runs, reproduce, splice
from loralab.store import run_id

from conftest import REPO, needs_glue

SHORT_LIMITS = {"sst2": 4000, "mrpc": 2000, "cola": 4000, "rte": 1500, "stsb": 3000}  # the short schedule (QLoRA)
CONVERGED = {"sst2": (2, 20000), "mrpc": (10, None), "cola": (10, None), "rte": (10, None), "stsb": (6, None)}


@functools.cache
def composed(job: tuple[str, ...]) -> Config:
    """Each grid point composed once per test file (Hydra takes ~0.2 s a config; the parts share points)."""
    return compose([*job, "store.root=unused"])


@pytest.mark.parametrize(("name", "runs"), [("search", 30), ("table2", 60), ("table6", 30), ("table5", 7),
                                            ("figures", 4), ("qlora", 6)])
def test_each_part_composes_to_distinct_runs_on_the_stated_schedule(name: str, runs: int) -> None:
    ids, methods, targets = set(), set(), set()
    for sweep in PARTS[name].sweeps:
        for job in sweep.jobs():
            cfg = composed(tuple(job))
            epochs = cfg.trainer["max_epochs"]
            if name == "qlora":
                assert epochs == 2 and cfg.data.train_limit == SHORT_LIMITS[cfg.task.name]
            else:  # full train splits (SST-2: 20,000), each task's epochs
                assert (epochs, cfg.data.train_limit) == CONVERGED[cfg.task.name]
            assert cfg.model.name == "minilm"
            ids.add(run_id(cfg))
            methods.add((cfg.lora.method, cfg.optim.lr))
            targets.add((tuple(cfg.lora.target_modules), cfg.lora.r))
    assert len(ids) == runs
    if name == "table2":
        assert {m for m, _ in methods} == {"lora", "full", "bitfit", "head"}
        rates = {m: {lr for k, lr in methods if k == m} for m in ("lora", "full")}
        assert max(rates["full"]) < min(rates["lora"])  # full fine-tuning takes its own, smaller rates
    if name == "table5":  # equal budget: r * (number of weight types) is 8 for every cell
        assert {r * len(t) for t, r in targets} == {8}


def test_the_searches_seed_0_runs_are_table_2s() -> None:
    """Table 2's seed-0 run of a task is the search's trial at the learning rate the experiment records: the run
    store trains it once."""
    def ids(part: str) -> set[str]:
        return {run_id(composed(tuple(job))) for s in PARTS[part].sweeps for job in s.jobs()
                if "seed=1" not in job and "seed=2" not in job}

    search, table2 = ids("search"), ids("table2")
    assert len(table2) == 20 and len(search & table2) == 10  # lora and full: 5 tasks each; bitfit, head not searched


def test_parts_share_runs_and_count_each_once(tmp_path: Path) -> None:
    """Table 6's r=8 q,v cells are Table 2's LoRA seed-0 runs (the search's trials) and the figures' seed-0 adapters
    are Table 6's: one folder each in the shared store, counted in the compute of the first part that lists it."""
    from loralab.analysis.reproduction import part_compute

    paths = Paths(tmp_path / "runs", tmp_path / "docs", tmp_path / "R.md")
    table2, table6, figures = (part_runs(n, paths) for n in ("table2", "table6", "figures"))
    assert len(table2 & table6) == 2 and {f.parent.name for f in table2 & table6} == {"sst2", "stsb"}
    assert len(figures - table6) == 1  # r=64 at seed 1
    now = 1_000_000.0
    for folder in (table2 & table6) | (figures - table6):  # 60 s each: two shared runs, one of the figures' own
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"status": "finished", "job_started_at": now,
                                                         "finished_at": now + 60}))
    counts = {n: part_compute(n, paths) for n in ("search", "table2", "table6", "figures")}
    none = {"runs": 0, "compute_s": 0}  # the shared runs are the search's trials at the chosen rate: counted there
    assert counts == {"search": {"runs": 2, "compute_s": 120}, "table2": none, "table6": none,
                      "figures": {"runs": 1, "compute_s": 60}}


def test_a_search_hands_its_learning_rates_to_optunas_grid() -> None:
    (sweep,) = [s for s in PARTS["search"].sweeps if s.name == "lora_mrpc"]
    assert sweep.overrides() == ["+experiment=repro_minilm", "hparams_search=repro_lr", "task=mrpc",
                                 "optim.lr=choice(5e-4,1e-3,2e-3)"]
    assert len(sweep.jobs()) == 3
    # what `train.py -m` checks before anything runs (a choice() under hydra.* is refused there)
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    parsed = OverridesParser.create().parse_overrides(sweep.overrides())
    ConfigLoaderImpl.validate_sweep_overrides_legal(parsed, RunMode.MULTIRUN, from_shell=True)


def test_splice_rewrites_only_its_block() -> None:
    text = "# R\nintro\n<!-- reproduce:table2 -->\nold\n<!-- /reproduce:table2 -->\nprose after\n"
    new = "<!-- reproduce:table2 -->\nnew\n<!-- /reproduce:table2 -->"
    once = splice(text, "table2", new)
    assert once == "# R\nintro\n" + new + "\nprose after\n"
    assert splice(once, "table2", new) == once
    appended = splice(once, "table6", "<!-- reproduce:table6 -->\nT6\n<!-- /reproduce:table6 -->")
    assert appended.startswith(once.rstrip("\n")) and appended.endswith("<!-- /reproduce:table6 -->\n")


def test_unknown_part_is_named_with_the_choices(capsys) -> None:
    assert cli(["reproduce", "--only", "tabel2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--only" in err and "tabel2" in err and "table2" in err


def test_analysis_only_waits_for_every_run_of_the_figures_but_not_of_a_table(tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    """The figures read all four adapters: with three finished their block is left alone. A table shows whichever
    cells finished, so one finished run is enough to write its block."""
    import loralab.analysis.reproduction as reproduction

    monkeypatch.setattr(reproduction, "analyse", lambda name, paths: f"{name} analysed")
    paths = Paths(tmp_path / "runs", tmp_path / "docs", tmp_path / "R.md")
    paths.report.write_text("# R\n")
    figures = sorted(part_runs("figures", paths))
    for folder in figures[:3]:
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"status": "finished"}))
    reproduce(["figures"], paths, analysis_only=True)
    assert paths.report.read_text() == "# R\n" and "3 of its 4 runs finished" in capsys.readouterr().out
    reproduce(["table6"], paths, analysis_only=True)  # three of Table 6's runs are among them
    assert "<!-- reproduce:table6 -->" in paths.report.read_text() and "table6 analysed" in paths.report.read_text()


def test_the_adapters_the_figures_read_are_committed() -> None:
    """.gitignore keeps adapters local except the figures' four (by run id): a config change that moves those ids
    must update it, or a fresh clone could not rebuild the figures."""
    paths = Paths(REPO / "docs" / "reproduction" / "runs", REPO / "docs" / "reproduction", REPO / "REPRODUCTION.md")
    for folder in part_runs("figures", paths):
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            path = (folder / "adapter" / name).relative_to(REPO)
            ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", str(path)], cwd=REPO)
            assert ignored.returncode == 1, f"{path} is ignored: update .gitignore's list of the figures' adapters"


@needs_glue("sst2")
def test_figures_part_end_to_end_on_tiny_real_runs(tmp_path: Path, token_cache: Path) -> None:
    report = tmp_path / "REPRODUCTION.md"
    report.write_text("# Reproduction\nhand-written prose\n")
    quick = ("data.train_limit=64", "data.val_limit=32", "trainer.max_steps=4", "optim.lr=2e-3",
             f"data.cache_dir={token_cache}", "trainer.enable_progress_bar=false")
    paths = Paths(tmp_path / "runs", tmp_path / "docs", report, quick)
    reproduce(["figures"], paths)

    text = report.read_text()
    assert text.startswith("# Reproduction\nhand-written prose\n")
    assert "<!-- reproduce:figures -->" in text and "1 run trained" in text  # r=4, 8, 64 at seed 0 are Table 6's runs
    assert len(list((tmp_path / "runs" / "table2" / "sst2").glob("*/adapter"))) == 4
    for folder, (r1, r2) in (("fig3_r8_vs_r64", (8, 64)), ("fig4_r64_seeds", (64, 64))):
        data = json.loads((tmp_path / "docs" / folder / "similarity.json").read_text())
        assert sorted(res["module"].rsplit(".", 1)[-1] for res in data["results"]) == ["query", "value"]
        for res in data["results"]:
            assert res["layer"] == 3 and (len(res["grid"]), len(res["grid"][0])) == (r1, r2)
            assert all(0.0 <= v <= 1.0 + 1e-6 for row in res["grid"] for v in row)
        assert len(list((tmp_path / "docs" / folder).glob("*.png"))) == 2
        assert f"docs/{folder}/" in text  # figures linked relative to the report
    for r in (4, 64):
        rows = json.loads((tmp_path / "docs" / f"amplification_r{r}" / "amplification.json").read_text())["rows"]
        assert len(rows) == 12 and all(row["r"] == r and row["norm_dW"] > 0 for row in rows)
        assert f"| {r} | query |" in text and f"| {r} | value |" in text

    before = text
    # From the finished runs alone (skipping finished runs is tested with the sweeps): the block is rebuilt identically.
    reproduce(["figures"], paths, analysis_only=True)
    assert report.read_text() == before
    # a part with no finished runs here (trained on another machine, or not yet) keeps its block as it is
    reproduce(["qlora"], paths, analysis_only=True)
    assert report.read_text() == before

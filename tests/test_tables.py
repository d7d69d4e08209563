"""Results tables from a hand-made results folder, plus the table CLI and plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from loralab.analysis import layouts, plots, render, tables
from loralab.cli import main
from loralab.errors import AnalysisError

# (method, task, target_modules, r, seed, accuracy, trainable_params, peak_memory_mb)
RUNS = [
    ("lora", "mrpc", ["query", "value"], 8, 0, 0.80, 74498, 900.0),
    ("lora", "mrpc", ["query", "value"], 8, 1, 0.84, 74498, 900.0),
    ("lora", "mrpc", ["query", "value"], 8, 2, 0.83, 74498, 900.0),
    ("lora", "mrpc", ["query", "value"], 2, 0, 0.78, 19202, 880.0),
    ("lora", "mrpc", ["query", "value"], 2, 1, 0.76, 19202, 880.0),
    ("lora", "mrpc", ["query"], 8, 0, 0.70, 37634, 870.0),
    ("lora", "rte", ["query", "value"], 8, 0, 0.60, 74498, 900.0),
    ("lora", "rte", ["query", "value"], 8, 1, 0.64, 74498, 900.0),
    ("full", "mrpc", None, None, 0, 0.86, 22787714, 2000.0),
    ("full", "mrpc", None, None, 1, 0.88, 22787714, 2000.0),
    ("full", "rte", None, None, 0, 0.66, 22787714, 2000.0),
]


def write_runs(root: Path) -> Path:
    for n, (method, task, targets, r, seed, acc, params, mem) in enumerate(RUNS):
        lora = (
            {"method": method, "r": r, "alpha": 16, "target_modules": targets}
            if targets
            else {"method": method}
        )
        result = {
            "status": "finished",
            "run_id": f"run{n}",
            "task": task,
            "model": "minilm",
            "seed": seed,
            "method": method,
            "metrics": {"best": {"accuracy": acc, "f1": acc + 0.05}, "final": {"accuracy": acc}},
            "main_metric": {"name": "accuracy", "value": acc},
            "best_epoch": 3,
            "trainable_params": params,
            "total_params": 22787714,
            "adapter_bytes": 300000,
            "train_time_s": 12.0,
            "train_samples_per_s": 150.0,
            "peak_memory_mb": mem,
            "config": {
                "task": {"name": task},
                "model": {"name": "minilm"},
                "lora": lora,
                "optim": {"lr": 5e-4},
                "seed": seed,
                "store": {"root": f"store{n % 2}"},  # where a run is recorded is not an axis
            },
            "versions": {"torch": "2"},
            "git_commit": "abc",
            # measured per run, never axes: a cell of equal configs must not be reported as mixed
            "job_started_at": 1000.0 + n,
            "measured_memory_mb": 500.0 + n,
            "memory_estimate": {"total_mb": 300.0 + n},
        }
        folder = root / f"run{n}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(result))
    for n, status in enumerate(["failed", "running"]):
        folder = root / f"bad{n}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"status": status, "run_id": f"bad{n}"}))
    return root


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    return write_runs(tmp_path / "runs")


def test_collect_flattens_and_skips(runs: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(runs, target_is_directory=True)
    data = tables.collect(tmp_path / "link")
    assert len(data.df) == len(RUNS)
    assert data.skipped == 2 and data.skipped_status == {"failed": 1, "running": 1}
    row = data.df[data.df["run_id"] == "run0"].iloc[0]
    assert row["lora.target_modules"] == "query,value" and row["lora.r"] == 8
    assert row["metrics.best.f1"] == pytest.approx(0.85) and row["optim.lr"] == pytest.approx(5e-4)
    assert "versions.torch" not in data.df.columns
    # a part of a shared store (REPRODUCTION.md's Table 2 beside the search's other learning rates): only its run ids
    assert list(tables.collect(runs, only={"run0", "run1"}).df["run_id"].sort_values()) == ["run0", "run1"]


def test_pivot_medians_match_hand_computed(runs: Path) -> None:
    df = tables.collect(runs).df
    p = tables.pivot(df[df["method"] == "lora"], ["task", "lora.target_modules"], ["lora.r"])
    assert list(p.median.columns) == ["2", "8"]  # numeric order of r
    assert p.median.at["mrpc / query,value", "8"] == pytest.approx(83.0)  # median(80, 84, 83)
    assert p.spread.at["mrpc / query,value", "8"] == pytest.approx(2.0)  # (84 - 80) / 2
    assert p.median.at["mrpc / query,value", "2"] == pytest.approx(77.0)
    assert p.count.at["rte / query,value", "8"] == 2
    assert p.display.at["mrpc / query,value", "8"].startswith("83.0 ±2.0")
    assert p.display.at["mrpc / query", "8"].startswith("70.0")  # one seed: no spread
    assert np.isnan(p.median.at["mrpc / query", "2"])
    std = tables.pivot(df[df["method"] == "lora"], ["task"], ["lora.r"], spread="std")
    assert std.spread.at["mrpc", "2"] == pytest.approx(np.std([78, 76], ddof=1))


def test_metric_choice(runs: Path) -> None:
    df = tables.collect(runs).df
    p = tables.pivot(df, ["method"], ["task"], metric="f1")
    assert p.metric == "metrics.best.f1"
    assert p.median.at["full", "mrpc"] == pytest.approx(92.0)  # median(91, 93)
    with pytest.raises(AnalysisError, match="--metric"):
        tables.pivot(df, ["method"], ["task"], metric="nope")


def test_table2_layout(runs: Path) -> None:
    df = tables.collect(runs).df
    mixed = layouts.table2(df)
    assert {"lora.r", "lora.target_modules"} <= set(mixed.mixed)  # the lora row mixes configs
    one = df[(df["method"] == "full") | ((df["lora.r"] == 8) & (df["lora.target_modules"] == "query,value"))]
    p = layouts.table2(one)
    assert p.mixed == []
    assert list(p.display.columns) == ["# Params", "mrpc (accuracy)", "rte (accuracy)", "Avg."]
    assert list(p.display.index) == ["full", "lora"]  # the paper's order: baselines above LoRA
    assert p.display.at["full", "# Params"] == "22.8M" and p.display.at["lora", "# Params"] == "74.5K"
    assert p.display.at["full", "Avg."] == "76.5"  # mean(87, 66)
    assert p.display.at["lora", "Avg."] == "72.5"  # mean(83, 62)


def test_table5_and_table6_layouts(runs: Path) -> None:
    df = tables.collect(runs).df
    t5 = layouts.table5(df)
    assert t5.median.at["mrpc", "query,value (r=8)"] == pytest.approx(83.0)
    t6 = layouts.table6(df)
    assert set(t6) == {"mrpc", "rte"}
    assert t6["mrpc"].median.at["query,value", "2"] == pytest.approx(77.0)
    md, tex, csv = render.render(t6)
    assert "**mrpc**" in md and r"\begin{tabular}" in tex and set(csv["block"]) == {"mrpc", "rte"}
    assert list(t6["mrpc"].display.index) == ["query", "query,value"]
    # the paper's row order: q; q,v; q,k,v,o (not alphabetical, which puts q,k,v,o before q,v)
    labels = ["query,value", "query,key,value,attention.output.dense", "query"]
    assert layouts.by_module_count(labels) == ["query", "query,value", "query,key,value,attention.output.dense"]
    budget = ["attention.output.dense (r=8)", "key (r=8)", "query,value (r=4)", "query (r=8)", "value (r=8)"]
    assert layouts.by_module_count(budget) == ["query (r=8)", "key (r=8)", "value (r=8)",
                                              "attention.output.dense (r=8)", "query,value (r=4)"]


def test_pareto_front() -> None:
    mask = plots.pareto_front([1, 2, 3, 4], [50, 60, 55, 70])
    assert mask.tolist() == [True, True, False, True]


def test_markdown_and_latex_escape_cells_and_captions() -> None:
    import pandas as pd

    table = pd.DataFrame(
        {"a|b": ["83.0 ±2.0", "–"], "Avg.": ["70.0†", "1_0 % & #"]},
        index=pd.Index(["q|v", "query"], name="lora.target_modules"),
    )
    md = render.to_markdown(table)
    head, rule, *body = md.splitlines()
    assert re.fullmatch(r"\| lora\.target_modules +\| +a\\\|b +\| +Avg\. +\|", head)
    assert re.fullmatch(r"\|:-+\|:-+:\|:-+:\|", rule)  # row labels left, cells centred
    assert [c.strip() for c in body[0].strip("|").split(" | ")] == ["q\\|v", "83.0 ±2.0", "70.0†"]
    tex = render.to_latex(table, "metrics.best.f1 (%): median ± std")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\begin{tabular}{lcc}" in tex and r"\begin{table}[t]" in tex
    assert r"lora.target\_modules & a|b & Avg. \\" in tex
    assert r"q|v & 83.0 $\pm$2.0 & 70.0$^\dagger$ \\" in tex
    assert r"query & -- & 1\_0 \% \& \# \\" in tex
    assert r"\caption{metrics.best.f1 (\%): median $\pm$ std}" in tex
    assert r"\begin{table}" not in render.to_latex(table)  # no caption: a bare tabular


def test_mixed_axes_follow_the_run_id(runs: Path) -> None:
    df = tables.collect(runs).df
    assert tables.is_axis("lora.r") and tables.is_axis("optim.lr")
    for key in ("seed", "store.root", "data.num_workers", "measured_memory_mb", "metrics.best.f1", "run_id"):
        assert not tables.is_axis(key), key
    lora = df[df["method"] == "lora"]
    assert tables.mixed_axes(lora, ["task", "lora.target_modules", "lora.r"]) == []
    assert tables.mixed_axes(lora, ["task"]) == ["lora.r", "lora.target_modules"]


def run_cli(*argv: str) -> int:
    return main(list(argv))


def test_table_cli(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "out" / "t6"
    assert run_cli("table", str(runs), "--layout", "table6", "--out", str(prefix), "--plots") == 0
    captured = capsys.readouterr()
    assert re.search(r"^\| lora\.target_modules +\|", captured.out, re.M) and "skipped 2" in captured.err
    for ext in ("md", "tex", "csv"):
        assert prefix.with_name("t6." + ext).is_file()
    for png in ("t6_rank.png", "t6_params.png", "t6_memory.png"):
        assert (tmp_path / "out" / png).stat().st_size > 0
    assert (
        run_cli("table", str(runs), "--rows", "task", "--cols", "lora.r", "--out", str(tmp_path / "g")) == 0
    )


def test_table_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("table", str(tmp_path / "nope"), "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "DIR:" in err and "nope" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert run_cli("table", str(tmp_path / "empty"), "--out", str(tmp_path / "x")) == 2
    write_runs(tmp_path / "r")
    assert run_cli("table", str(tmp_path / "r"), "--rows", "bogus", "--out", str(tmp_path / "x")) == 2
    assert "bogus" in capsys.readouterr().err

"""Helpers for tests/test_sweeps.py: launch `python train.py` as a user would, read what a sweep leaves on disk."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conftest import REPO

from loralab.sweep.collect import find_results
from loralab.sweep.summary import SUMMARY

TRAIN_PY = REPO / "train.py"
# A tiny real run: 64 RTE training pairs (two steps of 32), 32 dev pairs.
TINY = ("task=rte", "data.train_limit=64", "data.val_limit=32", "trainer.max_steps=2")
TIMEOUT_S = 900  # a hang fails the test instead of the whole session; the machine may be shared and slow


def clean_env(**extra: str) -> dict[str, str]:
    """The test session's environment (conftest: offline hub, W&B disabled) for a child process, plus `extra`.

    LORALAB_UID is dropped: it is set by a launching process for its own children (joblib workers, DDP ranks),
    so an inherited one would make two independent sweeps share their folder suffix."""
    env = {k: v for k, v in os.environ.items() if k != "LORALAB_UID"}
    env.update(extra)
    return env


def train_cmd(*overrides: str, cache: Path) -> list[str]:
    """`python train.py ...` with the shared tokenization cache and no progress bar."""
    return [sys.executable, str(TRAIN_PY), *overrides, f"data.cache_dir={cache}", "trainer.enable_progress_bar=false"]


def launch(cmd: Sequence[str], cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run to completion; stdout and stderr are kept together in `.stdout` (Hydra logs to both)."""
    return subprocess.run(list(cmd), cwd=cwd, env=env or clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S, check=False)


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    """The end of a process's output, for assertion messages."""
    return f"exit {proc.returncode}\n{proc.stdout[-n:]}"


def read_summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(Path(sweep_dir) / SUMMARY, newline="") as f:
        return list(csv.DictReader(f))


def results_under(root: Path) -> dict[Path, dict[str, Any]]:
    """Every results.json under root (following job -> run links, as summaries do), keyed by its real folder."""
    return {p.resolve().parent: json.loads(p.read_text()) for p in find_results(Path(root))}


def finished_runs(store: Path) -> list[dict[str, Any]]:
    return [r for r in results_under(store).values() if r["status"] == "finished"]


def sweep_folders(cwd: Path) -> list[Path]:
    """Sweep folders created under cwd by Hydra's default `multirun/<date>/<time>_<uid>`."""
    return sorted(p for p in (cwd / "multirun").glob("*/*") if p.is_dir())

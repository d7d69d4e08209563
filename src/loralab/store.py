"""The run store: run identity (hash of the semantic config), results.json (atomic), provenance, skip/resume."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from .config import Config, as_dict

RESULTS = "results.json"
# Settings that change where or how a run is recorded, never what it computes: they do not enter the run id.
NON_SEMANTIC = {
    "store": None, "logger": None,
    "data": {"dir", "cache_dir", "num_workers", "eval_batch_size"},
    "trainer": {"log_every_n_steps", "enable_progress_bar", "enable_model_summary", "num_sanity_val_steps",
                "default_root_dir", "profiler", "barebones"},
}
PACKAGES = ("loralab", "torch", "lightning", "transformers", "peft", "datasets", "torchmetrics", "hydra-core",
            "bitsandbytes", "wandb", "numpy", "tokenizers")


def semantic_config(cfg: Config) -> dict[str, Any]:
    d = as_dict(cfg)
    for key, fields in NON_SEMANTIC.items():
        if fields is None:
            d.pop(key, None)
        else:
            for f in fields:
                d.get(key, {}).pop(f, None)
    return d


def run_id(cfg: Config) -> str:
    digest = hashlib.sha256(json.dumps(semantic_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:10]
    method = f"lora-r{cfg.lora.r}" if cfg.lora.method == "lora" else cfg.lora.method
    return f"{cfg.model.name}-{method}-s{cfg.seed}-{digest}"


def run_dir(cfg: Config) -> Path:
    return Path(cfg.store.root) / cfg.task.name / run_id(cfg)


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_results(folder: Path) -> Optional[dict]:
    path = Path(folder) / RESULTS
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class RunBusy(RuntimeError):
    """Another live process is training this very run (same config, same store)."""


@contextlib.contextmanager
def run_lock(folder: Path):
    """Hold an exclusive lock on a run folder while training it; the OS drops it when the process dies, so a killed
    run never blocks its relaunch, while two live processes (e.g. an orphaned parallel worker) never share a run."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"{folder} is being trained by another live process; wait for it or stop it "
                          f"(its results will land here)") from None
        yield


@dataclass
class RunRecord:
    """What every results.json starts from; `finish` and `fail` complete it."""

    cfg: Config
    folder: Path
    writer: bool = True  # False on DDP ranks > 0: results are written once, by rank 0
    extra: dict[str, Any] = field(default_factory=dict)  # known before training (e.g. the memory estimate)

    def base(self, status: str) -> dict[str, Any]:
        c = self.cfg
        return {"status": status, "run_id": self.folder.name, "task": c.task.name, "model": c.model.name,
                "seed": c.seed, "method": c.lora.method, "config": as_dict(c), "versions": versions(),
                "git_commit": git_commit(), "hardware": hardware(), **self.extra}

    def _write(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.writer:
            write_json(self.folder / RESULTS, data)
        return data

    def start(self) -> None:
        self._write(self.base("running"))

    def finish(self, **fields: Any) -> dict[str, Any]:
        return self._write({**self.base("finished"), **fields})

    def fail(self, error: BaseException, **fields: Any) -> dict[str, Any]:
        return self._write({**self.base("failed"), "error": f"{type(error).__name__}: {error}", **fields})

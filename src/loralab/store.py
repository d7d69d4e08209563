"""The run store: run identity (hash of the semantic config), the only writer of results.json, run folders, provenance.

A run lives at <store.root>/<task>/<run_id>; a Hydra job folder links to it (`run`). What a run and a sweep record
(results, checkpoints, summaries, caches) goes through `atomic_write`, so a reader or a crash never sees half a file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from .config import Config, as_dict
from .errors import DiskFull, Interrupted, RunBusy

log = logging.getLogger("loralab")

RESULTS = "results.json"
RUN_LINK = "run"  # in each Hydra job folder: a link to the run's folder in the store
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Settings that change where or how a run is recorded, never what it computes: they do not enter the run id.
NON_SEMANTIC = {
    "store": None, "logger": None,
    "data": {"dir", "cache_dir", "num_workers", "eval_batch_size"},
    "trainer": {"log_every_n_steps", "enable_progress_bar", "enable_model_summary", "num_sanity_val_steps",
                "default_root_dir", "profiler", "barebones"},
}
# Fields added after run ids were first pinned: at this value they stay out of the run id, so every run made before
# them keeps its id; set to anything else, they enter it.
NEUTRAL = {"data": {"length_buckets": None}, "model": {"dropout": None}}
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
PACKAGES = ("loralab", "torch", "lightning", "transformers", "peft", "datasets", "torchmetrics", "hydra-core",
            "bitsandbytes", "wandb", "numpy", "tokenizers")


def is_semantic(key: str) -> bool:
    """Whether a dotted config key (`lora.r`, `data.num_workers`) enters the run id, i.e. changes what a run computes."""
    head, _, rest = key.partition(".")
    if head not in NON_SEMANTIC:
        return True
    fields = NON_SEMANTIC[head]
    return not (fields is None or rest in fields or rest.split(".")[0] in fields)


def semantic_config(cfg: Config) -> dict[str, Any]:
    d = as_dict(cfg)
    for key, defaults in NEUTRAL.items():
        for f, value in defaults.items():
            if d.get(key, {}).get(f, value) == value:
                d.get(key, {}).pop(f, None)
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


def atomic_write(path: Path, write: Callable[[Path], Any], need_bytes: Optional[int] = None) -> Path:
    """`write(tmp)` fills a temporary sibling of `path` (file or folder), which then replaces `path` in one rename:
    a reader, a concurrent job or a crash never sees half of it, and a full disk leaves the old `path` as it was
    (DiskFull names the path, `need_bytes` when known, and the space that was free). The tmp name ends in path's
    own suffix (numpy and safetensors writers keep it)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or NO_SPACE in str(e):
            raise disk_full(path, need_bytes) from e  # (safetensors reports ENOSPC as its own error, with this text)
        raise
    return path


def disk_full(path: Path, need_bytes: Optional[int]) -> DiskFull:
    import shutil

    free = shutil.disk_usage(path.parent).free
    need = f"about {need_bytes / 2**20:.1f} MiB" if need_bytes else "more space"
    return DiskFull(f"no space left on the disk of {path}: writing it needs {need}, {free / 2**20:.1f} MiB are free. "
                    f"Nothing written before was changed; free space there (or set store.root to a disk with room) "
                    f"and relaunch: the run resumes from its last checkpoint")


def set_aside(path: Path, reason: str, then: str) -> Path:
    """Rename a damaged file out of the way (never delete it: it may still be worth a look) and say so in one line:
    what is wrong, where it went, `then` (what happens next)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    os.replace(path, target)
    log.warning("%s is damaged (%s); set aside as %s; %s", path, reason, target.name, then)
    return target


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), need_bytes=len(text.encode()))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str))


def read_results(folder: Path) -> Optional[dict]:
    """A folder's results.json, or None when it has none (or one that does not parse)."""
    path = Path(folder) / RESULTS
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def results_damaged(folder: Path) -> Optional[str]:
    """Why a folder's results.json does not parse (truncated, not JSON, not an object); None when it does or is absent."""
    path = Path(folder) / RESULTS
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{type(e).__name__}: {e}"
    return None if isinstance(data, dict) else f"a JSON {type(data).__name__}, not an object"


def write_results(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The only writer of results.json (atomic)."""
    write_json(Path(folder) / RESULTS, data)
    return data


def record_invalid_job(job_dir: Path, error: BaseException, config: dict) -> dict[str, Any]:
    """A sweep job whose config never became a run (invalid values): its failure is recorded in its job folder."""
    return write_results(job_dir, {"status": "failed", "run_id": None, "error": f"{type(error).__name__}: {error}",
                                   "config": config})


def mark_failed(folder: Path, reason: str) -> Optional[dict[str, Any]]:
    """Record a run still marked running as failed (its job died without a word); other states stay."""
    data = read_results(folder)
    if data is None or data.get("status") != "running":
        return None
    return write_results(folder, {**data, "status": "failed", "error": reason})


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (`lora.r`); lists as comma-joined text, as summary.csv and W&B show them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return out


def link_job(job_dir: Path, folder: Path) -> None:
    """Link a Hydra job folder to its run's folder in the store (summaries and `loralab predict JOB` follow it)."""
    link = Path(job_dir) / RUN_LINK
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(folder).resolve(), target_is_directory=True)


def run_folder(path: str | Path) -> Optional[Path]:
    """The run folder `path` names: a store run folder (results.json), its adapter/, or a Hydra job folder that links
    to one; None when it is none of these."""
    path = Path(path).expanduser()
    for cand in (path, path.parent if path.name == "adapter" else None):
        if cand is not None and (cand / RESULTS).is_file():
            return cand
    link = path / RUN_LINK
    return link.resolve() if (link / RESULTS).is_file() else None


def adapter_folder(path: str | Path) -> Optional[Path]:
    """The peft adapter folder named by `path`: the folder itself, a run folder's adapter/, or the adapter of the run
    a Hydra job folder links to (None: none of these)."""
    path = Path(path).expanduser()
    for folder in (path, path / "adapter", (path / RUN_LINK).resolve() / "adapter"):
        if all((folder / f).is_file() for f in ADAPTER_FILES):
            return folder
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
    """The machine a run used: CPU (as /proc/cpuinfo names it), cores, torch build, GPU and the devices it was given."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def hardware_text(info: Optional[dict[str, Any]] = None) -> str:
    h = info or hardware()
    return f"{h['cpu']}, {h['cores']} cores, {('GPU ' + h['gpu']) if h.get('gpu') else 'no GPU'}, torch {h['torch']}"


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
        return write_results(self.folder, data) if self.writer else data

    def start(self) -> None:
        self._write(self.base("running"))

    def finish(self, **fields: Any) -> dict[str, Any]:
        return self._write({**self.base("finished"), **fields, "finished_at": time.time()})

    def fail(self, error: BaseException, **fields: Any) -> dict[str, Any]:
        """Record the failure. A record that cannot be written (the disk is full) is logged, never raised: the error
        that ended the run is the one to report, and the results.json already there stays intact."""
        text = f"{type(error).__name__}: {error}"
        if isinstance(error, Interrupted):
            text = str(error)
        elif isinstance(error, (KeyboardInterrupt, SystemExit)) or type(error).__name__ == "SIGTERMException":
            text = (f"interrupted ({type(error).__name__}: SIGTERM, a time limit or Ctrl-C) before it finished; "
                    f"relaunch it to resume from its last checkpoint")
        data = {**self.base("failed"), "error": text, **fields}
        try:
            return self._write(data)
        except DiskFull as e:
            log.error("could not record the failure of %s: %s", self.folder, e)
            return data

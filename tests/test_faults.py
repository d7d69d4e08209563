"""Runs that survive the faults of a real cluster (issue 20): a stop signal mid-epoch, damaged checkpoints and
results, a full disk. Each is a real `python train.py` subprocess on a small real RTE run; every run that was
interrupted, damaged or starved of disk ends equal to the run that never was. (SLURM's time limit and requeue:
tests/test_slurm.py, on the real cluster.)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, needs_glue
from safetensors.torch import load_file, save_file
from sweep_helpers import TIMEOUT_S, clean_env, launch, results_under, tail, train_cmd

from loralab.lightning.checkpoint_io import (DamagedCheckpoint, load_checkpoint_file, previous, resume_point,
                                             save_checkpoint_file)
from loralab.store import write_json

pytestmark = needs_glue("rte")

# 6 optimizer steps per epoch, 12 in all. Dropout stays on (LoRA's and the model's): a mid-epoch resume must restore
# the random stream as well as the data position.
RUN = ("task=rte", "data.train_limit=96", "data.batch_size=16", "data.val_limit=32", "trainer.max_epochs=2",
       "optim.lr=2e-3")
CKPT = Path("checkpoints") / "last.safetensors"

# train.py as a user runs it, except that the process sends itself SIGTERM during one training step (epoch, batch
# from LORALAB_TEST_SIGTERM_AT): the same signal a `kill` or a scheduler sends, at a step the test chooses.
SIGTERM_DURING_STEP = """
import os, runpy, signal, sys
from loralab.run.module import GlueModule

epoch, batch = map(int, os.environ["LORALAB_TEST_SIGTERM_AT"].split(":"))
step = GlueModule.training_step

def training_step(self, b, batch_idx):
    if (self.current_epoch, batch_idx) == (epoch, batch):
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, b, batch_idx)

GlueModule.training_step = training_step
sys.argv = sys.argv[1:]  # [train.py, overrides...]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_run(run: Path, ref: dict[str, Any], ref_folder: Path) -> dict[str, Any]:
    got = json.loads((run / "results.json").read_text())
    assert got["status"] == "finished", got.get("error")
    assert got["history"] == ref["history"] and got["metrics"] == ref["metrics"]
    assert got["global_steps"] == ref["global_steps"] == 12
    a, b = adapter(ref_folder), adapter(run)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff == 0, f"the resumed adapter differs from the uninterrupted one by up to {diff:.2e}"
    return got


def interrupt(store: Path, out: Path, cache: Path, at: str = "1:2", *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", SIGTERM_DURING_STEP, *train_cmd(*RUN, f"store.root={store}",
                                                                  f"hydra.run.dir={out}", *extra, cache=cache)[1:]]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(LORALAB_TEST_SIGTERM_AT=at), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S, check=False)


def relaunch(store: Path, out: Path, cache: Path) -> subprocess.CompletedProcess:
    return launch(train_cmd(*RUN, f"store.root={store}", f"hydra.run.dir={out}", cache=cache))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> dict[str, Any]:
    """The run never interrupted: what every survivor must end equal to."""
    tmp = tmp_path_factory.mktemp("plain")
    proc = relaunch(tmp / "runs", tmp / "out", token_cache)
    assert proc.returncode == 0, tail(proc)
    (folder, results), = results_under(tmp / "runs").items()
    return {"folder": folder, "results": results}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> dict[str, Any]:
    """SIGTERM during the third step of the second epoch: a mid-epoch checkpoint, the epoch-end one kept as prev-."""
    tmp = tmp_path_factory.mktemp("interrupted")
    proc = interrupt(tmp / "runs", tmp / "out", token_cache)
    (folder,) = [p.parent for p in (tmp / "runs").rglob("results.json")]
    keep = tmp / "pristine"  # each test resumes its own copy
    shutil.copytree(folder, keep)
    return {"proc": proc, "folder": folder, "pristine": keep, "tmp": tmp}


def copy_of(interrupted: dict[str, Any], name: str) -> tuple[Path, Path]:
    """A fresh store holding the interrupted run (same run id): (store, run folder)."""
    store = interrupted["tmp"] / name
    folder = store / "rte" / interrupted["folder"].name
    shutil.copytree(interrupted["pristine"], folder)
    return store, folder


def test_sigterm_leaves_a_mid_epoch_checkpoint_and_says_interrupted(interrupted: dict[str, Any]) -> None:
    proc, folder = interrupted["proc"], interrupted["folder"]
    assert proc.returncode == 128 + signal.SIGTERM, tail(proc)
    assert "train.py: interrupted by SIGTERM at epoch 1, batch 3 (step 9)" in proc.stdout, tail(proc)
    record = json.loads((folder / "results.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("interrupted by SIGTERM"), record["error"]
    ckpt = load_checkpoint_file(folder / CKPT)
    assert ckpt["global_step"] == 9 and ckpt["epoch"] == 1
    assert ckpt["GlueDataModule"] == {"epoch": 1, "done": 3}  # the data position
    assert load_checkpoint_file(previous(folder / CKPT))["global_step"] == 6  # the epoch-end checkpoint before it


def test_relaunch_resumes_from_that_step_and_ends_as_if_never_stopped(
        interrupted: dict[str, Any], plain: dict[str, Any], token_cache: Path) -> None:
    store, folder = copy_of(interrupted, "resumed")
    proc = relaunch(store, interrupted["tmp"] / "out2", token_cache)
    assert proc.returncode == 0, tail(proc)
    got = assert_same_run(folder, plain["results"], plain["folder"])
    assert got["resumed_from"] == str(folder / CKPT)
    assert [(i["signal"], i["epoch"], i["batch"], i["step"]) for i in got["interruptions"]] == [("SIGTERM", 1, 3, 9)]


def test_damaged_checkpoint_and_results_are_set_aside_and_the_previous_checkpoint_resumes(
        interrupted: dict[str, Any], plain: dict[str, Any], token_cache: Path) -> None:
    """The resume point cut in half (as a partial copy, a full disk or a bad node leaves it) and results.json cut
    short: `loralab collect` lists the run as damaged; the relaunch sets both aside (renamed, not deleted), says so,
    resumes from the checkpoint before and ends as if nothing had happened."""
    from loralab.sweep.collect import DAMAGED, read_all

    store, folder = copy_of(interrupted, "damaged")
    last = folder / CKPT
    os.truncate(last, last.stat().st_size // 2)
    (folder / "results.json").write_text('{"status": "failed", "err')
    assert [r["status"] for r in read_all(store)] == [DAMAGED]
    proc = relaunch(store, interrupted["tmp"] / "out3", token_cache)
    assert proc.returncode == 0, tail(proc)
    assert "results.json is damaged (JSONDecodeError" in proc.stdout, tail(proc)
    assert "last.safetensors is damaged (" in proc.stdout and "resuming from prev-last.safetensors" in proc.stdout, \
        tail(proc)
    assert len(list(folder.glob("results.json.damaged-*"))) == 1
    (aside,) = last.parent.glob("last.safetensors.damaged-*")
    assert aside.stat().st_size > 0
    got = assert_same_run(folder, plain["results"], plain["folder"])
    assert got["resumed_from"] == str(previous(last))


def test_a_checkpoint_that_fails_its_checksum_is_set_aside(tmp_path: Path) -> None:
    """A bit flip in the tensors (size and header intact) is caught by the checksum written with the file; with no
    good checkpoint left the run starts over, and nothing is deleted."""
    path = tmp_path / "last.safetensors"
    state = {"state_dict": {"w": torch.arange(64, dtype=torch.float32)}, "epoch": 0}
    save_checkpoint_file(state, path)
    save_checkpoint_file({**state, "epoch": 1}, path)  # the first becomes prev-last.safetensors
    assert load_checkpoint_file(path)["epoch"] == 1 and load_checkpoint_file(previous(path))["epoch"] == 0
    for p in (path, previous(path)):
        data = bytearray(p.read_bytes())
        data[-5] ^= 0x10
        p.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="checksum"):
        load_checkpoint_file(path)
    assert resume_point(path) is None
    assert not path.exists() and not previous(path).exists()
    assert len(list(tmp_path.glob("*.damaged-*"))) == 2


def test_a_foreign_safetensors_file_is_damaged_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "last.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))  # a valid safetensors file, but no checkpoint
    with pytest.raises(DamagedCheckpoint, match="no loralab checkpoint metadata"):
        load_checkpoint_file(path)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of a chosen size (root only: CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def size(mib: float) -> None:
        opts = f"size={int(mib * 1024)}k"
        cmd = ["mount", "-o", f"remount,{opts}", str(mount)] if os.path.ismount(mount) else \
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mount)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); this test needs root")

    yield mount, size
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def test_full_disk_fails_cleanly_and_the_relaunch_resumes(small_disk, plain: dict[str, Any], tmp_path: Path,
                                                          token_cache: Path) -> None:
    """Room for one checkpoint, not two: the second epoch's checkpoint cannot be written. The run fails naming the
    path and the space needed, nothing already written is damaged, and with space freed the relaunch resumes."""
    mount, size = small_disk
    ckpt_mib = (plain["folder"] / CKPT).stat().st_size / 2**20
    size(ckpt_mib * 1.5 + 0.25)
    store = mount / "runs"
    proc = relaunch(store, tmp_path / "out", token_cache)
    assert proc.returncode == 2, tail(proc)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("train.py: error:")]
    assert line and "no space left on the disk of" in line[0] and "last.safetensors: writing it needs about" in \
        line[0] and "MiB are free" in line[0], tail(proc)
    (folder,) = [p.parent for p in store.rglob("results.json")]
    record = json.loads((folder / "results.json").read_text())  # parses: written atomically, never half
    assert record["status"] in ("running", "failed")
    assert load_checkpoint_file(previous(folder / CKPT))["global_step"] == 6  # the first epoch's, intact
    assert not list(folder.rglob(".*.tmp*"))  # no half-written temporary left behind
    size(64)
    again = relaunch(store, tmp_path / "out2", token_cache)
    assert again.returncode == 0, tail(again)
    got = assert_same_run(folder, plain["results"], plain["folder"])
    assert got["resumed_from"] == str(previous(folder / CKPT))


def test_write_json_on_a_full_disk_names_path_and_need(small_disk) -> None:
    from loralab.errors import DiskFull

    mount, size = small_disk
    size(0.1)
    target = mount / "results.json"
    write_json(target, {"status": "running"})
    with pytest.raises(DiskFull, match=r"results.json: writing it needs about 0\.2 MiB"):
        write_json(target, {"blob": "x" * 200_000})
    assert json.loads(target.read_text()) == {"status": "running"}  # the old file, untouched

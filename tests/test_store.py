"""The run store: run ids stay what they were, one list decides what enters them, writes are atomic, job folders
link their runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loralab.config import compose
from loralab.store import (adapter_folder, atomic_write, is_semantic, link_job, read_results, run_folder, run_id,
                           write_json)

# Computed on main at 0e5f605 (before the layered package): existing run stores must keep finding their runs.
KNOWN_RUN_IDS = {
    (): "minilm-lora-r8-s0-8639c6b563",
    ("task=mrpc", "lora.r=4"): "minilm-lora-r4-s0-fb89c4ef42",
    ("task=stsb", "lora=full", "optim.lr=5e-5"): "minilm-full-s0-485e0bed52",
    ("model=tiny-llama", "task=rte", "quant=nf4"): "tiny-llama-lora-r8-s0-b5fb759d35",
    # Issue 19 renamed that schedule repro_minilm_short (repro_minilm is now the converged one): same config, same id.
    ("+experiment=repro_minilm_short", "task=cola", "seed=2"): "minilm-lora-r8-s2-b4c6be1f74",
}


@pytest.mark.parametrize("overrides", list(KNOWN_RUN_IDS), ids=lambda o: " ".join(o) or "defaults")
def test_known_run_ids_are_kept(overrides: tuple[str, ...]) -> None:
    assert run_id(compose(list(overrides))) == KNOWN_RUN_IDS[overrides]


def test_where_and_how_a_run_is_recorded_is_not_its_identity() -> None:
    base = run_id(compose([]))
    for override in ("data.num_workers=2", "data.eval_batch_size=64", "trainer.log_every_n_steps=5",
                     "store.root=/elsewhere", "data.cache_dir=/tmp/x", "logger=csv"):
        assert run_id(compose([override])) == base, override
    assert run_id(compose(["data.length_buckets=[16,32,64]"])) != base  # a new field enters the id once it is set
    assert not is_semantic("data.num_workers") and not is_semantic("store.root") and is_semantic("lora.r")


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    path = write_json(tmp_path / "results.json", {"status": "finished"})

    def broken(tmp: Path) -> None:
        tmp.write_text('{"status": "runn')  # half written, then the disk fills up
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"status": "finished"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_a_job_folder_leads_to_its_run_and_adapter(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "rte" / "some-run"
    (run / "adapter").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / "adapter" / name).write_text("{}")
    write_json(run / "results.json", {"status": "finished"})
    job = tmp_path / "multirun" / "0"
    link_job(job, run)
    assert run_folder(job) == run_folder(run) == run_folder(run / "adapter") == run.resolve()
    assert adapter_folder(job) == adapter_folder(run) == run.resolve() / "adapter"
    assert read_results(job / "run") == {"status": "finished"}
    assert run_folder(tmp_path) is None and adapter_folder(tmp_path) is None

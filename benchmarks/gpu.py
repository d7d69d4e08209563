"""Section (h): loralab on a GPU. Needs CUDA; on a CPU-only machine the section says so and names its command.

Measured on one GPU, each as a real `train.py` job (SST-2, MiniLM + LoRA r=8 q,v, batch 32, bf16-mixed):
- the default job's steady samples/s and GPU busy % (nvidia-smi, sampled every 0.5 s), plain and with static
  length buckets (data.length_buckets) + torch.compile;
- host syncs in 100 training steps (torch.cuda.set_sync_debug_mode("error") around steps 10..110);
- a 4-run sweep one job at a time vs four jobs on the GPU (hydra/launcher=gpus jobs_per_gpu=4): wall time;
- RoBERTa-base shapes (random weights) and QLoRA nf4 / int8: samples/s and training peak memory;
- packed sweeps (issue 18): an 8-run MiniLM SST-2 sweep (rank x seed) trained one job at a time, 4 jobs per GPU, and
  packed (hydra/launcher=packed, one process, one frozen base): wall time to all 8 results.json, GPU busy %, and each
  packed run's dev accuracy against its solo twin (`packed_sweep()`).
`python benchmarks/run.py --only h` (on the device machine: see ../shared/device/README.md).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 600
BASE = ["task=sst2", "trainer=gpu", f"trainer.max_steps={STEPS}", "data.val_limit=256",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=200"]


class GpuBusy:
    """Mean nvidia-smi utilization.gpu while the block runs."""

    def __enter__(self):
        self.samples, self.stop = [], threading.Event()

        def poll():
            while not self.stop.wait(0.5):
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True)
                if out.returncode == 0 and out.stdout.strip():
                    self.samples.append(float(out.stdout.split()[0]))

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def mean(self) -> float:
        return statistics.mean(self.samples) if self.samples else float("nan")


def train(overrides: list[str], store: Path, multirun: bool = False) -> tuple[list[dict], float, float]:
    """Run train.py; returns the finished results, the wall time and the mean GPU busy %."""
    cmd = [sys.executable, "train.py", *(["-m"] if multirun else []), *BASE, *overrides, f"store.root={store}",
           f"hydra.{'sweep' if multirun else 'run'}.dir={store}/hydra"]
    start = time.perf_counter()
    with GpuBusy() as busy:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    runs = [json.loads(p.read_text()) for p in store.rglob("results.json")]
    return [r for r in runs if r.get("status") == "finished"], time.perf_counter() - start, busy.mean


def host_syncs(steps: int = 100) -> str:
    """Train in-process with CUDA sync debugging set to error for `steps` steps; the first sync names itself."""
    import lightning as L
    import torch

    from loralab.config import compose
    from loralab.lightning.callbacks import Throughput
    from loralab.run.data import GlueDataModule
    from loralab.run.model import build_model
    from loralab.run.module import GlueModule
    from loralab.run.train import make_trainer
    from loralab.run.weights import load_tokenizer, resolve_model_path

    class SyncCheck(L.Callback):
        def on_train_batch_start(self, trainer, *a):
            torch.cuda.set_sync_debug_mode("error" if 10 <= trainer.global_step < 10 + steps else 0)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*BASE, f"trainer.max_steps={steps + 20}", f"trainer.log_every_n_steps={steps * 10}",
                       "trainer.limit_val_batches=0", f"store.root={tmp}"])
        resolved = resolve_model_path(cfg.model.path)
        tok = load_tokenizer(cfg.model, resolved)
        trainer = make_trainer(cfg, Path(tmp), Throughput())
        trainer.callbacks.append(SyncCheck())
        try:
            trainer.fit(GlueModule(build_model(cfg, resolved, tok), cfg), datamodule=GlueDataModule(
                cfg.task, cfg.data, tok, cfg.seed))
            return f"no host sync in {steps} training steps"
        except RuntimeError as e:
            return f"a host sync at step {trainer.global_step}: {str(e).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)


def gpu_section() -> str:
    import torch

    if not torch.cuda.is_available():
        return ("No GPU in the session that last ran this section: nothing measured. On a CUDA machine run "
                "`python benchmarks/run.py --only h` (see benchmarks/gpu.py for what it measures).\n")
    rows = ["| job | samples/s (steady) | GPU busy % | training peak MB | dev accuracy |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        jobs = (("default job", []),
                ("+ length buckets + compile", ["data.length_buckets=[16,32,64,128]", "compile=true"]),
                ("RoBERTa-base shapes (random)", ["model=roberta-base", "model.path=random:roberta-base"]),
                ("QLoRA nf4", ["quant=nf4"]), ("QLoRA int8", ["quant=int8"]))
        for i, (name, extra) in enumerate(jobs):
            (r,), _, busy = train(extra, Path(tmp) / f"job{i}")
            rows.append(f"| {name} | {r['steady_samples_per_s']:.0f} | {busy:.0f} | {r['peak_memory_mb']:.0f} | "
                        f"{r['main_metric']['value']:.4f} |")
        sweep = ["seed=0,1,2,3", "hydra/launcher=gpus"]
        one, t_one, b_one = train([*sweep, "hydra.launcher.jobs_per_gpu=1"], Path(tmp) / "one", multirun=True)
        four, t_four, b_four = train([*sweep, "hydra.launcher.jobs_per_gpu=4"], Path(tmp) / "four", multirun=True)
    samples = 4 * STEPS * 32
    lines = [*rows, "", "| 4-run sweep | wall s | samples/s together | GPU busy % |", "|---|---|---|---|",
             f"| one job at a time | {t_one:.0f} | {samples / t_one:.0f} | {b_one:.0f} |",
             f"| 4 jobs on the GPU (jobs_per_gpu=4) | {t_four:.0f} | {samples / t_four:.0f} | {b_four:.0f} |",
             "", f"{torch.cuda.get_device_name(0)}; {STEPS} steps per run (wall times include start-up and "
             f"validation); 4 jobs at once = {t_one / t_four:.2f}x one at a time. Host syncs: {host_syncs()}."]
    assert len(one) == len(four) == 4, (len(one), len(four))
    return "\n".join(lines) + "\n\n" + packed_sweep()


# Issue 18's sweep: 4 ranks x 2 seeds, each run PACKED_STEPS steps of SST-2 (batch 32, bf16-mixed).
PACKED_SWEEP = ["lora.r=4,8,16,32", "seed=0,1"]
PACKED_STEPS = 2000


def packed_sweep() -> str:
    """The 8-run sweep three ways, each into its own store: one job at a time (hydra/launcher=gpus jobs_per_gpu=1),
    4 jobs on the GPU at once, and packed (hydra/launcher=packed, pack_size 8): wall time to all 8 results.json, mean
    GPU busy %, and the largest gap between a packed run's dev accuracy and the same config's solo run."""
    rows = ["| 8-run sweep (4 ranks x 2 seeds) | wall s | speed-up vs one at a time | GPU busy % |",
            "|---|---|---|---|"]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = [*PACKED_SWEEP, f"trainer.max_steps={PACKED_STEPS}"]
        ways = (("one job at a time", ["hydra/launcher=gpus", "hydra.launcher.jobs_per_gpu=1"]),
                ("4 jobs per GPU", ["hydra/launcher=gpus", "hydra.launcher.jobs_per_gpu=4"]),
                ("packed (one process, pack_size=8)", ["hydra/launcher=packed", "hydra.launcher.pack_size=8"]))
        times = {}
        for i, (name, extra) in enumerate(ways):
            runs[name], times[name], busy = train([*base, *extra], Path(tmp) / f"sweep{i}", multirun=True)
            assert len(runs[name]) == 8, (name, len(runs[name]))
            rows.append(f"| {name} | {times[name]:.0f} | {times['one job at a time'] / times[name]:.2f}x | {busy:.0f} |")
    solo = {r["run_id"]: r["main_metric"]["value"] for r in runs["one job at a time"]}
    gaps = [abs(r["main_metric"]["value"] - solo[r["run_id"]]) for r in runs["packed (one process, pack_size=8)"]]
    return ("\n".join(rows) + f"\n\nDev accuracy, packed vs the same run solo: largest gap {max(gaps):.4f}, mean "
            f"{statistics.mean(gaps):.4f} (seed noise of this job: FACTS.md). Command of the packed sweep: `python "
            f"train.py -m {' '.join(PACKED_SWEEP)} task=sst2 trainer=gpu trainer.max_steps={PACKED_STEPS} "
            f"hydra/launcher=packed hydra.launcher.pack_size=8`.\n")


if __name__ == "__main__":
    os.chdir(ROOT)
    print(gpu_section())

"""Section (g): the host-bound regime. A tiny random model (tiny-llama: 2 layers, 64 wide) makes the arithmetic
negligible, so a training step costs what the host spends on it: Python, dispatch and kernel launches, the cost a GPU
shows and a CPU hides behind arithmetic. loralab's Lightning step, a plain PyTorch loop and the Trainer run the same
SST-2 batches (loralab's length-grouped batches of 32), model, LoRA, fused AdamW, linear schedule and step count, in
one process, fp32; each reports its median step time and the profiler's aten ops per step.

`python benchmarks/run.py --only g` (or `python benchmarks/host_bound.py` to print the table alone).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

OVERRIDES = ["model=tiny-llama", "lora.target_modules=[q_proj,v_proj]", "task=sst2", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
             "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "lora.dropout=0.0"]


def setup(steps: int, store: Path):
    from loralab.config import compose
    from loralab.run.data import GlueDataModule
    from loralab.run.weights import load_tokenizer, resolve_model_path

    cfg = compose([*OVERRIDES, f"trainer.max_steps={steps}", f"store.root={store}"])
    resolved = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model, resolved)
    data = GlueDataModule(cfg.task, cfg.data, tokenizer, cfg.seed)
    data.setup("fit")
    loader = data.train_dataloader()
    batches = [b for _, b in zip(range(steps), loader)]
    return cfg, resolved, tokenizer, batches


def fresh_model(cfg, resolved, tokenizer):
    from loralab.run.model import build_model

    return build_model(cfg, resolved, tokenizer).train()


def ops_per_step(step, batches: list[dict], n: int = 5) -> float:
    """aten ops the profiler records per step (nested ones included), over `n` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[:n]:
            step(b)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")) / n


def plain_loop(cfg, resolved, tokenizer, batches, warmup: int) -> dict:
    from loralab.run.module import MODEL_INPUTS
    from loralab.run.optim import build_optimizer, linear_warmup

    model = fresh_model(cfg, resolved, tokenizer)
    opt = build_optimizer(model, cfg)
    sched = linear_warmup(opt, cfg.optim.warmup_ratio, len(batches))

    def step(b):
        logits = model(**{k: b[k] for k in MODEL_INPUTS if k in b}).logits
        torch.nn.functional.cross_entropy(logits.float(), b["labels"]).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for b in batches:
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
    return {"step_ms": 1e3 * statistics.median(times[warmup:]), "ops": ops_per_step(step, batches)}


def loralab_step(cfg, resolved, tokenizer, batches, warmup: int, folder: Path) -> dict:
    """loralab's own module and trainer (run/train.make_trainer), fed the same batches."""
    import lightning as L

    from loralab.lightning.callbacks import Throughput
    from loralab.run.module import GlueModule
    from loralab.run.train import make_trainer

    class StepTimes(L.Callback):
        """Start to start of consecutive batches: everything Lightning does per step (scheduler, logging) counts."""

        def __init__(self):
            self.times, self.t0 = [], None

        def on_train_batch_start(self, *a):
            now = time.perf_counter()
            if self.t0 is not None:
                self.times.append(now - self.t0)
            self.t0 = now

    L.seed_everything(cfg.seed, verbose=False)
    module = GlueModule(fresh_model(cfg, resolved, tokenizer), cfg)
    timer = StepTimes()
    trainer = make_trainer(cfg, folder, Throughput())
    trainer.callbacks.append(timer)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    # Profiled separately: Lightning's loop over a few more steps of the same batches.
    import dataclasses

    five = dataclasses.replace(cfg, trainer={**cfg.trainer, "max_steps": 5})
    profiled = make_trainer(five, folder / "profiled", Throughput())
    from torch.profiler import ProfilerActivity, profile

    module2 = GlueModule(fresh_model(cfg, resolved, tokenizer), five)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled.fit(module2, train_dataloaders=torch.utils.data.DataLoader(batches[:5], batch_size=None))
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::")) / 5
    return {"step_ms": 1e3 * statistics.median(timer.times[warmup:]), "ops": ops}


def trainer_reference(cfg, resolved, tokenizer, batches, warmup: int, folder: Path) -> dict:
    """transformers' Trainer over the same batches (each dataset item is one prebuilt batch)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from loralab.run.module import MODEL_INPUTS

    class Times(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            now = time.perf_counter()
            if self.t0 is not None:
                self.times.append(now - self.t0)
            self.t0 = now

    items = [{k: b[k] for k in (*MODEL_INPUTS, "labels") if k in b} for b in batches]
    timer = Times()
    args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=1, max_steps=len(items),
                             learning_rate=cfg.optim.lr, warmup_steps=cfg.optim.warmup_ratio, lr_scheduler_type="linear",
                             optim="adamw_torch_fused", use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=cfg.trainer.get("log_every_n_steps") or 25, disable_tqdm=True,
                             dataloader_num_workers=0, seed=cfg.seed)
    trainer = Trainer(model=fresh_model(cfg, resolved, tokenizer), args=args, train_dataset=items,
                      data_collator=lambda rows: rows[0], callbacks=[timer])
    trainer.train()
    return {"step_ms": 1e3 * statistics.median(timer.times[warmup:]), "ops": None}


def host_bound(steps: int = 200, warmup: int = 20, reps: int = 3) -> str:
    """Each pipeline `reps` times, interleaved (plain, loralab, Trainer, plain, ...); the median of the medians."""
    torch.manual_seed(0)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, resolved, tokenizer, batches = setup(steps, Path(tmp))
        for rep in range(reps):
            folder = Path(tmp) / str(rep)
            runs.setdefault("plain PyTorch loop", []).append(plain_loop(cfg, resolved, tokenizer, batches, warmup))
            runs.setdefault("loralab (Lightning step)", []).append(
                loralab_step(cfg, resolved, tokenizer, batches, warmup, folder / "l"))
            runs.setdefault("Trainer + peft", []).append(
                trainer_reference(cfg, resolved, tokenizer, batches, warmup, folder / "t"))
    step = {name: statistics.median(r["step_ms"] for r in rs) for name, rs in runs.items()}
    plain, batch = step["plain PyTorch loop"], len(batches[0]["labels"])
    lines = ["| pipeline | step (ms, median) | repeats (ms) | samples/s | / plain loop | aten ops per step |",
             "|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        ops = "—" if rs[0]["ops"] is None else f"{rs[0]['ops']:.0f}"
        repeats = ", ".join(f"{r['step_ms']:.2f}" for r in rs)
        lines.append(f"| {name} | {step[name]:.2f} | {repeats} | "
                     f"{1e3 * batch / step[name]:.0f} | {step[name] / plain:.2f}x | {ops} |")
    return (f"tiny-llama (2 layers, 64 wide) + LoRA r=8 (q, v), SST-2 batches of {batch}, fp32. "
            f"Same {steps} batches, model, fused AdamW and schedule for each; a step is start to start of consecutive "
            f"steps (everything each pipeline does per step), median over steps {warmup}..{steps}; {reps} interleaved "
            f"repeats. The arithmetic is negligible here, so this is the host's cost per step (what a GPU exposes). "
            f"Ops: aten ops the profiler records per step (nested included) over 5 steps.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    print(host_bound())

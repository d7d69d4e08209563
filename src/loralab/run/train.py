"""run(cfg): config -> run store -> data -> model -> module -> trainer -> results. Wiring only."""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ..config import Config, as_dict, to_config
from ..errors import ConfigError, RunBusy
from ..lightning.callbacks import PeakMemory, Throughput, baseline_mb, memory_now_mb, peak_memory_mb, reset_peak_memory
from ..lightning.checkpoint_io import SafetensorsCheckpointIO, resume_point
from ..lightning.interrupt import Interruption
from ..lightning.ddp import ConfigHandoffDDP, handoff_strategy, is_rank_zero
from ..lightning.precision import resolve_precision
from ..store import (RESULTS, RunRecord, link_job, read_results, record_invalid_job, results_damaged, run_dir, run_id,
                     run_lock, set_aside, write_json)
from .data import GlueDataModule
from .model import build_model, count_params, save_trained
from .module import GlueModule
from .preflight import preflight
from .weights import load_tokenizer

log = logging.getLogger("loralab")
LAST_CKPT = "last.safetensors"
# GlueDataModule carries the data position through checkpoints (its state_dict), which this warning does not know of.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def make_loggers(cfg: Config, folder: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(str(folder), name="logs", version=""))
    if cfg.logger.wandb:
        from ..lightning.tracking import wandb_logger

        loggers.append(wandb_logger(cfg, folder))
    return loggers


def make_trainer(cfg: Config, folder: Path, throughput: Throughput, memory: Optional[PeakMemory] = None) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    # One file, overwritten at each epoch end (atomically, by SafetensorsCheckpointIO): the resume point.
    ckpt = ModelCheckpoint(dirpath=str(folder / "checkpoints"), filename="last", save_top_k=1, monitor=None,
                           every_n_epochs=cfg.store.checkpoint_every_n_epochs, enable_version_counter=False)
    ckpt.FILE_EXTENSION = ".safetensors"
    args: dict[str, Any] = dict(cfg.trainer)
    args["precision"] = resolve_precision(args.get("precision"), str(args.get("accelerator")))
    args["strategy"] = handoff_strategy(args.get("strategy", "auto"), cfg, folder)
    callbacks = [ckpt, throughput, Interruption(folder / "checkpoints" / LAST_CKPT), *([memory] if memory else [])]
    if args.get("enable_progress_bar") is not False:
        from lightning.pytorch.callbacks import TQDMProgressBar

        # Refreshing the bar reads the logged loss (a host sync): as often as the logs, not every step.
        callbacks.append(TQDMProgressBar(refresh_rate=args.get("log_every_n_steps") or 50))
    return L.Trainer(default_root_dir=str(folder), logger=make_loggers(cfg, folder) or False, callbacks=callbacks,
                     plugins=[SafetensorsCheckpointIO()], use_distributed_sampler=False, **args)


def estimate_fields(cfg: Config, batch: Optional[int] = None, seq_len: Optional[int] = None,
                    key: str = "memory_estimate", total_key: str = "estimated_peak_memory_mb") -> dict[str, Any]:
    """`loralab params`' training-memory estimate for this run (meta device, no weights), for results.json. It counts
    training tensors (weights, gradients, optimizer states, activations) only, not the runtime: train() measures what
    the run added over the process's baseline to compare. An estimate that fails never fails the run."""
    from .estimate import memory_estimate_mb

    try:
        est = memory_estimate_mb(cfg, batch, seq_len)
    except Exception as e:  # noqa: BLE001 - informational only
        return {key: {"error": f"{type(e).__name__}: {e}"}}
    return {key: est, total_key: est["total_mb"]}


def train(cfg: Config, resolved: str, folder: Path) -> dict[str, Any]:
    """Fit (resuming from the last checkpoint when there is one) and return the results fields."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.quant.mode != "none" or cfg.optim.name != "adamw":
        import bitsandbytes  # noqa: F401 - imported before the memory baseline: library code is not training memory
    tokenizer = load_tokenizer(cfg.model, resolved)
    datamodule = GlueDataModule(cfg.task, cfg.data, tokenizer, cfg.seed)
    datamodule.setup("fit")  # data in memory before the baseline (idempotent: fit's own setup call reuses it)
    # Memory: measured_memory_mb is the peak of the training steps (PeakMemory: validation and model loading left
    # out) minus what the process held before the model was built (Python, torch and the other libraries, tokenizer,
    # data). On CPU both are process RSS, so the difference also holds autograd's temporaries, allocator slack and
    # Lightning's objects; results.json puts the estimate of the training tensors (memory_estimate) beside it. The
    # baseline is taken after releasing the heap, so that jobs of a sweep sharing a process do not reuse each other's
    # freed memory unseen. peak_memory_mb stays the whole run's peak (loading and validation included).
    reset_peak_memory()
    memory_before = memory_now_mb()
    model = build_model(cfg, resolved, tokenizer)
    load_peak_mb = peak_memory_mb()  # loading quantized weights reads them in fp32 first
    reset_peak_memory()
    trainable, total = count_params(model)
    module = GlueModule(model, cfg)
    if cfg.compile:  # static shapes with data.length_buckets: one compiled graph per bucket, no recompiles
        module.model.compile(dynamic=cfg.data.length_buckets is None)
    throughput, memory = Throughput(), PeakMemory()
    trainer = make_trainer(cfg, folder, throughput, memory)
    point = resume_point(folder / "checkpoints" / LAST_CKPT) if cfg.store.resume else None
    resume = str(point) if point else None
    if resume:
        log.info("resuming %s from %s", folder.name, resume)
    start = time.perf_counter()
    ok = False
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        train_time = time.perf_counter() - start
        # Every rank states what it trained, so a test (or a researcher) can check that all ranks agree.
        write_json(folder / "ranks" / f"rank{trainer.global_rank}.json",
                   {"rank": trainer.global_rank, "world_size": trainer.world_size, "run_id": run_id(cfg),
                    "config": as_dict(cfg)})
        if not module.history or module.history[-1]["step"] != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)  # stopped mid-epoch: score the end
        ok = True
    finally:
        if isinstance(trainer.strategy, ConfigHandoffDDP):
            trainer.strategy.finish(ok)
    if trainer.global_rank != 0:
        return {}
    peak_mb, base_mb = max(load_peak_mb, memory.run_peak_mb, peak_memory_mb()), baseline_mb(memory_before)
    adapter_bytes = save_trained(model, cfg, folder / "adapter") if cfg.store.save_adapter else 0
    seen = throughput.largest_batch
    best, final = module.best or {}, (module.history[-1] if module.history else {})
    keys = cfg.task.metric_keys()
    return {"metrics": {"best": {k: best.get(k) for k in keys}, "final": {k: final.get(k) for k in keys}},
            "main_metric": {"name": cfg.task.main_metric, "value": best.get(cfg.task.main_metric)},
            "best_epoch": best.get("epoch"), "history": module.history,
            "trainable_params": trainable, "total_params": total, "adapter_bytes": adapter_bytes,
            "train_time_s": round(train_time, 2), "train_samples_per_s": round(throughput.samples_per_s, 2),
            "steady_samples_per_s": round(throughput.steady_samples_per_s, 2),
            "train_samples": throughput.samples, "train_tokens": throughput.tokens, "resumed_from": resume,
            "interruptions": module.interruptions,
            "first_step_at": throughput.first_step_at, "peak_memory_mb": round(peak_mb, 1),
            "memory_baseline_mb": round(base_mb, 1), "train_peak_memory_mb": round(memory.train_peak_mb, 1),
            "measured_memory_mb": round(memory.train_peak_mb - base_mb, 1),
            **(estimate_fields(cfg, *seen, key="memory_estimate_seen", total_key="estimated_seen_memory_mb")
               if seen else {}),
            "precision": str(trainer.precision), "global_steps": trainer.global_step}


def hydra_job_dir() -> Optional[Path]:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def sweeping() -> bool:
    """Inside a Hydra multirun (its failures are recorded per job and the sweep goes on)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def _container(raw: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(raw, resolve=True)  # type: ignore[return-value]
    except Exception:
        return OmegaConf.to_container(raw, resolve=False)  # type: ignore[return-value]


def run(raw: DictConfig | Config) -> Optional[float]:
    """One run. Returns the main metric (what a Hydra sweeper optimizes); raises when the run failed."""
    try:
        cfg = raw if isinstance(raw, Config) else to_config(raw)  # bad values fail here, before anything loads
    except ConfigError as e:
        job = hydra_job_dir()
        if job is not None:  # a sweep's invalid combination is recorded like any other failure
            record_invalid_job(job, e, _container(raw))
        raise
    folder = run_dir(cfg)
    started_at = time.time()
    job = hydra_job_dir()
    if job is not None:
        link_job(job, folder)
    damaged = results_damaged(folder) if is_rank_zero() else None
    if damaged:
        set_aside(folder / RESULTS, damaged, "training the run again (from its checkpoint, if one is good)")
    done = read_results(folder)
    if cfg.store.skip_finished and done and done.get("status") == "finished":
        log.info("skip %s: already finished (%s=%s)", folder, cfg.task.main_metric, done["main_metric"]["value"])
        return done["main_metric"]["value"]
    record = RunRecord(cfg, folder, writer=is_rank_zero())
    lock = run_lock(folder) if is_rank_zero() else contextlib.nullcontext()
    try:
        resolved = preflight(cfg)
        record.extra.update(estimate_fields(cfg))
        with lock:
            record.start()
            fields = train(cfg, resolved, folder)
            if not fields:  # a non-zero DDP rank: rank 0 writes results and the adapter once
                return None
            data = record.finish(**fields, job_started_at=started_at)
        if cfg.logger.wandb:
            from ..lightning.tracking import log_summary

            log_summary(data)
    except RunBusy:
        raise  # the live owner of the run records its outcome
    except BaseException as e:  # recorded, then re-raised: the sweeper records it and goes on
        record.fail(e)
        raise
    finally:
        from ..lightning.tracking import finish

        finish()
    main = data["main_metric"]
    print(f"dev {main['name']} = {main['value']:.4f}  (task {cfg.task.name}, best epoch {data['best_epoch']}, "
          f"{data['train_samples_per_s']:.0f} samples/s, {data['train_time_s']:.0f} s)  results: {folder}/results.json")
    return main["value"]

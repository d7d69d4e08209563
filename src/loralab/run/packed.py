"""The packed trainer: several LoRA runs that share a frozen base train in one process, each as if trained alone.

`train_pack(cfgs, pack_size)` admits up to `pack_size` runs at a time into one packed model (run/packed_layer.py).
Each step concatenates one batch of every run (each from its own seeded order, padded to the widest, or in a few
passes by width where padding would cost arithmetic: width_groups), runs the frozen base over them and each run's
adapter and head on its own rows, then steps each run's own optimizer,
schedule and gradient clipping. A run validates, checkpoints and finishes on its own schedule (its epochs, its
max_steps); a finished or diverged run leaves the pack and the next queued run takes its slot.

Each run ends with what a solo run of its config writes (run/train.py): results.json through RunRecord (same fields,
plus `packed_with`), adapter/ through save_trained, checkpoints/last.safetensors in Lightning's checkpoint layout (so a
solo run resumes from it, and a pack resumes from a solo run's: run/packed_run.py), the same run id and lock.

Why a plain loop and not Lightning: a pack has one clock but K runs with their own epochs, validation times,
checkpoints, step counters and end points, joining and leaving at any step; Lightning's fit loop has one of each.
Lightning would be left with device placement and autocast, which are a few lines here.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from torch import nn

from ..config import Config, as_dict
from ..errors import DivergedError, Interrupted, RunBusy
from ..lightning import checkpoint_io
from ..lightning.callbacks import baseline_mb, memory_now_mb, peak_memory_mb, reset_peak_memory
from ..lightning.precision import resolve_precision
from ..store import RunRecord, read_results, run_dir, run_id, run_lock, write_json
from .data import GlueDataModule
from .metrics import epoch_scores, guard_loss, predictions, task_loss, task_metrics
from .model import build_model, count_params, load_pretrained, on_gpu, save_trained
from .module import MODEL_INPUTS
from .optim import build_optimizer, linear_warmup
from .packed_layer import NotPackable, PackedModel
from .packed_run import Member, Outcome, batch_limit, lightning_checkpoint, restore, resume_checkpoint, schedule
from .preflight import preflight
from .train import LAST_CKPT, estimate_fields, make_loggers
from .weights import load_tokenizer

log = logging.getLogger("loralab")
STEADY_AFTER = 5  # steps left out of steady_samples_per_s (allocator and cache warm-up), as the solo Throughput does
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


def pack_batches(batches: list[dict[str, torch.Tensor]], pad_id: int, device: torch.device
                 ) -> tuple[dict[str, torch.Tensor], list[slice]]:
    """One packed batch: the runs' batches right-padded to the widest (attention masks keep the extra padding inert)
    and stacked; returns it and each run's rows."""
    width = max(b["input_ids"].shape[1] for b in batches)
    keys = [k for k in MODEL_INPUTS if k in batches[0]]
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    out, rows, start = {}, [], 0
    for b in batches:
        n = b["input_ids"].shape[0]
        rows.append(slice(start, start + n))
        start += n
    for k in keys:
        parts = [b[k] if b[k].shape[1] == width else
                 nn.functional.pad(b[k], (0, width - b[k].shape[1]), value=fill[k]) for b in batches]
        out[k] = torch.cat(parts).to(device, non_blocking=True)
    return out, rows


def width_groups(widths: list[int], sizes: list[int], pad_slack: Optional[float]) -> list[list[int]]:
    """Which runs' batches share one pass of the base. One pass pads every batch to the widest; on a GPU that padding
    is nearly free (a small step is launch-bound), on a CPU it is arithmetic like any other. So runs are taken in
    order of width and a run joins the current group while the group's padded tokens stay within (1 + pad_slack) of
    the tokens its batches hold; `pad_slack=None`: one group, one pass. Returns lists of indices."""
    if pad_slack is None or len(widths) < 2:
        return [list(range(len(widths)))]
    groups: list[list[int]] = []
    own = 0
    for i in sorted(range(len(widths)), key=lambda j: widths[j]):
        if groups and widths[i] * (sum(sizes[j] for j in groups[-1]) + sizes[i]) <= (1 + pad_slack) * (
                own + widths[i] * sizes[i]):
            groups[-1].append(i)
            own += widths[i] * sizes[i]
        else:
            groups.append([i])
            own = widths[i] * sizes[i]
    return groups


class StopSignal:
    """A stop signal (SIGTERM, SIGUSR1/2) ends the pack at the next step boundary, after every run's checkpoint."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class Pack:
    """The shared base, the runs in it and the queue waiting for a slot."""

    def __init__(self, cfgs: list[Config], pack_size: int, job_dirs: Optional[list[Optional[Path]]] = None,
                 pad_slack: Union[float, str, None] = "auto") -> None:
        self.cfgs, self.pack_size = cfgs, max(1, int(pack_size))
        self.job_dirs = job_dirs or [None] * len(cfgs)
        self.outcomes: list[Optional[Outcome]] = [None] * len(cfgs)
        self.queue: list[int] = []
        self.active: list[Member] = []
        self.model: Optional[PackedModel] = None
        self.resolved: Optional[str] = None
        self.tokenizer = None
        self.device = torch.device("cuda" if on_gpu(cfgs[0]) and torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(cfgs[0].trainer.get("precision"), str(cfgs[0].trainer.get("accelerator")))
        # "auto": one pass on a GPU, passes by width within 10 % padding on a CPU (see width_groups)
        self.pad_slack = (None if self.device.type == "cuda" else 0.1) if pad_slack == "auto" else pad_slack
        self.ids = [run_id(c) for c in cfgs]
        self.train_peak_mb = 0.0

    # --- admission -------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Skip finished runs, queue the others (preflight failures are recorded as in a solo run)."""
        for i, cfg in enumerate(self.cfgs):
            folder = run_dir(cfg)
            done = read_results(folder)
            if cfg.store.skip_finished and done and done.get("status") == "finished":
                log.info("skip %s: already finished", folder)
                self.outcomes[i] = Outcome("skipped", value=done["main_metric"]["value"])
                continue
            self.queue.append(i)

    def _load_base(self, cfg: Config, resolved: str) -> None:
        self.resolved = resolved
        self.tokenizer = load_tokenizer(cfg.model, resolved)
        base = load_pretrained(cfg, resolved, self.tokenizer)
        self.model = PackedModel(base).to(self.device)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def admit(self) -> None:
        while self.queue and len(self.active) < self.pack_size:
            i = self.queue.pop(0)
            cfg = self.cfgs[i]
            m = Member(i, cfg, run_dir(cfg), RunRecord(cfg, run_dir(cfg)), time.time())
            try:
                resolved = preflight(cfg)
                if self.model is None:
                    self._load_base(cfg, resolved)
                m.locks.enter_context(run_lock(m.folder))
                self._build(m)
            except NotPackable as e:
                m.locks.close()
                self.outcomes[i] = Outcome("solo", reason=str(e))
                log.info("%s trains solo: %s", m.run_id, e)
                continue
            except RunBusy as e:
                m.locks.close()
                self.outcomes[i] = Outcome("failed", error=e)  # its live owner records its outcome
                continue
            except BaseException as e:
                self._fail(m, e)
                if not isinstance(e, Exception):
                    raise
                continue
            m.admitted_at = time.perf_counter()
            self.active.append(m)
            self.model.train()

    def _build(self, m: Member) -> None:
        """Data, the run's solo model (its shell: same seed, same build path as run/train.py), its place in the pack,
        optimizer, schedule and, when there is one, its checkpoint."""
        cfg = m.cfg
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        m.data = GlueDataModule(cfg.task, cfg.data, self.tokenizer, cfg.seed)
        m.data.setup("fit")
        m.record.extra.update(estimate_fields(cfg))
        m.shell = build_model(cfg, self.resolved, self.tokenizer)
        self.model.add_run(m.index, m.shell)
        m.shell.to(self.device)
        loader = m.data.train_dataloader()
        m.n_batches = batch_limit(len(loader.sampler), cfg.trainer.get("limit_train_batches"))
        m.max_epochs, m.max_steps, m.total_steps = schedule(cfg, m.n_batches)
        m.optimizer = build_optimizer(m.shell, cfg)
        m.scheduler = linear_warmup(m.optimizer, cfg.optim.warmup_ratio, m.total_steps)
        point = resume_checkpoint(m)
        if point is not None:
            restore(m, checkpoint_io.load_checkpoint_file(point))
            m.resumed_from = str(point)
            log.info("resuming %s from %s (epoch %d, step %d)", m.run_id, point, m.epoch, m.step)
        if cfg.logger.csv:
            m.loggers = make_loggers(cfg, m.folder)
        m.record.start()

    # --- one step of the pack --------------------------------------------------------------------------------------
    def _next_batch(self, m: Member) -> dict[str, torch.Tensor]:
        if m.order is None:
            loader = m.data.train_dataloader()
            loader.sampler.set_epoch(m.epoch)
            m.dataset, ids = loader.dataset, list(loader.sampler)[:m.n_batches]
            m.order = iter(ids[m.in_epoch:])
        return m.dataset[next(m.order)]

    def step(self) -> None:
        members = list(self.active)
        t0 = time.perf_counter()
        batches = [self._next_batch(m) for m in members]
        # Dropout draws follow the pack's position (each member's seed and step): a resumed pack draws what an
        # uninterrupted one does.
        torch.manual_seed(hash(tuple((m.cfg.seed, m.index, m.step) for m in members)) & 0xFFFF_FFFF_FFFF)
        losses: list[Any] = [None] * len(members)
        with self._autocast():
            for group in width_groups([b["input_ids"].shape[1] for b in batches],
                                      [b["input_ids"].shape[0] for b in batches], self.pad_slack):
                inputs, rows = pack_batches([batches[i] for i in group], self.pad_id, self.device)
                logits = self.model([(members[i].index, r) for i, r in zip(group, rows)], **inputs)
                for i, r in zip(group, rows):
                    labels = batches[i]["labels"].to(self.device, non_blocking=True)
                    losses[i] = task_loss(members[i].cfg.task, logits[r], labels)
        total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        total.backward()  # one backward: each run's parameters receive only its own loss's gradient
        for m, loss in zip(members, losses):
            clip = m.cfg.trainer.get("gradient_clip_val")
            if clip:
                params = [p for g in m.optimizer.param_groups for p in g["params"]]
                if m.cfg.trainer.get("gradient_clip_algorithm") == "value":
                    torch.nn.utils.clip_grad_value_(params, clip)
                else:
                    torch.nn.utils.clip_grad_norm_(params, clip)
            m.optimizer.step()
            m.scheduler.step()
            m.optimizer.zero_grad(set_to_none=True)
            m.loss_sum = loss.detach() if m.loss_sum is None else m.loss_sum + loss.detach()
            m.loss_steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # step times count the step's work, not its launch
        seconds = time.perf_counter() - t0
        together = {m.index for m in members}
        for m, b in zip(members, batches):
            self._count(m, b, seconds)
            m.partners |= together
            logs_now = (m.step + 1) % (m.cfg.trainer.get("log_every_n_steps") or 50) == 0
            m.step += 1
            m.in_epoch += 1
            if logs_now:
                try:
                    self._read_loss(m, log_it=True)
                except DivergedError as e:  # this run alone: its rows, loss and parameters are its own
                    self._fail(m, e)

    def _count(self, m: Member, batch: dict[str, torch.Tensor], seconds: float) -> None:
        n, shape = len(batch["labels"]), tuple(batch["input_ids"].shape)
        m.first_step_at = m.first_step_at or time.time() - seconds
        m.seconds += seconds
        if m.steps_here >= STEADY_AFTER:
            m.steady_seconds += seconds
            m.steady_samples += n
        m.steps_here += 1
        m.samples += n
        m.tokens += shape[0] * shape[1]
        if m.largest is None or shape[0] * shape[1] > m.largest[0] * m.largest[1]:
            m.largest = (int(shape[0]), int(shape[1]))

    def _autocast(self):
        if self.precision.startswith("bf16"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _read_loss(self, m: Member, log_it: bool) -> None:
        """GlueModule._read_loss: the mean training loss since the last read, logged and checked for divergence."""
        if m.loss_sum is None:
            return
        value = float(m.loss_sum / m.loss_steps)
        m.loss_sum, m.loss_steps = None, 0
        if log_it:
            for lg in m.loggers:
                lg.log_metrics({"train/loss": value, "epoch": m.epoch}, step=m.step - 1)
        m.first_loss = guard_loss(value, m.first_loss, m.step - 1)

    # --- validation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, members: list[Member], epoch_of: dict[int, int]) -> None:
        """Score several runs at once: each split's batches of every run, packed step by step."""
        if not members:
            return
        self.model.eval()
        try:
            task = members[0].cfg.task
            loaders = {m.index: m.data.val_dataloader() for m in members}
            metrics = {m.index: {s: task_metrics(m.cfg.task).to(self.device) for s in task.eval_splits}
                       for m in members}
            limits = {m.index: [batch_limit(len(dl), m.cfg.trainer.get("limit_val_batches")) for dl in loaders[m.index]]
                      for m in members}
            for s, split in enumerate(task.eval_splits):
                iters = {m.index: iter([b for _, b in zip(range(limits[m.index][s]), loaders[m.index][s])])
                         for m in members}
                while iters:
                    got = []
                    for m in members:
                        it = iters.get(m.index)
                        b = next(it, None) if it is not None else None
                        if b is None:
                            iters.pop(m.index, None)
                        else:
                            got.append((m, b))
                    if not got:
                        break
                    inputs, rows = pack_batches([b for _, b in got], self.pad_id, self.device)
                    with self._autocast():
                        logits = self.model([(m.index, r) for (m, _), r in zip(got, rows)], **inputs)
                    for (m, b), r in zip(got, rows):
                        metrics[m.index][split].update(predictions(logits[r], m.cfg.task.is_regression),
                                                       b["labels"].to(self.device))
            for m in members:
                if not sum(limits[m.index]):
                    continue  # limit_val_batches=0: no validation, as in Lightning
                values = epoch_scores(m.cfg.task, metrics[m.index])
                record = {"epoch": epoch_of[m.index], "step": m.step, **values}
                m.history.append(record)
                main = m.cfg.task.main_metric
                if m.best is None or values[main] > m.best[main]:
                    m.best = record
                for lg in m.loggers:
                    lg.log_metrics({**{f"val/{k}": v for k, v in values.items()}, f"val/best_{main}": m.best[main]},
                                   step=m.step)
        finally:
            self.model.train()

    # --- run ends --------------------------------------------------------------------------------------------------
    def _checkpoint(self, m: Member, end_of_epoch: bool) -> None:
        checkpoint_io.save_checkpoint_file(lightning_checkpoint(m, end_of_epoch),
                                           m.folder / "checkpoints" / LAST_CKPT)

    def _leave(self, m: Member) -> None:
        if m in self.active:
            self.active.remove(m)
        if self.model is not None:
            self.model.remove_run(m.index)
        for lg in m.loggers:
            with contextlib.suppress(Exception):
                lg.finalize("success")
        m.locks.close()
        m.shell = m.optimizer = m.scheduler = m.order = None

    def _fail(self, m: Member, error: BaseException) -> None:
        m.record.fail(error)
        self.outcomes[m.index] = Outcome("failed", error=error)
        log.error("%s failed: %s: %s", m.run_id, type(error).__name__, error)
        self._leave(m)

    def _finish(self, m: Member, memory_before: dict[str, float]) -> None:
        cfg = m.cfg
        write_json(m.folder / "ranks" / "rank0.json", {"rank": 0, "world_size": 1, "run_id": m.run_id,
                                                       "config": as_dict(cfg)})
        trainable, total = count_params(m.shell)
        adapter_bytes = save_trained(m.shell, cfg, m.folder / "adapter") if cfg.store.save_adapter else 0
        peak = peak_memory_mb()
        self.train_peak_mb = max(self.train_peak_mb, peak)
        base_mb = baseline_mb(memory_before)
        best, final = m.best or {}, (m.history[-1] if m.history else {})
        keys = cfg.task.metric_keys()
        steady = m.steady_samples / m.steady_seconds if m.steady_seconds else (m.samples / m.seconds if m.seconds else 0.0)
        fields = {
            "metrics": {"best": {k: best.get(k) for k in keys}, "final": {k: final.get(k) for k in keys}},
            "main_metric": {"name": cfg.task.main_metric, "value": best.get(cfg.task.main_metric)},
            "best_epoch": best.get("epoch"), "history": m.history,
            "trainable_params": trainable, "total_params": total, "adapter_bytes": adapter_bytes,
            "train_time_s": round(time.perf_counter() - m.admitted_at, 2),
            "train_samples_per_s": round(m.samples / m.seconds if m.seconds else 0.0, 2),
            "steady_samples_per_s": round(steady, 2), "train_samples": m.samples, "train_tokens": m.tokens,
            "resumed_from": m.resumed_from, "interruptions": m.interruptions, "first_step_at": m.first_step_at,
            # Memory is the pack's process (shared base, every run's adapter and activations), measured as solo does.
            "peak_memory_mb": round(peak, 1), "memory_baseline_mb": round(base_mb, 1),
            "train_peak_memory_mb": round(self.train_peak_mb, 1),
            "measured_memory_mb": round(self.train_peak_mb - base_mb, 1),
            **(estimate_fields(cfg, *m.largest, key="memory_estimate_seen", total_key="estimated_seen_memory_mb")
               if m.largest else {}),
            "precision": self.precision, "global_steps": m.step,
            "packed_with": [self.ids[i] for i in sorted(m.partners - {m.index})],
        }
        data = m.record.finish(**fields, job_started_at=m.started_at)
        self.outcomes[m.index] = Outcome("finished", value=data["main_metric"]["value"])
        main = data["main_metric"]
        value = "none" if main["value"] is None else f"{main['value']:.4f}"
        print(f"dev {main['name']} = {value}  (task {cfg.task.name}, best epoch {data['best_epoch']}, packed with "
              f"{len(fields['packed_with'])}, {data['train_samples_per_s']:.0f} samples/s, "
              f"{data['train_time_s']:.0f} s)  results: {m.folder}/results.json")
        self._leave(m)

    def _end_of_epochs(self, memory_before: dict[str, float]) -> None:
        """After a step: runs at an epoch end validate (together), check their loss, checkpoint; finished runs leave."""
        ended = [m for m in self.active if m.in_epoch >= m.n_batches or m.done]
        if not ended:
            return
        at_end = [m for m in ended if m.in_epoch >= m.n_batches]
        epoch_of = {m.index: m.epoch for m in ended}
        try:
            self.validate(at_end, epoch_of)
        except Exception as e:  # a failure in the shared pass fails the runs that were in it
            for m in at_end:
                self._fail(m, e)
            return
        for m in ended:
            end_of_epoch = m.in_epoch >= m.n_batches
            try:
                self._read_loss(m, log_it=False)
                every = m.cfg.store.checkpoint_every_n_epochs
                if (m.epoch + 1) % every == 0:
                    self._checkpoint(m, end_of_epoch)
            except Exception as e:
                self._fail(m, e)
                continue
            if end_of_epoch:
                m.epoch, m.in_epoch, m.order = m.epoch + 1, 0, None
        finishing = [m for m in ended if m in self.active and m.done]
        final = [m for m in finishing if not m.history or m.history[-1]["step"] != m.step]
        try:  # stopped mid-epoch (max_steps): score the end, as run/train.py does
            self.validate(final, {m.index: m.epoch + (1 if m.in_epoch else 0) for m in final})
        except Exception as e:
            for m in final:
                self._fail(m, e)
        for m in finishing:
            if m in self.active:
                try:
                    self._finish(m, memory_before)
                except Exception as e:
                    self._fail(m, e)

    def _interrupt(self, signum: int) -> None:
        """Checkpoint every run where it stands, record it as interrupted and stop (relaunching resumes each)."""
        name = signal.Signals(signum).name
        for m in list(self.active):
            where = {"signal": name, "epoch": m.epoch, "batch": m.in_epoch, "step": m.step, "at": round(time.time(), 3)}
            m.interruptions.append(where)
            self._checkpoint(m, end_of_epoch=False)
            self._fail(m, Interrupted(f"interrupted by {name} at epoch {m.epoch}, batch {m.in_epoch} (step {m.step})"
                                      f" in a pack; checkpoint written; relaunch to resume it", signum))
        raise Interrupted(f"pack interrupted by {name}; every run's checkpoint written: relaunch the same command "
                          f"to resume them", signum)

    def run(self) -> list[Outcome]:
        self.prepare()
        reset_peak_memory()
        memory_before = memory_now_mb()
        with StopSignal() as stop:
            try:
                while self.queue or self.active:
                    self.admit()
                    ready = [m for m in self.active if m.done]  # resumed from a checkpoint at its end
                    if ready:
                        self._end_of_epochs(memory_before)
                        continue
                    if not self.active:
                        continue
                    try:
                        self.step()
                    except Exception as e:  # the shared step failed: every run in it fails with it
                        for m in list(self.active):
                            self._fail(m, e)
                        continue
                    self._end_of_epochs(memory_before)
                    if stop.signum is not None:
                        self._interrupt(stop.signum)
            except BaseException as e:
                for m in list(self.active):
                    self._fail(m, e)
                raise
        return [o or Outcome("failed", error=RuntimeError("not trained")) for o in self.outcomes]


def train_pack(cfgs: list[Config], pack_size: int, pad_slack: Union[float, str, None] = "auto") -> list[Outcome]:
    """Train `cfgs` `pack_size` at a time in one packed model; returns one Outcome per config, in order. The configs
    must share one frozen base (loralab.sweep.packing groups a sweep's jobs by it). A run that fails (diverges, a
    damaged checkpoint) fails alone and the others go on; one the packed layer cannot express comes back `solo`."""
    return Pack(cfgs, pack_size, pad_slack=pad_slack).run() if cfgs else []

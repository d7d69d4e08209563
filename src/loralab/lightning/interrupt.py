"""What a run does when it is told to stop: SIGTERM, SIGUSR1, or SLURM's warning before the time limit.

It finishes the optimizer step it is in, writes a mid-epoch checkpoint (trained tensors, optimizer, schedule, loop
position, data position and RNG state: the resume is exact) and stops with `Interrupted`. Under submitit with
resubmissions left (hydra.launcher.max_num_timeout), the warning signal is then handed to submitit, which requeues
the job (`scontrol requeue`): the requeued job resumes from that checkpoint. Submitit's requeue is used rather than
Lightning's SLURM auto-requeue because the launcher waits on submitit's job and its result file: a job requeued
behind its back would look finished, or lost, to the sweep.
"""
from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L

from ..errors import Interrupted

log = logging.getLogger("loralab")
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")  # SIGUSR2: submitit's time-limit warning (sbatch --signal=USR2@delay)


def _submitit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")


class Interruption(L.Callback):
    """Turns a stop signal into a checkpoint at the next optimizer-step boundary, then `Interrupted` (or submitit's
    requeue). A step that never reaches its end (a compile that hangs, a stuck kernel) is interrupted after `grace_s`
    (KeyboardInterrupt: Lightning tears down and exits 1), and the process killed after twice that (exit 143).

    With several ranks (DDP) a signal may reach one rank only, and a checkpoint is a collective write: there the
    signal goes to Lightning's own handler, which stops every rank at the next batch, and the run resumes from its
    last epoch-end checkpoint."""

    grace_s = 30.0

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._timer: Optional[threading.Timer] = None

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        distributed = trainer.world_size > 1
        for name in SIGNALS:
            sig = getattr(signal, name)
            previous = signal.getsignal(sig)
            if distributed and sig != signal.SIGTERM:
                continue
            self._previous[sig] = previous

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                if distributed and callable(previous):
                    previous(signum, frame)  # Lightning's: every rank stops at the next batch boundary
                if self.signum is None:
                    self.signum = signum
                self._arm()

            signal.signal(sig, handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signum is None or trainer.world_size > 1 or trainer.fit_loop._should_accumulate():
            return
        name = signal.Signals(self.signum).name
        where = {"signal": name, "epoch": trainer.current_epoch, "batch": batch_idx + 1,
                 "step": trainer.global_step, "at": round(time.time(), 3)}
        pl_module.interruptions.append(where)
        trainer.save_checkpoint(self.path)
        message = (f"interrupted by {name} at epoch {where['epoch']}, batch {where['batch']} (step {where['step']}); "
                   f"checkpoint written to {self.path}")
        previous = self._previous.get(self.signum)
        if _submitit_handler(previous):
            try:
                previous(self.signum, None)  # requeues the job and exits, or raises: not requeued (and why)
            except SystemExit:
                raise Interrupted(f"{message}; submitit requeued the job: it resumes from there", self.signum,
                                  requeued=True) from None
            except Exception as e:  # submitit's UncompletedJobError: no resubmission left
                message += f"; not requeued ({e})"
        raise Interrupted(f"{message}; relaunch the same command to resume from it", self.signum)

    def _arm(self) -> None:
        if self._timer is not None:
            return
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # interrupt_main() does nothing while SIGINT is ignored, as it is in a process started under nohup or by
            # a pytest-xdist worker: the hanging step would only ever meet the hard kill, with no record written
            signal.signal(signal.SIGINT, signal.default_int_handler)

        def deadline() -> None:
            _thread.interrupt_main()
            time.sleep(self.grace_s)
            os._exit(128 + signal.SIGTERM)

        self._timer = threading.Timer(self.grace_s, deadline)
        self._timer.daemon = True
        self._timer.start()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._disarm()  # the loop stopped (Interrupted, or the deadline's interrupt): nothing is hanging any more

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._disarm()

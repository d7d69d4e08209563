"""One error family: what a user did wrong, said in one line that names the field, the value and the fix.

Every command-line entry (`loralab ...`, `python train.py`) prints a LoralabError as that one line and exits with
EXIT_CODE, without a traceback; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Any

EXIT_CODE = 2


class LoralabError(Exception):
    """A user-facing error; the message is complete (what is wrong and how to fix it)."""


class ConfigError(LoralabError, ValueError):
    """A bad configuration value or input path: the message names the field, the value and the fix."""


class AnalysisError(LoralabError):
    """A bad input to an analysis command (a path without adapters, a missing metric or axis)."""


class RunBusy(LoralabError, RuntimeError):
    """Another live process is training this very run (same config, same store)."""


class DiskFull(LoralabError, OSError):
    """A write found no space left; the message names the path, what it needed and what was free."""


class DivergedError(RuntimeError):
    """Training loss became NaN/inf or exploded; the run stops early and is recorded as failed."""


class Interrupted(SystemExit):
    """A signal (SIGTERM, SIGUSR1, SLURM's time-limit warning) stopped training after a checkpoint was written.

    A SystemExit on purpose: Hydra's job runner and submitit catch Exception only, so the process (a whole sweep, as
    with Ctrl-C) ends with exit code 128 + signal, and a job submitit requeued ends without a result, as its protocol
    wants. `str()` is the one-line report; relaunching resumes from the checkpoint."""

    def __init__(self, message: str, signum: int, requeued: bool = False) -> None:
        super().__init__(128 + signum)
        self.message, self.signum, self.requeued = message, signum, requeued

    def __str__(self) -> str:
        return self.message


def config_error(field_name: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{field_name}={value!r} is invalid: {fix}")


def report(prog: str, error: LoralabError) -> int:
    """Print `prog: error: <message>` on stderr; returns the exit code."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_CODE

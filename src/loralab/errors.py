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


class DivergedError(RuntimeError):
    """Training loss became NaN/inf or exploded; the run stops early and is recorded as failed."""


def config_error(field_name: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{field_name}={value!r} is invalid: {fix}")


def report(prog: str, error: LoralabError) -> int:
    """Print `prog: error: <message>` on stderr; returns the exit code."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_CODE

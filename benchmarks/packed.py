"""Section (i): packed sweeps in the host-bound regime (the tiny model of section (g), where a step costs what the
host spends on it, as on a GPU). Packs of 1, 4 and 8 runs (different seeds and ranks, LoRA r=8/4/16 on q and v,
SST-2 batches of 32, fp32) against loralab's solo step on the same batches: the median time of one step of the
pack, the time per run-step (a step of the pack moves every run one batch), and the sweep's speed-up over training
the same runs one at a time.

`python benchmarks/run.py --only i` (or `python benchmarks/packed.py` to print the table alone).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_bound import OVERRIDES, loralab_step, setup  # noqa: E402

RANKS = (8, 4, 16, 8, 4, 16, 8, 4)


def pack_step_ms(n: int, steps: int, warmup: int, store: Path, pad_slack: Any = "auto", batch_size: int = 32) -> float:
    """Median wall time of one step of a pack of `n` runs (data, forward, backward, n optimizer steps)."""
    from loralab.config import compose
    from loralab.run.packed import Pack

    cfgs = [compose([*OVERRIDES, f"trainer.max_steps={steps + 10}", f"store.root={store}", f"seed={i}",
                     f"lora.r={RANKS[i % len(RANKS)]}", f"data.batch_size={batch_size}"]) for i in range(n)]
    pack = Pack(cfgs, n, pad_slack=pad_slack)
    pack.prepare()
    pack.admit()
    assert len(pack.active) == n, [o for o in pack.outcomes if o]
    times = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            pack.step()
            times.append(time.perf_counter() - t0)
    finally:
        for m in list(pack.active):
            m.locks.close()
    return 1e3 * statistics.median(times[warmup:])


def packed_section(steps: int = 150, warmup: int = 20, reps: int = 3, sizes: tuple[int, ...] = (1, 4, 8)) -> str:
    torch.manual_seed(0)
    solo, packs, one_pass, b1 = [], {n: [] for n in sizes}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg, resolved, tokenizer, batches = setup(steps, Path(tmp))
        batch = len(batches[0]["labels"])
        for rep in range(reps):  # interleaved, so machine noise spreads over all of them
            solo.append(loralab_step(cfg, resolved, tokenizer, batches, warmup, Path(tmp) / f"solo{rep}")["step_ms"])
            for n in sizes:
                packs[n].append(pack_step_ms(n, steps, warmup, Path(tmp) / f"pack{n}-{rep}"))
            one_pass.append(pack_step_ms(max(sizes), steps, warmup, Path(tmp) / f"pass{rep}", pad_slack=None))
            b1.append(pack_step_ms(1, steps, warmup, Path(tmp) / f"b1-{rep}", batch_size=1))
    s = statistics.median(solo)
    lines = ["| training | step (ms, median) | repeats (ms) | ms per run-step | samples/s, all runs | "
             "sweep speed-up vs solo |", "|---|---|---|---|---|---|",
             f"| solo (loralab's Lightning step, one run) | {s:.2f} | {', '.join(f'{x:.2f}' for x in solo)} | "
             f"{s:.2f} | {1e3 * batch / s:.0f} | 1.00x |"]
    rows = [(f"pack of {n}", packs[n], n) for n in sizes]
    rows.append((f"pack of {max(sizes)}, one pass padded to the widest (pad_slack=null)", one_pass, max(sizes)))
    for label, times, n in rows:
        p = statistics.median(times)
        lines.append(f"| {label} | {p:.2f} | {', '.join(f'{x:.2f}' for x in times)} | {p / n:.2f} | "
                     f"{1e3 * batch * n / p:.0f} | {s / (p / n):.2f}x |")
    p1, fixed = statistics.median(packs[1]), statistics.median(b1)
    return (f"tiny-llama (2 layers, 64 wide) + LoRA on q, v (ranks {', '.join(map(str, RANKS[:max(sizes)]))} by run, "
            f"seeds 0..{max(sizes) - 1}), SST-2 batches of {batch} (each run its own seeded order), fp32, LoRA dropout "
            f"0. Median step over steps {warmup}..{steps}, {reps} interleaved repeats. A pack's step moves each of its "
            f"runs one batch, so a sweep of N runs trained as one pack takes (pack step / N) per run-step against the "
            f"solo step: the speed-up column. Start-up (model load per run) is left out of both. Packs pass runs "
            f"whose batches differ in width through the base separately (pad_slack=auto: 0.1 on a CPU), the last "
            f"row pads all to the widest.\n\nWhat packing can save here: a packed step of one run at batch 1 costs "
            f"{fixed:.2f} ms (the per-step host cost), at batch {batch} {p1:.2f} ms, so on this CPU "
            f"{100 * (1 - fixed / p1):.0f} % of a batch-{batch} step is arithmetic that grows with the batch, which no "
            f"packing removes.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    print(packed_section())

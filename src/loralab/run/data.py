"""GLUE data: hub or local mirror -> tokenized once (disk cache) -> length-grouped, dynamically padded batches."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import DataConfig, TaskConfig
from ..errors import ConfigError
from ..store import atomic_write
from .weights import hub_reachable, offline_reason

HUB_DATASET = "nyu-mll/glue"


def local_split_file(data_dir: str, task: str, split: str) -> Optional[Path]:
    files = sorted((Path(data_dir) / task).glob(f"{split}-*.parquet"))
    return files[0] if files else None


def check_split(task: TaskConfig, split: str, data_dir: Optional[str]) -> None:
    """Fail before any expensive work when a split cannot be read."""
    if data_dir:
        if not Path(data_dir).is_dir():
            raise ConfigError(f"data.dir={data_dir!r} is not a folder: point data.dir (or GLUE_DIR) at a GLUE mirror "
                              f"laid out as <dir>/<task>/<split>-00000-of-00001.parquet, or set data.dir=null for the hub")
        if local_split_file(data_dir, task.name, split) is None:
            have = sorted(p.name.split("-")[0] for p in (Path(data_dir) / task.name).glob("*.parquet"))
            raise ConfigError(
                f"task.name={task.name!r}: split {split!r} is not in the local mirror data.dir={data_dir!r} "
                f"(it has: {have or 'nothing for this task'}). Add {task.name}/{split}-00000-of-00001.parquet there, "
                f"or set data.dir=null to load {HUB_DATASET} from the hub (needs internet)")
    elif not hub_reachable():
        raise ConfigError(f"data.dir=None: task {task.name!r} would load from the hub ({HUB_DATASET}) but "
                          f"{offline_reason()}. Set data.dir (or GLUE_DIR) to a local GLUE mirror, e.g. ../shared/glue")


def load_split(task: TaskConfig, split: str, data_dir: Optional[str]):
    """One GLUE split as a `datasets.Dataset`, with the same schema from the hub or the mirror."""
    import datasets

    check_split(task, split, data_dir)
    if data_dir:
        return datasets.Dataset.from_parquet(str(local_split_file(data_dir, task.name, split)))
    return datasets.load_dataset(HUB_DATASET, task.name, split=split)


@dataclass
class Encoded:
    """A tokenized split as flat arrays: example i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray
    types: Optional[np.ndarray]
    offsets: np.ndarray
    labels: np.ndarray
    idx: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray) -> "Encoded":
        starts, ends = self.offsets[keep], self.offsets[keep + 1]
        take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(keep) else np.zeros(0, int)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)])
        return Encoded(self.ids[take], None if self.types is None else self.types[take], offsets,
                       self.labels[keep], self.idx[keep])


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:2000])
    return hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}|{vocab}".encode()).hexdigest()[:12]


def encode_split(tokenizer, task: TaskConfig, split: str, cfg: DataConfig) -> Encoded:
    """Tokenize a split once per (tokenizer, task, split, max length); later jobs read the cache."""
    key = hashlib.sha256(json.dumps([tokenizer_fingerprint(tokenizer), task.name, task.text_fields, split,
                                     cfg.max_length, cfg.dir or HUB_DATASET]).encode()).hexdigest()[:16]
    path = Path(cfg.cache_dir) / task.name / f"{split}-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return Encoded(z["ids"], z["types"] if "types" in z.files else None, z["offsets"], z["labels"], z["idx"])
    ds = load_split(task, split, cfg.dir)
    table = ds.data  # the Arrow table: plain lists, whatever datasets' column type is
    columns = [table.column(f).to_pylist() for f in task.text_fields]
    enc = tokenizer(*columns, truncation=True, max_length=cfg.max_length, padding=False)
    lengths = np.fromiter((len(x) for x in enc["input_ids"]), dtype=np.int64, count=len(ds))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter((t for x in enc["input_ids"] for t in x), dtype=np.int32, count=int(offsets[-1]))
    types = None
    if "token_type_ids" in enc:
        types = np.fromiter((t for x in enc["token_type_ids"] for t in x), dtype=np.int8, count=int(offsets[-1]))
    labels = np.asarray(table.column("label").to_numpy(), dtype=np.float32 if task.is_regression else np.int64)
    idx = np.asarray(table.column("idx").to_numpy(), dtype=np.int64)
    out = Encoded(ids, types, offsets, labels, idx)
    arrays = dict(ids=ids, offsets=offsets, labels=labels, idx=idx, **({"types": types} if types is not None else {}))
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))  # concurrent jobs of a sweep never read half a cache
    return out


def subsample(enc: Encoded, limit: Optional[int], seed: int) -> Encoded:
    if limit is None or limit >= len(enc):
        return enc
    keep = np.sort(np.random.default_rng(seed).choice(len(enc), size=limit, replace=False))
    return enc.subset(keep)


def padded_width(longest: int, multiple: int = 1, buckets: Optional[list[int]] = None) -> int:
    """The batch's padded length: the smallest bucket that fits (data.length_buckets; past the last, the longest
    itself), else the longest rounded up to data.pad_to_multiple_of."""
    for b in buckets or ():
        if b >= longest:
            return b
    return int(-(-longest // multiple) * multiple)


class PaddedBatches(Dataset):
    """Indexed by a list of example indices; returns one padded batch (dynamic, or to a length bucket)."""

    def __init__(self, enc: Encoded, pad_id: int, pad_to_multiple_of: int, regression: bool,
                 buckets: Optional[list[int]] = None):
        self.enc, self.pad_id, self.multiple, self.regression = enc, pad_id, pad_to_multiple_of, regression
        self.buckets = list(buckets) if buckets else None

    def __len__(self) -> int:
        return len(self.enc)

    def __getitem__(self, batch: list[int]) -> dict[str, torch.Tensor]:
        e, lengths = self.enc, self.enc.lengths[batch]
        width = padded_width(int(lengths.max()), self.multiple, self.buckets)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64) if e.types is not None else None
        for row, (i, n) in enumerate(zip(batch, lengths)):
            s = e.offsets[i]
            ids[row, :n] = e.ids[s:s + n]
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = e.types[s:s + n]
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
               "labels": torch.from_numpy(e.labels[batch]), "idx": torch.from_numpy(e.idx[batch])}
        if types is not None:
            out["token_type_ids"] = torch.from_numpy(types)
        return out


class LengthGroupedBatches(Sampler[list[int]]):
    """Seeded batches of similar length: shuffle, sort inside mega-batches, shuffle the batch order.

    With `group=False` it is a plain seeded random batcher. Each rank takes every world-th batch, so DDP needs no
    DistributedSampler; `set_epoch` (called by Lightning) reshuffles reproducibly per epoch.

    Gradient accumulation (`accum` > 1): each batch of `batch_size` (one optimizer step) is yielded as `accum`
    consecutive micro-batches of (near-)equal size, so an optimizer step sees the same examples whatever `accum` is,
    and every rank yields the same number of micro-batches. A last, partial batch with fewer than `accum` examples
    cannot be split and is dropped (with `accum` = 1 nothing ever is).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, group: bool = True,
                 rank: int = 0, world: int = 1, mega: int = 50, accum: int = 1):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.rank, self.world, self.mega, self.epoch, self.accum = rank, world, mega, 0, accum
        self._resume: Optional[tuple[int, int]] = None  # (epoch, micro-batches already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, done: int) -> None:
        """The next pass over `epoch` skips its first `done` micro-batches (a run resumed mid-epoch)."""
        self._resume = (epoch, done)

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.lengths))
        if self.group:
            size = self.batch_size * self.mega
            perm = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                   for c in np.array_split(perm, max(1, -(-len(perm) // size)))])
        batches = [perm[i:i + self.batch_size] for i in range(0, len(perm), self.batch_size)]
        if batches and len(batches[-1]) < self.accum:
            batches.pop()
        order = rng.permutation(len(batches))
        n = len(batches) - len(batches) % self.world if self.world > 1 else len(batches)
        return [batches[i] for i in order[:n]]

    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self._resume and self._resume[0] == self.epoch:  # not before: Lightning may iterate once before set_epoch
            skip, self._resume = self._resume[1], None
        micro = (m for b in self._batches()[self.rank::self.world] for m in np.array_split(b, self.accum))
        for i, m in enumerate(micro):
            if i >= skip:
                yield m.tolist()

    def __len__(self) -> int:
        n = -(-len(self.lengths) // self.batch_size)
        if 0 < len(self.lengths) % self.batch_size < self.accum:
            n -= 1
        return (n // self.world if self.world > 1 else n) * self.accum


def eval_batches(lengths: np.ndarray, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Longest first, so padding is minimal; sharded by rank without duplicates (metrics are synced exactly)."""
    mine = np.argsort(-lengths, kind="stable")[rank::world]
    return [mine[i:i + batch_size].tolist() for i in range(0, len(mine), batch_size)]


class GlueDataModule(L.LightningDataModule):
    def __init__(self, task: TaskConfig, cfg: DataConfig, tokenizer, seed: int):
        super().__init__()
        self.task, self.cfg, self.tokenizer, self.seed = task, cfg, tokenizer, seed
        self.train: Optional[Encoded] = None
        self.evals: dict[str, Encoded] = {}
        self._resume: Optional[tuple[int, int]] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train is None:
            self.train = subsample(encode_split(self.tokenizer, self.task, "train", self.cfg),
                                   self.cfg.train_limit, self.seed)
            self.evals = {s: subsample(encode_split(self.tokenizer, self.task, s, self.cfg), self.cfg.val_limit,
                                       self.seed) for s in self.task.eval_splits}

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, enc: Encoded, sampler) -> DataLoader:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ds = PaddedBatches(enc, pad, self.cfg.pad_to_multiple_of, self.task.is_regression,
                           self.cfg.padding_buckets())
        # Its own generator: starting an epoch's iterator must not draw from the global torch RNG, which seeds
        # dropout (a resumed run would otherwise see a shifted dropout stream and end differently).
        return DataLoader(ds, sampler=sampler, batch_size=None, num_workers=self.cfg.num_workers,
                          persistent_workers=self.cfg.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    # The data position, in every checkpoint: the epoch and how many of its micro-batches were trained, read from the
    # trainer's own progress counter (the loader's iterator runs ahead by its prefetch). Lightning restores a
    # datamodule's state before it builds the loaders, so a run resumed mid-epoch sees exactly the rest of the epoch.
    def state_dict(self) -> dict[str, int]:
        t = self.trainer
        return {"epoch": t.current_epoch, "done": int(t.fit_loop.epoch_loop.batch_progress.current.processed)} \
            if t is not None else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (state["epoch"], state["done"]) if state else None

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = LengthGroupedBatches(self.train.lengths, self.cfg.batch_size, self.seed,
                                       group=self.cfg.group_by_length, rank=rank, world=world,
                                       accum=self.cfg.grad_accum)
        if self._resume:
            sampler.resume(*self._resume)
        return self._loader(self.train, sampler)

    def val_dataloader(self) -> list[DataLoader]:
        rank, world = self._rank_world()
        return [self._loader(enc, eval_batches(enc.lengths, self.cfg.eval_batch_size, rank, world))
                for enc in self.evals.values()]

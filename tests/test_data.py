"""GLUE data: tokenization cache, length-grouped batches, dynamic padding and deterministic subsampling."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import GLUE_DIR, Compose, needs_glue

import loralab.run.data
from loralab.config import Config
from loralab.run.data import (
    GlueDataModule,
    LengthGroupedBatches,
    PaddedBatches,
    encode_split,
    eval_batches,
    local_split_file,
    subsample,
)
from loralab.run.weights import load_tokenizer, resolve_model_path

pytestmark = needs_glue("rte", "stsb")


@pytest.fixture(scope="module")
def rte(compose_cfg: Compose) -> Config:
    return compose_cfg(["task=rte"])


@pytest.fixture(scope="module")
def tokenizer(rte: Config):
    return load_tokenizer(rte.model, resolve_model_path(rte.model.path))


def synthetic_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Skewed like GLUE: many short inputs, a long tail."""
    return np.clip(np.random.default_rng(seed).lognormal(3.3, 0.6, n).astype(int), 3, 128)


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


# --- tokenization cache -------------------------------------------------------------------------------------

def test_encode_split_tokenizes_once_then_reads_the_cache(rte: Config, tokenizer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = dataclasses.replace(rte.data, cache_dir=str(tmp_path))
    calls: list[str] = []
    real_load = loralab.run.data.load_split

    def counting(task, split, data_dir):
        calls.append(split)
        return real_load(task, split, data_dir)

    monkeypatch.setattr(loralab.run.data, "load_split", counting)
    first = encode_split(tokenizer, rte.task, "validation", data)
    assert calls == ["validation"]
    assert len(list(tmp_path.rglob("validation-*.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(loralab.run.data, "load_split", refuse)
    second = encode_split(tokenizer, rte.task, "validation", data)
    for field in ("ids", "types", "offsets", "labels", "idx"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))

    # A different truncation length is a different cache entry.
    monkeypatch.setattr(loralab.run.data, "load_split", counting)
    short = encode_split(tokenizer, rte.task, "validation", dataclasses.replace(data, max_length=32))
    assert calls == ["validation", "validation"] and short.lengths.max() == 32
    assert len(list(tmp_path.rglob("validation-*.npz"))) == 2


def test_encoding_matches_the_tokenizer(rte: Config, tokenizer) -> None:
    enc = encode_split(tokenizer, rte.task, "validation", rte.data)
    frame = pd.read_parquet(local_split_file(GLUE_DIR, "rte", "validation"))
    assert len(enc) == len(frame) and enc.lengths.max() <= rte.data.max_length
    np.testing.assert_array_equal(enc.labels, frame["label"].to_numpy())
    np.testing.assert_array_equal(enc.idx, frame["idx"].to_numpy())
    for i in (0, 7, len(frame) - 1):
        want = tokenizer(frame["sentence1"][i], frame["sentence2"][i], truncation=True, max_length=128)
        s, e = enc.offsets[i], enc.offsets[i + 1]
        assert enc.ids[s:e].tolist() == want["input_ids"]
        assert enc.types[s:e].tolist() == want["token_type_ids"]


# --- length-grouped batches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("n", [1000, 970, 5])
def test_every_index_once_per_epoch(group: bool, n: int) -> None:
    sampler = LengthGroupedBatches(synthetic_lengths(n), batch_size=32, seed=0, group=group)
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(flat(batches)) == list(range(n))
        assert len(batches) == len(sampler) and all(1 <= len(b) <= 32 for b in batches)


@pytest.mark.parametrize("group", [True, False])
def test_order_depends_on_seed_and_epoch_only(group: bool) -> None:
    lengths = synthetic_lengths(1000)

    def order(seed: int, epoch: int) -> list[list[int]]:
        sampler = LengthGroupedBatches(lengths, batch_size=32, seed=seed, group=group)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 3) == order(0, 3)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_grouped_batches_pad_less_than_random() -> None:
    lengths = synthetic_lengths(4000)

    def mean_padded(group: bool) -> float:
        batches = list(LengthGroupedBatches(lengths, batch_size=32, seed=0, group=group))
        return float(np.mean([lengths[b].max() for b in batches]))

    grouped, random = mean_padded(True), mean_padded(False)
    assert grouped < 0.8 * random
    assert grouped >= lengths.mean()  # sanity: a batch pads to at least its mean


@pytest.mark.parametrize("n", [1000, 970])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_the_batches(n: int, world: int) -> None:
    lengths = synthetic_lengths(n)
    ranks = [LengthGroupedBatches(lengths, batch_size=32, seed=5, rank=r, world=world) for r in range(world)]
    for s in ranks:
        s.set_epoch(2)
    per_rank = [list(s) for s in ranks]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, "every rank must step the same number of times (DDP would hang otherwise)"
    assert all(len(b) == len(s) for b, s in zip(per_rank, ranks, strict=True))
    seen = flat([flat(b) for b in per_rank])
    assert len(seen) == len(set(seen)), "no example on two ranks"
    single = LengthGroupedBatches(lengths, batch_size=32, seed=5)
    single.set_epoch(2)
    all_batches = {tuple(b) for b in single}
    sharded = {tuple(b) for shard in per_rank for b in shard}
    assert sharded <= all_batches and len(all_batches) - len(sharded) < world  # only the remainder is dropped


def test_eval_batches_longest_first_and_sharded_exactly() -> None:
    lengths = synthetic_lengths(777)
    batches = eval_batches(lengths, 64)
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)
    shards = [eval_batches(lengths, 64, rank=r, world=2) for r in range(2)]
    assert sorted(flat(shards[0]) + flat(shards[1])) == list(range(777))  # metrics see each example once


# --- dynamic padding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("multiple", [8, 1])
def test_dynamic_padding_width(rte: Config, tokenizer, multiple: int) -> None:
    enc = encode_split(tokenizer, rte.task, "validation", rte.data)
    pad = tokenizer.pad_token_id
    ds = PaddedBatches(enc, pad, multiple, regression=False)
    for batch in list(LengthGroupedBatches(enc.lengths, 16, seed=0))[:6]:
        out = ds[batch]
        lengths = enc.lengths[batch]
        width = int(np.ceil(lengths.max() / multiple) * multiple)
        shape = (len(batch), width)
        assert out["input_ids"].shape == out["attention_mask"].shape == out["token_type_ids"].shape == shape
        assert out["attention_mask"].sum(1).tolist() == lengths.tolist()
        for row, (i, n) in enumerate(zip(batch, lengths, strict=True)):
            assert out["input_ids"][row, :n].tolist() == enc.ids[enc.offsets[i]:enc.offsets[i] + n].tolist()
            assert (out["input_ids"][row, n:] == pad).all()
        assert out["labels"].tolist() == enc.labels[batch].tolist()
        assert out["idx"].tolist() == enc.idx[batch].tolist()


def test_length_buckets_pad_to_a_few_static_widths(rte: Config, tokenizer) -> None:
    """data.length_buckets: each batch pads to the smallest bucket that fits, the last bucket being max_length."""
    cfg = dataclasses.replace(rte.data, length_buckets=[32, 64])
    assert cfg.padding_buckets() == [32, 64, 128]
    enc = encode_split(tokenizer, rte.task, "validation", rte.data)
    ds = PaddedBatches(enc, tokenizer.pad_token_id, 1, regression=False, buckets=cfg.padding_buckets())
    widths = set()
    for batch in LengthGroupedBatches(enc.lengths, 16, seed=0):
        out, longest = ds[batch], int(enc.lengths[batch].max())
        width = out["input_ids"].shape[1]
        assert width == min(b for b in (32, 64, 128) if b >= longest)
        assert out["attention_mask"].sum(1).tolist() == enc.lengths[batch].tolist()
        widths.add(width)
    assert widths <= {32, 64, 128} and len(widths) >= 2


@pytest.mark.parametrize("buckets", ["[64,32]", "[0,32]", "[32,256]", "[]"])
def test_bad_length_buckets_name_the_field(compose_cfg: Compose, buckets: str) -> None:
    from loralab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.length_buckets=.*increasing padded lengths"):
        compose_cfg([f"data.length_buckets={buckets}"])


def test_regression_labels_are_float(compose_cfg: Compose, tokenizer) -> None:
    cfg = compose_cfg(["task=stsb"])
    enc = encode_split(tokenizer, cfg.task, "validation", cfg.data)
    out = PaddedBatches(enc, tokenizer.pad_token_id, 8, regression=True)[[0, 1, 2]]
    assert out["labels"].dtype.is_floating_point and 0 <= float(out["labels"].min()) <= 5


# --- subsampling --------------------------------------------------------------------------------------------

def test_subsample_is_seeded(rte: Config, tokenizer) -> None:
    enc = encode_split(tokenizer, rte.task, "validation", rte.data)
    a, b, c = subsample(enc, 50, 0), subsample(enc, 50, 0), subsample(enc, 50, 1)
    assert len(a) == 50 and a.idx.tolist() == b.idx.tolist() != c.idx.tolist()
    assert a.idx.tolist() == sorted(a.idx.tolist()) and set(a.idx) <= set(enc.idx)
    pos = {v: k for k, v in enumerate(enc.idx.tolist())}
    for j in (0, 25, 49):  # the subset keeps each example's tokens and label
        i = pos[int(a.idx[j])]
        tokens = enc.ids[enc.offsets[i]:enc.offsets[i + 1]]
        assert a.ids[a.offsets[j]:a.offsets[j + 1]].tolist() == tokens.tolist()
        assert a.labels[j] == enc.labels[i]
    assert subsample(enc, None, 0) is enc and subsample(enc, len(enc) + 5, 0) is enc


def test_datamodule_limits(compose_cfg: Compose, tokenizer) -> None:
    def setup(seed: int) -> GlueDataModule:
        cfg = compose_cfg(["task=rte", "data.train_limit=120", "data.val_limit=40", "data.batch_size=16",
                           f"seed={seed}"])
        dm = GlueDataModule(cfg.task, cfg.data, tokenizer, cfg.seed)
        dm.setup("fit")
        return dm

    dm, again, other = setup(0), setup(0), setup(1)
    assert len(dm.train) == 120 and len(dm.evals["validation"]) == 40
    assert dm.train.idx.tolist() == again.train.idx.tolist() != other.train.idx.tolist()
    assert dm.evals["validation"].idx.tolist() == again.evals["validation"].idx.tolist()
    train_idx = [i for batch in dm.train_dataloader() for i in batch["idx"].tolist()]
    assert sorted(train_idx) == sorted(dm.train.idx.tolist())
    (val,) = dm.val_dataloader()
    val_idx = [i for batch in val for i in batch["idx"].tolist()]
    assert sorted(val_idx) == sorted(dm.evals["validation"].idx.tolist())

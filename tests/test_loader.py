"""The pretrain data loader: manifest checks, source mixing, disjoint ranks, exact O(1) resume."""

import json
from collections import Counter

import numpy as np
import pytest
from conftest import pretrain_params, write_prepared

from tasks.errors import UserError
from tasks.pretrain.loader import MixedLoader, ShardCache, SourceOrder, open_prepared, token_dtype, val_batches


def _rows(batches):
    return [tuple(row) for batch in batches for row in batch]


def test_ranks_are_disjoint_and_together_form_the_global_batch(pretrain_workspace):
    params, _ = pretrain_workspace
    data = open_prepared(params)
    single = MixedLoader(data, seed=7, micro_batch=8, grad_accum=2, rank=0, world=1)
    ranks = [MixedLoader(data, seed=7, micro_batch=4, grad_accum=2, rank=r, world=2) for r in range(2)]
    for step in range(5):
        whole = _rows(single.step_batches(step))
        parts = [_rows(loader.step_batches(step)) for loader in ranks]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(whole)
    assert ranks[0].state() == ranks[1].state() == single.state()


def test_resume_from_state_is_exact(pretrain_workspace):
    params, _ = pretrain_workspace
    data = open_prepared(params)
    straight = MixedLoader(data, seed=3, micro_batch=4, grad_accum=2, rank=1, world=2)
    for step in range(40):  # several epochs of the 300-row sources
        straight.step_batches(step)
    state = straight.state()
    resumed = MixedLoader(data, seed=3, micro_batch=4, grad_accum=2, rank=1, world=2)
    resumed.load_state(json.loads(json.dumps(state)))  # as it travels through checkpoint.json
    for step in range(40, 45):
        assert np.array_equal(np.stack(straight.step_batches(step)), np.stack(resumed.step_batches(step)))


def test_sources_are_mixed_by_weight_and_each_epoch_is_a_permutation(pretrain_workspace):
    params, _ = pretrain_workspace
    data = open_prepared(params)
    loader = MixedLoader(data, seed=0, micro_batch=16, grad_accum=1, rank=0, world=1)
    rows = [row for step in range(100) for row in _rows(loader.step_batches(step))]
    counts = loader.state()
    assert sum(counts.values()) == 1600
    assert counts["alpha"] / 1600 == pytest.approx(0.7, abs=0.04)
    stride = Counter(int((row[1] - row[0]) % 512) for row in rows)  # fixtures: alpha stride 1, beta stride 3
    assert stride[1] == counts["alpha"] and stride[3] == counts["beta"]
    alpha = [row for row in rows if (row[1] - row[0]) % 512 == 1]
    cache = ShardCache(data.train["alpha"], np.int64)
    stored = [tuple(row) for shard in range(len(data.train["alpha"].shards)) for row in cache.shard(shard)]
    assert sorted(alpha[:300]) == sorted(stored)  # alpha's first epoch hands out each stored row once
    assert alpha[:300] != stored  # ... shuffled


def test_shards_are_held_narrow_the_next_one_prefetched_and_the_row_order_unchanged(pretrain_workspace):
    params, _ = pretrain_workspace
    data = open_prepared(params)
    assert token_dtype(data.vocab_size) == np.uint16 and token_dtype(32000) == np.uint16
    assert token_dtype(256) == np.uint8 and token_dtype(128256) == np.uint32
    loader = MixedLoader(data, seed=5, micro_batch=4, grad_accum=2, rank=0, world=1)
    assert all(batch.dtype == np.int64 for batch in loader.step_batches(0)), "the embedding takes int64"
    for order in loader.orders:
        held = list(order.cache._cache.values())
        assert held and all(rows.dtype == np.uint16 for rows in held)
        assert len(order.cache._pending) + len(held) == 2, "the shard after the current one is on its way"
    # The rows a source hands out, in order, are those of whole int64 shards read without prefetch.
    for index, name in enumerate(loader.names):
        narrow = SourceOrder(data.train[name], 5, index, token_dtype(data.vocab_size))
        wide = SourceOrder(data.train[name], 5, index, np.int64)
        wide.cache.prefetch = lambda shard: None  # the reference reads each shard when it is asked for
        for consumed in range(2 * data.train[name].rows + 7):  # into the third epoch
            assert np.array_equal(narrow.row(consumed), wide.row(consumed)), (name, consumed)


def test_val_batches_are_fixed_and_disjoint_across_ranks(pretrain_workspace):
    params, _ = pretrain_workspace
    data = open_prepared(params)
    a = [val_batches(data, 0, 4, 3, rank, 2) for rank in range(2)]
    b = [val_batches(data, 0, 4, 3, rank, 2) for rank in range(2)]
    assert all(np.array_equal(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    assert not set(_rows(a[0])) & set(_rows(a[1]))


def test_missing_prepared_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"paths.data: no prepared data .*tinyllama prepare"):
        open_prepared(pretrain_params(tmp_path))


def test_tokenizer_mismatch_is_a_user_error(pretrain_workspace):
    params, root = pretrain_workspace
    (root / "models" / "tokenizer" / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(UserError, match="built with tokenizer sha256"):
        open_prepared(params)


def test_vocab_mismatch_is_a_user_error(tmp_path):
    params = pretrain_params(tmp_path)
    write_prepared(tmp_path / "data", tmp_path / "models" / "tokenizer", {"alpha": 1, "beta": 3},
                   seq_len=64, vocab_size=1024, train_rows=10, val_rows=2, rows_per_shard=8)
    with pytest.raises(UserError, match="vocab_size 1024, the model has 512"):
        open_prepared(params)


def test_unknown_source_is_a_user_error(tmp_path):
    params = pretrain_params(tmp_path)
    write_prepared(tmp_path / "data", tmp_path / "models" / "tokenizer", {"alpha": 1},
                   seq_len=64, vocab_size=512, train_rows=10, val_rows=2, rows_per_shard=8)
    with pytest.raises(UserError, match=r"data.sources\[beta\]: not in the prepared data \(has: alpha"):
        open_prepared(params)

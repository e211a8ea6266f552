import pytest
import torch

from softprompt.collate import Batch, TokenTable, collate


def test_pads_right_to_longest_row():
    rows = [
        {"input_ids": [5, 6, 1], "label": 2},
        {"input_ids": [7, 1], "label": 0},
        {"input_ids": [8, 9, 10, 11, 1], "label": 1},
    ]
    b = collate(rows, pad_id=0)
    assert isinstance(b, Batch) and len(b) == 3
    assert b.input_ids.shape == (3, 5) and b.attention_mask.shape == (3, 5)
    assert b.input_ids.dtype == b.attention_mask.dtype == b.labels.dtype == torch.long
    assert b.input_ids.tolist() == [[5, 6, 1, 0, 0], [7, 1, 0, 0, 0], [8, 9, 10, 11, 1]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert b.labels.tolist() == [2, 0, 1]


def test_pad_id_is_used_and_width_is_per_batch():
    b = collate([{"input_ids": [4, 1], "label": 0}, {"input_ids": [1], "label": 1}], pad_id=-7)
    assert b.input_ids.tolist() == [[4, 1], [1, -7]]
    # A pad id that equals a real token must not leak into the mask.
    b = collate([{"input_ids": [0, 3], "label": 0}, {"input_ids": [3], "label": 1}], pad_id=0)
    assert b.attention_mask.tolist() == [[1, 1], [1, 0]]


def test_to_moves_all_tensors():
    b = collate([{"input_ids": [4, 1], "label": 0}], pad_id=0).to("cpu")
    assert isinstance(b, Batch) and b.input_ids.device.type == "cpu" and b.labels.tolist() == [0]


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def test_token_table_batches_equal_collate_of_the_same_rows():
    """The training loop's batches (TokenTable) against `collate` of the rows a datasets.Dataset returns, for a
    reordered selection too (an arrow table behind an indices mapping)."""
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 500, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (40,), generator=g)]
    full = datasets.Dataset.from_dict({"text": ["x"] * 40, "label": [i % 3 for i in range(40)], "input_ids": ids})
    for split in (full, full.select(torch.randperm(40, generator=g)[:25].tolist())):
        table = TokenTable.of(split)
        assert len(table) == len(split)
        for idx in ([0], [3, 1, 4, 1, 5], list(range(len(split)))[::-1], [7, 2, 9, 11]):
            part = split[idx]
            want = collate([{"input_ids": i, "label": y} for i, y in zip(part["input_ids"], part["label"])], pad_id=-3)
            got = table.batch(idx, pad_id=-3)
            for a, b in ((got.input_ids, want.input_ids), (got.attention_mask, want.attention_mask),
                         (got.labels, want.labels)):
                assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError):
        table.batch([], pad_id=0)


def test_shard_batches_cover_every_row_once_with_equal_batch_counts():
    from softprompt.collate import shard_batches

    for n, bs, world in [(999, 64, 2), (7, 2, 3), (2, 4, 3), (10, 3, 1)]:
        shards = [shard_batches(n, bs, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # same number of forwards on every rank
        rows = [i for s in shards for batch in s for i in batch]
        assert rows == list(range(n))  # contiguous, each row exactly once
        assert all(len(b) <= bs for s in shards for b in s)
    assert shard_batches(2, 4, 2, 3) == [[]]  # the last rank only scores a filler row

import pytest
import torch

from softprompt.collate import Batch, collate


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


def test_shard_batches_cover_every_row_once_with_equal_batch_counts():
    from softprompt.collate import shard_batches

    for n, bs, world in [(999, 64, 2), (7, 2, 3), (2, 4, 3), (10, 3, 1)]:
        shards = [shard_batches(n, bs, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # same number of forwards on every rank
        rows = [i for s in shards for batch in s for i in batch]
        assert rows == list(range(n))  # contiguous, each row exactly once
        assert all(len(b) <= bs for s in shards for b in s)
    assert shard_batches(2, 4, 2, 3) == [[]]  # the last rank only scores a filler row

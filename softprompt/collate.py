"""Rows of token ids -> padded tensors, padded only to the longest row of each batch.

Dynamic padding keeps short batches short: inews titles are ~15 tokens while max_length is 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) long, 1 = token, 0 = padding
    labels: torch.Tensor  # (B,) long class indices

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))

    def __len__(self) -> int:
        return self.labels.shape[0]


def collate(rows: list[dict], pad_id: int) -> Batch:
    """Stack ``rows`` (each with ``input_ids`` and ``label``) into a right-padded :class:`Batch`."""
    if not rows:
        raise ValueError("collate() needs at least one row")
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
    labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
    return Batch(input_ids, attention_mask, labels)


class TokenTable:
    """A tokenized split's `input_ids` and `label` columns as flat tensors, read once from its arrow
    table: `batch(idx)` equals `collate` of those rows, built with a few tensor ops instead of
    converting each row to python lists (the training loop builds a batch every micro-step)."""

    def __init__(self, offsets: torch.Tensor, values: torch.Tensor, labels: torch.Tensor):
        self.offsets = offsets  # (N+1,) long: row i is values[offsets[i]:offsets[i+1]]
        self.values = values  # (total tokens,) long
        self.labels = labels  # (N,) long

    @staticmethod
    def of(split) -> "TokenTable":
        """From a datasets.Dataset with `input_ids` and `label` columns (any selection or order)."""
        table = split.with_format("arrow")[:]  # honours an indices mapping; no copy without one
        ids = table.column("input_ids").combine_chunks()
        # `values` is the whole child array and `offsets` index into it, also for a sliced array.
        return TokenTable(torch.tensor(ids.offsets.to_numpy(), dtype=torch.long),
                          torch.tensor(ids.values.to_numpy(), dtype=torch.long),
                          torch.tensor(table.column("label").to_numpy(), dtype=torch.long))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: list[int], pad_id: int) -> Batch:
        if not idx:
            raise ValueError("a batch needs at least one row")
        rows = torch.tensor(idx, dtype=torch.long)
        starts = self.offsets[rows]  # (B,)
        lengths = self.offsets[rows + 1] - starts  # (B,)
        pos = torch.arange(int(lengths.max()))  # (T,)
        mask = pos < lengths[:, None]  # (B, T)
        taken = self.values[torch.where(mask, starts[:, None] + pos, 0)]  # (B, T), padding reads value 0
        return Batch(torch.where(mask, taken, pad_id), mask.long(), self.labels[rows])


def shard_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of row indices over a contiguous shard of range(n), every row on exactly
    one rank. Every rank gets the same number of batches (under ZeRO-3 a forward is a collective);
    a rank whose shard has run out gets empty batches: the caller scores a filler row and drops it,
    instead of DistributedSampler's duplicated examples."""
    per_rank = -(-n // world)
    lo, hi = min(n, rank * per_rank), min(n, (rank + 1) * per_rank)
    return [list(range(lo + b * batch_size, min(hi, lo + (b + 1) * batch_size)))
            for b in range(-(-per_rank // batch_size))]

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


def shard_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of row indices over a contiguous shard of range(n), every row on exactly
    one rank. Every rank gets the same number of batches (under ZeRO-3 a forward is a collective);
    a rank whose shard has run out gets empty batches: the caller scores a filler row and drops it,
    instead of DistributedSampler's duplicated examples."""
    per_rank = -(-n // world)
    lo, hi = min(n, rank * per_rank), min(n, (rank + 1) * per_rank)
    return [list(range(lo + b * batch_size, min(hi, lo + (b + 1) * batch_size)))
            for b in range(-(-per_rank // batch_size))]

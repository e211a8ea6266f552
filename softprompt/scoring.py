"""Rank classification: a class scores by the decoder's likelihood of its label word's whole pieces.

`--label_scoring` for label words of several sentencepiece pieces:
- `first_mean`: the decoder's first step only; a class scores with the mean of its pieces' logits
  (verbalizer.class_head).
- `sum`: rank classification as in T5X prompt tuning. Each class's pieces are teacher-forced
  through the decoder ([start, p1, ..., p_{k-1}]) and it scores log p(p1..pk) = sum_i log p(p_i |
  start, p_<i), over the full vocabulary. The first position's normalizer is the same for every
  class of a row, so it is left out: score = logit(p1) + sum_{i>=2} log p(p_i | ...). A
  single-piece class then scores its first-step logit, as with first-step scoring.
- `mean`: the same log-likelihood divided by the number of pieces (with the first normalizer: it
  no longer cancels across classes of different lengths).

A verbalizer whose words are all one piece scores with the first step whatever the flag (the
three agree there, up to the dropped shared normalizer): `RankHead` exists only when some task
needs a decoder pass over its label pieces.
"""

from __future__ import annotations

from typing import Sequence, get_args

import torch
from torch import nn

from .config import LabelScoring
from .vocab import log_normalizer

SCORINGS: tuple[str, ...] = get_args(LabelScoring)  # ("first_mean", "sum", "mean"): RankHead.mode indexes it


def ranks(pieces: Sequence[Sequence[int]], scoring: str) -> bool:
    """Whether this verbalizer needs the decoder pass: a multi-piece word scored by sum or mean."""
    return scoring != "first_mean" and any(len(p) > 1 for p in pieces)


class RankHead(nn.Module):
    """Label pieces of one or more tasks (a task = a verbalizer and its scoring) and the lm_head rows
    they need, read once: a frozen lm_head is never gathered afterwards. Without `lm_head_weight`
    (--tune full: lm_head trains) no rows are kept and scores come from the live lm_head.

    Buffers (non-persistent, they follow the model's device): `ids` (T, C, K) piece ids, padded;
    `lengths` (T, C) pieces per class (0: the task has fewer than C classes); `mode` (T,) index into
    SCORINGS; `rows` (U, D) fp32 lm_head rows of the U distinct pieces, `slot` (T, C, K) their
    index in `rows`.
    """

    def __init__(self, lm_head_weight: torch.Tensor | None, pieces: Sequence[Sequence[Sequence[int]]],
                 scorings: Sequence[str]):
        super().__init__()
        T, C = len(pieces), max(len(p) for p in pieces)
        K = max(len(w) for task in pieces for w in task)
        ids = torch.zeros(T, C, K, dtype=torch.long)
        lengths = torch.zeros(T, C, dtype=torch.long)
        for t, task in enumerate(pieces):
            for c, word in enumerate(task):
                ids[t, c, :len(word)] = torch.tensor(word)
                lengths[t, c] = len(word)
        # A task whose words are all single pieces scores with the first step, as it trained.
        mode = [SCORINGS.index(s if ranks(p, s) else "first_mean") for p, s in zip(pieces, scorings)]
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("lengths", lengths, persistent=False)
        self.register_buffer("mode", torch.tensor(mode), persistent=False)
        rows = slot = None
        if lm_head_weight is not None:
            distinct, slot = torch.unique(ids, return_inverse=True)  # (U,), (T, C, K)
            rows = lm_head_weight.detach()[distinct].float().clone()  # a copy, safe to keep after a gather
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("slot", slot, persistent=False)

    def decoder_inputs(self, task: torch.Tensor, start_id: int) -> torch.Tensor:
        """(B,) task per row -> (B, C, K) teacher-forced decoder inputs [start, p1, ..., p_{K-1}]
        (right-padded: the decoder is causal, so padding after a word never reaches its positions)."""
        ids = self.ids[task]  # (B, C, K)
        return torch.cat([torch.full_like(ids[..., :1], start_id), ids[..., :-1]], dim=-1)

    def scores(self, hidden: torch.Tensor, task: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
        """Decoder states (B, C, K, D) at the `decoder_inputs` positions -> class scores (B, C), fp32;
        -inf for classes a row's task does not have. Collective under ZeRO-3."""
        h = hidden.float()
        ids, lengths, mode = self.ids[task], self.lengths[task], self.mode[task]  # (B,C,K), (B,C), (B,)
        K = ids.shape[-1]
        valid = torch.arange(K, device=ids.device) < lengths[..., None]  # (B, C, K)
        is_mean = (mode == SCORINGS.index("mean"))[:, None, None]
        # Position i predicts piece i + 1; the first position's normalizer only for `mean`.
        normalize = valid & ((torch.arange(K, device=ids.device) > 0) | is_mean)
        if self.rows is None:  # live lm_head: one projection of every position
            logits = lm_head(hidden).float()  # (B, C, K, V)
            target = logits.gather(-1, ids[..., None])[..., 0]  # (B, C, K)
            first = logits[:, :, 0].gather(-1, ids)  # (B, C, K): the first step's logit of every piece
            lse = torch.logsumexp(logits, -1) * normalize
        else:
            rows = self.rows[self.slot[task]]  # (B, C, K, D)
            target = (h * rows).sum(-1)
            first = torch.einsum("bcd,bckd->bck", h[:, :, 0], rows)
            lse = torch.zeros_like(target).masked_scatter(normalize, log_normalizer(h[normalize], lm_head.weight))
        total = ((target - lse) * valid).sum(-1)  # (B, C)
        n = lengths.clamp(min=1)
        by_mode = torch.stack([(first * valid).sum(-1) / n, total, total / n])  # indexed like SCORINGS
        out = by_mode.gather(0, mode[None, :, None].expand(1, *total.shape))[0]
        return out.masked_fill(lengths == 0, float("-inf"))


def rank_head(lm_head_weight: torch.Tensor | None, pieces: Sequence[Sequence[Sequence[int]]],
              scorings: Sequence[str]) -> RankHead | None:
    """A RankHead for these tasks, or None when first-step scoring serves them all (then no decoder
    pass beyond the first step runs and no lm_head row beyond the verbalizer's is read). Call it with
    lm_head's full weight (inside `prompt.gathered` under ZeRO-3), or None for a live lm_head."""
    if not any(ranks(p, s) for p, s in zip(pieces, scorings)):
        return None
    return RankHead(lm_head_weight, pieces, scorings)

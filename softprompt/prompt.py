"""The trainable soft prompt, its init schemes, and the one ZeRO-3 gather helper.

The prompt is an (n_tokens, d_model) matrix prepended to the encoder's input embeddings (Lester et
al. 2021). Under ZeRO-3 every other parameter of the model is partitioned, so reading embedding rows
for the `vocab` / `labels` inits, or reading the prompt back for export, goes through `gathered`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterable, Sequence

import torch
from torch import nn

VOCAB_INIT_TOP_K = 5000  # Lester et al.: sample init rows from the 5,000 most frequent tokens


def is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Sequence[nn.Parameter], modifier_rank: int | None = None):
    """Full values of ZeRO-3 partitioned `params` inside the block; a no-op without ZeRO-3.

    With `modifier_rank`, writes made on that rank inside the block are broadcast to all ranks.
    """
    params = [p for p in params if is_zero3(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


class SoftPrompt(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())  # (P, D)

    @property
    def n_tokens(self) -> int:
        return self.weight.shape[0] if not is_zero3(self.weight) else self.weight.ds_shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, D)


def most_frequent_ids(sequences: Iterable[Sequence[int]], exclude: set[int], k: int = VOCAB_INIT_TOP_K) -> list[int]:
    """The k most frequent token ids (ties broken by id, so the result is deterministic)."""
    counts = Counter(t for seq in sequences for t in seq if t not in exclude)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def init_rows(
    scheme: str,
    n_tokens: int,
    generator: torch.Generator,
    frequent_ids: Sequence[int] = (),
    label_pieces: Sequence[Sequence[int]] = (),
) -> list[list[int]] | None:
    """Which embedding rows each prompt token starts from (averaged when several), or None for `random`.

    `vocab`: n_tokens ids sampled without replacement from `frequent_ids` (with replacement if fewer).
    `labels`: class i's label pieces for token i, cycling over the classes to fill n_tokens.
    """
    if scheme == "random":
        return None
    if scheme == "vocab":
        if not frequent_ids:
            raise ValueError("vocab init needs the training text's frequent token ids")
        ids = torch.tensor(list(frequent_ids))
        if n_tokens <= len(ids):
            pick = torch.randperm(len(ids), generator=generator)[:n_tokens]
        else:
            pick = torch.randint(len(ids), (n_tokens,), generator=generator)
        return [[int(ids[i])] for i in pick]
    if scheme == "labels":
        if not label_pieces:
            raise ValueError("labels init needs the label words' token ids")
        return [list(label_pieces[i % len(label_pieces)]) for i in range(n_tokens)]
    raise ValueError(f"unknown prompt init {scheme!r}")


def init_prompt(
    scheme: str,
    n_tokens: int,
    embedding: nn.Embedding,
    seed: int,
    frequent_ids: Sequence[int] = (),
    label_pieces: Sequence[Sequence[int]] = (),
) -> torch.Tensor:
    """Initial prompt values, (n_tokens, d_model) fp32, identical on every rank for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    rows = init_rows(scheme, n_tokens, generator, frequent_ids, label_pieces)
    d_model = embedding.embedding_dim
    if rows is None:
        return torch.rand(n_tokens, d_model, generator=generator) - 0.5  # uniform [-0.5, 0.5)
    with gathered([embedding.weight]):
        table = embedding.weight.detach().float()
        return torch.stack([table[r].mean(0) for r in rows]).cpu()


def read_prompt(param: nn.Parameter) -> torch.Tensor:
    """The full prompt as an fp32 CPU copy (the optimizer's fp32 master when there is one).

    Collective under ZeRO-3: every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is not None:
        return master.detach().float().cpu().clone()
    with gathered([param]):
        return param.detach().float().cpu().clone()


def write_prompt(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set the prompt (and its fp32 master) to `value` on every rank. Collective under ZeRO-3."""
    from deepspeed.utils import safe_set_full_fp32_param

    if getattr(param, "_z3_optimizer", None) is not None or hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, value.to(param.device))
    with gathered([param], modifier_rank=0):
        with torch.no_grad():
            param.copy_(value.to(param.device, param.dtype))

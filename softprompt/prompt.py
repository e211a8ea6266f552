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


def layers_for(depth: str, config) -> int:
    """Slices L of an (L, P, D) prompt of `--prompt_depth` `depth` for a T5/mT5 config."""
    return {"input": 1, "encoder": config.num_layers, "all": config.num_layers + config.num_decoder_layers}[depth]


class SoftPrompt(nn.Module):
    """Trainable parameters -> the prompt the frozen model sees, (L, P, D).

    L = 1: Lester et al.'s input prompt, prepended to the input embeddings. L > 1 (`layers_for`):
    deep prompts, as in P-tuning v2 -- slice 0 is the input prompt and slice l replaces the hidden
    states at the prompt positions before block l (encoder blocks, then decoder blocks), so every
    layer attends to trainable keys/values (its frozen K/V projections of trainable vectors).

    `reparam="residual"` (Razdaibiedina et al. 2023): the prompt is W + LN(MLP(W)), a bottleneck MLP
    shared by all rows with a LayerNorm on its output and a skip connection. The LayerNorm bounds the
    branch (row norm at most sqrt(D) x the largest gain, plus the bias's): without it one AdamW lr
    moves every MLP weight at once and the prompt can run away. Its gain starts at
    zero, so the first forward equals the plain prompt; at save time the MLP is folded away (`export`).
    `max_norm` rescales any prompt row whose L2 norm exceeds it (inside the forward, so it also
    holds under ZeRO-3 and in the saved prompt): a guard against runaway prompt norms.
    """

    def __init__(self, init: torch.Tensor, layers: int = 1, reparam: str = "none", reparam_dim: int = 512,
                 max_norm: float | None = None):
        super().__init__()
        if init.dim() == 2:
            init = init.unsqueeze(0).expand(layers, -1, -1)  # every layer starts from the same rows
        self.weight = nn.Parameter(init.detach().clone().float())  # (L, P, D)
        self.kwargs = {"layers": init.shape[0], "reparam": reparam, "reparam_dim": reparam_dim,
                       "max_norm": max_norm}
        self.mlp = None
        if reparam == "residual":
            d = init.shape[-1]
            self.mlp = nn.Sequential(nn.Linear(d, reparam_dim), nn.ReLU(), nn.Linear(reparam_dim, d), nn.LayerNorm(d))
            nn.init.zeros_(self.mlp[3].weight)  # the LayerNorm's gain (its bias starts at zero too)
        elif reparam != "none":
            raise ValueError(f"unknown reparameterization {reparam!r}")
        self.max_norm = max_norm

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, P, D), also under ZeRO-3 where `weight` is a size-0 placeholder."""
        return tuple(self.weight.ds_shape) if is_zero3(self.weight) else tuple(self.weight.shape)

    @property
    def n_tokens(self) -> int:
        return self.shape[1]

    def values(self) -> torch.Tensor:
        x = self.weight  # (L, P, D)
        if self.mlp is not None:
            x = x + self.mlp(x)
        if self.max_norm is not None:
            x = x * (self.max_norm / x.norm(dim=-1, keepdim=True)).clamp(max=1.0)
        return x

    def forward(self, batch_size: int) -> torch.Tensor:
        v = self.values()
        return v.unsqueeze(0).expand(batch_size, *v.shape)  # (B, L, P, D)

    def export(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prompt the model sees, (L, P, D) fp32, from a `read_state` copy: the MLP folded in.
        Computed on a plain CPU copy, so it is local (no ZeRO-3 hooks) and rank 0 may call it alone."""
        plain = SoftPrompt(state["weight"], **self.kwargs)
        plain.load_state_dict(state)
        with torch.no_grad():
            return plain.values().detach()


def most_frequent_ids(sequences: Iterable[Sequence[int]], exclude: set[int], vocab_size: int,
                      k: int = VOCAB_INIT_TOP_K) -> list[int]:
    """The k most frequent token ids of the training text (ties broken by id, so the result is
    deterministic); where the text has none but special tokens (only characters the vocabulary lacks),
    the first k ordinary ids of the vocabulary."""
    counts = Counter(t for seq in sequences for t in seq if t not in exclude)
    if not counts:
        return [t for t in range(vocab_size) if t not in exclude][:k]
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def init_rows(
    scheme: str,
    n_tokens: int,
    generator: torch.Generator,
    frequent_ids: Sequence[int] = (),
    label_pieces: Sequence[Sequence[int]] = (),
) -> list[list[int]] | None:
    """Which embedding rows each prompt token starts from (averaged when several), or None for `random`.

    `vocab`: n_tokens ids sampled without replacement from `frequent_ids` (with replacement when the
    training text has fewer distinct tokens than the prompt has rows).
    `labels`: class i's label pieces for token i, then `vocab` rows past the last class, as in Lester et
    al. (a class's label rows start one token each, not cycled over the whole prompt).
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
        rows = [list(pieces) for pieces in label_pieces[:n_tokens]]
        if n_tokens > len(rows):
            rows += init_rows("vocab", n_tokens - len(rows), generator, frequent_ids)
        return rows
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


def read_param(param: nn.Parameter) -> torch.Tensor:
    """A full fp32 CPU copy of a trainable parameter (the optimizer's fp32 master when there is one).

    Collective under ZeRO-3: every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is not None:
        return master.detach().float().cpu().clone()
    with gathered([param]):
        return param.detach().float().cpu().clone()


def write_param(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set a trainable parameter (and its fp32 master) on every rank. Collective under ZeRO-3."""
    from deepspeed.utils import safe_set_full_fp32_param

    if getattr(param, "_z3_optimizer", None) is not None or hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, value.to(param.device))
    with gathered([param], modifier_rank=0):
        with torch.no_grad():
            param.copy_(value.to(param.device, param.dtype))


def read_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 copies of every trainable parameter of `module`. Collective under ZeRO-3."""
    return {name: read_param(p) for name, p in module.named_parameters() if p.requires_grad}


def write_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `read_state`. Collective under ZeRO-3."""
    params = dict(module.named_parameters())
    for name, value in state.items():
        write_param(params[name], value)

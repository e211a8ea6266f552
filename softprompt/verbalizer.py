"""Verbalizer: classes <-> token ids of the decoder's first step, and class scores from them.

Class scores are the decoder's first hidden state dotted with the lm_head rows of the verbalizer
tokens only, so a 250k-row vocabulary projection is never computed for 3 classes.

Multi-token label words: a word is tokenized without special tokens and a bare word-boundary piece
("▁") is dropped when other pieces remain. With `--label_scoring first_mean` a word of several
pieces scores with the *mean* of its pieces' lm_head rows (equivalently, the mean of their logits);
`sum` and `mean` score it by the decoder's likelihood of all its pieces instead (scoring.py). The
`labels` prompt init uses the mean of their embeddings. Two classes whose piece lists are identical
cannot be told apart: an error.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .config import ConfigError

DEFAULT_FIRST_ID = 3  # the reference verbalizer: classes 0/1/2 -> token ids 3/4/5
WORD_BOUNDARY = "\u2581"  # sentencepiece's "▁"


def parse_ids(spec: str, n_classes: int, vocab_size: int) -> list[list[int]]:
    try:
        ids = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--verbalizer_ids must be comma-separated integers, got {spec!r}") from None
    if len(ids) != n_classes:
        raise ConfigError(f"--verbalizer_ids has {len(ids)} ids for {n_classes} classes")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(f"--verbalizer_ids {bad} outside the vocabulary [0, {vocab_size})")
    return [[i] for i in ids]


def word_pieces(tokenizer, word: str) -> list[int]:
    """Token ids of one label word (rule in the module docstring)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    boundary = tokenizer.convert_tokens_to_ids(WORD_BOUNDARY)
    kept = [i for i in ids if i != boundary]
    return kept or ids


def resolve(
    label_names: Sequence[str],
    tokenizer,
    vocab_size: int,
    ids: str | None = None,
    words: str | None = None,
) -> list[list[int]]:
    """Token ids per class, in label order: one list of pieces per class."""
    n = len(label_names)
    if words:
        word_list = [w.strip() for w in words.split(",")]
        if len(word_list) != n:
            raise ConfigError(
                f"--verbalizer_words has {len(word_list)} words for {n} classes {list(label_names)}"
            )
        pieces = []
        for w in word_list:
            p = word_pieces(tokenizer, w)
            if not p:
                raise ConfigError(f"--verbalizer_words: label word {w!r} tokenizes to nothing")
            pieces.append(p)
    elif ids:
        pieces = parse_ids(ids, n, vocab_size)
    else:
        pieces = [[DEFAULT_FIRST_ID + i] for i in range(n)]
        if pieces[-1][0] >= vocab_size:
            raise ConfigError(f"default verbalizer ids 3..{2 + n} exceed the vocabulary ({vocab_size})")
    seen = {}
    for cls, p in enumerate(pieces):
        if tuple(p) in seen:
            raise ConfigError(
                f"verbalizer: classes {label_names[seen[tuple(p)]]!r} and {label_names[cls]!r} map to "
                f"the same tokens {p}"
            )
        seen[tuple(p)] = cls
    return pieces


def class_head(lm_head_weight: torch.Tensor, pieces: Sequence[Sequence[int]]) -> torch.Tensor:
    """(C, D): per class, the mean of its pieces' lm_head rows (a copy, safe to keep after a gather)."""
    return torch.stack([lm_head_weight[list(p)].float().mean(0) for p in pieces])


def class_scores(hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """(B, D) decoder state x (C, D) head -> (B, C) scores, computed in fp32."""
    # With fewer than 16 output columns MKL's sgemm takes another code path, with another summation
    # order than the full-vocabulary lm_head projection, and the scores would differ from its logits
    # in the last bit. A zero-padded head keeps the same path, so single-piece class scores equal the
    # logits exactly in fp32 (tests/test_model.py), for a negligible B x 16 x D.
    C = head.shape[0]
    padded = F.pad(head.float(), (0, 0, 0, max(0, 16 - C)))  # (max(C, 16), D)
    return F.linear(hidden.float(), padded)[:, :C]


def scores_from_logits(logits: torch.Tensor, pieces: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, V) full logits -> (B, C): per class, the mean of its pieces' logits (= `class_head` scoring)."""
    return torch.stack([logits[:, list(p)].float().mean(-1) for p in pieces], dim=-1)


def loss(scores: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy; with `weight` (C,), example i's term is scaled by weight[label_i]. A plain
    mean, not PyTorch's weight-normalised one, so micro-batches and ranks still average to the
    global batch's loss."""
    return F.cross_entropy(scores, labels, weight=weight, reduction="none").mean()


def predict(scores: torch.Tensor) -> torch.Tensor:
    return scores.argmax(-1)

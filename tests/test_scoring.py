"""Rank classification (softprompt/scoring.py, vocab.py) against brute force on the tiny mT5: the stock
model run once per class on its teacher-forced pieces, scored by a full-vocabulary log_softmax."""

import pytest
import torch

from softprompt import prompt, scoring, verbalizer, vocab
from softprompt.collate import collate
from softprompt.model import PromptedMT5

P = 4
TEXTS = ["央行宣布降准，股市大涨", "今天天气不错", "公司亏损严重，股价暴跌，投资者损失惨重"]
WORDS = "正面新闻,中性,好"  # 3, 2 and 1 pieces with the test tokenizer (asserted below)


@pytest.fixture(scope="module")
def frozen(tiny_frozen):
    return tiny_frozen


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    return collate([{"input_ids": x, "label": 0} for x in tiny_tokenizer(TEXTS)["input_ids"]],
                   tiny_tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def pieces(tiny_tokenizer, frozen):
    p = verbalizer.resolve(["0", "1", "2"], tiny_tokenizer, frozen.config.vocab_size, words=WORDS)
    assert [len(w) for w in p] == [3, 2, 1]
    return p


def model_for(frozen, pieces, label_scoring, init, live=False):
    head = verbalizer.class_head(frozen.lm_head.weight.detach(), pieces)
    rank = scoring.rank_head(None if live else frozen.lm_head.weight, [pieces], [label_scoring])
    if live:
        return PromptedMT5(frozen, prompt.SoftPrompt(init), pieces=pieces, rank=rank).eval()
    return PromptedMT5(frozen, prompt.SoftPrompt(init), head, rank=rank).eval()


def brute_force(mt5, enc_embeds, enc_mask, pieces, label_scoring, dec_prefix=None):
    """(B, C) scores from the stock model's logits, one forward per class."""
    B = enc_embeds.shape[0]
    out = torch.zeros(B, len(pieces))
    for c, word in enumerate(pieces):
        dec_ids = torch.tensor([[mt5.config.decoder_start_token_id] + word[:-1]] * B)
        dec = mt5.shared(dec_ids)
        if dec_prefix is not None:
            dec = torch.cat([dec_prefix.expand(B, -1, -1), dec], 1)
        logits = mt5(inputs_embeds=enc_embeds, attention_mask=enc_mask, decoder_inputs_embeds=dec).logits
        logits = logits[:, -len(word):]  # (B, k, V)
        logp = logits.log_softmax(-1)[:, torch.arange(len(word)), torch.tensor(word)]  # (B, k)
        out[:, c] = {"sum": logits[:, 0, word[0]] + logp[:, 1:].sum(-1), "mean": logp.mean(-1),
                     "first_mean": logits[:, 0, word].mean(-1)}[label_scoring]
    return out


@pytest.mark.parametrize("label_scoring", ["sum", "mean", "first_mean"])
def test_input_prompt_matches_brute_force(frozen, batch, pieces, label_scoring):
    init = prompt.init_prompt("random", P, frozen.shared, seed=0)
    model = model_for(frozen, pieces, label_scoring, init)
    assert (model.rank is None) == (label_scoring == "first_mean")
    B = len(batch)
    with torch.no_grad():
        got = model(batch.input_ids, batch.attention_mask)
        embeds = torch.cat([init.expand(B, -1, -1), frozen.shared(batch.input_ids)], 1)
        mask = torch.cat([torch.ones(B, P, dtype=torch.long), batch.attention_mask], 1)
        expected = brute_force(frozen, embeds, mask, pieces, label_scoring)
    assert got.shape == (B, 3) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)


def test_gradient_matches_brute_force(frozen, batch, pieces):
    """The prompt's gradient through the chunked full-vocabulary normalizer equals autograd's
    through the stock model's log_softmax."""
    init = prompt.init_prompt("random", P, frozen.shared, seed=1)
    model = model_for(frozen, pieces, "mean", init)
    labels = torch.tensor([0, 1, 2])
    verbalizer.loss(model(batch.input_ids, batch.attention_mask), labels).backward()
    B = len(batch)
    ref = init.clone().requires_grad_(True)
    embeds = torch.cat([ref.expand(B, -1, -1), frozen.shared(batch.input_ids)], 1)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), batch.attention_mask], 1)
    verbalizer.loss(brute_force(frozen, embeds, mask, pieces, "mean"), labels).backward()
    assert ref.grad.abs().sum() > 0
    assert torch.allclose(model.prompt.weight.grad[0], ref.grad, atol=1e-6)


@pytest.mark.parametrize("label_scoring", ["sum", "mean"])
def test_deep_prompts_match_brute_force(frozen, batch, pieces, label_scoring):
    """--prompt_depth all: the decoder reads [prompt; start; pieces]. A deep prompt holding the block
    inputs the stock model has at the prompt positions reproduces the stock model (test_methods);
    causal attention keeps those positions independent of the pieces that follow them."""
    from test_methods import stock_run

    torch.manual_seed(0)
    D = frozen.config.d_model
    enc0, dec0 = torch.randn(1, P, D), torch.randn(1, P, D)
    one = collate([{"input_ids": batch.input_ids[0][batch.attention_mask[0] > 0].tolist(), "label": 0}], 0)
    seen, _ = stock_run(frozen, one, enc0, dec0)
    deep = torch.cat([torch.stack([enc0[0]] + [s[0] for s in seen["encoder"][1:]]),
                      torch.stack([dec0[0]] + [s[0] for s in seen["decoder"][1:]])])  # (L_enc + L_dec, P, D)
    model = model_for(frozen, pieces, label_scoring, deep)
    with torch.no_grad():
        got = model(one.input_ids, one.attention_mask)
        embeds = torch.cat([enc0, frozen.shared(one.input_ids)], 1)
        mask = torch.cat([torch.ones(1, P, dtype=torch.long), one.attention_mask], 1)
        expected = brute_force(frozen, embeds, mask, pieces, label_scoring, dec_prefix=dec0)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("label_scoring", ["sum", "mean"])
def test_single_piece_words_score_exactly_as_the_first_step(frozen, batch, tiny_tokenizer, label_scoring):
    init = prompt.init_prompt("random", P, frozen.shared, seed=2)
    single = [[3], [4], [9]]
    model = model_for(frozen, single, label_scoring, init)
    assert model.rank is None  # no decoder pass beyond the first step, no lm_head beyond the 3 rows
    with torch.no_grad():
        full = frozen.lm_head(model.hidden(batch.input_ids, batch.attention_mask))  # (B, V)
        assert torch.equal(model(batch.input_ids, batch.attention_mask), full[:, [3, 4, 9]])
        # Beside a multi-piece word, a single-piece class keeps its first-step logit under `sum`
        # (the decoder pass runs over more rows, so only to rounding).
        mixed = model_for(frozen, [[3], [4, 9], [5]], "sum", init)(batch.input_ids, batch.attention_mask)
    assert torch.allclose(mixed[:, [0, 2]], full[:, [3, 5]], atol=1e-6)


@pytest.mark.parametrize("label_scoring", ["sum", "mean"])
def test_live_lm_head_equals_frozen_rows_and_trains(frozen, batch, pieces, label_scoring):
    """--tune full: scores from the live lm_head equal the frozen path's, and lm_head gets gradients."""
    init = prompt.init_prompt("random", P, frozen.shared, seed=3)
    live = model_for(frozen, pieces, label_scoring, init, live=True)
    fixed = model_for(frozen, pieces, label_scoring, init)
    distinct = sorted({0} | {i for w in pieces for i in w})  # the pieces and the padding id
    assert live.rank.rows is None and torch.equal(fixed.rank.rows, frozen.lm_head.weight[distinct])
    with torch.no_grad():
        assert torch.allclose(live(batch.input_ids, batch.attention_mask),
                              fixed(batch.input_ids, batch.attention_mask), atol=1e-5)
    frozen.requires_grad_(True)
    try:
        verbalizer.loss(live.train()(batch.input_ids, batch.attention_mask), torch.tensor([0, 1, 2])).backward()
        grad = frozen.lm_head.weight.grad
        assert grad[sorted({i for w in pieces for i in w})].abs().sum() > 0
        assert (grad.abs().sum(-1) > 0).sum() > 100  # the normalizers reach every row
    finally:
        frozen.requires_grad_(False)
        frozen.zero_grad(set_to_none=True)


def test_rows_per_task_and_absent_classes(frozen, batch, pieces):
    """Two tasks in one batch (predict): each row scores its own task's classes; a task with fewer
    classes gets -inf in the missing columns; first-step scoring for a single-piece task."""
    init = prompt.init_prompt("random", P, frozen.shared, seed=4)
    rank = scoring.rank_head(frozen.lm_head.weight, [pieces, [[3], [4]]], ["sum", "mean"])
    model = PromptedMT5(frozen, prompt.SoftPrompt(init), torch.zeros(3, frozen.config.d_model), rank=rank).eval()
    task = torch.tensor([1, 0, 1])
    with torch.no_grad():
        got = model.rank_scores(batch.input_ids, batch.attention_mask, task=task)
        alone = model_for(frozen, pieces, "sum", init)(batch.input_ids, batch.attention_mask)
        first = frozen.lm_head(model.hidden(batch.input_ids, batch.attention_mask))[:, [3, 4]]
    assert torch.allclose(got[1], alone[1], atol=1e-5)
    assert torch.allclose(got[[0, 2], :2], first[[0, 2]], atol=1e-5)
    assert torch.isinf(got[[0, 2], 2]).all()


# (rows, dim, world): aligned, cut rows, a slice shorter than a row, ranks past the end, one rank.
LAYOUTS = [(8, 4, 2), (7, 5, 2), (7, 5, 3), (3, 10, 4), (5, 4, 8), (211, 32, 2), (6, 3, 1)]


@pytest.mark.parametrize("rows,dim,world", LAYOUTS)
def test_partitioned_normalizer_equals_full_logsumexp(rows, dim, world, monkeypatch):
    """Each simulated rank reads only its DeepSpeed slice (the padding past rows x dim is NaN, so
    reading it would show); their combined stats give the full logsumexp and its gradient."""
    monkeypatch.setattr(vocab, "CHUNK_ROWS", 3)  # several chunks per slice
    torch.manual_seed(rows * world)
    w, h = torch.randn(rows, dim), torch.randn(6, dim, requires_grad=True)
    size = -(-rows * dim // world)
    flat = torch.cat([w.reshape(-1), torch.full((size * world - rows * dim,), float("nan"))])
    segs = [vocab.segment(rows, dim, world, r) for r in range(world)]
    assert sum(s.end - s.start for s in segs) == rows * dim
    assert sum(len(s.whole_rows) for s in segs) + len(segs[0].split) == rows
    stats = sum(vocab.segment_stats(h, flat[r * size:(r + 1) * size], s, r, world) for r, s in enumerate(segs))
    got = torch.logsumexp(stats, 1)  # what each rank computes after the all-reduce
    ref = torch.logsumexp(h @ w.T, -1)
    assert torch.allclose(got, ref, atol=1e-5)
    weights = torch.randn(6)
    (g,) = torch.autograd.grad((got * weights).sum(), h)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), h)
    assert torch.allclose(g, g_ref, atol=1e-5)


def test_prompt_json_names_the_scoring(tiny_model_dir, tiny_tokenizer, tmp_path):
    """predict scores a prompt as it trained; a prompt.json from before --label_scoring was first-step;
    a prompt without prompt.json takes --label_scoring with --labels."""
    from softprompt import checkpoint, loading, predict
    from softprompt.config import ConfigError
    from softprompt.tokenize import tokenizer_hash

    config = loading.load_model_config(str(tiny_model_dir))
    tok_hash = tokenizer_hash(tiny_tokenizer)
    meta = {"label_names": ["0", "1"], "verbalizer_ids": [[3], [4, 5]], "tokenizer_hash": tok_hash}
    for name, extra in (("old", {}), ("new", {"label_scoring": "sum"}), ("bad", {"label_scoring": "max"}),
                        ("bare", {})):
        checkpoint.save_prompt(tmp_path / name, torch.zeros(2, config.d_model), {**meta, **extra})
    (tmp_path / "bare" / "prompt.json").unlink()

    def tasks(*names, flags=()):
        args = predict.build_parser().parse_args(
            ["--input", "x", "--output", "y", *flags,
             *[a for n in names for a in ("--prompt", f"{n}={tmp_path / n / 'prompt.safetensors'}")]])
        return predict.load_tasks(args, config, tiny_tokenizer, tok_hash)

    assert [t.scoring for t in tasks("old", "new")] == ["first_mean", "sum"]
    bare = tasks("bare", flags=["--labels", "a,b", "--verbalizer_words", "正面新闻,好", "--label_scoring", "mean"])
    assert bare[0].scoring == "mean" and [len(p) for p in bare[0].pieces] == [3, 1]
    with pytest.raises(ConfigError, match="label_scoring 'max' in prompt.json"):
        tasks("bad")
    with pytest.raises(ConfigError, match="--label_scoring goes with --labels"):
        tasks("new", flags=["--label_scoring", "sum"])

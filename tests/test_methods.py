"""Prompt methods beyond Lester's input prompt: deep prompts, full fine-tuning scoring, Adafactor.

Deep prompts are checked against HF's own model: a deep prompt whose slice l holds exactly the
hidden states the stock model has at the prompt positions before block l must reproduce the stock
model's output (the stock model fed [prompt; input] embeddings and [prompt; start] decoder
embeddings), so a replacement at the wrong layer or position shows up as a mismatch.
"""

import pytest
import torch

from softprompt import engine, prompt, verbalizer
from softprompt.collate import collate
from softprompt.config import ConfigError
from softprompt.model import PromptedMT5

P = 4


@pytest.fixture(scope="module")
def frozen(tiny_frozen):
    return tiny_frozen


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    ids = tiny_tokenizer(["央行宣布降准，股市大涨", "公司亏损严重，股价暴跌"])["input_ids"]
    return collate([{"input_ids": x, "label": 0} for x in ids], tiny_tokenizer.pad_token_id)


def stock_run(mt5, batch, enc0, dec0):
    """HF's model on [enc0; input] and decoder [dec0; start]; the inputs every block saw at the prompt
    positions, per stack, and the decoder's last hidden state at the start token."""
    seen = {"encoder": [], "decoder": []}
    hooks = [block.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0][:, :P].clone()))
             for name in seen for block in getattr(mt5, name).block]
    B = len(batch)
    embeds = torch.cat([enc0.expand(B, -1, -1), mt5.shared(batch.input_ids)], 1)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), batch.attention_mask], 1)
    start = torch.full((B, 1), mt5.config.decoder_start_token_id)
    dec_embeds = torch.cat([dec0.expand(B, -1, -1), mt5.shared(start)], 1)
    try:
        with torch.no_grad():
            out = mt5(inputs_embeds=embeds, attention_mask=mask, decoder_inputs_embeds=dec_embeds,
                      output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return seen, out.decoder_hidden_states[-1][:, -1]


def test_deep_prompts_replace_block_inputs_at_the_prompt_positions(frozen, batch):
    torch.manual_seed(0)
    D = frozen.config.d_model
    enc0, dec0 = torch.randn(1, P, D), torch.randn(1, P, D)
    seen, expected = stock_run(frozen, batch, enc0, dec0)
    # Slice l of each stack = what the stock model's block l received there (the batch rows agree:
    # the prompt positions' inputs differ per row after block 0, so use row 0's and check row 0).
    enc = torch.stack([enc0[0]] + [s[0] for s in seen["encoder"][1:]])
    dec = torch.stack([dec0[0]] + [s[0] for s in seen["decoder"][1:]])
    deep = torch.cat([enc, dec])  # (L_enc + L_dec, P, D)
    head = verbalizer.class_head(frozen.lm_head.weight.detach(), [[3], [4], [5]])
    model = PromptedMT5(frozen, prompt.SoftPrompt(deep), head).eval()
    with torch.no_grad():
        hidden = model.hidden(batch.input_ids[:1], batch.attention_mask[:1])
        assert torch.allclose(hidden, expected[:1], atol=1e-5)
        # Any one layer's slice matters: change the last decoder layer's and the output moves.
        model.prompt.weight[-1] += 1.0
        assert not torch.allclose(model.hidden(batch.input_ids[:1], batch.attention_mask[:1]), expected[:1],
                                  atol=1e-3)


def test_encoder_only_deep_prompts_leave_the_decoder_stock(frozen, batch):
    torch.manual_seed(1)
    L = len(frozen.encoder.block)
    model = PromptedMT5(frozen, prompt.SoftPrompt(torch.randn(P, frozen.config.d_model), layers=L),
                        verbalizer.class_head(frozen.lm_head.weight.detach(), [[3], [4]])).train()
    scores = model(batch.input_ids, batch.attention_mask)
    verbalizer.loss(scores, torch.tensor([0, 1])).backward()
    grad = model.prompt.weight.grad  # (L, P, D): every layer's slice gets a gradient
    assert grad.shape == (L, P, frozen.config.d_model) and all(grad[i].abs().sum() > 0 for i in range(L))
    with pytest.raises(ValueError, match="fits neither"):
        model.split_prompts(torch.zeros(1, L + 1, P, frozen.config.d_model))


def test_full_tuning_scores_come_from_the_live_lm_head(frozen, batch):
    pieces = [[3], [4, 9], [5]]
    live = PromptedMT5(frozen, None, pieces=pieces).eval()
    fixed = PromptedMT5(frozen, None, verbalizer.class_head(frozen.lm_head.weight.detach(), pieces)).eval()
    with torch.no_grad():
        a = live(batch.input_ids, batch.attention_mask)
        b = fixed(batch.input_ids, batch.attention_mask)
    assert torch.allclose(a, b, atol=1e-5)  # mean of pieces' logits == logits of the mean row
    live.train()
    frozen.requires_grad_(True)
    try:
        verbalizer.loss(live(batch.input_ids, batch.attention_mask), torch.tensor([0, 2])).backward()
        assert frozen.lm_head.weight.grad[[3, 4, 9, 5]].abs().sum() > 0  # the head trains too
    finally:
        frozen.requires_grad_(False)
        frozen.zero_grad(set_to_none=True)


def test_adafactor_is_built_from_the_ds_config_section():
    from transformers.optimization import Adafactor

    p = torch.nn.Parameter(torch.zeros(3, 4))
    ds = {"train_batch_size": 8, "optimizer": {"type": "Adafactor", "params": {"lr": 0.3}}}
    config, opt = engine.client_optimizer(ds, [p])
    assert "optimizer" not in config and isinstance(opt, Adafactor)
    group = opt.param_groups[0]
    assert group["lr"] == 0.3 and not group["relative_step"] and not group["scale_parameter"]
    p.grad = torch.ones(3, 4)
    opt.step()
    assert torch.allclose(p, torch.full((3, 4), -0.3))  # constant lr 0.3; the update's RMS is clipped to 1
    assert engine.client_optimizer({"optimizer": {"type": "AdamW"}}, [p]) == ({"optimizer": {"type": "AdamW"}}, None)
    with pytest.raises(ConfigError, match="Adafactor"):
        engine.client_optimizer({"optimizer": {"type": "Adafactor", "params": {"betas": 1}}}, [p])

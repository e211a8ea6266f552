"""PromptedMT5 against an oracle: HF PEFT's prompt tuning on the same frozen model and prompt."""

import pytest
import torch

from softprompt import loading, prompt, verbalizer
from softprompt.collate import collate
from softprompt.model import PromptedMT5

P = 5


@pytest.fixture(scope="module")
def frozen(tiny_frozen):
    return tiny_frozen


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    texts = ["央行宣布降准，股市大涨", "今天天气不错", "公司亏损严重，股价暴跌，投资者损失惨重"]
    ids = tiny_tokenizer(texts)["input_ids"]
    return collate([{"input_ids": x, "label": 0} for x in ids], tiny_tokenizer.pad_token_id)


def prompted(frozen, pieces):
    with torch.no_grad():
        head = verbalizer.class_head(frozen.lm_head.weight, pieces)
    init = prompt.init_prompt("random", P, frozen.shared, seed=0)
    return PromptedMT5(frozen, prompt.SoftPrompt(init), head).eval()


def test_matches_peft_prompt_tuning(frozen, batch):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    pieces = [[3], [4], [5]]
    ours = prompted(frozen, pieces)
    peft_model = get_peft_model(
        # one transformer submodule: the prompt goes in front of the encoder input only, as ours
        frozen, PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P,
                                   num_transformer_submodules=1)
    ).eval()  # prompt tuning wraps the base model without changing it
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(ours.prompt.weight.data[0])
    start = torch.zeros(len(batch), 1, dtype=torch.long)  # decoder_start_token_id
    with torch.no_grad():
        ref = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         decoder_input_ids=start)
        states, mask = ours.encode(batch.input_ids, batch.attention_mask)
        scores = ours(batch.input_ids, batch.attention_mask)
    assert states.shape == (len(batch), P + batch.input_ids.shape[1], frozen.config.d_model)
    assert torch.allclose(states, ref.encoder_last_hidden_state, atol=1e-6)
    assert torch.allclose(scores, ref.logits[:, 0, [3, 4, 5]], atol=1e-5)


@pytest.mark.parametrize("rows", [3, 12])  # fewer and more rows than the sgemm's 8-row blocks
def test_verbalizer_rows_equal_full_logits_exactly(frozen, tiny_tokenizer, rows):
    texts = ["央行宣布降准，股市大涨", "今天天气不错", "公司亏损严重，股价暴跌，投资者损失惨重", "新品发布会"]
    batch = collate([{"input_ids": x, "label": 0} for x in tiny_tokenizer((texts * 3)[:rows])["input_ids"]],
                    tiny_tokenizer.pad_token_id)
    ours = prompted(frozen, [[3], [4], [9]])
    with torch.no_grad():
        hidden = ours.hidden(batch.input_ids, batch.attention_mask)  # (B, D)
        full = frozen.lm_head(hidden)  # (B, V): what we avoid computing
        scores = ours(batch.input_ids, batch.attention_mask)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, full[:, [3, 4, 9]])


# bf16 class scores against fp32 (same weights, prompt and batch): the max |difference| measured
# 0.8-1.1% of the fp32 scores' spread (max - min over the batch) for 5 prompt seeds, argmax equal on
# every row; asserted at 3%, and the argmax on 7 of 8 rows.
BF16_TOLERANCE = 0.03


def test_bf16_scores_agree_with_fp32(frozen, tiny_model_dir, tiny_tokenizer):
    texts = ["央行宣布降准，股市大涨", "今天天气不错", "公司亏损严重，股价暴跌，投资者损失惨重", "新品发布会",
             "球队昨晚逆转取胜", "暴雨导致多地停课", "新款手机销量创新高", "专家解读最新政策"]
    batch = collate([{"input_ids": x, "label": 0} for x in tiny_tokenizer(texts)["input_ids"]],
                    tiny_tokenizer.pad_token_id)
    bf16 = loading.load_frozen_model(str(tiny_model_dir), frozen.config, dtype=torch.bfloat16, dropout=0.0).eval()
    pieces = [[3], [4], [5], [9]]
    ours = prompted(frozen, pieces)
    with torch.no_grad():
        low = PromptedMT5(bf16, prompt.SoftPrompt(ours.prompt.weight.data.clone()),
                          verbalizer.class_head(bf16.lm_head.weight, pieces)).eval()
        ref = ours(batch.input_ids, batch.attention_mask)
        got = low(batch.input_ids, batch.attention_mask)
    assert got.dtype == torch.float32  # scores and loss stay fp32 over bf16 weights
    spread = (ref.max() - ref.min()).item()
    assert (got - ref).abs().max().item() <= BF16_TOLERANCE * spread
    agree = (verbalizer.predict(got) == verbalizer.predict(ref)).float().mean().item()
    assert agree >= 7 / 8


def test_padding_does_not_change_scores(frozen, tiny_tokenizer):
    ours = prompted(frozen, [[3], [4], [5]])
    ids = tiny_tokenizer(["今天天气不错"])["input_ids"][0]
    short = collate([{"input_ids": ids, "label": 0}], 0)
    padded = collate([{"input_ids": ids, "label": 0}, {"input_ids": ids + [7] * 9, "label": 0}], 0)
    with torch.no_grad():
        a = ours(short.input_ids, short.attention_mask)
        b = ours(padded.input_ids, padded.attention_mask)[:1]
    assert torch.allclose(a, b, atol=1e-5)


def test_gradient_reaches_only_the_prompt(frozen, batch):
    ours = prompted(frozen, [[3], [4], [5]]).train()
    loss = verbalizer.loss(ours(batch.input_ids, batch.attention_mask), torch.tensor([0, 1, 2]))
    loss.backward()
    assert ours.prompt.weight.grad is not None and ours.prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in ours.named_parameters() if n != "prompt.weight")

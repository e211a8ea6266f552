"""PromptedMT5 against an oracle: HF PEFT's prompt tuning on the same frozen model and prompt."""

import pytest
import torch

from softprompt import engine, prompt, verbalizer
from softprompt.collate import collate
from softprompt.model import PromptedMT5

P = 5


@pytest.fixture(scope="module")
def frozen(tiny_model_dir):
    config = engine.load_model_config(str(tiny_model_dir))
    return engine.load_frozen_model(str(tiny_model_dir), config, dropout=0.0, dtype=torch.float32).eval()


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
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(ours.prompt.weight.data)
    start = torch.zeros(len(batch), 1, dtype=torch.long)  # decoder_start_token_id
    with torch.no_grad():
        ref = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         decoder_input_ids=start)
        states, mask = ours.encode(batch.input_ids, batch.attention_mask)
        scores = ours(batch.input_ids, batch.attention_mask)
    assert states.shape == (len(batch), P + batch.input_ids.shape[1], frozen.config.d_model)
    assert torch.allclose(states, ref.encoder_last_hidden_state, atol=1e-6)
    assert torch.allclose(scores, ref.logits[:, 0, [3, 4, 5]], atol=1e-5)


def test_verbalizer_rows_equal_full_logits(frozen, batch):
    ours = prompted(frozen, [[3], [4], [9]])
    with torch.no_grad():
        states, mask = ours.encode(batch.input_ids, batch.attention_mask)
        start = torch.zeros(len(batch), 1, dtype=torch.long)
        hidden = frozen.decoder(input_ids=start, encoder_hidden_states=states,
                                encoder_attention_mask=mask).last_hidden_state
        full = frozen.lm_head(hidden)[:, 0]  # (B, V): what we avoid computing
        scores = ours(batch.input_ids, batch.attention_mask)
    assert torch.allclose(scores, full[:, [3, 4, 9]], rtol=0, atol=1e-6)


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

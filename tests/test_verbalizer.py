import pytest
import torch

from softprompt import verbalizer
from softprompt.config import ConfigError


def test_default_ids_are_the_seeds(tiny_tokenizer):
    assert verbalizer.resolve(["0", "1", "2"], tiny_tokenizer, 2000) == [[3], [4], [5]]


def test_explicit_ids(tiny_tokenizer):
    assert verbalizer.resolve(["a", "b"], tiny_tokenizer, 2000, ids="10, 7") == [[10], [7]]
    with pytest.raises(ConfigError, match="2 ids for 3 classes"):
        verbalizer.resolve(["a", "b", "c"], tiny_tokenizer, 2000, ids="10,7")
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        verbalizer.resolve(["a", "b"], tiny_tokenizer, 2000, ids="1,2000")
    with pytest.raises(ConfigError, match="same tokens"):
        verbalizer.resolve(["a", "b"], tiny_tokenizer, 2000, ids="9,9")


def test_words_follow_the_multi_token_rule(tiny_tokenizer):
    pieces = verbalizer.resolve(["0", "1", "2"], tiny_tokenizer, 2000, words="正面,中性,负面")
    boundary = tiny_tokenizer.convert_tokens_to_ids("\u2581")
    for word, p in zip(["正面", "中性", "负面"], pieces):
        raw = tiny_tokenizer(word, add_special_tokens=False)["input_ids"]
        assert p == [i for i in raw if i != boundary]  # no special tokens, no bare "▁"
        assert tiny_tokenizer.decode(p).replace(" ", "") == word
    assert any(len(p) > 1 for p in pieces), "the rule is only exercised by a multi-piece word"


def test_word_that_tokenizes_to_nothing(tiny_tokenizer):
    with pytest.raises(ConfigError, match="tokenizes to nothing"):
        verbalizer.resolve(["a", "b"], tiny_tokenizer, 2000, words="好,\u200b")
    with pytest.raises(ConfigError, match="1 words for 2 classes"):
        verbalizer.resolve(["a", "b"], tiny_tokenizer, 2000, words="好")


def test_multi_piece_score_is_mean_of_piece_logits():
    torch.manual_seed(0)
    W = torch.randn(50, 8)
    h = torch.randn(4, 8)
    pieces = [[3], [7, 11, 20]]
    scores = verbalizer.class_scores(h, verbalizer.class_head(W, pieces))
    logits = h @ W.T
    assert torch.allclose(scores[:, 0], logits[:, 3])
    assert torch.allclose(scores[:, 1], logits[:, [7, 11, 20]].mean(-1), atol=1e-6)


def test_loss_and_predict():
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 2])
    assert verbalizer.predict(scores).tolist() == [0, 2]
    expected = -torch.log_softmax(scores, -1)[[0, 1], [0, 2]].mean()
    assert torch.allclose(verbalizer.loss(scores, labels), expected)


def test_weighted_loss_by_hand_and_split_into_micro_batches():
    torch.manual_seed(0)
    scores, labels = torch.randn(8, 3), torch.tensor([0, 1, 1, 2, 1, 0, 2, 1])
    weight = torch.tensor([3.0, 0.5, 1.0])
    nll = -torch.log_softmax(scores, -1)[torch.arange(8), labels]
    expected = sum(weight[y] * n for y, n in zip(labels.tolist(), nll)) / 8  # divided by 8, not by sum(w)
    whole = verbalizer.loss(scores, labels, weight)
    assert torch.allclose(whole, expected)
    # The trainer averages micro-batch (and rank) losses: halves must average to the whole batch's.
    halves = [verbalizer.loss(scores[i:i + 4], labels[i:i + 4], weight) for i in (0, 4)]
    assert torch.allclose((halves[0] + halves[1]) / 2, whole)
    assert torch.allclose(verbalizer.loss(scores, labels, torch.ones(3)), verbalizer.loss(scores, labels))

import torch
from torch import nn

from softprompt import prompt


def test_most_frequent_ids_deterministic_and_excludes():
    seqs = [[5, 5, 7, 1], [7, 5, 9, 1], [9, 8]]
    assert prompt.most_frequent_ids(seqs, exclude={1}, k=3) == [5, 7, 9]  # 7 and 9 both twice: ties go by id
    assert prompt.most_frequent_ids(seqs, exclude={1, 5}, k=10) == [7, 9, 8]


def test_random_init_uniform_half_and_seeded():
    emb = nn.Embedding(100, 16)
    a = prompt.init_prompt("random", 50, emb, seed=3)
    b = prompt.init_prompt("random", 50, emb, seed=3)
    c = prompt.init_prompt("random", 50, emb, seed=4)
    assert a.shape == (50, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -0.5 and a.max() < 0.5 and a.std() > 0.25  # uniform on [-0.5, 0.5): std 0.289


def test_vocab_init_samples_frequent_rows():
    emb = nn.Embedding(100, 8)
    frequent = list(range(40, 60))
    p = prompt.init_prompt("vocab", 5, emb, seed=0, frequent_ids=frequent)
    rows = [int((emb.weight == r).all(-1).nonzero()) for r in p]
    assert all(r in frequent for r in rows) and len(set(rows)) == 5  # without replacement
    more = prompt.init_rows("vocab", 30, torch.Generator().manual_seed(0), frequent_ids=frequent)
    assert len(more) == 30 and all(r[0] in frequent for r in more)  # with replacement past 20


def test_labels_init_cycles_and_averages_pieces():
    emb = nn.Embedding(100, 8)
    pieces = [[3], [4, 9], [5]]
    p = prompt.init_prompt("labels", 5, emb, seed=0, label_pieces=pieces)
    w = emb.weight.detach()
    expected = [w[3], (w[4] + w[9]) / 2, w[5], w[3], (w[4] + w[9]) / 2]
    assert torch.allclose(p, torch.stack(expected))


def test_soft_prompt_expands_without_copy():
    sp = prompt.SoftPrompt(torch.arange(6.0).reshape(3, 2))
    out = sp(4)
    assert out.shape == (4, 3, 2) and sp.n_tokens == 3
    assert out.data_ptr() == sp.weight.data_ptr()


def test_gathered_is_a_noop_without_zero3():
    p = nn.Parameter(torch.ones(2))
    with prompt.gathered([p]):
        assert p.numel() == 2

import pytest
import torch
from torch import nn

from softprompt import prompt


def test_most_frequent_ids_deterministic_and_excludes():
    seqs = [[5, 5, 7, 1], [7, 5, 9, 1], [9, 8]]
    assert prompt.most_frequent_ids(seqs, exclude={1}, vocab_size=10, k=3) == [5, 7, 9]  # 7 and 9 both twice: ties go by id
    assert prompt.most_frequent_ids(seqs, exclude={1, 5}, vocab_size=10, k=10) == [7, 9, 8]
    # Text of nothing but special tokens (e.g. all <unk>): the first ordinary ids of the vocabulary.
    assert prompt.most_frequent_ids([[2, 1], [2]], exclude={0, 1, 2}, vocab_size=10, k=4) == [3, 4, 5, 6]


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


def test_labels_init_averages_pieces_then_samples_vocab():
    emb = nn.Embedding(100, 8)
    pieces, frequent = [[3], [4, 9], [5]], list(range(40, 60))
    p = prompt.init_prompt("labels", 6, emb, seed=0, frequent_ids=frequent, label_pieces=pieces)
    w = emb.weight.detach()
    assert torch.allclose(p[:3], torch.stack([w[3], (w[4] + w[9]) / 2, w[5]]))
    rest = [int((w == r).all(-1).nonzero()) for r in p[3:]]
    assert all(r in frequent for r in rest) and len(set(rest)) == 3  # Lester et al.'s fallback: sampled vocab
    assert torch.allclose(prompt.init_prompt("labels", 2, emb, seed=0, label_pieces=pieces), p[:2])
    with pytest.raises(ValueError, match="vocab init needs"):
        prompt.init_prompt("labels", 4, emb, seed=0, label_pieces=pieces)


def test_soft_prompt_expands_without_copy():
    sp = prompt.SoftPrompt(torch.arange(6.0).reshape(3, 2))
    out = sp(4)
    assert out.shape == (4, 1, 3, 2) and sp.n_tokens == 3 and sp.shape == (1, 3, 2)
    assert out.data_ptr() == sp.weight.data_ptr()


def test_deep_prompt_starts_every_layer_from_the_init():
    init = torch.randn(3, 4)
    sp = prompt.SoftPrompt(init, layers=5)
    assert sp.shape == (5, 3, 4) and all(torch.equal(sp.weight[i], init) for i in range(5))
    # Layers are independent parameters once trained: the expanded init was copied.
    sp.weight.data[1] += 1
    assert torch.equal(sp.weight[0], init)


def test_residual_reparam_starts_as_the_plain_prompt_and_folds_on_export():
    torch.manual_seed(0)
    init = torch.randn(3, 8)
    sp = prompt.SoftPrompt(init, reparam="residual", reparam_dim=16)
    assert torch.equal(sp.values()[0], init)  # zero LayerNorm gain: W + LN(MLP(W)) = W at first
    loss = sp(2).square().sum()
    loss.backward()
    assert sp.mlp[3].weight.grad.abs().sum() > 0  # the branch trains although it starts at zero
    with torch.no_grad():
        sp.mlp[3].weight.normal_()
        sp.mlp[3].bias.normal_()
    state = prompt.read_state(sp)
    assert set(state) == {"weight", *(f"mlp.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias"))}
    folded = sp.export(state)  # by hand: W + LN(up(relu(down(W))))
    w, d, u, ln = init, sp.mlp[0], sp.mlp[2], sp.mlp[3]
    h = torch.relu(w @ d.weight.T + d.bias) @ u.weight.T + u.bias
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + ln.eps)
    expected = w + h * ln.weight + ln.bias
    assert torch.allclose(folded[0], expected.detach(), atol=1e-5)
    bound = 8**0.5 * ln.weight.norm() + ln.bias.norm()  # normalized rows have norm sqrt(D), D = 8
    assert (folded[0] - init).norm(dim=-1).max() <= bound * 1.001  # the branch stays bounded
    assert not torch.allclose(folded[0], init)


def test_max_norm_rescales_long_rows_only():
    init = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    values = prompt.SoftPrompt(init, max_norm=1.0).values()[0]
    assert torch.allclose(values, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_write_state_round_trips():
    sp = prompt.SoftPrompt(torch.zeros(2, 3), layers=2, reparam="residual", reparam_dim=4)
    other = prompt.SoftPrompt(torch.ones(2, 3), layers=2, reparam="residual", reparam_dim=4)
    prompt.write_state(sp, prompt.read_state(other))
    assert all(torch.equal(a, b) for a, b in zip(sp.parameters(), other.parameters()))


def test_gathered_is_a_noop_without_zero3():
    p = nn.Parameter(torch.ones(2))
    with prompt.gathered([p]):
        assert p.numel() == 2

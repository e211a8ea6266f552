"""softprompt.kernels.fuse against HF's stock modules: same outputs and gradients, this model only."""

import copy

import pytest
import torch

from benchmarks import bench
from softprompt import kernels

TINY = dict(vocab_size=300, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, dropout_rate=0.0,
            decoder_start_token_id=0)


def tiny(family: str):
    from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if family == "mt5":  # gated gelu_new, untied head
        return MT5ForConditionalGeneration(MT5Config(**TINY)).eval()
    return T5ForConditionalGeneration(T5Config(**TINY, feed_forward_proj="relu")).eval()  # T5LayerNorm, tied


def inputs(padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, TINY["vocab_size"], (3, 11), generator=g)
    mask = torch.ones_like(ids)  # no padding: transformers passes no mask at all
    if padded:
        mask[0, 7:] = 0
    return ids, mask, torch.randint(2, TINY["vocab_size"], (3, 4), generator=g)  # 4 decoder steps: causal


def forward_backward(model, padded: bool):
    """Logits, and the gradients of a scalar of them w.r.t. the input embeddings and every weight."""
    ids, mask, dec = inputs(padded)
    model.requires_grad_(True).zero_grad(set_to_none=True)
    embeds = model.shared(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), embeds.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("family", ["mt5", "t5"])
def test_fused_matches_stock_in_fp32(family, padded):
    stock = tiny(family)
    fused = kernels.fuse(copy.deepcopy(stock))
    ref, ref_dx, ref_dw = forward_backward(stock, padded)
    got, dx, dw = forward_backward(fused, padded)
    assert relative_error(got, ref) < 1e-5  # measured <= 1e-6: fp32 rounding, other summation orders
    assert relative_error(dx, ref_dx) < 1e-5
    assert dw.keys() == ref_dw.keys()
    for name in ref_dw:  # full fine-tuning trains these through the same modules
        assert relative_error(dw[name], ref_dw[name]) < 1e-5, name


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape and ref.abs().sum() > 0
    return ((got - ref).norm() / ref.norm()).item()


def test_fuse_swaps_this_models_modules_only():
    """The benchmark's PEFT side is a second model object over the same weight tensors: it keeps
    HF's stock modules and attention when ours is fused."""
    from transformers.activations import GELUTanh, NewGELUActivation
    from transformers.models.mt5.modeling_mt5 import MT5Attention, MT5DenseGatedActDense, MT5LayerNorm

    ours = tiny("mt5")
    peft_side = bench.twin(ours)
    kernels.fuse(ours)

    def summary(model):
        return ({type(m).__name__ for m in model.modules() if isinstance(m, MT5LayerNorm)},
                {type(m.act) for m in model.modules() if isinstance(m, MT5DenseGatedActDense)},
                {m.config._attn_implementation for m in model.modules() if isinstance(m, MT5Attention)})

    assert summary(ours) == ({"FusedMT5LayerNorm"}, {GELUTanh}, {kernels.ATTENTION})
    assert summary(peft_side) == ({"MT5LayerNorm"}, {NewGELUActivation}, {"sdpa"})
    assert ours.config._attn_implementation == "sdpa"  # the top-level config, shared by both, untouched
    assert peft_side.shared.weight.data_ptr() == ours.shared.weight.data_ptr()  # still the same storage

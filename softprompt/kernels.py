"""Faster kernels for a frozen T5/mT5, swapped into one model object in place: `fuse(mt5)`.

The trainer applies it at load time (`loading.load_frozen_model`) and the benchmark to ours only, so
HF PEFT's model there keeps HF's modules. Same functions as HF's, so the same values up to rounding
(tests/test_kernels.py); docs/performance.md has the timings:

- GELU: HF's `gelu_new` is the tanh GELU as 8 elementwise ops, each saving a tensor; torch's fused
  kernel is one pass that saves only its input.
- RMSNorm: T5's layer norm is 6 elementwise ops around an fp32 upcast; `F.rms_norm` is one fused
  kernel. Bit-identical in fp32; in bf16 it rounds once (x * rstd * weight in fp32, then cast) where
  HF rounds before the weight multiply too.
- Attention on CPU: HF's SDPA path folds T5's position bias into a float mask, which sends torch's
  CPU flash-attention kernel down its slow path; matmul, softmax, matmul avoids it. Off CPU (CUDA),
  HF's SDPA runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION = "softprompt_t5"  # our name in transformers' attention registry


class _FusedRMSNorm:
    """Mixed into T5LayerNorm/MT5LayerNorm by class swap: the weight Parameter, its ZeRO-3
    partitioning and hooks stay on the same module object."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != self.weight.dtype:
            return super().forward(hidden_states)  # HF's mixed-dtype casting rules
        # normalized_shape from the input: under ZeRO-3 the weight's own .shape may be a placeholder's
        return F.rms_norm(hidden_states, hidden_states.shape[-1:], self.weight, self.variance_epsilon)


def t5_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None,
                 **kwargs):
    """transformers' attention-function signature; q, k, v are (B, H, L, d_kv)."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward

    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_bias=position_bias, **kwargs)
    # The masks come from transformers' SDPA mask builder: boolean, or None for no padding (causal
    # then implied by the module, as in sdpa_attention_forward).
    is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", False)
    bias = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)  # (B|1, H, Q, K)
    scores = torch.matmul(query, key.transpose(2, 3))
    if scaling is not None and scaling != 1.0:  # T5 does not scale by 1/sqrt(d_kv): its scaling is 1.0
        scores = scores * scaling
    weights = F.dropout((scores + bias).softmax(-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None  # (B, Q, H, d_kv), no weights


_fused_classes: dict[type, type] = {}


def fuse(mt5):
    """Swap in the fused GELU, RMSNorm and CPU attention on `mt5` (a T5/mT5 seq2seq model), in place.

    Touches only this model object: its modules and its encoder/decoder configs (each stack owns a
    deep copy of the top-level config, which is left alone), so another model object over the same
    weight tensors keeps HF's code.
    """
    from transformers import AttentionInterface
    from transformers.activations import ACT2FN, NewGELUActivation
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.models.mt5.modeling_mt5 import MT5LayerNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for m in mt5.modules():
        if isinstance(getattr(m, "act", None), NewGELUActivation):
            m.act = ACT2FN["gelu_pytorch_tanh"]
        cls = type(m)
        if cls in (T5LayerNorm, MT5LayerNorm):
            if cls not in _fused_classes:
                _fused_classes[cls] = type(f"Fused{cls.__name__}", (_FusedRMSNorm, cls), {})
            m.__class__ = _fused_classes[cls]
    AttentionInterface.register(ATTENTION, t5_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    for stack in (mt5.encoder, mt5.decoder):
        stack.config._attn_implementation = ATTENTION  # the stack's attention modules share this config
    return mt5

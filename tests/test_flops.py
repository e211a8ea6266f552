"""The FLOPs formula against a count made by hand, matrix by matrix, for a tiny config."""

import pytest
from transformers import MT5Config, T5Config

from softprompt.flops import mfu, train_flops

# d_model 4, 2 heads x d_kv 2 (inner 4), d_ff 8, 2 encoder layers, 1 decoder layer; S = 3 encoder tokens.
TINY = dict(d_model=4, num_heads=2, d_kv=2, d_ff=8, num_layers=2, num_decoder_layers=1)
S = 3


def test_hand_count_gated():
    config = MT5Config(**TINY)  # gated-gelu: wi_0, wi_1, wo
    assert config.is_gated_act
    # Multiply-adds. Projections: Q, K, V, O are 4x4 (16 each); FFN wi_0, wi_1 are 4x8, wo 8x4 (32 each).
    enc_linear = S * (4 * 16 + 3 * 32)  # per layer: 3 tokens through 4 projections + FFN = 480
    enc_attention = 2 * (S * S * 2) * 2  # QK^T and AV, 2 heads, (3 x 3 x d_kv 2) each = 72
    dec_linear = (4 * 16  # self-attention Q, K, V, O on the start token
                  + 2 * 16  # cross-attention Q, O on the start token
                  + 2 * 16 * S  # cross-attention K, V over the 3 encoder tokens
                  + 3 * 32)  # FFN on the start token  -> 288
    dec_attention = 2 * (1 * 1 * 2) * 2 + 2 * (1 * S * 2) * 2  # self: 1x1 scores; cross: 1x3 = 32
    forward_linear = 2 * (2 * enc_linear + dec_linear)  # FLOPs = 2 per multiply-add
    forward_attention = 2 * (2 * enc_attention + dec_attention)
    per_example = 2 * forward_linear + 3 * forward_attention  # frozen weights: 1x backward; attention: 2x
    assert per_example == 6048
    assert train_flops(config, n_examples=5, enc_len=S) == 5 * 6048


def test_hand_count_ungated():
    config = T5Config(**TINY, feed_forward_proj="relu")  # original T5: wi, wo only
    assert not config.is_gated_act
    # One FFN matrix less (-32 multiply-adds per token): 3 encoder tokens x 2 layers + 1 decoder token.
    assert train_flops(config, 1, S) == 6048 - 2 * 2 * 32 * (2 * S + 1)


def test_mfu():
    # 8e12 FLOPs in 2 s on 4 devices of 10 TFLOP/s peak: 1e12 FLOP/s per device = 10%.
    assert mfu(8e12, 2.0, peak_tflops=10, n_devices=4) == pytest.approx(0.1)

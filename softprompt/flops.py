"""Model FLOPs of a prompt-tuning step and the MFU estimate (`train/mfu`). Pure.

Matmuls only, 2 FLOPs per multiply-add; layer norms, softmax, the relative position bias and the
C-row verbalizer head are left out (well under 1% at mT5 sizes). Per example with S encoder tokens
(prompt + input), d = d_model, a = num_heads * d_kv, f = d_ff:

    FFN(n tokens)  = 2 n d f * (3 if gated else 2)         mT5's gated-GELU has wi_0, wi_1, wo
    encoder layer  = 8 S d a + FFN(S)                       Q, K, V, O projections + FFN   (linear)
                   + 4 S^2 a                                QK^T and attention x V         (attention)
    decoder layer  = 8 d a + FFN(1)                         self-attention on the one start token
                   + 4 d a + 4 S d a                        cross-attention: Q, O on 1 token, K, V over S
                   + 4 a + 4 S a                            self- and cross-attention scores (attention)

Backward: the model is frozen, so only input gradients are computed. A weight matmul x W then costs
one matmul backward (dx) instead of two (dx, dW): 1x its forward. The attention matmuls multiply two
activations and need both gradients: 2x. So a step costs 2 * linear + 3 * attention.
"""

from __future__ import annotations


def train_flops(config, n_examples: float, enc_len: float) -> float:
    """Forward + input-gradient backward FLOPs for `n_examples` of `enc_len` encoder tokens each.

    `config` is a T5/mT5 config (d_model, d_kv, num_heads, d_ff, num_layers, num_decoder_layers,
    is_gated_act). The logger passes the window's mean encoder length: attention's S^2 term is a
    few % of the total at these lengths, so averaging lengths barely changes the sum.
    """
    d, a, S = config.d_model, config.num_heads * config.d_kv, enc_len

    def ffn(n_tokens: float) -> float:
        return 2 * n_tokens * d * config.d_ff * (3 if config.is_gated_act else 2)

    enc_linear = 8 * S * d * a + ffn(S)
    enc_attention = 4 * S * S * a
    dec_linear = 8 * d * a + ffn(1) + 4 * d * a + 4 * S * d * a
    dec_attention = 4 * a + 4 * S * a
    linear = config.num_layers * enc_linear + config.num_decoder_layers * dec_linear
    attention = config.num_layers * enc_attention + config.num_decoder_layers * dec_attention
    return n_examples * (2 * linear + 3 * attention)


def mfu(flops: float, seconds: float, peak_tflops: float, n_devices: int) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the devices' combined peak."""
    return flops / seconds / (peak_tflops * 1e12 * n_devices)

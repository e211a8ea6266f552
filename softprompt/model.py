"""PromptedMT5: a frozen T5/mT5 with a soft prompt in front, scored with one decoder step."""

from __future__ import annotations

import torch
from torch import nn

from . import verbalizer
from .prompt import SoftPrompt


class PromptedMT5(nn.Module):
    """Frozen encoder-decoder + trainable prompt -> class scores (B, C).

    `head` holds the verbalizer's lm_head rows (C, D), read once at build time: the frozen lm_head
    never changes, so under ZeRO-3 the 250k-row head is never gathered during training.
    """

    def __init__(self, mt5: nn.Module, prompt: SoftPrompt, head: torch.Tensor):
        super().__init__()
        self.mt5 = mt5
        self.prompt = prompt
        self.register_buffer("head", head.float(), persistent=False)
        config = mt5.config
        self.decoder_start_token_id = config.decoder_start_token_id
        # Original T5 (tied embeddings) rescales the decoder output before lm_head; mT5/T5 v1.1 do not.
        self.output_scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else 1.0

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompts: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None):
        """Encoder states over [prompt; input] and the extended mask.

        `prompts` (B, P, D) with `prompt_mask` (B, P) replace the trained prompt with one prompt
        per row (inference with many prompts); shorter prompts are left-padded, so every real
        token keeps its relative distances (T5's position bias is relative).
        """
        B = input_ids.shape[0]
        embeds = self.mt5.shared(input_ids)  # (B, T, D)
        if prompts is None:
            prompts = self.prompt(B)  # (B, P, D)
            prompt_mask = attention_mask.new_ones(B, prompts.shape[1])
        x = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)  # (B, P+T, D)
        mask = torch.cat([prompt_mask.to(attention_mask.dtype), attention_mask], dim=1)  # (B, P+T)
        states = self.mt5.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state  # (B, P+T, D)
        return states, mask

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts=None, prompt_mask=None):
        """The decoder's first hidden state (B, D), as lm_head sees it."""
        states, mask = self.encode(input_ids, attention_mask, prompts, prompt_mask)
        start = input_ids.new_full((input_ids.shape[0], 1), self.decoder_start_token_id)  # (B, 1)
        dec = self.mt5.decoder(input_ids=start, encoder_hidden_states=states, encoder_attention_mask=mask)
        return dec.last_hidden_state[:, 0] * self.output_scale  # (B, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return verbalizer.class_scores(self.hidden(input_ids, attention_mask), self.head)  # (B, C)

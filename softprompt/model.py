"""PromptedMT5: a frozen T5/mT5 with a soft prompt in front, scored with one decoder step, or with
one decoder pass over every class's label pieces (rank classification, softprompt/scoring.py)."""

from __future__ import annotations

import torch
from torch import nn

from . import verbalizer
from .prompt import SoftPrompt
from .scoring import RankHead


class PromptedMT5(nn.Module):
    """Frozen encoder-decoder + trainable prompt -> class scores (B, C).

    `head` holds the verbalizer's lm_head rows (C, D), read once at build time: the frozen lm_head
    never changes, so under ZeRO-3 the 250k-row head is never gathered during training. With
    `pieces` instead (full fine-tuning: lm_head trains), scores come from the live lm_head.
    `prompt` may be None (full fine-tuning without a prompt). With `rank` (multi-piece label words
    scored by `--label_scoring sum|mean`), classes score by the decoder's likelihood of their pieces
    instead (`rank_scores`); `head`/`pieces` are then unused by `forward`.
    """

    def __init__(self, mt5: nn.Module, prompt: SoftPrompt | None, head: torch.Tensor | None = None,
                 pieces: list[list[int]] | None = None, rank: RankHead | None = None):
        super().__init__()
        assert (head is None) != (pieces is None), "give the verbalizer head or its token ids"
        self.mt5 = mt5
        self.prompt = prompt
        self.rank = rank
        self.register_buffer("head", None if head is None else head.float(), persistent=False)
        self.pieces = pieces
        config = mt5.config
        self.decoder_start_token_id = config.decoder_start_token_id
        # Original T5 (tied embeddings) rescales the decoder output before lm_head; mT5/T5 v1.1 do not.
        self.output_scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else 1.0
        # Deep prompts: before block l >= 1 of a stack, the prompt positions get that layer's slice.
        self._deep = {}  # stack -> (B, layers, P, D), set only during a forward with deep prompts
        for stack in (mt5.encoder, mt5.decoder):
            for layer, block in enumerate(stack.block):
                if layer > 0:
                    block.register_forward_pre_hook(self._deep_hook(stack, layer))

    def _deep_hook(self, stack: nn.Module, layer: int):
        def hook(block, args):
            deep = self._deep.get(stack)
            if deep is None:
                return None
            hidden, P = args[0], deep.shape[2]  # (B, P+T, D)
            hidden = torch.cat([deep[:, layer].to(hidden.dtype), hidden[:, P:]], dim=1)
            return (hidden, *args[1:])
        return hook

    def split_prompts(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, P, D) -> encoder part (B, L_enc, P, D), decoder part (B, L_dec, P, D) or None.

        L = 1: an input prompt; L = encoder layers: deep encoder prompts; L = encoder + decoder
        layers: deep prompts in both stacks."""
        n_enc, n_dec = len(self.mt5.encoder.block), len(self.mt5.decoder.block)
        L = prompts.shape[1]
        if L not in (1, n_enc, n_enc + n_dec):
            raise ValueError(f"a prompt of {L} layers fits neither the input (1), the encoder ({n_enc}) nor "
                             f"encoder + decoder ({n_enc + n_dec})")
        return prompts[:, :n_enc], (prompts[:, n_enc:] if L == n_enc + n_dec and n_dec else None)

    def trained_or(self, prompts, prompt_mask, attention_mask: torch.Tensor):
        """The per-row `prompts` when given, else the trained prompt for every row (or None, None)."""
        if prompts is None and self.prompt is not None:
            B = attention_mask.shape[0]
            prompts = self.prompt(B)  # (B, L, P, D)
            prompt_mask = attention_mask.new_ones(B, prompts.shape[2])
        return prompts, prompt_mask

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompts: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None):
        """Encoder states over [prompt; input] and the extended mask.

        `prompts` (B, L, P, D) with `prompt_mask` (B, P) replace the trained prompt with one prompt
        per row (inference with many prompts); shorter prompts are left-padded, so every real
        token keeps its relative distances (T5's position bias is relative).
        """
        prompts, prompt_mask = self.trained_or(prompts, prompt_mask, attention_mask)
        embeds = self.mt5.shared(input_ids)  # (B, T, D)
        if prompts is None:
            return self.mt5.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state, \
                attention_mask
        enc, _ = self.split_prompts(prompts)
        x = torch.cat([enc[:, 0].to(embeds.dtype), embeds], dim=1)  # (B, P+T, D)
        mask = torch.cat([prompt_mask.to(attention_mask.dtype), attention_mask], dim=1)  # (B, P+T)
        return self.run_stack(self.mt5.encoder, enc, inputs_embeds=x, attention_mask=mask), mask  # (B, P+T, D)

    def run_stack(self, stack: nn.Module, deep: torch.Tensor, **kwargs) -> torch.Tensor:
        """One stack's last hidden state, with `deep` (B, L, P, D) fed to its blocks' hooks."""
        if deep.shape[1] > 1:
            self._deep[stack] = deep
        try:
            return stack(**kwargs).last_hidden_state
        finally:
            self._deep.pop(stack, None)

    def decode(self, decoder_ids: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, dec, prompt_mask):
        """Decoder states (N, K, D), as lm_head sees them, for decoder inputs (N, K) over encoder
        `states` / `mask`. With decoder prompts `dec` (N, L, P, D), the decoder reads [prompt; inputs]."""
        N, K = decoder_ids.shape
        kwargs = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        if dec is None:
            out = self.mt5.decoder(input_ids=decoder_ids, **kwargs).last_hidden_state  # (N, K, D)
        else:
            embed = self.mt5.decoder.embed_tokens(decoder_ids)  # (N, K, D)
            x = torch.cat([dec[:, 0].to(embed.dtype), embed], dim=1)  # (N, P+K, D)
            dec_mask = torch.cat([prompt_mask, prompt_mask.new_ones(N, K)], dim=1)  # (N, P+K)
            out = self.run_stack(self.mt5.decoder, dec, inputs_embeds=x, attention_mask=dec_mask, **kwargs)
        return out[:, -K:] * self.output_scale  # (N, K, D)

    def encoded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts=None, prompt_mask=None):
        """What the decoder needs: encoder states and mask (`encode`), the decoder prompts (B, L_dec,
        P, D) or None, and the prompt mask."""
        prompts, prompt_mask = self.trained_or(prompts, prompt_mask, attention_mask)
        states, mask = self.encode(input_ids, attention_mask, prompts, prompt_mask)
        dec = self.split_prompts(prompts)[1] if prompts is not None else None
        return states, mask, dec, prompt_mask

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts=None, prompt_mask=None):
        """The decoder's first hidden state (B, D), as lm_head sees it. With decoder prompts, the
        decoder reads [prompt; start token] and the start token's state is the one scored."""
        start = input_ids.new_full((input_ids.shape[0], 1), self.decoder_start_token_id)  # (B, 1)
        return self.decode(start, *self.encoded(input_ids, attention_mask, prompts, prompt_mask))[:, 0]  # (B, D)

    def rank_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts=None, prompt_mask=None,
                    task: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores (B, C) by rank classification: one decoder pass over B x C rows, each class's
        label pieces teacher-forced (`RankHead`). `task` (B,) picks each row's verbalizer (default:
        the first). Collective under ZeRO-3."""
        encoded = self.encoded(input_ids, attention_mask, prompts, prompt_mask)  # states, mask, dec, prompt_mask
        B = input_ids.shape[0]
        task = task if task is not None else input_ids.new_zeros(B)
        decoder_ids = self.rank.decoder_inputs(task, self.decoder_start_token_id)  # (B, C, K)
        C, K = decoder_ids.shape[1:]

        def per_class(x):  # (B, ...) -> (B * C, ...); a copy: the decoder's projections need a row per class
            return None if x is None else x[:, None].expand(B, C, *x.shape[1:]).reshape(B * C, *x.shape[1:])

        hidden = self.decode(decoder_ids.reshape(B * C, K), *map(per_class, encoded))  # (B * C, K, D)
        return self.rank.scores(hidden.view(B, C, K, -1), task, self.mt5.lm_head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.rank is not None:
            return self.rank_scores(input_ids, attention_mask)  # (B, C)
        hidden = self.hidden(input_ids, attention_mask)
        if self.head is None:  # lm_head trains: score with its current rows
            return verbalizer.scores_from_logits(self.mt5.lm_head(hidden), self.pieces)  # (B, C)
        return verbalizer.class_scores(hidden, self.head)  # (B, C)

"""The hybrid decoder stack: Qwen2-style layers whose mixer is attention or Mamba-2, per `layer_types`.

Layer: x + mixer(RMSNorm(x)) → h + SwiGLU(RMSNorm(h)). A final RMSNorm closes the stack (CosyVoice's
`llm_decoder` reads the normed state).

Padding: `attention_mask` (B, L) marks real tokens. Positions are counted per row over real tokens only,
so a left-padded row gets the same RoPE positions as the row alone; padded keys are masked out of every
attention row, and Mamba layers freeze their state across padding (see `Mamba2Mixer.forward`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mamtra_cli.models.attention import Attention, RMSNorm, RotaryEmbedding, SwiGLU
from mamtra_cli.models.cache import StaticHybridCache
from mamtra_cli.models.config import ATTENTION, ModelConfig
from mamtra_cli.models.mamba2 import Mamba2Mixer


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        if layer_type == ATTENTION:
            self.self_attn = Attention(config)
        else:
            self.mamba = Mamba2Mixer(config)

    def forward(self, x, cos, sin, attn_mask, token_mask, layer_cache=None):
        h = self.input_layernorm(x)
        if self.layer_type == ATTENTION:
            h = self.self_attn(h, cos, sin, attn_mask, layer_cache)
        else:
            h = self.mamba(h, token_mask, layer_cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_step(self, x, cos, sin, key_mask, slot, layer_cache):
        """One token with a `StaticHybridCache` layer: x (B, 1, H) → (B, 1, H); see `HybridBackbone.decode_step`."""
        h = self.input_layernorm(x)
        if self.layer_type == ATTENTION:
            h = self.self_attn.decode_step(h, cos, sin, key_mask, slot, layer_cache)
        else:
            # The Mamba decode step already has fixed shapes and updates its states in place.
            h = self.mamba(h, None, layer_cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridBackbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DecoderLayer(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """inputs_embeds: (B, L, H); attention_mask: (B, L) bool or None (= all real);
        cache: `HybridCache` (updated in place) or None; a `StaticHybridCache` is filled through this same
        path (run on a dynamic copy, then loaded back), so any prefill works on it.
        Returns the final-normed hidden state (B, L, H)."""
        if isinstance(cache, StaticHybridCache):
            dynamic = cache.to_dynamic()
            out = self.forward(inputs_embeds, attention_mask, dynamic)
            cache.load(dynamic)
            return out
        b, l, _ = inputs_embeds.shape
        device = inputs_embeds.device
        token_mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        if token_mask is not None and bool(token_mask.all()):
            token_mask = None

        past = 0 if cache is None else cache.length
        if token_mask is None:
            new_pos = torch.arange(l, device=device)[None].expand(b, l)
        else:
            new_pos = (token_mask.long().cumsum(1) - 1).clamp(min=0)
        if cache is not None:
            new_pos = new_pos + cache.next_position[:, None]
            new_keys = token_mask if token_mask is not None else torch.ones(b, l, dtype=torch.bool, device=device)
            key_mask = torch.cat([cache.key_mask, new_keys], dim=1)  # (B, past + L)
        else:
            key_mask = token_mask

        attn_mask = None
        if key_mask is not None and not bool(key_mask.all()):
            t = past + l
            causal = torch.ones(l, t, dtype=torch.bool, device=device).tril(past)
            attn_mask = causal[None] & key_mask[:, None, :]
            # A padding query would otherwise see no key at all (NaN rows): let it see itself.
            rows = torch.arange(l, device=device)
            diag = torch.zeros(l, t, dtype=torch.bool, device=device)
            diag[rows, past + rows] = True
            attn_mask = attn_mask | diag[None]
            attn_mask = attn_mask[:, None]  # (B, 1, L, T)

        cos, sin = self.rotary(new_pos, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, attn_mask, token_mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, token_mask, layer_cache)
        if cache is not None:
            cache.key_mask = key_mask
            cache.next_position = cache.next_position + (l if token_mask is None else token_mask.long().sum(1))
        return self.norm(x)

    def decode_step(self, inputs_embeds: torch.Tensor, cache: StaticHybridCache) -> torch.Tensor:
        """One token for every row, on a `StaticHybridCache`: inputs_embeds (B, 1, H) → final-normed (B, 1, H).

        The fast path of `forward(x, None, cache)` for L == 1. Shapes never depend on the length and
        nothing is read back to the host, so one trace / one CUDA graph serves every step: the token's K/V
        go to slot `cache.length` by index_copy_, attention covers all max_length slots under
        `cache.key_mask`, Mamba states are updated in place, and `length` / `next_position` are
        incremented in place. The caller keeps `cache.length < cache.max_length` (not checked here).
        """
        slot = cache.length.view(1)  # (1,) int64: the slot this token fills, same for every row
        cache.key_mask.index_fill_(1, slot, True)  # the new token is a real key for its own query
        key_mask = cache.key_mask[:, None, None, :]  # (B, 1, 1, T_max)
        cos, sin = self.rotary(cache.next_position[:, None], inputs_embeds.dtype)  # (B, 1, d)
        x = inputs_embeds
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer.decode_step(x, cos, sin, key_mask, slot, layer_cache)
        cache.length.add_(1)
        cache.next_position.add_(1)
        return self.norm(x)

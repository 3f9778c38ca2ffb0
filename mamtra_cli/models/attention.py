"""Qwen2 building blocks: RMSNorm, rotary position embedding, GQA self-attention with Q/K/V bias, SwiGLU.

Numerics follow transformers' Qwen2 (which CosyVoice 2's `Qwen2Encoder` wraps): RMSNorm in float32 then
cast back before the weight, RoPE with the rotate-half convention, attention through SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamtra_cli.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions given per token (positions differ per row with left padding)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, L) int64 → cos, sin: (B, L, head_dim)
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, L, d); cos/sin: (B, L, d)
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query attention with RoPE; Q/K/V have a bias, O does not (Qwen2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=True)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None,
                kv_cache=None) -> torch.Tensor:
        """x: (B, L, H). attn_mask: None for plain causal attention with no cache and no padding, else a
        bool (B, 1, L, T_total) mask, True = may attend. kv_cache: the layer's `AttentionCache` or None."""
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_h, L, d)
        k = self.k_proj(x).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, L, d)
        v = self.v_proj(x).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, n_kv, T_total, d)
        rep = self.n_heads // self.n_kv
        if attn_mask is None and kv_cache is None:
            # Training / plain prefill: expand K/V to the query heads (head h reads KV group h // rep,
            # the GQA mapping) and let SDPA use its causal kernel.
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=l > 1)
        else:
            # With a cache (decode) expanding K/V would copy the whole cache `rep` times per step. Instead
            # fold the `rep` query heads of a group into the query-length axis: (B, n_kv, rep·L, d) against
            # (B, n_kv, T, d). Rows are independent in attention, so this is exact.
            t = k.shape[2]
            qg = q.reshape(b, self.n_kv, rep * l, self.head_dim)
            if attn_mask is None and l > 1:
                attn_mask = torch.ones(b, 1, l, t, dtype=torch.bool, device=x.device).tril(t - l)
            mask = None  # one new token with no padding anywhere attends to every cached key
            if attn_mask is not None:
                mask = attn_mask.expand(b, 1, l, t)
                if rep > 1:
                    mask = mask[:, :, None].expand(b, 1, rep, l, t).reshape(b, 1, rep * l, t)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
            y = y.reshape(b, self.n_heads, l, self.head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim))

    def decode_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor,
                    slot: torch.Tensor, kv) -> torch.Tensor:
        """One token against a preallocated cache: fixed shapes, no host reads (CUDA-graph/compile safe).

        x: (B, 1, H); cos, sin: (B, 1, d); key_mask: (B, 1, 1, T_max) bool, True at filled real slots
        (including `slot`); slot: (1,) int64, where this token's K/V go; kv: the layer's
        `StaticAttentionCache`, K/V (B, n_kv, T_max, d). Attends over all T_max slots with the mask, so the
        work is that of the full cache whatever its fill; the result equals `forward` with a dynamic cache.
        """
        b = x.shape[0]
        q = self.q_proj(x).view(b, 1, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_h, 1, d)
        k = self.k_proj(x).view(b, 1, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, 1, d)
        v = self.v_proj(x).view(b, 1, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv.write(slot, k, v)
        # GQA without copying the cache: the rep query heads of a KV group become rep query rows,
        # (B, n_kv, rep, d) against (B, n_kv, T_max, d); the (B, 1, 1, T_max) mask broadcasts over both.
        rep = self.n_heads // self.n_kv
        qg = q.reshape(b, self.n_kv, rep, self.head_dim)
        y = F.scaled_dot_product_attention(qg, kv.k, kv.v, attn_mask=key_mask)  # (B, n_kv, rep, d)
        return self.o_proj(y.reshape(b, 1, self.n_heads * self.head_dim))

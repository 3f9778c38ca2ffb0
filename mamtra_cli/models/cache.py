"""`HybridCache`: the decode-time state of a hybrid (or all-attention) speech LM for one batch.

- per attention layer: K and V, (B, n_kv, T, d), growing with every token (the KV cache);
- per Mamba layer: conv_state (B, conv_width, d_conv) and ssm_state (B, n_h, head_dim, d_state),
  constant in size whatever the length;
- shared: which key positions are real (left padding of batched prompts) and each row's next position.

The cache reports its own size (`nbytes`) split by layer type; `profile cache-growth` reads that rather
than re-deriving it. Sizes count the live entries (T tokens), not the spare capacity that K/V storage keeps
so that appending a token does not copy the whole cache (`allocated_nbytes` counts that too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mamtra_cli.models.config import ATTENTION, ModelConfig

_GROW = 256  # K/V capacity grows in steps of this many tokens (amortised O(1) appends)


class AttentionCache:
    def __init__(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device):
        self.shape = (batch, n_kv, head_dim)
        self.dtype, self.device = dtype, device
        self.k = torch.empty(batch, n_kv, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, n_kv, L, d) new entries → views of all T entries, (B, n_kv, T, d)."""
        new_len = self.length + k.shape[2]
        if new_len > self.k.shape[2]:
            cap = -(-new_len // _GROW) * _GROW
            b, n_kv, d = self.shape
            k_buf = torch.empty(b, n_kv, cap, d, dtype=self.dtype, device=self.device)
            v_buf = torch.empty_like(k_buf)
            k_buf[:, :, : self.length] = self.k[:, :, : self.length]
            v_buf[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = k_buf, v_buf
        self.k[:, :, self.length:new_len] = k
        self.v[:, :, self.length:new_len] = v
        self.length = new_len
        return self.k[:, :, :new_len], self.v[:, :, :new_len]

    def nbytes(self) -> int:
        b, n_kv, d = self.shape
        return 2 * b * n_kv * self.length * d * self.k.element_size()

    def allocated_nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class MambaCache:
    def __init__(self, batch: int, conv_width: int, d_conv: int, n_heads: int, head_dim: int, d_state: int,
                 dtype: torch.dtype, device):
        # conv_state holds the last d_conv inputs of the causal conv (newest at index -1).
        self.conv_state = torch.zeros(batch, conv_width, d_conv, dtype=dtype, device=device)
        self.ssm_state = torch.zeros(batch, n_heads, head_dim, d_state, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return (self.conv_state.numel() * self.conv_state.element_size()
                + self.ssm_state.numel() * self.ssm_state.element_size())

    allocated_nbytes = nbytes


@dataclass
class CacheReport:
    attention_bytes: int
    mamba_bytes: int
    attention_layers: int
    mamba_layers: int
    tokens: int
    batch: int
    per_layer: list[tuple[str, int]]

    @property
    def total_bytes(self) -> int:
        return self.attention_bytes + self.mamba_bytes

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "attention_bytes": self.attention_bytes,
                "mamba_bytes": self.mamba_bytes, "attention_layers": self.attention_layers,
                "mamba_layers": self.mamba_layers, "tokens": self.tokens, "batch": self.batch,
                "per_layer": [{"type": t, "bytes": n} for t, n in self.per_layer]}


class HybridCache:
    def __init__(self, config: ModelConfig, batch: int, dtype: torch.dtype, device="cpu"):
        self.config, self.batch, self.dtype = config, batch, dtype
        self.device = torch.device(device)
        conv_width = 2 * config.d_xb + config.d_inner
        self.layers: list[AttentionCache | MambaCache] = []
        for t in config.layer_types:
            if t == ATTENTION:
                self.layers.append(AttentionCache(batch, config.num_key_value_heads, config.head_dim, dtype,
                                                  self.device))
            else:
                self.layers.append(MambaCache(batch, conv_width, config.mamba.d_conv, config.num_attention_heads,
                                              config.head_dim, config.head_dim, dtype, self.device))
        # key_mask: (B, T) True where the position holds a real token (False = left padding).
        self.key_mask = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=self.device)

    @property
    def length(self) -> int:
        return self.key_mask.shape[1]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_nbytes(self) -> int:
        return sum(layer.allocated_nbytes() for layer in self.layers)

    def report(self) -> CacheReport:
        per_layer = [(ATTENTION if isinstance(layer, AttentionCache) else "mamba", layer.nbytes())
                     for layer in self.layers]
        return CacheReport(
            attention_bytes=sum(n for t, n in per_layer if t == ATTENTION),
            mamba_bytes=sum(n for t, n in per_layer if t != ATTENTION),
            attention_layers=sum(1 for t, _ in per_layer if t == ATTENTION),
            mamba_layers=sum(1 for t, _ in per_layer if t != ATTENTION),
            tokens=self.length, batch=self.batch, per_layer=per_layer)


def analytic_cache_bytes(config: ModelConfig, tokens: int, batch: int = 1, bytes_per_element: int = 2) -> dict:
    """What the cache must hold, from the architecture alone: K and V for every token in every attention
    layer, and a length-independent conv + SSM state per Mamba layer. `profile cache-growth` checks the
    measured `HybridCache` against this and fails loudly when they disagree."""
    n_attn, n_mamba = len(config.attention_layers), len(config.mamba_layers)
    kv_per_token_layer = 2 * config.num_key_value_heads * config.head_dim * bytes_per_element
    conv = (2 * config.d_xb + config.d_inner) * config.mamba.d_conv
    ssm = config.num_attention_heads * config.head_dim * config.head_dim
    mamba_per_layer = (conv + ssm) * bytes_per_element
    attention_bytes = batch * n_attn * kv_per_token_layer * tokens
    mamba_bytes = batch * n_mamba * mamba_per_layer
    return {"attention_bytes": attention_bytes, "mamba_bytes": mamba_bytes,
            "total_bytes": attention_bytes + mamba_bytes,
            "kv_bytes_per_token": n_attn * kv_per_token_layer * batch,
            "mamba_bytes_per_layer": mamba_per_layer * batch}

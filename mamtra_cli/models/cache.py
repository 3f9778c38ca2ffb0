"""`HybridCache`: the decode-time state of a hybrid (or all-attention) speech LM for one batch.

- per attention layer: K and V, (B, n_kv, T, d), growing with every token (the KV cache);
- per Mamba layer: conv_state (B, conv_width, d_conv) and ssm_state (B, n_h, head_dim, d_state),
  constant in size whatever the length;
- shared: which key positions are real (left padding of batched prompts) and each row's next position.

The cache reports its own size (`nbytes`) split by layer type; `profile cache-growth` reads that rather
than re-deriving it. Sizes count the live entries (T tokens), not the spare capacity that K/V storage keeps
so that appending a token does not copy the whole cache (`allocated_nbytes` counts that too).

`StaticHybridCache` holds the same state preallocated to a maximum length, for the fixed-shape decode step
(`SpeechLM.decode_step`) that CUDA graphs and `torch.compile` need; the growing `HybridCache` stays the
reference path (prefill, tests) and reports sizes the same way.
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
        return _report(per_layer, self.length, self.batch)


def _report(per_layer: list[tuple[str, int]], tokens: int, batch: int) -> CacheReport:
    return CacheReport(
        attention_bytes=sum(n for t, n in per_layer if t == ATTENTION),
        mamba_bytes=sum(n for t, n in per_layer if t != ATTENTION),
        attention_layers=sum(1 for t, _ in per_layer if t == ATTENTION),
        mamba_layers=sum(1 for t, _ in per_layer if t != ATTENTION),
        tokens=tokens, batch=batch, per_layer=per_layer)


class StaticAttentionCache:
    """One attention layer's K/V preallocated to `max_length` slots: k, v (B, n_kv, T_max, d).

    Zero-filled, not empty: an unfilled slot is masked out of attention, but its key still enters q·k, and
    garbage NaN/inf there would poison the softmax row even under the mask."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, max_length: int, dtype: torch.dtype, device):
        self.shape = (batch, n_kv, head_dim)
        self.k = torch.zeros(batch, n_kv, max_length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slot: (1,) int64 on the cache's device; k, v: (B, n_kv, 1, d). Written with index_copy_, so the
        slot never has to be read on the host (no synchronisation, one graph for every position)."""
        self.k.index_copy_(2, slot, k.to(self.k.dtype))
        self.v.index_copy_(2, slot, v.to(self.v.dtype))

    def nbytes(self, tokens: int) -> int:
        b, n_kv, d = self.shape
        return 2 * b * n_kv * tokens * d * self.k.element_size()

    def allocated_nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class StaticHybridCache:
    """The decode state of `HybridCache`, preallocated once, for a decode step with fixed shapes and
    addresses (what a CUDA graph replays and `torch.compile(dynamic=False)` traces once).

    - per attention layer: `StaticAttentionCache`, K/V (B, n_kv, max_length, d);
    - per Mamba layer: the same `MambaCache` as the dynamic cache (its size never changed anyway);
    - `length`: 0-dim int64 tensor on the device, the number of slots filled (shared by all rows; with
      left-padded prompts some filled slots are padding);
    - `key_mask`: (B, max_length) bool, True where a slot holds a real token; unfilled slots are False;
    - `next_position`: (B,) int64, each row's next RoPE position (real tokens so far).

    Every decode step updates these tensors in place (never rebinds them). Prefill goes through the
    dynamic reference path: `HybridBackbone.forward` accepts this cache, runs on `to_dynamic()` and
    `load`s the result back. Writing past `max_length` is not checked on the device (that would need a
    host sync); the caller sizes the cache (prompt + max new tokens) and counts its steps.
    """

    def __init__(self, config: ModelConfig, batch: int, max_length: int, dtype: torch.dtype, device="cpu"):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.config, self.batch, self.max_length, self.dtype = config, batch, max_length, dtype
        self.device = torch.device(device)
        conv_width = 2 * config.d_xb + config.d_inner
        self.layers: list[StaticAttentionCache | MambaCache] = []
        for t in config.layer_types:
            if t == ATTENTION:
                self.layers.append(StaticAttentionCache(batch, config.num_key_value_heads, config.head_dim,
                                                        max_length, dtype, self.device))
            else:
                self.layers.append(MambaCache(batch, conv_width, config.mamba.d_conv, config.num_attention_heads,
                                              config.head_dim, config.head_dim, dtype, self.device))
        self.length = torch.zeros((), dtype=torch.long, device=self.device)
        self.key_mask = torch.zeros(batch, max_length, dtype=torch.bool, device=self.device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=self.device)

    # ---- host-side views (each reads `length` back: a sync, so not for the decode loop) ----
    @property
    def tokens(self) -> int:
        return int(self.length)

    def _state_tensors(self) -> list[torch.Tensor]:
        out = [self.length, self.key_mask, self.next_position]
        for layer in self.layers:
            if isinstance(layer, MambaCache):
                out += [layer.conv_state, layer.ssm_state]
        return out

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of everything a decode step changes except the K/V slots (a later step rewrites the slot
        it fills, and an unfilled slot is masked); `restore` puts them back in place. For warming up a
        CUDA graph on the real cache without advancing it."""
        return [t.clone() for t in self._state_tensors()]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for t, s in zip(self._state_tensors(), snapshot):
            t.copy_(s)

    def reset(self) -> None:
        """Empty the cache in place (same addresses: a captured graph stays valid for the next request)."""
        for t in self._state_tensors():
            t.zero_()
        for layer in self.layers:
            if isinstance(layer, StaticAttentionCache):
                layer.k.zero_()
                layer.v.zero_()

    # ---- conversion to and from the dynamic (reference) cache ----
    def load(self, cache: HybridCache) -> None:
        """Take the contents of a dynamic cache (e.g. after prefill), in place."""
        t = cache.length
        if t > self.max_length:
            raise ValueError(f"the cache holds {t} tokens but this static cache has {self.max_length} slots")
        if cache.batch != self.batch or list(cache.config.layer_types) != list(self.config.layer_types):
            raise ValueError("caches of different batch sizes or layer layouts")
        for mine, theirs in zip(self.layers, cache.layers):
            if isinstance(mine, StaticAttentionCache):
                mine.k[:, :, :t] = theirs.k[:, :, :t]
                mine.v[:, :, :t] = theirs.v[:, :, :t]
                mine.k[:, :, t:] = 0
                mine.v[:, :, t:] = 0
            else:
                mine.conv_state.copy_(theirs.conv_state)
                mine.ssm_state.copy_(theirs.ssm_state)
        self.key_mask.zero_()
        self.key_mask[:, :t] = cache.key_mask
        self.next_position.copy_(cache.next_position)
        self.length.fill_(t)

    def to_dynamic(self) -> HybridCache:
        """A dynamic `HybridCache` holding copies of this cache's contents."""
        t = self.tokens
        out = HybridCache(self.config, self.batch, self.dtype, self.device)
        for mine, theirs in zip(self.layers, out.layers):
            if isinstance(mine, StaticAttentionCache):
                theirs.append(mine.k[:, :, :t], mine.v[:, :, :t])
            else:
                theirs.conv_state.copy_(mine.conv_state)
                theirs.ssm_state.copy_(mine.ssm_state)
        out.key_mask = self.key_mask[:, :t].clone()
        out.next_position = self.next_position.clone()
        return out

    # ---- sizes, as `HybridCache` reports them ----
    def nbytes(self) -> int:
        """Live bytes: K/V of the `length` filled slots plus the Mamba states (what a dynamic cache with the
        same contents reports)."""
        return self.report().total_bytes

    def allocated_nbytes(self) -> int:
        """Bytes held: all `max_length` K/V slots plus the Mamba states."""
        return sum(layer.allocated_nbytes() for layer in self.layers)

    def report(self) -> CacheReport:
        t = self.tokens
        per_layer = [(ATTENTION, layer.nbytes(t)) if isinstance(layer, StaticAttentionCache)
                     else ("mamba", layer.nbytes()) for layer in self.layers]
        return _report(per_layer, t, self.batch)


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

"""Mamba-2 mixer shaped to inherit an attention layer's weights (the MambaInLlama layout, DESIGN.md).

For a teacher with hidden H, n_h query heads, n_kv KV heads and head_dim d:
  d_inner = n_h·d, d_xb = n_kv·d, d_state = headdim = d, nheads = ngroups = n_h.
  in_proj: H → [z (d_inner) | x (d_xb) | B (d_xb) | C (d_inner) | dt (n_h)]   (with bias: Q/K/V biases live here)
  depthwise causal conv (width d_conv, with bias) over x‖B‖C, then SiLU
  x, B expanded from n_kv to n_h heads after the conv (head h uses group h // (n_h/n_kv), as in GQA)
  y = SSD(x, softplus(dt + dt_bias), −exp(A_log), B, C) + D·x
  y = rmsnorm(y · silu(z)) · w per head (group size d); out_proj: d_inner → H.
No RoPE: position comes from the decay and the conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mamtra_cli.models import kernels
from mamtra_cli.models.config import ModelConfig


def _draw(like: torch.Tensor, generator: torch.Generator | None, fill) -> torch.Tensor:
    """A tensor of `like`'s shape and dtype filled by `fill(tensor, generator)` on the generator's device (the
    only device a generator may draw on), moved to `like`'s device; with no generator, drawn on `like`'s own
    device from its default RNG. Same dtype as `like`, so a CPU parameter gets exactly the values an
    in-place draw would have given it."""
    where = like.device if generator is None else generator.device
    return fill(torch.empty(like.shape, dtype=like.dtype, device=where), generator).to(like.device)


class GatedRMSNorm(nn.Module):
    """rmsnorm(y · silu(z)) · w, normalised per group of `group_size` channels (one group per head)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """z None: `y` is already gated (the fused decode step applies silu(z) itself): only the norm."""
        dtype = y.dtype
        g = y.float() if z is None else y.float() * F.silu(z.float())
        shape = g.shape
        g = g.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.view(shape) * self.weight.float()).to(dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.d_inner, self.d_xb = c.d_inner, c.d_xb
        self.d_state = c.head_dim
        self.chunk_size = c.mamba.chunk_size
        self.conv_dim = 2 * self.d_xb + self.d_inner
        self.in_proj = nn.Linear(c.hidden_size, 2 * self.d_inner + 2 * self.d_xb + self.n_heads, bias=True)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.mamba.d_conv, groups=self.conv_dim,
                                padding=c.mamba.d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.head_dim, c.mamba.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, c.hidden_size, bias=False)
        self.use_kernels = True
        self._mcfg = c.mamba

    # ---- init of the parts that have no attention counterpart (Mamba's usual init) ----
    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        """dt_bias, A_log, D, the gated norm and the conv get Mamba's usual init.

        Every random draw is made on the generator's device and then copied into the parameter, so a
        CPU generator initialises CUDA (or meta) parameters: a CUDA tensor refuses a CPU generator
        ("Expected a 'cuda' device type for generator"), which crashed `profile vram/speed` on GPUs.
        Drawing on the CPU in the parameter's dtype also keeps the values bit-identical to a CPU build,
        whatever device the model lives on. Without a generator the draws use the default RNG of the
        parameter's device, as before.
        """
        m = self._mcfg
        # dt and A are drawn and computed on the generator's device (the CPU without one, as before) and
        # only the results are copied: exp/log on another device could differ in the last bit.
        where = torch.device("cpu") if generator is None else generator.device
        u = torch.rand(self.n_heads, generator=generator, device=where)  # (n_h,)
        dt = torch.exp(u * (math.log(m.dt_max) - math.log(m.dt_min)) + math.log(m.dt_min))
        dt = dt.clamp(min=m.dt_init_floor)
        # inverse softplus, so that softplus(dt_bias) = dt at init
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.empty(self.n_heads, device=where).uniform_(m.A_init_min, m.A_init_max, generator=generator)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)
        # nn.Conv1d's default init (kaiming-uniform, a=√5), drawn from the generator for reproducibility
        w, wb = self.conv1d.weight, self.conv1d.bias  # (conv_dim, 1, d_conv), (conv_dim,)
        bound = 1.0 / math.sqrt(w.shape[1] * w.shape[2])
        w.copy_(_draw(w, generator, lambda t, g: t.uniform_(-bound, bound, generator=g)))
        wb.copy_(_draw(wb, generator, lambda t, g: t.uniform_(-bound, bound, generator=g)))

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _expand_heads(self, t: torch.Tensor) -> torch.Tensor:
        # (..., n_kv, d) → (..., n_h, d); head h reads KV group h // (n_h / n_kv)
        rep = self.n_heads // self.n_kv
        return t if rep == 1 else t.repeat_interleave(rep, dim=-2)

    def forward(self, u: torch.Tensor, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """u: (B, L, H) → (B, L, H).

        mask: (B, L) bool, False at padding. Padding must not leak into the state: its conv input is zeroed
        (so a left-padded row sees the zeros a fresh conv state holds) and its dt is 0 (exp(0·A) = 1 and
        dt·x⊗B = 0 leave the SSM state untouched).
        cache: the layer's `MambaCache` (conv_state, ssm_state), updated in place; None for training.
        """
        b, l, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        w, wb = self.conv1d.weight, self.conv1d.bias  # (conv_dim, 1, d_conv), (conv_dim,)
        step = cache is not None and l == 1
        if step:
            # Decode: the cache's states are updated in place (no per-token copies of the state); the SiLU
            # is fused into causal_conv1d's step kernel where it runs.
            xc, _ = kernels.causal_conv_step(xBC[:, 0], cache.conv_state, w, wb, use_kernels=self.use_kernels,
                                             inplace=True, activation="silu")
            xBC = xc[:, None]
        else:
            xBC, new_conv = kernels.causal_conv(xBC, w, wb, cache.conv_state if cache is not None else None,
                                                use_kernels=self.use_kernels)
            if cache is not None:
                cache.conv_state.copy_(new_conv)
            xBC = F.silu(xBC)
        x, B, C = torch.split(xBC, [self.d_xb, self.d_xb, self.d_inner], dim=-1)
        if step and mask is None and kernels.fused_step_available(cache.ssm_state, x, self.use_kernels):
            return self._fused_step(x, B, C, z, dt, cache)
        x = self._expand_heads(x.reshape(b, l, self.n_kv, self.head_dim))  # (B, L, n_h, d)
        B = self._expand_heads(B.reshape(b, l, self.n_kv, self.d_state))  # (B, L, n_h, N)
        C = C.reshape(b, l, self.n_heads, self.d_state)  # (B, L, n_h, N)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, n_h)
        if mask is not None:
            dt = dt * mask[..., None].float()
        A = -torch.exp(self.A_log.float())  # (n_h,)
        if cache is not None and l == 1:
            y, _ = kernels.state_step(cache.ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0],
                                      use_kernels=self.use_kernels, inplace=True)
            y = y[:, None]
        else:
            y, final_state = kernels.chunk_scan(x, dt, A, B, C, self.chunk_size,
                                                initial_state=cache.ssm_state if cache is not None else None,
                                                use_kernels=self.use_kernels)
            if cache is not None:
                cache.ssm_state.copy_(final_state)
        y = y + x * self.D.to(x.dtype)[:, None]
        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y)

    def _fused_step(self, x, B, C, z, dt, cache) -> torch.Tensor:
        """The decode tail on CUDA with mamba-ssm: softplus(dt + dt_bias), the SSM step, + D·x and · silu(z) in
        one `selective_state_update` call (`kernels.fused_state_step`), then the norm without its gate.
        x, B: (b, 1, d_xb), C, z: (b, 1, d_inner), dt: (b, 1, n_h) raw. Equals the unfused path up to rounding
        (the kernel keeps y in float32 until the gate; the unfused path rounds y + D·x to the model dtype)."""
        b = x.shape[0]
        xh = self._expand_heads(x[:, 0].reshape(b, self.n_kv, self.head_dim))  # (b, n_h, d)
        Bh = self._expand_heads(B[:, 0].reshape(b, self.n_kv, self.d_state))  # (b, n_h, N), as C
        Ch = C[:, 0].reshape(b, self.n_heads, self.d_state)
        zh = z[:, 0].reshape(b, self.n_heads, self.head_dim)
        A = -torch.exp(self.A_log.float())  # (n_h,)
        y, _ = kernels.fused_state_step(cache.ssm_state, xh, dt[:, 0], self.dt_bias, A, Bh, Ch, self.D, zh,
                                        use_kernels=self.use_kernels, inplace=True)
        y = self.norm(y.reshape(b, 1, self.d_inner), None)
        return self.out_proj(y)

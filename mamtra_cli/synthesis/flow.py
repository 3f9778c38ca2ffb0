"""CosyVoice 2 flow model (`CausalMaskedDiffWithXvec`), re-implemented in plain PyTorch.

The flow model turns speech tokens (25 Hz) into an 80-bin mel spectrogram (50 Hz) with conditional flow
matching. Pipeline, for one utterance (B = 1 at inference):

    tokens (prompt ++ new)  --input_embedding-->          (1, N, input_size)
      -> UpsampleConformerEncoder                          (1, 2N, D)      "encoder_out"
           linear embed + rel-pos, pre-lookahead conv, Conformer stack (num_blocks),
           nearest x2 upsample + causal conv, linear embed + rel-pos, Conformer stack (always 4), norm
      -> encoder_proj                                      (1, 2N, 80)     "h";  mu = h^T (1, 80, 2N)
    speaker embedding --L2 normalise--> spk_embed_affine_layer  (1, 80)   "spks"
    prompt mel in the first frames, zeros after            (1, 80, 2N)     "cond"
    Euler ODE from fixed noise z over a cosine time grid, classifier-free guidance (cfg 0.7);
    the velocity field is `CausalConditionalDecoder` (a 1-D U-Net of causal ResNet blocks and
    transformer blocks).                                   (1, 80, 2N) -> drop prompt frames.

Module and parameter names follow CosyVoice's, so a CosyVoice `flow.pt` (a plain `state_dict`) loads with
`strict=True`. Only facts (layer structure, formulas, names, shapes) were taken from the public CosyVoice
and Matcha-TTS sources; the code is our own. Quirks of CosyVoice that we reproduce on purpose are marked
"QUIRK" (see shared/fixtures/cv2-flow-hift/README.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mamtra_cli.checkpoints import load_foreign_checkpoint, state_dict_problems
from mamtra_cli.errors import UserError

__all__ = [
    "FlowConfig",
    "FlowModel",
    "FlowConditioning",
    "FlowTrace",
    "load_flow",
    "read_flow_yaml",
    "decoder_noise",
]


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class FlowConfig:
    """Every size and constant the flow model needs. Defaults are the real CosyVoice2-0.5B values."""

    # CausalMaskedDiffWithXvec
    input_size: int = 512  # token embedding width (== encoder input width)
    output_size: int = 80  # mel bins
    vocab_size: int = 6561
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3  # tokens cut off as right context when finalize=False
    input_frame_rate: int = 25
    # UpsampleConformerEncoder
    encoder_input_size: int = 512  # width fed to `embed` and (QUIRK) declared input width of `up_embed`
    encoder_output_size: int = 512
    encoder_attention_heads: int = 8
    encoder_linear_units: int = 2048
    encoder_num_blocks: int = 6
    encoder_num_up_blocks: int = 4  # QUIRK: always 4 in CosyVoice
    encoder_lookahead: int = 3  # QUIRK: the encoder's own lookahead is a literal 3
    encoder_upsample_stride: int = 2
    encoder_static_chunk_size: int = 25  # tokens per chunk when streaming
    encoder_layer_eps: float = 1e-12  # Conformer layer norms
    encoder_embed_eps: float = 1e-5  # embed / up_embed / after_norm
    # CausalConditionalCFM
    cfm_in_channels: int = 240
    cfm_spk_emb_dim: int = 80
    sigma_min: float = 1e-6
    t_scheduler: str = "cosine"
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10
    noise_seed: int = 0
    noise_frames: int = 15000  # CosyVoice pre-draws randn(1, 80, 50 * 300)
    # CausalConditionalDecoder (the estimator)
    estimator_in_channels: int = 320  # x, mu, spks, cond stacked: 4 * 80
    estimator_out_channels: int = 80
    estimator_channels: tuple[int, ...] = (256,)
    estimator_attention_head_dim: int = 64
    estimator_num_heads: int = 8
    estimator_n_blocks: int = 4
    estimator_num_mid_blocks: int = 12
    estimator_ff_mult: int = 4
    estimator_static_chunk_size: int = 50  # mel frames per chunk when streaming (25 * token_mel_ratio)
    estimator_num_decoding_left_chunks: int = -1
    estimator_norm_eps: float = 1e-5

    @property
    def estimator_inner_dim(self) -> int:
        """Attention width of the estimator's transformer blocks (heads * head_dim; != channels)."""
        return self.estimator_num_heads * self.estimator_attention_head_dim

    @property
    def estimator_time_embed_dim(self) -> int:
        return 4 * self.estimator_channels[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["estimator_channels"] = list(self.estimator_channels)
        return d

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict_and_yaml(
        cls, state_dict: Mapping[str, torch.Tensor], yaml_section: Mapping[str, Any] | None = None
    ) -> "FlowConfig":
        """Sizes from tensor shapes (layers counted from key names); yaml only for what shapes cannot tell.

        `yaml_section` is the `flow:` mapping of a cosyvoice2.yaml (as returned by `read_flow_yaml`), or a
        whole document that has a `flow` key, or None. Raises `_MissingKey` (a KeyError) when a key that the
        sizes are read from is absent; `load_flow` turns that into a UserError.
        """
        y = dict(yaml_section or {})
        if isinstance(y.get("flow"), Mapping):
            y = dict(y["flow"])
        enc_y = _as_map(y.get("encoder"))
        dec_y = _as_map(y.get("decoder"))
        cfm_y = _as_map(dec_y.get("cfm_params"))
        if isinstance(cfm_y.get("content"), Mapping):  # !new:omegaconf.DictConfig {content: {...}}
            cfm_y = _as_map(cfm_y["content"])
        est_y = _as_map(dec_y.get("estimator"))

        def shape(key: str) -> tuple[int, ...]:
            if key not in state_dict:
                raise _MissingKey(key)
            return tuple(state_dict[key].shape)

        def count(prefix: str) -> int:
            # number of distinct integer indices i in keys "<prefix>.<i>.*"
            pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
            idx = {int(m.group(1)) for k in state_dict if (m := pat.match(k))}
            return len(idx)

        c = cls()
        c.vocab_size, c.input_size = shape("input_embedding.weight")
        c.output_size, c.spk_embed_dim = shape("spk_embed_affine_layer.weight")
        # encoder
        c.encoder_output_size, c.encoder_input_size = shape("encoder.embed.out.0.weight")
        c.encoder_num_blocks = count("encoder.encoders")
        c.encoder_num_up_blocks = count("encoder.up_encoders")
        layer0 = "encoder.encoders.0" if c.encoder_num_blocks else "encoder.up_encoders.0"
        c.encoder_attention_heads = shape(f"{layer0}.self_attn.pos_bias_u")[0]
        c.encoder_linear_units = shape(f"{layer0}.feed_forward.w_1.weight")[0]
        c.encoder_lookahead = shape("encoder.pre_lookahead_layer.conv1.weight")[2] - 1
        c.encoder_upsample_stride = (shape("encoder.up_layer.conv.weight")[2] - 1) // 2
        # estimator
        est = "decoder.estimator"
        c.estimator_in_channels = shape(f"{est}.time_mlp.linear_1.weight")[1]
        n_levels = count(f"{est}.down_blocks")
        c.estimator_channels = tuple(
            shape(f"{est}.down_blocks.{i}.0.block1.block.0.weight")[0] for i in range(n_levels)
        )
        c.estimator_out_channels = shape(f"{est}.final_proj.weight")[0]
        c.estimator_n_blocks = count(f"{est}.down_blocks.0.1")
        c.estimator_num_mid_blocks = count(f"{est}.mid_blocks")
        blk = f"{est}.down_blocks.0.1.0"
        inner = shape(f"{blk}.attn1.to_q.weight")[0]
        c.estimator_ff_mult = shape(f"{blk}.ff.net.0.proj.weight")[0] // c.estimator_channels[0]
        # heads vs head width: the shapes only give their product; the yaml tells them apart
        head_dim, heads = _int_or_none(est_y.get("attention_head_dim")), _int_or_none(est_y.get("num_heads"))
        if head_dim and heads and head_dim * heads != inner:
            raise UserError(
                f"The yaml says the flow estimator has {heads} heads of width {head_dim} "
                f"but the checkpoint's attention width is {inner}; use the yaml that came with this flow.pt."
            )
        if head_dim is None and heads:
            head_dim = inner // heads
        if head_dim is None:
            head_dim = 64 if inner % 64 == 0 else inner  # CosyVoice 2 uses 64-wide heads
        c.estimator_attention_head_dim = head_dim
        c.estimator_num_heads = inner // head_dim
        # what only the yaml knows (defaults = real CosyVoice 2)
        c.token_mel_ratio = _int_or_none(y.get("token_mel_ratio")) or c.token_mel_ratio
        pl = _int_or_none(y.get("pre_lookahead_len"))
        c.pre_lookahead_len = c.pre_lookahead_len if pl is None else pl
        c.input_frame_rate = _int_or_none(y.get("input_frame_rate")) or c.input_frame_rate
        scs = _int_or_none(enc_y.get("static_chunk_size"))
        c.encoder_static_chunk_size = c.encoder_static_chunk_size if scs is None else scs
        c.cfm_in_channels = _int_or_none(dec_y.get("in_channels")) or c.cfm_in_channels
        c.cfm_spk_emb_dim = _int_or_none(dec_y.get("spk_emb_dim")) or c.cfm_spk_emb_dim
        sm = _float_or_none(cfm_y.get("sigma_min"))
        c.sigma_min = c.sigma_min if sm is None else sm
        if isinstance(cfm_y.get("t_scheduler"), str):
            c.t_scheduler = cfm_y["t_scheduler"]
        cfg = _float_or_none(cfm_y.get("inference_cfg_rate"))
        c.inference_cfg_rate = c.inference_cfg_rate if cfg is None else cfg
        escs = _int_or_none(est_y.get("static_chunk_size"))
        c.estimator_static_chunk_size = (
            escs if escs is not None else c.encoder_static_chunk_size * c.token_mel_ratio
        )
        ndl = _int_or_none(est_y.get("num_decoding_left_chunks"))
        c.estimator_num_decoding_left_chunks = c.estimator_num_decoding_left_chunks if ndl is None else ndl
        return c


class _MissingKey(KeyError):
    """A key the sizes are read from is not in the state_dict."""


def _as_map(v: Any) -> dict[str, Any]:
    return dict(v) if isinstance(v, Mapping) else {}


def _int_or_none(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _float_or_none(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)  # PyYAML reads "1e-06" (no dot) as a string
        except ValueError:
            return None
    return None


# ----------------------------------------------------------------------------------------------------
# Masks shared by encoder and estimator
# ----------------------------------------------------------------------------------------------------


def _valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _chunk_mask(size: int, chunk: int, device: torch.device) -> torch.Tensor:
    """(size, size) bool: frame i sees every frame before the end of its own chunk (all left chunks)."""
    pos = torch.arange(size, device=device)
    chunk_end = (pos // chunk + 1) * chunk
    return pos[None, :] < chunk_end[:, None]


def _attention_mask(valid: torch.Tensor, static_chunk: int) -> torch.Tensor:
    """valid (B, 1, T) bool -> (B, 1, T) padding mask, or (B, T, T) when a static chunk size is used."""
    if static_chunk <= 0:
        return valid
    m = valid & _chunk_mask(valid.size(-1), static_chunk, valid.device)[None]
    # a query row that sees nothing (only possible on padding) is opened up, as CosyVoice does
    dead = m.sum(dim=-1) == 0
    if bool(dead.any()):
        m[dead] = True
    return m


# ----------------------------------------------------------------------------------------------------
# Encoder: UpsampleConformerEncoder
# ----------------------------------------------------------------------------------------------------


def _rel_positions(length: int, d_model: int, device, dtype) -> torch.Tensor:
    """ESPnet relative sinusoidal table: (1, 2L-1, d) for relative positions L-1, ..., 0, ..., -(L-1)."""
    rel = torch.arange(length - 1, -length, -1, dtype=torch.float32).unsqueeze(1)  # (2L-1, 1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model)
    )  # (d/2,)
    pe = torch.zeros(2 * length - 1, d_model)
    pe[:, 0::2] = torch.sin(rel * inv_freq)
    pe[:, 1::2] = torch.cos(rel * inv_freq)
    return pe.unsqueeze(0).to(device=device, dtype=dtype)


class _LinearEmbed(nn.Module):
    """Linear -> LayerNorm, then scale by sqrt(d) (rel-pos embedding: positions are NOT added to x)."""

    def __init__(self, idim: int, odim: int, eps: float):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=eps))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, idim) -> (x * sqrt(d) (B, T, d), pos_emb (1, 2T-1, d))."""
        x = self.out(x) * self.xscale
        return x, _rel_positions(x.size(1), x.size(2), x.device, x.dtype)


class _RelPosSelfAttention(nn.Module):
    """Transformer-XL style self-attention with ESPnet relative positions (biases u and v per head)."""

    def __init__(self, n_head: int, d_model: int):
        super().__init__()
        assert d_model % n_head == 0
        self.h, self.d_k = n_head, d_model // n_head
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x (B, T, d); mask (B, 1|T, T) bool, True = may attend; pos_emb (1, 2T-1, d)."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)  # (B, T, H, dk)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)  # (B, H, T, dk)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)  # (1,H,2T-1,dk)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # content term query
        q_v = (q + self.pos_bias_v).transpose(1, 2)  # position term query
        ac = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, T, T)
        bd = torch.matmul(q_v, p.transpose(-2, -1))  # (B, H, T, 2T-1), column c = relative pos T-1-c
        # Pick, for query i and key j, relative position i-j, i.e. column (T-1) - i + j.
        idx = (t - 1) - torch.arange(t, device=x.device)[:, None] + torch.arange(t, device=x.device)[None, :]
        bd = torch.gather(bd, -1, idx.expand(bd.size(0), bd.size(1), t, t))
        scores = (ac + bd) / math.sqrt(self.d_k)
        blocked = ~mask.unsqueeze(1)  # (B, 1, 1|T, T)
        attn = torch.softmax(scores.masked_fill(blocked, -float("inf")), dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)


class _FeedForward(nn.Module):
    """w_1 -> SiLU (swish) -> w_2."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(d_model, hidden)
        self.w_2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class _ConformerLayer(nn.Module):
    """Pre-norm layer without macaron FF and without conv module: x += MHA(LN x); x += FF(LN x)."""

    def __init__(self, d_model: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.self_attn = _RelPosSelfAttention(heads, d_model)
        self.feed_forward = _FeedForward(d_model, hidden)
        self.norm_ff = nn.LayerNorm(d_model, eps=eps)
        self.norm_mha = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class _PreLookahead(nn.Module):
    """Right-looking conv over `lookahead` future tokens, then a causal conv, with a residual."""

    def __init__(self, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C); context (B, Tc <= lookahead, C): the real future tokens instead of zero padding."""
        y = x.transpose(1, 2)  # (B, C, T)
        if context is not None and context.size(1) > 0:
            y = torch.cat([y, context.transpose(1, 2)], dim=2)
            y = F.pad(y, (0, self.lookahead - context.size(1)))
        else:
            y = F.pad(y, (0, self.lookahead))
        y = F.leaky_relu(self.conv1(y))  # (B, C, T): frame t sees tokens t..t+lookahead
        y = self.conv2(F.pad(y, (self.conv2.kernel_size[0] - 1, 0)))  # causal
        return y.transpose(1, 2) + x


class _RepeatUpsample(nn.Module):
    """Nearest-neighbour x stride, then a causal conv of kernel 2*stride+1 (left zero padding)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, 2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) -> (B, C, stride*T)."""
        y = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(y, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, c: FlowConfig):
        super().__init__()
        d = c.encoder_output_size
        self.static_chunk_size = c.encoder_static_chunk_size
        self.embed = _LinearEmbed(c.encoder_input_size, d, c.encoder_embed_eps)
        self.after_norm = nn.LayerNorm(d, eps=c.encoder_embed_eps)  # declared here: CosyVoice's key order
        # QUIRK: CosyVoice builds these two with a literal 512; we size them from the encoder width.
        self.pre_lookahead_layer = _PreLookahead(d, c.encoder_lookahead)
        self.encoders = nn.ModuleList(
            _ConformerLayer(d, c.encoder_attention_heads, c.encoder_linear_units, c.encoder_layer_eps)
            for _ in range(c.encoder_num_blocks)
        )
        self.up_layer = _RepeatUpsample(d, c.encoder_upsample_stride)
        # QUIRK: declared with the encoder *input* width although it eats the upsampled (output-width) stream.
        self.up_embed = _LinearEmbed(c.encoder_input_size, d, c.encoder_embed_eps)
        self.up_encoders = nn.ModuleList(
            _ConformerLayer(d, c.encoder_attention_heads, c.encoder_linear_units, c.encoder_layer_eps)
            for _ in range(c.encoder_num_up_blocks)
        )

    def forward(
        self,
        xs: torch.Tensor,
        xs_lens: torch.Tensor,
        context: torch.Tensor | None = None,
        streaming: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """xs (B, N, input) embedded tokens; context (1, Nc, input) look-ahead tokens (finalize=False).

        Returns (B, stride*N, D) and the frame mask (B, 1, stride*N).
        """
        valid = _valid_mask(xs_lens, xs.size(1)).unsqueeze(1)  # (B, 1, N)
        xs, pos_emb = self.embed(xs)
        if context is not None and context.size(1) > 0:
            context, _ = self.embed(context)  # same projection; its positions are not used
        mask = _attention_mask(valid, self.static_chunk_size if streaming else 0)
        xs = self.pre_lookahead_layer(xs, context)
        for layer in self.encoders:
            xs = layer(xs, mask, pos_emb)

        stride = self.up_layer.stride
        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2)  # (B, stride*N, D)
        valid = _valid_mask(xs_lens * stride, xs.size(1)).unsqueeze(1)
        xs, pos_emb = self.up_embed(xs)
        mask = _attention_mask(valid, self.static_chunk_size * stride if streaming else 0)
        for layer in self.up_encoders:
            xs = layer(xs, mask, pos_emb)
        return self.after_norm(xs), valid


# ----------------------------------------------------------------------------------------------------
# Estimator: CausalConditionalDecoder
# ----------------------------------------------------------------------------------------------------


class _Transpose12(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class _CausalConv1d(nn.Conv1d):
    """Conv1d with (kernel-1) zeros on the left only, stride 1."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(cin, cout, kernel)
        self.left_pad = kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class _CausalBlock(nn.Module):
    """causal conv3 -> LayerNorm over channels -> Mish, masked before and after. (B,Cin,T)->(B,Cout,T)"""

    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        # indices 0 and 2 carry the weights, as in CosyVoice (block.0 = conv, block.2 = LayerNorm)
        self.block = nn.Sequential(
            _CausalConv1d(cin, cout, 3), _Transpose12(), nn.LayerNorm(cout, eps=eps), _Transpose12(), nn.Mish()
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class _CausalResnet(nn.Module):
    """block1 -> + Linear(Mish(t_emb)) -> block2, plus a 1x1 residual conv."""

    def __init__(self, cin: int, cout: int, time_dim: int, eps: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, cout))
        self.block1 = _CausalBlock(cin, cout, eps)
        self.block2 = _CausalBlock(cout, cout, eps)
        self.res_conv = nn.Conv1d(cin, cout, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, T), mask (B, 1, T), t_emb (B, time_dim) -> (B, Cout, T)."""
        h = self.block1(x, mask) + self.mlp(t_emb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class _Attention(nn.Module):
    """Self-attention with inner width heads*head_dim (may differ from dim); no q/k/v bias."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])  # [1] was dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim); bias (B, T, T) additive (0 or -1e10) -> (B, T, dim)."""
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        bias = bias.unsqueeze(1).expand(b, self.heads, t, t).contiguous()
        # scale 1/sqrt(head_dim) (SDPA default)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
        y = y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.to_out[0](y)


class _GeluProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))  # exact (erf) GELU


class _TransformerFF(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.net:
            x = m(x)
        return x


class _TransformerBlock(nn.Module):
    """Pre-norm: x += Attn(LN1 x); x += FF(LN3 x). (The timestep is not used by this block type.)"""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = _Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = _TransformerFF(dim, ff_mult)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x


class _Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _TimeMLP(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


def _sinusoidal_time(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """t (B,) in [0, 1] -> (B, dim) = [sin(1000 t w_k), cos(1000 t w_k)], w_k = 10000^(-k/(dim/2-1))."""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -step)
    arg = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class CausalConditionalDecoder(nn.Module):
    """1-D U-Net velocity field v(x, t | mu, spks, cond); keys as `decoder.estimator.*` in flow.pt."""

    def __init__(self, c: FlowConfig):
        super().__init__()
        self.in_channels = c.estimator_in_channels
        self.static_chunk_size = c.estimator_static_chunk_size
        eps = c.estimator_norm_eps
        tdim = c.estimator_time_embed_dim
        heads, hdim, mult = c.estimator_num_heads, c.estimator_attention_head_dim, c.estimator_ff_mult

        def blocks(dim: int) -> nn.ModuleList:
            return nn.ModuleList(_TransformerBlock(dim, heads, hdim, mult, eps) for _ in range(c.estimator_n_blocks))

        self.time_mlp = _TimeMLP(c.estimator_in_channels, tdim)
        chans = tuple(c.estimator_channels)
        self.down_blocks = nn.ModuleList()
        cout = c.estimator_in_channels
        for i, ch in enumerate(chans):
            cin, cout = cout, ch
            last = i == len(chans) - 1
            down = _CausalConv1d(cout, cout, 3) if last else _Downsample(cout)
            self.down_blocks.append(nn.ModuleList([_CausalResnet(cin, cout, tdim, eps), blocks(cout), down]))
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([_CausalResnet(chans[-1], chans[-1], tdim, eps), blocks(chans[-1])])
            for _ in range(c.estimator_num_mid_blocks)
        )
        ups = chans[::-1] + (chans[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(ups) - 1):
            cin, cout = ups[i] * 2, ups[i + 1]  # skip connection doubles the input width
            last = i == len(ups) - 2
            up = _CausalConv1d(cout, cout, 3) if last else _Upsample(cout)
            self.up_blocks.append(nn.ModuleList([_CausalResnet(cin, cout, tdim, eps), blocks(cout), up]))
        self.final_block = _CausalBlock(ups[-1], ups[-1], eps)
        self.final_proj = nn.Conv1d(ups[-1], c.estimator_out_channels, 1)

    def _bias(self, mask: torch.Tensor, streaming: bool) -> torch.Tensor:
        """mask (B, 1, T) float -> additive attention bias (B, T, T): 0 where allowed, -1e10 elsewhere."""
        valid = mask.bool()
        t = valid.size(-1)
        if streaming:
            allowed = _attention_mask(valid, self.static_chunk_size)
        else:
            allowed = valid.repeat(1, t, 1)
        return (1.0 - allowed.to(mask.dtype)) * -1.0e10

    def _transformers(self, x: torch.Tensor, mask: torch.Tensor, blocks: nn.ModuleList, streaming: bool):
        bias = self._bias(mask, streaming)
        y = x.transpose(1, 2).contiguous()  # (B, T, C)
        for blk in blocks:
            y = blk(y, bias)
        return y.transpose(1, 2).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        streaming: bool = False,
    ) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T); t (B,); spks (B, 80) -> velocity (B, 80, T)."""
        t_emb = self.time_mlp(_sinusoidal_time(t, self.in_channels).to(t.dtype))  # (B, 4*ch0)
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(-1)), cond], dim=1)  # (B, 320, T)
        skips, masks = [], [mask]
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            h = self._transformers(resnet(h, m, t_emb), m, blocks, streaming)
            skips.append(h)
            h = down(h * m)
            masks.append(m[:, :, ::2])
        masks = masks[:-1]
        m = masks[-1]
        for resnet, blocks in self.mid_blocks:
            h = self._transformers(resnet(h, m, t_emb), m, blocks, streaming)
        for resnet, blocks, up in self.up_blocks:
            m = masks.pop()
            skip = skips.pop()
            h = torch.cat([h[:, :, : skip.size(-1)], skip], dim=1)
            h = self._transformers(resnet(h, m, t_emb), m, blocks, streaming)
            h = up(h * m)
        h = self.final_block(h, m)
        return self.final_proj(h * m) * mask


# ----------------------------------------------------------------------------------------------------
# CFM solver
# ----------------------------------------------------------------------------------------------------

_NOISE_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def decoder_noise(n_mels: int = 80, frames: int = 15000, seed: int = 0) -> torch.Tensor:
    """CosyVoice's fixed ODE start noise: `torch.manual_seed(seed); torch.randn(1, n_mels, frames)`.

    Drawn from a private CPU generator (the global RNG is untouched); cached; do not modify in place.
    """
    key = (n_mels, frames, seed)
    if key not in _NOISE_CACHE:
        g = torch.Generator(device="cpu")
        g.manual_seed(seed)
        _NOISE_CACHE[key] = torch.randn(1, n_mels, frames, generator=g, dtype=torch.float32)
    return _NOISE_CACHE[key]


@dataclass
class FlowTrace:
    """What the Euler solver saw: filled in when passed to `solve_euler`."""

    t_in: list[torch.Tensor] = field(default_factory=list)  # each (2,): the time given to the estimator
    dphi: list[torch.Tensor] = field(default_factory=list)  # each (2, 80, T): [conditional, unconditional]
    trajectory: list[torch.Tensor] = field(default_factory=list)  # x before each step, then the solution


class CausalConditionalCFM(nn.Module):
    def __init__(self, c: FlowConfig):
        super().__init__()
        self.n_feats = c.output_size
        self.t_scheduler = c.t_scheduler
        self.inference_cfg_rate = c.inference_cfg_rate
        self.noise_frames, self.noise_seed = c.noise_frames, c.noise_seed
        self.estimator = CausalConditionalDecoder(c)

    def noise(self, frames: int, like: torch.Tensor) -> torch.Tensor:
        """(1, 80, frames) slice of the fixed noise, on like's device/dtype."""
        if frames > self.noise_frames:
            raise ValueError(f"flow decoder noise covers {self.noise_frames} frames, asked for {frames}")
        z = decoder_noise(self.n_feats, self.noise_frames, self.noise_seed)[:, :, :frames]
        return z.to(device=like.device, dtype=like.dtype, copy=True)  # never hand out the cached storage

    def t_span(self, n_timesteps: int, like: torch.Tensor) -> torch.Tensor:
        """(n+1,) time grid; cosine schedule 1 - cos(pi/2 * s) packs steps near t = 0."""
        s = torch.linspace(0, 1, n_timesteps + 1, device=like.device, dtype=like.dtype)
        if self.t_scheduler == "cosine":
            s = 1 - torch.cos(s * 0.5 * torch.pi)
        return s

    def guided_velocity(self, x, mask, mu, t, spks, cond, streaming: bool = False):
        """One CFG evaluation. x/mu/cond (1, 80, T), mask (1, 1, T), t (1,) or scalar, spks (1, 80).

        Returns (v (1, 80, T) = (1+w) v_cond - w v_uncond, raw (2, 80, T) = [v_cond, v_uncond]).
        """
        b = x.size(0)
        x_in = torch.cat([x, x], dim=0)
        mask_in = torch.cat([mask, mask], dim=0)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0)  # row 1: unconditional (zeros)
        t_in = t.reshape(-1).to(spks.dtype).expand(2 * b).contiguous()
        spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0)
        cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        raw = self.estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming=streaming)
        v_c, v_u = raw[:b], raw[b:]
        w = self.inference_cfg_rate
        return (1.0 + w) * v_c - w * v_u, raw

    def solve_euler(self, x, t_span, mu, mask, spks, cond, streaming: bool = False, trace: FlowTrace | None = None):
        """Fixed-step Euler over t_span (n+1,), with CosyVoice's accumulation of t (t += dt)."""
        t = t_span[0].unsqueeze(0)
        dt = t_span[1] - t_span[0]
        if trace is not None:
            trace.trajectory.append(x)
        for step in range(1, len(t_span)):
            v, raw = self.guided_velocity(x, mask, mu, t, spks, cond, streaming)
            if trace is not None:
                trace.t_in.append(t.expand(2).clone())
                trace.dphi.append(raw)
            x = x + dt * v
            t = t + dt
            if trace is not None:
                trace.trajectory.append(x)
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x.float()

    def forward(self, mu, mask, spks, cond, n_timesteps: int = 10, temperature: float = 1.0,
                streaming: bool = False, trace: FlowTrace | None = None) -> torch.Tensor:
        """mu (1, 80, T) -> mel (1, 80, T) including the prompt frames."""
        z = self.noise(mu.size(2), mu) * temperature
        return self.solve_euler(z, self.t_span(n_timesteps, mu), mu, mask, spks, cond, streaming, trace)


# ----------------------------------------------------------------------------------------------------
# The flow model
# ----------------------------------------------------------------------------------------------------


@dataclass
class FlowConditioning:
    """Everything the ODE is conditioned on (one utterance)."""

    encoder_out: torch.Tensor  # (1, T, D) after after_norm
    h: torch.Tensor  # (1, T, 80) encoder_proj output
    mu: torch.Tensor  # (1, 80, T)
    spks: torch.Tensor  # (1, 80)
    cond: torch.Tensor  # (1, 80, T): prompt mel, then zeros
    mask: torch.Tensor  # (1, 1, T) float ones
    mel_len1: int  # prompt frames
    mel_len2: int  # new frames


class FlowModel(nn.Module):
    """CosyVoice 2 `CausalMaskedDiffWithXvec` (inference only)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        if config.encoder_input_size != config.encoder_output_size:
            # QUIRK: up_embed is declared with the input width but fed the output width
            raise ValueError("CosyVoice's flow encoder needs input width == output width "
                             f"(got {config.encoder_input_size} and {config.encoder_output_size})")
        if config.input_size != config.encoder_input_size:
            raise ValueError(f"token embedding width {config.input_size} != encoder input width "
                             f"{config.encoder_input_size}")
        if config.estimator_in_channels != 4 * config.output_size:
            raise ValueError(f"estimator in_channels {config.estimator_in_channels} != 4 * {config.output_size}")
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = UpsampleConformerEncoder(config)
        self.encoder_proj = nn.Linear(config.encoder_output_size, config.output_size)
        self.decoder = CausalConditionalCFM(config)

    # -- pieces ------------------------------------------------------------------------------------
    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """(1, spk_embed_dim) raw x-vector -> (1, 80): affine(L2-normalised embedding)."""
        return self.spk_embed_affine_layer(F.normalize(embedding.to(self.spk_embed_affine_layer.weight.dtype), dim=1))

    def encode(self, token, token_len, prompt_token, prompt_token_len, streaming: bool = False,
               finalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> (encoder_out (1, T, D), h (1, T, 80)); T = token_mel_ratio * usable tokens."""
        dtype = self.input_embedding.weight.dtype
        tokens = torch.cat([prompt_token, token], dim=1).long()
        lens = (prompt_token_len + token_len).reshape(-1).long()
        keep = _valid_mask(lens, tokens.size(1)).unsqueeze(-1).to(dtype)  # (B, N, 1)
        x = self.input_embedding(torch.clamp(tokens, min=0)) * keep
        if finalize or self.config.pre_lookahead_len == 0:
            enc, _ = self.encoder(x, lens, streaming=streaming)
        else:
            # the last pre_lookahead_len tokens only serve as right context of the lookahead conv
            n_ctx = self.config.pre_lookahead_len
            x, ctx = x[:, :-n_ctx], x[:, -n_ctx:]
            enc, _ = self.encoder(x, lens, context=ctx, streaming=streaming)
        return enc, self.encoder_proj(enc)

    def condition(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                  embedding, streaming: bool = False, finalize: bool = True) -> FlowConditioning:
        """Everything up to (not including) the ODE. prompt_feat is (1, frames, 80)."""
        if token.size(0) != 1:
            raise ValueError("flow inference handles one utterance at a time (batch 1)")
        dev = self.input_embedding.weight.device
        token, prompt_token = token.to(dev), prompt_token.to(dev)
        token_len, prompt_token_len = token_len.to(dev), prompt_token_len.to(dev)
        spks = self.speaker(embedding.to(dev))
        enc, h = self.encode(token, token_len, prompt_token, prompt_token_len, streaming, finalize)
        mel_len1 = prompt_feat.size(1)
        total = h.size(1)
        mel_len2 = total - mel_len1
        cond = torch.zeros(1, total, self.config.output_size, device=dev, dtype=h.dtype)
        cond[:, :mel_len1] = prompt_feat.to(device=dev, dtype=h.dtype)
        mask = torch.ones(1, 1, total, device=dev, dtype=h.dtype)
        return FlowConditioning(enc, h, h.transpose(1, 2).contiguous(), spks, cond.transpose(1, 2), mask,
                                mel_len1, mel_len2)

    def estimator_forward(self, x, mask, mu, t, spks, cond, streaming: bool = False) -> torch.Tensor:
        """Raw estimator call (any batch): shapes as `CausalConditionalDecoder.forward`."""
        return self.decoder.estimator(x, mask, mu, t, spks, cond, streaming=streaming)

    # -- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def inference(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                  embedding, streaming: bool = False, finalize: bool = True, trace: FlowTrace | None = None,
                  ) -> tuple[torch.Tensor, None]:
        """CosyVoice 2 `CausalMaskedDiffWithXvec.inference`: returns (mel (1, 80, T_new) float32, None).

        token (1, N) int, token_len (1,), prompt_token (1, Np), prompt_token_len (1,), prompt_feat
        (1, 2*Np, 80) mel frames, prompt_feat_len (1,), embedding (1, spk_embed_dim).
        streaming=True applies the static-chunk attention masks; finalize=False treats the last
        pre_lookahead_len tokens as look-ahead context only. Pass a `FlowTrace` to record the ODE.
        """
        c = self.condition(token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                           embedding, streaming, finalize)
        feat = self.decoder(c.mu, c.mask, c.spks, c.cond, n_timesteps=self.config.n_timesteps,
                            streaming=streaming, trace=trace)
        feat = feat[:, :, c.mel_len1:]
        assert feat.size(2) == c.mel_len2
        return feat.float(), None


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def read_flow_yaml(path: Path) -> dict[str, Any]:
    """The `flow:` section of a CosyVoice (HyperPyYAML) config as plain data, `!ref`s resolved."""
    from mamtra_cli.hyperpyyaml import read_section

    return read_section(path, "flow")


def load_flow(path: Path, yaml_path: Path | None = None, device: str | torch.device = "cpu") -> FlowModel:
    """Build a FlowModel from a CosyVoice `flow.pt` (state_dict), sized from its tensors (+ the yaml).

    Any problem with the files is a UserError naming the file and what to do.
    """
    path = Path(path)
    fix = "pass the flow.pt of a CosyVoice 2 model directory (torch.save(flow.state_dict()))"
    sd = load_foreign_checkpoint(path, fix)
    if not isinstance(sd, Mapping) or not sd or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise UserError(f"{path} is not a state_dict of tensors; {fix}.")

    yaml_section = read_flow_yaml(yaml_path) if yaml_path is not None else None
    try:
        config = FlowConfig.from_state_dict_and_yaml(sd, yaml_section)
        model = FlowModel(config)
    except _MissingKey as e:
        raise UserError(f"{path} does not match CosyVoice 2's flow model: missing key {e.args[0]}; {fix}.") from None
    except (ValueError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"{path} does not match CosyVoice 2's flow model ({e}); {fix}.") from None

    problems = state_dict_problems(model.state_dict(), sd)
    if problems:
        raise UserError(f"{path} does not match CosyVoice 2's flow model: {problems}; {fix}"
                        + (" and the cosyvoice2.yaml that came with it" if yaml_path is None else "") + ".")
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()

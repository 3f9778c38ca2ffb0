"""CosyVoice 2's HiFT vocoder (mel → 24 kHz waveform), re-implemented in plain PyTorch.

HiFT = neural source filter + iSTFTNet: an F0 predictor turns the mel into F0 (Hz per mel frame),
a sine source (`SineGen2` at 24 kHz) turns F0 into an excitation signal at the audio rate, and a
HiFi-GAN style generator, fed with the mel and the STFT of that excitation, predicts the magnitude
and phase of a 16-point STFT that is inverted to the waveform.

Module and parameter names equal those of CosyVoice's `HiFTGenerator` / `ConvRNNF0Predictor`, so a
`hift.pt` (`torch.save(hift.state_dict())`) loads with `strict=True`. Weight norm is kept as a torch
parametrization (`….parametrizations.weight.original0` = g, `original1` = v); `load_hift` also
accepts the older `….weight_g` / `….weight_v` names. Every numerically relevant operation mirrors
CosyVoice's operation order so that results agree to float32 rounding (the fixture: decode ≤ 1e-6).

Shapes: B batch, T mel frames, L = T · upsample_scale audio samples (upsample_scale = 480 at 24 kHz:
8·5·3 transposed-conv upsampling × iSTFT hop 4), H = nb_harmonics + 1 sine components.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from mamtra_cli.checkpoints import load_foreign_checkpoint, state_dict_problems
from mamtra_cli.errors import UserError

__all__ = [
    "HiFTConfig",
    "HiFTVocoder",
    "load_hift",
    "export_state_dict",
    "read_hyperpyyaml_section",
]

# On-disk weight-norm suffixes: torch >= 2.1 parametrizations vs. the legacy `weight_norm` hook.
_WN_G = ".parametrizations.weight.original0"
_WN_V = ".parametrizations.weight.original1"
_LEGACY_G = ".weight_g"
_LEGACY_V = ".weight_v"


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class HiFTConfig:
    """Hyper-parameters of `HiFTGenerator` + `ConvRNNF0Predictor`. Defaults are CosyVoice 2's real
    values (conf/cosyvoice2.yaml); `from_checkpoint` overrides the ones the tensor shapes reveal."""

    in_channels: int = 80  # mel bins
    base_channels: int = 512  # width after conv_pre; halved by every upsampling stage
    nb_harmonics: int = 8  # overtones above F0 → H = 9 sine components
    sampling_rate: int = 24000  # 22050 selects the original SineGen (CosyVoice 1), else SineGen2
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # additive noise std in voiced samples
    nsf_voiced_threshold: float = 10.0  # F0 (Hz) above which a sample counts as voiced
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_in_channels: int = 80
    f0_cond_channels: int = 512

    def __post_init__(self) -> None:
        # Normalise lists (from yaml) to tuples so configs compare and hash predictably.
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                     "source_resblock_kernel_sizes"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
            setattr(self, name, tuple(tuple(int(d) for d in ds) for ds in getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        n_up = len(self.upsample_rates)
        problems = []
        if n_up == 0 or len(self.upsample_kernel_sizes) != n_up:
            problems.append("upsample_rates and upsample_kernel_sizes must be non-empty and equally long")
        if len(self.source_resblock_kernel_sizes) != n_up or len(self.source_resblock_dilation_sizes) != n_up:
            problems.append("there must be one source resblock kernel/dilation list per upsampling stage")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
            problems.append("resblock_kernel_sizes and resblock_dilation_sizes must be non-empty and equally long")
        if self.base_channels % (2 ** n_up) != 0 or self.base_channels <= 0:
            problems.append(f"base_channels ({self.base_channels}) must be a positive multiple of 2**{n_up}")
        if self.f0_num_class != 1:
            # The F0 head squeezes its last dim; CosyVoice only ever uses one class.
            problems.append(f"f0 predictor num_class must be 1, got {self.f0_num_class}")
        if problems:
            raise UserError("Invalid HiFT configuration: " + "; ".join(problems) + ".")

    @property
    def upsample_scale(self) -> int:
        """Audio samples per mel frame (480 for CosyVoice 2)."""
        return int(np.prod(self.upsample_rates)) * self.istft_hop_len

    # ---- construction from a checkpoint ----

    @classmethod
    def from_yaml_section(cls, section: Mapping[str, Any] | None) -> "HiFTConfig":
        """Config from the `hift:` section of a CosyVoice yaml (already parsed into a dict, e.g. by
        `read_hyperpyyaml_section`). Unknown keys are ignored; missing ones keep the defaults."""
        return cls(**cls._yaml_overrides(section or {}))

    @classmethod
    def _yaml_overrides(cls, section: Mapping[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in section.items():
            if k in names and v is not None and not isinstance(v, dict):
                kw[k] = v
        istft = section.get("istft_params")
        if isinstance(istft, Mapping):
            if "n_fft" in istft:
                kw["istft_n_fft"] = int(istft["n_fft"])
            if "hop_len" in istft:
                kw["istft_hop_len"] = int(istft["hop_len"])
        f0 = section.get("f0_predictor")
        if isinstance(f0, Mapping):
            for src, dst in (("num_class", "f0_num_class"), ("in_channels", "f0_in_channels"),
                             ("cond_channels", "f0_cond_channels")):
                if src in f0:
                    kw[dst] = int(f0[src])
        for k in ("sampling_rate", "in_channels", "base_channels", "nb_harmonics"):
            if k in kw and isinstance(kw[k], str):
                raise UserError(f"HiFT yaml value {k}={kw[k]!r} is not a number; pass a resolved value.")
        return kw

    @classmethod
    def from_checkpoint(cls, state_dict: Mapping[str, torch.Tensor],
                        yaml_section: Mapping[str, Any] | None = None) -> "HiFTConfig":
        """Config for a state dict (either weight-norm naming), optionally with a yaml `hift:` section.

        The shapes fix: in_channels, base_channels, nb_harmonics, the number of upsampling stages
        and their kernel sizes, n_fft, the resblock and source-resblock kernel sizes and the number
        of dilations per resblock, the F0 predictor's widths, and all but the first upsampling rate
        (from the source_downs strides). They cannot tell: sampling_rate, the first upsampling rate,
        the iSTFT hop, the dilation values, nsf_*, lrelu_slope, audio_limit — those come from the
        yaml or the CosyVoice 2 defaults. Where yaml and shapes disagree, the shapes win only if the
        yaml did not set the value; otherwise the later strict load reports the mismatching keys.
        """
        sd = to_parametrization_names(state_dict)
        yaml_kw = cls._yaml_overrides(yaml_section or {})
        kw: dict[str, Any] = {}

        def shape(key: str) -> tuple[int, ...] | None:
            t = sd.get(key)
            return tuple(t.shape) if isinstance(t, torch.Tensor) else None

        def indices(prefix: str) -> list[int]:
            pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
            return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})

        s = shape("conv_pre" + _WN_V)  # [base, in, 7]
        if s and len(s) == 3:
            kw["base_channels"], kw["in_channels"] = s[0], s[1]
        s = shape("m_source.l_linear.weight")  # [1, H]
        if s and len(s) == 2:
            kw["nb_harmonics"] = s[1] - 1
        s = shape("conv_post" + _WN_V)  # [n_fft + 2, ch, 7]
        if s and len(s) == 3:
            kw["istft_n_fft"] = s[0] - 2
        ups = indices("ups")
        if ups and ups == list(range(len(ups))):
            kernels = [shape(f"ups.{i}" + _WN_V) for i in ups]  # [c_in, c_out, k] (transposed conv)
            if all(k and len(k) == 3 for k in kernels):
                kw["upsample_kernel_sizes"] = tuple(k[2] for k in kernels)
                # source_downs.i has kernel 2·u_i (u_i = cumulative downsampling to stage i's
                # rate) except the last, a 1×1 conv. u_i / u_{i+1} = upsample_rates[i+1].
                downs = [shape(f"source_downs.{i}.weight") for i in ups]
                if all(d and len(d) == 3 for d in downs):
                    cum = [d[2] // 2 if j < len(ups) - 1 else 1 for j, d in enumerate(downs)]
                    if all(c > 0 for c in cum) and all(cum[j] % cum[j + 1] == 0 for j in range(len(cum) - 1)):
                        later = [cum[j] // cum[j + 1] for j in range(len(cum) - 1)]
                        default_rates = yaml_kw.get("upsample_rates", cls.upsample_rates)
                        first = default_rates[0] if len(default_rates) == len(ups) else 8
                        kw["upsample_rates"] = (first, *later)
                src_k = [shape(f"source_resblocks.{i}.convs1.0" + _WN_V) for i in ups]
                if all(k and len(k) == 3 for k in src_k):
                    kw["source_resblock_kernel_sizes"] = tuple(k[2] for k in src_k)
                    n_dil = [len(indices(f"source_resblocks.{i}.convs1")) for i in ups]
                    kw["source_resblock_dilation_sizes"] = _dilations_for(
                        n_dil, yaml_kw.get("source_resblock_dilation_sizes", cls.source_resblock_dilation_sizes))
                n_res = len(indices("resblocks"))
                if n_res and n_res % len(ups) == 0:
                    n_k = n_res // len(ups)
                    res_k = [shape(f"resblocks.{j}.convs1.0" + _WN_V) for j in range(n_k)]
                    if all(k and len(k) == 3 for k in res_k):
                        kw["resblock_kernel_sizes"] = tuple(k[2] for k in res_k)
                        n_dil = [len(indices(f"resblocks.{j}.convs1")) for j in range(n_k)]
                        kw["resblock_dilation_sizes"] = _dilations_for(
                            n_dil, yaml_kw.get("resblock_dilation_sizes", cls.resblock_dilation_sizes))
        s = shape("f0_predictor.condnet.0" + _WN_V)  # [cond, in, 3]
        if s and len(s) == 3:
            kw["f0_cond_channels"], kw["f0_in_channels"] = s[0], s[1]
        s = shape("f0_predictor.classifier.weight")  # [num_class, cond]
        if s and len(s) == 2:
            kw["f0_num_class"] = s[0]

        merged = dict(kw)
        merged.update(yaml_kw)  # explicit yaml values win; a contradiction then fails the strict check
        if len(merged.get("upsample_kernel_sizes", ())) != len(merged.get("upsample_rates", cls.upsample_rates)):
            merged.pop("upsample_rates", None)
        return cls(**merged)


def _dilations_for(counts: list[int], preferred) -> tuple[tuple[int, ...], ...]:
    """Dilation lists with the given lengths: the preferred (yaml/default) list where the length
    fits, else 1, 3, 5, 7, … (HiFi-GAN's pattern) — the values do not show in the weights."""
    out = []
    for j, n in enumerate(counts):
        pref = tuple(preferred[j]) if j < len(preferred) else ()
        out.append(pref if len(pref) == n else tuple(2 * i + 1 for i in range(n)))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _wn(module: nn.Module) -> nn.Module:
    """Weight norm as CosyVoice applies it: dim=0 for Conv1d (g: [out,1,1]) *and* ConvTranspose1d
    (g: [in,1,1], since a transposed conv's weight is [in, out, k]); w = g · v / ‖v‖ over the rest."""
    return weight_norm(module, name="weight", dim=0)


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class Snake(nn.Module):
    """Snake activation x + sin²(αx)/α with a per-channel α (linear scale, as in CosyVoice).
    x: [B, C, L] → [B, C, L]."""

    _eps = 1e-9  # keeps 1/α finite for α = 0

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]  # [1, C, 1]
        return x + (1.0 / (a + self._eps)) * torch.sin(x * a).pow(2)


class ResBlock(nn.Module):
    """HiFi-GAN/BigVGAN residual block: per dilation d, x += conv_k(snake(conv_{k,d}(snake(x)))).
    Lengths are preserved ("same" padding). x: [B, C, L] → [B, C, L]."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            _wn(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=_same_padding(kernel_size, d)))
            for d in dilations)
        self.convs2 = nn.ModuleList(
            _wn(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=_same_padding(kernel_size)))
            for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """CosyVoice's `ConvRNNF0Predictor` (no RNN despite the name): five weight-normed k=3 convs,
    each followed by ELU, then a per-frame linear head; |·| makes F0 non-negative.
    mel [B, in, T] → F0 [B, T] in Hz."""

    def __init__(self, in_channels: int, cond_channels: int, num_class: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [_wn(nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # conv at even indices 0..8 (matches the key names)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)  # [B, T, cond]
        return torch.abs(self.classifier(h).squeeze(-1))  # [B, T]


class SourceModule(nn.Module):
    """Harmonic-plus-noise source (`SourceModuleHnNSF`): H sines at k·F0 (k = 1..H), zeroed where
    unvoiced, plus Gaussian noise, merged by Linear(H, 1) + tanh. Only `l_linear` has weights.

    RNG draws, in order (they match CosyVoice, so a seeded run reproduces its source):
      1. rand(B, H)          initial phases (component 0 forced to 0)
      2. randn(B, L, H)      additive noise
      3. randn(B, L, 1)      the "noise branch", which HiFT never uses but still draws.
    """

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.harmonics = cfg.nb_harmonics + 1
        self.sampling_rate = cfg.sampling_rate
        self.upsample_scale = cfg.upsample_scale
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        # CosyVoice picks SineGen2 for every rate except 22050 Hz (its CosyVoice 1 vocoder).
        self.sinegen2 = cfg.sampling_rate != 22050
        self.l_linear = nn.Linear(self.harmonics, 1)

    # f0: [B, L, 1] (Hz, one value per audio sample) → sines [B, L, H] (without amplitude)
    def _sines_v2(self, f0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        B, L, _ = f0.shape
        mult = torch.arange(1, self.harmonics + 1, dtype=torch.float32, device=f0.device).view(1, 1, -1)
        fn = f0 * mult  # [B, L, H] harmonic frequencies
        # Phase increment per sample in cycles; the integer part is irrelevant to the phase.
        rad = (fn / self.sampling_rate) % 1
        rand_ini = torch.rand(B, self.harmonics, device=f0.device, generator=generator)  # draw 1
        rand_ini[:, 0] = 0
        # Added to the first sample only. The linear downsampling below never samples index 0,
        # so this initial phase has no effect on the output — but the draw must still happen.
        rad[:, 0, :] = rad[:, 0, :] + rand_ini
        # Integrate at the frame rate rather than per sample (SineGen2): downsample the increment
        # linearly by upsample_scale (→ [B, H, L/scale]), cumsum, and interpolate the phase back
        # linearly (×scale since each frame-rate step stands for `scale` samples).
        scale = self.upsample_scale
        rad_frames = F.interpolate(rad.transpose(1, 2), scale_factor=1 / scale, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad_frames, dim=1) * 2 * math.pi  # [B, L/scale, H]
        phase = F.interpolate(phase.transpose(1, 2) * scale, scale_factor=scale, mode="linear").transpose(1, 2)
        return torch.sin(phase)  # [B, L, H]

    def _sines_v1(self, f0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # Original SineGen (22050 Hz): per-sample cumulative phase plus a uniform random phase in
        # [-π, π) for each overtone. Not covered by the CosyVoice 2 fixture.
        B, L, _ = f0.shape
        f = f0.transpose(1, 2)  # [B, 1, L]
        f_mat = torch.cat([f * (i + 1) / self.sampling_rate for i in range(self.harmonics)], dim=1)  # [B, H, L]
        theta = 2 * np.pi * (torch.cumsum(f_mat, dim=-1) % 1)
        low = torch.tensor(-np.pi, dtype=torch.float32, device=f0.device)
        high = torch.tensor(np.pi, dtype=torch.float32, device=f0.device)
        u = torch.rand(B, self.harmonics, 1, device=f0.device, generator=generator)
        phase_vec = low + u * (high - low)
        phase_vec[:, 0, :] = 0
        return torch.sin(theta + phase_vec).transpose(1, 2)  # [B, L, H]

    def forward(self, f0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """f0: [B, L, 1] Hz → excitation [B, L, 1]."""
        with torch.no_grad():
            if self.sinegen2:
                sines = self._sines_v2(f0, generator) * self.sine_amp
            else:
                sines = self.sine_amp * self._sines_v1(f0, generator)
            uv = (f0 > self.voiced_threshold).type(torch.float32)  # [B, L, 1]
            # Voiced: small noise (sigma); unvoiced: noise with std alpha/3 replaces the sines.
            noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
            # Draw 2, shaped like CosyVoice's `randn_like(sines)`. Its SineGen2 sines are the
            # transpose of a contiguous [B, H, L] tensor; randn_like keeps that layout, and torch's
            # CPU normal_ uses a different algorithm for non-contiguous memory, so the seeded values
            # only match when drawn into the same [B, H, L]-transposed layout. (The original
            # SineGen's sines are contiguous [B, H, L] before its final transpose.)
            B, L, H = sines.shape
            if self.sinegen2:
                z = torch.empty(B, H, L, dtype=sines.dtype, device=sines.device).transpose(1, 2)
                z.normal_(generator=generator)  # [B, L, H] with the strides of [B, H, L]
            else:
                z = torch.randn(B, H, L, dtype=sines.dtype, device=sines.device,
                                generator=generator).transpose(1, 2)
            noise = noise_amp * z
            sines = sines * uv + noise
        merged = torch.tanh(self.l_linear(sines))  # [B, L, 1]
        # Draw 3: CosyVoice's unused noise branch; kept only so the RNG stream stays in step.
        torch.empty_like(uv).normal_(generator=generator)
        return merged


# --------------------------------------------------------------------------------------------------
# The vocoder
# --------------------------------------------------------------------------------------------------


class HiFTVocoder(nn.Module):
    """CosyVoice's `HiFTGenerator` (NSF + iSTFTNet) with its `ConvRNNF0Predictor` as `f0_predictor`.

    Methods: `f0(mel)`, `source(f0)`, `decode(mel, source)` (deterministic), `inference(mel)`.
    mel is [B, in_channels, T] log-mel frames (CosyVoice layout: channels first).
    """

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        n_up = len(cfg.upsample_rates)
        base = cfg.base_channels
        n_fft = cfg.istft_n_fft
        self.num_kernels = len(cfg.resblock_kernel_sizes)

        # Registration order follows CosyVoice so that state_dict() lists keys in the same order.
        self.m_source = SourceModule(cfg)
        self.conv_pre = _wn(nn.Conv1d(cfg.in_channels, base, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            _wn(nn.ConvTranspose1d(base // 2 ** i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))

        # The source STFT (n_fft+2 channels at hop rate) is brought down to each stage's rate.
        # Stage i runs at hop rate / cum[i], where cum = reversed cumprod of [1, r_n, …, r_2].
        cum = np.cumprod([1, *cfg.upsample_rates[::-1][:-1]])[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            ch = base // 2 ** (i + 1)
            u = int(u)
            if u == 1:
                self.source_downs.append(nn.Conv1d(n_fft + 2, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))

        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(n_up)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = _wn(nn.Conv1d(base // 2 ** n_up, n_fft + 2, 7, 1, padding=3))
        self.f0_predictor = F0Predictor(cfg.f0_in_channels, cfg.f0_cond_channels, cfg.f0_num_class)
        # Periodic Hann window, computed in float64 the way scipy's get_window("hann", N,
        # fftbins=True) does, then rounded to float32 (a plain float32 torch.hann_window can differ
        # in the last bit). Not part of the checkpoint.
        M = n_fft + 1
        win = 0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, M))[:n_fft]
        self.register_buffer("stft_window", torch.from_numpy(win.astype(np.float32)), persistent=False)

    # ---- pieces ----

    @property
    def upsample_scale(self) -> int:
        return self.cfg.upsample_scale

    def f0(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, in, T] → F0 [B, T] in Hz (deterministic)."""
        return self.f0_predictor(mel)

    def source(self, f0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """F0 [B, T] (Hz per frame) → excitation [B, 1, T·scale]. Random (see `SourceModule`);
        pass a `torch.Generator` to leave the global RNG alone."""
        # Nearest-neighbour upsampling to the audio rate: each frame's F0 repeated `scale` times.
        f0_up = torch.repeat_interleave(f0[:, None, :], self.upsample_scale, dim=2)  # [B, 1, L]
        return self.m_source(f0_up.transpose(1, 2), generator).transpose(1, 2)  # [B, 1, L]

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L] → [B, n_fft+2, L/hop + 1]: real parts of the n_fft/2+1 bins, then imaginary."""
        n_fft, hop = self.cfg.istft_n_fft, self.cfg.istft_hop_len
        spec = torch.view_as_real(torch.stft(x, n_fft, hop, n_fft, window=self.stft_window, return_complex=True))
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """[B, n_fft/2+1, F] each → waveform [B, (F-1)·hop]."""
        n_fft, hop = self.cfg.istft_n_fft, self.cfg.istft_hop_len
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, n_fft, hop, n_fft, window=self.stft_window)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel [B, in, T] + excitation [B, 1, T·scale] → waveform [B, T·scale], in ±audio_limit.
        Deterministic."""
        cfg = self.cfg
        s = self._stft(source.squeeze(1))  # [B, n_fft+2, T·scale/hop + 1]
        x = self.conv_pre(mel)  # [B, base, T]
        n_up = len(self.ups)
        for i in range(n_up):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x = self.ups[i](x)  # [B, base/2^(i+1), T·r_0·…·r_i]
            if i == n_up - 1:
                # One extra frame on the left: the source STFT (center=True) has L/hop + 1 frames.
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s))
            # Multi-receptive-field fusion: mean of the stage's resblocks, summed in order.
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = F.leaky_relu(x)  # note: torch's default slope 0.01 here, as in CosyVoice
        x = self.conv_post(x)  # [B, n_fft+2, L/hop + 1]
        half = cfg.istft_n_fft // 2 + 1
        magnitude = torch.exp(x[:, :half, :])
        phase = torch.sin(x[:, half:, :])
        wav = self._istft(magnitude, phase)
        return torch.clamp(wav, -cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def inference(self, mel: torch.Tensor, generator: torch.Generator | None = None,
                  cache_source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, in, T] → (waveform [B, T·scale], excitation [B, 1, T·scale]).

        `cache_source` ([B, 1, C], C ≤ T·scale): the tail of the previous chunk's excitation in
        CosyVoice's streaming; it overwrites the first C samples of the new excitation so the
        sine phase continues across chunk boundaries. The RNG draws happen regardless.
        """
        f0 = self.f0(mel)
        s = self.source(f0, generator)
        if cache_source is not None and cache_source.shape[2] != 0:
            if cache_source.shape[2] > s.shape[2]:
                raise ValueError(f"cache_source has {cache_source.shape[2]} samples but the chunk only "
                                 f"{s.shape[2]}")
            s[:, :, :cache_source.shape[2]] = cache_source
        return self.decode(mel, s), s

    def fold_weight_norm(self) -> "HiFTVocoder":
        """Replace every weight-norm parametrization by its computed weight (inference speed-up;
        numerically identical). Afterwards state_dict() uses plain `.weight` keys."""
        for m in self.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        return self


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def to_parametrization_names(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Rename legacy `X.weight_g`/`X.weight_v` to `X.parametrizations.weight.original0/1` and drop
    a `generator.` prefix (CosyVoice strips it too, for HiFi-GAN training checkpoints)."""
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if k.startswith("generator."):
            k = k[len("generator."):]
        if k.endswith(_LEGACY_G):
            k = k[: -len(_LEGACY_G)] + _WN_G
        elif k.endswith(_LEGACY_V):
            k = k[: -len(_LEGACY_V)] + _WN_V
        out[k] = v
    return out


def export_state_dict(model: HiFTVocoder, naming: str = "parametrizations") -> dict[str, torch.Tensor]:
    """The model's state dict in one of the two on-disk namings CosyVoice checkpoints use:
    "parametrizations" (torch ≥ 2.1, `….parametrizations.weight.original0/1`) or "legacy"
    (`….weight_g` / `….weight_v`). The model must still have its weight-norm parametrizations."""
    if naming not in ("parametrizations", "legacy"):
        raise ValueError(f"naming must be 'parametrizations' or 'legacy', not {naming!r}")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not any(k.endswith(_WN_G) for k in sd):
        raise ValueError("the model's weight norm was folded; export before fold_weight_norm()")
    if naming == "parametrizations":
        return sd
    out = {}
    for k, v in sd.items():
        if k.endswith(_WN_G):
            k = k[: -len(_WN_G)] + _LEGACY_G
        elif k.endswith(_WN_V):
            k = k[: -len(_WN_V)] + _LEGACY_V
        out[k] = v
    return out


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    obj = load_foreign_checkpoint(path, "pass the hift.pt of a CosyVoice 2 model directory (a torch.save'd state_dict)")
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path} is not a HiFT state_dict (expected a mapping of parameter names to tensors); "
                        f"pass CosyVoice's hift.pt.")
    return dict(obj)


def load_hift(path: Path | str, yaml_path: Path | str | None = None, device: str | torch.device = "cpu",
              config: HiFTConfig | None = None) -> HiFTVocoder:
    """Load a CosyVoice `hift.pt` (either weight-norm naming) into a `HiFTVocoder` in eval mode.

    The architecture comes from `config` if given, else from the checkpoint's shapes plus the
    `hift:` section of `yaml_path` (a CosyVoice HyperPyYAML file) where given. Keys and shapes are
    checked strictly; any mismatch or an unreadable file raises `UserError`.
    """
    path = Path(path)
    sd = to_parametrization_names(_read_checkpoint(path))
    if config is None:
        section = read_hyperpyyaml_section(Path(yaml_path), "hift") if yaml_path is not None else None
        config = HiFTConfig.from_checkpoint(sd, section)
    model = HiFTVocoder(config)
    problems = state_dict_problems(model.state_dict(), sd)
    if problems:
        raise UserError(f"{path} does not match the HiFT architecture ({problems}); pass the "
                        f"hift.pt that belongs to this model, and its cosyvoice2.yaml if the sizes are non-standard.")
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()


def read_hyperpyyaml_section(path: Path, section: str) -> dict[str, Any]:
    """The `section:` mapping of a CosyVoice HyperPyYAML file as plain data (`!new:` objects become their
    argument mappings, `!ref <key>` resolved)."""
    from mamtra_cli.hyperpyyaml import read_section

    return read_section(path, section)

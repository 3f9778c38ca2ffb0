"""The mini speech codec: 25 Hz discrete tokens from speaker-normalised log-mel, and back to audio.

Two tokenizers share the features and the vocoder (`quantizer` in codec.yaml):
  fsq     a learned conv encoder/decoder with finite scalar quantisation, 3 levels × 8 dims = 6561 codes
          (CosyVoice 2's vocabulary shape; `mamtra_cli.mini.fsq`). Decoding: tokens → normalised mel →
          de-normalised with the reference speaker's mel statistics → pseudo-inverse of the mel filterbank →
          Griffin-Lim. The default of `mamtra build-mini`: it keeps far more of the words.
  kmeans  the first mini codec, described below (codec.yaml files without `quantizer` are k-means).

k-means encoding (16 kHz audio):
    STFT (n_fft 1024, hop 320 → 50 frames/s) → log-mel (80 bins) → per-utterance normalisation
    (mean/std per bin, measured on the active frames) → pairs of frames (160-d) → nearest of K k-means
    centroids = one token per 40 ms (25 Hz), as CosyVoice 2's speech tokens.
Decoding:
    tokens → centroids (2 normalised mel frames each) → `CodecDecoder` (a small dilated conv net) →
    normalised log-magnitude spectrogram (513 bins) → de-normalised with the REFERENCE speaker's mean/std
    per bin (this is what carries the voice) → Griffin-Lim (fast GL with momentum) → audio.

Normalising per utterance takes most of the speaker out of the tokens (they say *what* is spoken), and the
reference statistics put a speaker back in (*who* speaks): the split CosyVoice 2 makes between its LM and
its flow, here at toy size. Files: `codec.yaml` (the settings) and `codec.safetensors` (centroids and
decoder weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mamtra_cli.errors import UserError

CODEC_CONFIG = "codec.yaml"
CODEC_WEIGHTS = "codec.safetensors"


@dataclass
class CodecConfig:
    sample_rate: int = 16000
    n_fft: int = 1024  # 64 ms window: 513 linear bins
    hop_length: int = 320  # 20 ms → 50 mel frames/s
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    frames_per_token: int = 2  # 50 Hz mel → 25 Hz tokens
    codebook_size: int = 512
    decoder_channels: int = 192
    decoder_dilations: tuple = (1, 2, 4, 8, 1)
    decoder_kernel: int = 5
    log_floor: float = 1e-4  # magnitudes are clamped here before the log (espeak writes digital silence)
    active_db: float = 50.0  # frames within this many dB of the loudest count for the speaker statistics
    griffin_lim_iters: int = 48
    griffin_lim_momentum: float = 0.99
    magnitude_power: float = 1.3  # sharpen the predicted magnitudes before Griffin-Lim (less buzz)
    quantizer: str = "kmeans"  # or "fsq" (codebook_size is then fsq_levels ** fsq_dims)
    fsq_levels: int = 3
    fsq_dims: int = 8
    fsq_channels: int = 192

    @property
    def token_rate(self) -> float:
        return self.sample_rate / self.hop_length / self.frames_per_token

    @property
    def n_lin(self) -> int:
        return self.n_fft // 2 + 1

    def save(self, path: Path) -> None:
        import yaml

        d = asdict(self)
        d["decoder_dilations"] = list(self.decoder_dilations)
        d["token_rate_hz"] = self.token_rate
        Path(path).write_text(yaml.safe_dump(d, sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "CodecConfig":
        import yaml

        d = yaml.safe_load(Path(path).read_text())
        d.pop("token_rate_hz", None)
        d["decoder_dilations"] = tuple(d["decoder_dilations"])
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)}; the codec was written by a newer "
                            "MamTra (upgrade) or the file was edited.")
        cfg = cls(**d)
        if cfg.quantizer not in ("kmeans", "fsq"):
            raise UserError(f"{path}: quantizer must be kmeans or fsq, not {cfg.quantizer!r}.")
        if cfg.quantizer == "fsq" and cfg.codebook_size != cfg.fsq_levels ** cfg.fsq_dims:
            raise UserError(f"{path}: codebook_size {cfg.codebook_size} is not fsq_levels ** fsq_dims = "
                            f"{cfg.fsq_levels ** cfg.fsq_dims}; the file was edited or is damaged.")
        return cfg


@dataclass
class SpeakerStats:
    """Per-bin mean/std of one recording's log-mel (80) and log-magnitude (513) over its active frames."""

    mel_mean: torch.Tensor
    mel_std: torch.Tensor
    lin_mean: torch.Tensor
    lin_std: torch.Tensor


def mel_filterbank(cfg: CodecConfig) -> torch.Tensor:
    """(n_mels, n_lin) triangular filters on the HTK mel scale, each normalised to unit area (Slaney)."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_lin)
    edges = mel_to_hz(np.linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max), cfg.n_mels + 2))
    fb = np.zeros((cfg.n_mels, cfg.n_lin))
    for m in range(cfg.n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        fb[m] = np.maximum(0, np.minimum(up, down)) * 2.0 / (hi - lo)
    return torch.tensor(fb, dtype=torch.float32)


class CodecDecoder(nn.Module):
    """Normalised mel frames (B, T, n_mels) from the centroids → normalised log-magnitude (B, T, n_lin).

    A stack of residual dilated 1-D convolutions (receptive field ~±40 frames with the default dilations):
    enough context to undo the coarse quantisation of 512 codes and to predict the fine linear bins."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        c, k = cfg.decoder_channels, cfg.decoder_kernel
        self.inp = nn.Conv1d(cfg.n_mels, c, k, padding=k // 2)
        self.blocks = nn.ModuleList()
        for d in cfg.decoder_dilations:
            self.blocks.append(nn.Sequential(nn.GELU(), nn.Conv1d(c, c, k, padding=d * (k // 2), dilation=d),
                                             nn.GELU(), nn.Conv1d(c, c, 1)))
        self.out = nn.Conv1d(c, cfg.n_lin, 1)

    def forward(self, mel_norm: torch.Tensor) -> torch.Tensor:
        h = self.inp(mel_norm.transpose(1, 2))
        for block in self.blocks:
            h = h + block(h)
        return self.out(F.gelu(h)).transpose(1, 2)


def fit_kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, log=lambda msg: None) -> torch.Tensor:
    """Lloyd's k-means on (N, D) float32 rows; init from k distinct random rows; an empty cluster is
    re-seeded with the row farthest from its centroid. Returns (k, D) centroids."""
    if x.shape[0] < k:
        raise UserError(f"k-means needs at least {k} frames pairs, the corpus has {x.shape[0]}; "
                        "render more sentences or pick a smaller codebook.")
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    x_sq = (x * x).sum(1, keepdim=True)
    for it in range(iters):
        assign, dist = nearest(x, centroids, x_sq)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = (counts == 0).nonzero().flatten()
        centroids = sums / counts.clamp(min=1)[:, None]
        if empty.numel():
            far = dist.topk(empty.numel()).indices
            centroids[empty] = x[far]
        if it % 5 == 0 or it == iters - 1:
            log(f"k-means iter {it + 1}/{iters}: mean sq. distance {dist.mean():.4f}, empty {empty.numel()}")
    return centroids


def nearest(x: torch.Tensor, centroids: torch.Tensor, x_sq: torch.Tensor | None = None, block: int = 65536):
    """Index of the nearest centroid of each row of x (N, D) and its squared distance."""
    c_sq = (centroids * centroids).sum(1)
    idx, dist = [], []
    for s in range(0, x.shape[0], block):
        xb = x[s:s + block]
        xs = (xb * xb).sum(1, keepdim=True) if x_sq is None else x_sq[s:s + block]
        d = xs - 2 * xb @ centroids.T + c_sq[None]
        m = d.min(1)
        idx.append(m.indices)
        dist.append(m.values.clamp(min=0))
    return torch.cat(idx), torch.cat(dist)


class MiniCodec:
    """Feature extraction, tokens and token-to-audio of the mini voice. Build with `MiniCodec.load(dir)`
    (a trained codec) or `MiniCodec(cfg)` (untrained, for fitting)."""

    def __init__(self, cfg: CodecConfig, centroids: torch.Tensor | None = None,
                 decoder: CodecDecoder | None = None, tokenizer=None):
        self.cfg = cfg
        self.mel_fb = mel_filterbank(cfg)
        self.window = torch.hann_window(cfg.n_fft)
        self.centroids = centroids  # k-means: (K, frames_per_token · n_mels)
        self.decoder = decoder  # k-means: centroid mel → normalised log-magnitude
        self.tokenizer = tokenizer  # fsq: an `FSQTokenizer`
        self._mel_pinv = None  # (n_lin, n_mels), built on first use

    @staticmethod
    def new_tokenizer(cfg: CodecConfig):
        from mamtra_cli.mini.fsq import FSQTokenizer

        return FSQTokenizer(cfg.n_mels, cfg.fsq_channels, cfg.fsq_dims, cfg.fsq_levels)

    @property
    def is_fsq(self) -> bool:
        return self.cfg.quantizer == "fsq"

    def fingerprint(self) -> str:
        """sha256 of what maps audio to tokens (centroids or the FSQ weights): manifests record it so that
        tokens of different tokenizers are never mixed."""
        import hashlib

        h = hashlib.sha256()
        if self.is_fsq:
            for name, t in sorted(self.tokenizer.state_dict().items()):
                h.update(name.encode())
                h.update(t.contiguous().numpy().tobytes())
        else:
            h.update(self.centroids.contiguous().numpy().tobytes())
        return h.hexdigest()

    def tokenizer_name(self) -> str:
        return f"mini-codec-{self.cfg.quantizer}{self.cfg.codebook_size}"

    def _check_tokens(self, tokens) -> torch.Tensor:
        t = torch.as_tensor(list(tokens) if not torch.is_tensor(tokens) else tokens, dtype=torch.long)
        if t.numel() and (t.min() < 0 or t.max() >= self.cfg.codebook_size):
            raise UserError(f"Speech token out of the codec's range [0, {self.cfg.codebook_size}); "
                            "the tokens come from another speech tokenizer.")
        return t

    # ------------------------------------------------------------------ features
    def _as_tensor(self, wav, sr: int) -> torch.Tensor:
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim > 1:
            wav = wav.mean(1)
        if sr != self.cfg.sample_rate:
            import soxr

            wav = soxr.resample(wav, sr, self.cfg.sample_rate).astype(np.float32)
        if wav.size < self.cfg.n_fft:
            raise UserError(f"The audio is too short ({wav.size / self.cfg.sample_rate:.3f} s) to encode.")
        return torch.from_numpy(np.ascontiguousarray(wav))

    def magnitude(self, wav: torch.Tensor) -> torch.Tensor:
        """(N,) audio → (T, n_lin) STFT magnitude, T = N // hop + 1."""
        spec = torch.stft(wav, self.cfg.n_fft, self.cfg.hop_length, window=self.window, center=True,
                          return_complex=True)
        return spec.abs().T

    def features(self, wav, sr: int) -> tuple[torch.Tensor, torch.Tensor, SpeakerStats]:
        """→ (normalised log-mel (T, n_mels), normalised log-magnitude (T, n_lin), the recording's stats)."""
        mag = self.magnitude(self._as_tensor(wav, sr))
        log_lin = mag.clamp(min=self.cfg.log_floor).log()
        log_mel = (mag @ self.mel_fb.T).clamp(min=self.cfg.log_floor).log()
        energy_db = 10 * torch.log10((mag ** 2).sum(1) + 1e-10)
        active = energy_db > energy_db.max() - self.cfg.active_db
        stats = SpeakerStats(log_mel[active].mean(0), log_mel[active].std(0).clamp(min=1e-2),
                             log_lin[active].mean(0), log_lin[active].std(0).clamp(min=1e-2))
        return ((log_mel - stats.mel_mean) / stats.mel_std, (log_lin - stats.lin_mean) / stats.lin_std, stats)

    def speaker_stats(self, wav, sr: int) -> SpeakerStats:
        return self.features(wav, sr)[2]

    def frame_pairs(self, mel_norm: torch.Tensor) -> torch.Tensor:
        """(T, n_mels) → (ceil(T / f), f · n_mels): consecutive frames side by side (the last one repeated)."""
        f = self.cfg.frames_per_token
        pad = (-mel_norm.shape[0]) % f
        if pad:
            mel_norm = torch.cat([mel_norm, mel_norm[-1:].expand(pad, -1)])
        return mel_norm.reshape(-1, f * mel_norm.shape[1])

    # ------------------------------------------------------------------ tokens
    @torch.inference_mode()
    def tokens_from_features(self, mel_norm: torch.Tensor) -> list[int]:
        """(T, n_mels) normalised mel → ceil(T / 2) tokens."""
        if self.is_fsq:
            from mamtra_cli.mini.fsq import pad_even

            if self.tokenizer is None:
                raise RuntimeError("This codec has no FSQ tokenizer yet (train it or load a trained one).")
            return self.tokenizer.encode(pad_even(mel_norm)[None])[0].tolist()
        if self.centroids is None:
            raise RuntimeError("This codec has no codebook yet (fit it or load a trained one).")
        return nearest(self.frame_pairs(mel_norm), self.centroids)[0].tolist()

    def encode(self, wav, sr: int) -> list[int]:
        """Audio → 25 Hz tokens in [0, codebook_size)."""
        return self.tokens_from_features(self.features(wav, sr)[0])

    def centroid_frames(self, tokens) -> torch.Tensor:
        """(N,) tokens → (N · f, n_mels) normalised mel frames of their centroids (k-means codecs)."""
        return self.centroids[self._check_tokens(tokens)].reshape(-1, self.cfg.n_mels)

    @torch.inference_mode()
    def decode_spectrogram(self, tokens, ref: SpeakerStats) -> torch.Tensor:
        """Tokens → (N · f, n_lin) magnitude spectrogram in the reference speaker's statistics."""
        if self.is_fsq:
            mel_norm = self.tokenizer.decode(self._check_tokens(tokens)[None])[0]  # (2N, n_mels)
            if self._mel_pinv is None:
                self._mel_pinv = torch.linalg.pinv(self.mel_fb)
            mel = (mel_norm * ref.mel_std + ref.mel_mean).exp()
            return (mel @ self._mel_pinv.T).clamp(min=1e-5)
        norm = self.decoder(self.centroid_frames(tokens)[None])[0]
        return (norm * ref.lin_std + ref.lin_mean).exp()

    @torch.inference_mode()
    def decode(self, tokens, ref: SpeakerStats, seed: int = 0) -> np.ndarray:
        """Tokens → float32 audio at sample_rate, in the voice whose statistics `ref` holds."""
        if len(tokens) == 0:
            return np.zeros(0, dtype=np.float32)
        mag = self.decode_spectrogram(tokens, ref)
        return self.vocode(mag, seed)

    def vocode(self, mag: torch.Tensor, seed: int = 0) -> np.ndarray:
        """(T, n_lin) magnitude → audio by fast Griffin-Lim (Perraudin et al. 2013, momentum α)."""
        cfg = self.cfg
        spec_mag = mag.T.pow(cfg.magnitude_power)  # (n_lin, T)
        spec_mag = spec_mag * (mag.T.sum() / spec_mag.sum().clamp(min=1e-8))  # keep the overall level
        length = (mag.shape[0] - 1) * cfg.hop_length
        g = torch.Generator().manual_seed(seed)
        angles = torch.exp(2j * math.pi * torch.rand(spec_mag.shape, generator=g))
        prev = torch.zeros_like(angles)
        wav = None
        for _ in range(cfg.griffin_lim_iters):
            wav = torch.istft(spec_mag * angles, cfg.n_fft, cfg.hop_length, window=self.window, length=length)
            rebuilt = torch.stft(wav, cfg.n_fft, cfg.hop_length, window=self.window, return_complex=True)
            accel = rebuilt - cfg.griffin_lim_momentum * prev
            angles = accel / accel.abs().clamp(min=1e-8)
            prev = rebuilt
        wav = torch.istft(spec_mag * angles, cfg.n_fft, cfg.hop_length, window=self.window, length=length)
        peak = wav.abs().max()
        if peak > 0.99:
            wav = wav * (0.99 / peak)
        return wav.numpy().astype(np.float32)

    # ------------------------------------------------------------------ files
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        self.cfg.save(directory / CODEC_CONFIG)
        if self.is_fsq:
            tensors = {f"tokenizer.{k}": v.contiguous() for k, v in self.tokenizer.state_dict().items()}
        else:
            tensors = {"centroids": self.centroids.contiguous()}
            tensors.update({f"decoder.{k}": v.contiguous() for k, v in self.decoder.state_dict().items()})
        save_file(tensors, str(directory / CODEC_WEIGHTS))

    @classmethod
    def load(cls, directory: Path) -> "MiniCodec":
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CODEC_CONFIG, CODEC_WEIGHTS):
            if not (directory / name).is_file():
                raise UserError(f"{directory} has no {name}; rebuild the mini voice with `mamtra build-mini`.")
        cfg = CodecConfig.load(directory / CODEC_CONFIG)
        state = load_file(str(directory / CODEC_WEIGHTS))
        if cfg.quantizer == "fsq":
            tokenizer = cls.new_tokenizer(cfg)
            tokenizer.load_state_dict({k[len("tokenizer."):]: v for k, v in state.items()
                                       if k.startswith("tokenizer.")})
            return cls(cfg, tokenizer=tokenizer.eval())
        decoder = CodecDecoder(cfg)
        decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
        return cls(cfg, state["centroids"], decoder.eval())


def train_decoder(codec: MiniCodec, mel_norm: list[torch.Tensor], lin_norm: list[torch.Tensor], steps: int,
                  batch_size: int = 16, crop_tokens: int = 64, lr: float = 2e-3, seed: int = 0,
                  log=lambda msg: None) -> CodecDecoder:
    """Fit the decoder: centroid frames of each utterance's tokens → its normalised log-magnitude (L1).

    mel_norm / lin_norm: per utterance (T, n_mels) / (T, n_lin). Random crops of `crop_tokens` tokens."""
    cfg = codec.cfg
    f = cfg.frames_per_token
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    inputs, targets = [], []
    for m, lin in zip(mel_norm, lin_norm):
        tok = codec.tokens_from_features(m)
        frames = codec.centroid_frames(tok)  # (ceil(T/f)·f, n_mels)
        pad = frames.shape[0] - lin.shape[0]
        lin = torch.cat([lin, lin[-1:].expand(pad, -1)]) if pad else lin
        inputs.append(frames)
        targets.append(lin)
    decoder = CodecDecoder(cfg)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    # OneCycleLR needs at least two steps in each phase (a toy run has only a few dozen steps).
    steps = max(steps, 4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=min(0.5, max(0.05, 2.5 / steps)))
    crop = crop_tokens * f
    running = None
    for step in range(steps):
        xb, yb, mb = [], [], []
        for i in torch.randint(len(inputs), (batch_size,), generator=g).tolist():
            x, y = inputs[i], targets[i]
            if x.shape[0] > crop:
                s = int(torch.randint(0, (x.shape[0] - crop) // f + 1, (1,), generator=g)) * f
                x, y = x[s:s + crop], y[s:s + crop]
            else:
                n = x.shape[0]
                x, y = F.pad(x, (0, 0, 0, crop - n)), F.pad(y, (0, 0, 0, crop - n))
            mb.append(torch.arange(crop) < min(crop, inputs[i].shape[0]))
            xb.append(x)
            yb.append(y)
        pred = decoder(torch.stack(xb))
        mask = torch.stack(mb)[..., None]  # (B, crop, 1): no loss on the zero padding of short utterances
        loss = ((pred - torch.stack(yb)).abs() * mask).sum() / (mask.sum() * pred.shape[-1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"codec decoder step {step + 1}/{steps}: L1 {running:.4f}")
    return decoder.eval()

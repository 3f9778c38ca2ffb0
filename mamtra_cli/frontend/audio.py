"""Audio loading and the three feature extractors CosyVoice 2's front end needs.

- `load_audio(path, target_sr)`: float32 mono at `target_sr` (soundfile + soxr; stereo is averaged).
- `whisper_log_mel(wav16k)`: Whisper's 128-bin log-mel at 100 frames/s, the speech tokenizer's input.
- `prompt_mel_24k(wav24k)`: the 80-bin, 50 frames/s log-mel the flow model is conditioned on
  (Matcha-TTS' `mel_spectrogram` with CosyVoice 2's settings).
- `kaldi_fbank(wav16k)`: Kaldi-compatible 80-bin log fbank (kaldi-native-fbank), mean-normalised over
  time, the campplus speaker model's input.

The mel filterbanks are computed here (Slaney mel scale and Slaney area normalisation, i.e. librosa's
`filters.mel` with htk=False, norm="slaney"); librosa is not a dependency.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np

from mamtra_cli.errors import UserError

AudioSource = Union[str, Path, bytes, io.IOBase]

INSTALL_HINT = "pip install 'mamtra[cosyvoice]'"

# Whisper (openai/whisper audio.py) constants.
WHISPER_SR = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160

# CosyVoice 2 prompt mel (cosyvoice2.yaml feat_extractor -> matcha.utils.audio.mel_spectrogram).
PROMPT_SR = 24000
PROMPT_N_FFT = 1920
PROMPT_HOP = 480
PROMPT_WIN = 1920
PROMPT_N_MELS = 80
PROMPT_FMIN = 0.0
PROMPT_FMAX = 8000.0


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

def _describe(source: AudioSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, Path)):
        return str(source)
    return "<in-memory audio>"


def load_audio(source: AudioSource, target_sr: int, name: str | None = None) -> np.ndarray:
    """Read an audio file (a path, raw bytes of a file, or a binary file object) as float32 mono at
    `target_sr`. Multi-channel audio is averaged to mono; other sample rates are resampled with soxr
    (its default "HQ" quality). An unreadable or corrupt file raises `UserError` naming it."""
    import soundfile as sf

    what = _describe(source, name)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise UserError(f"Audio file {what} does not exist; check the path.")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError for bad input
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Cannot read audio file {what} ({msg}); it is corrupt or not a supported format.") \
            from None
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if sr != target_sr and wav.size > 0:
        import soxr

        wav = soxr.resample(wav, sr, target_sr).astype(np.float32, copy=False)
    return wav


# ----------------------------------------------------------------------------------------------------
# Mel filterbank (Slaney scale, Slaney normalisation) — librosa.filters.mel(htk=False, norm="slaney")
# ----------------------------------------------------------------------------------------------------

_F_SP = 200.0 / 3.0          # Hz per mel below the break
_BREAK_HZ = 1000.0           # linear below, logarithmic above
_BREAK_MEL = _BREAK_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    lin = hz / _F_SP
    with np.errstate(divide="ignore"):
        log = _BREAK_MEL + np.log(np.maximum(hz, 1e-300) / _BREAK_HZ) / _LOGSTEP
    return np.where(hz >= _BREAK_HZ, log, lin)


def mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    lin = _F_SP * mel
    log = _BREAK_HZ * np.exp(_LOGSTEP * (mel - _BREAK_MEL))
    return np.where(mel >= _BREAK_MEL, log, lin)


@lru_cache(maxsize=16)
def slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                       fmax: float | None = None) -> np.ndarray:
    """[n_mels, n_fft//2 + 1] float64 triangular filters, area-normalised (Slaney)."""
    if fmax is None:
        fmax = sr / 2.0
    bins = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    edges_mel = np.linspace(hz_to_mel_slaney(np.array(fmin)), hz_to_mel_slaney(np.array(fmax)), n_mels + 2)
    edges = mel_to_hz_slaney(edges_mel)
    widths = np.diff(edges)
    fb = np.zeros((n_mels, bins.size), dtype=np.float64)
    for m in range(n_mels):
        rise = (bins - edges[m]) / widths[m]
        fall = (edges[m + 2] - bins) / widths[m + 1]
        fb[m] = np.maximum(0.0, np.minimum(rise, fall))
    fb *= (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[:, None]
    fb.setflags(write=False)
    return fb


def _as_tensor(wav):
    import torch

    if isinstance(wav, torch.Tensor):
        t = wav.detach().to(torch.float32)
    else:
        t = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"expected a 1-D mono waveform, got shape {tuple(t.shape)}")
    return t


@lru_cache(maxsize=8)
def _filters_tensor(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None):
    import torch

    return torch.from_numpy(slaney_mel_filters(sr, n_fft, n_mels, fmin, fmax).astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# Whisper log-mel (speech tokenizer input)
# ----------------------------------------------------------------------------------------------------

def whisper_log_mel(wav16k, n_mels: int = 128):
    """Whisper's log-mel spectrogram of 16 kHz audio: Tensor [n_mels, frames], frames = samples // 160.

    Periodic Hann window of 400, hop 160, centred frames with reflect padding, power spectrum with the
    last frame dropped, Slaney mel filters (fmax 8 kHz), log10 floored at 1e-10, dynamic range limited
    to 8 (log10 units) below the maximum, then (x + 4) / 4.
    """
    import torch

    x = _as_tensor(wav16k)
    if x.numel() <= WHISPER_N_FFT // 2:
        raise ValueError(f"audio too short for a Whisper mel ({x.numel()} samples; need > {WHISPER_N_FFT // 2})")
    window = torch.hann_window(WHISPER_N_FFT)
    spec = torch.stft(x, WHISPER_N_FFT, WHISPER_HOP, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = _filters_tensor(WHISPER_SR, WHISPER_N_FFT, n_mels, 0.0, None) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# ----------------------------------------------------------------------------------------------------
# CosyVoice 2 prompt mel (flow conditioning), Matcha-TTS style
# ----------------------------------------------------------------------------------------------------

def prompt_mel_24k(wav24k):
    """CosyVoice 2's 80-bin prompt mel of 24 kHz audio: Tensor [frames, 80], frames = samples // 480.

    Reflect-pad (n_fft - hop) / 2 = 720 samples each side, STFT without centring (n_fft = win = 1920,
    hop 480, periodic Hann), magnitude sqrt(re² + im² + 1e-9), Slaney mel filters 0–8 kHz, natural log
    floored at 1e-5.
    """
    import torch
    import torch.nn.functional as F

    x = _as_tensor(wav24k)
    pad = (PROMPT_N_FFT - PROMPT_HOP) // 2
    if x.numel() <= pad:
        raise ValueError(f"audio too short for a prompt mel ({x.numel()} samples; need > {pad})")
    x = F.pad(x[None, None], (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(x, PROMPT_N_FFT, PROMPT_HOP, win_length=PROMPT_WIN, window=torch.hann_window(PROMPT_WIN),
                      center=False, normalized=False, onesided=True, return_complex=True)
    mag = torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    mel = _filters_tensor(PROMPT_SR, PROMPT_N_FFT, PROMPT_N_MELS, PROMPT_FMIN, PROMPT_FMAX) @ mag
    return torch.log(torch.clamp(mel, min=1e-5)).transpose(0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------
# Kaldi fbank (campplus input)
# ----------------------------------------------------------------------------------------------------

def kaldi_fbank(wav16k, num_mel_bins: int = 80, mean_norm: bool = True) -> np.ndarray:
    """Kaldi-compatible log-mel filterbank of 16 kHz audio, float32 [frames, num_mel_bins].

    The settings of `torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80, dither=0,
    sample_frequency=16000)` as CosyVoice calls it: 25 ms povey window, 10 ms shift, pre-emphasis 0.97,
    DC removal, FFT rounded up to 512, mel bins 20 Hz–Nyquist, power spectrum, log, snip_edges.
    CosyVoice feeds the float waveform in [-1, 1] (as torchaudio.load returns it), not int16-scaled
    samples, and so does this. With `mean_norm` the per-bin mean over time is subtracted, as CosyVoice
    does before campplus.
    """
    try:
        import kaldi_native_fbank as knf
    except ImportError:
        raise UserError(f"The Kaldi fbank needs the kaldi-native-fbank package; install it with "
                        f"`{INSTALL_HINT}`.") from None
    x = np.ascontiguousarray(np.asarray(wav16k, dtype=np.float32).reshape(-1))
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.round_to_power_of_two = True
    opts.mel_opts.num_bins = num_mel_bins
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, x)
    fb.input_finished()
    n = fb.num_frames_ready
    if n == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    feats = np.stack([np.asarray(fb.get_frame(i), dtype=np.float32) for i in range(n)])
    if mean_norm:
        feats = feats - feats.mean(axis=0, keepdims=True)
    return feats.astype(np.float32, copy=False)

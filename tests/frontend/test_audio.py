"""Audio loading and features, each checked against an independent float64 numpy computation."""

import numpy as np
import pytest
import soundfile as sf

from mamtra_cli.errors import UserError
from mamtra_cli.frontend.audio import (kaldi_fbank, load_audio, prompt_mel_24k, slaney_mel_filters,
                                       whisper_log_mel)


def _signal(n, sr, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = 0.4 * np.sin(2 * np.pi * 330 * t) + 0.2 * np.sin(2 * np.pi * 1870 * t) + 0.05 * rng.standard_normal(n)
    return x.astype(np.float32)


# ---- a second, separately written Slaney mel filterbank ----------------------------------------------

def _ref_mel(f):
    f = float(f)
    return 3.0 * f / 200.0 if f < 1000.0 else 15.0 + 27.0 * np.log(f / 1000.0) / np.log(6.4)


def _ref_hz(m):
    m = float(m)
    return 200.0 * m / 3.0 if m < 15.0 else 1000.0 * 6.4 ** ((m - 15.0) / 27.0)


def _ref_filterbank(sr, n_fft, n_mels, fmin, fmax):
    pts = [_ref_hz(m) for m in np.linspace(_ref_mel(fmin), _ref_mel(fmax), n_mels + 2)]
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    fb = np.zeros((n_mels, freqs.size))
    for i in range(n_mels):
        tri = np.interp(freqs, pts[i:i + 3], [0.0, 1.0, 0.0], left=0.0, right=0.0)
        fb[i] = tri * 2.0 / (pts[i + 2] - pts[i])
    return fb


def test_filterbank_matches_second_formula():
    for args in [(16000, 400, 128, 0.0, 8000.0), (16000, 400, 80, 0.0, 8000.0), (24000, 1920, 80, 0.0, 8000.0)]:
        np.testing.assert_allclose(slaney_mel_filters(*args), _ref_filterbank(*args), atol=1e-12)


# ---- Whisper log-mel ---------------------------------------------------------------------------------

def _ref_whisper(x, n_mels):
    x = x.astype(np.float64)
    n_fft, hop = 400, 160
    xp = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")
    n_frames = 1 + (xp.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)   # periodic Hann
    frames = xp[idx] * window
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    re = frames @ np.cos(2 * np.pi * k * n / n_fft).T                    # explicit DFT, no FFT
    im = frames @ np.sin(2 * np.pi * k * n / n_fft).T
    power = (re ** 2 + im ** 2)[:-1]                                      # Whisper drops the last frame
    mel = _ref_filterbank(16000, n_fft, n_mels, 0.0, 8000.0) @ power.T
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


@pytest.mark.parametrize("n", [16000, 20817])
def test_whisper_log_mel_matches_numpy(n):
    x = _signal(n, 16000)
    got = whisper_log_mel(x, n_mels=128)
    assert tuple(got.shape) == (128, n // 160)
    np.testing.assert_allclose(got.numpy(), _ref_whisper(x, 128), atol=1e-4)


def test_whisper_log_mel_dynamic_range_clamp():
    x = np.zeros(16000, np.float32)
    x[8000:8400] = 0.9  # mostly silence: the clamp at max - 8 must bite
    got = whisper_log_mel(x).numpy()
    assert got.min() == pytest.approx(got.max() - 2.0, abs=1e-5)  # 8 log10 units / 4
    np.testing.assert_allclose(got, _ref_whisper(x, 128), atol=1e-4)


# ---- CosyVoice 2 prompt mel --------------------------------------------------------------------------

def _ref_prompt_mel(x):
    x = x.astype(np.float64)
    n_fft, hop = 1920, 480
    pad = (n_fft - hop) // 2
    xp = np.pad(x, (pad, pad), mode="reflect")
    n_frames = 1 + (xp.size - n_fft) // hop
    window = np.sin(np.pi * np.arange(n_fft) / n_fft) ** 2              # periodic Hann, another way
    frames = np.stack([xp[i * hop:i * hop + n_fft] * window for i in range(n_frames)])
    spec = np.fft.rfft(frames, axis=1)
    mag = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    mel = _ref_filterbank(24000, n_fft, 80, 0.0, 8000.0) @ mag.T
    return np.log(np.maximum(mel, 1e-5)).T


@pytest.mark.parametrize("n", [24000, 24001, 36123, 480 * 7 + 479])
def test_prompt_mel_frames_and_values(n):
    x = _signal(n, 24000, seed=n)
    got = prompt_mel_24k(x)
    assert tuple(got.shape) == (n // 480, 80)
    np.testing.assert_allclose(got.numpy(), _ref_prompt_mel(x), atol=1e-4)


# ---- Kaldi fbank -------------------------------------------------------------------------------------

def _ref_kaldi_fbank(x, num_bins=80, sr=16000):
    """Kaldi's compute-fbank-feats defaults as torchaudio's kaldi.fbank(dither=0) uses them."""
    x = x.astype(np.float64)
    L, S, nfft = 400, 160, 512
    n = 1 + (x.size - L) // S
    win = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(L) / (L - 1))) ** 0.85   # povey

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(sr / 2.0)
    step = (hi - lo) / (num_bins + 1)
    m = mel(np.arange(nfft // 2) * sr / nfft)                              # Kaldi leaves out Nyquist
    banks = np.zeros((num_bins, nfft // 2 + 1))
    for b in range(num_bins):
        left, centre, right = lo + b * step, lo + (b + 1) * step, lo + (b + 2) * step
        w = np.where(m <= centre, (m - left) / (centre - left), (right - m) / (right - centre))
        banks[b, :nfft // 2] = np.where((m > left) & (m < right), w, 0.0)
    out = []
    for i in range(n):
        f = x[i * S:i * S + L].copy()
        f -= f.mean()
        f[1:] = f[1:] - 0.97 * f[:-1]
        f[0] -= 0.97 * f[0]
        spec = np.abs(np.fft.rfft(f * win, nfft)) ** 2
        out.append(np.log(np.maximum(banks @ spec, np.finfo(np.float32).eps)))
    return np.stack(out)


def test_kaldi_fbank_matches_kaldi_definition_and_mean_norm():
    pytest.importorskip("kaldi_native_fbank")
    x = _signal(16000 + 123, 16000)
    raw = kaldi_fbank(x, mean_norm=False)
    assert raw.shape == (1 + (x.size - 400) // 160, 80) and raw.dtype == np.float32
    np.testing.assert_allclose(raw, _ref_kaldi_fbank(x), atol=2e-3)
    normed = kaldi_fbank(x)
    assert normed.shape == raw.shape
    np.testing.assert_allclose(normed.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(normed, raw - raw.mean(axis=0), atol=1e-4)


def test_kaldi_fbank_too_short_gives_no_frames():
    pytest.importorskip("kaldi_native_fbank")
    assert kaldi_fbank(np.zeros(399, np.float32)).shape == (0, 80)


# ---- loading -----------------------------------------------------------------------------------------

def test_load_resamples_and_downmixes(tmp_path):
    sr = 22050
    x = _signal(sr, sr)
    sf.write(tmp_path / "mono.wav", x, sr)
    sf.write(tmp_path / "stereo.wav", np.stack([x, x], axis=1), sr)
    sf.write(tmp_path / "cancel.wav", np.stack([x, -x], axis=1), sr)
    mono = load_audio(tmp_path / "mono.wav", 16000)
    assert mono.dtype == np.float32 and mono.ndim == 1
    assert abs(mono.size - 16000) <= 1
    np.testing.assert_allclose(load_audio(tmp_path / "stereo.wav", 16000), mono, atol=1e-4)
    assert np.abs(load_audio(tmp_path / "cancel.wav", 16000)).max() < 1e-4  # ±1 LSB of 16-bit PCM
    same = load_audio(tmp_path / "mono.wav", sr)
    np.testing.assert_allclose(same, x, atol=1e-4)  # 16-bit PCM round trip, no resampling
    assert load_audio((tmp_path / "mono.wav").read_bytes(), 16000).size == mono.size


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 4)
    with pytest.raises(UserError, match="corrupt.wav"):
        load_audio(bad, 16000)
    with pytest.raises(UserError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav", 16000)

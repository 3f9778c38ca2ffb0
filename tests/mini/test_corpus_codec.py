"""Mini corpus grammar and the mini codec's arithmetic, on synthetic signals (no espeak, no trained files)."""

import math

import numpy as np
import pytest
import torch

from mamtra_cli.mini.codec import CodecConfig, CodecDecoder, MiniCodec, fit_kmeans
from mamtra_cli.mini.corpus import HELDOUT_VOICES, TRAIN_VOICES, generate_sentences


def test_sentences_are_distinct_deterministic_and_held_out():
    train, test = generate_sentences(300, 30, seed=3)
    assert len(train) == 300 and len(test) == 30
    assert not {s.lower() for s in train} & {s.lower() for s in test}
    assert len({s.lower() for s in train}) == 300
    assert generate_sentences(300, 30, seed=3) == (train, test)
    assert generate_sentences(300, 30, seed=4)[0] != train


def test_voices_are_distinct_and_held_out_voices_unseen():
    keys = [(v.voice, v.variant, v.pitch, v.rate) for v in TRAIN_VOICES + HELDOUT_VOICES]
    assert len(set(keys)) == len(keys) and len(TRAIN_VOICES) >= 8
    assert not {v.name for v in HELDOUT_VOICES} & {v.name for v in TRAIN_VOICES}


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centers])
    found = fit_kmeans(x, 3, iters=10, seed=1)
    dist = torch.cdist(centers, found).min(1).values
    assert dist.max() < 0.1


def _chirp(sr=16000, seconds=1.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * math.pi * (200 + 300 * t) * t)).astype(np.float32)


def test_features_tokens_and_decode_shapes():
    cfg = CodecConfig(codebook_size=8, decoder_channels=16, decoder_dilations=(1, 2), griffin_lim_iters=4)
    codec = MiniCodec(cfg)
    wav = _chirp()
    mel, lin, stats = codec.features(wav, 16000)
    assert mel.shape == (16000 // 320 + 1, 80) and lin.shape == (mel.shape[0], 513)
    codec.centroids = fit_kmeans(codec.frame_pairs(mel), 8, iters=3)
    tokens = codec.encode(wav, 16000)
    assert len(tokens) == math.ceil(mel.shape[0] / 2)  # 25 Hz: one token per two 50 Hz frames
    assert all(0 <= t < 8 for t in tokens)
    codec.decoder = CodecDecoder(cfg).eval()
    audio = codec.decode(tokens, stats)
    assert audio.dtype == np.float32 and audio.shape == ((2 * len(tokens) - 1) * 320,)
    # A 22.05 kHz input is resampled to the same features.
    import soxr

    wav22 = soxr.resample(wav, 16000, 22050).astype(np.float32)
    assert codec.features(wav22, 22050)[0].shape[0] == pytest.approx(mel.shape[0], abs=1)


def test_griffin_lim_rebuilds_a_spectrogram():
    """Spectral convergence of fast Griffin-Lim on a real signal's magnitude: well under the random-phase start."""
    cfg = CodecConfig(griffin_lim_iters=32, magnitude_power=1.0)
    codec = MiniCodec(cfg)
    wav = torch.from_numpy(_chirp())
    mag = codec.magnitude(wav)
    rebuilt = codec.magnitude(torch.from_numpy(codec.vocode(mag)))
    n = min(mag.shape[0], rebuilt.shape[0])
    sc = float((rebuilt[:n] - mag[:n]).norm() / mag[:n].norm())
    assert sc < 0.35

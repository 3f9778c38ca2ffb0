"""The FSQ tokenizer of the mini codec: code arithmetic, straight-through consistency, files, training."""

import math

import numpy as np
import pytest
import torch

from mamtra_cli.errors import UserError
from mamtra_cli.mini.codec import CODEC_CONFIG, CodecConfig, MiniCodec
from mamtra_cli.mini.fsq import FSQTokenizer, pad_even, train_fsq


def _chirp(sr=16000, seconds=1.0, f0=200.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * math.pi * (f0 + 300 * t) * t)).astype(np.float32)


def _small_cfg():
    return CodecConfig(quantizer="fsq", fsq_levels=3, fsq_dims=4, fsq_channels=16, codebook_size=81,
                       griffin_lim_iters=4)


def test_every_code_decodes_to_its_own_digits_and_back():
    """token → digits (decode's arithmetic) → token (encode's arithmetic) is the identity on all codes."""
    tok = FSQTokenizer(n_mels=8, channels=8, dims=4, levels=5)
    assert tok.vocab_size == 625
    codes = torch.arange(625)[None]  # (1, 625)
    digits = (codes[:, None, :] // tok.place[None, :, None]) % tok.levels - 2  # (1, 4, 625) in {-2 … 2}
    assert digits.min() == -2 and digits.max() == 2
    back = ((digits + 2) * tok.place[None, :, None]).sum(1)
    assert torch.equal(back, codes)


def test_forward_equals_decode_of_encode():
    """Training sees exactly what inference decodes: the straight-through forward is decode(encode(mel))."""
    torch.manual_seed(0)
    tok = FSQTokenizer(n_mels=80, channels=16, dims=4, levels=3).eval()
    mel = torch.randn(2, 20, 80) * 2
    with torch.no_grad():
        tokens = tok.encode(mel)
        assert tokens.shape == (2, 10) and tokens.min() >= 0 and tokens.max() < 81
        torch.testing.assert_close(tok(mel), tok.decode(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        FSQTokenizer(levels=4)


def test_pad_even_repeats_the_last_frame():
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(pad_even(x), torch.tensor([[0.0, 1], [2, 3], [4, 5], [4, 5]]))
    assert pad_even(x[:2]).shape == (2, 2)


def test_codec_tokens_audio_and_files(tmp_path):
    torch.manual_seed(0)
    cfg = _small_cfg()
    codec = MiniCodec(cfg, tokenizer=MiniCodec.new_tokenizer(cfg).eval())
    wav = _chirp()
    mel, _, stats = codec.features(wav, 16000)
    tokens = codec.encode(wav, 16000)
    assert len(tokens) == math.ceil(mel.shape[0] / 2) and all(0 <= t < 81 for t in tokens)
    mag = codec.decode_spectrogram(tokens, stats)
    assert mag.shape == (2 * len(tokens), cfg.n_lin) and bool((mag > 0).all())
    audio = codec.decode(tokens, stats, seed=3)
    assert audio.dtype == np.float32 and audio.shape == ((2 * len(tokens) - 1) * cfg.hop_length,)
    with pytest.raises(UserError, match="out of the codec's range"):
        codec.decode([81], stats)

    codec.save(tmp_path)
    loaded = MiniCodec.load(tmp_path)
    assert loaded.is_fsq and loaded.cfg == cfg and loaded.fingerprint() == codec.fingerprint()
    assert loaded.encode(wav, 16000) == tokens
    np.testing.assert_array_equal(loaded.decode(tokens, stats, seed=3), audio)
    assert codec.tokenizer_name() == "mini-codec-fsq81"

    # A changed weight changes the fingerprint (manifests record it so tokens never mix).
    with torch.no_grad():
        loaded.tokenizer.encoder[0].bias.add_(1e-3)
    assert loaded.fingerprint() != codec.fingerprint()


def test_codec_yaml_checks(tmp_path):
    cfg = _small_cfg()
    MiniCodec(cfg, tokenizer=MiniCodec.new_tokenizer(cfg)).save(tmp_path)
    text = (tmp_path / CODEC_CONFIG).read_text()
    (tmp_path / CODEC_CONFIG).write_text(text.replace("codebook_size: 81", "codebook_size: 512"))
    with pytest.raises(UserError, match="not fsq_levels"):
        MiniCodec.load(tmp_path)
    (tmp_path / CODEC_CONFIG).write_text(text.replace("quantizer: fsq", "quantizer: vq"))
    with pytest.raises(UserError, match="quantizer must be kmeans or fsq"):
        MiniCodec.load(tmp_path)
    # A codec.yaml from before the FSQ tokenizer (no `quantizer`) is a k-means codec.
    lines = [ln for ln in text.splitlines() if not ln.startswith(("quantizer", "fsq_"))]
    (tmp_path / CODEC_CONFIG).write_text("\n".join(lines).replace("codebook_size: 81", "codebook_size: 8") + "\n")
    assert CodecConfig.load(tmp_path / CODEC_CONFIG).quantizer == "kmeans"
    (tmp_path / CODEC_CONFIG).write_text(text + "vocoder: hifigan\n")  # a setting this version does not know
    with pytest.raises(UserError, match="unknown setting.*vocoder"):
        MiniCodec.load(tmp_path)


def test_training_reconstructs_better_than_the_untrained_tokenizer():
    torch.manual_seed(0)
    codec = MiniCodec(CodecConfig())
    mels = [codec.features(_chirp(seconds=1.0, f0=f0), 16000)[0] for f0 in (120, 180, 260, 340)]
    tok = FSQTokenizer(channels=24, dims=4, levels=3)

    def error():
        with torch.no_grad():
            return float(sum((tok(pad_even(m)[None])[0, :m.shape[0]] - m).abs().mean() for m in mels))

    before = error()
    train_fsq(tok, mels, steps=60, batch_size=4, crop=32, lr=3e-3)
    after = error()
    assert after < 0.7 * before, (before, after)

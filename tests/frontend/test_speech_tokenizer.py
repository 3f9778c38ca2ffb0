"""SpeechTokenizer / SpeakerEmbedder on stand-in ONNX models with the real input/output layout."""

import math
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from mamtra_cli.errors import UserError
from mamtra_cli.frontend.speech_tokenizer import SpeakerEmbedder, SpeechTokenizer
from tests.frontend.standins import write_campplus_onnx, write_speech_tokenizer_onnx


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return {"s3": write_speech_tokenizer_onnx(d / "speech_tokenizer_v2.onnx"),
            "s3_fixed": write_speech_tokenizer_onnx(d / "fixed_batch.onnx", dynamic_batch=False),
            "camp": write_campplus_onnx(d / "campplus.onnx")}


def _noise(seconds, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def test_reads_input_names_from_session(models):
    st = SpeechTokenizer(models["s3"])
    assert st._feats.name == "feats" and st._lens.name == "feats_length"
    assert st._lens_dtype == np.int32 and st.n_mels == 128 and st.batchable
    assert not SpeechTokenizer(models["s3_fixed"]).batchable


@pytest.mark.parametrize("seconds", [1.0, 2.5, 7.3])
def test_25_tokens_per_second(models, seconds):
    st = SpeechTokenizer(models["s3"])
    toks = st.tokenize(_noise(seconds))
    frames = int(16000 * seconds) // 160
    assert len(toks) == math.ceil(frames / 4)
    assert abs(len(toks) - 25 * seconds) <= 1
    assert all(isinstance(t, int) and 0 <= t < 6561 for t in toks)


def test_batch_equals_one_by_one(models):
    wavs = [_noise(s, seed=i) for i, s in enumerate([1.0, 3.2, 0.4, 2.0, 5.1])]
    for name in ("s3", "s3_fixed"):
        st = SpeechTokenizer(models[name])
        single = [st.tokenize(w) for w in wavs]
        batched = st.tokenize_batch(wavs, batch_size=3)
        assert [b[0] for b in batched] == single and all(b[1] is None for b in batched)


def test_over_30_seconds_refused(models):
    st = SpeechTokenizer(models["s3"])
    with pytest.warns(UserWarning, match="30"):
        assert st.tokenize(np.zeros(16000 * 30 + 160, np.float32)) is None
    assert st.tokenize(_noise(30.0)) is not None  # exactly 30 s is allowed, as in CosyVoice
    res = st.tokenize_batch([_noise(1.0), np.zeros(16000 * 31, np.float32)])
    assert res[0][0] is not None and res[1][0] is None and "longer than 30" in res[1][1]


def test_speaker_embedding(models):
    emb = SpeakerEmbedder(models["camp"])
    a = emb.embed(_noise(1.5, seed=1))
    assert a.shape == (192,) and a.dtype == np.float32
    np.testing.assert_array_equal(a, emb.embed(_noise(1.5, seed=1)))


def test_missing_and_broken_models(tmp_path):
    with pytest.raises(UserError, match="nope.onnx"):
        SpeechTokenizer(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="nope.onnx"):
        SpeakerEmbedder(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(UserError, match="bad.onnx"):
        SpeechTokenizer(bad)


def test_missing_onnxruntime_gives_install_hint(monkeypatch, models):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"pip install 'mamtra\[cosyvoice\]'"):
        SpeechTokenizer(models["s3"])

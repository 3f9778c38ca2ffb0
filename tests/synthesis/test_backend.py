"""The CosyVoice 2 synthesis backend on a tiny random-weight CosyVoice-format directory.

`make_tiny_cosyvoice2_assets` builds that directory (also used by tests/stages/test_synth.py): the tiny LM
teacher, the flow/HiFT fixture of tests/fixtures/cv2-flow-hift (speech vocabulary 100, 16-d speaker
embedding) and the front-end stand-ins of tests/frontend/standins.py sized to match (speech tokenizer codes
< 100, campplus output 16-d).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# In the repository, so a fresh clone runs these tests, never skips them.
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cv2-flow-hift"


def make_tiny_cosyvoice2_assets(directory: Path) -> Path:
    """A complete tiny CosyVoice 2 model directory (LM + flow + HiFT + front end), deterministic."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tokenizers")
    pytest.importorskip("kaldi_native_fbank")
    from mamtra_cli.teachers.tiny import make_tiny_cosyvoice2_dir
    from tests.frontend.standins import write_campplus_onnx, write_qwen2_tokenizer, write_speech_tokenizer_onnx

    d = Path(directory)
    # The tokenizer stand-in writes a stub config.json into CosyVoice-BlankEN/; the LM writer replaces it.
    write_qwen2_tokenizer(d / "CosyVoice-BlankEN")
    make_tiny_cosyvoice2_dir(d, speech_tokens=100)  # = the flow fixture's vocab_size
    # One cosyvoice2.yaml: the tiny LM's sections, then the fixture's flow and hift sections.
    lm_yaml = (d / "cosyvoice2.yaml").read_text().replace("spk_embed_dim: 192", "spk_embed_dim: 16")
    fixture_yaml = (FIXTURE / "cosyvoice2.yaml").read_text()
    (d / "cosyvoice2.yaml").write_text(lm_yaml + "\n" + fixture_yaml[fixture_yaml.index("\nflow:"):])
    shutil.copyfile(FIXTURE / "flow.pt", d / "flow.pt")
    shutil.copyfile(FIXTURE / "hift.pt", d / "hift.pt")
    write_speech_tokenizer_onnx(d / "speech_tokenizer_v2.onnx", codebook=100)
    write_campplus_onnx(d / "campplus.onnx", dim=16)  # = the flow fixture's spk_embed_dim
    return d


def write_reference(path: Path, seconds: float = 2.0, sr: int = 16000, seed: int = 0) -> Path:
    """A voiced-sounding test signal: a vibrato tone plus a little noise."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.2 * np.sin(2 * np.pi * 3 * t)))
    wav += 0.05 * np.random.default_rng(seed).standard_normal(t.size)
    sf.write(str(path), wav.astype(np.float32), sr)
    return Path(path)


# ---------------------------------------------------------------------------------------------- text


def test_split_sentences_rules():
    from mamtra_cli.synthesis.backend import is_only_punctuation, split_sentences

    words = lambda s: len(s.split())  # noqa: E731 - a token counter: one token per word
    # Short sentences are joined into one piece (nothing exceeds max_tokens).
    assert split_sentences("One two. Three four! Five?", words) == ["One two. Three four! Five?"]
    # A piece closes once it has > min tokens and the next sentence would exceed max; a short tail merges back.
    text = "a b c d. e f g h. i j k l. m."
    assert split_sentences(text, words, max_tokens=6, min_tokens=3, merge_tail=2) == ["a b c d.", "e f g h.",
                                                                                      "i j k l. m."]
    # Closing quotes stay with their sentence; "?!" is one end; pieces of only punctuation are dropped.
    assert split_sentences('He said "go." Then?! ...', words, max_tokens=1, min_tokens=0, merge_tail=0) == [
        'He said "go."', "Then?!"]
    assert is_only_punctuation("?! ... —") and not is_only_punctuation("a.")


# ---------------------------------------------------------------------------------------------- backend


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from mamtra_cli.synthesis.backend import CosyVoice2Backend

    torch.set_num_threads(1)
    d = make_tiny_cosyvoice2_assets(tmp_path_factory.mktemp("cv2"))
    return CosyVoice2Backend.from_dirs(d, d)


@pytest.fixture(scope="module")
def ref_wav(tmp_path_factory):
    return write_reference(tmp_path_factory.mktemp("ref") / "ref.wav")


def _flow(backend, prompt, tokens, streaming):
    tok = torch.tensor([tokens], dtype=torch.int32)
    p = prompt
    return backend.flow.inference(tok, torch.tensor([tok.shape[1]]), p.flow_prompt_tokens,
                                  torch.tensor([p.flow_prompt_tokens.shape[1]]), p.prompt_mel,
                                  torch.tensor([p.prompt_mel.shape[1]]), p.embedding, streaming=streaming)[0]


def test_prompt_zero_shot_and_cross_lingual(backend, ref_wav):
    zs = backend.prepare_prompt(ref_wav, "the quick brown fox.")
    n = zs.flow_prompt_tokens.shape[1]
    assert zs.mode == "zero-shot" and n == 50  # 2 s at 25 Hz
    assert zs.prompt_mel.shape == (1, 2 * n, 80)  # trimmed so that mel frames = 2 × prompt tokens
    assert zs.llm_prompt_speech_tokens == zs.flow_prompt_tokens[0].tolist() and zs.prompt_text_tokens
    assert zs.embedding.shape == (1, 16)
    cl = backend.prepare_prompt(ref_wav, None)
    # Cross-lingual drops only the LM's prompt; the flow keeps prompt tokens, prompt mel and speaker.
    assert cl.mode == "cross-lingual" and cl.prompt_text_tokens == [] and cl.llm_prompt_speech_tokens == []
    assert torch.equal(cl.flow_prompt_tokens, zs.flow_prompt_tokens) and torch.equal(cl.prompt_mel, zs.prompt_mel)
    assert torch.equal(cl.embedding, zs.embedding)


def test_streaming_agrees_with_non_streaming(backend, ref_wav):
    """Tolerances and why: the flow's streaming chunks use chunk attention masks, so streamed mel equals the
    *streaming* full-utterance flow (same masks) to float32 rounding (atol 1e-5), not the non-streaming one
    (here it differs by ~0.09). The last chunk is finalised without masks, as in CosyVoice, so it equals the
    non-streaming mel. Waveforms: HiFT draws fresh sine phases and noise on every call and chunks are
    cross-faded, so samples differ; the length must be identical and energy/shape close (RMS within 10 %,
    correlation > 0.5; measured 0.05 % and 0.86)."""
    from mamtra_cli.synthesis.backend import _StreamingToken2Wav

    prompt = backend.prepare_prompt(ref_wav, "the quick brown fox.")
    tokens = torch.randint(0, 100, (130,), generator=torch.Generator().manual_seed(0)).tolist()
    mels: list[torch.Tensor] = []
    chunks = list(backend.stream_tokens(iter(tokens), prompt, torch.Generator().manual_seed(1), on_mel=mels.append))
    # prompt 50 tokens → pad 0: chunks of 25 and 50 tokens (hop doubles) with 3 look-ahead, then the rest.
    assert [m.shape[2] for m in mels] == [50, 100, 110]
    assert [c.size for c in chunks] == [(50 - 8) * 480, 100 * 480, (110 + 8) * 480]
    full = _StreamingToken2Wav(backend, prompt, torch.Generator().manual_seed(1))(tokens, 0, streaming=False,
                                                                                  finalize=True)
    streamed = np.concatenate(chunks)
    assert streamed.size == full.size == len(tokens) * 2 * 480

    mel_streaming = _flow(backend, prompt, tokens, streaming=True)
    mel_plain = _flow(backend, prompt, tokens, streaming=False)
    assert (mels[0] - mel_streaming[:, :, :50]).abs().max() < 1e-5  # first chunk = flow's own streaming output
    assert (mels[1] - mel_streaming[:, :, 50:150]).abs().max() < 1e-5
    assert (mels[2] - mel_plain[:, :, 150:]).abs().max() < 1e-5  # the final, unmasked call
    rms_s, rms_f = np.sqrt(np.mean(streamed ** 2)), np.sqrt(np.mean(full ** 2))
    assert abs(rms_s / rms_f - 1) < 0.10
    assert np.corrcoef(streamed, full)[0, 1] > 0.5


def test_short_stream_equals_non_streaming(backend, ref_wav):
    """Fewer tokens than the first chunk needs: streaming is one finalize call, bit-identical to non-streaming."""
    from mamtra_cli.synthesis.backend import _StreamingToken2Wav

    prompt = backend.prepare_prompt(ref_wav, None)
    tokens = list(range(20))
    chunks = list(backend.stream_tokens(iter(tokens), prompt, torch.Generator().manual_seed(3)))
    full = _StreamingToken2Wav(backend, prompt, torch.Generator().manual_seed(3))(tokens, 0, False, True)
    assert len(chunks) == 1 and np.array_equal(chunks[0], full)


def test_synthesize_counts_tokens_and_sentences(backend, ref_wav):
    backend.max_new_tokens = 12
    try:
        prompt = backend.prepare_prompt(ref_wav, "the quick brown fox.")
        backend.stats.reset()
        audio = np.concatenate(list(backend.synthesize("Hello world, this is speech.", prompt, seed=0)))
    finally:
        backend.max_new_tokens = None
    assert backend.stats.sentences == 1 and backend.stats.tokens == 12  # min length 2 × text tokens > 12
    assert audio.size == 12 * 2 * 480 and np.isfinite(audio).all()

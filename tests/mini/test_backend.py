"""`MiniBackend` on the shipped built-in voice: the out-of-the-box synthesis path, and a hybrid made from the
mini teacher by `transfer` speaking through the same backend."""

import numpy as np
import pytest

from mamtra_cli.mini import BUILTIN_DIR

pytestmark = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(),
                                reason="the built-in mini voice is not in this checkout (mamtra build-mini)")


@pytest.fixture(scope="module")
def backend():
    import torch

    from mamtra_cli.mini.backend import MiniBackend

    torch.set_num_threads(1)
    return MiniBackend()


def test_builtin_voice_layout_and_size():
    names = {p.name for p in BUILTIN_DIR.iterdir()}
    assert {"config.yaml", "model.safetensors", "manifest.json", "text_vocab.json", "codec.yaml",
            "codec.safetensors", "sample_voice.wav", "sample_voice.txt"} <= names
    # Everything built in (voice, eval list, future shipped hybrids) must stay under 40 MB (the voice issue's
    # budget); the voice alone takes at most 30 MB of it.
    assert sum(p.stat().st_size for p in BUILTIN_DIR.iterdir()) < 30e6
    everything = sum(p.stat().st_size for p in BUILTIN_DIR.parent.rglob("*") if p.is_file())
    assert everything < 40e6


def test_synthesises_speech_from_the_sample_voice(backend):
    assert backend.lm.config.num_layers == 12 and backend.sample_rate == 16000
    prompt = backend.prepare_prompt(BUILTIN_DIR / "sample_voice.wav",
                                    (BUILTIN_DIR / "sample_voice.txt").read_text())
    audio = np.concatenate(list(backend.synthesize("Hello, how are you?", prompt, seed=0)))
    seconds = audio.size / backend.sample_rate
    # ~1.6 speech tokens per character at 25 Hz: about 1.1 s of speech; the LM must stop, not run to max.
    assert 0.4 < seconds < 3.5
    assert np.isfinite(audio).all() and 0.01 < np.abs(audio).max() <= 1.0
    assert backend.stats.tokens == sum(backend.stats.tokens_per_sentence) > 0


def test_cross_lingual_prompt_has_no_lm_prompt(backend):
    prompt = backend.prepare_prompt(BUILTIN_DIR / "sample_voice.wav", None)
    assert prompt.mode == "cross-lingual" and prompt.prompt_speech_tokens == []


def test_hybrid_from_transfer_speaks_through_the_backend(tmp_path, backend):
    from mamtra_cli import checkpoints
    from mamtra_cli.mini.backend import MiniBackend
    from mamtra_cli.weight_transfer import attention_layers_for, transfer

    student, _ = transfer(backend.lm, attention_layers_for(12, 3, "uniform"))  # 1:3 → 3 attention layers
    checkpoints.save_model_dir(tmp_path, student.config, student.state_dict(), {"stage": "test"})
    assert MiniBackend.accepts(tmp_path)
    hybrid = MiniBackend(tmp_path)
    prompt = hybrid.prepare_prompt(BUILTIN_DIR / "sample_voice.wav", (BUILTIN_DIR / "sample_voice.txt").read_text())
    audio = np.concatenate(list(hybrid.synthesize("Good morning.", prompt, seed=0)))
    assert audio.size > 0 and np.isfinite(audio).all()

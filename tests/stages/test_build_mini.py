"""`mamtra build-mini --toy`: the whole mini-voice pipeline (corpus → codec → teacher) at toy size, then
synthesis from the directory it wrote. Needs espeak-ng."""

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not on PATH (apt-get install espeak-ng) — it renders the corpus")


def test_build_mini_toy_end_to_end(tmp_path):
    import typer
    from typer.testing import CliRunner

    from stages.build_mini import build_mini

    app = typer.Typer()
    app.command()(build_mini)
    out, work = tmp_path / "mini", tmp_path / "work"
    result = CliRunner().invoke(app, ["--out", str(out), "--work", str(work), "--toy", "--seed", "1"])
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "model.safetensors", "manifest.json", "text_vocab.json", "codec.yaml",
                 "codec.safetensors", "sample_voice.wav", "sample_voice.txt"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "build-mini" and manifest["seed"] == 1
    assert len(manifest["inputs"]["corpus"]["sha256"]) == 64

    from mamtra_cli.data_manifest import read_manifest
    from mamtra_cli.mini.backend import MiniBackend

    header, utts = read_manifest(work / "data" / "train.jsonl", text_vocab=49, speech_vocab=64)
    assert header.speech_tokenizer["rate_hz"] == 25.0 and len(utts) == 80
    assert len({u.spk for u in utts}) == 4

    backend = MiniBackend(out, codec_dir=out)
    assert backend.lm.config.num_layers == 12 and set(backend.lm.config.layer_types) == {"attention"}
    prompt = backend.prepare_prompt(out / "sample_voice.wav", (out / "sample_voice.txt").read_text())
    assert prompt.prompt_speech_tokens and prompt.prompt_text_tokens
    audio = np.concatenate(list(backend.synthesize("Hello there.", prompt, seed=0)))
    assert audio.dtype == np.float32 and audio.size > 0 and np.isfinite(audio).all()
    assert MiniBackend.accepts(out, out)

    # A second run with the same --work reuses the cached phases and refuses an existing --out.
    again = CliRunner().invoke(app, ["--out", str(out), "--work", str(work), "--toy", "--seed", "1"])
    assert again.exit_code != 0

"""`mamtra build-mini --toy`: the whole mini-voice pipeline (corpus → codec → teacher in two cycles with input
noise) at toy size, then synthesis from the directory it wrote. Needs espeak-ng."""

import json
import shutil

import numpy as np
import pytest

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not on PATH "
                                  "(apt-get install espeak-ng) — it renders the corpus")


@needs_espeak
@pytest.mark.parametrize("quantizer", ["fsq", "kmeans"])
def test_build_mini_toy_end_to_end(tmp_path, quantizer):
    import typer
    from typer.testing import CliRunner

    from mamtra_cli.stages.build_mini import TOY_CYCLES, build_mini

    app = typer.Typer()
    app.command()(build_mini)
    out, work = tmp_path / "mini", tmp_path / "work"
    args = ["--work", str(work), "--toy", "--seed", "1", "--threads", "1", "--codec-sentences", "40",
            "--quantizer", quantizer]
    vocab = 81 if quantizer == "fsq" else 64  # toy FSQ: 3 levels × 4 dims
    result = CliRunner().invoke(app, ["--out", str(out), *args])
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "model.safetensors", "manifest.json", "text_vocab.json", "codec.yaml",
                 "codec.safetensors", "sample_voice.wav", "sample_voice.txt", "demo_distill.jsonl",
                 "demo_test.jsonl"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "build-mini" and manifest["seed"] == 1
    assert len(manifest["inputs"]["corpus"]["sha256"]) == 64
    params = manifest["parameters"]
    assert params["sentences"] == 80 and params["codec_sentences"] == 40
    assert params["speech_input_noise"] == 0.15 and params["cycles"] == TOY_CYCLES
    assert params["val_utterances"] == 8  # max(8, min(100, 80 // 30))
    cycles = manifest["metrics"]["teacher_cycles"]
    assert [(c["budget"], c["peak_lr"], c["warmup"]) for c in cycles] == [("15", 2e-3, 5), ("15", 1e-3, 5)]
    assert all(c["steps_run"] == 15 and c["seconds"] > 0 and np.isfinite(c["best"]["val_loss"]) for c in cycles)
    assert manifest["metrics"]["teacher"] == cycles[-1]["best"]
    assert manifest["metrics"]["teacher_steps_run"] == 30
    # The codec was fitted on the first 40 utterances only, yet every utterance was tokenised.
    if quantizer == "fsq":
        assert json.loads((work / "codec" / "fsq.json").read_text())["parameters"]["codec_sentences"] == 40
        assert params["quantizer"] == "fsq" and params["codebook"] == 81
    else:
        codec_marker = json.loads((work / "codec" / "codebook.json").read_text())
        assert codec_marker["parameters"]["codec_sentences"] == 40
        assert json.loads((work / "codec" / "decoder.json").read_text())["parameters"]["codec_sentences"] == 40

    from mamtra_cli.data_manifest import read_manifest
    from mamtra_cli.mini.backend import MiniBackend

    header, utts = read_manifest(work / "data" / "train.jsonl", text_vocab=49, speech_vocab=vocab)
    assert header.speech_tokenizer["rate_hz"] == 25.0 and len(utts) == 80
    assert header.speech_tokenizer["name"] == f"mini-codec-{quantizer}{vocab}"
    assert len({u.spk for u in utts}) == 4 and all(u.speech_tokens for u in utts)
    assert len(read_manifest(work / "data" / "test.jsonl", text_vocab=49, speech_vocab=vocab)[1]) == 6
    # demo data: the codec subset minus the validation rows (40 - 8), and the whole test set
    distill = read_manifest(out / "demo_distill.jsonl", text_vocab=49, speech_vocab=vocab)[1]
    assert len(distill) == 32 and {u.utt for u in distill} <= {u.utt for u in utts[8:40]}
    assert len(read_manifest(out / "demo_test.jsonl", text_vocab=49, speech_vocab=vocab)[1]) == 6

    backend = MiniBackend(out, codec_dir=out)
    assert backend.lm.config.num_layers == 12 and set(backend.lm.config.layer_types) == {"attention"}
    prompt = backend.prepare_prompt(out / "sample_voice.wav", (out / "sample_voice.txt").read_text())
    assert prompt.prompt_speech_tokens and prompt.prompt_text_tokens
    audio = np.concatenate(list(backend.synthesize("Hello there.", prompt, seed=0)))
    assert audio.dtype == np.float32 and audio.size > 0 and np.isfinite(audio).all()
    assert MiniBackend.accepts(out, out)

    # A second run with the same --work refuses an existing --out ...
    again = CliRunner().invoke(app, ["--out", str(out), *args])
    assert again.exit_code != 0
    # ... and to a new --out reuses every cached phase, both teacher cycles included.
    again = CliRunner().invoke(app, ["--out", str(tmp_path / "mini2"), *args])
    assert again.exit_code == 0, again.output
    reused = json.loads((tmp_path / "mini2" / "manifest.json").read_text())["metrics"]["phases_reused"]
    codec_phases = ["tokenizer", "manifests"] if quantizer == "fsq" else ["codebook", "manifests", "decoder"]
    assert reused == ["corpus", *codec_phases, "teacher_cycle1", "teacher_cycle2"]


@pytest.mark.parametrize("cycles", ["26.5m:2.5e-3", "90x:1e-3:50", "0:1e-3:5", "10:-1e-3:5", "10:1e-3:5,"])
def test_bad_cycles_is_one_line_and_exit_2(tmp_path, capsys, cycles):
    from mamtra_cli.cli import main

    code = main(["build-mini", "--out", str(tmp_path / "mini"), "--work", str(tmp_path / "work"),
                 "--cycles", cycles])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "--cycles" in err and "BUDGET:PEAK_LR:WARMUP" in err, err
    assert not (tmp_path / "work").exists()  # refused before any work


@needs_espeak
def test_build_mini_warm_start_from_another_codecs_teacher(tmp_path):
    """--warm-start: a toy FSQ teacher starts from a toy k-means teacher (same corpus, another codec); with a
    learning rate of 1e-9 the built teacher still holds the donor's transformer, and its speech tables are
    convex mixtures of the donor's code rows."""
    import torch
    import typer
    from typer.testing import CliRunner

    from mamtra_cli.models.speech_lm import load_model_dir
    from mamtra_cli.stages.build_mini import build_mini

    app = typer.Typer()
    app.command()(build_mini)
    work = tmp_path / "work"
    common = ["--work", str(work), "--toy", "--threads", "1", "--codec-sentences", "40"]
    donor = tmp_path / "kmeans"
    result = CliRunner().invoke(app, ["--out", str(donor), *common, "--quantizer", "kmeans", "--cycles", "4:2e-3:1"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "fsq"
    result = CliRunner().invoke(app, ["--out", str(out), *common, "--quantizer", "fsq", "--warm-start", str(donor),
                                      "--cycles", "2:1e-9:0"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    warm = manifest["parameters"]["warm_start"]
    assert warm["map_utterances"] == 40 and len(warm["model_sha256"]) == 64  # 80 sentences - 40 codec ones
    assert manifest["inputs"]["warm_start"]["path"] == str(donor)
    old, new = load_model_dir(donor), load_model_dir(out)
    assert new.config.speech_token_size == 81 and old.config.speech_token_size == 64
    ref, got = old.state_dict(), new.state_dict()
    for key in ref:
        if not key.startswith(("speech_embedding", "llm_decoder")):
            torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=0, msg=key)
    rows, old_rows = got["speech_embedding.weight"][:81], ref["speech_embedding.weight"][:64]
    assert (rows <= old_rows.max(0).values + 1e-5).all() and (rows >= old_rows.min(0).values - 1e-5).all()
    # special rows copied
    torch.testing.assert_close(got["llm_decoder.weight"][81:], ref["llm_decoder.weight"][64:], atol=1e-6, rtol=0)

    bad = CliRunner().invoke(app, ["--out", str(tmp_path / "x"), *common, "--quantizer", "fsq",
                                   "--warm-start", str(tmp_path)])
    assert bad.exit_code != 0 and "not a mini voice directory" in str(bad.exception or bad.output)

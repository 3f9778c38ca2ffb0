"""`mamtra export` and `mamtra synth` end to end on a tiny random-weight CosyVoice 2 directory:
tiny teacher → transfer (1:1 hybrid) → export (bundle) → synth (one text, streaming, --list batch), plus the
user errors (exit 2, one sentence, no wav left behind)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mamtra_cli.cli import main
from tests.synthesis.test_backend import make_tiny_cosyvoice2_assets, write_reference


TEXT = "Hello world, this is speech."
REF_TEXT = "the quick brown fox."
SAMPLES_PER_TOKEN = 2 * 480  # 2 mel frames per token, 480 samples per frame at 24 kHz


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """assets (tiny CosyVoice 2 dir), hybrid (1:1 transfer of its LM), bundle (export), ref wav."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("synth")
    assets = make_tiny_cosyvoice2_assets(root / "cv2")
    assert main(["transfer", "--teacher", str(assets), "--ratio", "1:1", "--out", str(root / "hybrid")]) == 0
    assert main(["export", "--model", str(root / "hybrid"), "--assets", str(assets), "--out",
                 str(root / "bundle")]) == 0
    return {"root": root, "assets": assets, "hybrid": root / "hybrid", "bundle": root / "bundle",
            "ref": write_reference(root / "ref.wav")}


def test_export_writes_a_complete_bundle(pipeline):
    from safetensors import safe_open

    b = pipeline["bundle"]
    manifest = json.loads((b / "manifest.json").read_text())
    files = set(manifest["files"])
    on_disk = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} - {"manifest.json"}
    assert files == on_disk
    for name in ("bundle.yaml", "lm/config.yaml", "lm/model.safetensors", "flow.safetensors", "hift.safetensors",
                 "campplus.onnx", "speech_tokenizer_v2.onnx", "CosyVoice-BlankEN/vocab.json",
                 "CosyVoice-BlankEN/merges.txt", "CosyVoice-BlankEN/tokenizer_config.json"):
        assert name in files and len(manifest["files"][name]["sha256"]) == 64
    with safe_open(str(b / "lm" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("llm_decoder.weight").dtype == torch.bfloat16  # --dtype default bf16
    with safe_open(str(b / "flow.safetensors"), "pt") as f:
        assert f.get_tensor("input_embedding.weight").dtype == torch.float32  # flow stays fp32 by default
    with safe_open(str(b / "hift.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".parametrizations.weight.original0") for k in keys)
    assert not any(k.endswith(".weight_g") for k in keys)


def test_synth_from_bundle_streaming_and_not(pipeline, capsys, tmp_path):
    import soundfile as sf

    common = [TEXT, "--ref", pipeline["ref"], "--ref-text", REF_TEXT, "--model", pipeline["bundle"],
              "--max-tokens", 40, "--seed", 7, "--json"]
    rc, out, err = run(capsys, "synth", *common, "--out", tmp_path / "plain.wav")
    assert rc == 0, err
    plain = json.loads(out)
    rc, out, err = run(capsys, "synth", *common, "--stream", "--out", tmp_path / "stream.wav")
    assert rc == 0, err
    streamed = json.loads(out)
    assert "RTF" in err and "peak memory" in err

    n = plain["stages"]["tokens"]
    assert n == streamed["stages"]["tokens"] and 0 < n <= 40  # same seed → same LM tokens
    for r in (plain, streamed):
        assert r["samples"] == n * SAMPLES_PER_TOKEN and r["sample_rate"] == 24000 and r["mode"] == "zero-shot"
        assert set(r["stages"]) >= {"frontend_s", "lm_s", "flow_s", "hift_s"} and r["rtf"] > 0
    a, sr_a = sf.read(tmp_path / "plain.wav", dtype="float32")
    s, sr_s = sf.read(tmp_path / "stream.wav", dtype="float32")
    assert sr_a == sr_s == 24000 and a.size == s.size == n * SAMPLES_PER_TOKEN
    if n >= 28:  # 25 tokens + 3 look-ahead: at least one streamed chunk before the final one
        assert streamed["chunks"] >= 2
    # Not bit-equal (chunk masks, fresh HiFT noise per chunk); see test_backend for the mel-level check.
    assert abs(np.sqrt(np.mean(s ** 2)) / np.sqrt(np.mean(a ** 2)) - 1) < 0.10
    assert np.corrcoef(a, s)[0, 1] > 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.wav", "stream.wav"]  # no temp files left


def test_synth_list_batch_with_model_and_assets(pipeline, capsys, tmp_path):
    import soundfile as sf

    lst = pipeline["root"] / "meta.lst"
    lst.write_text(f"u1|{REF_TEXT}|ref.wav|{TEXT}\n\nu2||ref.wav|Mamba and attention.\n")
    rc, out, err = run(capsys, "synth", "--list", lst, "--out-dir", tmp_path / "wavs", "--model", pipeline["hybrid"],
                       "--assets", pipeline["assets"], "--max-tokens", 12, "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["utterances"] == 2 and [i["utt"] for i in r["items"]] == ["u1", "u2"]
    assert [i["mode"] for i in r["items"]] == ["zero-shot", "cross-lingual"]
    for item in r["items"]:
        wav, sr = sf.read(item["out"])
        assert sr == 24000 and wav.size == item["stages"]["tokens"] * SAMPLES_PER_TOKEN > 0


def _bad_inputs(pipeline, tmp: Path) -> dict:
    import shutil

    import soundfile as sf

    (tmp / "noise.wav").write_bytes(b"RIFF not really a wav file")
    sf.write(str(tmp / "long.wav"), np.zeros(16000 * 31, dtype=np.float32), 16000)
    broken = tmp / "broken.bundle"
    shutil.copytree(pipeline["bundle"], broken)
    (broken / "hift.safetensors").unlink()
    ref, bundle = pipeline["ref"], pipeline["bundle"]
    return {
        "missing reference": ([TEXT, "--ref", tmp / "nope.wav", "--model", bundle], "does not exist"),
        "unreadable audio": ([TEXT, "--ref", tmp / "noise.wav", "--model", bundle], "not readable audio"),
        "reference over 30 s": ([TEXT, "--ref", tmp / "long.wav", "--model", bundle], "at most 30 s"),
        "empty text": (["  ", "--ref", ref, "--model", bundle], "empty"),
        "only punctuation": (["?! ...", "--ref", ref, "--model", bundle], "only punctuation"),
        "bundle missing a file": ([TEXT, "--ref", ref, "--model", broken], "missing hift.safetensors"),
        "built-in voice with --assets": ([TEXT, "--ref", ref, "--assets", tmp], "drop --assets"),
    }


@pytest.mark.parametrize("case", ["missing reference", "unreadable audio", "reference over 30 s", "empty text",
                                  "only punctuation", "bundle missing a file",
                                  "built-in voice with --assets"])
def test_bad_inputs_exit_2_with_one_sentence(pipeline, capsys, tmp_path, case):
    args, needle = _bad_inputs(pipeline, tmp_path)[case]
    out_wav = tmp_path / "out.wav"
    rc, out, err = run(capsys, "synth", *args, "--out", out_wav)
    errors = [line for line in err.splitlines() if line.startswith("mamtra: error:")]
    assert rc == 2 and len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert not out_wav.exists() and not list(tmp_path.glob(".out.wav.tmp-*"))


def test_wav_writer_leaves_nothing_on_failure(tmp_path):
    from mamtra_cli.synthesis.wavfile import WavWriter

    target = tmp_path / "x.wav"
    with pytest.raises(RuntimeError):
        with WavWriter(target, 24000) as w:
            w.write(np.zeros(480, dtype=np.float32))
            raise RuntimeError("interrupted mid-utterance")
    assert list(tmp_path.iterdir()) == []


def test_profile_vram_runs_the_whole_pipeline_of_a_bundle(pipeline, capsys, tmp_path):
    rc, out, err = run(capsys, "profile", "vram", "--gpu", "a6000", "--bundle", pipeline["bundle"], "--ref",
                       pipeline["ref"], "--ref-text", REF_TEXT, "--text", TEXT, "--max-tokens", 30,
                       "--threads", 1, "--out", tmp_path / "prof", "--json")
    assert rc == 0, err
    result = json.loads(out)
    (row,) = result["rows"]
    assert result["workload"] == "synth" and row["model"] == "bundle"
    assert 0 < row["tokens"] <= 30 and row["audio_seconds"] == pytest.approx(row["tokens"] * 0.04, rel=1e-6)
    assert row["peak_bytes"] > 0 and row["weights_bytes"] > 0 and row["plan_max_streams"] > 0
    assert (tmp_path / "prof" / "vram_synth.png").is_file()
    rc, _, err = run(capsys, "profile", "vram", "--bundle", pipeline["bundle"])
    assert rc == 2 and "--ref" in err

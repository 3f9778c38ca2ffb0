"""The out-of-the-box path on the shipped mini voice: `mamtra synth` with no --model/--ref, `export --assets mini`
(a mini bundle that synth and score read), and `mamtra demo` end to end at smoke size."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from mamtra_cli.cli import main
from mamtra_cli.mini import BUILTIN_DIR
from mamtra_cli.mini.hybrids import builtin_hybrid_names

pytestmark = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(),
                                reason="the built-in mini voice is not in this checkout (mamtra build-mini)")

HELLO = "Hello, how are you doing today?"


def test_synth_defaults_to_the_builtin_voice_and_its_sample(tmp_path, capsys):
    out = tmp_path / "hello.wav"
    assert main(["synth", HELLO, "--out", str(out), "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "zero-shot" and result["backend"]["backend"] == "mini"
    wav, sr = sf.read(str(out))
    assert sr == 16000 and 0.8 < wav.size / sr < 6.0 and np.abs(wav).max() > 0.01
    # the default reference is the bundled sample voice with its transcript (zero-shot prompt)
    assert result["rtf"] > 0


def test_export_mini_bundle_is_exact_and_synthesises(tmp_path, capsys):
    import torch

    from mamtra_cli.models.speech_lm import load_model_dir

    hybrid, bundle = tmp_path / "h", tmp_path / "h.bundle"
    assert main(["transfer", "--teacher", "mini", "--ratio", "1:3", "--out", str(hybrid)]) == 0
    # an LM alone is refused with a pointer to --assets mini
    capsys.readouterr()
    assert main(["export", "--model", str(hybrid), "--out", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "--assets mini" in err and err.count("\n") == 1
    assert main(["export", "--model", str(hybrid), "--assets", "mini", "--out", str(bundle), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "mini" and summary["lm_dtype"] == "fp32"
    for name in ("config.yaml", "model.safetensors", "manifest.json", "text_vocab.json", "codec.yaml",
                 "codec.safetensors", "sample_voice.wav", "sample_voice.txt"):
        assert (bundle / name).is_file(), name
    a, b = load_model_dir(hybrid).state_dict(), load_model_dir(bundle).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # synth --model BUNDLE picks the mini backend and the bundle's own sample voice
    wav = tmp_path / "b.wav"
    assert main(["synth", "Good morning.", "--model", str(bundle), "--out", str(wav), "--threads", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"]["lm"]["layer_types"] == "MMMAMMMAMMMA" and result["audio_seconds"] > 0


def test_demo_end_to_end_smoke(tmp_path):
    out = tmp_path / "demo"
    # No --threads: every stage must still run with one thread (the demo's models are all small), and say so.
    cmd = [sys.executable, "-m", "mamtra_cli", "demo", "--out", str(out), "--steps", "2", "--wer-sentences", "1",
           "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    shipped = builtin_hybrid_names()
    assert summary["shipped_hybrids"] == shipped
    rows = summary["rows"]
    teacher, hybrid = rows[0], rows[-1]
    assert teacher["kind"] == "teacher" and hybrid["kind"] == "yours"
    # the shipped hybrids are rows of their own, measured like the others, by name
    assert [row["model"] for row in rows if row["kind"] == "shipped"] == [f"{n} (shipped)" for n in shipped]
    for row in (row for row in rows if row["kind"] == "shipped"):
        assert np.isfinite(row["ce"]) and row["cache_bytes_at_2048"] < teacher["cache_bytes_at_2048"]
        assert row["wer"] is not None and row["hello_rtf"] > 0
    # the ground truth is the second row when espeak-ng can render it: WER and SIM only
    truth = [row for row in rows if row["kind"] == "ground truth"]
    if shutil.which("espeak-ng"):
        assert rows[1] is truth[0] and truth[0]["wer"] is not None and truth[0]["ce"] is None
    assert teacher["layout"] == "A" * 12 and hybrid["layout"] == "MA" * 6
    assert hybrid["cache_bytes_at_2048"] < teacher["cache_bytes_at_2048"]
    assert 0.3 < summary["cache_saving"] < 0.6  # half the attention layers, plus Mamba's fixed state
    assert summary["distill"]["steps"] == 2 and np.isfinite(hybrid["ce"]) and np.isfinite(teacher["ce"])
    for key in ("hello_teacher_wav", "hello_hybrid_wav", "cache_growth_png"):
        assert (out / summary["paths"][key].split(str(out) + "/", 1)[1]).stat().st_size > 0
    assert json.loads((out / "demo.json").read_text())["rows"] == summary["rows"]
    # the commands name the final directory, never the temporary one the demo wrote into
    assert all(".tmp-" not in c for c in summary["commands"]) and len(summary["commands"]) == 10 + 2 * len(shipped)
    # ... and so do the stages' messages and their manifests (their recorded command lines, their inputs)
    assert ".tmp-" not in r.stderr
    for manifest in out.rglob("manifest.json"):
        assert ".tmp-" not in manifest.read_text(), manifest
    assert json.loads((out / "hybrid" / "manifest.json").read_text())["command"] == (
        f"mamtra transfer --teacher mini --ratio 1:1 --out {out / 'hybrid'} --seed 0 --json --threads 1")
    # one thread for every stage, recorded where a stage reports it
    assert all(c.split().count("--threads") == 1 and "--threads 1" in c for c in summary["commands"])
    assert summary["parameters"]["threads"] == 1
    # the WER/SIM columns come from `mamtra eval` on the held-out list, which names its recogniser
    assert summary["commands"][-1].startswith("mamtra eval --list mini-heldout")
    assert summary["wer_sentences"] == 1 and summary["asr"] and teacher["wer"] is not None
    assert (out / "eval" / "summary.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    # an existing --out is refused in one line, exit 2, and left as it was
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "--force" in again.stderr
    assert (out / "demo.json").is_file()

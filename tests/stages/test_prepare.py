"""`mamtra prepare` end to end on tiny generated corpora and stand-in CosyVoice 2 assets."""

import json
import math
from importlib.metadata import EntryPoint, entry_points

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("tokenizers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("kaldi_native_fbank")

from mamtra_cli import cli
from mamtra_cli.checkpoints import file_fingerprint
from mamtra_cli.data_manifest import read_manifest
from mamtra_cli.data import prepare as prep
from tests.frontend.standins import write_assets

GOOD_LTTS = {  # utt -> (seconds, sample rate, channels)
    "19_198_000000_000000": (1.0, 22050, 1),
    "19_198_000001_000000": (1.5, 24000, 1),
    "26_495_000000_000000": (1.2, 24000, 2),   # stereo
    "26_495_000001_000000": (0.8, 22050, 1),
    "32_21625_000000_000000": (1.0, 24000, 1),
    "40_222_000000_000000": (0.6, 22050, 1),
    "55_1_000000_000000": (1.1, 24000, 1),
}
EXPECTED_SKIPS = {"unreadable_audio": 1, "no_transcript": 1, "empty_transcript": 1, "too_long": 1, "no_audio": 1}


def _tone(seconds, sr, channels=1, f=220.0, seed=0):
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * f * t) + 0.02 * np.random.default_rng(seed).standard_normal(t.size)
    x = x.astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("CosyVoice2-0.5B"))


@pytest.fixture(scope="module")
def libritts(tmp_path_factory):
    root = tmp_path_factory.mktemp("LibriTTS") / "train-clean-100"
    for i, (utt, (sec, sr, ch)) in enumerate(GOOD_LTTS.items()):
        spk, chap = utt.split("_")[:2]
        d = root / spk / chap
        d.mkdir(parents=True, exist_ok=True)
        sf.write(d / f"{utt}.wav", _tone(sec, sr, ch, f=150 + 40 * i, seed=i), sr)
        (d / f"{utt}.normalized.txt").write_text(f"The quick brown fox, number {i}.\n")
    d = root / "32" / "21625"
    (d / "32_21625_000001_000000.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" * 8)   # corrupt
    (d / "32_21625_000001_000000.normalized.txt").write_text("a corrupt file")
    d = root / "40" / "222"
    sf.write(d / "40_222_000001_000000.wav", _tone(0.5, 24000), 24000)                      # no transcript
    sf.write(d / "40_222_000002_000000.wav", _tone(0.5, 24000), 24000)                      # empty transcript
    (d / "40_222_000002_000000.normalized.txt").write_text("  \n")
    (d / "40_222_000003_000000.normalized.txt").write_text("transcript with no audio")     # no wav
    d = root / "55" / "1"
    sf.write(d / "55_1_000001_000000.wav", _tone(30.5, 16000), 16000)                       # over 30 s
    (d / "55_1_000001_000000.normalized.txt").write_text("far too long")
    return root


def run(argv, monkeypatch):
    """Through the real CLI; registers the stage like its entry point until the package is installed."""
    if not any(ep.name == "prepare" for ep in entry_points(group=cli.ENTRY_POINT_GROUP)):
        ep = EntryPoint(name="prepare", value="mamtra_cli.stages.prepare:prepare", group=cli.ENTRY_POINT_GROUP)
        monkeypatch.setattr(cli, "entry_points", lambda group: [ep])
    return cli.main(["prepare", *map(str, argv)])


def _json(capsys):
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1]), out.err


def test_libritts_end_to_end_and_rerun(tmp_path, assets, libritts, monkeypatch, capsys):
    out = tmp_path / "data"
    args = ["--source", "libritts", "--input", libritts, "--assets", assets, "--out", out,
            "--shard-size", "3", "--val-fraction", "0.2", "--seed", "3", "--json"]
    assert run(args, monkeypatch) == 0
    summary, err = _json(capsys)
    assert summary["skipped"] == EXPECTED_SKIPS
    assert summary["utterances"]["total"] == len(GOOD_LTTS)
    assert "skip 32_21625_000001_000000 (unreadable_audio)" in err
    assert "skip 55_1_000001_000000 (too_long)" in err
    expected_hours = sum(s for s, _, _ in GOOD_LTTS.values()) / 3600
    assert summary["hours"]["total"] == pytest.approx(expected_hours, abs=1e-4)

    manifest = json.loads((out / "manifest.json").read_text())
    val_spk = set(manifest["outputs"]["val_speakers"])
    assert len(val_spk) == 1  # round(0.2 * 5 speakers)
    assert manifest["seed"] == 3 and manifest["stage"] == "prepare"
    assert not list(tmp_path.glob(".data.*"))  # the work dir was renamed into place

    sha = file_fingerprint(assets / "speech_tokenizer_v2.onnx")["sha256"]
    spk_of = {}
    for split in ("train", "val"):
        header, utts = read_manifest(out / split)
        assert header.speech_tokenizer["sha256"] == sha
        assert header.speech_tokenizer["name"] == "speech_tokenizer_v2.onnx"
        assert header.text_tokenizer["name"] == "CosyVoice-BlankEN"
        for u in utts:
            spk_of[u.utt] = (split, u.spk)
            sec = GOOD_LTTS[u.utt][0]
            assert len(u.speech_tokens) == math.ceil(round(sec * 16000) // 160 / 4)
            assert u.text.startswith("The quick brown fox")
    assert set(spk_of) == set(GOOD_LTTS)
    assert {s for split, s in spk_of.values() if split == "val"} == val_spk
    assert not ({s for split, s in spk_of.values() if split == "train"} & val_spk)
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == [f"shard-{k:05d}.jsonl" for k in range(len(names))]
    n_shards = len(manifest["outputs"]["train"]) + len(manifest["outputs"]["val"])
    assert n_shards == summary["shards"]["written"]

    # Same inputs again: every shard is kept, nothing is rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    assert run(args, monkeypatch) == 0
    again, _ = _json(capsys)
    assert again["shards"] == {"written": 0, "reused": n_shards} and again["skipped"] == EXPECTED_SKIPS
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")} == mtimes

    # Different settings into the same --out: refused without --force, replaced with it.
    assert run([*args[:-3], "--seed", "4"], monkeypatch) == 2
    assert "--force" in capsys.readouterr().err
    assert run([*args, "--seed", "4", "--force"], monkeypatch) == 0


def test_resume_after_crash(tmp_path, assets, libritts, monkeypatch, capsys):
    out = tmp_path / "data"
    args = ["--source", "libritts", "--input", libritts, "--assets", assets, "--out", out,
            "--shard-size", "2", "--val-fraction", "0", "--json"]
    real = prep._write_shard
    calls = []

    def crash_after_first(*a, **k):
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(prep, "_write_shard", crash_after_first)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(args, monkeypatch)
    capsys.readouterr()
    work = tmp_path / ".data.partial"
    assert not out.exists() and work.is_dir()
    assert [p.name for p in (work / "train").iterdir()] == ["shard-00000.jsonl"]  # whole shards only

    monkeypatch.setattr(prep, "_write_shard", real)
    assert run(args, monkeypatch) == 0
    summary, _ = _json(capsys)
    n_shards = math.ceil((len(GOOD_LTTS) + sum(EXPECTED_SKIPS.values())) / 2)
    assert summary["shards"] == {"written": n_shards - 1, "reused": 1}
    assert summary["skipped"] == EXPECTED_SKIPS and summary["utterances"]["val"] == 0
    assert len(read_manifest(out / "train")[1]) == len(GOOD_LTTS)
    assert not work.exists()


def test_kaldi_with_two_jobs_and_embeddings(tmp_path, assets, monkeypatch, capsys):
    kd = tmp_path / "kaldi"
    (kd / "wavs").mkdir(parents=True)
    wav_lines, text_lines, spk_lines = [], [], []
    for i in range(6):
        utt = f"spk{i % 3}-utt{i}"
        sr = 22050 if i % 2 else 24000
        sf.write(kd / "wavs" / f"{utt}.wav", _tone(0.7 + 0.1 * i, sr, 2 if i == 3 else 1, seed=i), sr)
        wav_lines.append(f"{utt} {kd / 'wavs' / f'{utt}.wav'}" if i % 2 else f"{utt} wavs/{utt}.wav")
        text_lines.append(f"{utt} hello world number {i}")
        spk_lines.append(f"{utt} spk{i % 3}")
    wav_lines += ["piped sox in.flac -t wav - |", "notext " + str(kd / "wavs" / "spk0-utt0.wav"),
                  "gone /nonexistent/gone.wav"]
    text_lines += ["piped some text", "gone some text", "blank"]
    (kd / "wav.scp").write_text("\n".join(wav_lines) + "\n")
    (kd / "text").write_text("\n".join(text_lines) + "\n")
    (kd / "utt2spk").write_text("\n".join(spk_lines) + "\n")
    out = tmp_path / "kout"
    assert run(["--source", "kaldi", "--input", kd, "--tokenizer-dir", assets / "CosyVoice-BlankEN",
                "--speech-tokenizer", assets / "speech_tokenizer_v2.onnx", "--campplus", assets / "campplus.onnx",
                "--out", out, "--jobs", "2", "--shard-size", "4", "--val-fraction", "0.3", "--json"],
               monkeypatch) == 0
    summary, err = _json(capsys)
    assert summary["skipped"] == {"unsupported_entry": 1, "no_transcript": 1, "no_audio": 2}
    assert summary["utterances"]["total"] == 6 and summary["speakers"]["val"] == 1
    seen = []
    for split in ("train", "val"):
        _, utts = read_manifest(out / split)
        for shard in sorted((out / split).glob("*.jsonl")):
            npz = np.load(shard.with_name(shard.stem + ".emb.npz"))
            _, shard_utts = read_manifest(shard)
            assert list(npz["utt"]) == [u.utt for u in shard_utts]
            assert npz["embedding"].shape == (len(shard_utts), 192)
        seen += [(u.utt, u.spk) for u in utts]
    assert sorted(seen) == sorted((f"spk{i % 3}-utt{i}", f"spk{i % 3}") for i in range(6))


def test_parquet_and_seedtts_sources(tmp_path, assets, monkeypatch, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    pdir = tmp_path / "parquet"
    pdir.mkdir()
    buf = io.BytesIO()
    sf.write(buf, _tone(0.5, 24000), 24000, format="WAV")
    table = pa.table({"utt": ["a1", "a2", "b1"], "audio_data": [buf.getvalue()] * 3, "wav": ["x.wav"] * 3,
                      "text": ["\u201chello\u201d  world", "the fox", "too long once"], "spk": ["A", "A", "B"],
                      "speech_token": [[1, 2, 3], [4, 5], []]})
    pq.write_table(table, pdir / "parquet_000000000.tar")
    (pdir / "data.list").write_text("parquet_000000000.tar\n")
    out = tmp_path / "pout"
    assert run(["--source", "cosyvoice-parquet", "--input", pdir / "data.list", "--tokenizer-dir",
                assets / "CosyVoice-BlankEN", "--out", out, "--val-fraction", "0", "--json"], monkeypatch) == 0
    summary, err = _json(capsys)
    assert "warning" in err and summary["skipped"] == {"no_speech_tokens": 1}
    header, utts = read_manifest(out / "train")
    assert header.speech_tokenizer["sha256"] is None
    assert {u.utt: u.speech_tokens for u in utts} == {"a1": [1, 2, 3], "a2": [4, 5]}
    assert {u.utt: u.text for u in utts}["a1"] == '"hello" world'
    # Without normalisation only whitespace is collapsed (CosyVoice's recipes); called directly here.
    prep.prepare("cosyvoice-parquet", pdir, tmp_path / "raw", tokenizer_dir=assets / "CosyVoice-BlankEN",
                 val_fraction=0.0, normalize_text=False)
    capsys.readouterr()
    _, raw = read_manifest(tmp_path / "raw" / "train")
    assert {u.utt: u.text for u in raw}["a1"] == "\u201chello\u201d world"

    sd = tmp_path / "seedtts" / "en"
    (sd / "prompt-wavs").mkdir(parents=True)
    (sd / "wavs").mkdir()
    sf.write(sd / "prompt-wavs" / "p1.wav", _tone(1.0, 16000), 16000)
    sf.write(sd / "prompt-wavs" / "p2.wav", _tone(1.0, 24000), 24000)
    sf.write(sd / "wavs" / "u1.wav", _tone(2.0, 24000), 24000)
    (sd / "meta.lst").write_text("u1|prompt one|prompt-wavs/p1.wav|target one\n"
                                 "u2|prompt one|prompt-wavs/p1.wav|target two\n"
                                 "u3|prompt two|prompt-wavs/p2.wav|target three\n")
    out = tmp_path / "sout"
    assert run(["--source", "seedtts", "--input", sd, "--assets", assets, "--out", out,
                "--val-fraction", "0", "--json"], monkeypatch) == 0
    summary, _ = _json(capsys)
    _, utts = read_manifest(out / "train")
    assert {(u.utt, u.spk, u.text) for u in utts} == {("p1", "p1", "prompt one"), ("u1", "p1", "target one"),
                                                       ("p2", "p2", "prompt two")}


def test_whole_run_errors_write_nothing(tmp_path, assets, libritts, monkeypatch, capsys):
    out = tmp_path / "data"
    base = ["--input", libritts, "--assets", assets, "--out", out]
    cases = [
        (["--source", "librispeech", *base], "Unknown --source"),
        (["--source", "libritts", "--input", tmp_path / "nope", "--assets", assets, "--out", out], "nope"),
        (["--source", "libritts", "--input", libritts, "--tokenizer-dir", assets / "CosyVoice-BlankEN",
          "--speech-tokenizer", tmp_path / "missing.onnx", "--out", out], "missing.onnx"),
        (["--source", "libritts", "--input", libritts, "--assets", tmp_path / "noassets", "--out", out],
         "noassets"),
        (["--source", "kaldi", *base], "wav.scp"),
    ]
    for argv, needle in cases:
        assert run(argv, monkeypatch) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
        assert not out.exists() and not list(tmp_path.glob(".data*"))


def test_speaker_split_is_seeded_and_never_empties_train():
    spk = [f"s{i}" for i in range(40)]
    a = prep.split_speakers(spk, 0.05, seed=0)
    assert len(a) == 2 and a == prep.split_speakers(list(reversed(spk)), 0.05, seed=0)
    assert a != prep.split_speakers(spk, 0.05, seed=1)
    assert prep.split_speakers(spk, 0.0, 0) == set()
    assert prep.split_speakers(["x"], 0.5, 0) == set()
    assert len(prep.split_speakers(["x", "y"], 0.9, 0)) == 1


def test_prepared_manifests_feed_score_and_distill(tmp_path, assets, libritts, monkeypatch, capsys):
    """What prepare writes is what score and distill read: a tiny teacher with the stand-in tokenizers'
    vocabularies scores the prepared data and distils a hybrid on it."""
    from mamtra_cli.frontend.text import TextTokenizer
    from mamtra_cli.teachers.tiny import make_tiny_cosyvoice2_dir

    data = tmp_path / "data"
    assert run(["--source", "libritts", "--input", libritts, "--assets", assets, "--out", data,
                "--val-fraction", "0.2", "--seed", "3", "--json"], monkeypatch) == 0
    capsys.readouterr()
    _, utts = read_manifest(data / "train")
    text_vocab = TextTokenizer.from_dir(assets / "CosyVoice-BlankEN").vocab_size
    assert max(t for u in utts for t in u.text_tokens) < text_vocab
    teacher = make_tiny_cosyvoice2_dir(tmp_path / "teacher", layers=2, hidden=32, heads=4, kv_heads=2,
                                       intermediate=64, text_vocab=text_vocab, speech_tokens=6561)
    assert cli.main(["score", "--model", str(teacher), "--data", str(data / "val"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["utterances"] == len(read_manifest(data / "val")[1]) and scored["ce"] > 0
    assert cli.main(["transfer", "--teacher", str(teacher), "--ratio", "1:1", "--out", str(tmp_path / "s")]) == 0
    assert cli.main(["distill", "--teacher", str(teacher), "--student", str(tmp_path / "s"), "--data",
                     str(data / "train"), "--val", str(data / "val"), "--out", str(tmp_path / "kd"),
                     "--max-steps", "2", "--threads", "1", "--eval-every", "2"]) == 0
    assert (tmp_path / "kd" / "model.safetensors").is_file()

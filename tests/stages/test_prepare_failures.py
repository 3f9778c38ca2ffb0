"""`mamtra prepare` with a front-end model that cannot be loaded (issue 14): with any --jobs the run ends
with one sentence and exit 2 (a pool used to restart the failing worker forever), and leaves no
`.OUT.partial/` behind when no shard was finished; a partial that holds finished shards is kept."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("tokenizers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("kaldi_native_fbank")

from tests.frontend.standins import write_assets  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny Kaldi folder and stand-in CosyVoice assets whose speech tokenizer is corrupt."""
    root = tmp_path_factory.mktemp("prep_fail")
    assets = write_assets(root / "assets")
    (root / "bad_assets").mkdir()
    shutil.copytree(assets / "CosyVoice-BlankEN", root / "bad_assets" / "CosyVoice-BlankEN")
    (root / "bad_assets" / "speech_tokenizer_v2.onnx").write_bytes(b"\x08\x07 not an onnx protobuf" * 40)
    kaldi = root / "kaldi"
    kaldi.mkdir()
    scp, text = [], []
    for i in range(6):
        wav = kaldi / f"u{i}.wav"
        t = np.arange(16000) / 16000
        sf.write(wav, (0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t)).astype(np.float32), 16000)
        scp.append(f"u{i} {wav}")
        text.append(f"u{i} hello number {i}")
    (kaldi / "wav.scp").write_text("\n".join(scp) + "\n")
    (kaldi / "text").write_text("\n".join(text) + "\n")
    return root


def prepare(corpus, out, assets: str, jobs: int, timeout: float = 240):
    cmd = [sys.executable, "-m", "mamtra_cli", "prepare", "--source", "kaldi", "--input", str(corpus / "kaldi"),
           "--assets", str(corpus / assets), "--out", str(out), "--jobs", str(jobs), "--shard-size", "2",
           "--val-fraction", "0"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("jobs", [1, 2])
def test_corrupt_speech_tokenizer_stops_the_run_with_one_sentence(corpus, tmp_path, jobs):
    out = tmp_path / "data"
    r = prepare(corpus, out, "bad_assets", jobs)  # a regression hangs: the timeout turns it into a failure
    errors = [line for line in r.stderr.splitlines() if line.startswith("mamtra: error:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "speech_tokenizer_v2.onnx" in errors[0] and "ONNX" in errors[0]
    assert r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither data/ nor .data.partial/


def test_a_partial_with_finished_shards_is_kept_for_resuming(corpus, tmp_path, monkeypatch, capsys):
    """The resumable state stays: shards an earlier try finished survive a re-run that fails (here its
    front end, made to fail after the plan has matched them), and a later run reuses them."""
    from mamtra_cli.cli import main
    from mamtra_cli.errors import UserError
    from mamtra_cli.data import prepare as prep

    out = tmp_path / "data"
    ok = prepare(corpus, out, "assets", 1)
    assert ok.returncode == 0, ok.stderr[-3000:]
    partial = tmp_path / ".data.partial"
    out.rename(partial)  # as if the earlier try had finished these shards but not the last one
    (partial / "manifest.json").unlink()
    (partial / "train" / "shard-00002.jsonl").unlink()
    kept = sorted(p.name for p in (partial / "train").iterdir())
    assert kept == ["shard-00000.jsonl", "shard-00001.jsonl"]

    def failing_init(cfg, set_torch_threads=True):
        raise UserError("The front end failed to load (injected).")

    monkeypatch.setattr(prep, "_worker_init", failing_init)
    argv = ["prepare", "--source", "kaldi", "--input", str(corpus / "kaldi"), "--assets", str(corpus / "assets"),
            "--out", str(out), "--jobs", "1", "--shard-size", "2", "--val-fraction", "0"]
    assert main(argv) == 2 and "injected" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in (partial / "train").iterdir()) == kept
    monkeypatch.undo()
    assert main([*argv, "--json"]) == 0
    assert '"reused": 2' in capsys.readouterr().out and not partial.exists()

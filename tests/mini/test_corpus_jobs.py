"""Parallel corpus rendering: the output does not depend on the number of espeak-ng jobs."""

import hashlib
import json
import shutil

import pytest

from mamtra_cli.errors import UserError
from mamtra_cli.mini import corpus as corpus_mod
from mamtra_cli.mini.corpus import build_corpus, corpus_hash

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not on PATH "
                                  "(apt-get install espeak-ng) — it renders the corpus")


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@needs_espeak
def test_one_and_two_jobs_render_the_same_corpus(tmp_path):
    a, b = tmp_path / "jobs1", tmp_path / "jobs2"
    build_corpus(a, 6, 2, 2, seed=5, jobs=1)
    build_corpus(b, 6, 2, 2, seed=5, jobs=2)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and len([k for k in fa if k.endswith(".wav")]) == 8
    for name in fa:
        assert fa[name] == fb[name], name  # every wav byte, both tables and corpus.json
    sha = json.loads((a / "corpus.json").read_text())["sha256"]
    assert sha == json.loads((b / "corpus.json").read_text())["sha256"] == corpus_hash(b)
    assert hashlib.sha256(fa["corpus.json"]).hexdigest() == hashlib.sha256(fb["corpus.json"]).hexdigest()
    # jobs is not a corpus parameter: the 2-job corpus is reused by a 1-job run
    logs = []
    build_corpus(b, 6, 2, 2, seed=5, log=logs.append, jobs=1)
    assert logs == [f"corpus: reusing {b}"]


def _fake_render(fail_on=None):
    def render(text, voice, out_wav=None):
        if text == fail_on:
            raise UserError(f"espeak-ng failed for voice {voice.espeak_voice}: boom")
        out_wav.write_bytes(f"{voice.name}|{text}".encode())
    return render


@pytest.mark.parametrize("jobs", [1, 2])
def test_progress_every_500_sentences(tmp_path, monkeypatch, jobs):
    monkeypatch.setattr(corpus_mod, "render", _fake_render())
    logs = []
    build_corpus(tmp_path / "c", 1000, 4, 3, seed=0, log=logs.append, jobs=jobs)
    assert logs == ["corpus: train 500/1000", "corpus: train 1000/1000"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_render_raises_and_leaves_no_marker(tmp_path, monkeypatch, jobs):
    out = tmp_path / "c"
    monkeypatch.setattr(corpus_mod, "render", _fake_render())
    build_corpus(out, 20, 2, 2, seed=0, jobs=jobs)  # an earlier corpus of other parameters
    assert (out / "corpus.json").is_file()
    train, _ = corpus_mod.generate_sentences(30, 2, seed=0)
    monkeypatch.setattr(corpus_mod, "render", _fake_render(fail_on=train[7]))
    with pytest.raises(UserError, match="espeak-ng failed for voice .*: boom"):
        build_corpus(out, 30, 2, 2, seed=0, jobs=jobs)
    assert not (out / "corpus.json").exists()


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="--render-jobs"):
        build_corpus(tmp_path / "c", 2, 2, 2, jobs=0)

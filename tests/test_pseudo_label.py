"""`mamtra pseudo-label` on the built-in mini teacher at toy size: the manifest it writes reads back, feeds
`score` and `distill`, does not depend on the batch size and never holds a held-out test sentence; bad
inputs are one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mamtra_cli.data_manifest import read_manifest
from mamtra_cli.mini import BUILTIN_DIR
from mamtra_cli.mini.codec import CodecConfig
from mamtra_cli.mini.backend import MiniBackend
from mamtra_cli.mini.text import CharTokenizer
from mamtra_cli.pseudo_labels import grammar_texts, held_out_sentences
from mamtra_cli.synthesis.backend import split_sentences
from tests.stages.harness import one_error, run

_SPEECH_VOCAB = (CodecConfig.load(BUILTIN_DIR / "codec.yaml").codebook_size
                 if (BUILTIN_DIR / "codec.yaml").is_file() else 0)
pytestmark = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(),
                                reason="the built-in mini voice is not in this checkout (mamtra build-mini)")
CV2_TINY = Path(__file__).resolve().parent / "fixtures" / "cv2-tiny"
TOY = ["pseudo-label", "--teacher", "mini", "--texts", "mini-grammar", "--count", "6", "--threads", "1"]


class _Capture:
    """`run` for a module-scoped fixture (pytest's capsys is function-scoped)."""

    def run(self, *args):
        import contextlib
        import io

        from mamtra_cli.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The same toy run with batch sizes 1 and 4: {batch size: (out dir, --json result)}."""
    root = tmp_path_factory.mktemp("pl")
    runs = {}
    capture = _Capture()
    for bs in (1, 4):
        code, out, err = capture.run(*TOY, "--batch-size", bs, "--out", root / f"bs{bs}", "--json")
        assert code == 0, err
        runs[bs] = (root / f"bs{bs}", json.loads(out))
    return runs


def test_manifest_reads_back_with_the_teachers_vocabularies(labelled):
    out, result = labelled[4]
    assert result["count"] == 6 and result["kept"] + result["dropped"] == 6 and result["threads"] == 1
    assert result["tokens"] > 0 and result["tokens_per_second"] > 0
    header, utts = read_manifest(out / "data.jsonl", text_vocab=49, speech_vocab=_SPEECH_VOCAB)
    assert len(utts) == result["kept"] >= 1
    # the same tokenizers as the mini's own training data, so distill/score accept it beside that data
    demo_header, _ = read_manifest(BUILTIN_DIR / "demo_distill.jsonl")
    assert header.text_tokenizer == demo_header.text_tokenizer
    assert header.speech_tokenizer == demo_header.speech_tokenizer
    tok = CharTokenizer.load(BUILTIN_DIR)
    for u in utts:  # the tokens synthesis would feed the LM for this text (one piece, no split)
        pieces = split_sentences(tok.normalize(u.text), tok.count_tokens, **MiniBackend.split_limits)
        assert pieces == [tok.normalize(u.text)] and u.text_tokens == tok.encode(pieces[0])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "pseudo-label" and manifest["seed"] == 0
    assert manifest["inputs"]["teacher"]["weights"]["sha256"]
    assert manifest["inputs"]["texts"]["source"] == "mini-grammar" and manifest["inputs"]["texts"]["sha256"]
    assert manifest["parameters"]["sampling"]["top_k"] == 25 and manifest["metrics"]["count"] == 6


def test_output_does_not_depend_on_the_batch_size(labelled):
    (a, ra), (b, rb) = labelled[1], labelled[4]
    assert (a / "data.jsonl").read_bytes() == (b / "data.jsonl").read_bytes()
    assert ra["tokens"] == rb["tokens"] and ra["batch_size"] == 1 and rb["batch_size"] == 4


def test_held_out_sentences_are_never_drawn(labelled):
    norm = CharTokenizer().normalize
    held = {norm(s) for s in held_out_sentences()}
    assert len(held) == 120
    _, utts = read_manifest(labelled[4][0] / "data.jsonl")
    assert not {norm(u.text) for u in utts} & held
    # seed 0 draws the grammar's stream in the order the mini's corpus did: its first 120 are the held-out list
    texts, excluded = grammar_texts(300, 0)
    assert len(texts) == 300 == len(set(texts)) and excluded == 120 and not {norm(t) for t in texts} & held
    other, _ = grammar_texts(50, 7)
    assert not {norm(t) for t in other} & held and other != texts[:50]


def test_score_and_distill_run_on_it(labelled, tmp_path, capsys):
    data = labelled[4][0] / "data.jsonl"
    code, out, err = run(capsys, "score", "--model", "mini", "--data", data, "--threads", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["utterances"] == labelled[4][1]["kept"]
    code, _, err = run(capsys, "transfer", "--teacher", "mini", "--ratio", "1:1", "--out", tmp_path / "S")
    assert code == 0, err
    code, out, err = run(capsys, "distill", "--teacher", "mini", "--student", tmp_path / "S", "--data", data,
                         "--out", tmp_path / "kd", "--max-steps", "2", "--warmup", "0", "--threads", "1",
                         "--device", "cpu", "--save-every", "0", "--eval-every", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 2


def test_text_file_is_cycled_and_capped_utterances_are_dropped_or_kept(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("Hello there.\n\n  The cat sat on the mat.  \n")
    code, out, err = run(capsys, "pseudo-label", "--teacher", "mini", "--texts", texts, "--count", "5",
                         "--max-tokens", "8", "--keep-capped", "--threads", "1", "--out", tmp_path / "a", "--json")
    assert code == 0, err
    r = json.loads(out)
    _, utts = read_manifest(tmp_path / "a" / "data.jsonl", text_vocab=49, speech_vocab=_SPEECH_VOCAB)
    assert [u.text for u in utts] == ["Hello there.", "The cat sat on the mat."] * 2 + ["Hello there."]
    assert r["kept"] == 5 and r["capped"] == 5 and all(len(u.speech_tokens) == 8 for u in utts)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["inputs"]["texts"]["cycled"] and m["inputs"]["texts"]["lines"] == 2
    assert len(m["outputs"]["capped_utts"]) == 5 and m["metrics"]["dropped"] == 0
    # without --keep-capped, every utterance that hit the cap is dropped: nothing left is a one-sentence error
    code, _, err = run(capsys, "pseudo-label", "--teacher", "mini", "--texts", texts, "--count", "2",
                       "--max-tokens", "8", "--threads", "1", "--out", tmp_path / "b")
    assert code == 2 and "--keep-capped" in one_error(err) and not (tmp_path / "b").exists()


@pytest.mark.parametrize("case", ["missing", "blank", "count0", "exists", "cosyvoice"])
def test_bad_inputs_are_one_sentence_errors(case, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("Hello there.\n")
    (tmp_path / "exists").mkdir()
    args = {"texts": texts, "count": 2, "out": tmp_path / "out", "teacher": "mini"}
    want = {"missing": "does not exist", "blank": "holds no text", "count0": "--count must be at least 1",
            "exists": "already exists", "cosyvoice": "not of the mini family"}[case]
    if case == "missing":
        args["texts"] = tmp_path / "nope.txt"
    elif case == "blank":
        texts.write_text("\n  \n")
    elif case == "count0":
        args["count"] = 0
    elif case == "exists":
        args["out"] = tmp_path / "exists"
    else:
        args["teacher"] = CV2_TINY
    code, _, err = run(capsys, "pseudo-label", "--teacher", args["teacher"], "--texts", args["texts"], "--count",
                       args["count"], "--out", args["out"], "--threads", "1")
    assert code == 2 and want in one_error(err)
    assert case == "exists" or not (tmp_path / "out").exists()


def test_prompted_rows_are_the_prompt_then_what_the_teacher_says_after_it(tmp_path, capsys):
    """--prompts: row i is a real utterance (its text, speech and speaker) followed by the new text and the
    speech the teacher samples after that prompt, exactly what a zero-shot request of it would draw."""
    import torch

    from mamtra_cli.mini.backend import MINI_SAMPLING
    from mamtra_cli.models.speech_lm import load_model_dir

    real = BUILTIN_DIR / "demo_distill.jsonl"
    _, pool = read_manifest(real)
    by_id = {u.utt: u for u in pool}
    outs = {}
    for bs in (1, 3):
        code, out, err = run(capsys, *TOY[:-2], "--count", "3", "--threads", "1", "--seed", "4", "--prompts", real,
                             "--batch-size", bs, "--out", tmp_path / f"p{bs}", "--json")
        assert code == 0, err
        outs[bs] = json.loads(out)
    assert (tmp_path / "p1" / "data.jsonl").read_bytes() == (tmp_path / "p3" / "data.jsonl").read_bytes()
    _, utts = read_manifest(tmp_path / "p3" / "data.jsonl", text_vocab=49, speech_vocab=_SPEECH_VOCAB)
    assert len(utts) == outs[3]["kept"] >= 1
    texts, _ = grammar_texts(3, 4)
    tok = CharTokenizer.load(BUILTIN_DIR)
    lm = load_model_dir(BUILTIN_DIR)
    prompts_used = set()
    for u in utts:
        i = int(u.utt.split("_")[1])
        p = by_id[u.utt.split("_", 2)[2]]
        prompts_used.add(p.utt)
        new_text = tok.encode(texts[i])
        assert u.text_tokens == p.text_tokens + new_text and u.spk == p.spk and u.text == p.text + texts[i]
        assert u.speech_tokens[:len(p.speech_tokens)] == p.speech_tokens
        with torch.inference_mode():
            alone = lm.generate(new_text, p.text_tokens, p.speech_tokens, sampling=MINI_SAMPLING, seed=4 + i)
        assert u.speech_tokens[len(p.speech_tokens):] == alone and alone
    assert len(prompts_used) > 1  # drawn, not one fixed prompt
    m = json.loads((tmp_path / "p3" / "manifest.json").read_text())
    assert m["parameters"]["prompt"]["utterances"] == len(pool) and m["parameters"]["prompt"]["sha256"]
    # a manifest of other tokenizers cannot prompt the mini
    other = tmp_path / "other.jsonl"
    header = json.loads(real.read_text().splitlines()[0])
    header["speech_tokenizer"]["sha256"] = "0" * 64
    other.write_text(json.dumps(header) + "\n" + real.read_text().splitlines()[1] + "\n")
    code, _, err = run(capsys, *TOY, "--prompts", other, "--out", tmp_path / "bad")
    assert code == 2 and "another speech tokenizer" in one_error(err) and not (tmp_path / "bad").exists()
    code, _, err = run(capsys, *TOY, "--prompts", tmp_path / "nope.jsonl", "--out", tmp_path / "bad")
    assert code == 2 and "does not exist" in one_error(err)

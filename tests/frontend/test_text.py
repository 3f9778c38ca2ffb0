"""TextTokenizer: Qwen2 byte-level BPE + CosyVoice 2 special tokens, on tiny stand-in files."""

import json
import sys

import pytest

pytest.importorskip("tokenizers")

from mamtra_cli.errors import UserError
from mamtra_cli.frontend.text import COSYVOICE2_EXTRA_SPECIAL_TOKENS, TextTokenizer, normalize_text
from tests.frontend.standins import _words, bytes_to_unicode, write_qwen2_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_qwen2_tokenizer(tmp_path_factory.mktemp("blanken"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return TextTokenizer.from_dir(tok_dir)


def test_byte_map_is_the_gpt2_one():
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256
    assert m[ord("a")] == "a" and m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ"


def test_special_tokens_follow_cosyvoice_order(tok, tok_dir):
    n = len(json.loads((tok_dir / "vocab.json").read_text()))
    # Qwen2's own added tokens keep their config ids ...
    assert tok.token_to_id("<|endoftext|>") == n
    assert tok.token_to_id("<|im_start|>") == n + 1
    assert tok.token_to_id("<|im_end|>") == n + 2
    # ... and CosyVoice's new ones follow in its order, skipping those already present.
    new = [t for t in COSYVOICE2_EXTRA_SPECIAL_TOKENS if t not in ("<|im_start|>", "<|im_end|>")]
    assert [tok.token_to_id(t) for t in new] == list(range(n + 3, n + 3 + len(new)))
    assert new[0] == "<|endofprompt|>" and new[-1] == "[mn]" and len(new) == 17
    assert tok.vocab_size == n + 3 + len(new)


def test_endofprompt_is_151646_at_real_vocab_size(tmp_path):
    # The real Qwen2 vocab.json holds 151643 entries; <|endofprompt|> must land on 151646.
    d = write_qwen2_tokenizer(tmp_path / "big", pad_vocab_to=151643)
    t = TextTokenizer.from_dir(d)
    assert t.token_to_id("<|endoftext|>") == 151643
    assert t.token_to_id("<|endofprompt|>") == 151646
    assert t.token_to_id("[breath]") == 151647
    assert t.token_to_id("[mn]") == 151646 + 16


def _reference_bpe(text, tok_dir):
    """Independent BPE for lowercase words separated by single spaces (one Qwen2 pre-token each)."""
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    merges = [tuple(l.split()) for l in (tok_dir / "merges.txt").read_text().splitlines()[1:] if l]
    ranks = {m: i for i, m in enumerate(merges)}
    b2u = bytes_to_unicode()
    ids = []
    for word in _words(text):
        sym = [b2u[b] for b in word.encode()]
        while len(sym) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(sym, sym[1:]))]
            r, i = min(pairs)
            if r == 1 << 30:
                break
            sym = sym[:i] + [sym[i] + sym[i + 1]] + sym[i + 2:]
        ids += [vocab[s] for s in sym]
    return ids


@pytest.mark.parametrize("text", ["the quick brown fox", "she sells sea shells by the sea shore",
                                  "hello world this is speech", "zebra xylophone"])
def test_matches_reference_bpe(tok, tok_dir, text):
    assert tok.encode(text) == _reference_bpe(text, tok_dir)


@pytest.mark.parametrize("text", ["The Quick brown fox, 12345 times!", "naïve café — ünïcödé", "中文测试 and emoji 🙂",
                                  "tabs\tand\nnewlines", "<|endofprompt|>prompt then text"])
def test_round_trip(tok, text):
    ids = tok.encode(text, normalize=False)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == text.replace("<|endofprompt|>", "")


def test_no_bos_and_special_tokens_in_text(tok):
    ids = tok.encode("hello<|endofprompt|>world")
    assert tok.token_to_id("<|endofprompt|>") in ids
    assert ids[0] != tok.token_to_id("<|endoftext|>")
    assert tok.encode("[breath]") == [tok.token_to_id("[breath]")]


def test_digits_split_one_by_one(tok):
    # Qwen2's regex isolates every digit.
    assert len(tok.encode("2024")) == 4


def test_normalisation():
    assert normalize_text("  “Hello”\u00a0—  it’s\n\tfine…  ") == '"Hello" - it\'s fine...'
    assert normalize_text("a\u200bb") == "ab"
    assert normalize_text("e\u0301") == "é"  # NFC
    assert normalize_text(" \n ") == ""


def test_missing_files_name_the_file(tmp_path, tok_dir):
    with pytest.raises(UserError, match="does not exist"):
        TextTokenizer.from_dir(tmp_path / "nope")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        d = tmp_path / name.replace(".", "_")
        write_qwen2_tokenizer(d)
        (d / name).unlink()
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            TextTokenizer.from_dir(d)


def test_missing_tokenizers_package_gives_install_hint(monkeypatch, tok_dir):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    monkeypatch.setitem(sys.modules, "tokenizers.models", None)
    with pytest.raises(UserError, match=r"pip install 'mamtra\[cosyvoice\]'"):
        TextTokenizer.from_dir(tok_dir)


def test_fingerprint_changes_with_files(tmp_path):
    a = TextTokenizer.from_dir(write_qwen2_tokenizer(tmp_path / "a")).fingerprint()
    d = write_qwen2_tokenizer(tmp_path / "b")
    (d / "merges.txt").write_text((d / "merges.txt").read_text().rsplit("\n", 2)[0] + "\n")
    b = TextTokenizer.from_dir(d).fingerprint()
    assert a["sha256"] != b["sha256"] and a["name"] == "a"


def test_equals_transformers_qwen2(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    # Exactly what CosyVoice2Tokenizer does.
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ref.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                            "additional_special_tokens": list(COSYVOICE2_EXTRA_SPECIAL_TOKENS)})
    for text in ["the quick brown fox, 12 times!", "naïve café<|endofprompt|>ok [breath] yes", "中文 🙂"]:
        assert tok.encode(text, normalize=False) == ref([text])["input_ids"][0]
    for t in COSYVOICE2_EXTRA_SPECIAL_TOKENS:
        assert tok.token_to_id(t) == ref.convert_tokens_to_ids(t)

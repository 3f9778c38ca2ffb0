"""The mini voice's character tokenizer and the WER arithmetic (no pocketsphinx needed)."""

import pytest

from mamtra_cli.mini.asr import edit_distance, normalize_words, wer, write_bigram_arpa
from mamtra_cli.mini.text import CharTokenizer


def test_char_tokenizer_normalises_and_round_trips(tmp_path):
    tok = CharTokenizer()
    ids = tok.encode("Hello,  “Café” — OK?")
    assert tok.decode(ids) == 'hello, "cafe" - ok?'
    assert 0 not in ids  # 0 is padding, never produced
    assert tok.encode("a\u00a7b") == tok.encode("a b")  # unknown symbol → space
    tok.save(tmp_path)
    again = CharTokenizer.load(tmp_path)
    assert again.chars == tok.chars and again.describe()["sha256"] == tok.describe()["sha256"]


def test_edit_distance_and_wer():
    assert edit_distance("a b c".split(), "a x c d".split()) == 2  # one substitution, one insertion
    assert edit_distance([], "a b".split()) == 2
    assert normalize_words("Hello, Tom's  CAT!") == ["hello", "tom's", "cat"]
    # corpus-level: errors summed over references' words summed (3 + 1 errors over 4 + 2 words)
    assert wer(["a b c d", "e f"], ["x y z d", "e"]) == pytest.approx(4 / 6)


def test_bigram_arpa_lists_vocabulary(tmp_path):
    vocab = write_bigram_arpa(["The cat sat.", "The dog sat."], tmp_path / "lm.arpa")
    assert vocab == ["cat", "dog", "sat", "the"]
    text = (tmp_path / "lm.arpa").read_text()
    assert "ngram 1=6" in text and "\\end\\" in text

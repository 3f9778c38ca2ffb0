"""The mini voice's character tokenizer."""

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

"""The mini voice's character tokenizer, its numbers → words expansion and the words the voice can say."""

import json
import re

import pytest

from mamtra_cli.mini import BUILTIN_DIR
from mamtra_cli.mini.corpus import generate_sentences
from mamtra_cli.mini.numbers import expand_numbers
from mamtra_cli.mini.text import CharTokenizer, unknown_words, unknown_words_warning, vocabulary


def test_char_tokenizer_normalises_and_round_trips(tmp_path):
    tok = CharTokenizer()
    ids = tok.encode("Hello,  “Café” — OK?")
    assert tok.decode(ids) == 'hello, "cafe" - ok?'
    assert 0 not in ids  # 0 is padding, never produced
    assert tok.encode("a\u00a7b") == tok.encode("a b")  # unknown symbol → space
    tok.save(tmp_path)
    again = CharTokenizer.load(tmp_path)
    assert again.chars == tok.chars and again.describe()["sha256"] == tok.describe()["sha256"]


# ----------------------------------------------------------------------------------------- numbers → words
NUMBER_CASES = {
    # cardinals, with and without thousands separators; compounds with a space as the corpus never hyphenates
    "0": "zero", "7": "seven", "13": "thirteen", "21": "twenty one", "99": "ninety nine", "100": "one hundred",
    "101": "one hundred one", "999": "nine hundred ninety nine", "1000": "one thousand",
    "1,234": "one thousand two hundred thirty four", "12,345": "twelve thousand three hundred forty five",
    "1,000,000": "one million", "123456789012": "one hundred twenty three billion four hundred fifty six million "
    "seven hundred eighty nine thousand twelve",
    "999,999,999,999": "nine hundred ninety nine billion nine hundred ninety nine million nine hundred ninety "
    "nine thousand nine hundred ninety nine",
    "1,000,000,000,000": "one " + "zero " * 11 + "zero",  # beyond the cardinals: digit by digit
    "007": "zero zero seven",
    # signs and decimals
    "-3": "minus three", "(-3)": "(minus three)", "5-3": "five-three", "3.14": "three point one four",
    "-0.25": "minus zero point two five", ".5": "point five",
    # ordinals
    "1st": "first", "2nd": "second", "3rd": "third", "11th": "eleventh", "12th": "twelfth", "20th": "twentieth",
    "22nd": "twenty second", "103rd": "one hundred third", "100th": "one hundredth",
    # percentages and money
    "50%": "fifty percent", "2.5%": "two point five percent", "$5": "five dollars", "$1": "one dollar",
    "£3.50": "three pounds fifty", "$0.99": "ninety nine cents", "$0.01": "one cent", "€2,000": "two thousand euros",
    "-$5": "minus five dollars", "$5 million": "five million dollars",
    "$2.5 Billion": "two point five billion dollars", "$1.5": "one dollar fifty",
    # times
    "10:30": "ten thirty", "7:05": "seven oh five", "9:00": "nine o'clock", "18:00": "eighteen hundred",
    "7:30pm": "seven thirty p m",
    # years (4 digits standing alone) and decades
    "1999": "nineteen ninety nine", "1905": "nineteen oh five", "1900": "nineteen hundred", "1100": "eleven hundred",
    "2024": "twenty twenty four", "2099": "twenty ninety nine", "2000": "two thousand", "2005": "two thousand five",
    "1099": "one thousand ninety nine", "2100": "two thousand one hundred", "1990s": "nineteen nineties",
    "the 80s": "the eighties",
    # symbols and numbers glued to words
    "AT&T": "AT and T", "salt & pepper": "salt and pepper", "mp3": "mp three",
    "On the 3rd, 50% of the $1,200 went at 10:30.":
        "On the third, fifty percent of the one thousand two hundred dollars went at ten thirty.",
    "In 1999 we had 2,500 apples.": "In nineteen ninety nine we had two thousand five hundred apples.",
}


@pytest.mark.parametrize("text", list(NUMBER_CASES))
def test_expand_numbers(text):
    assert expand_numbers(text) == NUMBER_CASES[text]


@pytest.mark.parametrize("text", list(NUMBER_CASES))
def test_normalised_numbers_use_only_the_tokenizer_vocabulary_and_no_digits(text):
    tok = CharTokenizer()
    normalized = tok.normalize(text)
    assert set(normalized) <= set(tok.chars[1:]), normalized
    assert not any(c.isdigit() for c in normalized), normalized
    assert tok.decode(tok.encode(text)) == normalized


def test_normalize_spells_numbers_before_mapping_characters():
    tok = CharTokenizer()
    assert tok.normalize("Tom found 3 keys & 2 maps.") == "tom found three keys and two maps."
    assert tok.normalize("ＡＢ 12") == "ab twelve"  # full-width forms become ASCII digits first (NFKD)


def test_grammar_sentences_have_no_digits_and_are_unchanged_by_number_expansion():
    """The training texts have no digits, so spelling out numbers does not change what the voice was built on."""
    train, test = generate_sentences(3000, 200, seed=0)
    for s in train + test:
        assert not re.search(r"[\d&%$£€]", s), s
        assert expand_numbers(s) == s


# ----------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_covers_every_word_the_grammar_produces():
    vocab = vocabulary()
    assert 250 < len(vocab) < 350
    assert {"hello", "how", "are", "you", "doing", "today", "where", "did", "i", "we", "boxes", "stories"} <= vocab
    fresh, _ = generate_sentences(2000, 0, seed=987654)  # another seed than the one vocabulary() draws with
    for s in fresh:
        assert unknown_words(s) == [], s


def test_unknown_words_lists_words_outside_the_grammar_in_order_once():
    assert unknown_words("Hello, how are you doing today?") == []
    assert unknown_words("Anna found the red book in the kitchen yesterday.") == []
    assert unknown_words("The quantum computer costs $2,500.") == [
        "quantum", "computer", "costs", "thousand", "hundred", "dollars"]
    assert unknown_words("Ninety nine, ninety nine, 99!") == ["ninety"]
    assert unknown_words("We have 22 apples and 1999 apples.") == ["and", "nineteen", "ninety"]
    assert unknown_words("Tom said 'don't' at 9:00.") == ["said", "don't", "o'clock"]


def test_unknown_words_warning_is_one_line_naming_the_words():
    line = unknown_words_warning(["thousand", "ninety"])
    assert "\n" not in line and line.startswith("warning: the mini voice knows only the ")
    assert f" {len(vocabulary())} words " in line and 'README "What the built-in voice can say"' in line
    assert line.endswith("may come out garbled: thousand, ninety.")


# ----------------------------------------------------------------------------------------- mamtra synth
needs_builtin = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(),
                                   reason="the built-in mini voice is not in this checkout (mamtra build-mini)")


@needs_builtin
def test_synth_warns_about_words_outside_the_grammar(tmp_path, capsys):
    from tests.stages.harness import run

    code, out, err = run(capsys, "synth", "The quantum computer costs $2,500.", "--out", tmp_path / "q.wav",
                         "--max-tokens", "5", "--threads", "1", "--json")
    assert code == 0, err
    expected = ["quantum", "computer", "costs", "thousand", "hundred", "dollars"]
    assert json.loads(out)["unknown_words"] == expected
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].endswith("garbled: " + ", ".join(expected) + "."), err

    code, out, err = run(capsys, "synth", "Hello, how are you doing today?", "--out", tmp_path / "h.wav",
                         "--max-tokens", "5", "--threads", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["unknown_words"] == [] and "warning" not in err


def test_other_backends_report_no_unknown_words():
    from mamtra_cli.synthesis.backend import SynthesisBackend

    class Open(SynthesisBackend):  # the interface's defaults, as CosyVoice 2 (an open vocabulary) uses them
        prepare_prompt = synthesize = describe = normalize_text = count_text_tokens = None

    assert Open().unknown_words("The quantum computer costs $2,500.") == []


def test_readme_states_the_vocabulary_size():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### What the built-in voice can say"):]
    assert f"a closed vocabulary of {len(vocabulary())} words" in section[:400]

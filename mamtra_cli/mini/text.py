"""The mini voice's text tokenizer: one token per character of lower-cased text, and the words it can say.

The vocabulary is fixed (written to the model dir as `text_vocab.json`), so synthesis needs no phonemiser
and no downloaded tokenizer. Characters outside it are mapped: letters with accents lose them (NFKD),
curly quotes and dashes become their ASCII forms, numbers and "&" become English words
(`mamtra_cli.mini.numbers`), and anything still unknown becomes a space.

The voice was trained only on sentences of the small grammar of `mamtra_cli.mini.corpus`: `vocabulary()` is
the set of words that grammar can produce and `unknown_words(text)` the words of a text outside it (which
the voice usually garbles; `mamtra synth` warns about them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from pathlib import Path

from mamtra_cli.errors import UserError
from mamtra_cli.mini.numbers import expand_numbers

VOCAB_FILE = "text_vocab.json"
# id 0 = padding (never produced), then space, letters, digits, punctuation.
DEFAULT_CHARS = ["<pad>", " "] + list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,?!;:'\"-()")
_ASCII_MAP = {"’": "'", "‘": "'", "“": '"', "”": '"', "–": "-", "—": "-", "…": "..."}


class CharTokenizer:
    def __init__(self, chars: list[str] = DEFAULT_CHARS):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.space = self.index[" "]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def normalize(self, text: str) -> str:
        text = "".join(_ASCII_MAP.get(c, c) for c in text)
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
        text = expand_numbers(text).lower()  # the training texts have no digits: say them as words
        text = "".join(c if c in self.index else " " for c in text)
        return " ".join(text.split())  # collapse runs of spaces

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in self.normalize(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if 0 < i < len(self.chars))

    def count_tokens(self, text: str) -> int:
        return len(self.normalize(text))

    def describe(self) -> dict:
        """Name and fingerprint, for manifest headers (tokens of different tokenizers must not mix)."""
        blob = json.dumps(self.chars).encode()
        return {"name": "mini-char", "vocab_size": self.vocab_size, "sha256": hashlib.sha256(blob).hexdigest()}

    def save(self, directory: Path) -> None:
        (Path(directory) / VOCAB_FILE).write_text(json.dumps({"type": "char", "chars": self.chars}, indent=0) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "CharTokenizer":
        path = Path(directory) / VOCAB_FILE
        if not path.is_file():
            raise UserError(f"{directory} has no {VOCAB_FILE}; it is not a mini-voice model directory "
                            "(rebuild with `mamtra build-mini`).")
        d = json.loads(path.read_text())
        return cls(d["chars"])


# ----------------------------------------------------------------------------------------- what it can say
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_GRAMMAR_SAMPLE = 5000  # sentences drawn to collect the templates' own words ("did", "where", "how", …)


def words(normalized: str) -> list[str]:
    """The words of an already normalised text, in order (letters with inner apostrophes; hyphens split)."""
    return _WORD.findall(normalized)


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word the mini voice's training grammar (`mamtra_cli.mini.corpus`) can produce, lower case: the
    words of its lists (names, people, adjectives, nouns and their plurals, places, times, verbs, greetings,
    numbers) plus those of its templates, collected from a sample of generated sentences."""
    from mamtra_cli.mini import corpus

    lists = (corpus.NAMES, corpus.PEOPLE, corpus.ADJECTIVES, corpus.NOUNS, corpus.PLACES, corpus.TIMES,
             corpus.VERBS_PAST, corpus.VERBS_BASE, corpus.INTRANS_PAST, corpus.INTRANS_ING, corpus.GREETINGS,
             corpus.NUMBERS, [corpus._plural(n) for n in corpus.NOUNS])
    found = {w for phrases in lists for phrase in phrases for w in words(phrase.lower())}
    sample, _ = corpus.generate_sentences(_GRAMMAR_SAMPLE, 0, seed=20240612)
    for sentence in sample:
        found.update(words(sentence.lower()))
    return frozenset(found)


def unknown_words(text: str, tokenizer: CharTokenizer | None = None) -> list[str]:
    """The words of `text`, once normalised as the voice reads it (numbers spelled out), that are not in
    `vocabulary()`: in order of first appearance, each once."""
    normalized = (tokenizer or CharTokenizer()).normalize(text)
    vocab = vocabulary()
    return list(dict.fromkeys(w for w in words(normalized) if w not in vocab))


def unknown_words_warning(unknown: list[str]) -> str:
    """The one-line warning `mamtra synth` prints for the words of `unknown_words`."""
    return (f"warning: the mini voice knows only the {len(vocabulary())} words of its training grammar (see README "
            f'"What the built-in voice can say"); these words are outside it and may come out garbled: '
            f"{', '.join(unknown)}.")

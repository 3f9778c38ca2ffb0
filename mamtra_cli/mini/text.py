"""The mini voice's text tokenizer: one token per character of lower-cased text.

The vocabulary is fixed (written to the model dir as `text_vocab.json`), so synthesis needs no phonemiser
and no downloaded tokenizer. Characters outside it are mapped: letters with accents lose them (NFKD),
curly quotes and dashes become their ASCII forms, and anything still unknown becomes a space.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

from mamtra_cli.errors import UserError

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
        text = "".join(c for c in text if not unicodedata.combining(c)).lower()
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

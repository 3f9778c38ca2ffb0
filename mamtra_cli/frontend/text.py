"""CosyVoice 2's text tokenizer: Qwen2 byte-level BPE plus CosyVoice's extra special tokens.

Built with the `tokenizers` library from the files of `CosyVoice-BlankEN/`:
  vocab.json, merges.txt      the Qwen2 byte-level BPE (GPT-2 byte↔unicode alphabet)
  tokenizer_config.json       `added_tokens_decoder`: the special tokens already in the model
                              (<|endoftext|>, <|im_start|>, <|im_end|> in the real one), with their ids
The pipeline is the one transformers builds for Qwen2TokenizerFast: NFC normaliser, Qwen2's split
regex then byte-level mapping, no BOS, byte-level decoder.

CosyVoice 2 then adds its own special tokens in a fixed order (cosyvoice/tokenizer/tokenizer.py,
`CosyVoice2Tokenizer`); tokens already present keep their id, new ones get the next free id, so in the
real model <|endofprompt|> = 151646, [breath] = 151647, and so on.

Light text normalisation (`normalize_text`, applied by `encode` unless normalize=False):
  1. Unicode NFC;
  2. curly single quotes/apostrophes → ', curly/low/angle double quotes → ", en/em dashes, the
     horizontal bar and the minus sign → -, the ellipsis character → ..., non-breaking and other
     Unicode spaces → space, zero-width characters removed;
  3. every run of whitespace (newlines and tabs included) → one space; leading/trailing space stripped.
With `use_wetext=True` and the `wetext` package importable, its English/Chinese normaliser (the one
CosyVoice's inference front end uses) runs first; without it that step is silently skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path

from mamtra_cli.errors import UserError

INSTALL_HINT = "pip install 'mamtra[cosyvoice]'"

# CosyVoice2Tokenizer's special tokens, in the order CosyVoice adds them.
COSYVOICE2_EXTRA_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>",
    "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]",
    "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
)
EOS_TOKEN = "<|endoftext|>"

# transformers' Qwen2 pre-tokenisation regex.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

NORMALIZATION_VERSION = 1

_CHAR_MAP = {
    **{c: "'" for c in "\u2018\u2019\u201a\u201b\u2032"},
    **{c: '"' for c in "\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033"},
    **{c: "-" for c in "\u2010\u2011\u2012\u2013\u2014\u2015\u2212"},
    "\u2026": "...",
    **{c: "" for c in "\u200b\u200c\u200d\u2060\ufeff"},
}
_CHAR_TABLE = str.maketrans(_CHAR_MAP)
_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The light normalisation described in the module docstring (no wetext)."""
    text = unicodedata.normalize("NFC", text).translate(_CHAR_TABLE)
    return _WS.sub(" ", text).strip()


def _wetext_normalizer():
    try:
        from wetext import Normalizer  # type: ignore
    except Exception:
        return None
    try:
        return Normalizer()
    except Exception:
        return None


class TextTokenizer:
    """Qwen2 BPE + CosyVoice 2 special tokens. `encode(text) -> list[int]`, `decode(ids) -> str`."""

    def __init__(self, tokenizer, name: str, fingerprint: str, special_tokens: dict[str, int],
                 use_wetext: bool = False):
        self._tok = tokenizer
        self.name = name
        self.sha256 = fingerprint
        self.special_tokens = special_tokens
        self._wetext = _wetext_normalizer() if use_wetext else None

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path, extra_special_tokens=COSYVOICE2_EXTRA_SPECIAL_TOKENS,
                 use_wetext: bool = False) -> "TextTokenizer":
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"Text tokenizer directory {directory} does not exist; pass the CosyVoice-BlankEN "
                            "folder of a CosyVoice 2 model (or --assets with the model directory).")
        files = {name: directory / name for name in ("vocab.json", "merges.txt", "tokenizer_config.json")}
        for name, path in files.items():
            if not path.is_file():
                raise UserError(f"Text tokenizer file {path} is missing; {directory} must hold vocab.json, "
                                "merges.txt and tokenizer_config.json (the CosyVoice-BlankEN folder).")
        try:
            from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
            from tokenizers.models import BPE
        except ImportError:
            raise UserError(f"The text tokenizer needs the `tokenizers` package; install it with "
                            f"`{INSTALL_HINT}`.") from None

        vocab = _read_json(files["vocab.json"])
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise UserError(f"{files['vocab.json']} is not a Qwen2 vocabulary (a JSON object token -> id).")
        merges = _read_merges(files["merges.txt"])
        config = _read_json(files["tokenizer_config.json"])
        if not isinstance(config, dict):
            raise UserError(f"{files['tokenizer_config.json']} is not a JSON object.")

        try:
            tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                byte_fallback=False))
        except Exception as e:
            raise UserError(f"Cannot build the BPE from {files['vocab.json']} and {files['merges.txt']} ({e}); "
                            "are they a matching Qwen2 pair?") from None
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)),
                                     use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

        # Added tokens of the config, with their explicit ids (set through the serialised form so that
        # ids are honoured exactly, gaps included).
        added = _added_tokens_from_config(config, files["tokenizer_config.json"])
        if added:
            state = json.loads(tok.to_str())
            state["added_tokens"] = [
                {"id": i, "content": t["content"], "single_word": bool(t.get("single_word", False)),
                 "lstrip": bool(t.get("lstrip", False)), "rstrip": bool(t.get("rstrip", False)),
                 "normalized": bool(t.get("normalized", False)), "special": bool(t.get("special", True))}
                for i, t in added]
            tok = Tokenizer.from_str(json.dumps(state))

        # CosyVoice's extra special tokens (and eos/pad), in CosyVoice's order.
        wanted = [EOS_TOKEN, *extra_special_tokens]
        new = [t for t in dict.fromkeys(wanted) if tok.token_to_id(t) is None]
        if new:
            tok.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False,
                                               normalized=False, special=True) for t in new])
        special = {t: tok.token_to_id(t) for t in dict.fromkeys(wanted)}

        h = hashlib.sha256()
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            h.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
        h.update(json.dumps(list(extra_special_tokens)).encode())
        return cls(tok, directory.name, h.hexdigest(), special, use_wetext=use_wetext)

    # -- use ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def normalize(self, text: str) -> str:
        if self._wetext is not None:
            try:
                text = self._wetext.normalize(text)
            except Exception:
                pass
        return normalize_text(text)

    def encode(self, text: str, normalize: bool = True) -> list[int]:
        """Token ids of `text` (no BOS/EOS). Special tokens written in the text (e.g. <|endofprompt|>)
        map to their ids, as in CosyVoice."""
        if normalize:
            text = self.normalize(text)
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"Cannot read {path} as JSON ({e}); is the tokenizer folder complete?") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt as Qwen2Tokenizer reads it: an optional `#version:` first line, blank lines ignored,
    each other line two space-separated symbols."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read {path} ({e}).") from None
    merges = []
    for i, line in enumerate(lines):
        line = line.strip()
        if not line or (i == 0 and line.startswith("#version:")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{path} line {i + 1} is not a BPE merge (two symbols separated by a space).")
        merges.append((parts[0], parts[1]))
    return merges


def _added_tokens_from_config(config: dict, path: Path) -> list[tuple[int, dict]]:
    dec = config.get("added_tokens_decoder") or {}
    out = []
    if not isinstance(dec, dict):
        raise UserError(f"{path}: 'added_tokens_decoder' must be an object id -> token.")
    for k, v in dec.items():
        try:
            i = int(k)
        except ValueError:
            raise UserError(f"{path}: added token id {k!r} is not an integer.") from None
        if isinstance(v, str):
            v = {"content": v}
        if not isinstance(v, dict) or "content" not in v:
            raise UserError(f"{path}: added token {k} has no 'content'.")
        out.append((i, v))
    return sorted(out)

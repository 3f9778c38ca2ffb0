"""Data manifests: the JSONL files of (text tokens, speech tokens) that score, distill and prepare share.

One utterance a line:
    {"utt": "u1", "text_tokens": [...], "speech_tokens": [...], "text": "...", "spk": "..."}
("text" and "spk" optional). The first line may be a header record naming the tokenizers that produced
the ids, so that tokens from different speech tokenizers are never mixed silently:
    {"mamtra_manifest": 1, "text_tokenizer": {"name": ..., "sha256": ...}, "speech_tokenizer": {...}}
A manifest path is either one .jsonl file or a directory of `*.jsonl` shards (read in name order).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mamtra_cli.errors import UserError

HEADER_KEY = "mamtra_manifest"
FORMAT_VERSION = 1


@dataclass
class Utterance:
    utt: str
    text_tokens: list[int]
    speech_tokens: list[int]
    text: str | None = None
    spk: str | None = None

    def to_json(self) -> dict:
        d = {"utt": self.utt, "text_tokens": self.text_tokens, "speech_tokens": self.speech_tokens}
        if self.text is not None:
            d["text"] = self.text
        if self.spk is not None:
            d["spk"] = self.spk
        return d


@dataclass
class ManifestHeader:
    text_tokenizer: dict | None = None
    speech_tokenizer: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {HEADER_KEY: FORMAT_VERSION, "text_tokenizer": self.text_tokenizer,
             "speech_tokenizer": self.speech_tokenizer}
        d.update(self.extra)
        return d


def manifest_files(path: Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"Data manifest {path} does not exist; pass a JSONL file written by `mamtra prepare`.")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if not p.name.startswith("."))
        if not files:
            raise UserError(f"Directory {path} holds no *.jsonl shards; pass a JSONL manifest file or a "
                            "directory written by `mamtra prepare`.")
        return files
    return [path]


def _parse_utterance(obj, where: str) -> Utterance:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    for key in ("utt", "text_tokens", "speech_tokens"):
        if key not in obj:
            raise UserError(f"{where}: missing field {key!r}; each line needs utt, text_tokens and speech_tokens.")
    utt = obj["utt"]
    if not isinstance(utt, (str, int)) or str(utt) == "":
        raise UserError(f"{where}: 'utt' must be a non-empty string.")
    lists = {}
    for key in ("text_tokens", "speech_tokens"):
        v = obj[key]
        if not isinstance(v, list) or not v:
            raise UserError(f"{where}: {key!r} must be a non-empty list of integer token ids.")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise UserError(f"{where}: {key!r} must hold integer token ids only.")
        lists[key] = v
    return Utterance(str(utt), lists["text_tokens"], lists["speech_tokens"], obj.get("text"), obj.get("spk"))


def read_manifest(path: Path, text_vocab: int | None = None, speech_vocab: int | None = None
                  ) -> tuple[ManifestHeader, list[Utterance]]:
    """Read and validate a manifest. Token ids are checked against the vocabularies when given
    (speech ids must be < speech_vocab, i.e. real codes, never eos/fill); every problem names the
    file and line."""
    header = ManifestHeader()
    utts: list[Utterance] = []
    seen: dict[str, str] = {}
    for f in manifest_files(path):
        try:
            lines = Path(f).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"Cannot read data manifest {f}: {e}.") from None
        for lineno, line in enumerate(lines, 1):
            where = f"{f} line {lineno}"
            if not line.strip():
                raise UserError(f"{where} is empty; remove blank lines from the manifest.")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not valid JSON ({e.msg}); fix or remove that line.") from None
            if isinstance(obj, dict) and HEADER_KEY in obj:
                h = ManifestHeader(obj.get("text_tokenizer"), obj.get("speech_tokenizer"),
                                   {k: v for k, v in obj.items()
                                    if k not in (HEADER_KEY, "text_tokenizer", "speech_tokenizer")})
                _merge_header(header, h, where)
                continue
            u = _parse_utterance(obj, where)
            if text_vocab is not None:
                bad = [t for t in u.text_tokens if not 0 <= t < text_vocab]
                if bad:
                    raise UserError(f"{where}: text token id {bad[0]} is outside the model's text vocabulary "
                                    f"[0, {text_vocab}); was the manifest made with another tokenizer?")
            if speech_vocab is not None:
                bad = [t for t in u.speech_tokens if not 0 <= t < speech_vocab]
                if bad:
                    raise UserError(f"{where}: speech token id {bad[0]} is outside the model's speech vocabulary "
                                    f"[0, {speech_vocab}); was the manifest made with another speech tokenizer?")
            if u.utt in seen:
                raise UserError(f"{where}: utterance id {u.utt!r} repeats {seen[u.utt]}; utt ids must be unique.")
            seen[u.utt] = where
            utts.append(u)
    if not utts:
        raise UserError(f"Data manifest {path} holds no utterances; prepare data with `mamtra prepare`.")
    return header, utts


def _merge_header(into: ManifestHeader, h: ManifestHeader, where: str) -> None:
    """Shards of one manifest must agree on their tokenizers."""
    for name in ("text_tokenizer", "speech_tokenizer"):
        a, b = getattr(into, name), getattr(h, name)
        if a is not None and b is not None and a != b:
            raise UserError(f"{where}: its {name} differs from an earlier shard's; "
                            "tokens from different tokenizers must not be mixed.")
        if a is None:
            setattr(into, name, b)
    into.extra.update(h.extra)


def check_same_tokenizers(a: ManifestHeader, b: ManifestHeader, what_a: str, what_b: str) -> None:
    for name in ("text_tokenizer", "speech_tokenizer"):
        ta, tb = getattr(a, name), getattr(b, name)
        if ta and tb and ta.get("sha256") and tb.get("sha256") and ta["sha256"] != tb["sha256"]:
            raise UserError(f"{what_a} and {what_b} were made with different {name.replace('_', ' ')}s "
                            f"({ta.get('name')} vs {tb.get('name')}); re-prepare one of them.")


def write_manifest(path: Path, header: ManifestHeader | None, utterances: Iterable[Utterance]) -> int:
    """Write atomically (temp file, then rename). Returns the number of utterances written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "w") as f:
        if header is not None:
            f.write(json.dumps(header.to_json()) + "\n")
        for u in utterances:
            f.write(json.dumps(u.to_json()) + "\n")
            n += 1
    os.replace(tmp, path)
    return n

"""Speech corpora as lists of utterances, one lister per layout (`mamtra prepare --source`).

  libritts           a LibriTTS tree: every `*.wav` with its `*.normalized.txt`; speaker = the part of
                     the file name before the first `_` (19_198_000000_000000.wav → speaker 19).
  kaldi              a Kaldi data folder: `wav.scp` (utt path), `text` (utt transcript), optional
                     `utt2spk` (without it, or for an utterance it lacks, the speaker is the utt id).
                     Relative paths are looked up from the current directory, then from the folder.
  cosyvoice-parquet  CosyVoice's prepared lists: `data.list` (or the folder holding it) naming parquet
                     shards with columns utt, text, spk, audio_data and usually speech_token. Present
                     speech tokens are used as they are (no audio is decoded); otherwise audio_data is
                     tokenized. Text is always re-tokenized with the given text tokenizer.
  seedtts            a Seed-TTS-eval `meta.lst` (or its folder), lines `utt|prompt_text|prompt_wav|text`:
                     each distinct prompt wav becomes an utterance (id = its file stem) and, where
                     `wavs/<utt>.wav` exists next to meta.lst, the target too; both take the prompt
                     wav's stem as speaker.

A lister reads no audio: problems it can see from the files alone (a transcript without audio, a pipe in
wav.scp) are recorded on the `Item` as a skip reason, so they are counted with the others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mamtra_cli.errors import UserError

SOURCES = ("libritts", "kaldi", "cosyvoice-parquet", "seedtts")

# Why an utterance is skipped (the keys count the skips in shard headers and in the summary).
REASONS = {
    "no_transcript": "audio without a transcript",
    "no_audio": "transcript without an audio file",
    "empty_transcript": "empty transcript",
    "unreadable_audio": "corrupt or unreadable audio",
    "too_long": "longer than 30 s",
    "too_short": "too short to tokenize",
    "no_speech_tokens": "no speech tokens",
    "unsupported_entry": "unsupported wav.scp entry (pipe or ark)",
    "duplicate_utt": "duplicate utterance id",
    "error": "unexpected error",
}


@dataclass
class Item:
    """One utterance as a lister found it: where its text and audio (or precomputed tokens) are."""

    utt: str
    spk: str
    text: Optional[str] = None
    audio: Optional[str] = None             # a file path
    parquet: Optional[tuple] = None         # (parquet file, row) for audio_data inside a parquet shard
    tokens: Optional[list] = None           # precomputed speech tokens
    embedding: Optional[list] = None        # precomputed utt_embedding (parquet)
    stamp: str = ""                         # size:mtime of the audio's file, for the shard key
    skip: Optional[str] = None              # reason found while listing
    detail: str = ""

    def key_fields(self):
        """What decides this utterance's manifest line: part of its shard's key."""
        tok = hashlib.sha256(json.dumps(self.tokens).encode()).hexdigest()[:16] if self.tokens is not None else None
        return [self.utt, self.spk, self.text, self.audio, list(self.parquet) if self.parquet else None,
                tok, self.stamp, self.skip]


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def list_libritts(root: Path) -> list[Item]:
    if not root.is_dir():
        raise UserError(f"LibriTTS input {root} is not a directory; pass the corpus root (or a subset "
                        "such as train-clean-100).")
    items: dict[str, Item] = {}
    for wav in sorted(root.rglob("*.wav")):
        utt = wav.stem
        spk = utt.split("_", 1)[0]
        it = Item(utt=utt, spk=spk, audio=str(wav), stamp=_stamp(wav))
        txt = wav.with_name(utt + ".normalized.txt")
        if not txt.is_file():
            it.skip, it.detail = "no_transcript", f"{txt.name} missing"
        else:
            it.text = txt.read_text(encoding="utf-8", errors="replace")
        items.setdefault(utt, it)
    for txt in sorted(root.rglob("*.normalized.txt")):
        utt = txt.name[: -len(".normalized.txt")]
        if utt not in items:
            items[utt] = Item(utt=utt, spk=utt.split("_", 1)[0], skip="no_audio", detail=f"{utt}.wav missing")
    if not items:
        raise UserError(f"No *.wav or *.normalized.txt files under {root}; is it a LibriTTS tree?")
    return list(items.values())


def _kaldi_table(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        out[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return out


def list_kaldi(folder: Path) -> list[Item]:
    if not folder.is_dir():
        raise UserError(f"Kaldi input {folder} is not a directory; pass a folder holding wav.scp and text.")
    for name in ("wav.scp", "text"):
        if not (folder / name).is_file():
            raise UserError(f"Kaldi folder {folder} has no {name}; a Kaldi data folder needs wav.scp and text.")
    wavs = _kaldi_table(folder / "wav.scp")
    texts = _kaldi_table(folder / "text")
    spks = _kaldi_table(folder / "utt2spk") if (folder / "utt2spk").is_file() else {}
    items = []
    for utt in sorted(set(wavs) | set(texts)):
        spk = spks.get(utt, "").split()
        it = Item(utt=utt, spk=spk[0] if spk else utt)
        if utt not in wavs:
            it.skip, it.detail = "no_audio", "not in wav.scp"
        else:
            entry = wavs[utt]
            if entry.endswith("|") or (".ark:" in entry and not Path(entry).exists()):
                it.skip, it.detail = "unsupported_entry", entry
            else:
                p = Path(entry)
                if not p.is_absolute() and not p.exists() and (folder / p).exists():
                    p = folder / p
                if not p.is_file():
                    it.skip, it.detail = "no_audio", f"{entry} does not exist"
                else:
                    it.audio, it.stamp = str(p), _stamp(p)
        if it.skip is None and utt not in texts:
            it.skip, it.detail = "no_transcript", "not in text"
        it.text = texts.get(utt)
        items.append(it)
    if not items:
        raise UserError(f"Kaldi folder {folder} lists no utterances in wav.scp or text.")
    return items


def list_parquet(path: Path, need_audio_always: bool) -> list[Item]:
    data_list = path / "data.list" if path.is_dir() else path
    if not data_list.is_file():
        raise UserError(f"CosyVoice parquet input {path} has no data.list; pass data.list or its folder.")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Reading CosyVoice parquet lists needs the pyarrow package; install it with "
                        "`pip install 'mamtra[cosyvoice]'`.") from None
    items = []
    for line in data_list.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        f = Path(line)
        if not f.is_absolute() and not f.exists() and (data_list.parent / f).exists():
            f = data_list.parent / f
        if not f.is_file():
            raise UserError(f"{data_list} names {line}, which does not exist; fix the list or its paths.")
        try:
            schema = pq.read_schema(f)
            cols = [c for c in ("utt", "text", "spk", "speech_token", "utt_embedding") if c in schema.names]
            table = pq.read_table(f, columns=cols)
        except Exception as e:
            raise UserError(f"Cannot read parquet shard {f} ({e}); is it a CosyVoice parquet file?") from None
        if "utt" not in schema.names or "text" not in schema.names:
            raise UserError(f"Parquet shard {f} has no 'utt' or 'text' column; it is not a CosyVoice list.")
        has_tokens = "speech_token" in schema.names
        if not has_tokens and "audio_data" not in schema.names:
            raise UserError(f"Parquet shard {f} has neither speech_token nor audio_data; nothing to tokenize.")
        stamp = _stamp(f)
        d = table.to_pydict()
        for row, utt in enumerate(d["utt"]):
            spk = d["spk"][row] if "spk" in d and d["spk"][row] is not None else str(utt)
            it = Item(utt=str(utt), spk=str(spk), text=d["text"][row], stamp=stamp)
            if has_tokens and d["speech_token"][row] is not None:
                it.tokens = [int(t) for t in d["speech_token"][row]]
                if not it.tokens:
                    it.skip, it.detail = "no_speech_tokens", "empty speech_token (over 30 s when extracted?)"
            if "utt_embedding" in d and d["utt_embedding"][row] is not None:
                it.embedding = [float(x) for x in d["utt_embedding"][row]]
            if it.tokens is None or need_audio_always:
                if "audio_data" not in schema.names:
                    it.skip, it.detail = "no_audio", "no audio_data column"
                else:
                    it.parquet = (str(f), row)
            items.append(it)
    if not items:
        raise UserError(f"{data_list} lists no utterances.")
    return items


def list_seedtts(path: Path) -> list[Item]:
    meta = path / "meta.lst" if path.is_dir() else path
    if not meta.is_file():
        raise UserError(f"Seed-TTS-eval input {path} has no meta.lst; pass meta.lst or its folder.")
    base = meta.parent
    items: dict[str, Item] = {}
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 4:
            raise UserError(f"{meta} line {lineno} is not `utt|prompt_text|prompt_wav|text`.")
        utt, prompt_text, prompt_wav, text = parts[0].strip(), parts[1], parts[2].strip(), "|".join(parts[3:])
        pw = Path(prompt_wav) if Path(prompt_wav).is_absolute() else base / prompt_wav
        spk = Path(prompt_wav).stem
        if spk not in items:
            it = Item(utt=spk, spk=spk, text=prompt_text)
            if pw.is_file():
                it.audio, it.stamp = str(pw), _stamp(pw)
            else:
                it.skip, it.detail = "no_audio", f"{prompt_wav} does not exist"
            items[spk] = it
        target = base / "wavs" / f"{utt}.wav"
        if target.is_file() and utt not in items:
            items[utt] = Item(utt=utt, spk=spk, text=text, audio=str(target), stamp=_stamp(target))
    if not items:
        raise UserError(f"{meta} lists no utterances.")
    return list(items.values())


def list_source(source: str, input: Path) -> list[Item]:
    """Every utterance of `input` in layout `source`; a second listing of one utt id is skipped as a duplicate."""
    if source not in SOURCES:
        raise UserError(f"Unknown --source {source!r}; choose one of {', '.join(SOURCES)}.")
    if source == "libritts":
        items = list_libritts(input)
    elif source == "kaldi":
        items = list_kaldi(input)
    elif source == "seedtts":
        items = list_seedtts(input)
    else:
        items = list_parquet(input, need_audio_always=False)
    seen: set[str] = set()
    for it in items:
        if it.utt in seen and not it.skip:
            it.skip, it.detail = "duplicate_utt", "utt id already listed"
        seen.add(it.utt)
    return items


def attach_parquet_audio(items: list[Item], input: Path) -> list[Item]:
    """For --embeddings on parquet lists without utt_embedding: re-list with audio references."""
    by_utt = {it.utt: it for it in list_parquet(input, need_audio_always=True)}
    for it in items:
        ref = by_utt.get(it.utt)
        if it.embedding is None and ref is not None and ref.parquet is not None:
            it.parquet = ref.parquet
    return items

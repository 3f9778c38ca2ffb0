"""`mamtra prepare`: turn a speech corpus into sharded JSONL data manifests (text tokens + speech tokens).

Sources (`--source`):
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

Output DIR:
  train/shard-NNNNN.jsonl, val/shard-NNNNN.jsonl   data manifests (`mamtra_cli.data_manifest`), each
                     with a header naming the text and speech tokenizer (name + sha256), its shard key
                     and its statistics; `shard-NNNNN.emb.npz` beside them with --embeddings
  manifest.json      provenance and the summary (written last)

The split is by speaker: with the seed, a shuffled list of the speakers gives round(val_fraction × n)
speakers (at least 1 when val_fraction > 0 and there are 2+ speakers, never all) to val.
Work happens in a sibling folder `.DIR.partial`; each shard file is written atomically, so a crash never
leaves half a shard, and a re-run with the same inputs keeps every shard whose key (its utterances,
their files' size and mtime, the tokenizers, the settings) still matches. When all is done the folder is
renamed to DIR. A re-run on a finished DIR with the same inputs does nothing. A run that fails before any
shard is finished (a front-end model that does not load, in the parent or in any --jobs worker) stops
with one sentence and removes `.DIR.partial`, which would hold nothing worth resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

SOURCES = ("libritts", "kaldi", "cosyvoice-parquet", "seedtts")
PLAN_VERSION = 1
SAMPLE_RATE = 16000
CHUNK = 8  # utterances per task sent to a worker

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


# ----------------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------------

@dataclass
class Item:
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
        tok = hashlib.sha256(json.dumps(self.tokens).encode()).hexdigest()[:16] if self.tokens is not None else None
        return [self.utt, self.spk, self.text, self.audio, list(self.parquet) if self.parquet else None,
                tok, self.stamp, self.skip]


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def list_libritts(root: Path) -> list[Item]:
    from mamtra_cli.errors import UserError

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
    from mamtra_cli.errors import UserError

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
    from mamtra_cli.errors import UserError

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
    from mamtra_cli.errors import UserError

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


# ----------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------

_STATE: dict = {}


def _worker_init(cfg: dict, set_torch_threads: bool = True) -> None:
    from mamtra_cli.frontend.speech_tokenizer import SpeakerEmbedder, SpeechTokenizer
    from mamtra_cli.frontend.text import TextTokenizer

    if set_torch_threads:
        import torch

        torch.set_num_threads(1)
    _STATE.clear()
    _STATE["text"] = TextTokenizer.from_dir(cfg["tokenizer_dir"])
    _STATE["speech"] = SpeechTokenizer(cfg["speech_tokenizer"]) if cfg.get("speech_tokenizer") else None
    _STATE["spk"] = SpeakerEmbedder(cfg["campplus"]) if cfg.get("campplus") else None
    _STATE["embeddings"] = bool(cfg.get("embeddings"))
    _STATE["normalize_text"] = bool(cfg.get("normalize_text", True))
    _STATE["parquet"] = (None, None)


def _pool_worker_init(cfg: dict) -> None:
    """`_worker_init` for a worker of the multiprocessing pool. It must not raise: a pool replaces a worker
    whose initializer fails and runs the initializer again, forever (a corrupt speech tokenizer ONNX gave 136
    tracebacks in 10 minutes and never an exit). The failure is kept instead, and the worker's first task
    raises it (`_process_chunk`), which ends the run in the parent with that one sentence."""
    from mamtra_cli.errors import UserError

    try:
        _worker_init(cfg)
    except UserError as e:
        _STATE.clear()
        _STATE["init_error"] = str(e)
    except Exception as e:  # noqa: BLE001 - whatever it is, it must reach the parent as one sentence
        _STATE.clear()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        _STATE["init_error"] = (f"A prepare worker could not load the front-end models ({type(e).__name__}: "
                                f"{first}); check --speech-tokenizer, --campplus and --tokenizer-dir.")


def _parquet_audio(file: str, row: int) -> bytes:
    cached_file, table = _STATE.get("parquet", (None, None))
    if cached_file != file:
        import pyarrow.parquet as pq

        table = pq.read_table(file, columns=["audio_data"]).column("audio_data")
        _STATE["parquet"] = (file, table)
    return table[row].as_py()


def _process_item(it: Item) -> dict:
    """One utterance → {"utt", "ok": True, "utterance": {...}, "seconds", "embedding"} or a skip."""
    from mamtra_cli.errors import UserError
    from mamtra_cli.frontend.audio import load_audio

    def skip(reason, detail=""):
        return {"utt": it.utt, "ok": False, "reason": reason, "detail": detail}

    if it.skip:
        return skip(it.skip, it.detail)
    text_tok = _STATE["text"]
    # Off: only whitespace is collapsed, as CosyVoice's own Kaldi → parquet recipe leaves the text.
    text = text_tok.normalize(it.text or "") if _STATE["normalize_text"] else " ".join((it.text or "").split())
    if not text:
        return skip("empty_transcript")
    text_tokens = text_tok.encode(text, normalize=False)
    if not text_tokens:
        return skip("empty_transcript")
    wav = None
    if it.audio is not None or it.parquet is not None:
        try:
            if it.audio is not None:
                wav = load_audio(it.audio, SAMPLE_RATE)
            else:
                wav = load_audio(_parquet_audio(*it.parquet), SAMPLE_RATE,
                                 name=f"{it.parquet[0]} row {it.parquet[1]} ({it.utt})")
        except UserError as e:
            return skip("unreadable_audio", str(e))
        if wav.size == 0:
            return skip("unreadable_audio", "no samples")
    if it.tokens is not None:
        tokens = it.tokens
        seconds = wav.size / SAMPLE_RATE if wav is not None else len(tokens) / 25.0
    else:
        speech = _STATE["speech"]
        seconds = wav.size / SAMPLE_RATE
        tokens, reason = speech.tokenize_or_reason(wav)
        if tokens is None:
            return skip("too_long" if reason.startswith("longer") else "too_short", reason)
        if not tokens:
            return skip("no_speech_tokens")
    emb = None
    if _STATE["embeddings"]:
        if it.embedding is not None:
            emb = it.embedding
        elif _STATE["spk"] is not None and wav is not None and wav.size >= 400:
            emb = _STATE["spk"].embed(wav).tolist()
        else:
            return skip("too_short", "too short for a speaker embedding")
    utt = {"utt": it.utt, "text_tokens": text_tokens, "speech_tokens": [int(t) for t in tokens],
           "text": text, "spk": it.spk}
    return {"utt": it.utt, "ok": True, "utterance": utt, "seconds": seconds, "embedding": emb}


def _process_chunk(task: tuple) -> tuple:
    if "init_error" in _STATE:  # this worker could not start: stop the run (see _pool_worker_init)
        from mamtra_cli.errors import UserError

        raise UserError(_STATE["init_error"])
    shard_id, items = task
    out = []
    for it in items:
        try:
            out.append(_process_item(it))
        except Exception as e:  # one odd file must not end a long run; it is counted and logged
            out.append({"utt": it.utt, "ok": False, "reason": "error", "detail": f"{type(e).__name__}: {e}"})
    return shard_id, out


# ----------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------

@dataclass
class Shard:
    split: str
    name: str
    items: list
    key: str = ""
    results: list = field(default_factory=list)


def split_speakers(speakers: list[str], val_fraction: float, seed: int) -> set[str]:
    spk = sorted(set(speakers))
    if val_fraction <= 0 or len(spk) < 2:
        return set()
    n_val = min(len(spk) - 1, max(1, round(val_fraction * len(spk))))
    random.Random(seed).shuffle(spk)
    return set(spk[:n_val])


def plan_shards(items: list[Item], val_spk: set[str], shard_size: int, common_key: dict) -> list[Shard]:
    shards = []
    for split in ("train", "val"):
        mine = sorted((it for it in items if (it.spk in val_spk) == (split == "val")), key=lambda it: it.utt)
        for k, start in enumerate(range(0, len(mine), shard_size)):
            sh = Shard(split, f"shard-{k:05d}", mine[start:start + shard_size])
            blob = json.dumps([common_key, split, sh.name, [it.key_fields() for it in sh.items]],
                              sort_keys=True, ensure_ascii=False)
            sh.key = hashlib.sha256(blob.encode()).hexdigest()
            shards.append(sh)
    return shards


def _shard_header(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        obj = json.loads(first)
        return obj if isinstance(obj, dict) and "mamtra_manifest" in obj else None
    except (OSError, json.JSONDecodeError):
        return None


def _shard_done(directory: Path, sh: Shard, embeddings: bool) -> Optional[dict]:
    """The header of a finished shard with the right key, else None."""
    path = directory / sh.split / f"{sh.name}.jsonl"
    h = _shard_header(path) if path.is_file() else None
    if not h or h.get("shard_key") != sh.key:
        return None
    if embeddings and not (directory / sh.split / f"{sh.name}.emb.npz").is_file():
        return None
    return h


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------

def prepare(
    source: Annotated[str, typer.Option("--source", help="Input layout: libritts, kaldi, cosyvoice-parquet or seedtts.")],
    input: Annotated[Path, typer.Option("--input", help="Corpus root / Kaldi folder / data.list / meta.lst.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for train/ and val/ shards and manifest.json.")],
    assets: Annotated[Optional[Path], typer.Option("--assets", help="CosyVoice 2 model dir (CosyVoice-BlankEN/, "
                      "speech_tokenizer_v2.onnx, campplus.onnx).")] = None,
    tokenizer_dir: Annotated[Optional[Path], typer.Option("--tokenizer-dir", help="Qwen2 tokenizer folder "
                             "(default: ASSETS/CosyVoice-BlankEN).")] = None,
    speech_tokenizer: Annotated[Optional[Path], typer.Option("--speech-tokenizer", help="speech_tokenizer_v2.onnx "
                                "(default: in ASSETS).")] = None,
    campplus: Annotated[Optional[Path], typer.Option("--campplus", help="campplus.onnx (default: in ASSETS); "
                        "giving it turns on --embeddings.")] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings/--no-embeddings", help="Also store campplus speaker "
                          "embeddings in shard-NNNNN.emb.npz beside each shard.")] = False,
    normalize_text: Annotated[bool, typer.Option("--normalize-text/--no-normalize-text", help="Light text "
                              "normalisation (quotes, dashes, ellipsis, spaces); off: only collapse whitespace, "
                              "as CosyVoice's recipes do.")] = True,
    jobs: Annotated[int, typer.Option("--jobs", help="Worker processes (each with its own ONNX sessions).")] = 1,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Utterances per shard.")] = 1000,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Fraction of SPEAKERS held out for val.")] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the speaker split.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing, different --out.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Tokenize a speech corpus into train/val JSONL shards (text tokens + 25 Hz speech tokens).

    Uses CosyVoice 2's front end: the Qwen2 text tokenizer and speech_tokenizer_v2.onnx (and campplus.onnx
    with --embeddings). Bad utterances (corrupt audio, missing or empty transcript, over 30 s) are skipped
    and counted; an interrupted run resumes where it stopped.

    Example: mamtra prepare --source libritts --input LibriTTS/train-clean-100 --assets CosyVoice2-0.5B --out data/ltts --jobs 8
    """
    from rich.console import Console

    from mamtra_cli.checkpoints import (check_writable_parent, file_fingerprint, replace_dir, run_manifest,
                                        write_json_atomic)
    from mamtra_cli.errors import UserError
    from mamtra_cli.frontend.text import NORMALIZATION_VERSION, TextTokenizer

    console = Console(stderr=True, highlight=False, soft_wrap=True)  # no 80-column wrap in logs
    t_start = time.time()

    # ---- whole-run checks: nothing is written before these pass ----
    if source not in SOURCES:
        raise UserError(f"Unknown --source {source!r}; choose one of {', '.join(SOURCES)}.")
    if jobs < 1 or shard_size < 1:
        raise UserError("--jobs and --shard-size must be at least 1.")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1).")
    input = Path(input)
    if not input.exists():
        raise UserError(f"Input {input} does not exist; pass the corpus with --input.")
    if assets is not None and not Path(assets).is_dir():
        raise UserError(f"--assets {assets} is not a directory; pass the CosyVoice2-0.5B model folder.")
    tokenizer_dir = tokenizer_dir or (Path(assets) / "CosyVoice-BlankEN" if assets else None)
    if tokenizer_dir is None:
        raise UserError("No text tokenizer: pass --assets COSYVOICE_DIR or --tokenizer-dir.")
    explicit_speech = speech_tokenizer is not None
    speech_tokenizer = speech_tokenizer or (Path(assets) / "speech_tokenizer_v2.onnx" if assets else None)
    if campplus is not None:
        embeddings = True
    campplus = campplus or (Path(assets) / "campplus.onnx" if assets else None)
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"The parent directory of --out ({out.parent}) does not exist; create it first.")
    if out.exists() and not out.is_dir():
        raise UserError(f"Output {out} exists and is not a directory; remove it or choose another --out.")
    check_writable_parent(out)

    text_tok = TextTokenizer.from_dir(tokenizer_dir)

    with console.status("listing utterances"):
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

    needs_tokenizer = any(it.tokens is None and not it.skip for it in items)
    needs_audio_for_emb = embeddings and any(it.embedding is None and not it.skip for it in items)
    if needs_tokenizer or explicit_speech:
        if speech_tokenizer is None:
            raise UserError("No speech tokenizer: pass --assets COSYVOICE_DIR or --speech-tokenizer FILE.")
        if not Path(speech_tokenizer).is_file():
            raise UserError(f"Speech tokenizer model {speech_tokenizer} does not exist; pass "
                            "speech_tokenizer_v2.onnx with --speech-tokenizer or --assets.")
    if needs_audio_for_emb and (campplus is None or not Path(campplus).is_file()):
        raise UserError(f"Speaker model {campplus or 'campplus.onnx'} does not exist; pass campplus.onnx with "
                        "--campplus or --assets, or drop --embeddings.")
    if source == "cosyvoice-parquet" and embeddings and needs_audio_for_emb:
        items = _attach_parquet_audio(items, input)

    with console.status("fingerprinting tokenizers"):
        text_fp = text_tok.fingerprint()
        if speech_tokenizer is not None and Path(speech_tokenizer).is_file():
            fp = file_fingerprint(Path(speech_tokenizer))
            speech_fp = {"name": Path(speech_tokenizer).name, "sha256": fp["sha256"], "bytes": fp["bytes"]}
        else:
            speech_fp = {"name": "precomputed in cosyvoice-parquet", "sha256": None}
            console.print("mamtra prepare: warning: the parquet speech tokens come with no speech tokenizer file; "
                          "the manifests cannot prove which tokenizer made them (pass --speech-tokenizer).")
        camp_fp = None
        if embeddings and campplus is not None and Path(campplus).is_file():
            fp = file_fingerprint(Path(campplus))
            camp_fp = {"name": Path(campplus).name, "sha256": fp["sha256"], "bytes": fp["bytes"]}

    common_key = {"version": PLAN_VERSION, "source": source, "text_tokenizer": text_fp,
                  "speech_tokenizer": speech_fp, "campplus": camp_fp if embeddings else None,
                  "normalization": NORMALIZATION_VERSION if normalize_text else "whitespace-only"}
    val_spk = split_speakers([it.spk for it in items], val_fraction, seed)
    shards = plan_shards(items, val_spk, shard_size, common_key)
    plan_key = hashlib.sha256(json.dumps([sh.key for sh in shards]).encode()).hexdigest()

    # ---- an identical finished output: nothing to do ----
    if out.exists() and not force:
        try:
            old = json.loads((out / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if (old and old.get("stage") == "prepare" and old.get("parameters", {}).get("plan_key") == plan_key
                and all(_shard_done(out, sh, embeddings) for sh in shards)):
            summary = dict(old.get("metrics", {}))
            summary.update(out=str(out), shards={"written": 0, "reused": len(shards)}, up_to_date=True)
            _print_summary(summary, json_out, console)
            return
        raise UserError(f"Output {out} already exists and was made from other inputs or settings; "
                        "choose another --out or pass --force to replace it.")

    work = out.with_name(f".{out.name}.partial")
    try:
        work.mkdir(exist_ok=True)
        for split in ("train", "val"):
            (work / split).mkdir(exist_ok=True)
        # Keep finished shards that still match; drop anything else (stale shards, temp files).
        done: dict[str, dict] = {}
        wanted = set()
        for sh in shards:
            wanted.add((sh.split, sh.name))
            h = _shard_done(work, sh, embeddings)
            if h is not None:
                done[f"{sh.split}/{sh.name}"] = h
        for split in ("train", "val"):
            for f in (work / split).iterdir():
                stem = f.name.split(".")[0] if not f.name.startswith(".") else None
                if stem is None or (split, stem) not in wanted or f"{split}/{stem}" not in done:
                    f.unlink()
        todo = [sh for sh in shards if f"{sh.split}/{sh.name}" not in done]

        header_base = {"text_tokenizer": text_fp, "speech_tokenizer": speech_fp}
        cfg = {"tokenizer_dir": str(tokenizer_dir),
               "speech_tokenizer": str(speech_tokenizer) if needs_tokenizer else None,
               "campplus": str(campplus) if needs_audio_for_emb else None,
               "embeddings": bool(embeddings), "normalize_text": bool(normalize_text)}
        n_todo = sum(len(sh.items) for sh in todo)
        t_work = time.time()
        _run_shards(todo, work, cfg, jobs, header_base, source, embeddings, console)
        work_seconds = time.time() - t_work

        # ---- summary over every shard (reused ones included) ----
        summary = _summarize(work, shards, val_spk, items)
        summary["shards"] = {"written": len(todo), "reused": len(shards) - len(todo)}
        summary["processed_utterances"] = n_todo
        summary["processing_seconds"] = round(work_seconds, 3)
        summary["utterances_per_second"] = round(n_todo / work_seconds, 2) if work_seconds > 0 and n_todo else None
        summary["jobs"] = jobs
        outputs = {split: sorted(f"{split}/{sh.name}.jsonl" for sh in shards if sh.split == split)
                   for split in ("train", "val")}
        manifest = run_manifest(
            "prepare",
            inputs={"input": str(input.resolve()), "source": source, "text_tokenizer": text_fp,
                    "speech_tokenizer": speech_fp, "campplus": camp_fp},
            parameters={"shard_size": shard_size, "val_fraction": val_fraction, "seed": seed,
                        "embeddings": embeddings, "normalize_text": normalize_text, "jobs": jobs,
                        "plan_key": plan_key},
            outputs={**outputs, "val_speakers": sorted(val_spk)},
            metrics={k: v for k, v in summary.items() if k not in ("shards",)},
            seed=seed,
            elapsed_seconds=round(time.time() - t_start, 3),
        )
        write_json_atomic(work / "manifest.json", manifest)
        for split in ("train", "val"):
            if not any((work / split).iterdir()):
                (work / split).rmdir()
        # Exclusive unless --force: an --out another run published meanwhile is not replaced (the work stays in
        # OUT.partial, so a re-run with --force reuses every finished shard).
        replace_dir(work, out, force=force)
        summary["out"] = str(out)
        _print_summary(summary, json_out, console)
    except BaseException:
        # `.OUT.partial/` is the resumable state of an interrupted run: worth keeping only when it holds a
        # finished shard. A run that failed before finishing any (a front-end model that does not load, a bad
        # first file, Ctrl-C in the first minutes) leaves nothing behind.
        if work.is_dir() and not _has_finished_shard(work):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _has_finished_shard(work: Path) -> bool:
    """True if `work` holds a shard whose .jsonl (written last, atomically) marks it finished."""
    return any(f.is_file() for split in ("train", "val") for f in (work / split).glob("shard-*.jsonl"))


def _attach_parquet_audio(items: list[Item], input: Path) -> list[Item]:
    """For --embeddings on parquet lists without utt_embedding: re-list with audio references."""
    by_utt = {it.utt: it for it in list_parquet(input, need_audio_always=True)}
    for it in items:
        ref = by_utt.get(it.utt)
        if it.embedding is None and ref is not None and ref.parquet is not None:
            it.parquet = ref.parquet
    return items


def _run_shards(todo: list[Shard], work: Path, cfg: dict, jobs: int, header_base: dict, source: str,
                embeddings: bool, console) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    if not todo:
        return
    tasks = []
    for i, sh in enumerate(todo):
        for start in range(0, len(sh.items), CHUNK):
            tasks.append((i, sh.items[start:start + CHUNK]))
        if not sh.items:
            tasks.append((i, []))
    remaining = {i: len(sh.items) for i, sh in enumerate(todo)}
    total = sum(remaining.values())
    t0 = time.time()

    def finish(i: int) -> None:
        sh = todo[i]
        _write_shard(work, sh, header_base, source, embeddings)

    progress = Progress(TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("utts"),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not console.is_terminal, transient=False)
    with progress:
        bar = progress.add_task("prepare", total=total, rate="")

        def consume(result):
            i, outs = result
            sh = todo[i]
            for r in outs:
                if not r["ok"]:
                    detail = f": {r['detail']}" if r.get("detail") else ""
                    console.print(f"mamtra prepare: skip {r['utt']} ({r['reason']}){detail}", markup=False)
            sh.results.extend(outs)
            remaining[i] -= len(outs)
            done_n = total - sum(remaining.values())
            rate = done_n / max(time.time() - t0, 1e-9)
            progress.update(bar, advance=len(outs), rate=f"{rate:.1f} utt/s")
            if remaining[i] == 0:
                finish(i)

        if jobs == 1:
            import torch

            threads = torch.get_num_threads()
            try:
                _worker_init(cfg)
                for t in tasks:
                    consume(_process_chunk(t))
            finally:
                torch.set_num_threads(threads)
                _STATE.clear()
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            # Leaving the `with` (also by the UserError of a worker that could not start) terminates the pool.
            with ctx.Pool(jobs, initializer=_pool_worker_init, initargs=(cfg,)) as pool:
                for result in pool.imap_unordered(_process_chunk, tasks):
                    consume(result)


def _write_shard(work: Path, sh: Shard, header_base: dict, source: str, embeddings: bool) -> None:
    import numpy as np

    from mamtra_cli.data_manifest import ManifestHeader, Utterance, write_manifest

    ok = sorted((r for r in sh.results if r["ok"]), key=lambda r: r["utt"])
    skipped: dict[str, int] = {}
    for r in sh.results:
        if not r["ok"]:
            skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
    stats = {"utterances": len(ok), "seconds": round(sum(r["seconds"] for r in ok), 3),
             "speakers": sorted({r["utterance"]["spk"] for r in ok}), "skipped": skipped}
    header = ManifestHeader(header_base["text_tokenizer"], header_base["speech_tokenizer"],
                            {"shard_key": sh.key, "split": sh.split, "shard": sh.name, "source": source,
                             "stats": stats})
    d = work / sh.split
    if embeddings:
        emb = [r["embedding"] for r in ok]
        arr = np.asarray(emb, dtype=np.float32) if emb else np.zeros((0, 0), np.float32)
        tmp = d / f".{sh.name}.emb.tmp-{os.getpid()}.npz"
        np.savez(tmp, utt=np.asarray([r["utt"] for r in ok], dtype=str), embedding=arr)
        os.replace(tmp, d / f"{sh.name}.emb.npz")
    # The .jsonl goes last: its presence (with the right key) marks the shard finished.
    write_manifest(d / f"{sh.name}.jsonl", header,
                   (Utterance(**r["utterance"]) for r in ok))
    sh.results = []


def _summarize(work: Path, shards: list[Shard], val_spk: set[str], items: list[Item]) -> dict:
    utts = {"train": 0, "val": 0}
    seconds = {"train": 0.0, "val": 0.0}
    spks = {"train": set(), "val": set()}
    skipped: dict[str, int] = {}
    for sh in shards:
        h = _shard_header(work / sh.split / f"{sh.name}.jsonl") or {}
        st = h.get("stats", {})
        utts[sh.split] += st.get("utterances", 0)
        seconds[sh.split] += st.get("seconds", 0.0)
        spks[sh.split].update(st.get("speakers", []))
        for k, v in st.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + v
    total_s = seconds["train"] + seconds["val"]
    return {
        "utterances": {"train": utts["train"], "val": utts["val"], "total": utts["train"] + utts["val"]},
        "hours": {"train": round(seconds["train"] / 3600, 4), "val": round(seconds["val"] / 3600, 4),
                  "total": round(total_s / 3600, 4)},
        "speakers": {"train": len(spks["train"]), "val": len(spks["val"])},
        "listed_utterances": len(items),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
    }


def _print_summary(summary: dict, json_out: bool, console) -> None:
    if json_out:
        print(json.dumps(summary))
        return
    u, h, s = summary["utterances"], summary["hours"], summary["speakers"]
    lines = [
        f"output\t{summary.get('out')}",
        f"utterances\t{u['total']} (train {u['train']}, val {u['val']})",
        f"hours\t{h['total']:.3f} (train {h['train']:.3f}, val {h['val']:.3f})",
        f"speakers\ttrain {s['train']}, val {s['val']}",
        f"shards\t{summary['shards']['written']} written, {summary['shards']['reused']} reused"
        + (" (up to date)" if summary.get("up_to_date") else ""),
    ]
    if summary.get("utterances_per_second"):
        lines.append(f"speed\t{summary['utterances_per_second']:.1f} utterances/s with {summary.get('jobs')} job(s)")
    sk = summary.get("skipped", {})
    lines.append(f"skipped\t{summary.get('skipped_total', 0)}" +
                 ("" if not sk else " (" + ", ".join(f"{k} {v}" for k, v in sk.items()) + ")"))
    print("\n".join(lines))

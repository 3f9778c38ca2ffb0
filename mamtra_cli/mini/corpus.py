"""The synthetic multi-speaker corpus of the mini voice: sentences from a seeded template grammar over a
word list written here (nothing downloaded), spoken by espeak-ng in clearly different voices.

A voice is (espeak voice, variant, pitch 0-99, rate in words per minute). `TRAIN_VOICES` speak the
training sentences; `HELDOUT_VOICES` never occur in training and speak the test set and the bundled
sample reference, so that the evaluation measures voice transfer to an unseen speaker.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mamtra_cli.errors import UserError

SAMPLE_RATE = 16000  # everything in the mini voice runs at 16 kHz (espeak-ng writes 22.05 kHz; we resample)


@dataclass(frozen=True)
class Voice:
    name: str  # speaker id in manifests
    voice: str  # espeak-ng voice (language/accent)
    variant: str  # espeak-ng variant (timbre), "" for the voice's default
    pitch: int  # 0-99, espeak-ng -p
    rate: int  # words per minute, espeak-ng -s

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}" if self.variant else self.voice


# Different accents, variants (male/female timbres), pitches and rates; spread so they are clearly distinct.
TRAIN_VOICES = (
    Voice("us_m1", "en-us", "m1", 40, 165),
    Voice("us_f2", "en-us", "f2", 65, 160),
    Voice("gb_m3", "en-gb", "m3", 30, 155),
    Voice("rp_f4", "en-gb-x-rp", "f4", 75, 170),
    Voice("sc_m7", "en-gb-scotland", "m7", 45, 150),
    Voice("nyc_f1", "en-us-nyc", "f1", 55, 175),
    Voice("car_m2", "en-029", "m2", 50, 160),
    Voice("wm_f5", "en-gb-x-gbcwmd", "f5", 70, 150),
    Voice("lan_m4", "en-gb-x-gbclan", "m4", 35, 170),
    Voice("us_f3", "en-us", "f3", 80, 155),
    Voice("rp_m6", "en-gb-x-rp", "m6", 25, 160),
    Voice("us_m5", "en-us", "m5", 60, 150),
)
HELDOUT_VOICES = (
    Voice("held_f", "en-us", "f4", 58, 160),  # the bundled sample voice
    Voice("held_m", "en-gb", "m8", 42, 160),
)

# ----------------------------------------------------------------------------------------- the grammar
# A small vocabulary keeps the corpus learnable for a tiny model on a CPU; the templates cover statements,
# questions, greetings and numbers so that everyday prompts ("Hello, how are you doing today?") are in reach.
NAMES = "anna ben clara david emma frank grace henry iris jack kate leo mary nick olivia paul rose sam tom lucy".split()
PEOPLE = ("the teacher", "the doctor", "my brother", "my sister", "our neighbour", "the old man", "the young woman",
          "a small child", "the farmer", "the driver", "my friend", "the pilot", "the baker", "her mother",
          "his father", "the students", "the children", "the captain", "a stranger", "the nurse")
ADJECTIVES = ("red blue green yellow little big old new warm cold quiet loud bright dark heavy light happy "
              "tired strange simple clean empty full sweet fresh wooden").split()
NOUNS = ("book door window table garden river house car letter apple chair bottle basket clock picture "
         "ticket bridge road train boat phone lamp coat hat cup box key map song story").split()
PLACES = ("in the kitchen", "at the station", "near the river", "in the garden", "at school", "in the park",
          "on the hill", "at the market", "by the sea", "in the city", "at home", "in the library",
          "on the train", "under the tree", "at the office", "in the village")
TIMES = ("today", "yesterday", "this morning", "last night", "on monday", "on friday", "every day",
         "after lunch", "before dinner", "in the evening", "next week", "at noon", "tonight", "in the spring")
VERBS_PAST = ("found lost opened closed painted carried cleaned bought sold moved washed fixed dropped "
              "borrowed wanted liked watched took made saw").split()
VERBS_BASE = ("find lose open close paint carry clean buy sell move wash fix drop borrow want like watch "
              "take make see").split()
INTRANS_PAST = ("walked ran slept laughed waited sang danced smiled arrived worked stayed cried").split()
INTRANS_ING = ("walking running sleeping laughing waiting singing dancing smiling working reading cooking "
               "playing").split()
GREETINGS = ("hello", "hi", "good morning", "good evening", "thank you", "excuse me", "well", "oh")
NUMBERS = "one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty".split()


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _subject(r: random.Random) -> str:
    return r.choice(NAMES).capitalize() if r.random() < 0.5 else r.choice(PEOPLE)


def _object(r: random.Random) -> str:
    adj = f"{r.choice(ADJECTIVES)} " if r.random() < 0.6 else ""
    return f"{r.choice(('the', 'a', 'my', 'her', 'his', 'our', 'that'))} {adj}{r.choice(NOUNS)}"


def _sentence(r: random.Random) -> str:
    k = r.randrange(10)
    if k <= 2:
        s = f"{_subject(r)} {r.choice(VERBS_PAST)} {_object(r)}"
        if r.random() < 0.5:
            s += f" {r.choice(PLACES)}"
        if r.random() < 0.4:
            s += f" {r.choice(TIMES)}"
        s += "."
    elif k == 3:
        s = f"{_subject(r)} {r.choice(INTRANS_PAST)} {r.choice(PLACES)} {r.choice(TIMES)}."
    elif k == 4:
        s = f"Did {_subject(r)} {r.choice(VERBS_BASE)} {_object(r)} {r.choice(TIMES)}?"
    elif k == 5:
        s = (f"{r.choice(GREETINGS).capitalize()}, how are you {r.choice(INTRANS_ING + ['doing'])} "
             f"{r.choice(TIMES)}?")
    elif k == 6:
        s = f"{r.choice(GREETINGS).capitalize()}, {r.choice(NAMES).capitalize()}, I {r.choice(VERBS_PAST)} {_object(r)}."
    elif k == 7:
        s = f"We have {r.choice(NUMBERS)} {r.choice(ADJECTIVES)} {_plural(r.choice(NOUNS))} {r.choice(PLACES)}."
    elif k == 8:
        s = f"Where is {_object(r)}? It is {r.choice(PLACES)}."
    else:
        s = f"Why are you {r.choice(INTRANS_ING)} {r.choice(PLACES)} {r.choice(TIMES)}?"
    return s[0].upper() + s[1:]


def generate_sentences(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Distinct sentences from the grammar: `n_train` for training, `n_test` held out (no sentence in both)."""
    r = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    tries = 0
    while len(out) < n_train + n_test:
        s = _sentence(r)
        tries += 1
        if tries > 50 * (n_train + n_test):
            raise UserError(f"The sentence grammar cannot make {n_train + n_test} distinct sentences; ask for fewer.")
        if s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out[n_test:], out[:n_test]


# ----------------------------------------------------------------------------------------- espeak-ng
def espeak_path() -> str | None:
    return shutil.which("espeak-ng")


def render(text: str, voice: Voice, out_wav: Path | None = None) -> np.ndarray:
    """Speak `text` with espeak-ng in `voice` → float32 mono at SAMPLE_RATE (also written to out_wav if given)."""
    import soundfile as sf
    import soxr

    exe = espeak_path()
    if exe is None:
        raise UserError("espeak-ng is not on PATH; install it (Debian/Ubuntu: `apt-get install espeak-ng`) "
                        "to build the mini corpus.")
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "raw.wav"
        cmd = [exe, "-v", voice.espeak_voice, "-p", str(voice.pitch), "-s", str(voice.rate), "-w", str(raw), text]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not raw.exists():
            raise UserError(f"espeak-ng failed for voice {voice.espeak_voice}: {proc.stderr.strip()}")
        wav, sr = sf.read(str(raw), dtype="float32", always_2d=False)
    if wav.ndim > 1:
        wav = wav.mean(1)
    wav = soxr.resample(wav, sr, SAMPLE_RATE).astype(np.float32)
    if out_wav is not None:
        sf.write(str(out_wav), wav, SAMPLE_RATE, subtype="PCM_16")
    return wav


@dataclass
class CorpusItem:
    utt: str
    text: str
    spk: str
    wav: str  # path relative to the corpus directory


def _render_file(text: str, voice: Voice, out_wav: Path) -> None:
    render(text, voice, out_wav)  # drop the array: a pool would otherwise hold finished ones until consumed


def _render_rows(out: Path, jobs: int, tasks: list[tuple[str, Voice, str]], on_done) -> None:
    """Render every (text, voice, relative wav path) of `tasks` under `out`, calling `on_done(i)` in task order.

    A thread pool, not a process pool: the heavy part of `render` is the espeak-ng subprocess (which runs
    outside the GIL while its thread waits); the Python-side work (reading the wav, soxr resampling, writing
    PCM_16) is a few milliseconds per sentence, well under a tenth of the subprocess. Each wav depends only
    on its own text and voice and goes to its own path, so the output is the same for every `jobs`. The first
    failure (in task order) is raised as it is (the same UserError as the serial path), after the queued
    renders are cancelled and the running ones (at most `jobs`) have finished."""
    if jobs <= 1:
        for i, (text, voice, rel) in enumerate(tasks):
            _render_file(text, voice, out / rel)
            on_done(i)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="espeak")
    try:
        futures = [pool.submit(_render_file, text, voice, out / rel) for text, voice, rel in tasks]
        for i, fut in enumerate(futures):
            fut.result()
            on_done(i)
    finally:
        # On an error or Ctrl-C: drop the queued renders instead of waiting for all of them.
        pool.shutdown(wait=True, cancel_futures=True)


def build_corpus(out: Path, n_train: int, n_test: int, n_voices: int, seed: int = 0,
                 log=lambda msg: None, jobs: int = 1) -> dict[str, list[CorpusItem]]:
    """Render the corpus into out/wavs/*.wav. Training sentences go round-robin over the first `n_voices`
    training voices; the test sentences alternate over the held-out voices. Writes out/train.tsv and
    out/test.tsv (utt, spk, wav, text) and, last, out/corpus.json (parameters + content hash). A directory
    whose corpus.json records the same parameters is reused as it is (rendering is the slow part).

    `jobs` espeak-ng processes render in parallel. The output does not depend on it (every wav byte, the
    tables and the hash are the same), so it is not among the recorded parameters: a corpus rendered with
    2 jobs is reused by a 1-job run."""
    if not 1 <= n_voices <= len(TRAIN_VOICES):
        raise UserError(f"--voices must be between 1 and {len(TRAIN_VOICES)}, got {n_voices}.")
    if jobs < 1:
        raise UserError(f"--render-jobs must be 1 or more, got {jobs}.")
    out = Path(out)
    params = {"n_train": n_train, "n_test": n_test, "n_voices": n_voices, "seed": seed,
              "voices": [v.__dict__ for v in TRAIN_VOICES[:n_voices]],
              "heldout_voices": [v.__dict__ for v in HELDOUT_VOICES], "sample_rate": SAMPLE_RATE}
    marker = out / "corpus.json"
    if marker.is_file() and json.loads(marker.read_text()).get("parameters") == params:
        log(f"corpus: reusing {out}")
        return {split: read_corpus_split(out, split) for split in ("train", "test")}
    # A marker of other parameters would describe wavs that are about to be overwritten: drop it first, so
    # that an interrupted or failed render never leaves a corpus.json behind.
    marker.unlink(missing_ok=True)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    train_s, test_s = generate_sentences(n_train, n_test, seed)
    voices = TRAIN_VOICES[:n_voices]
    splits = {"train": [(s, voices[i % len(voices)]) for i, s in enumerate(train_s)],
              "test": [(s, HELDOUT_VOICES[i % len(HELDOUT_VOICES)]) for i, s in enumerate(test_s)]}
    result: dict[str, list[CorpusItem]] = {}
    for split, rows in splits.items():
        items = []
        for i, (text, v) in enumerate(rows):
            utt = f"{split}_{i:05d}_{v.name}"
            items.append(CorpusItem(utt, text, v.name, f"wavs/{utt}.wav"))

        def progress(i: int, split=split, n=len(rows)) -> None:
            if (i + 1) % 500 == 0:
                log(f"corpus: {split} {i + 1}/{n}")

        _render_rows(out, jobs, [(it.text, v, it.wav) for it, (_, v) in zip(items, rows)], progress)
        (out / f"{split}.tsv").write_text("".join(f"{it.utt}\t{it.spk}\t{it.wav}\t{it.text}\n" for it in items))
        result[split] = items
    marker.write_text(json.dumps({"parameters": params, "sha256": corpus_hash(out)}, indent=1) + "\n")
    return result


def corpus_hash(corpus: Path) -> str:
    """sha256 over the split tables and every wav they name, in order: the corpus' identity in manifests."""
    corpus = Path(corpus)
    h = hashlib.sha256()
    for split in ("train", "test"):
        table = (corpus / f"{split}.tsv").read_bytes()
        h.update(table)
        for item in read_corpus_split(corpus, split):
            h.update((corpus / item.wav).read_bytes())
    return h.hexdigest()


def read_corpus_split(corpus: Path, split: str) -> list[CorpusItem]:
    rows = []
    for line in (Path(corpus) / f"{split}.tsv").read_text().splitlines():
        utt, spk, wav, text = line.split("\t")
        rows.append(CorpusItem(utt, text, spk, wav))
    return rows

"""Offline intelligibility: pocketsphinx transcripts and word error rate.

Every recording of a table is decoded with one decoder setup: pocketsphinx's bundled US-English acoustic
model and CMUdict, 16 kHz mono 16-bit input, one utterance per call. `Recognizer()` uses pocketsphinx's
generic trigram LM (`en-us.lm.bin`); the mini voice's WER tables (`mamtra_cli.mini.evaluate`) swap in a
closed-vocabulary bigram of the *training* sentences (`write_bigram_arpa`), the same for every row, so that
the yardstick measures pronunciation rather than the generic LM's luck with the grammar's words. Text normalisation (both sides): lower case, apostrophes kept inside
words, every other non-letter/digit removed. WER = word-level edit distance (substitutions + deletions +
insertions) summed over the set ÷ reference words summed over the set.
"""

from __future__ import annotations

import re

import numpy as np

from mamtra_cli.errors import UserError

ASR_SAMPLE_RATE = 16000


def normalize_words(text: str) -> list[str]:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (unit costs)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: list[str], hyps: list[str]) -> float:
    errors = sum(edit_distance(normalize_words(r), normalize_words(h)) for r, h in zip(refs, hyps))
    words = sum(len(normalize_words(r)) for r in refs)
    return errors / max(words, 1)


class Recognizer:
    """pocketsphinx with the bundled English model; `transcribe(wav, sr)` → text."""

    def __init__(self):
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise UserError("pocketsphinx is not installed; `pip install pocketsphinx` to measure WER.") from None
        # Default config = bundled en-us acoustic model, en-us.lm.bin, cmudict-en-us.dict. Quiet logs.
        self.decoder = Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL")

    def transcribe(self, wav: np.ndarray, sr: int) -> str:
        wav = np.asarray(wav, dtype=np.float32)
        if sr != ASR_SAMPLE_RATE:
            import soxr

            wav = soxr.resample(wav, sr, ASR_SAMPLE_RATE).astype(np.float32)
        peak = float(np.abs(wav).max()) if wav.size else 0.0
        if peak > 0:
            wav = wav * (0.9 / peak)  # same level for every system: loudness is not what we measure
        # Half a second of silence around the utterance, as a recording would have.
        pad = np.zeros(ASR_SAMPLE_RATE // 2, dtype=np.float32)
        pcm = (np.concatenate([pad, wav, pad]) * 32767).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


def write_bigram_arpa(sentences: list[str], path, discount: float = 0.5) -> list[str]:
    """A closed-vocabulary bigram LM (ARPA, absolute discounting with backoff to add-one unigrams) from
    `sentences`; returns the vocabulary. Used as the decoder's LM for every row of an evaluation: it knows
    the corpus' words (the training sentences, never the test ones) so the ASR measures pronunciation,
    not the generic LM's ignorance of the mini grammar."""
    import math
    from collections import Counter, defaultdict

    uni, bi = Counter(), Counter()
    for s in sentences:
        words = ["<s>"] + normalize_words(s) + ["</s>"]
        uni.update(words)
        bi.update(zip(words[:-1], words[1:]))
    vocab = sorted(uni)
    total = sum(c for w, c in uni.items() if w != "<s>") + len(vocab)
    p_uni = {w: (uni[w] + 1) / total for w in vocab}
    following = defaultdict(list)
    for (v, w), c in bi.items():
        following[v].append((w, c))
    p_bi, bow = {}, {}
    for v, pairs in following.items():
        cv = sum(c for _, c in pairs)
        seen_uni = 0.0
        for w, c in pairs:
            p_bi[(v, w)] = (c - discount) / cv
            seen_uni += p_uni[w]
        left = 1.0 - sum(p_bi[(v, w)] for w, _ in pairs)
        bow[v] = left / max(1.0 - seen_uni, 1e-9)
    lines = ["\\data\\", f"ngram 1={len(vocab)}", f"ngram 2={len(p_bi)}", "", "\\1-grams:"]
    for w in vocab:
        lp = -99.0 if w == "<s>" else math.log10(p_uni[w])
        lines.append(f"{lp:.6f} {w} {math.log10(bow[w]) if w in bow else 0.0:.6f}")
    lines += ["", "\\2-grams:"]
    lines += [f"{math.log10(p):.6f} {v} {w}" for (v, w), p in p_bi.items()]
    lines += ["", "\\end\\", ""]
    from pathlib import Path

    Path(path).write_text("\n".join(lines))
    return [w for w in vocab if w not in ("<s>", "</s>")]

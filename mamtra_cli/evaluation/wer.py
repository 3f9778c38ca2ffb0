"""Word error rate as the TTS field computes it: normalise both sides, align words, count the edits.

Normalisers (`normalizer(name)`):
  - "whisper": Whisper's English text normaliser (the `whisper-normalizer` package, `EnglishTextNormalizer`):
    lower case, punctuation and bracketed asides removed, numbers written as digits ("twenty one" → "21"),
    British spellings mapped to American ("neighbour" → "neighbor"), contractions expanded. Whisper's own
    papers and most TTS papers (F5-TTS, CosyVoice's evaluation) score English this way.
  - "basic": lower case, apostrophes kept inside words, every other non-letter/digit dropped; needs no
    package (the pocketsphinx fallback, whose output is already lower-case words).
Errors of one utterance = substitutions + deletions + insertions of the Levenshtein alignment over words.
An utterance's WER is errors ÷ reference words; a system's WER is reported both ways the field uses:
the mean of per-utterance WERs (Seed-TTS-eval) and corpus WER (all errors ÷ all reference words).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from mamtra_cli.errors import UserError

EVAL_EXTRA_HINT = "pip install 'mamtra[eval]'"


def basic_normalize(text: str) -> str:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return " ".join(w.strip("'") for w in text.split() if w.strip("'"))


def normalizer(name: str) -> Callable[[str], str]:
    """The text normaliser called `name` ("whisper" or "basic")."""
    if name == "basic":
        return basic_normalize
    if name == "whisper":
        try:
            from whisper_normalizer.english import EnglishTextNormalizer
        except ImportError:
            raise UserError(f"Whisper's English text normaliser needs the whisper-normalizer package; "
                            f"install it with `{EVAL_EXTRA_HINT}` (or pass --normalizer basic).") from None
        return EnglishTextNormalizer()
    raise UserError(f"Unknown text normaliser {name!r}; use whisper or basic.")


@dataclass(frozen=True)
class WordErrors:
    substitutions: int
    deletions: int
    insertions: int
    ref_words: int
    hyp_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """errors ÷ reference words; an empty reference scores 0 if the hypothesis is empty too, else 1 a word
        (every hypothesis word is an insertion, and there is nothing to divide by)."""
        if self.ref_words == 0:
            return float(self.insertions)
        return self.errors / self.ref_words


def align_words(ref: list[str], hyp: list[str]) -> WordErrors:
    """Minimum-edit alignment of two word lists (unit costs); among alignments with the fewest edits, the
    one with the most substitutions is counted (the usual tie-break of sclite and jiwer)."""
    # cost[i][j] = (edits, -substitutions, deletions, insertions) of aligning ref[:i] with hyp[:j]
    n, m = len(ref), len(hyp)
    prev = [(j, 0, 0, j) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0)] + [None] * m
        for j in range(1, m + 1):
            e, s, d, ins = prev[j - 1]
            if ref[i - 1] == hyp[j - 1]:
                diag = (e, s, d, ins)
            else:
                diag = (e + 1, s - 1, d, ins)
            e, s, d, ins = prev[j]
            up = (e + 1, s, d + 1, ins)
            e, s, d, ins = cur[j - 1]
            left = (e + 1, s, d, ins + 1)
            cur[j] = min(diag, up, left)
        prev = cur
    e, s, d, ins = prev[m]
    return WordErrors(substitutions=-s, deletions=d, insertions=ins, ref_words=n, hyp_words=m)


def word_errors(ref_text: str, hyp_text: str, normalize: Callable[[str], str]) -> WordErrors:
    return align_words(normalize(ref_text).split(), normalize(hyp_text).split())


def summarize(errors: list[WordErrors]) -> dict:
    """{"wer": mean per-utterance WER, "wer_corpus": all errors ÷ all reference words, counts...}."""
    if not errors:
        return {"wer": None, "wer_corpus": None, "utterances": 0, "ref_words": 0, "errors": 0}
    ref_words = sum(e.ref_words for e in errors)
    total = sum(e.errors for e in errors)
    return {
        "wer": sum(e.wer for e in errors) / len(errors),
        "wer_corpus": total / ref_words if ref_words else None,
        "utterances": len(errors), "ref_words": ref_words, "errors": total,
        "substitutions": sum(e.substitutions for e in errors), "deletions": sum(e.deletions for e in errors),
        "insertions": sum(e.insertions for e in errors),
    }


def paired_bootstrap(system: list[float], baseline: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """How much worse `system` is than `baseline` on the same rows, and how sure that is: the mean per-row
    difference (system − baseline, e.g. per-utterance WER) with a 95 % percentile interval from a paired
    bootstrap — rows drawn with replacement, the same rows for both, `resamples` times (numpy PCG64, `seed`).
    Pairing matters here: both systems speak the same 120 sentences, and sentence difficulty varies far more
    than the gap between two models, so unpaired intervals would be several times wider.
    Returns {delta, ci95: [lo, hi], p_not_worse: the share of resamples whose mean difference is ≤ 0,
    resamples, rows}."""
    import numpy as np

    a, b = np.asarray(system, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists (got {a.shape} and {b.shape})")
    diff = a - b  # (rows,)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // diff.size)  # index matrices of at most ~16 MB, whatever the list's length
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        means[start:start + n] = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"delta": float(diff.mean()), "ci95": [float(lo), float(hi)],
            "p_not_worse": float((means <= 0).mean()), "resamples": resamples, "rows": int(diff.size)}

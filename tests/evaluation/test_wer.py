"""WER arithmetic and normalisation, held against jiwer (an independent implementation) where it is installed."""

import random

import pytest

from mamtra_cli.evaluation.wer import align_words, basic_normalize, normalizer, summarize, word_errors


def test_known_alignments():
    e = align_words("the cat sat on the mat".split(), "the cat sit on mat".split())
    assert (e.substitutions, e.deletions, e.insertions, e.ref_words) == (1, 1, 0, 6)
    assert e.wer == pytest.approx(2 / 6)
    e = align_words("a b".split(), "x a b y z".split())
    assert (e.substitutions, e.deletions, e.insertions) == (0, 0, 3) and e.wer == 1.5
    assert align_words([], []).wer == 0.0 and align_words([], ["a"]).wer == 1.0
    assert align_words(["a"], []).deletions == 1


def test_summary_means_and_corpus():
    errs = [align_words("a b c d".split(), "a b c d".split()), align_words("a b".split(), "x b".split())]
    s = summarize(errs)
    assert s["wer"] == pytest.approx((0 + 0.5) / 2) and s["wer_corpus"] == pytest.approx(1 / 6)
    assert s["errors"] == 1 and s["ref_words"] == 6


def test_edit_counts_match_jiwer_on_random_sentences():
    jiwer = pytest.importorskip("jiwer")
    r = random.Random(0)
    vocab = "a b c d e f".split()
    for _ in range(300):
        ref = [r.choice(vocab) for _ in range(r.randint(1, 9))]
        hyp = [r.choice(vocab) for _ in range(r.randint(0, 9))]
        ours = align_words(ref, hyp)
        theirs = jiwer.process_words(" ".join(ref), " ".join(hyp) if hyp else "")
        assert ours.errors == theirs.substitutions + theirs.deletions + theirs.insertions
        assert ours.wer == pytest.approx(theirs.wer)


def test_whisper_normaliser_folds_numbers_spelling_and_punctuation():
    pytest.importorskip("whisper_normalizer")
    n = normalizer("whisper")
    assert word_errors("We have five red boxes at our neighbour's house.", "we have 5 red boxes at our neighbor's house",
                       n).errors == 0
    assert word_errors("Where is it? It is here.", "Where is it, it's here", n).errors == 0
    assert basic_normalize("Hello, World! It's") == "hello world it's"


def test_paired_bootstrap_agrees_with_scipy_and_with_the_obvious_cases():
    import numpy as np

    from mamtra_cli.evaluation.wer import paired_bootstrap

    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 120)
    system = np.clip(base + rng.normal(0.08, 0.2, 120), 0, None)
    got = paired_bootstrap(list(system), list(base), resamples=20_000, seed=3)
    ref = scipy_stats.bootstrap((system - base,), np.mean, n_resamples=20_000, method="percentile",
                                confidence_level=0.95, random_state=5).confidence_interval
    assert got["delta"] == pytest.approx(float(np.mean(system - base)), abs=1e-12)
    assert got["ci95"][0] == pytest.approx(ref.low, abs=0.006) and got["ci95"][1] == pytest.approx(ref.high, abs=0.006)
    assert got["ci95"][0] < got["delta"] < got["ci95"][1] and got["rows"] == 120
    assert paired_bootstrap(list(system), list(base), resamples=20_000, seed=3) == got  # seeded
    # a constant gap is known exactly; a system against itself is no different
    shifted = paired_bootstrap(list(base + 0.25), list(base), resamples=500)
    assert shifted["ci95"] == pytest.approx([0.25, 0.25]) and shifted["p_not_worse"] == 0.0
    same = paired_bootstrap(list(base), list(base), resamples=500)
    assert same["delta"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_not_worse"] == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([0.1, 0.2], [0.1])

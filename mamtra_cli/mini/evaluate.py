"""Intelligibility of the mini voice on the held-out sentences, measured offline with pocketsphinx.

Rows (every row is decoded with the same ASR setup, see `mamtra_cli.mini.asr`):
  (a) espeak-ng      the held-out recordings themselves (held-out voices, never in training)
  (b) codec          codec resynthesis of (a): encode → decode with the recording's own statistics
  (c) mini teacher   synthesised from text by the built-in teacher, prompted with another held-out
                     recording of the same voice (zero-shot: its tokens + transcript + statistics)
  (d…) model dirs    the same as (c) with any extra model directory (a hybrid from transfer/distill)
The ASR's LM is a closed-vocabulary bigram of the *training* sentences (no test sentence is in it) with
CMUdict pronunciations of its words: a fixed yardstick that measures pronunciation, not LM luck.

    python -m mamtra_cli.mini.evaluate --corpus /tmp/mini_build/work/corpus [--model NAME=DIR …] [--limit N]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from mamtra_cli.errors import UserError


def make_recognizer(train_sentences: list[str], workdir: Path):
    """pocketsphinx with the bundled en-us acoustic model, a bigram LM of `train_sentences` and the
    CMUdict entries of its words. The same object decodes every row."""
    import pocketsphinx
    from pocketsphinx import Decoder

    from mamtra_cli.mini.asr import Recognizer, write_bigram_arpa

    lm = Path(workdir) / "mini.arpa"
    vocab = set(write_bigram_arpa(train_sentences, lm))
    model_dir = Path(pocketsphinx.__file__).parent / "model" / "en-us"
    entries = [line for line in (model_dir / "cmudict-en-us.dict").read_text().splitlines()
               if line.split() and line.split()[0].split("(")[0] in vocab]
    dict_path = Path(workdir) / "mini.dict"
    dict_path.write_text("\n".join(entries) + "\n")
    rec = Recognizer.__new__(Recognizer)
    rec.decoder = Decoder(samprate=16000, loglevel="FATAL", lm=str(lm), dict=str(dict_path))
    return rec


def intelligibility_table(corpus: Path, builtin_dir: Path | None = None, models: dict[str, Path] | None = None,
                          limit: int | None = None, seed: int = 0, rows: str = "abc",
                          log=lambda msg: None) -> dict:
    """WER of rows (a), (b), (c) (those named in `rows`) and one row per extra model dir on the corpus'
    test split.

    Returns {"rows": [{"system", "wer", "utterances", "words", "seconds", "audio_seconds"}...],
             "transcripts": {system: [(utt, ref, hyp)...]}}."""
    import soundfile as sf

    from mamtra_cli.mini import BUILTIN_DIR
    from mamtra_cli.mini.asr import normalize_words, wer
    from mamtra_cli.mini.backend import MiniBackend
    from mamtra_cli.mini.codec import MiniCodec
    from mamtra_cli.mini.corpus import read_corpus_split

    corpus = Path(corpus)
    if not (corpus / "test.tsv").is_file():
        raise UserError(f"{corpus} is not a mini corpus (no test.tsv); build one with `mamtra build-mini`.")
    builtin_dir = Path(builtin_dir) if builtin_dir is not None else BUILTIN_DIR
    test = read_corpus_split(corpus, "test")
    train_text = [it.text for it in read_corpus_split(corpus, "train")]
    # Prompt of row i: the test recording two rows on (the held-out voices alternate, so the same voice),
    # never the sentence itself.
    prompt_of = {i: (i + 2) % len(test) for i in range(len(test))}
    rows_idx = list(range(len(test)))[: limit or len(test)]
    audio = {it.utt: sf.read(str(corpus / it.wav), dtype="float32")[0] for it in test}
    sr = 16000

    systems: list[tuple[str, object]] = []
    if "a" in rows:
        systems.append(("(a) espeak-ng ground truth", "gt"))
    if "b" in rows:
        systems.append(("(b) codec resynthesis", "codec"))
    if "c" in rows:
        systems.append(("(c) mini teacher", builtin_dir))
    for name, path in (models or {}).items():
        systems.append((name, Path(path)))

    with tempfile.TemporaryDirectory() as tmp:
        rec = make_recognizer(train_text, Path(tmp))
        codec = MiniCodec.load(builtin_dir)
        out_rows, transcripts = [], {}
        for name, kind in systems:
            t0 = time.time()
            synth_s, audio_s = 0.0, 0.0
            backend = None
            if isinstance(kind, Path):
                backend = MiniBackend(kind, codec_dir=builtin_dir)
                prompts = {}
            refs, hyps, tr = [], [], []
            for i in rows_idx:
                it = test[i]
                ts = time.time()
                if kind == "gt":
                    wav = audio[it.utt]
                elif kind == "codec":
                    mel, _, stats = codec.features(audio[it.utt], sr)
                    wav = codec.decode(codec.tokens_from_features(mel), stats, seed=seed)
                else:
                    j = prompt_of[i]
                    if j not in prompts:
                        p_item = test[j]
                        prompts[j] = backend.prepare_prompt(corpus / p_item.wav, p_item.text)
                    wav = np.concatenate(list(backend.synthesize(it.text, prompts[j], seed=seed + i)))
                synth_s += time.time() - ts
                audio_s += wav.size / sr
                hyp = rec.transcribe(wav, sr) if wav.size else ""
                refs.append(it.text)
                hyps.append(hyp)
                tr.append((it.utt, it.text, hyp))
            w = wer(refs, hyps)
            row = {"system": name, "wer": round(w, 4), "utterances": len(refs),
                   "words": sum(len(normalize_words(r)) for r in refs), "seconds": round(time.time() - t0, 1),
                   "audio_seconds": round(audio_s, 1),
                   "synthesis_rtf": round(synth_s / audio_s, 3) if kind != "gt" and audio_s else None}
            log(f"{name}: WER {w:.3f} over {len(refs)} utterances ({row['seconds']} s)")
            out_rows.append(row)
            transcripts[name] = tr
    return {"rows": out_rows, "transcripts": transcripts}


def asr_available() -> bool:
    """pocketsphinx ships its English model on PyPI (`pip install 'mamtra[mini]'`); without it no WER."""
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return False
    return True


def prompted_wer(models: dict[str, Path], sentences: list[str], prompt_wav: Path, prompt_text: str,
                 codec_dir: Path | None = None, seed: int = 0, lm_sentences: list[str] | None = None,
                 log=lambda msg: None) -> dict[str, dict]:
    """WER of each mini-family model speaking `sentences` in one prompt voice (sentence i with seed + i),
    decoded by the recognizer of `intelligibility_table` (bigram LM of `lm_sentences`, default: the 3,000
    first training sentences of the shipped corpus's grammar). The quick form of rows (c)/(d) used by
    `mamtra demo`: one reference voice instead of a held-out recording per row.

    Returns {name: {"wer", "utterances", "words", "synthesis_rtf", "transcripts": [(ref, hyp)...]}}."""
    from mamtra_cli.mini.asr import normalize_words, wer
    from mamtra_cli.mini.backend import MiniBackend
    from mamtra_cli.mini.corpus import generate_sentences

    if lm_sentences is None:
        lm_sentences = generate_sentences(3000, 120, 0)[0]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        rec = make_recognizer(lm_sentences, Path(tmp))
        for name, model_dir in models.items():
            backend = MiniBackend(Path(model_dir), codec_dir=codec_dir or Path(model_dir))
            prompt = backend.prepare_prompt(Path(prompt_wav), prompt_text)
            hyps, synth_s, audio_s = [], 0.0, 0.0
            for i, text in enumerate(sentences):
                t0 = time.time()
                wav = np.concatenate(list(backend.synthesize(text, prompt, seed=seed + i)))
                synth_s += time.time() - t0
                audio_s += wav.size / backend.sample_rate
                hyps.append(rec.transcribe(wav, backend.sample_rate) if wav.size else "")
            w = wer(sentences, hyps)
            log(f"{name}: WER {w:.3f} over {len(sentences)} sentences")
            out[name] = {"wer": round(w, 4), "utterances": len(sentences),
                         "words": sum(len(normalize_words(t)) for t in sentences),
                         "synthesis_rtf": round(synth_s / audio_s, 3) if audio_s else None,
                         "transcripts": list(zip(sentences, hyps))}
    return out


def format_table(rows: list[dict]) -> str:
    lines = ["| system | WER | utterances | words | synthesis RTF | eval seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        rtf = "" if r["synthesis_rtf"] is None else f"{r['synthesis_rtf']:.3f}"
        lines.append(f"| {r['system']} | {r['wer']:.3f} | {r['utterances']} | {r['words']} | {rtf} | {r['seconds']} |")
    return "\n".join(lines)


def evaluate_mini(
    corpus: Path = typer.Option(..., "--corpus", help="A mini corpus (work/corpus of `mamtra build-mini`)."),
    builtin: Path = typer.Option(None, "--builtin", help="Mini voice dir (default: the built-in one)."),
    model: list[str] = typer.Option([], "--model", help="Extra row NAME=DIR: a model dir made from the mini "
                                    "teacher (e.g. a distilled hybrid). Repeatable."),
    limit: int = typer.Option(0, help="Only the first N test sentences (0 = all)."),
    rows: str = typer.Option("abc", help="Which of the rows a (espeak-ng), b (codec), c (mini teacher) to run."),
    seed: int = typer.Option(0, help="Sampling seed (row i uses seed + i)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the table and transcripts here."),
) -> None:
    """WER table of the mini voice (rows a/b/c + one per --model) with pocketsphinx, on stdout."""
    import json

    import torch

    torch.set_num_threads(int(os.environ.get("MAMTRA_THREADS", "1")))
    models = {}
    for spec in model:
        if "=" not in spec:
            raise UserError(f"--model {spec!r} must be NAME=DIR.")
        name, path = spec.split("=", 1)
        models[name] = Path(path)
    result = intelligibility_table(corpus, builtin, models, limit or None, seed, rows,
                                   log=lambda m: typer.echo(m, err=True))
    typer.echo(format_table(result["rows"]))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    typer.run(evaluate_mini)

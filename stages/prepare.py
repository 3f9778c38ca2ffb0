"""`mamtra prepare`: turn a speech corpus into sharded JSONL data manifests (text tokens + speech tokens).

The sources (`--source`), the output layout and the resume rules are described in `mamtra_cli.data`; the
work is `mamtra_cli.data.prepare.prepare`, which a Python user calls the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


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
    import json

    from mamtra_cli.data.prepare import format_summary, prepare as prepare_corpus

    summary = prepare_corpus(source, input, out, assets=assets, tokenizer_dir=tokenizer_dir,
                             speech_tokenizer=speech_tokenizer, campplus=campplus, embeddings=embeddings,
                             normalize_text=normalize_text, jobs=jobs, shard_size=shard_size,
                             val_fraction=val_fraction, seed=seed, force=force)
    print(json.dumps(summary) if json_out else format_summary(summary))

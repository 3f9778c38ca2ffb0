"""`mamtra tiny-teacher`: write a tiny random-weight CosyVoice 2-format teacher directory
(`mamtra_cli.teachers.tiny.write_tiny_teacher`)."""

from __future__ import annotations

from pathlib import Path

import typer


def tiny_teacher(
    out: Path = typer.Option(..., "--out", help="Directory to create (must not exist unless --force)."),
    layers: int = typer.Option(4, help="Number of Qwen2 decoder layers."),
    hidden: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Query heads."),
    kv_heads: int = typer.Option(2, help="Key/value heads (GQA groups); must divide --heads."),
    text_vocab: int = typer.Option(512, help="Rows of the text embedding."),
    speech_tokens: int = typer.Option(100, help="Speech codes; the decoder gets 3 more classes (eos, ..., fill)."),
    seed: int = typer.Option(0, help="Seed of the random weights (the output is deterministic from it)."),
    sample_data: int = typer.Option(0, "--sample-data", help="Also write data/train.jsonl and data/val.jsonl "
                                    "with this many utterances sampled from the teacher (90/10 split)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Write a tiny random-weight CosyVoice 2-format teacher directory, for trying the pipeline and for tests.

    The directory has the files of a real CosyVoice 2 model's speech LM (cosyvoice2.yaml, llm.pt,
    CosyVoice-BlankEN/config.json) and can be passed wherever a teacher is expected. Prints its path.
    """
    from mamtra_cli.teachers.tiny import write_tiny_teacher

    typer.echo(str(write_tiny_teacher(out, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                                      text_vocab=text_vocab, speech_tokens=speech_tokens, seed=seed,
                                      sample_data=sample_data, force=force)))

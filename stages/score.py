"""`mamtra score`: teacher-forced cross-entropy and accuracy of a model on a data manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def score(
    model: str = typer.Option(..., "--model", help="MamTra model dir, CosyVoice 2 model dir, or llm.pt (with --config-json)."),
    data: Path = typer.Option(..., "--data", help="JSONL data manifest (file or directory of shards)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Utterances per forward pass."),
    config_json: Optional[Path] = typer.Option(None, "--config-json", help="Qwen2 config.json for a bare llm.pt."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with per-utterance numbers."),
) -> None:
    """Score MODEL on DATA: CE summed over speech targets and eos ÷ their count (CosyVoice's loss), top-1 accuracy.

    Example: mamtra score --model hybrid-1-5 --data val.jsonl --json
    """
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mamtra_cli.cli import apply_threads, check_threads, count_parameters, stderr_console
    from mamtra_cli.data_manifest import read_manifest
    from mamtra_cli.scoring import check_utterance_lengths, score_utterances
    from mamtra_cli.teachers import load_teacher

    console = stderr_console()
    check_threads(threads)
    with console.status("loading model"):
        lm, info = load_teacher(model, config_json)
    n_threads = apply_threads(threads, count_parameters(lm))
    cfg = lm.config
    _, utts = read_manifest(data, text_vocab=cfg.text_vocab_size, speech_vocab=cfg.speech_token_size)
    check_utterance_lengths(utts, cfg.max_position_embeddings, str(data))  # before the progress bar starts
    with Progress(TextColumn("scoring"), BarColumn(), TextColumn("{task.completed}/{task.total} utts"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("score", total=len(utts))
        result = score_utterances(lm, utts, batch_size, progress=lambda n: bar.advance(task, n))
    result = {"model": str(model), "data": str(data), **result, "threads": n_threads}
    if json_out:
        print(json.dumps(result))
    else:
        print(f"model\t{model}\nce\t{result['ce']:.6f}\naccuracy\t{result['accuracy']:.6f}\ntokens\t{result['tokens']}\n"
              f"utterances\t{result['utterances']}\nthreads\t{n_threads}")

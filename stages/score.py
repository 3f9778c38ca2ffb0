"""`mamtra score`: teacher-forced cross-entropy and accuracy of a model on a data manifest
(`mamtra_cli.scoring.score`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def score(
    model: str = typer.Option(..., "--model", help="`mini`, a shipped hybrid (`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`), MamTra model dir, CosyVoice 2 model dir, or llm.pt (with --config-json)."),
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

    from mamtra_cli.scoring import score as score_model

    result = score_model(model, data, batch_size=batch_size, config_json=config_json, threads=threads)
    if json_out:
        print(json.dumps(result))
    else:
        print(f"model\t{model}\nce\t{result['ce']:.6f}\naccuracy\t{result['accuracy']:.6f}\ntokens\t{result['tokens']}\n"
              f"utterances\t{result['utterances']}\nthreads\t{result['threads']}")

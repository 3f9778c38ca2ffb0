"""`mamtra transfer`: turn a teacher into a hybrid by replacing attention layers with Mamba-2 layers
(`mamtra_cli.weight_transfer.transfer_to_dir`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def transfer(
    teacher: str = typer.Option(..., "--teacher", help="`mini`, a shipped hybrid (`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`), CosyVoice 2 model dir, llm.pt (with --config-json), or MamTra model dir."),
    out: Path = typer.Option(..., "--out", help="Output model directory."),
    ratio: Optional[str] = typer.Option(None, "--ratio", help="attention:Mamba as 1:k (1:1, 1:3, 1:5, 1:11, …)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="A layout profile (mamtra-1-1, mamtra-1-3, mamtra-1-5, mamtra-1-11) or a YAML path."),
    placement: str = typer.Option("uniform", "--placement", help="uniform | uniform-first | front | back | importance (keep the layers whose replacement alone raises CE on --probe-data most)."),
    attention_layers: Optional[str] = typer.Option(None, "--attention-layers", help="Explicit attention layer indices, e.g. 3,7,11 (overrides --ratio)."),
    init: str = typer.Option("reused", "--init", help="reused (C←Q, B←K, x←V, out←O) | xavier | kaiming."),
    config_json: Optional[Path] = typer.Option(None, "--config-json", help="Qwen2 config.json when --teacher is a bare llm.pt."),
    probe_data: Optional[Path] = typer.Option(None, "--probe-data", help="Data manifest that --placement importance scores each layer on (a few hundred utterances)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the fresh Mamba parameters."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Replace some attention layers of TEACHER with Mamba-2 layers initialised from their weights.

    Example: mamtra transfer --teacher CosyVoice2-0.5B --ratio 1:5 --out hybrid-1-5
    """
    import json

    from mamtra_cli.weight_transfer import transfer_to_dir

    summary = transfer_to_dir(teacher, out, ratio=ratio, profile=profile, placement=placement,
                              attention_layers=attention_layers, init=init, config_json=config_json, seed=seed,
                              threads=threads, force=force, probe_data=probe_data)
    if json_out:
        print(json.dumps(summary))
    else:
        for r in summary.get("importance", []):
            print(f"layer {r['layer']}\tCE {r['ce']:.4f}\t+{r['ce_increase']:.4f}"
                  + ("\tkept as attention" if r["layer"] in summary["attention_layers"] else ""))
        print(f"{out}\t{''.join('A' if t == 'attention' else 'M' for t in summary['layer_types'])}\t"
              f"params={summary['parameters']['total']}")

"""`mamtra demo`: the whole MamTra pipeline on the built-in mini voice, end to end on a CPU.

    mamtra demo                      # → ./mamtra-demo/ (about 3 minutes on 2 quiet CPU cores)
    mamtra demo --out /tmp/d --steps 5 --wer-sentences 2 --force      # a smoke test (< 1 minute)

The steps (each a real `mamtra` stage in its own process) and the table are described in `mamtra_cli.demo`,
which runs them.
"""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("mamtra-demo"), "--out", help="Directory for every artefact of the demo."),
    ratio: str = typer.Option("1:1", "--ratio", help="attention:Mamba ratio of the hybrid (12 layers: 1:1, 1:3, "
                              "1:5 or 1:11)."),
    steps: int = typer.Option(60, "--steps", min=1, help="Distillation steps (about 2 s each with one thread on a "
                              "quiet 2-core box; 60 keep the demo near 3 minutes; 120 measured the same held-out CE: "
                              "the 400 utterances, about 11 steps an epoch, are then over-fitted)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak distillation learning rate."),
    train: str = typer.Option("all", "--train", help="What distillation trains: all, or mamba (only the new "
                              "Mamba layers), as `mamtra distill --train`."),
    wer_sentences: int = typer.Option(20, "--wer-sentences", min=0, help="Rows of the held-out list mini-heldout "
                                      "each model speaks for the WER and SIM columns (0 = none, 120 = all)."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads per stage (0: 1, which the demo's small "
                                "models run fastest with, above all on a busy machine)."),
    full: bool = typer.Option(False, "--full", help="Every model speaks the whole held-out list (120 rows; about "
                              "25 more minutes) instead of the first --wer-sentences."),
    seed: int = typer.Option(0, "--seed", help="Seed of transfer, distillation and sampling."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Transfer → distill → export → score → synth → profile cache-growth → eval on the built-in mini voice; ends
    with a table of the teacher, the ground truth, the shipped hybrids and yours (CE, WER, SIM, cache bytes, RTF)
    and the wav and PNG paths."""
    import json

    from mamtra_cli.demo import format_table, run_demo

    summary = run_demo(out, ratio=ratio, steps=steps, lr=lr, train=train, wer_sentences=wer_sentences,
                       threads=threads, seed=seed, force=force, full=full)
    print(json.dumps(summary) if json_out else format_table(summary, out))

"""`mamtra profile speed`: decode and prefill throughput of teacher and hybrids at several batch sizes and
context lengths, in one run with interleaved repeats, each figure set against this machine's bandwidth floor
(`mamtra_cli.profiling.speed`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mamtra_cli.cli import THREADS_HELP
from mamtra_cli.models.decode_mode import DECODE_HELP


def profile_speed(
    model: Optional[List[str]] = typer.Option(None, "--model", help="Model to profile (repeatable): `mini`, a shipped hybrid (`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`), MamTra or CosyVoice 2 dir, llm.pt."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Build random-weight models of this arch profile (e.g. cosyvoice2-0.5b) or YAML path."),
    ratio: str = typer.Option("1:1,1:3,1:5,1:11", "--ratio", help="With --arch: hybrids to build besides the teacher."),
    batch: str = typer.Option("1,4", "--batch", help="Batch sizes (streams), comma-separated."),
    contexts: str = typer.Option("512,4096", "--contexts", help="Context lengths (tokens already in the cache)."),
    decode_steps: int = typer.Option(16, "--decode-steps", min=1, help="Timed decode steps per repeat."),
    prefill_chunk: int = typer.Option(64, "--prefill-chunk", min=1, help="Tokens of the timed prefill chunk (appended at the context depth)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Interleaved repeats (model after model); medians are reported."),
    dtype: str = typer.Option("fp32", "--dtype", help="Model and cache dtype: fp32, bf16 or fp16."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cuda or cpu."),
    decode: str = typer.Option("auto", "--decode", help=DECODE_HELP + " The decode steps are timed on this path."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for speed.csv, speed.json and speed.png."),
    seed: int = typer.Option(0, "--seed", help="Seed of random weights and inputs."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace this profile's existing result files in --out."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Decode and prefill tokens/s per model, batch and context, against the bandwidth floor.

    All models are built first; for each (context, batch) each model gets a cache of `context` tokens
    (synthetic K/V: a decode step's work depends on the cache's size, not its values), one untimed warm-up,
    then --repeats rounds that visit the models in turn (interleaved, so load changes hit all alike). A round
    times --decode-steps one-token decode steps (ms/step) and one --prefill-chunk chunk appended at the
    context depth; the cache is cut back to `context` after each. Medians are reported.
    Memory bandwidth is measured in the same run (256 MiB copy and sum); the floor of one decode step is
    (weights read per step + cache bytes) ÷ read bandwidth, and `of floor` = floor ÷ measured time.
    --decode static/graph time the steps on a static cache preallocated to context + steps (graph: the step
    captured once per model, batch and context as a CUDA graph, untimed); the mode is in the notes and JSON.

    Example: mamtra profile speed --arch cosyvoice2-0.5b --batch 1,4 --contexts 512,4096 --decode-steps 8
    """
    import json

    from mamtra_cli.profiling.speed import format_table, profile_speed as profile

    result = profile(model, arch, ratio=ratio, batch=batch, contexts=contexts, decode_steps=decode_steps,
                     prefill_chunk=prefill_chunk, repeats=repeats, dtype=dtype, device=device, decode=decode,
                     out=out, seed=seed, threads=threads, force=force)
    print(json.dumps(result) if json_out else format_table(result))

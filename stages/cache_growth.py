"""`mamtra profile cache-growth`: decode-time cache size vs sequence length, teacher vs hybrids (the paper's
Fig. 5), measured on a real `HybridCache` after real forward passes and checked against the analytic size
(`mamtra_cli.profiling.cache_growth`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def cache_growth(
    model: Optional[List[str]] = typer.Option(None, "--model", help="Model to profile (repeatable): `mini`, a shipped hybrid (`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`), MamTra or CosyVoice 2 dir, llm.pt."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Build random-weight models of this arch profile (e.g. cosyvoice2-0.5b) or YAML path."),
    ratio: str = typer.Option("1:1,1:3,1:5,1:11", "--ratio", help="With --arch: hybrids to build besides the teacher (uniform placement)."),
    lengths: str = typer.Option("128,512,1024,2048,4096,8192", "--lengths", help="Sequence lengths (tokens) at which to read the cache."),
    batch: int = typer.Option(1, "--batch", min=1, help="Streams in the batch."),
    dtype: str = typer.Option("bf16", "--dtype", help="Model and cache dtype: bf16, fp16 or fp32."),
    fill: str = typer.Option("prefill", "--fill", help="How to reach each length before its decode steps: prefill (real chunked forward passes) or synthetic (random K/V, no compute)."),
    decode_steps: int = typer.Option(2, "--decode-steps", min=0, help="Real one-token decode steps that end the approach to each length."),
    chunk: int = typer.Option(512, "--chunk", min=1, help="Prefill chunk length (tokens) with --fill prefill."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for cache_growth.csv, cache_growth.json and cache_growth.png."),
    seed: int = typer.Option(0, "--seed", help="Seed of random weights and inputs."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace this profile's existing result files in --out."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Cache bytes vs tokens for the teacher and its hybrids (Fig. 5), measured and checked.

    Each model runs for real: its HybridCache is brought to each length in turn (ascending) by prefill
    chunks of --chunk tokens (or, with --fill synthetic, random K/V appended with no compute), and the last
    --decode-steps tokens of every length are real one-token decode steps; then HybridCache.report() is read.
    Decoding all the way to 8192 tokens one token at a time is too slow for a 0.5B model on a CPU, hence
    the chunks. Every reading is compared with analytic_cache_bytes; a disagreement is a bug and stops
    the run with both numbers. The crossover (first length at which a hybrid's cache is below the teacher's)
    is computed exactly and verified by measuring at T*−1 and T*.

    Example: mamtra profile cache-growth --arch cosyvoice2-0.5b --ratio 1:1,1:3,1:5,1:11 --fill synthetic --out prof
    """
    import json

    from mamtra_cli.profiling.cache_growth import format_table, profile_cache_growth

    result = profile_cache_growth(model, arch, ratio=ratio, lengths=lengths, batch=batch, dtype=dtype, fill=fill,
                                  decode_steps=decode_steps, chunk=chunk, out=out, seed=seed, threads=threads,
                                  force=force)
    print(json.dumps(result) if json_out else format_table(result, out))

"""`mamtra profile scan`: (a) the chunked SSD scan against a step-by-step scan, (b) cached decode against
recomputing the whole prefix, at CosyVoice 2 sizes with random weights (`mamtra_cli.profiling.scan`)."""

from __future__ import annotations

from typing import Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def profile_scan(
    lengths: str = typer.Option("256,512,1024,2048,4096", "--lengths", help="Sequence lengths (tokens)."),
    arch: str = typer.Option("cosyvoice2-0.5b", "--arch", help="Arch profile (or YAML path) whose layer sizes are used."),
    layers: int = typer.Option(2, "--layers", min=2, help="Layers of the models in (b): a 1:1 hybrid (M,A,…) and all attention; even."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timings per point (medians; (a) interleaves chunked and sequential)."),
    decode_steps: int = typer.Option(4, "--decode-steps", min=1, help="Cached decode steps timed per repeat in (b)."),
    dtype: str = typer.Option("fp32", "--dtype", help="dtype of (a)'s inputs and (b)'s models: fp32 or bf16."),
    skip_sequential: bool = typer.Option(False, "--skip-sequential", help="Skip (a), the slow Python-loop scan."),
    seed: int = typer.Option(0, "--seed", help="Seed of random weights and inputs."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the tables."),
) -> None:
    """Two tables with ratios: chunked SSD vs sequential scan, and cached decode vs full-prefix recompute.

    (a) one Mamba-2 layer's scan (14 heads, headdim = d_state = 64) over L tokens: `ssd_chunked` against a
    Python loop of `ssd_step` (mamtra_cli.models.bench_ssd.bench_scan).
    (b) time to produce one token at context L: a decode step on a real cache of L tokens (built by a real
    prefill) against one forward over all L+1 tokens with no cache, for a 1:1 hybrid and an all-attention
    model with the arch's real layer sizes but only --layers layers (2 by default, to keep the CPU run
    short; both costs scale with the layer count, so the ratios barely depend on it).

    Example: mamtra profile scan --lengths 256,1024,4096 --repeats 2
    """
    import json

    from mamtra_cli.profiling.scan import format_table, profile_scan as profile

    result = profile(lengths, arch, layers=layers, repeats=repeats, decode_steps=decode_steps, dtype=dtype,
                     skip_sequential=skip_sequential, seed=seed, threads=threads)
    print(json.dumps(result) if json_out else format_table(result))

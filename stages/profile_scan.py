"""`mamtra profile scan`: (a) the chunked SSD scan against a step-by-step scan, (b) cached decode against
recomputing the whole prefix, at CosyVoice 2 sizes with random weights."""

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

    import torch

    from mamtra_cli import profiling as P
    from mamtra_cli.cli import check_threads, stderr_console
    from mamtra_cli.errors import UserError
    from mamtra_cli.models.bench_ssd import bench_scan
    from mamtra_cli.models.config import ATTENTION, MAMBA
    from mamtra_cli.profiling import ModelSpec

    console = stderr_console()
    check_threads(threads)
    torch_dtype = P.parse_dtype(dtype)
    lens = P.parse_int_list(lengths, "--lengths")
    if layers % 2:
        raise UserError(f"--layers {layers} is odd; the 1:1 hybrid needs an even layer count.")

    # The models of (b) have the arch's real layer sizes, so the arch's full size decides the thread count.
    n_threads = P.apply_profile_threads(threads, [ModelSpec("arch", P.arch_config(arch), f"arch:{arch}")])
    scan_rows = []
    if not skip_sequential:
        with console.status("(a) chunked vs sequential SSD scan"):
            scan_rows = bench_scan(lens, repeats=repeats, dtype=torch_dtype)

    full = P.arch_config(arch)
    teacher_cfg = full.with_layer_types([ATTENTION] * layers)
    hybrid_cfg = full.with_layer_types([MAMBA, ATTENTION] * (layers // 2))
    specs = [ModelSpec("attention", teacher_cfg, f"arch:{arch}", text_rows=P.SHRUNK_TEXT_ROWS, seed=seed),
             ModelSpec("hybrid 1:1", hybrid_cfg, f"arch:{arch}", text_rows=P.SHRUNK_TEXT_ROWS, seed=seed)]
    decode_rows = []
    g = torch.Generator().manual_seed(seed)
    for s in specs:
        lm = s.build(torch_dtype)
        for n in lens:
            with console.status(f"(b) {s.name}: {n} tokens"):
                cache = lm.new_cache(1, torch_dtype)
                P.prefill(lm, cache, n, n, g)
                P.decode_steps(lm, cache, 1, g)  # warm-up
                P.truncate_cache(cache, n)
                embeds = P.speech_embeds(lm, 1, n + 1, g)
                cached, recompute = [], []
                with torch.inference_mode():
                    lm.forward_embeds(embeds)  # warm-up
                    for _ in range(repeats):
                        cached.append(P.time_call(lambda: P.decode_steps(lm, cache, decode_steps, g)) / decode_steps)
                        P.truncate_cache(cache, n)
                        recompute.append(P.time_call(lambda: lm.llm_decoder(lm.forward_embeds(embeds)[:, -1])))
            c_ms, r_ms = P.median(cached) * 1e3, P.median(recompute) * 1e3
            decode_rows.append({"model": s.name, "layout": s.layout, "length": n, "cached_ms_per_token": c_ms,
                                "recompute_ms_per_token": r_ms, "speedup": r_ms / c_ms})
        lm = None  # free before building the next model

    notes = [f"(b) uses {layers} layers of {arch}'s real sizes (random weights, {dtype}), batch 1",
             f"medians of {repeats} repeats; {n_threads} CPU thread(s)"]
    result = {"scan": scan_rows, "decode": decode_rows, "notes": notes, "threads": n_threads}
    if json_out:
        print(json.dumps(result))
        return
    if scan_rows:
        print("(a) SSD scan, one layer (14 heads × 64 × 64)")
        print("length\tchunked ms\tsequential ms\tsequential/chunked")
        for r in scan_rows:
            print(f"{r['length']}\t{r['chunked_ms']:.2f}\t{r['sequential_ms']:.2f}\t{r['speedup']:.1f}")
    print(f"(b) one token at context L: cached decode vs full-prefix recompute ({layers} layers)")
    print("model\tlength\tcached ms/token\trecompute ms/token\trecompute/cached")
    for r in decode_rows:
        print(f"{r['model']}\t{r['length']}\t{r['cached_ms_per_token']:.2f}\t{r['recompute_ms_per_token']:.2f}\t"
              f"{r['speedup']:.1f}")
    for n in notes:
        print(f"note: {n}")

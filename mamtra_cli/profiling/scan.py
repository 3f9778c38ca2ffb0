"""(a) the chunked SSD scan against a step-by-step scan, (b) cached decode against recomputing the whole
prefix, at an arch profile's layer sizes with random weights (`mamtra profile scan`).
"""

from __future__ import annotations

from mamtra_cli import profiling as P
from mamtra_cli.errors import UserError


def profile_scan(lengths: str = "256,512,1024,2048,4096", arch: str = "cosyvoice2-0.5b", layers: int = 2,
                 repeats: int = 3, decode_steps: int = 4, dtype: str = "fp32", skip_sequential: bool = False,
                 seed: int = 0, threads: int | None = None, *, console=None) -> dict:
    """Two tables of timings with ratios: (a) chunked SSD vs sequential scan, (b) cached decode vs full-prefix
    recompute. The keyword arguments are the options of `mamtra profile scan` (its --help explains the
    method). Returns the result `--json` prints."""
    import torch

    from mamtra_cli.cli import check_threads, stderr_console
    from mamtra_cli.models.bench_ssd import bench_scan
    from mamtra_cli.models.config import ATTENTION, MAMBA

    console = console or stderr_console()
    check_threads(threads)
    torch_dtype = P.parse_dtype(dtype)
    lens = P.parse_int_list(lengths, "--lengths")
    if layers % 2:
        raise UserError(f"--layers {layers} is odd; the 1:1 hybrid needs an even layer count.")

    # The models of (b) have the arch's real layer sizes, so the arch's full size decides the thread count.
    n_threads = P.apply_profile_threads(threads, [P.ModelSpec("arch", P.arch_config(arch), f"arch:{arch}")])
    scan_rows = []
    if not skip_sequential:
        with console.status("(a) chunked vs sequential SSD scan"):
            scan_rows = bench_scan(lens, repeats=repeats, dtype=torch_dtype)

    full = P.arch_config(arch)
    teacher_cfg = full.with_layer_types([ATTENTION] * layers)
    hybrid_cfg = full.with_layer_types([MAMBA, ATTENTION] * (layers // 2))
    specs = [P.ModelSpec("attention", teacher_cfg, f"arch:{arch}", text_rows=P.SHRUNK_TEXT_ROWS, seed=seed),
             P.ModelSpec("hybrid 1:1", hybrid_cfg, f"arch:{arch}", text_rows=P.SHRUNK_TEXT_ROWS, seed=seed)]
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
    result = {"scan": scan_rows, "decode": decode_rows, "layers": layers, "notes": notes, "threads": n_threads}
    return result


def format_table(result: dict) -> str:
    """The result of `profile_scan` as the tables `mamtra profile scan` prints."""
    lines = []
    if result["scan"]:
        lines.append("(a) SSD scan, one layer (14 heads × 64 × 64)")
        lines.append("length\tchunked ms\tsequential ms\tsequential/chunked")
        for r in result["scan"]:
            lines.append(f"{r['length']}\t{r['chunked_ms']:.2f}\t{r['sequential_ms']:.2f}\t{r['speedup']:.1f}")
    lines.append(f"(b) one token at context L: cached decode vs full-prefix recompute ({result['layers']} layers)")
    lines.append("model\tlength\tcached ms/token\trecompute ms/token\trecompute/cached")
    for r in result["decode"]:
        lines.append(f"{r['model']}\t{r['length']}\t{r['cached_ms_per_token']:.2f}\t{r['recompute_ms_per_token']:.2f}\t"
                     f"{r['speedup']:.1f}")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)

"""`mamtra profile speed`: decode and prefill throughput of teacher and hybrids at several batch sizes and
context lengths, in one run with interleaved repeats, each figure set against this machine's bandwidth floor."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def _transformers_reference(config, dtype, contexts, batches, steps, repeats):
    """Decode ms/step of transformers' Qwen2 built from the teacher's config (random weights), as an
    outside reference. Returns (rows, note).

    Optional and last: it never costs the run its own results. Each repeat decodes from a fresh copy of the
    prefilled cache instead of cutting the cache back (`DynamicCache.crop`'s signature and even its
    existence change between transformers versions; one such change lost every measurement of a run), and
    any failure ends only the comparison: the rows measured before it are kept and the note says why."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [], "transformers is not importable: the outside Qwen2 reference was skipped"
    rows: list[dict] = []
    try:
        _time_transformers_qwen2(config, dtype, contexts, batches, steps, repeats, rows)
    except Exception as e:  # noqa: BLE001 - any failure of an optional outside library ends only this part
        first = (str(e).strip().splitlines() or [""])[0][:200]
        done = f" after {len(rows)} of {len(contexts) * len(batches)} points" if rows else ""
        return rows, (f"transformers {getattr(transformers, '__version__', '?')} reference failed{done} "
                      f"({type(e).__name__}: {first}); MamTra's own results above are complete")
    return rows, "transformers' Qwen2 (random weights, teacher config) timed as an outside reference"


def _time_transformers_qwen2(config, dtype, contexts, batches, steps, repeats, rows: list) -> None:
    """The measurements of `_transformers_reference`, appended to `rows` one point at a time."""
    import copy

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mamtra_cli import profiling as P

    qcfg = Qwen2Config(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                       num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                       num_hidden_layers=config.num_layers, vocab_size=config.decoder_classes,
                       rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps, head_dim=config.head_dim,
                       tie_word_embeddings=False)
    model = Qwen2ForCausalLM(qcfg).to(dtype).eval()
    with torch.inference_mode():
        for c in contexts:
            for b in batches:
                prefilled = model(input_ids=torch.randint(0, 100, (b, c)), use_cache=True).past_key_values
                ids = torch.randint(0, 100, (b, 1))
                times = []
                for _ in range(repeats):
                    past = copy.deepcopy(prefilled)  # untimed: every repeat starts at exactly `c` tokens
                    times.append(P.time_call(lambda: [model(input_ids=ids, past_key_values=past, use_cache=True)
                                                      for _ in range(steps)]) / steps)
                ms = P.median(times) * 1e3
                rows.append({"model": "transformers-qwen2", "batch": b, "context": c, "decode_ms_per_step": ms,
                             "decode_tokens_per_s": b * 1e3 / ms})


def profile_speed(
    model: Optional[List[str]] = typer.Option(None, "--model", help="Model to profile (repeatable): MamTra or CosyVoice 2 dir, llm.pt."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Build random-weight models of this arch profile (e.g. cosyvoice2-0.5b) or YAML path."),
    ratio: str = typer.Option("1:1,1:3,1:5,1:11", "--ratio", help="With --arch: hybrids to build besides the teacher."),
    batch: str = typer.Option("1,4", "--batch", help="Batch sizes (streams), comma-separated."),
    contexts: str = typer.Option("512,4096", "--contexts", help="Context lengths (tokens already in the cache)."),
    decode_steps: int = typer.Option(16, "--decode-steps", min=1, help="Timed decode steps per repeat."),
    prefill_chunk: int = typer.Option(64, "--prefill-chunk", min=1, help="Tokens of the timed prefill chunk (appended at the context depth)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Interleaved repeats (model after model); medians are reported."),
    dtype: str = typer.Option("fp32", "--dtype", help="Model and cache dtype: fp32, bf16 or fp16."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cuda or cpu."),
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

    Example: mamtra profile speed --arch cosyvoice2-0.5b --batch 1,4 --contexts 512,4096 --decode-steps 8
    """
    import json

    import torch

    from mamtra_cli import profiling as P
    from mamtra_cli.cli import check_threads, parse_device, stderr_console
    from mamtra_cli.models.cache import analytic_cache_bytes

    console = stderr_console()
    check_threads(threads)
    device = parse_device(device, allow_index=False)
    P.check_results_out(out, "speed", force)  # before measuring, not after
    torch_dtype = P.parse_dtype(dtype)
    bpe = torch.tensor([], dtype=torch_dtype).element_size()
    batches = P.parse_int_list(batch, "--batch")
    ctxs = P.parse_int_list(contexts, "--contexts")
    specs = P.resolve_specs(model, arch, ratio, seed)
    n_threads = P.apply_profile_threads(threads, specs)

    with console.status("measuring memory bandwidth"):
        bw = P.measure_bandwidth(device=device)
    models = {}
    for s in specs:
        with console.status(f"building {s.name} ({s.layout})"):
            models[s.name] = s.build(torch_dtype, device)
    g = torch.Generator().manual_seed(seed)

    rows = []
    for c in ctxs:
        for b in batches:
            caches, dec, pre = {}, {s.name: [] for s in specs}, {s.name: [] for s in specs}
            for s in specs:
                lm = models[s.name]
                caches[s.name] = cache = lm.new_cache(b, torch_dtype)
                P.synthetic_fill(cache, c, g)
                P.decode_steps(lm, cache, 1, g)  # warm-up
                P.prefill(lm, cache, prefill_chunk, prefill_chunk, g)
                P.truncate_cache(cache, c)
            for r in range(repeats):
                for s in specs:
                    lm, cache = models[s.name], caches[s.name]
                    with console.status(f"context {c}, batch {b}, round {r + 1}/{repeats}: {s.name}"):
                        t = P.time_call(lambda: P.decode_steps(lm, cache, decode_steps, g), device)
                        dec[s.name].append(t / decode_steps)
                        P.truncate_cache(cache, c)
                        pre[s.name].append(P.time_call(lambda: P.prefill(lm, cache, prefill_chunk, prefill_chunk, g),
                                                       device))
                        P.truncate_cache(cache, c)
            for s in specs:
                step_s = P.median(dec[s.name])
                pre_s = P.median(pre[s.name])
                w = P.weight_bytes(s.config, bpe)
                cache_b = analytic_cache_bytes(s.config, c, b, bpe)["total_bytes"]
                floor_s = (w["read_per_step_bytes"] + cache_b) / (bw["read_gb_s"] * 1e9)
                rows.append({"model": s.name, "layout": s.layout, "batch": b, "context": c,
                             "decode_ms_per_step": step_s * 1e3, "decode_tokens_per_s": b / step_s,
                             "prefill_tokens_per_s": b * prefill_chunk / pre_s,
                             "bytes_per_step": w["read_per_step_bytes"] + cache_b, "cache_bytes": cache_b,
                             "floor_ms_per_step": floor_s * 1e3, "fraction_of_floor": floor_s / step_s,
                             "decode_samples_ms": [x * 1e3 for x in dec[s.name]]})
            del caches
    teacher = specs[0].name
    for r in rows:
        t = next(x for x in rows if x["model"] == teacher and x["batch"] == r["batch"] and x["context"] == r["context"])
        r["decode_speedup_vs_first"] = r["decode_tokens_per_s"] / t["decode_tokens_per_s"]
        r["prefill_speedup_vs_first"] = r["prefill_tokens_per_s"] / t["prefill_tokens_per_s"]

    ref_rows, ref_note = _transformers_reference(specs[0].config, torch_dtype, ctxs, batches, decode_steps, repeats) \
        if device == "cpu" else ([], "outside reference only on CPU runs")
    notes = [f"device {device}, {n_threads} CPU thread(s), {dtype}; bandwidth {bw['read_gb_s']:.1f} GB/s read, "
             f"{bw['copy_gb_s']:.1f} GB/s copy (read+write)",
             "cache filled synthetically to each context; prefill = one chunk of "
             f"{prefill_chunk} tokens at that depth", ref_note]
    if (n := P.text_embedding_note(specs)):
        notes.append(n)
    result = {"device": device, "dtype": dtype, "bandwidth": bw, "batches": batches, "contexts": ctxs,
              "decode_steps": decode_steps, "repeats": repeats, "prefill_chunk": prefill_chunk,
              "models": [{"name": s.name, "layout": s.layout, "source": s.source} for s in specs],
              "rows": rows, "reference": ref_rows, "notes": notes, "threads": n_threads}
    if out is not None:
        labels = P.legend_labels(specs)
        P.write_results(out, "speed", [{k: v for k, v in r.items() if k != "decode_samples_ms"} for r in rows], result,
                        lambda png: P.plot_lines(png,
                                 {f"{labels[s.name]}, batch {b}": (ctxs, [next(r["decode_tokens_per_s"] for r in rows if r["model"] == s.name
                                                                  and r["batch"] == b and r["context"] == c) for c in ctxs])
                                  for s in specs for b in batches},
                                 "context (tokens)", "decode throughput (tokens/s, all streams)",
                                 f"Decode speed ({device}, {dtype})", logx=True, note=notes[0]), force=force)
    if json_out:
        print(json.dumps(result))
        return
    print(f"model\tbatch\tcontext\tdecode tok/s\tms/step\tfloor ms\tof floor\tdecode ×{teacher}\tprefill tok/s\tprefill ×{teacher}")
    for r in rows:
        print(f"{r['model']}\t{r['batch']}\t{r['context']}\t{r['decode_tokens_per_s']:.2f}\t{r['decode_ms_per_step']:.1f}\t"
              f"{r['floor_ms_per_step']:.1f}\t{r['fraction_of_floor']:.2f}\t{r['decode_speedup_vs_first']:.3f}\t"
              f"{r['prefill_tokens_per_s']:.1f}\t{r['prefill_speedup_vs_first']:.3f}")
    for r in ref_rows:
        print(f"{r['model']}\t{r['batch']}\t{r['context']}\t{r['decode_tokens_per_s']:.2f}\t{r['decode_ms_per_step']:.1f}")
    for n in notes:
        print(f"note: {n}")

"""Decode and prefill throughput of teacher and hybrids at several batch sizes and context lengths, in one run
with interleaved repeats, each figure set against this machine's bandwidth floor (`mamtra profile speed`);
transformers' Qwen2 timed beside them as an outside reference when it is installed.
"""

from __future__ import annotations

from pathlib import Path

from mamtra_cli import profiling as P


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


class _StaticDecoder:
    """The decode steps of one model at one (context, batch) on a `StaticHybridCache` ("static": the eager
    `decode_step`; "graph": it replayed as a CUDA graph), mirroring `P.decode_steps` on the dynamic cache:
    each step feeds the argmax of the previous logits. The static cache is loaded from the filled dynamic
    one (same K/V, positions, Mamba states) with room for the warm-up and `steps` more tokens; `rewind()`
    brings it back to the context, as `P.truncate_cache` does for the dynamic cache."""

    def __init__(self, lm, dynamic, steps: int, mode: str, dtype):
        import torch

        self.lm = lm
        self.cache = lm.new_static_cache(dynamic.batch, dynamic.length + steps + 1, dtype)
        self.cache.load(dynamic)
        self.start = self.cache.snapshot()  # length, key mask, positions, Mamba states at the context
        self.ids = torch.zeros(dynamic.batch, dtype=torch.long, device=self.cache.device)
        if mode == "graph":
            from mamtra_cli.models.cuda_graph import GraphedDecodeStep

            self.step = GraphedDecodeStep(lm, self.cache)  # warms up and captures; the cache is not advanced
        else:
            self.step = lambda ids: lm.decode_step(ids, self.cache)  # noqa: E731

    def run(self, steps: int, generator) -> None:
        import torch

        with torch.inference_mode():
            ids = torch.randint(0, self.lm.config.speech_token_size, (self.cache.batch,), generator=generator)
            ids = ids.to(self.cache.device)
            for _ in range(steps):
                ids = self.step(ids).argmax(-1)

    def rewind(self) -> None:
        """Back to the context: the slots written since are unfilled again (masked, rewritten by later steps)."""
        self.cache.restore(self.start)


_DECODE_NOTES = {
    "dynamic": "decode steps on the growing cache (forward_embeds on a HybridCache)",
    "static": "decode steps on a static cache preallocated to context + steps (decode_step, eager)",
    "graph": "decode steps on a static cache, replayed as a CUDA graph (captured once per model, batch and "
             "context, untimed)",
}


def profile_speed(model: list[str] | None = None, arch: str | None = None, ratio: str = "1:1,1:3,1:5,1:11",
                  batch: str = "1,4", contexts: str = "512,4096", decode_steps: int = 16, prefill_chunk: int = 64,
                  repeats: int = 3, dtype: str = "fp32", device: str = "auto", decode: str = "auto",
                  out: Path | None = None, seed: int = 0, threads: int | None = None, force: bool = False, *,
                  console=None) -> dict:
    """Decode and prefill tokens/s of `model`s (or random-weight models of the arch profile `arch`: the teacher
    and one hybrid per `ratio`) per batch and context, against the bandwidth floor. The keyword arguments are
    the options of `mamtra profile speed` (its --help explains the method); `decode` picks the timed decode
    path (`mamtra_cli.models.decode_mode`). With `out`, writes speed.csv/.json/.png. Returns the result
    `--json` prints."""
    import torch

    from mamtra_cli.cli import check_threads, parse_device, stderr_console
    from mamtra_cli.models.cache import analytic_cache_bytes
    from mamtra_cli.models.decode_mode import resolve_decode

    console = console or stderr_console()
    out = None if out is None else Path(out)
    check_threads(threads)
    device = parse_device(device, allow_index=False)
    mode = resolve_decode(decode, device)
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
            static = {}
            for s in specs:
                lm = models[s.name]
                caches[s.name] = cache = lm.new_cache(b, torch_dtype)
                P.synthetic_fill(cache, c, g)
                if mode != "dynamic":
                    # The decode steps run on a static copy of the filled cache (prefill is the same in every
                    # mode: a static cache's prefill goes through the dynamic path). Built before the warm-up,
                    # so that both start from the same `c` tokens.
                    with console.status(f"context {c}, batch {b}: {mode} decode of {s.name}"):
                        static[s.name] = _StaticDecoder(lm, cache, decode_steps, mode, torch_dtype)
                        static[s.name].run(1, g)  # warm-up
                        static[s.name].rewind()
                P.decode_steps(lm, cache, 1, g)  # warm-up
                P.prefill(lm, cache, prefill_chunk, prefill_chunk, g)
                P.truncate_cache(cache, c)
            for r in range(repeats):
                for s in specs:
                    lm, cache = models[s.name], caches[s.name]
                    with console.status(f"context {c}, batch {b}, round {r + 1}/{repeats}: {s.name}"):
                        if mode == "dynamic":
                            t = P.time_call(lambda: P.decode_steps(lm, cache, decode_steps, g), device)
                            P.truncate_cache(cache, c)
                        else:
                            t = P.time_call(lambda: static[s.name].run(decode_steps, g), device)
                            static[s.name].rewind()
                        dec[s.name].append(t / decode_steps)
                        pre[s.name].append(P.time_call(lambda: P.prefill(lm, cache, prefill_chunk, prefill_chunk, g),
                                                       device))
                        P.truncate_cache(cache, c)
            for s in specs:
                step_s = P.median(dec[s.name])
                pre_s = P.median(pre[s.name])
                w = P.weight_bytes(s.config, bpe)
                cache_b = analytic_cache_bytes(s.config, c, b, bpe)["total_bytes"]
                floor_s = (w["read_per_step_bytes"] + cache_b) / (bw["read_gb_s"] * 1e9)
                rows.append({"model": s.name, "layout": s.layout, "batch": b, "context": c, "decode": mode,
                             "decode_ms_per_step": step_s * 1e3, "decode_tokens_per_s": b / step_s,
                             "prefill_tokens_per_s": b * prefill_chunk / pre_s,
                             "bytes_per_step": w["read_per_step_bytes"] + cache_b, "cache_bytes": cache_b,
                             "floor_ms_per_step": floor_s * 1e3, "fraction_of_floor": floor_s / step_s,
                             "decode_samples_ms": [x * 1e3 for x in dec[s.name]]})
            del caches
            static.clear()  # the static caches (and CUDA graphs) of this point, before the next allocates its own
    teacher = specs[0].name
    for r in rows:
        t = next(x for x in rows if x["model"] == teacher and x["batch"] == r["batch"] and x["context"] == r["context"])
        r["decode_speedup_vs_first"] = r["decode_tokens_per_s"] / t["decode_tokens_per_s"]
        r["prefill_speedup_vs_first"] = r["prefill_tokens_per_s"] / t["prefill_tokens_per_s"]

    ref_rows, ref_note = _transformers_reference(specs[0].config, torch_dtype, ctxs, batches, decode_steps, repeats) \
        if device == "cpu" else ([], "outside reference only on CPU runs")
    notes = [f"device {device}, {n_threads} CPU thread(s), {dtype}, {mode} decode; bandwidth "
             f"{bw['read_gb_s']:.1f} GB/s read, {bw['copy_gb_s']:.1f} GB/s copy (read+write)",
             "cache filled synthetically to each context; prefill = one chunk of "
             f"{prefill_chunk} tokens at that depth", _DECODE_NOTES[mode], ref_note]
    if (n := P.text_embedding_note(specs)):
        notes.append(n)
    result = {"device": device, "dtype": dtype, "decode": mode, "bandwidth": bw, "batches": batches, "contexts": ctxs,
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
                                 f"Decode speed ({device}, {dtype}, {mode} decode)", logx=True, note=notes[0]), force=force)
    return result


def format_table(result: dict) -> str:
    """The result of `profile_speed` as the table `mamtra profile speed` prints."""
    teacher = result["models"][0]["name"]
    lines = [f"model\tbatch\tcontext\tdecode tok/s\tms/step\tfloor ms\tof floor\tdecode ×{teacher}\tprefill tok/s\t"
             f"prefill ×{teacher}"]
    for r in result["rows"]:
        lines.append(f"{r['model']}\t{r['batch']}\t{r['context']}\t{r['decode_tokens_per_s']:.2f}\t{r['decode_ms_per_step']:.1f}\t"
                     f"{r['floor_ms_per_step']:.1f}\t{r['fraction_of_floor']:.2f}\t{r['decode_speedup_vs_first']:.3f}\t"
                     f"{r['prefill_tokens_per_s']:.1f}\t{r['prefill_speedup_vs_first']:.3f}")
    for r in result["reference"]:
        lines.append(f"{r['model']}\t{r['batch']}\t{r['context']}\t{r['decode_tokens_per_s']:.2f}\t{r['decode_ms_per_step']:.1f}")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)

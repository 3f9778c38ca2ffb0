"""Peak memory of synthesis per model, batch and length, and what it means on a GPU card (the paper's Fig. 3;
`mamtra profile vram`): the speech LM's work (prompt prefill + decode) measured by `measure_peak`, or with
bundles the whole pipeline (front end, LM, flow, vocoder); token counts of a Seed-TTS list estimated from its
text; streams per card and the bandwidth floor of a decode step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from mamtra_cli import profiling as P
from mamtra_cli.errors import UserError

TOKEN_RATE_HZ = 25  # CosyVoice 2 speech tokens per second
CHARS_PER_TEXT_TOKEN = 4  # Qwen2 BPE on Latin-script text: ~4 characters per token
LATIN_CHARS_PER_S = 15  # read English speech
CJK_CHARS_PER_S = 4  # read Mandarin speech
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def _split_chars(text: str) -> tuple[int, int]:
    cjk = len(_CJK.findall(text))
    return len(text.strip()) - cjk, cjk


def estimate_text_tokens(text: str) -> int:
    """No tokenizer: ⌈latin characters / 4⌉ + one token per CJK character (Qwen2 BPE, roughly)."""
    latin, cjk = _split_chars(text)
    return math.ceil(latin / CHARS_PER_TEXT_TOKEN) + cjk


def estimate_speech_tokens(text: str) -> int:
    """Speech tokens to say `text`: 25 Hz × (latin chars / 15 per s + CJK chars / 4 per s)."""
    latin, cjk = _split_chars(text)
    return math.ceil(TOKEN_RATE_HZ * (latin / LATIN_CHARS_PER_S + cjk / CJK_CHARS_PER_S))


def _wav_seconds(path: Path) -> float | None:
    import wave

    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / float(w.getframerate())
    except (OSError, EOFError, wave.Error):
        return None


def eval_list_lengths(path: Path) -> list[dict]:
    """Seed-TTS list `utt|prompt_text|prompt_wav|text` → per utterance the LM's prompt (prefill) length
    1 + text tokens(prompt_text ++ text) + 1 + prompt speech tokens, and the total after decoding the new
    text's speech tokens. Prompt speech = 25 × the prompt wav's duration when the file (relative to the
    list) reads as WAV, else estimated from prompt_text like the new speech."""
    from mamtra_cli.errors import UserError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"Cannot read eval list {path}: {e.strerror}.") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 4:
            raise UserError(f"{path} line {i} has {len(parts)} fields; a Seed-TTS eval list has "
                            "utt|prompt_text|prompt_wav|text.")
        utt, prompt_text, prompt_wav, text = parts
        wav = Path(prompt_wav) if Path(prompt_wav).is_absolute() else Path(path).parent / prompt_wav
        secs = _wav_seconds(wav)
        prompt_speech = round(secs * TOKEN_RATE_HZ) if secs is not None else estimate_speech_tokens(prompt_text)
        prompt = 2 + estimate_text_tokens(prompt_text + text) + prompt_speech
        out.append({"utt": utt, "prompt_tokens": prompt, "new_tokens": estimate_speech_tokens(text),
                    "total_tokens": prompt + estimate_speech_tokens(text), "prompt_wav_read": secs is not None})
    if not out:
        raise UserError(f"Eval list {path} has no utterances.")
    return out


@dataclass
class StaticLMWorkload(P.LMWorkload):
    """`LMWorkload` on the static decode path (`--decode static` or `graph`), as `SpeechLM.generate_batch`
    runs it: a `StaticHybridCache` preallocated to `total_tokens` (all of it counts towards the peak), the
    prompt prefilled into it (through a dynamic copy, as the static cache's prefill goes), the cache brought
    to `total_tokens - decode_steps` (`fill`), then `decode_steps` real `decode_step`s, eager ("static") or
    replayed from a CUDA graph captured on this cache ("graph"; the capture's memory pool counts too)."""

    decode: str = "static"

    name = "lm-static"

    def setup(self, spec, device) -> None:
        import torch

        super().setup(spec, device)
        # Warm the static step too (its own code paths and, on CUDA, kernels the dynamic step does not use).
        g = torch.Generator().manual_seed(self.seed + 1)
        with torch.inference_mode():
            warm = self.model.new_static_cache(1, 8)
            self.model.forward_embeds(P.speech_embeds(self.model, 1, 4, g), None, warm)
            self.model.decode_step(torch.zeros(1, dtype=torch.long, device=warm.device), warm)
        del warm

    def run(self) -> dict:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        prompt = min(self.prompt_tokens, self.total_tokens)
        steps = min(self.decode_steps, self.total_tokens - prompt)
        with torch.inference_mode():
            cache = self.model.new_static_cache(self.batch, max(self.total_tokens, 1))
            if prompt:
                self.model.forward_embeds(P.speech_embeds(self.model, self.batch, prompt, g), None, cache)
            ahead = self.total_tokens - prompt - steps
            if self.fill == "prefill":
                done = 0
                while done < ahead:
                    n = min(self.chunk, ahead - done)
                    self.model.forward_embeds(P.speech_embeds(self.model, self.batch, n, g), None, cache)
                    done += n
            else:
                _synthetic_fill_static(cache, ahead, g)
            ids = torch.randint(0, self.model.config.speech_token_size, (self.batch,), generator=g).to(cache.device)
            if steps and self.decode == "graph":
                from mamtra_cli.models.cuda_graph import GraphedDecodeStep

                step = GraphedDecodeStep(self.model, cache)
            else:
                step = lambda t: self.model.decode_step(t, cache)  # noqa: E731
            for _ in range(steps):
                ids = step(ids).argmax(-1)
        rep = cache.report()
        return {"cache_bytes": rep.total_bytes, "cache_allocated_bytes": cache.allocated_nbytes(),
                "tokens": rep.tokens}


def _synthetic_fill_static(cache, tokens: int, generator) -> None:
    """`P.synthetic_fill` for a `StaticHybridCache`: random K/V written into the next `tokens` slots in place,
    random Mamba states, the bookkeeping of `tokens` real positions. No compute, no new memory."""
    import torch

    from mamtra_cli.models.cache import MambaCache, StaticAttentionCache

    if tokens <= 0:
        return
    start = cache.tokens
    for layer in cache.layers:
        if isinstance(layer, StaticAttentionCache):
            for kv in (layer.k, layer.v):
                b, n_kv, _, d = kv.shape
                kv[:, :, start:start + tokens] = torch.randn(b, n_kv, tokens, d, generator=generator).to(kv)
        elif isinstance(layer, MambaCache):
            layer.ssm_state.copy_(0.1 * torch.randn(layer.ssm_state.shape, generator=generator))
            layer.conv_state.copy_(torch.randn(layer.conv_state.shape, generator=generator))
    cache.key_mask[:, start:start + tokens] = True
    cache.next_position.add_(tokens)
    cache.length.add_(tokens)


def plan_on_gpu(gpu: dict, weight_resident_bytes: int, weight_read_bytes: int, per_stream_bytes: float,
                cache_bytes_per_stream: float, batch: int) -> dict:
    """Planning numbers for one model on one card.

    streams = ⌊(memory_gib·2³⁰ − resident weights) ÷ per-stream bytes⌋ (per-stream = measured peak of the
    work ÷ batch: cache + activations); bandwidth floor per decode step at this batch =
    (weights read per step + batch × cache bytes per stream) ÷ bandwidth_gb_s·10⁹, in ms."""
    free = gpu["memory_gib"] * 2**30 - weight_resident_bytes
    streams = max(0, int(free // per_stream_bytes)) if per_stream_bytes > 0 else None
    step_bytes = weight_read_bytes + batch * cache_bytes_per_stream
    ms = step_bytes / (gpu["bandwidth_gb_s"] * 1e9) * 1e3
    return {"gpu": gpu.get("name"), "free_bytes_for_streams": free, "max_streams": streams,
            "floor_ms_per_step": ms, "floor_tokens_per_s": batch * 1e3 / ms}


def profile_vram(gpu: str = "a6000", model: list[str] | None = None, arch: str | None = None,
                 ratio: str = "1:1,1:3,1:5,1:11", eval_list: Path | None = None, lengths: str = "256,1024",
                 prompt_tokens: int = 150, batch: str = "1,16", dtype: str = "bf16", fill: str = "synthetic",
                 decode_steps: int = 2, device: str = "auto", decode: str = "auto", out: Path | None = None,
                 seed: int = 0,
                 threads: int | None = None, bundle: list[Path] | None = None,
                 text: str = "Hello, how are you doing today? This is a longer sentence for profiling.",
                 ref: Path | None = None, ref_text: str | None = None, max_tokens: int | None = None,
                 force: bool = False, *, console=None) -> dict:
    """Peak memory of the LM's synthesis work for `model`s (or random-weight models of the arch profile `arch`:
    the teacher and one hybrid per `ratio`), planned on the GPU profile `gpu`; with `bundle` (one or a list of
    `mamtra export` bundles or mini voice dirs) end-to-end synthesis of `text` in the voice of `ref` instead.
    The keyword arguments are the options of `mamtra profile vram` (its --help explains the method); `decode`
    picks the LM's decode path (`mamtra_cli.models.decode_mode`; bundles decode on the dynamic path). With
    `out`, writes vram.csv/.json/.png (vram_synth.* for bundles). Returns the result `--json` prints."""
    import statistics

    import torch

    from mamtra_cli import profiles
    from mamtra_cli.cli import check_threads, parse_device, stderr_console

    console = console or stderr_console()
    out = None if out is None else Path(out)
    check_threads(threads)
    # The worker measures on the default CUDA device, hence no cuda:N.
    device = parse_device(device, allow_index=False)
    from mamtra_cli.models.decode_mode import resolve_decode

    mode = resolve_decode(decode, device)
    P.check_results_out(out, "vram_synth" if bundle else "vram", force)  # before measuring, not after
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {max_tokens}).")
    card = profiles.load("gpu", gpu)
    card.setdefault("name", gpu)
    torch_dtype = P.parse_dtype(dtype)
    bpe = torch.tensor([], dtype=torch_dtype).element_size()
    batches = P.parse_int_list(batch, "--batch")
    if fill not in ("prefill", "synthetic"):
        raise UserError(f"Unknown --fill {fill!r}; use prefill or synthetic.")

    if bundle:
        if str(decode).strip().lower() not in ("auto", "dynamic"):
            raise UserError(f"--decode {decode} applies to the LM workload; --bundle profiles synthesis on the "
                            "dynamic decode path, so drop --decode.")
        return profile_bundles([bundle] if isinstance(bundle, (str, Path)) else bundle, text, ref, ref_text,
                               max_tokens, card, device, seed, threads, out, console, force)
    if eval_list is not None:
        utts = eval_list_lengths(eval_list)
        longest = max(utts, key=lambda u: u["total_tokens"])
        med_total = statistics.median_low([u["total_tokens"] for u in utts])
        med = next(u for u in utts if u["total_tokens"] == med_total)
        cases = [{"case": "longest", **longest}] + ([{"case": "median", **med}] if med is not longest else [])
        length_note = (f"{len(utts)} utterances of {eval_list}; token counts estimated from text "
                       f"(see --help); {sum(u['prompt_wav_read'] for u in utts)} prompt WAVs read")
    else:
        cases = [{"case": f"{n} tokens", "prompt_tokens": min(prompt_tokens, n), "total_tokens": n}
                 for n in P.parse_int_list(lengths, "--lengths")]
        length_note = f"--lengths with a {prompt_tokens}-token prompt"
    specs = P.resolve_specs(model, arch, ratio, seed)
    # Decided here, for the largest model, and handed to every worker process (each a fresh torch).
    threads = P.apply_profile_threads(threads, specs)
    from mamtra_cli.models.cache import analytic_cache_bytes

    rows = []
    for case in cases:
        for b in batches:
            for s in specs:
                kwargs = {"batch": b, "prompt_tokens": case["prompt_tokens"], "total_tokens": case["total_tokens"],
                          "decode_steps": decode_steps, "fill": fill, "dtype": dtype, "seed": seed}
                workload = "lm"
                if mode != "dynamic":
                    kwargs["decode"] = mode
                    workload = f"{StaticLMWorkload.__module__}:{StaticLMWorkload.__name__}"
                with console.status(f"{s.name}: batch {b}, {case['total_tokens']} tokens on {device}"):
                    m = P.measure_peak(s, workload, kwargs, device=device, threads=threads)
                w = P.weight_bytes(s.config, bpe)
                cache_per_stream = analytic_cache_bytes(s.config, case["total_tokens"], 1, bpe)["total_bytes"]
                per_stream = m["workload_peak_bytes"] / b
                plan = plan_on_gpu(card, w["resident_bytes"], w["read_per_step_bytes"], per_stream,
                                   cache_per_stream, b)
                rows.append({"model": s.name, "layout": s.layout, "case": case["case"], "batch": b, "decode": mode,
                             "prompt_tokens": case["prompt_tokens"], "total_tokens": case["total_tokens"],
                             "peak_bytes": m["workload_peak_bytes"], "peak_mb": P.mb(m["workload_peak_bytes"]),
                             "cache_bytes": m["cache_bytes"], "baseline_bytes": m["baseline_bytes"],
                             "weights_bytes": w["resident_bytes"], "method": m["method"],
                             "per_stream_bytes": per_stream, **{f"plan_{k}": v for k, v in plan.items()}})
                console.print(f"{s.name} b={b} T={case['total_tokens']}: peak {P.mb(m['workload_peak_bytes']):.1f} MB "
                              f"(cache {P.mb(m['cache_bytes']):.1f} MB) in {m['seconds']:.1f} s")
    teacher = specs[0].name
    for r in rows:
        t = next(x for x in rows if x["model"] == teacher and x["case"] == r["case"] and x["batch"] == r["batch"])
        r["peak_ratio_vs_first"] = r["peak_bytes"] / t["peak_bytes"] if t["peak_bytes"] > 0 else None

    notes = [length_note, f"peak = {'CUDA allocator peak' if device == 'cuda' else 'worker RSS peak'} minus the "
             "loaded-model baseline (weights excluded); planning uses full-size weights "
             f"({dtype}) and {card['name']}: {card['memory_gib']} GiB, {card['bandwidth_gb_s']} GB/s",
             f"cache reaches its length by {fill} fill after a real prompt prefill, then {decode_steps} real decode steps"
             + ("" if mode == "dynamic" else f" ({mode} decode: a static cache preallocated to the whole length)")]
    if (n := P.text_embedding_note(specs)):
        notes.append(n)
    result = {"gpu": card, "device": device, "dtype": dtype, "decode": mode, "batches": batches, "cases": cases,
              "models": [{"name": s.name, "layout": s.layout, "source": s.source} for s in specs],
              "rows": rows, "notes": notes, "threads": threads}
    if out is not None:
        labels = P.legend_labels(specs)
        groups = [(c["case"], b) for c in cases for b in batches]
        P.write_results(out, "vram", rows, result, lambda png: P.plot_bars(
            png, [f"{c}\nbatch {b}" for c, b in groups],
            {labels[s.name]: [next(r["peak_mb"] for r in rows if r["model"] == s.name and r["case"] == c
                           and r["batch"] == b) for c, b in groups] for s in specs},
            "length / batch", f"peak LM working memory (MB, {dtype}, weights excluded)",
            f"Synthesis-time memory ({device})", note="; ".join(notes[:2])), force=force)
    return result


def profile_bundles(bundles, text, ref, ref_text, max_tokens, card, device, seed, threads, out, console,
                    force: bool = False) -> dict:
    """End-to-end synthesis peak per bundle (the `synth` workload), and streams of it on the card."""
    from mamtra_cli.mini import mini_dir
    from mamtra_cli.models.config import ModelConfig
    from mamtra_cli.synthesis.loading import uses_mini_backend

    if ref is None or not Path(ref).is_file():
        raise UserError("--bundle needs --ref: the reference voice wav to clone (an existing file).")
    rows, specs = [], []
    for b in bundles:
        path = mini_dir(b)  # `mini` and the shipped hybrids (`mini-1-1`, …) are mini voice directories too
        cfg_path = next((c for c in (path / "lm" / "config.yaml", path / "config.yaml") if c.is_file()), None)
        if cfg_path is None:
            raise UserError(f"{b} is neither a bundle from `mamtra export` nor a mini voice directory "
                            "(no lm/config.yaml or config.yaml).")
        spec = P.ModelSpec(name=Path(b).name, config=ModelConfig.load(cfg_path), source=str(b), path=str(path),
                           seed=seed)
        kwargs = {"text": text, "ref": str(Path(ref).resolve()), "ref_text": ref_text, "seed": seed,
                  "max_new_tokens": max_tokens}
        specs.append(spec)
        n_threads = P.apply_profile_threads(threads, [spec])  # per bundle: a mini voice gets 1
        # A mini voice runs only on the CPU: it is measured there even when the other bundles use the GPU.
        bdev = "cpu" if uses_mini_backend(str(path), None) else device
        with console.status(f"{spec.name}: end-to-end synthesis on {bdev}"):
            m = P.measure_peak(spec, "synth", kwargs, device=bdev, threads=n_threads)
        free = card["memory_gib"] * 2**30 - m["weights_bytes"]
        rows.append({"model": spec.name, "layout": spec.layout, "peak_bytes": m["workload_peak_bytes"],
                     "peak_mb": P.mb(m["workload_peak_bytes"]), "weights_bytes": m["weights_bytes"],
                     "baseline_bytes": m["baseline_bytes"], "method": m["method"], "tokens": m["tokens"],
                     "audio_seconds": m["audio_seconds"], "seconds": m["seconds"],
                     "rtf": m["seconds"] / m["audio_seconds"] if m["audio_seconds"] else None, "threads": n_threads,
                     "device": bdev,
                     "plan_max_streams": int(free // m["workload_peak_bytes"]) if m["workload_peak_bytes"] > 0 else None})
    result = {"gpu": card, "device": device, "workload": "synth", "decode": "dynamic", "text": text, "rows": rows,
              "notes": ["peak = extra memory of one utterance's synthesis over the loaded backend (weights "
                        "excluded); streams = (card memory − weights) ÷ that peak"]}
    if out is not None:
        labels = P.legend_labels(specs)
        P.write_results(out, "vram_synth", rows, result, lambda png: P.plot_bars(
            png, ["end-to-end synthesis"], {labels[r["model"]]: [r["peak_mb"]] for r in rows}, "bundle",
            "peak working memory (MB, weights excluded)", f"Synthesis memory ({device})", note=result["notes"][0]),
            force=force)
    return result


def format_table(result: dict) -> str:
    """The result of `profile_vram` as the table `mamtra profile vram` prints."""
    if result.get("workload") == "synth":
        return _format_bundles(result)
    teacher, card = result["models"][0]["name"], result["gpu"]
    lines = [f"model\tcase\tbatch\tpeak MB\tcache MB\tratio vs {teacher}\tstreams on {card['name']}\tfloor ms/step"]
    for r in result["rows"]:
        ratio_s = "-" if r["peak_ratio_vs_first"] is None else f"{r['peak_ratio_vs_first']:.3f}"
        lines.append(f"{r['model']}\t{r['case']}\t{r['batch']}\t{r['peak_mb']:.1f}\t{P.mb(r['cache_bytes']):.1f}\t"
                     f"{ratio_s}\t{r['plan_max_streams']}\t{r['plan_floor_ms_per_step']:.3f}")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _format_bundles(result: dict) -> str:
    lines = [f"bundle\tpeak MB\tweights MB\ttokens\taudio s\tRTF\tstreams on {result['gpu']['name']}"]
    for r in result["rows"]:
        rtf = "-" if r["rtf"] is None else f"{r['rtf']:.3f}"
        lines.append(f"{r['model']}\t{r['peak_mb']:.1f}\t{P.mb(r['weights_bytes']):.1f}\t{r['tokens']}\t"
                     f"{r['audio_seconds']:.2f}\t{rtf}\t{r['plan_max_streams']}")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)

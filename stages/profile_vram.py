"""`mamtra profile vram`: peak memory of the speech LM's synthesis-time work (prompt prefill + decode) per
model, batch and length, and what it means on a given GPU (the paper's Fig. 3; `mamtra_cli.profiling.vram`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mamtra_cli.cli import THREADS_HELP
from mamtra_cli.models.decode_mode import DECODE_HELP


def profile_vram(
    gpu: str = typer.Option("a6000", "--gpu", help="GPU profile (profiles/gpu/*.yaml, or a YAML path) to plan for."),
    model: Optional[List[str]] = typer.Option(None, "--model", help="Model to profile (repeatable): `mini`, a shipped hybrid (`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`), MamTra or CosyVoice 2 dir, llm.pt."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Build random-weight models of this arch profile (e.g. cosyvoice2-0.5b) or YAML path."),
    ratio: str = typer.Option("1:1,1:3,1:5,1:11", "--ratio", help="With --arch: hybrids to build besides the teacher."),
    eval_list: Optional[Path] = typer.Option(None, "--eval-list", help="Seed-TTS eval list (utt|prompt_text|prompt_wav|text): profile its longest and median utterance."),
    lengths: str = typer.Option("256,1024", "--lengths", help="Total tokens per stream (prompt + generated), when no --eval-list."),
    prompt_tokens: int = typer.Option(150, "--prompt-tokens", min=1, help="Prompt (prefill) tokens with --lengths: ~30 text + ~5 s of prompt speech."),
    batch: str = typer.Option("1,16", "--batch", help="Concurrent streams, comma-separated."),
    dtype: str = typer.Option("bf16", "--dtype", help="Model and cache dtype: bf16, fp16 or fp32."),
    fill: str = typer.Option("synthetic", "--fill", help="Between prompt and the last decode steps: synthetic (random K/V, no compute) or prefill (real chunks)."),
    decode_steps: int = typer.Option(2, "--decode-steps", min=1, help="Real decode steps that end each run."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cuda or cpu."),
    decode: str = typer.Option("auto", "--decode", help=DECODE_HELP + " static/graph preallocate the cache to "
                               "the whole length, as synthesis does on that path (not with --bundle)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for vram.csv, vram.json and vram.png."),
    seed: int = typer.Option(0, "--seed", help="Seed of random weights and inputs."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP + " Used by the worker processes."),
    bundle: Optional[List[Path]] = typer.Option(None, "--bundle", help="Profile end-to-end synthesis of this bundle (`mamtra export`) or mini voice dir (`mini`, `mini-1-1`, … too) instead of the LM alone (repeatable)."),
    text: str = typer.Option("Hello, how are you doing today? This is a longer sentence for profiling.", "--text", help="With --bundle: the text to synthesise."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="With --bundle: the reference voice wav."),
    ref_text: Optional[str] = typer.Option(None, "--ref-text", help="With --bundle: the reference's transcript."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="With --bundle: cap on generated speech tokens."),
    force: bool = typer.Option(False, "--force", help="Replace this profile's existing result files in --out."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Peak memory of the LM's synthesis work per model, batch and length, and streams/ms-per-token on --gpu.

    Workload per stream: a real prefill of the prompt, the cache brought to total − --decode-steps tokens
    (--fill), then --decode-steps real decode steps; peak = the extra memory this needs over the loaded
    model (weights excluded). CUDA: torch.cuda.max_memory_allocated/reserved, reset per model. CPU: a fresh
    worker process per measurement; after imports and the model build it resets the kernel's peak-RSS mark
    and reads RSS as the baseline, and reports peak RSS − baseline.
    With --eval-list the lengths come from the text (no tokenizer): text tokens = ⌈Latin chars/4⌉ + CJK
    chars; speech tokens = 25 Hz × (Latin chars/15 + CJK chars/4) s; prompt speech from the prompt WAV's
    duration when it reads, else from prompt_text.
    Planning on --gpu: streams = ⌊(card memory − weights) ÷ (peak ÷ batch)⌋; bandwidth floor ms/step =
    (weights read per step + cache bytes) ÷ card bandwidth.

    With --bundle (a `mamtra export` bundle or a mini voice dir) the whole pipeline is profiled instead:
    front end, LM, flow and vocoder on --text with --ref, peak over the loaded backend, plus the weights.
    Other workloads plug in through mamtra_cli.profiling.measure_peak.

    Example: mamtra profile vram --gpu a6000 --arch cosyvoice2-0.5b --lengths 256,1024 --batch 1,16 --out prof
    """
    import json

    from mamtra_cli.profiling.vram import format_table, profile_vram as profile

    result = profile(gpu, model, arch, ratio=ratio, eval_list=eval_list, lengths=lengths, prompt_tokens=prompt_tokens,
                     batch=batch, dtype=dtype, fill=fill, decode_steps=decode_steps, device=device, decode=decode,
                     out=out, seed=seed,
                     threads=threads, bundle=bundle, text=text, ref=ref, ref_text=ref_text, max_tokens=max_tokens,
                     force=force)
    print(json.dumps(result) if json_out else format_table(result))

"""`mamtra synth`: text + a reference voice → a 24 kHz wav, with a bundle or an LM + CosyVoice 2 directory.

    mamtra synth "Hello there." --ref voice.wav --ref-text "What the reference says." --model BUNDLE --out out.wav
    mamtra synth "Hello there." --ref voice.wav --model LM_DIR --assets CosyVoice2-0.5B --out out.wav
    mamtra synth --list meta.lst --out-dir wavs/ --model BUNDLE          # Seed-TTS-eval: utt|prompt_text|prompt_wav|text

Without --ref-text the reference is used cross-lingually (voice only, no transcript). --stream runs flow and
HiFT in chunks while the LM is still generating, as CosyVoice 2 streams. A wav is written to a temporary
file beside the target and renamed at the end, so no partial wav is ever left behind.

Reports on stderr: RTF (wall time of prompt + synthesis ÷ audio duration; model loading excluded), seconds per
stage, speech tokens, peak memory (CUDA max allocated on GPU, process max RSS on CPU), threads; --json prints one
object on stdout (with the LM's decode path, `decode`: --decode auto is a CUDA graph on a GPU, the dynamic cache
on a CPU). Words the model was not trained to say (the mini voice knows only the words of its training
grammar) are named in one warning line on stderr and listed in --json as `unknown_words`; they are still spoken.
`--out -` writes the wav to stdout instead (nothing else goes there; the report stays on
stderr, and --json is refused with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamtra_cli.cli import THREADS_HELP
from mamtra_cli.errors import UserError
from mamtra_cli.models.decode_mode import DECODE_HELP


def _stderr_report(console, r: dict, peak: tuple[float, str], load_s: float | None = None,
                   threads: int | None = None) -> None:
    st = r["stages"]
    rtf = f"{r['rtf']:.3f}" if r["rtf"] is not None else "n/a"
    load = f" · load {load_s:.2f} s" if load_s is not None else ""
    console.print(f"{r['out']}: {r['audio_seconds']:.2f} s audio in {r['wall_seconds']:.2f} s, RTF {rtf} · "
                  f"frontend {st['frontend_s']:.3f} s · LM {st['lm_s']:.3f} s ({st['tokens']} tokens) · "
                  f"flow {st['flow_s']:.3f} s · HiFT {st['hift_s']:.3f} s{load} · "
                  f"peak memory {peak[0]:.0f} MiB ({peak[1]})"
                  + (f" · {threads} thread{'s' if threads != 1 else ''}" if threads else ""),
                  highlight=False, markup=False)


def synth(
    text: Optional[str] = typer.Argument(None, help="Text to speak (long text is split into sentences)."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference voice wav (≤ 30 s; default with the mini "
                                       "voice: its bundled sample voice, with its transcript)."),
    ref_text: Optional[str] = typer.Option(None, "--ref-text", help="Transcript of --ref (zero-shot); without it "
                                           "the reference gives only the voice (cross-lingual)."),
    model: Optional[str] = typer.Option(None, "--model", help="`mini`, a shipped hybrid (`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`), a bundle (`mamtra export`), "
                                        "or an LM (MamTra model dir / CosyVoice 2 dir) with --assets."),
    assets: Optional[Path] = typer.Option(None, "--assets", help="CosyVoice 2 model dir for flow, HiFT and front "
                                          "end when --model is not a bundle."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output wav (24 kHz with CosyVoice 2, 16 kHz with the "
                                       "mini voice); `-` writes the wav to stdout (binary, nothing else on "
                                       "stdout; the report goes to stderr; not with --json)."),
    list_file: Optional[Path] = typer.Option(None, "--list", help="Seed-TTS-eval list: utt|prompt_text|prompt_wav|text "
                                             "per line (prompt_wav relative to the list)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Output folder for --list (UTT.wav each)."),
    seed: int = typer.Option(0, "--seed", help="Seed of LM sampling and HiFT noise (sentence i uses seed + i)."),
    stream: bool = typer.Option(False, "--stream", help="Chunked flow + HiFT as the LM generates (CosyVoice 2 streaming)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Cap on speech tokens per sentence "
                                             "(default: 20 × text tokens, as CosyVoice)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] (auto: the CPU for the mini voice, "
                               "which runs only there; else cuda when a GPU is usable)."),
    lm_dtype: str = typer.Option("auto", "--lm-dtype", help="auto (stored dtype on GPU, fp32 on CPU) | bf16 | fp16 | fp32."),
    threads: int = typer.Option(0, "--threads", help=THREADS_HELP),
    decode: str = typer.Option("auto", "--decode", help=DECODE_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output wavs."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (not with --out -, "
                                  "where stdout carries the wav)."),
) -> None:
    """Speak TEXT in the voice of --ref, or every line of --list, into wavs.

    Without --model the built-in mini voice speaks (CPU, 16 kHz), in its bundled sample voice unless --ref.

    Example: mamtra synth "Hello, how are you doing today?" --out hello.wav
    Example: mamtra synth "Hello there." --ref voice.wav --ref-text "Reference words." --model my.bundle --out out.wav
    """
    import json

    from mamtra_cli.cli import check_threads, stderr_console
    from mamtra_cli.synthesis.backend import check_text
    from mamtra_cli.synthesis.loading import check_model_exists, voice_reference
    from mamtra_cli.synthesis.references import ListItem, read_seedtts_list
    from mamtra_cli.synthesis.synthesizer import load
    from mamtra_cli.synthesis.wavfile import WavWriter

    console = stderr_console()
    check_threads(threads)
    to_stdout = out is not None and str(out) == WavWriter.STDOUT
    if to_stdout and json_out:
        raise UserError("--out - writes the wav to stdout, so --json has no room there; drop --json (the report "
                        "is printed on stderr) or give --out a file name.")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {max_tokens}).")
    # -- arguments first: cheap checks before any model is loaded
    if list_file is not None:
        if text is not None or ref is not None or out is not None:
            raise UserError("--list takes texts and references from the list file; drop TEXT, --ref and --out "
                            "(use --out-dir).")
        if out_dir is None:
            raise UserError("--list needs --out-dir, the folder for the wavs.")
        items = read_seedtts_list(list_file)
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out-dir {out_dir} exists and is not a directory.")
        if not force:
            clash = [it.utt for it in items if (out_dir / f"{it.utt}.wav").exists()]
            if clash:
                raise UserError(f"{out_dir / (clash[0] + '.wav')} already exists ({len(clash)} of the list's wavs "
                                "do); pass --force to overwrite or choose another --out-dir.")
    else:
        if out_dir is not None:
            raise UserError("--out-dir is for --list; for one text use --out.")
        check_text(text)
        check_model_exists(model)  # before the reference: "pass --ref" would hide a mistyped --model
        ref, ref_text = voice_reference(model, assets, ref, ref_text)
        if out is None:
            raise UserError("Pass --out for the output wav (or --out - for stdout).")
        if not to_stdout:
            if out.exists() and not force:
                raise UserError(f"Output {out} already exists; pass --force to overwrite it or choose another --out.")
            if not out.parent.is_dir():
                raise UserError(f"The folder of --out ({out.parent}) does not exist; create it first.")
        items = [ListItem(None, ref_text, ref, text)]

    with console.status("loading models"):
        tts = load(model, assets, device=device, lm_dtype=lm_dtype, max_tokens=max_tokens, threads=threads,
                   decode=decode)

    # One warning for all the texts: the words the model was not trained to say (spoken anyway, often garbled).
    unknown = list(dict.fromkeys(w for it in items for w in tts.unknown_words(it.text)))
    if unknown:
        console.print(tts.backend.unknown_words_warning(unknown), style="yellow", markup=False, highlight=False)

    reports = []
    if list_file is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for it in items:
        target = out if it.utt is None else out_dir / f"{it.utt}.wav"
        r = tts.save(it.text, target, it.ref, it.prompt_text, seed=seed, stream=stream, force=force)
        if it.utt is not None:
            r["utt"] = it.utt
        first = len(reports) == 0
        _stderr_report(console, r, tts.peak_memory(), tts.load_seconds if first else None,
                       tts.threads if first else None)
        reports.append(r)

    peak = tts.peak_memory()
    summary = {"load_seconds": round(tts.load_seconds, 4), "threads": tts.threads, "peak_memory_mib": round(peak[0], 1),
               "memory_source": peak[1], "decode": tts.backend.decode, "backend": tts.describe()}
    if list_file is None:
        result = {**reports[0], **summary}
    else:
        audio = sum(r["audio_seconds"] for r in reports)
        wall = sum(r["wall_seconds"] for r in reports)
        stages = {k: round(sum(r["stages"][k] for r in reports), 4)
                  for k in ("frontend_s", "lm_s", "flow_s", "hift_s", "tokens", "sentences")}
        result = {"items": reports, "utterances": len(reports), "audio_seconds": round(audio, 4),
                  "wall_seconds": round(wall, 4), "rtf": round(wall / audio, 4) if audio else None,
                  "stages": stages, "unknown_words": unknown, "out_dir": str(out_dir), **summary}
        console.print(f"{len(reports)} utterances → {out_dir}: {audio:.2f} s audio, RTF "
                      f"{result['rtf'] if result['rtf'] is not None else 'n/a'}", highlight=False)
    if json_out:
        print(json.dumps(result))
    elif to_stdout:
        pass  # stdout holds the wav and nothing else
    elif list_file is None:
        print(str(out))
    else:
        print(str(out_dir))

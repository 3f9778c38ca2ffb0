"""`load` → `Synthesizer`: a loaded synthesis backend behind the calls a Python user makes — text in a reference
voice → float32 audio, a stream of audio chunks, or a wav file with its report.

    import mamtra_cli
    tts = mamtra_cli.load("mini")                                   # or a bundle, a mini voice dir, …
    audio, sample_rate = tts.synthesize("Hello there.")             # (samples,) float32, 16 kHz for the mini
    tts.save("Hello there.", "hello.wav", ref="voice.wav", ref_text="What the reference says.")

`mamtra synth` is a loop over `Synthesizer.save`, so a model name, the default voice, the device and dtype
rules and the report mean the same thing in the command and in Python.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Optional

from mamtra_cli.errors import UserError


class Synthesizer:
    """A speech LM with everything it needs to speak (`SynthesisBackend`), plus what `load` decided.

    Every call takes the text, and the voice as a reference recording `ref` (≤ 30 s) with its transcript
    `ref_text` (zero-shot; without a transcript the reference gives only the voice: cross-lingual). Without
    `ref` the model's sample voice speaks (the mini voice and mini bundles ship one; CosyVoice 2 models do
    not). Long text is split into sentences. `seed` fixes LM sampling and vocoder noise.
    """

    def __init__(self, backend, model: Optional[str] = None, assets: Optional[Path] = None, device: str = "cpu",
                 load_seconds: float | None = None, threads: int | None = None):
        self.backend = backend
        self.model, self.assets, self.device = model, assets, device
        self.load_seconds, self.threads = load_seconds, threads

    @property
    def sample_rate(self) -> int:
        """Hz of every array and wav this synthesizer makes (24000 for CosyVoice 2, 16000 for the mini voice)."""
        return int(self.backend.sample_rate)

    def describe(self) -> dict:
        """What is loaded (model, sizes, dtypes, device, source files, LM decode path), JSON-able."""
        return {**self.backend.describe(), "decode": self.backend.decode}

    def unknown_words(self, text: str) -> list[str]:
        """Words of `text` outside what the model was trained to say, which it will likely garble (the mini voice
        knows only the words of its training grammar; other models report none). Also in `save`'s report."""
        return self.backend.unknown_words(text)

    def reference(self, ref: Optional[Path] = None, ref_text: Optional[str] = None) -> tuple[Path, Optional[str]]:
        """(wav, transcript) of the voice to speak in: `ref` and `ref_text` as given, or the model's sample voice
        (with its transcript unless `ref_text` is given) when `ref` is None. Checked: exists, ≤ 30 s."""
        from mamtra_cli.synthesis.loading import voice_reference

        return voice_reference(self.model, self.assets, ref, ref_text)

    def stream(self, text: str, ref: Optional[Path] = None, ref_text: Optional[str] = None, *,
               seed: int = 0) -> Iterator:
        """Chunks of float32 mono audio at `sample_rate`, each yielded as soon as it exists (flow and vocoder
        run while the LM is still generating, as CosyVoice 2 streams); their concatenation is the utterance.
        Text and voice are checked now, not at the first chunk."""
        from mamtra_cli.synthesis.backend import check_text

        check_text(text)
        ref, ref_text = self.reference(ref, ref_text)
        self.backend.stats.reset()
        prompt = self.backend.prepare_prompt(ref, ref_text)
        return self.backend.synthesize(text, prompt, seed=seed, stream=True)

    def synthesize(self, text: str, ref: Optional[Path] = None, ref_text: Optional[str] = None, *,
                   seed: int = 0) -> tuple:
        """`text` spoken in the voice of `ref` → (audio (samples,) float32 in [-1, 1]-ish, sample rate)."""
        import numpy as np

        from mamtra_cli.synthesis.backend import check_text

        check_text(text)
        ref, ref_text = self.reference(ref, ref_text)
        self.backend.stats.reset()
        prompt = self.backend.prepare_prompt(ref, ref_text)
        chunks = [np.asarray(c, dtype=np.float32).reshape(-1) for c in self.backend.synthesize(text, prompt, seed=seed)]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return audio, self.sample_rate

    def save(self, text: str, path: Path, ref: Optional[Path] = None, ref_text: Optional[str] = None, *,
             seed: int = 0, stream: bool = False, force: bool = False) -> dict:
        """Speak `text` into the wav `path` (16-bit PCM; written beside it and renamed at the end, so no partial
        wav is ever left; an existing file is kept unless `force`; `-` is stdout). Returns the report of
        `mamtra synth --json`: samples, audio and wall seconds, RTF (wall time of prompt + synthesis ÷ audio
        duration; loading excluded), first-chunk latency, speech tokens, seconds per stage and the words the
        model does not know (`unknown_words`)."""
        from mamtra_cli.synthesis.backend import check_text
        from mamtra_cli.synthesis.wavfile import WavWriter

        check_text(text)
        ref, ref_text = self.reference(ref, ref_text)
        self.backend.stats.reset()
        t0 = time.perf_counter()
        prompt = self.backend.prepare_prompt(ref, ref_text)
        first_chunk = None
        chunks = 0
        with WavWriter(path, self.sample_rate, force=force) as wav:
            for chunk in self.backend.synthesize(text, prompt, seed=seed, stream=stream):
                if first_chunk is None:
                    first_chunk = time.perf_counter() - t0
                chunks += 1
                wav.write(chunk)
        wall = time.perf_counter() - t0
        audio_s = wav.samples / self.sample_rate
        return {
            "out": str(path), "mode": prompt.mode, "stream": stream, "seed": seed,
            "samples": wav.samples, "sample_rate": self.sample_rate, "audio_seconds": round(audio_s, 4),
            "wall_seconds": round(wall, 4), "rtf": round(wall / audio_s, 4) if audio_s > 0 else None,
            "first_chunk_seconds": round(first_chunk, 4) if first_chunk is not None else None, "chunks": chunks,
            "stages": self.backend.stats.to_dict(), "unknown_words": self.unknown_words(text),
        }

    def peak_memory(self) -> tuple[float, str]:
        """(MiB, source) of peak memory so far: CUDA max allocated on a GPU (reset by `load`), else the process's
        max RSS (which includes everything the process did before)."""
        import resource

        import torch

        device = torch.device(self.device)
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"


def load(model: Optional[str] = None, assets: Optional[Path] = None, device: str = "auto", lm_dtype: str = "auto",
         max_tokens: Optional[int] = None, threads: int = 0, decode: str = "auto") -> Synthesizer:
    """Load a model to speak with, as `mamtra synth --model MODEL --assets ASSETS` does.

    `model`: None or "mini" (the built-in voice), a shipped hybrid of it ("mini-1-1", "mini-1-3", "mini-1-5",
    "mini-1-11"), a bundle from `mamtra export`, a mini voice directory or mini
    bundle, a hybrid of the mini voice with `assets="mini"` (or its directory), an LM (MamTra model dir,
    CosyVoice 2 dir, llm.pt) with `assets` a CosyVoice 2 directory, or a CosyVoice 2 directory alone.
    `device`: auto (the CPU for the mini voice, which runs only there; else cuda when a GPU is usable), cpu,
    cuda or cuda:N. `lm_dtype`: auto (the stored dtype on a GPU, fp32 on a CPU), bf16, fp16 or fp32.
    `max_tokens` caps the speech tokens of each sentence (default 20 × its text tokens, as CosyVoice).
    `threads`: torch's CPU threads (0: 1 for models under 25 M parameters, else torch's default capped at the
    usable CPUs); this sets torch's global thread count.
    `decode`: the speech LM's decode path, auto (a CUDA graph of the static-cache step on a GPU, the dynamic
    cache on a CPU), dynamic, static or graph (CUDA only) — see `mamtra_cli.models.decode_mode`.
    """
    import torch

    from mamtra_cli.cli import apply_threads, check_threads, count_parameters
    from mamtra_cli.synthesis.backend import parse_dtype
    from mamtra_cli.synthesis.loading import check_model_exists, resolve_backend, synthesis_device

    check_threads(threads)
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {max_tokens}).")
    model = None if model is None else str(model)
    assets = None if assets is None else Path(assets)
    check_model_exists(model)
    dev = torch.device(synthesis_device(model, assets, device))
    from mamtra_cli.models.decode_mode import resolve_decode

    mode = resolve_decode(decode, dev)  # before loading: "graph" on a CPU is refused at once
    dtype = None if lm_dtype == "auto" else parse_dtype(lm_dtype, "--lm-dtype")
    if lm_dtype == "auto" and dev.type == "cpu":
        dtype = torch.float32  # half-precision matmuls are slow on CPUs
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    backend = resolve_backend(model, assets, device=str(dev), lm_dtype=dtype, max_new_tokens=max_tokens)
    load_seconds = time.perf_counter() - t0
    backend.decode = mode
    n_threads = apply_threads(threads, count_parameters(backend.lm))
    return Synthesizer(backend, model, assets, str(dev), load_seconds, n_threads)

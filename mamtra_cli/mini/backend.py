"""`MiniBackend`: the built-in offline voice behind the `SynthesisBackend` interface (16 kHz, CPU).

    char tokenizer → speech LM (the mini teacher, or any hybrid made from it by transfer/distill: they
    share its text and speech vocabularies) → 25 Hz tokens → mini codec (centroids → conv decoder →
    de-normalised with the reference's statistics → Griffin-Lim).

The prompt is built like CosyVoice 2's zero-shot prompt: the reference's speech tokens (`codec.encode`) and
its transcript's characters go in front of the LM input; the reference's per-bin spectral statistics give
the decoded audio its voice. Without a transcript (cross-lingual) only the statistics are used.
Sampling ratios are per *character* here (CosyVoice's 2×/20× are per BPE token): about 1.6 speech tokens
are spoken per character, so min 0.5× and max 4× bracket every sentence with room to spare.
`stream=True` yields one chunk per sentence (Griffin-Lim works on whole spectrograms).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mamtra_cli.errors import UserError
from mamtra_cli.mini import BUILTIN_DIR
from mamtra_cli.mini.codec import MiniCodec, SpeakerStats
from mamtra_cli.mini.text import VOCAB_FILE, CharTokenizer, unknown_words, unknown_words_warning
from mamtra_cli.models.sampling import SamplingConfig
from mamtra_cli.synthesis.backend import SynthesisBackend

MINI_SAMPLING = SamplingConfig(min_token_text_ratio=0.5, max_token_text_ratio=4.0)
MAX_REF_SECONDS = 20.0


@dataclass
class MiniPrompt:
    mode: str  # "zero-shot" | "cross-lingual"
    ref: str
    ref_seconds: float
    prompt_text_tokens: list[int]
    prompt_speech_tokens: list[int]
    stats: SpeakerStats


class MiniBackend(SynthesisBackend):
    def __init__(self, model_dir: Path | None = None, codec_dir: Path | None = None,
                 sampling: SamplingConfig | None = None, dtype: torch.dtype | None = None,
                 max_new_tokens: int | None = None):
        """`max_new_tokens` caps the speech tokens of each sentence (`mamtra synth --max-tokens`), on top of the
        per-character ratio of `sampling`."""
        super().__init__()
        if max_new_tokens is not None and max_new_tokens < 1:
            raise UserError(f"The cap on speech tokens must be at least 1 (got {max_new_tokens}).")
        self.max_new_tokens = max_new_tokens
        from mamtra_cli.models.speech_lm import load_model_dir

        self.model_dir = Path(model_dir) if model_dir is not None else BUILTIN_DIR
        self.codec_dir = Path(codec_dir) if codec_dir is not None else BUILTIN_DIR
        self.lm = load_model_dir(self.model_dir, dtype=dtype)
        self.codec = MiniCodec.load(self.codec_dir)
        # A hybrid made by transfer/distill carries no text_vocab.json: it shares the mini teacher's.
        vocab_dir = self.model_dir if (self.model_dir / VOCAB_FILE).is_file() else self.codec_dir
        self.tokenizer = CharTokenizer.load(vocab_dir)
        self.sampling = sampling or MINI_SAMPLING
        self.sample_rate = self.codec.cfg.sample_rate
        c = self.lm.config
        if c.text_vocab_size != self.tokenizer.vocab_size or c.speech_token_size != self.codec.cfg.codebook_size:
            raise UserError(f"The model in {self.model_dir} (text vocab {c.text_vocab_size}, speech vocab "
                            f"{c.speech_token_size}) does not belong to the mini codec/tokenizer (text vocab "
                            f"{self.tokenizer.vocab_size}, {self.codec.cfg.codebook_size} codes); use a model "
                            "made from the mini teacher.")

    @classmethod
    def accepts(cls, model_dir: Path, codec_dir: Path | None = None) -> bool:
        """True if `model_dir` is a model dir speaking the mini voice's vocabularies: the mini teacher
        itself or a hybrid made from it (`mamtra synth --model DIR` can then pick this backend)."""
        from mamtra_cli.checkpoints import CONFIG_FILE
        from mamtra_cli.models.config import ModelConfig

        model_dir, codec_dir = Path(model_dir), Path(codec_dir) if codec_dir is not None else BUILTIN_DIR
        if not (model_dir / CONFIG_FILE).is_file():
            return False
        try:
            c = ModelConfig.load(model_dir / CONFIG_FILE)
        except UserError:
            return False
        vocab_dir = model_dir if (model_dir / VOCAB_FILE).is_file() else codec_dir
        return cls.accepts_config(c, codec_dir, vocab_dir)

    @staticmethod
    def accepts_config(config, codec_dir: Path, vocab_dir: Path | None = None) -> bool:
        """True if an LM of `config` speaks the vocabularies of the mini voice in `codec_dir` (its character
        tokenizer from `vocab_dir`, default `codec_dir`, and its codebook)."""
        from mamtra_cli.mini.codec import CODEC_CONFIG, CodecConfig

        codec_dir = Path(codec_dir)
        vocab_dir = Path(vocab_dir) if vocab_dir is not None else codec_dir
        if not (codec_dir / CODEC_CONFIG).is_file() or not (vocab_dir / VOCAB_FILE).is_file():
            return False
        return (config.text_vocab_size == CharTokenizer.load(vocab_dir).vocab_size
                and config.speech_token_size == CodecConfig.load(codec_dir / CODEC_CONFIG).codebook_size)

    # -- prompt -------------------------------------------------------------------------------------
    def prepare_prompt(self, ref_wav: Path, ref_text: str | None) -> MiniPrompt:
        from mamtra_cli.frontend.audio import load_audio

        t0 = time.perf_counter()
        sr = self.sample_rate
        wav = load_audio(Path(ref_wav), sr)
        seconds = wav.size / sr
        if seconds < 0.2:
            raise UserError(f"Reference audio {ref_wav} is only {seconds * 1000:.0f} ms long; give a reference "
                            "of a few seconds of speech.")
        if seconds > MAX_REF_SECONDS:
            raise UserError(f"Reference audio {ref_wav} is {seconds:.1f} s long; the mini voice takes at most "
                            f"{MAX_REF_SECONDS:g} s — cut a shorter reference.")
        mel, _, stats = self.codec.features(wav, sr)
        zero_shot = ref_text is not None and ref_text.strip() != ""
        prompt = MiniPrompt("zero-shot" if zero_shot else "cross-lingual", str(ref_wav), seconds,
                            self.tokenizer.encode(ref_text) if zero_shot else [],
                            self.codec.tokens_from_features(mel) if zero_shot else [], stats)
        self.stats.frontend_s += time.perf_counter() - t0
        return prompt

    # -- synthesis ----------------------------------------------------------------------------------
    # Character counts: training sentences are 20-75 characters, joined pairs up to ~150.
    split_limits = {"max_tokens": 100, "min_tokens": 40, "merge_tail": 12}

    def normalize_text(self, text: str) -> str:
        return self.tokenizer.normalize(text)

    def count_text_tokens(self, normalized: str) -> int:
        return self.tokenizer.count_tokens(normalized)

    def unknown_words(self, text: str) -> list[str]:
        """Words of `text` (numbers spelled out) that the training grammar never produces: the voice only
        knows that grammar's words (`mamtra_cli.mini.text.vocabulary`) and usually garbles others."""
        return unknown_words(text, self.tokenizer)

    def unknown_words_warning(self, unknown: list[str]) -> str:
        return unknown_words_warning(unknown)

    def synthesize(self, text: str, prompt: MiniPrompt, seed: int = 0, stream: bool = False
                   ) -> Iterator[np.ndarray]:
        t0 = time.perf_counter()
        encoded = [self.tokenizer.encode(p) for p in self.sentences(text)]
        self.stats.frontend_s += time.perf_counter() - t0
        for i, text_tokens in enumerate(encoded):
            self.stats.sentences += 1
            yield self._utterance(text_tokens, prompt, seed + i)

    def _utterance(self, text_tokens: list[int], prompt: MiniPrompt, seed: int) -> np.ndarray:
        t0 = time.perf_counter()
        tokens = self.lm.generate(text_tokens, prompt.prompt_text_tokens, prompt.prompt_speech_tokens,
                                  sampling=self.sampling, seed=seed, max_new_tokens=self.max_new_tokens,
                                  decode=self.decode)
        t1 = time.perf_counter()
        self.stats.lm_s += t1 - t0
        self.stats.tokens += len(tokens)
        self.stats.tokens_per_sentence.append(len(tokens))
        if not tokens:
            return np.zeros(0, dtype=np.float32)
        mag = self.codec.decode_spectrogram(tokens, prompt.stats)
        t2 = time.perf_counter()
        self.stats.flow_s += t2 - t1  # the codec decoder plays the flow's part
        wav = self.codec.vocode(mag, seed)
        self.stats.hift_s += time.perf_counter() - t2  # Griffin-Lim plays HiFT's part
        return wav

    def describe(self) -> dict:
        c = self.lm.config
        return {
            "backend": "mini",
            "model_dir": str(self.model_dir),
            "codec_dir": str(self.codec_dir),
            "device": "cpu",
            "sample_rate": self.sample_rate,
            "lm": {"layer_types": "".join("A" if t == "attention" else "M" for t in c.layer_types),
                   "hidden_size": c.hidden_size, "speech_token_size": c.speech_token_size,
                   "text_vocab_size": c.text_vocab_size,
                   "dtype": str(next(self.lm.parameters()).dtype).replace("torch.", ""),
                   "parameters": sum(p.numel() for p in self.lm.parameters())},
            "codec": {"codebook_size": self.codec.cfg.codebook_size, "token_rate_hz": self.codec.cfg.token_rate,
                      "griffin_lim_iters": self.codec.cfg.griffin_lim_iters,
                      "quantizer": self.codec.cfg.quantizer,
                      "decoder_parameters": sum(p.numel() for p in (self.codec.tokenizer or self.codec.decoder)
                                                .parameters())},
            "sampling": asdict(self.sampling),
            "max_new_tokens": self.max_new_tokens,
        }

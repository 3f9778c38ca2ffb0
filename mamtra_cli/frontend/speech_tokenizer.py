"""CosyVoice 2's ONNX front-end models, run with onnxruntime on the CPU.

- `SpeechTokenizer(speech_tokenizer_v2.onnx)`: 16 kHz audio → Whisper 128-bin log-mel [1, 128, T]
  (100 frames/s) plus its length [1] int32 → discrete speech tokens at 25 Hz. As in CosyVoice, audio
  longer than 30 s is refused (`tokenize` warns and returns None).
- `SpeakerEmbedder(campplus.onnx)`: 16 kHz audio → mean-normalised Kaldi fbank [1, T, 80] → speaker
  embedding (192-d for the real campplus).

Input names are read from the ONNX session (CosyVoice does the same: the first input of the speech
tokenizer is the mel, the second its length; campplus has one input), so models exported with other
names work. Sessions use the CPU provider with 1 intra-op thread by default, as CosyVoice does.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from mamtra_cli.errors import UserError
from mamtra_cli.frontend.audio import INSTALL_HINT, kaldi_fbank, whisper_log_mel

SAMPLE_RATE = 16000
MAX_SECONDS = 30.0
MEL_FRAMES_PER_SECOND = 100


def _session(path: str | Path, threads: int, what: str):
    path = Path(path)
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"Running the {what} needs the onnxruntime package; install it with "
                        f"`{INSTALL_HINT}`.") from None
    if not path.is_file():
        raise UserError(f"{what[0].upper() + what[1:]} model {path} does not exist; pass the ONNX file from the "
                        "CosyVoice 2 model directory.")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Cannot load the {what} model {path} ({msg}); is it a valid ONNX file?") from None


def _is_dynamic(dim) -> bool:
    return not isinstance(dim, int) or dim < 1


class SpeechTokenizer:
    """S3Tokenizer v2 (speech_tokenizer_v2.onnx) on onnxruntime."""

    def __init__(self, onnx_path: str | Path, threads: int = 1, max_seconds: float = MAX_SECONDS):
        self.path = Path(onnx_path)
        self.session = _session(self.path, threads, "speech tokenizer")
        self.max_seconds = float(max_seconds)
        inputs = self.session.get_inputs()
        if len(inputs) < 2:
            raise UserError(f"Speech tokenizer model {self.path} has {len(inputs)} input(s); expected the mel "
                            "features and their length (feats, feats_length).")
        # Prefer names, fall back to CosyVoice's positional convention.
        by_rank = {len(i.shape): i for i in inputs}
        self._feats = by_rank.get(3, inputs[0])
        self._lens = by_rank.get(1, inputs[1])
        self._lens_dtype = np.int64 if "int64" in self._lens.type else np.int32
        self.n_mels = self._feats.shape[1] if isinstance(self._feats.shape[1], int) else 128
        self.batchable = _is_dynamic(self._feats.shape[0])
        outputs = self.session.get_outputs()
        self._out = outputs[0].name
        self._out_lens = next((o.name for o in outputs[1:]
                               if len(o.shape) == 1 and "int" in o.type and "len" in o.name.lower()), None)
        self._stride: int | None = None

    # -- one utterance --------------------------------------------------------------------------------
    def check(self, wav16k: np.ndarray) -> str | None:
        """None if the audio can be tokenized, else the reason it cannot."""
        n = int(np.asarray(wav16k).shape[-1])
        if n / SAMPLE_RATE > self.max_seconds:
            return f"longer than {self.max_seconds:g} s ({n / SAMPLE_RATE:.1f} s)"
        if n <= 200:
            return f"too short ({n} samples)"
        return None

    def tokenize_or_reason(self, wav16k: np.ndarray) -> tuple[list[int] | None, str | None]:
        reason = self.check(wav16k)
        if reason is not None:
            return None, reason
        mel = whisper_log_mel(wav16k, n_mels=self.n_mels).numpy()[None]
        return self._run(mel, np.array([mel.shape[2]]))[0], None

    def tokenize(self, wav16k: np.ndarray) -> list[int] | None:
        """Speech tokens (25 Hz) of 16 kHz mono audio; None, with a warning, when it cannot be tokenized
        (over 30 s, as CosyVoice refuses, or shorter than the STFT needs)."""
        tokens, reason = self.tokenize_or_reason(wav16k)
        if tokens is None:
            warnings.warn(f"speech tokenizer: utterance refused: {reason}", stacklevel=2)
        return tokens

    # -- several --------------------------------------------------------------------------------------
    def tokenize_batch(self, wavs: list[np.ndarray], batch_size: int = 8
                       ) -> list[tuple[list[int] | None, str | None]]:
        """(tokens, None) or (None, reason) per input. When the model's batch dimension is dynamic the
        mels are zero-padded to the longest in a group of `batch_size` and run together with their
        lengths; otherwise one at a time."""
        results: list[tuple[list[int] | None, str | None]] = [(None, None)] * len(wavs)
        ok = []
        for i, w in enumerate(wavs):
            reason = self.check(w)
            if reason is None:
                ok.append(i)
            else:
                results[i] = (None, reason)
        if not self.batchable or batch_size <= 1:
            for i in ok:
                results[i] = self.tokenize_or_reason(wavs[i])
            return results
        mels = {i: whisper_log_mel(wavs[i], n_mels=self.n_mels).numpy() for i in ok}
        order = sorted(ok, key=lambda i: mels[i].shape[1])  # similar lengths together: less padding
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            t_max = max(mels[i].shape[1] for i in group)
            batch = np.zeros((len(group), self.n_mels, t_max), dtype=np.float32)
            for row, i in enumerate(group):
                batch[row, :, :mels[i].shape[1]] = mels[i]
            lens = np.array([mels[i].shape[1] for i in group])
            for i, toks in zip(group, self._run(batch, lens)):
                results[i] = (toks, None)
        return results

    # -- internals ------------------------------------------------------------------------------------
    def _run(self, mel: np.ndarray, lens: np.ndarray) -> list[list[int]]:
        feed = {self._feats.name: mel.astype(np.float32, copy=False),
                self._lens.name: lens.astype(self._lens_dtype)}
        names = [self._out] + ([self._out_lens] if self._out_lens else [])
        outs = self.session.run(names, feed)
        codes = np.asarray(outs[0])
        if mel.shape[0] == 1:
            return [codes.reshape(-1).astype(np.int64).tolist()]
        codes = codes.reshape(mel.shape[0], -1)
        if self._out_lens:
            valid = np.asarray(outs[1]).reshape(-1).tolist()
        else:
            stride = self._frame_stride()
            valid = [math.ceil(int(n) / stride) for n in lens]
        return [codes[r, :int(valid[r])].astype(np.int64).tolist() for r in range(codes.shape[0])]

    def _frame_stride(self) -> int:
        """Mel frames per token (4 for the real model: 100 Hz → 25 Hz), measured once on silence-like
        input so that padded batch outputs can be cut to each utterance's length."""
        if self._stride is None:
            probe = 400
            mel = np.full((1, self.n_mels, probe), -0.5, dtype=np.float32)
            n = len(self._run(mel, np.array([probe]))[0])
            self._stride = max(1, round(probe / max(n, 1)))
        return self._stride


class SpeakerEmbedder:
    """campplus.onnx on onnxruntime: mean-normalised Kaldi fbank [1, T, 80] → embedding."""

    def __init__(self, onnx_path: str | Path, threads: int = 1):
        self.path = Path(onnx_path)
        self.session = _session(self.path, threads, "speaker embedding (campplus)")
        self._in = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self.num_mel_bins = shape[2] if len(shape) == 3 and isinstance(shape[2], int) else 80

    def embed(self, wav16k: np.ndarray) -> np.ndarray:
        feats = kaldi_fbank(wav16k, num_mel_bins=self.num_mel_bins, mean_norm=True)
        if feats.shape[0] == 0:
            raise ValueError("audio too short for a fbank frame (needs 25 ms)")
        out = self.session.run(None, {self._in: feats[None]})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

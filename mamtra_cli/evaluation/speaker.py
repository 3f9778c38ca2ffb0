"""Speaker similarity (SIM): the cosine of speaker embeddings of the prompt and of the synthesised speech.

Seed-TTS-eval uses a WavLM-large speaker-verification model; no such model can be fetched offline here, so the
report always names the embedder it used. Two kinds:

- `GE2EEmbedder` (`--sim ge2e`, the offline default): the GE2E d-vector speaker encoder whose trained weights
  the PyPI package Resemblyzer ships inside its wheel (`resemblyzer/pretrained.pt`, Apache-2.0; trained on
  LibriSpeech, VoxCeleb 1 and 2). Our own implementation of its inference, so none of Resemblyzer's code or
  its compiled VAD is imported:
    16 kHz audio → volume raised to −30 dBFS (never lowered) → long silences trimmed → 40-bin mel power
    spectrogram (25 ms Hann window, 10 ms hop, Slaney mel, no log) → partial windows of 160 frames
    (1.6 s) every ~0.77 s (1.3 a second; a last window that is at least 75 % audio is zero-padded) →
    3-layer LSTM (256) → last hidden state → linear 256 → ReLU → L2 norm → mean over windows → L2 norm.
  The silence trimming differs from Resemblyzer's on purpose: WebRTC's VAD decides speech per 30 ms window
  there, an energy threshold (45 dB under the loudest window) decides it here, followed by the same
  smoothing (moving average of 8 windows) and dilation (6 windows).
- `OnnxEmbedder` (`--sim PATH.onnx`, or the `campplus.onnx` of a CosyVoice 2 directory): CosyVoice's campplus
  or any speaker model with the same input (mean-normalised 80-bin Kaldi fbank [1, T, 80]).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from mamtra_cli.errors import UserError
from mamtra_cli.evaluation.wer import EVAL_EXTRA_HINT

SAMPLE_RATE = 16000
GE2E_N_MELS = 40
GE2E_N_FFT = 400  # 25 ms
GE2E_HOP = 160  # 10 ms
GE2E_PARTIAL_FRAMES = 160  # 1.6 s a window
GE2E_PARTIALS_PER_SECOND = 1.3
GE2E_MIN_COVERAGE = 0.75
TARGET_DBFS = -30.0
VAD_WINDOW = 480  # 30 ms
VAD_SMOOTHING = 8  # windows in the moving average
VAD_MAX_SILENCE = 6  # windows of silence kept around speech
VAD_FLOOR_DB = 45.0  # a window this far under the loudest one is silence


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 0.0


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Raise (never lower) the RMS level of `wav` to `target_dbfs` (full scale = 1.0)."""
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0
    if rms <= 0:
        return wav
    change_db = target_dbfs - 20 * np.log10(rms)
    return wav if change_db < 0 else (wav * 10 ** (change_db / 20)).astype(np.float32)


def trim_long_silences(wav: np.ndarray) -> np.ndarray:
    """Drop silences longer than VAD_MAX_SILENCE windows (energy detector, see the module docstring)."""
    n = len(wav) // VAD_WINDOW
    if n == 0:
        return wav
    frames = wav[: n * VAD_WINDOW].reshape(n, VAD_WINDOW).astype(np.float64)
    db = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
    voiced = (db > db.max() - VAD_FLOOR_DB).astype(np.float64)
    # moving average over VAD_SMOOTHING windows, centred as (w-1)//2 before and w//2 after
    w = VAD_SMOOTHING
    padded = np.concatenate([np.zeros((w - 1) // 2), voiced, np.zeros(w // 2)])
    smooth = np.convolve(padded, np.ones(w) / w, mode="valid")
    mask = np.round(smooth).astype(bool)
    # binary dilation with a centred run of VAD_MAX_SILENCE + 1 windows (odd: 3 windows either side)
    kept = np.convolve(mask.astype(np.float64), np.ones(VAD_MAX_SILENCE + 1), mode="same") > 0.5
    return wav[: n * VAD_WINDOW][np.repeat(kept, VAD_WINDOW)]


def ge2e_mel(wav: np.ndarray):
    """(frames, 40) mel power spectrogram, as librosa.feature.melspectrogram(sr=16000, n_fft=400, hop=160,
    n_mels=40) computes it: centred frames with zero padding, periodic Hann window, |STFT|², Slaney mel."""
    import torch

    from mamtra_cli.frontend.audio import slaney_mel_filters

    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    spec = torch.stft(x, GE2E_N_FFT, GE2E_HOP, window=torch.hann_window(GE2E_N_FFT), center=True,
                      pad_mode="constant", return_complex=True)  # (201, frames)
    power = spec.abs() ** 2
    fb = torch.from_numpy(slaney_mel_filters(SAMPLE_RATE, GE2E_N_FFT, GE2E_N_MELS).astype(np.float32))
    return (fb @ power).T.contiguous()  # (frames, 40)


def partial_slices(n_samples: int) -> list[tuple[int, int]]:
    """[start, stop) mel-frame ranges of the partial windows for an utterance of `n_samples` samples."""
    n_frames = int(np.ceil((n_samples + 1) / GE2E_HOP))
    step = int(np.round(SAMPLE_RATE / GE2E_PARTIALS_PER_SECOND / GE2E_HOP))
    steps = max(1, n_frames - GE2E_PARTIAL_FRAMES + step + 1)
    slices = [(i, i + GE2E_PARTIAL_FRAMES) for i in range(0, steps, step)]
    start, stop = slices[-1][0] * GE2E_HOP, slices[-1][1] * GE2E_HOP
    if (n_samples - start) / (stop - start) < GE2E_MIN_COVERAGE and len(slices) > 1:
        slices = slices[:-1]
    return slices


@lru_cache(maxsize=1)
def _resemblyzer_weights() -> Path:
    spec = importlib.util.find_spec("resemblyzer")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"The GE2E speaker encoder's weights come in the Resemblyzer package; install it with "
                        f"`{EVAL_EXTRA_HINT}`, pass --sim PATH.onnx with a speaker model, or --sim none.")
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall Resemblyzer (`{EVAL_EXTRA_HINT}`).")
    return path


class GE2EEmbedder:
    """GE2E d-vectors (Resemblyzer's trained weights, our inference); `embed(wav16k)` → (256,) unit vector."""

    label = "GE2E d-vector (Resemblyzer weights)"

    def __init__(self, weights: Path | None = None):
        import torch

        from mamtra_cli.checkpoints import load_foreign_checkpoint

        self.weights = Path(weights) if weights is not None else _resemblyzer_weights()
        ckpt = load_foreign_checkpoint(self.weights, f"reinstall Resemblyzer (`{EVAL_EXTRA_HINT}`)")
        state = ckpt["model_state"] if isinstance(ckpt, dict) and "model_state" in ckpt else ckpt
        self.lstm = torch.nn.LSTM(GE2E_N_MELS, 256, num_layers=3, batch_first=True)
        self.linear = torch.nn.Linear(256, 256)
        self.lstm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lstm.")})
        self.linear.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("linear.")})
        self.lstm.eval()

    def describe(self) -> dict:
        return {"name": self.label, "weights": str(self.weights), "dim": 256}

    def embed_preprocessed(self, wav: np.ndarray) -> np.ndarray:
        """Embedding of audio that is already level-normalised and trimmed (Resemblyzer's `embed_utterance`)."""
        import torch

        slices = partial_slices(len(wav))
        need = slices[-1][1] * GE2E_HOP
        if need >= len(wav):
            wav = np.pad(wav, (0, need - len(wav)))
        mel = ge2e_mel(wav)
        mels = torch.stack([mel[a:b] for a, b in slices])  # (partials, 160, 40)
        with torch.no_grad():
            _, (hidden, _) = self.lstm(mels)
            e = torch.relu(self.linear(hidden[-1]))  # (partials, 256)
            e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
        raw = e.mean(0).numpy()
        return raw / max(float(np.linalg.norm(raw)), 1e-12)

    def embed(self, wav16k: np.ndarray) -> np.ndarray:
        wav = trim_long_silences(normalize_volume(np.asarray(wav16k, dtype=np.float32)))
        return self.embed_preprocessed(wav)


class OnnxEmbedder:
    """campplus.onnx (or a speaker model with the same fbank input); `embed(wav16k)` → embedding."""

    def __init__(self, onnx_path: Path, threads: int = 1):
        from mamtra_cli.frontend.speech_tokenizer import SpeakerEmbedder

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise UserError(f"Speaker model {self.path} does not exist; pass an ONNX speaker model (e.g. a CosyVoice "
                            "2 directory's campplus.onnx), --sim ge2e or --sim none.")
        self.model = SpeakerEmbedder(self.path, threads=threads)
        self.label = f"{self.path.stem} (ONNX, Kaldi fbank 80)"

    def describe(self) -> dict:
        return {"name": self.label, "path": str(self.path)}

    def embed(self, wav16k: np.ndarray) -> np.ndarray:
        return self.model.embed(np.asarray(wav16k, dtype=np.float32))


def load_speaker_model(spec: str, threads: int = 1, candidates: list[Path] = ()):
    """The embedder named by --sim: `ge2e`, `none` (no SIM), a `.onnx` file, or a CosyVoice 2 directory (its
    campplus.onnx). `auto`: the campplus.onnx of the first of `candidates` (the --assets and model directories
    of the evaluation) that has one — CosyVoice's own speaker model — else GE2E when Resemblyzer is installed,
    else no SIM."""
    if spec == "none":
        return None
    if spec == "auto":
        for c in candidates:
            if (Path(c) / "campplus.onnx").is_file():
                return OnnxEmbedder(Path(c) / "campplus.onnx", threads=threads)
        return GE2EEmbedder() if importlib.util.find_spec("resemblyzer") is not None else None
    if spec == "ge2e":
        return GE2EEmbedder()
    path = Path(spec)
    if path.is_dir():
        path = path / "campplus.onnx"
    if path.suffix != ".onnx":
        raise UserError(f"--sim {spec!r} is neither ge2e, none, an .onnx speaker model nor a CosyVoice 2 directory.")
    return OnnxEmbedder(path, threads=threads)

"""Wav files written so that no half-written file is ever left under its final name."""

from __future__ import annotations

import os
from pathlib import Path


class WavWriter:
    """Mono wav written chunk by chunk into a hidden temporary file beside `path`, renamed into place on
    success and deleted on failure (a context manager)."""

    def __init__(self, path: Path, sample_rate: int):
        self.path, self.sample_rate = Path(path), int(sample_rate)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}.wav")
        self.samples = 0

    def __enter__(self) -> "WavWriter":
        import soundfile as sf

        self._f = sf.SoundFile(str(self.tmp), mode="w", samplerate=self.sample_rate, channels=1,
                               format="WAV", subtype="PCM_16")
        return self

    def write(self, chunk) -> None:
        import numpy as np

        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if chunk.size:
            self._f.write(np.clip(chunk, -1.0, 1.0))
            self._f.flush()
            self.samples += chunk.size

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)

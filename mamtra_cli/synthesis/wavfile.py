"""Wav files written so that no half-written file is ever left under its final name, and no existing file is
replaced unless asked (`force`)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from mamtra_cli.checkpoints import temp_sibling_file
from mamtra_cli.errors import UserError


class WavWriter:
    """Mono wav written chunk by chunk into a hidden temporary file beside `path`, moved into place on
    success and deleted on failure (a context manager).

    Without `force` the move is exclusive (`checkpoints.publish_file`): a `path` that appeared while the audio was
    being made (another `mamtra synth` with the same --out) is kept, and this run fails with a UserError.
    With `force` an existing file is replaced atomically (os.replace).

    The path `-` (STDOUT) means standard output: the wav is built in memory (its header needs the final length,
    and a pipe cannot seek back to it) and written to the binary stdout in one piece on success only, so a
    failed run puts no bytes at all on stdout."""

    STDOUT = "-"

    def __init__(self, path: Path, sample_rate: int, force: bool = False):
        self.to_stdout = str(path) == self.STDOUT
        self.path, self.sample_rate, self.force = Path(path), int(sample_rate), bool(force)
        # pid + random: two writers of one path, even in one process, never share a temporary file.
        self.tmp = None if self.to_stdout else temp_sibling_file(self.path)
        self.samples = 0

    def __enter__(self) -> "WavWriter":
        import soundfile as sf

        if self.to_stdout:
            self._buffer = io.BytesIO()
            self._f = sf.SoundFile(self._buffer, mode="w", samplerate=self.sample_rate, channels=1,
                                   format="WAV", subtype="PCM_16")
            return self
        if self.path.is_dir():
            raise UserError(f"Output {self.path} is a directory; give a file name for the wav (e.g. "
                            f"{self.path / 'out.wav'}).")
        if self.path.exists() and not self.force:
            raise UserError(f"Output {self.path} already exists; pass --force to overwrite it or choose another "
                            "output path.")
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
        from mamtra_cli.checkpoints import publish_file

        self._f.close()
        if self.to_stdout:
            if exc_type is None:
                out = sys.stdout.buffer
                out.write(self._buffer.getvalue())
                out.flush()
            return
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        publish_file(self.tmp, self.path, self.force)

"""The built-in offline "mini" voice: a synthetic espeak-ng corpus, a small 25 Hz codec fitted to it and a
12-layer all-attention teacher with CosyVoice 2 semantics, so the whole pipeline runs on a CPU out of the box.

Modules: `corpus` (sentences + espeak-ng rendering), `codec` (mel k-means tokens, decoder, Griffin-Lim),
`text` (character tokenizer), `train` (teacher training loop), `backend` (`MiniBackend` for `mamtra synth`),
`build` (the whole rebuild, `mamtra build-mini`).
Its intelligibility is measured by `mamtra eval --list mini-heldout` (`mamtra_cli.evaluation`).
"""

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin" / "mini"

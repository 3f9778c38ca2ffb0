"""The built-in offline "mini" voice: a synthetic espeak-ng corpus, a small 25 Hz codec fitted to it and a
12-layer all-attention teacher with CosyVoice 2 semantics, so the whole pipeline runs on a CPU out of the box.

Modules: `corpus` (sentences + espeak-ng rendering), `codec` (FSQ or mel k-means tokens, decoder,
Griffin-Lim), `fsq` (the learned FSQ tokenizer), `text` (character tokenizer), `numbers` (numbers to words),
`train` (teacher training loop), `warm_start` (a teacher started from one on another codec), `backend`
(`MiniBackend` for `mamtra synth`), `build` (the whole rebuild, `mamtra build-mini`).
Its intelligibility is measured by `mamtra eval --list mini-heldout` (`mamtra_cli.evaluation`).
"""

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin" / "mini"


def mini_dir(spec) -> Path:
    """A command's model/assets value → a directory: `mini` names the built-in voice, anything else is a path."""
    return BUILTIN_DIR if str(spec) == "mini" else Path(spec)

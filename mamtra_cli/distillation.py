"""Knowledge distillation of a hybrid student from its Transformer teacher: the training machinery, and
`distill`, the whole run of `mamtra distill` (checks, resume, OUT.partial/, the final model directory).

One readable loop in the torchtune KD-recipe shape: `Distiller.setup()` builds everything,
`Distiller.train()` runs the optimizer steps, `Distiller.save_checkpoint()` writes a resumable checkpoint.

Loss, per optimizer step, over the speech-target positions only (speech tokens and eos; sos, text and
padding are masked out — MambaInLlama's unmasked `batchmean` KL averages over padding and prompt, we don't):

    loss = (kl_weight · T² · Σ KL(p_teacher^T ‖ p_student^T) + ce_weight · Σ CE(student, ground truth)) / N

with N the number of target tokens of the whole *global* batch (all micro-batches of the step, all ranks),
the same normalisation as CosyVoice's own loss (summed CE ÷ target count). Teacher logits are computed on
the fly by a frozen teacher in eval mode under `no_grad`.

Batching: utterances cost 2+T+S tokens (sos, text, task_id, speech); `token_batches` forms batches of at most
`batch_tokens` such tokens with length bucketing, from a generator seeded by (seed, epoch). Under DDP every
rank builds the same global batches and takes the slice `batch[rank::world]`; the loss is divided by the
global target count (known to every rank, because every rank holds the global batch) and multiplied by the
world size, so DDP's gradient *average* equals the single-process gradient of the same global batch.

Data: --data may be repeated (real + pseudo-labelled manifests); their utterances are concatenated into one
list (N = N_1 + N_2 + …) that the batching above shuffles as one, after checking that every manifest (and
--val) names the same tokenizers. Each manifest's path and sha256 go into OUT/manifest.json.

The recipe (why each piece: a 120-step run on 400 utterances over-fits, so its *last* weights are worse
than earlier ones, and Mamba layers initialised from attention first need to catch up with the frozen rest):
  * Stages (--stages mamba:S1,all:S2): the run is a list of (TRAIN, STEPS[, LR]) stages. Each stage
    selects its own trainable set (`select_trainable`) and gets a fresh AdamW over that set and its own
    warm-up + schedule over its own STEPS (lr_at(step - stage_start, …, STEPS)); the optimizer-step counter
    and the data stream (epoch, position) run on across stages. Without --stages the run is one stage.
  * Validation CE (as `mamtra score`, rank 0) at step 0, every --eval-every global steps and at the end of
    every stage. An evaluation *improves* when its CE is below the best so far by more than --min-delta.
  * --select best keeps the weights of every improving evaluation in DIR.partial/best/step-NNNNNN/ and ships
    the best one (step 0, the untrained student, included: then a warning says so); --select last ships the
    last step's. OUT/manifest.json and the summary record selected = {rule, step, val_ce}.
  * --patience N: N evaluations in a row without an improvement end the current *stage* (the next stage
    starts with a fresh count; improvements are always measured against the best of the whole run). The
    schedule's length is not changed by it: stopping just ends the stage's loop early.

Run state on disk (`DIR` is the --out directory):
    DIR.partial/                         in-progress run (only rank 0 writes)
        run.json                         the hyper-parameters a resume must match
        metrics.jsonl                    one JSON object a line: train steps ({"kind": "train", "step",
                                         "stage", "lr", "loss", "kl", "ce", …}) and validation evals
                                         ({"kind": "val", "step", "stage", "val_ce", "val_accuracy",
                                         "improved", "best_step", "bad_evals"})
        checkpoints/step-NNNNNN/         config.yaml, model.safetensors, manifest.json (a model directory;
                                         its outputs name the step, stage and best step it knew),
                                         trainer_state.pt (optimizer of the current stage, stage index and
                                         start, stage log, best {step, stage, val_ce, val_accuracy}, evals
                                         without improvement, RNG, data position; plain tensors/lists/dicts,
                                         loadable with weights_only=True),
                                         COMPLETE (written last; a checkpoint without it is ignored)
        best/step-NNNNNN/                --select best: the weights of the best evaluation (a model dir,
                                         written to a temp dir and renamed). Kept: the current best and the
                                         best each kept checkpoint names, so a resume from any of them finds
                                         the best *it* knew (a killed run may have found a later one).
    DIR/                                 the finished run (written via `staged_output`, then DIR.partial is
                                         removed): config.yaml, model.safetensors (the selected weights),
                                         manifest.json, metrics.jsonl, loss.png, checkpoints/ (hard links
                                         into the partial)
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mamtra_cli.data_manifest import Utterance
from mamtra_cli.errors import UserError
from mamtra_cli.models.speech_lm import IGNORE_ID, SpeechLM
from mamtra_cli.scoring import pad_batch

SCHEDULES = ("cosine", "constant", "linear")
TRAINER_STATE_FILE = "trainer_state.pt"
COMPLETE_MARKER = "COMPLETE"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
PLOT_FILE = "loss.png"
BEST_DIR = "best"  # OUT.partial/best/step-NNNNNN/: the weights of the best evaluation (with --select best)
SELECT_RULES = ("best", "last")


# ----------------------------------------------------------------------------------------------- loss
def speech_logits(lm: SpeechLM, text, text_lens, speech, speech_lens) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the speech-target positions only → (logits (N, C), targets (N,)).

    text (B, T_max), speech (B, S_max) right-padded, *_lens (B,). The decoder is applied to the N target
    positions alone, so the (B, L, C) logits of text and padding positions are never materialised
    (C is 6564 for CosyVoice 2)."""
    embeds, _, targets = lm.unistream_inputs(text, text_lens, speech, speech_lens)
    hidden = lm.backbone(embeds)  # (B, L, H)
    valid = targets != IGNORE_ID  # (B, L)
    return lm.llm_decoder(hidden[valid]), targets[valid]


class SpeechTargetLogits(nn.Module):
    """`speech_logits` as a module, so that DDP can wrap the student's whole forward."""

    def __init__(self, lm: SpeechLM):
        super().__init__()
        self.lm = lm

    def forward(self, text, text_lens, speech, speech_lens):
        return speech_logits(self.lm, text, text_lens, speech, speech_lens)


def kd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed forward KL(teacher ‖ student) at temperature T (without the T² factor) and summed CE to the
    ground truth, over the positions whose target is not IGNORE_ID.

    student_logits, teacher_logits: (..., C); targets: (...) with IGNORE_ID where there is no target.
    Returns (kl_sum, ce_sum), float32 scalars."""
    valid = targets != IGNORE_ID
    s = student_logits[valid].float()  # (N, C)
    t = teacher_logits[valid].float()
    t_logp = (t / temperature).log_softmax(-1)
    s_logp = (s / temperature).log_softmax(-1)
    kl_sum = (t_logp.exp() * (t_logp - s_logp)).sum()
    ce_sum = F.cross_entropy(s, targets[valid], reduction="sum")
    return kl_sum, ce_sum


def kd_loss(kl_sum: torch.Tensor, ce_sum: torch.Tensor, num_tokens: int, kl_weight: float, ce_weight: float,
            temperature: float) -> torch.Tensor:
    """The distillation loss of one step: (kl_weight·T²·kl_sum + ce_weight·ce_sum) / num_tokens."""
    return (kl_weight * temperature ** 2 * kl_sum + ce_weight * ce_sum) / max(num_tokens, 1)


# ----------------------------------------------------------------------------------------------- data
def utterance_tokens(u: Utterance) -> int:
    """Input tokens of one utterance in the unistream layout: sos + text + task_id + speech."""
    return 2 + len(u.text_tokens) + len(u.speech_tokens)


def target_tokens(u: Utterance) -> int:
    """Targets of one utterance: its speech tokens and eos."""
    return len(u.speech_tokens) + 1


def token_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int,
                  pool_size: int = 1024) -> list[list[int]]:
    """Dynamic batches of utterance indices for one epoch, the same on every rank.

    Shuffle with a generator seeded by (seed, epoch); cut the permutation into pools of `pool_size`
    utterances; sort each pool by length (stable, so ties keep the random order) and cut it greedily into
    batches whose summed length stays ≤ batch_tokens (an utterance longer than that is a batch of its own);
    finally shuffle the batch order. Sorting inside pools keeps padding small (length bucketing) while
    pools keep epochs different from each other."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    batches: list[list[int]] = []
    for start in range(0, len(perm), pool_size):
        pool = sorted(perm[start:start + pool_size], key=lambda i: lengths[i])
        current, used = [], 0
        for i in pool:
            if current and used + lengths[i] > batch_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += lengths[i]
        if current:
            batches.append(current)
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[j] for j in order]


def rank_slice(global_batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's share of a global batch (sorted by length, so strided slices are balanced)."""
    return global_batch[rank::world]


# ----------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, base_lr: float, warmup: int, total_steps: int, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup over `warmup` steps from
    base_lr/warmup to base_lr, then `constant`, `linear` decay to 0 at total_steps, or `cosine` decay to 0."""
    if schedule not in SCHEDULES:
        raise UserError(f"Unknown --schedule {schedule!r}; use one of {', '.join(SCHEDULES)}.")
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    decay_steps = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------- selection
def select_trainable(model: nn.Module, train: str) -> list[str]:
    """Set requires_grad by --train: `mamba` (names containing `.mamba.`), `all`, or an fnmatch glob over
    parameter names. Returns the trainable names; no match is a UserError."""
    names = [n for n, _ in model.named_parameters()]
    if train == "all":
        chosen = set(names)
    elif train == "mamba":
        chosen = {n for n in names if ".mamba." in n}
        if not chosen:
            raise UserError("--train mamba selects nothing: the student has no Mamba layers; "
                            "pass a student made by `mamtra transfer`, or use --train all.")
    else:
        chosen = {n for n in names if fnmatch.fnmatchcase(n, train)}
        if not chosen:
            raise UserError(f"--train {train!r} matches no parameter name (names look like "
                            f"{names[0]!r}, 'backbone.layers.0.mamba.in_proj.weight'); fix the glob.")
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return [n for n in names if n in chosen]


def parse_stages(spec: str) -> tuple[tuple[str, int, float | None], ...]:
    """--stages "mamba:2000,all:1000[:3e-5]" → (("mamba", 2000, None), ("all", 1000, 3e-5)): a comma list of
    TRAIN:STEPS or TRAIN:STEPS:LR, TRAIN being anything --train takes (LR defaults to --lr)."""
    stages = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        try:
            if len(parts) not in (2, 3) or not parts[0]:
                raise ValueError
            steps = int(parts[1])
            lr = float(parts[2]) if len(parts) == 3 else None
        except ValueError:
            raise UserError(f"--stages item {item.strip()!r} is not TRAIN:STEPS or TRAIN:STEPS:LR; write the stages "
                            "like mamba:2000,all:1000 or mamba:2000:1e-3,all:1000:1e-4.") from None
        stages.append((parts[0], steps, lr))
    return tuple(stages)


# ----------------------------------------------------------------------------------------------- DDP
@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def dist_env_from_environ() -> DistEnv:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain run is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup_distributed(env: DistEnv, device: torch.device) -> None:
    if env.distributed:
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world)


def teardown_distributed(env: DistEnv) -> None:
    import torch.distributed as dist

    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def pick_device(device: str, env: DistEnv) -> torch.device:
    """--device (auto | cpu | cuda, checked by the CLI's shared validator) → this rank's device: under
    torchrun each rank takes cuda:LOCAL_RANK, so no explicit index is accepted."""
    from mamtra_cli.cli import parse_device

    if parse_device(device, allow_index=False) == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------- checkpoints
def partial_dir(out: Path) -> Path:
    """Where a run keeps its in-progress state: a sibling `DIR.partial/` of the final output."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def complete_checkpoints(partial: Path) -> list[Path]:
    """Complete checkpoints (with their COMPLETE marker), oldest first."""
    root = Path(partial) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE_MARKER).is_file())


def _rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    state = {"python": [py_version, list(py_state), py_gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------- trainer
@dataclass
class DistillConfig:
    """Hyper-parameters of a run (`--help` of `mamtra distill` explains each)."""

    kl_weight: float = 1.0
    ce_weight: float = 1.0
    temperature: float = 1.0
    train: str = "mamba"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 100
    schedule: str = "cosine"
    grad_accum: int = 1
    clip: float = 1.0
    epochs: int | None = None
    max_steps: int | None = None
    batch_tokens: int = 4096
    pool_size: int = 1024
    seed: int = 0
    dtype: str = "fp32"
    grad_checkpointing: bool = False
    save_every: int = 500
    eval_every: int = 500
    keep_checkpoints: int = 0  # 0 = keep all
    # Staged training: ((train, steps, lr or None = --lr), …) in order; replaces `train` and `max_steps`.
    stages: tuple[tuple[str, int, float | None], ...] | None = None
    select: str = "last"  # which weights the run ships: "last", or "best" (lowest validation CE)
    patience: int = 0  # end a stage after this many evaluations without improvement (0 = never)
    min_delta: float = 0.0  # an improvement is a val CE below the best so far by more than this

    # What a resume must agree on (save/eval cadence, patience and step limits may change between tries).
    RESUME_KEYS = ("kl_weight", "ce_weight", "temperature", "train", "lr", "weight_decay", "betas", "warmup",
                   "schedule", "grad_accum", "clip", "epochs", "max_steps", "batch_tokens", "pool_size",
                   "seed", "dtype", "stages", "select", "min_delta")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["stages"] = None if self.stages is None else [list(st) for st in self.stages]
        return d

    def plan(self, total_steps: int) -> list[tuple[str, int, float]]:
        """The run as stages [(train, steps, lr)]: --stages, or one stage of `total_steps` steps."""
        if self.stages is None:
            return [(self.train, total_steps, self.lr)]
        return [(t, int(n), self.lr if lr is None else float(lr)) for t, n, lr in self.stages]

    def check(self) -> list[str]:
        """Raise a UserError for a value the run cannot use, before anything is written (AdamW itself would
        only refuse a negative --lr in `Distiller.setup`, after OUT.partial/ exists, leaving a run directory
        that blocks the next attempt). Returns warnings: legal settings that are probably a mistake.

        `not (x >= 0)` style comparisons also catch NaN."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(self.lr >= 0 and math.isfinite(self.lr),  # 0 is AdamW's limit too (a no-update run, used in tests)
             f"--lr must be a non-negative learning rate such as 1e-4 (got {self.lr}).")
        need(self.weight_decay >= 0 and math.isfinite(self.weight_decay),
             f"--weight-decay must be 0 or positive (got {self.weight_decay}).")
        need(all(0.0 <= b < 1.0 for b in self.betas),
             f"--betas must both lie in [0, 1), like 0.9,0.95 (got {','.join(map(str, self.betas))}).")
        for name, w in (("--kl-weight", self.kl_weight), ("--ce-weight", self.ce_weight)):
            need(w >= 0 and math.isfinite(w), f"{name} must be 0 or positive (got {w}).")
        need(self.kl_weight > 0 or self.ce_weight > 0,
             "--kl-weight and --ce-weight are both 0, so nothing would be learned; make one of them positive.")
        need(self.temperature > 0 and math.isfinite(self.temperature),
             f"--temperature must be positive (got {self.temperature}).")
        need(self.clip >= 0 and math.isfinite(self.clip),
             f"--clip must be 0 (no clipping) or positive (got {self.clip}).")
        need(self.warmup >= 0, f"--warmup must be 0 or positive (got {self.warmup}).")
        # The command line refuses these through its options' bounds; a Python caller gets the same refusals.
        for name, v in (("--grad-accum", self.grad_accum), ("--batch-tokens", self.batch_tokens),
                        ("--epochs", self.epochs), ("--max-steps", self.max_steps)):
            need(v is None or v >= 1, f"{name} must be at least 1 (got {v}).")
        for name, v in (("--save-every", self.save_every), ("--eval-every", self.eval_every),
                        ("--keep-checkpoints", self.keep_checkpoints)):
            need(v >= 0, f"{name} must be 0 or positive (got {v}).")
        need(self.select in SELECT_RULES, f"Unknown --select {self.select!r}; use best or last.")
        need(isinstance(self.patience, int) and self.patience >= 0,
             f"--patience must be 0 (off) or a number of evaluations (got {self.patience}).")
        need(self.min_delta >= 0 and math.isfinite(self.min_delta),
             f"--min-delta must be 0 or positive (got {self.min_delta}).")
        if self.stages is not None:
            need(self.max_steps is None, "--stages sets the steps of every stage, so it cannot be combined with "
                                         "--max-steps; drop --max-steps.")
            need(self.epochs is None, "--stages sets the steps of every stage, so it cannot be combined with "
                                      "--epochs; drop --epochs.")
            need(len(self.stages) >= 1, "--stages is empty; give TRAIN:STEPS items like mamba:2000,all:1000.")
            for t, n, lr in self.stages:
                need(isinstance(t, str) and t != "" and isinstance(n, int) and n >= 1,
                     f"--stages item {t}:{n} needs a TRAIN (mamba, all or a glob) and at least 1 step.")
                need(lr is None or (lr >= 0 and math.isfinite(lr)),
                     f"--stages item {t}:{n}:{lr} has a learning rate that is not 0 or positive.")
        warnings = []
        if self.patience > 0 and self.eval_every == 0:
            warnings.append(f"--patience {self.patience} counts evaluations, but --eval-every 0 evaluates only at "
                            "the start and at the end of each stage, so it never stops anything; set --eval-every.")
        for t, n, _ in (self.stages or ()):
            if self.warmup > n:
                warnings.append(f"--warmup {self.warmup} exceeds the {n} steps of stage {t}:{n}, so its learning "
                                "rate never reaches its peak; lower --warmup if that is not intended.")
        if self.max_steps is not None and self.warmup > self.max_steps:
            warnings.append(f"--warmup {self.warmup} exceeds --max-steps {self.max_steps}, so the learning rate "
                            f"never reaches --lr {self.lr:g} (it stops at {self.max_steps / self.warmup:.0%} of "
                            "it); lower --warmup if that is not intended.")
        return warnings


class Distiller:
    """setup → train → save_checkpoint, with resume. Only rank 0 prints and writes.

    The run is a list of stages (`DistillConfig.plan`; one stage unless --stages). Each stage has its own
    trainable set, a fresh AdamW over it and its own warm-up + schedule over its steps; the step counter is
    global. Validation (rank 0) runs at step 0, every eval_every global steps and at the end of every stage;
    each evaluation that improves the best val CE by more than min_delta becomes the best (with --select best
    its weights are kept in best/step-NNNNNN/); `patience` evaluations in a row without one end the stage.

    `progress(step, total, metrics)` is the stage's hook for its progress bar (called on every rank's
    step; the stage disables the bar on ranks other than 0)."""

    def __init__(self, cfg: DistillConfig, teacher: SpeechLM, student: SpeechLM, train_utts: list[Utterance],
                 val_utts: list[Utterance] | None, partial: Path, env: DistEnv | None = None,
                 device: torch.device | str = "cpu", progress: Callable[[int, int, dict], None] | None = None):
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.train_utts, self.val_utts = train_utts, val_utts or []
        self.partial = Path(partial)
        self.env = env or DistEnv()
        self.device = torch.device(device)
        self.progress = progress
        self.step = 0  # optimizer steps done (global: it runs on across stages)
        self.position = (0, 0)  # (epoch, next step index within the epoch); the data stream runs on too
        self.metrics_path = self.partial / METRICS_FILE
        self.stage = 0  # index into self.plan
        self.stage_start = 0  # global step at which the current stage began
        self.stage_stopped = False  # the current stage was ended by early stopping
        self.stage_log: list[dict] = []  # per stage entered: train, start, end (None while running), stopped_early
        self.best: dict | None = None  # {"step", "stage", "val_ce", "val_accuracy"} of the best evaluation
        self.bad_evals = 0  # evaluations in a row, within this stage, without an improvement (rank 0)
        self.last_val: dict | None = None  # the latest validation row (rank 0)
        self.last_eval_step = -1
        self._epoch_cache: tuple[int, list] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, resume_from: Path | None = None) -> None:
        cfg = self.cfg
        cfg.check()  # library callers get the stage's checks too (the stage ran them before writing anything)
        check_selection(cfg, bool(self.val_utts))
        # Per-rank randomness (none in the loss today; dropout-free models) gets its own stream.
        random.seed(cfg.seed + self.env.rank)
        torch.manual_seed(cfg.seed + self.env.rank)
        if cfg.dtype == "bf16" and self.device.type != "cuda":
            raise UserError("--dtype bf16 autocast is only supported on CUDA; on CPU use --dtype fp32.")
        if cfg.dtype not in ("fp32", "bf16"):
            raise UserError(f"Unknown --dtype {cfg.dtype!r}; use fp32 or bf16.")

        self.teacher.to(self.device).eval().requires_grad_(False)
        self.student.to(self.device).train()
        self.student.backbone.gradient_checkpointing = cfg.grad_checkpointing
        self.lengths = [utterance_tokens(u) for u in self.train_utts]
        self.total_steps = self._count_total_steps()
        self.plan = cfg.plan(self.total_steps)
        for train, _, _ in self.plan:  # every stage's selection fails here, not hours into the run
            select_trainable(self.student, train)
        state = None
        if resume_from is not None:
            self._load_weights(resume_from)
            state = self._read_trainer_state(resume_from)
        self._enter_stage(int(state.get("stage", 0)) if state else 0,
                          int(state.get("stage_start", 0)) if state else 0)
        if state is not None:
            self._apply_trainer_state(state, resume_from)

    def _enter_stage(self, index: int, start: int) -> None:
        """Stage `index` begins at global step `start`: its trainable set, a fresh AdamW over that set (the
        previous stage's moments belong to another set and another point of the loss surface), and a new DDP
        wrapper (DDP registers its gradient hooks for the parameters that require grad when it wraps)."""
        cfg = self.cfg
        train, self.stage_steps, self.stage_lr = self.plan[index]
        self.stage, self.stage_start, self.stage_stopped, self.bad_evals = index, start, False, 0
        self.stage_log.append({"stage": index, "train": train, "start": start, "end": None, "stopped_early": False})
        self.trainable = select_trainable(self.student, train)
        decay, no_decay = [], []
        for n, p in self.student.named_parameters():
            if p.requires_grad:
                # Mamba's habit: no weight decay on biases, norms, A_log, D, dt_bias (all 1-D).
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=self.stage_lr, betas=tuple(cfg.betas))

        self.model: nn.Module = SpeechTargetLogits(self.student)
        if self.env.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        batches = token_batches(self.lengths, self.cfg.batch_tokens, self.cfg.seed, epoch, self.cfg.pool_size)
        a = self.cfg.grad_accum
        steps = [batches[i:i + a] for i in range(0, len(batches), a)]
        self._epoch_cache = (epoch, steps)
        return steps

    def _count_total_steps(self) -> int:
        cfg = self.cfg
        if cfg.stages is not None:
            return sum(n for _, n, _ in cfg.stages)
        if cfg.epochs is None:
            return cfg.max_steps if cfg.max_steps is not None else len(self._epoch_steps(0))
        total = sum(len(self._epoch_steps(e)) for e in range(cfg.epochs))
        return min(total, cfg.max_steps) if cfg.max_steps is not None else total

    def _next_micro_batches(self) -> list[list[int]] | None:
        """The micro-batches of the next optimizer step (position moves to it), None when --epochs are done."""
        epoch, s = self.position
        while self.cfg.epochs is None or epoch < self.cfg.epochs:
            steps = self._epoch_steps(epoch)
            if s < len(steps):
                self.position = (epoch, s)
                return steps[s]
            epoch, s = epoch + 1, 0
        self.position = (epoch, 0)
        return None

    # ------------------------------------------------------------------ one optimizer step
    def _forward_micro(self, utts: list[Utterance], weight: float, global_targets: int
                       ) -> tuple[torch.Tensor, float, float]:
        """Teacher and student on this rank's utterances → (loss to backward, kl_sum, ce_sum)."""
        cfg = self.cfg
        batch = [t.to(self.device) for t in pad_batch(utts)]
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.dtype == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            with torch.no_grad():
                t_logits, _ = speech_logits(self.teacher, *batch)
            s_logits, targets = self.model(*batch)
        kl_sum, ce_sum = kd_loss_terms(s_logits, t_logits, targets, cfg.temperature)
        # × world: DDP averages gradients over ranks; we want the sum of per-rank sums ÷ the global count.
        loss = kd_loss(kl_sum, ce_sum, global_targets, cfg.kl_weight, cfg.ce_weight, cfg.temperature)
        loss = loss * (weight * self.env.world)
        return loss, float(kl_sum.detach()) * weight, float(ce_sum.detach()) * weight

    def train_step(self, micro_batches: list[list[int]]) -> dict:
        """One optimizer step over global micro-batches (lists of utterance indices)."""
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        # The schedule restarts with every stage: warm-up and decay over that stage's own steps.
        lr = lr_at(self.step - self.stage_start, self.stage_lr, cfg.warmup, self.stage_steps, cfg.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        global_targets = sum(target_tokens(self.train_utts[i]) for mb in micro_batches for i in mb)
        global_inputs = sum(self.lengths[i] for mb in micro_batches for i in mb)
        kl_total, ce_total = 0.0, 0.0
        for k, mb in enumerate(micro_batches):
            local = rank_slice(mb, env.rank, env.world)
            weight = 1.0
            if not local:  # fewer utterances than ranks: join DDP's all-reduce with a zero-weight pass
                local, weight = mb[:1], 0.0
            sync = (k == len(micro_batches) - 1) or not env.distributed
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                loss, kl, ce = self._forward_micro([self.train_utts[i] for i in local], weight, global_targets)
                loss.backward()
            kl_total += kl
            ce_total += ce
        params = [p for p in self.student.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if env.distributed:
            import torch.distributed as dist

            sums = torch.tensor([kl_total, ce_total], dtype=torch.float64)
            dist.all_reduce(sums)
            kl_total, ce_total = sums.tolist()
        self.step += 1
        dt = time.perf_counter() - t0
        kl, ce = kl_total / global_targets, ce_total / global_targets
        return {"kind": "train", "step": self.step, "stage": self.stage, "epoch": self.position[0], "lr": lr,
                "loss": (cfg.kl_weight * cfg.temperature ** 2 * kl + cfg.ce_weight * ce), "kl": kl, "ce": ce,
                "grad_norm": grad_norm, "tokens": global_inputs, "target_tokens": global_targets,
                "tokens_per_s": global_inputs / dt}

    # ------------------------------------------------------------------ validation and selection
    def evaluate(self) -> dict | None:
        if not self.val_utts or not self.env.is_main:
            return None
        from mamtra_cli.scoring import score_utterances

        self.student.eval()
        r = score_utterances(self.student, self.val_utts, batch_size=8)
        self.student.train()
        return {"kind": "val", "step": self.step, "stage": self.stage, "val_ce": r["ce"],
                "val_accuracy": r["accuracy"], "val_tokens": r["tokens"]}

    def _evaluate_and_track(self) -> None:
        """Evaluate (rank 0), update the best and the count of evaluations without improvement, keep the best
        weights (--select best), and append the val row (with `improved`, `best_step`, `bad_evals`)."""
        self.last_eval_step = self.step
        row = self.evaluate()
        if row is None:
            return
        ce = row["val_ce"]
        improved = math.isfinite(ce) and (self.best is None or ce < self.best["val_ce"] - self.cfg.min_delta)
        if improved:
            self.best = {"step": self.step, "stage": self.stage, "val_ce": ce, "val_accuracy": row["val_accuracy"]}
            self.bad_evals = 0
            if self.cfg.select == "best":
                self._save_best()
        else:
            self.bad_evals += 1
        row.update(improved=improved, best_step=None if self.best is None else self.best["step"],
                   bad_evals=self.bad_evals)
        self._write_metrics(row)
        self.last_val = row

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision (only rank 0 evaluates) on every rank."""
        if not self.env.distributed:
            return flag
        import torch.distributed as dist

        box = [bool(flag)]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def _stage_over(self) -> bool:
        return self.stage_stopped or self.step - self.stage_start >= self.stage_steps

    def _run_over(self) -> bool:
        return self.stage == len(self.plan) - 1 and self._stage_over()

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg = self.cfg
        if self.step == 0:
            self._evaluate_and_track()
        last: dict = {}
        while True:
            if self._stage_over():
                self.stage_log[-1].update(end=self.step, stopped_early=self.stage_stopped)
                if self.stage + 1 >= len(self.plan):
                    break
                self._enter_stage(self.stage + 1, self.step)
                continue
            micro = self._next_micro_batches()
            if micro is None:  # --epochs done (total_steps counts them, so only a safety net)
                self.stage_log[-1].update(end=self.step)
                break
            epoch, s = self.position
            last = self.train_step(micro)
            self.position = (epoch, s + 1)
            self._write_metrics(last)
            if self.progress:
                self.progress(self.step, self.total_steps, last)
            stage_end = self._stage_over()
            if (cfg.eval_every > 0 and self.step % cfg.eval_every == 0) or stage_end:
                self._evaluate_and_track()
                # Patience ends the stage (the next one, if any, starts with a fresh count); the best so far
                # is always the whole run's.
                if cfg.patience > 0 and not stage_end and self._agree(self.bad_evals >= cfg.patience):
                    self.stage_stopped = True
            if cfg.save_every > 0 and self.step % cfg.save_every == 0 and not self._run_over():
                self.save_checkpoint()
        if self.last_eval_step != self.step:
            self._evaluate_and_track()
        stops = [st for st in self.stage_log if st["stopped_early"]]
        return {"steps": self.step, "last_train": last, "final_val": self.last_val, "best": self.best,
                "stopped_early": bool(stops), "stopped_at": stops[-1]["end"] if stops else None,
                "stages": [dict(st) for st in self.stage_log]}

    def selected(self) -> tuple[dict, dict]:
        """(state dict to ship, what chose it: {"rule", "step", "val_ce"}), on rank 0 after `train`.

        --select best: the weights of the best evaluation (read back from best/step-NNNNNN/ unless that is
        the last step); --select last (or no finite val CE at all): the current weights."""
        if self.cfg.select == "best" and self.best is not None:
            rule = {"rule": "best val CE", "step": self.best["step"], "val_ce": self.best["val_ce"]}
            if self.best["step"] == self.step:
                return self.student.state_dict(), rule
            from mamtra_cli.checkpoints import WEIGHTS_FILE, load_weights_file

            path = self._best_dir(self.best["step"]) / WEIGHTS_FILE
            return load_weights_file(path, "start the run again", device="cpu"), rule
        val_ce = None if self.last_val is None or self.last_val["step"] != self.step else self.last_val["val_ce"]
        return self.student.state_dict(), {"rule": "last", "step": self.step, "val_ce": val_ce}

    def _write_metrics(self, row: dict | None) -> None:
        if row is None or not self.env.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def _best_dir(self, step: int) -> Path:
        return self.partial / BEST_DIR / f"step-{step:06d}"

    def _save_best(self) -> None:
        """Write best/step-NNNNNN/ (a model directory) atomically: temp dir, then one rename. Named by step
        because a resume from an older checkpoint needs the best that *that* checkpoint knew of (a killed run
        may have found a later one after its last checkpoint); `_prune_best` drops the rest."""
        from mamtra_cli import checkpoints

        if not self.env.is_main:
            return
        path = self._best_dir(self.best["step"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        manifest = checkpoints.run_manifest("distill-best", inputs={}, parameters=self.cfg.to_dict(),
                                            outputs=dict(self.best), seed=self.cfg.seed)
        checkpoints.save_model_dir(tmp, self.student.config, self.student.state_dict(), manifest)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        self._prune_best()

    def _prune_best(self) -> None:
        """Keep the best weights a resume could need: the current best and the one each kept checkpoint names."""
        root = self.partial / BEST_DIR
        if not root.is_dir():
            return
        keep = set() if self.best is None else {self.best["step"]}
        for ckpt in complete_checkpoints(self.partial):
            try:
                keep.add(int(json.loads((ckpt / "manifest.json").read_text())["outputs"]["best_step"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        for d in root.iterdir():
            if d.name.startswith(".") or not (d.name.startswith("step-") and d.name[5:].isdigit()
                                              and int(d.name[5:]) in keep):
                shutil.rmtree(d, ignore_errors=True)

    def save_checkpoint(self) -> Path | None:
        """Write `checkpoints/step-NNNNNN/` atomically (temp dir, COMPLETE marker last, rename)."""
        from mamtra_cli import checkpoints

        env = self.env
        rng = _rng_state()
        if env.distributed:
            import torch.distributed as dist

            all_rng: list = [None] * env.world
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        path = None
        if env.is_main:
            root = self.partial / "checkpoints"
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"step-{self.step:06d}"
            tmp = root / f".step-{self.step:06d}.tmp-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            best_step = None if self.best is None else self.best["step"]
            manifest = checkpoints.run_manifest("distill-checkpoint", inputs={}, parameters=self.cfg.to_dict(),
                                                outputs={"step": self.step, "stage": self.stage,
                                                         "best_step": best_step}, seed=self.cfg.seed)
            checkpoints.save_model_dir(tmp, self.student.config, self.student.state_dict(), manifest)
            state = {"step": self.step, "total_steps": self.total_steps,
                     "position": {"epoch": self.position[0], "step_in_epoch": self.position[1]},
                     "optimizer": self.optimizer.state_dict(),
                     "schedule": {"name": self.cfg.schedule, "step": self.step - self.stage_start},
                     "stage": self.stage, "stage_start": self.stage_start, "stage_stopped": self.stage_stopped,
                     "stage_log": [dict(st) for st in self.stage_log],
                     "best": None if self.best is None else dict(self.best), "bad_evals": self.bad_evals,
                     "rng": all_rng, "world_size": env.world}
            torch.save(state, tmp / TRAINER_STATE_FILE)
            (tmp / COMPLETE_MARKER).write_text(f"step {self.step}\n")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            self._prune_checkpoints()
            self._prune_best()
        barrier(env)
        return path

    def _prune_checkpoints(self) -> None:
        keep = self.cfg.keep_checkpoints
        if keep > 0:
            for old in complete_checkpoints(self.partial)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    # A resume reads files a killed or interrupted run left behind, so every one of them goes through a
    # checked loader: a damaged file is one UserError sentence naming it (and what to do), never a traceback.
    def _resume_fix(self, ckpt: Path) -> str:
        return (f"delete {ckpt} to resume from the checkpoint before it, or start again without --resume "
                "(with --force)")

    def _load_weights(self, ckpt: Path) -> None:
        from mamtra_cli.checkpoints import WEIGHTS_FILE, check_finite_weights, load_weights_file, state_dict_problems

        path = Path(ckpt) / WEIGHTS_FILE
        state = load_weights_file(path, self._resume_fix(ckpt), device=self.device)
        problems = state_dict_problems(self.student.state_dict(), state)
        if problems:
            raise UserError(f"Checkpoint weights {path} do not fit the student ({problems}); "
                            f"{self._resume_fix(ckpt)}.")
        self.student.load_state_dict(state, strict=True)
        check_finite_weights(self.student, f"Checkpoint weights {path}", self._resume_fix(ckpt))

    def _read_trainer_state(self, ckpt: Path) -> dict:
        from mamtra_cli.checkpoints import load_foreign_checkpoint

        # Not memory-mapped: AdamW keeps updating these tensors in place for the rest of the run.
        # CPU: RNG states must stay CPU tensors; the optimizer moves its state to the parameters itself.
        state = load_foreign_checkpoint(Path(ckpt) / TRAINER_STATE_FILE, self._resume_fix(ckpt), mmap=False)
        try:
            ok = 0 <= int(state.get("stage", 0)) < len(self.plan) and int(state.get("stage_start", 0)) >= 0
        except (AttributeError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"Trainer state {Path(ckpt) / TRAINER_STATE_FILE} is damaged or from another run "
                            f"(its stage is not one of this run's); {self._resume_fix(ckpt)}.")
        return state

    def _apply_trainer_state(self, state: dict, ckpt: Path) -> None:
        path = Path(ckpt) / TRAINER_STATE_FILE
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            step = int(state["step"])
            position = (int(state["position"]["epoch"]), int(state["position"]["step_in_epoch"]))
            rng = state["rng"]
            if len(rng) == self.env.world:
                _set_rng_state(rng[self.env.rank])
            # Checkpoints written before stages existed hold none of these: one stage, nothing best yet.
            self.stage_stopped = bool(state.get("stage_stopped", False))
            self.stage_log = [dict(st) for st in state.get("stage_log", self.stage_log)]
            best = state.get("best")
            self.best = None if best is None else {k: best[k] for k in ("step", "stage", "val_ce", "val_accuracy")}
            self.bad_evals = int(state.get("bad_evals", 0))
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise UserError(f"Trainer state {path} is damaged or from another run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else 'missing field'}); "
                            f"{self._resume_fix(ckpt)}.") from None
        self.step, self.position = step, position
        if self.cfg.select == "best" and self.best is not None:
            best_dir = self._best_dir(self.best["step"])
            if not (best_dir / "manifest.json").is_file():  # written last, then one rename
                raise UserError(f"--resume: {ckpt} names the weights of step {self.best['step']} as the best so "
                                f"far, but {best_dir} is missing or incomplete; {self._resume_fix(ckpt)}.")
        if self.env.is_main and self.metrics_path.exists():
            # Drop metric rows written after the checkpoint (the killed try went further than it saved).
            rows = [r for r in read_metric_rows(self.metrics_path) if r.get("step", 0) <= self.step]
            tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, self.metrics_path)  # never a half-rewritten metrics file


def check_selection(cfg: DistillConfig, has_val: bool) -> None:
    """--select best and --patience both read the validation CE, so they need --val."""
    if cfg.select == "best" and not has_val:
        raise UserError("--select best picks the weights with the lowest validation CE, so it needs --val; pass "
                        "--val VAL.jsonl or use --select last.")
    if cfg.patience > 0 and not has_val:
        raise UserError("--patience stops when the validation CE stops improving, so it needs --val; pass "
                        "--val VAL.jsonl or drop --patience.")


def check_pair(teacher: SpeechLM, student: SpeechLM, teacher_name: str, student_name: str) -> None:
    """Teacher and student must share vocabularies and hidden size."""
    tc, sc = teacher.config, student.config
    for attr, what in (("text_vocab_size", "text vocabularies"), ("speech_token_size", "speech vocabularies"),
                       ("hidden_size", "hidden sizes")):
        if getattr(tc, attr) != getattr(sc, attr):
            raise UserError(f"Teacher {teacher_name} and student {student_name} have different {what} "
                            f"({getattr(tc, attr)} vs {getattr(sc, attr)}); make the student from this "
                            "teacher with `mamtra transfer`.")


# ----------------------------------------------------------------------------------------------- plots
def read_metric_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, checked: a garbled line is one UserError naming the file and the line.

    One exception: a last line cut short without its newline is what a run killed while appending leaves;
    the row it was writing is later than any finished checkpoint, so it is dropped rather than refused."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read the metrics file {path} ({getattr(e, 'strerror', None) or e}); restore it "
                        "or start the run again.") from None
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if i == len(lines):  # no newline after it: the torn last write of a killed run
                break
            raise UserError(f"Line {i} of the metrics file {path} is not a JSON object (the file is damaged); "
                            "remove that line or start the run again.") from None
        rows.append(row)
    return rows


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl → (train rows, val rows)."""
    train, val = [], []
    for row in read_metric_rows(path):
        (val if row.get("kind") == "val" else train).append(row)
    return train, val


def plot_loss_curve(metrics_path: Path, png: Path, title: str = "distillation") -> None:
    """Train loss / KL / CE and validation CE against the optimizer step, one PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics_path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        steps = [r["step"] for r in train]
        for key in ("loss", "kl", "ce"):
            ax1.plot(steps, [r[key] for r in train], label=f"train {key}")
    ax1.set_xlabel("optimizer step")
    ax1.set_yscale("log")  # KL is often orders of magnitude below CE
    ax1.set_ylabel("per target token (nats, log scale)")
    ax1.set_title("training")
    ax1.legend()
    if val:
        ax2.plot([r["step"] for r in val], [r["val_ce"] for r in val], marker="o", label="validation CE")
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no --val data", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("CE per target token (nats)")
    ax2.set_title("validation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- benchmark
def bench_training(hidden: int = 896, layers: int = 24, heads: int = 14, kv_heads: int = 2, head_dim: int = 64,
                   intermediate: int = 4864, text_vocab: int = 8192, speech_tokens: int = 6561,
                   batch: int = 4, text_len: int = 20, speech_len: int = 80, steps: int = 3,
                   grad_checkpointing: bool = False, train: str = "mamba", with_teacher: bool = True,
                   threads: int | None = None) -> dict:
    """Training throughput and peak memory of one distillation configuration on CPU, random weights.

    The student is a 1:1 hybrid (uniform placement: odd layers attention) of a Qwen2 teacher of the given
    sizes; a step is teacher forward (no grad) + student forward/backward + AdamW. Peak memory is the
    process's max RSS (resource.getrusage ru_maxrss), so call it in a fresh process:
        python -c "from mamtra_cli.distillation import bench_training as b; b(grad_checkpointing=True)"
    Prints and returns one JSON object; the first step is warm-up and not timed."""
    import resource

    from mamtra_cli.models.config import ModelConfig

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    tcfg = ModelConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim, text_vocab_size=text_vocab,
                       speech_token_size=speech_tokens, layer_types=["attention"] * layers)
    scfg = tcfg.with_layer_types(["attention" if i % 2 else "mamba" for i in range(layers)])
    teacher = SpeechLM(tcfg) if with_teacher else None
    student = SpeechLM(scfg)
    gen = torch.Generator().manual_seed(0)
    utts = [Utterance(f"u{i}", torch.randint(0, text_vocab, (text_len,), generator=gen).tolist(),
                      torch.randint(0, speech_tokens, (speech_len,), generator=gen).tolist())
            for i in range(batch)]
    cfg = DistillConfig(train=train, grad_checkpointing=grad_checkpointing, warmup=0, max_steps=steps + 1,
                        batch_tokens=10 ** 9, save_every=0, eval_every=0)
    d = Distiller(cfg, teacher if teacher is not None else student, student, utts, None,
                  partial=Path("."))  # nothing is written
    d.setup()
    if teacher is None:  # student as its own teacher: no separate teacher weights in memory
        d.teacher = student
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        d.train_step([list(range(batch))])
        if i:
            times.append(time.perf_counter() - t0)
    tokens = sum(utterance_tokens(u) for u in utts)
    result = {"hidden": hidden, "layers": layers, "text_vocab": text_vocab, "batch": batch,
              "tokens_per_step": tokens, "grad_checkpointing": grad_checkpointing, "train": train,
              "with_teacher": with_teacher, "threads": torch.get_num_threads(),
              "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
              "student_params": sum(p.numel() for p in student.parameters()),
              "s_per_step": sum(times) / len(times), "tokens_per_s": tokens * len(times) / sum(times),
              "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------- the run
LOG_EVERY_S = 30.0  # without a terminal (a log file, CI): one progress line at most this often


def distill(teacher: str | Path, student: Path, data: Path | list[Path], out: Path, val: Path | None = None,
            kl_weight: float = 1.0, ce_weight: float = 1.0, temperature: float = 1.0, train: str | None = None,
            lr: float = 1e-4, weight_decay: float = 0.01, betas: str | tuple[float, float] = "0.9,0.95",
            warmup: int = 100, schedule: str = "cosine", grad_accum: int = 1, clip: float = 1.0,
            epochs: int | None = None, max_steps: int | None = None, batch_tokens: int = 4096, seed: int = 0,
            dtype: str = "fp32", grad_checkpointing: bool = False, device: str = "auto", save_every: int = 500,
            eval_every: int = 500, keep_checkpoints: int = 0, stages: str | None = None, select: str | None = None,
            patience: int = 0, min_delta: float = 0.0, resume: bool = False, threads: int | None = None,
            force: bool = False, *, console=None) -> dict | None:
    """`mamtra distill`: distil `student` (a model dir from `transfer`, a distill output/checkpoint, or a built-in
    name: `mini` or a shipped hybrid such as `mini-1-1`) from `teacher` (`mini`, a shipped hybrid, a CosyVoice 2
    dir or a MamTra model dir) on the data manifest `data` (one path, or a list
    of manifests made with the same tokenizers, e.g. real + pseudo-labelled, concatenated), with validation CE
    on `val`, into the model directory `out` (run state in OUT.partial/, see the module docstring; `resume`
    continues it). The keyword arguments are the options of `mamtra distill` (its --help explains each):
    `stages` ("mamba:2000,all:1000", replacing `train`/`max_steps`), `select` ("best" | "last"; default best
    with `val`), `patience`/`min_delta` (early stopping on val CE).

    Returns the final metrics that `mamtra distill --json` prints (on rank 0; None on the other ranks of a
    torchrun): val_ce/val_accuracy of the model in OUT, last_val_ce/last_val_accuracy of the last step,
    `selected` {"rule", "step", "val_ce"}, stopped_early/stopped_at, the stages run, utterances, …
    `console` (rich) gets the progress bar and messages; default stderr on rank 0.
    """
    import sys

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from mamtra_cli import checkpoints
    from mamtra_cli.cli import apply_threads, check_threads, count_parameters, stderr_console
    from mamtra_cli.data_manifest import check_same_tokenizers, read_manifest
    from mamtra_cli.mini import is_builtin, mini_dir
    from mamtra_cli.models.speech_lm import load_model_dir
    from mamtra_cli.scoring import check_utterance_lengths
    from mamtra_cli.teachers import load_teacher

    env = dist_env_from_environ()
    console = console or stderr_console(quiet=not env.is_main)
    check_threads(threads)
    teacher, student_spec, out = str(teacher), str(student), Path(out)
    datas = [Path(d) for d in ([data] if isinstance(data, (str, Path)) else data)]
    val = None if val is None else Path(val)

    # ---- parse and check everything before writing anything
    if not datas:
        raise UserError("No --data manifest given; pass --data TRAIN.jsonl (repeat it for several manifests).")
    resolved = [d.resolve() for d in datas]
    for i, d in enumerate(resolved):
        if d in resolved[:i]:
            raise UserError(f"--data {datas[i]} is given twice; pass each manifest once.")
    try:
        b1, b2 = (float(x) for x in (betas.split(",") if isinstance(betas, str) else betas))
    except (ValueError, TypeError):
        raise UserError(f"--betas {betas!r} is not two numbers like 0.9,0.95.") from None
    if schedule not in SCHEDULES:
        raise UserError(f"Unknown --schedule {schedule!r}; use one of {', '.join(SCHEDULES)}.")
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"Unknown --dtype {dtype!r}; use fp32 or bf16.")
    if stages is not None and train is not None:
        raise UserError("--stages sets what trains in every stage, so it cannot be combined with --train; put "
                        "the TRAIN into each stage, like --stages mamba:2000,all:1000.")
    stage_plan = None if stages is None else parse_stages(stages)
    if select is None:
        select = "best" if val is not None else "last"
    dev = pick_device(device, env)
    if dtype == "bf16" and dev.type != "cuda":
        raise UserError("--dtype bf16 autocast is only supported on CUDA; on CPU use --dtype fp32.")
    cfg = DistillConfig(kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature,
                        train=None if stage_plan else (train or "mamba"), lr=lr,
                        weight_decay=weight_decay, betas=(b1, b2), warmup=warmup, schedule=schedule,
                        grad_accum=grad_accum, clip=clip, epochs=epochs, max_steps=max_steps,
                        batch_tokens=batch_tokens, seed=seed, dtype=dtype, grad_checkpointing=grad_checkpointing,
                        save_every=save_every, eval_every=eval_every, keep_checkpoints=keep_checkpoints,
                        stages=stage_plan, select=select, patience=patience, min_delta=min_delta)
    warnings = cfg.check()  # values are checked before OUT.partial/ or anything else is created
    check_selection(cfg, val is not None)
    for warning in warnings:
        if env.is_main:
            print(f"mamtra distill: warning: {warning}", file=sys.stderr)
    checkpoints.check_output_dir(out, force)
    partial = partial_dir(out)
    # A built-in student is recorded by name: its materialised directory lives in a cache that may move.
    run_inputs = {"teacher": str(Path(teacher).resolve()),
                  "student": student_spec if is_builtin(student_spec) else str(Path(student_spec).resolve()),
                  # one manifest stays a string: the run.json of runs from before --data was repeatable
                  "data": str(resolved[0]) if len(resolved) == 1 else [str(d) for d in resolved]}
    resume_from = None
    if resume:
        found = complete_checkpoints(partial)
        if not found:
            raise UserError(f"--resume: {partial} holds no complete checkpoint (a step-NNNNNN directory with "
                            "a COMPLETE marker); start without --resume.")
        resume_from = found[-1]
        check_resume_config(partial / RUN_FILE, cfg, DistillConfig.RESUME_KEYS, run_inputs)
    elif partial.exists() and not force:
        raise UserError(f"A partial run exists in {partial}; pass --resume to continue it or --force to "
                        "discard it and start over.")

    student = mini_dir(student_spec)  # a shipped hybrid's name → its materialised model directory
    checkpoints.check_model_dir(student)
    with console.status("loading teacher and student"):
        teacher_lm, teacher_info = load_teacher(teacher)
        student_lm = load_model_dir(student)
    checkpoints.check_finite_weights(student_lm, f"Student {student_spec}")
    n_threads = apply_threads(threads, count_parameters(teacher_lm, student_lm))
    check_pair(teacher_lm, student_lm, str(teacher), student_spec)
    scfg = student_lm.config
    headers, train_utts, data_inputs = [], [], []
    for d in datas:
        header, utts = read_manifest(d, text_vocab=scfg.text_vocab_size, speech_vocab=scfg.speech_token_size)
        if headers:  # real and pseudo-labelled data must share their tokenizers to be mixed
            check_same_tokenizers(headers[0], header, str(datas[0]), str(d))
        check_utterance_lengths(utts, scfg.max_position_embeddings, str(d))
        headers.append(header)
        train_utts.extend(utts)
        data_inputs.append({**manifest_fingerprint(d), "utterances": len(utts)})
    val_utts = None
    if val is not None:
        val_header, val_utts = read_manifest(val, text_vocab=scfg.text_vocab_size,
                                             speech_vocab=scfg.speech_token_size)
        for d, header in zip(datas, headers):
            check_same_tokenizers(header, val_header, str(d), str(val))
        check_utterance_lengths(val_utts, scfg.max_position_embeddings, str(val))  # scored at step 0
    for stage_train, _, _ in cfg.plan(0):  # a glob matching nothing fails here, before any writing
        select_trainable(student_lm, stage_train)

    # ---- set up the run directory (rank 0) and the process group
    setup_distributed(env, dev)
    summary = None  # only rank 0 has one
    try:
        if env.is_main:
            if resume_from is None:
                if partial.exists():
                    shutil.rmtree(partial)
                (partial / "checkpoints").mkdir(parents=True)
                checkpoints.write_json_atomic(partial / RUN_FILE, {**cfg.to_dict(), "inputs": run_inputs})
            else:
                console.print(f"resuming from {resume_from}")
        barrier(env)

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

            trainer = Distiller(cfg, teacher_lm, student_lm, train_utts, val_utts, partial, env, dev,
                                progress=progress)
            trainer.setup(resume_from)
            bar.update(task, completed=trainer.step, total=trainer.total_steps)
            result = trainer.train()

        # ---- final output (rank 0): OUT written in one rename, then OUT.partial removed
        if env.is_main:
            last = result["last_train"]
            final_val = result["final_val"] or {}
            state, selected = trainer.selected()
            shipped_val = (result["best"] or {}) if selected["rule"] == "best val CE" else final_val
            metrics = {"steps": result["steps"], "train_loss": last.get("loss"), "train_kl": last.get("kl"),
                       "train_ce": last.get("ce"),
                       "val_ce": shipped_val.get("val_ce"), "val_accuracy": shipped_val.get("val_accuracy"),
                       "last_val_ce": final_val.get("val_ce"), "last_val_accuracy": final_val.get("val_accuracy"),
                       "selected": selected, "stopped_early": result["stopped_early"],
                       "stopped_at": result["stopped_at"], "utterances": len(train_utts)}
            if stage_plan is not None:
                metrics["stages"] = result["stages"]
            if selected["rule"] == "best val CE" and selected["step"] == 0 and result["steps"] > 0:
                print(f"mamtra distill: warning: the untrained student (step 0) had the lowest validation CE "
                      f"({selected['val_ce']:.4f}; last step {final_val.get('val_ce', float('nan')):.4f}), so "
                      f"{out} holds it unchanged; try a lower --lr, fewer steps or more data.", file=sys.stderr)
            inputs = {"teacher": teacher_info,
                      "student": {**({"name": student_spec} if is_builtin(student_spec) else {}),
                                  "path": str(student.resolve()),
                                  "weights": checkpoints.file_fingerprint(student / checkpoints.WEIGHTS_FILE,
                                                                          limit_bytes=64 * 1024 * 1024),
                                  "manifest_stage": checkpoints.read_manifest(student).get("stage")},
                      "data": data_inputs,
                      "val": None if val is None else {**manifest_fingerprint(val), "utterances": len(val_utts)}}
            manifest = checkpoints.run_manifest(
                "distill", inputs=inputs, parameters=cfg.to_dict(), seed=seed, metrics=metrics,
                outputs={"metrics": METRICS_FILE, "plot": PLOT_FILE, "checkpoints": "checkpoints/",
                         "trainable": trainer.trainable[:50], "num_trainable_tensors": len(trainer.trainable)},
                selected=selected, stopped_early=result["stopped_early"], stopped_at=result["stopped_at"],
                world_size=env.world, threads=n_threads,
                resumed_from=None if resume_from is None else str(resume_from))
            with checkpoints.staged_output(out, force) as tmp:
                link_tree(partial / "checkpoints", tmp / "checkpoints")
                shutil.copy2(partial / METRICS_FILE, tmp / METRICS_FILE)
                plot_loss_curve(tmp / METRICS_FILE, tmp / PLOT_FILE, title=f"distill {out.name}")
                checkpoints.save_model_dir(tmp, student_lm.config, state, manifest)
            shutil.rmtree(partial, ignore_errors=True)
            val_ce = "n/a" if metrics["val_ce"] is None else f"{metrics['val_ce']:.4f}"
            console.print(f"wrote {out}: {result['steps']} steps, weights of step {selected['step']} "
                          f"({selected['rule']}), val CE {val_ce}", markup=False, highlight=False)
            summary = {"out": str(out), **metrics, "threads": n_threads}
        barrier(env)
    finally:
        teardown_distributed(env)
    return summary


def manifest_fingerprint(path: Path) -> dict:
    """{"path", "sha256"} of a data manifest: the sha256 of the file (as `sha256sum` prints it), or for a
    directory of shards the sha256 of its "NAME SHA256\\n" lines in name order."""
    from mamtra_cli.checkpoints import file_fingerprint
    from mamtra_cli.data_manifest import manifest_files

    path = Path(path)
    files = manifest_files(path)
    if not path.is_dir():
        return {"path": str(path.resolve()), "sha256": file_fingerprint(path)["sha256"]}
    lines = "".join(f"{f.name} {file_fingerprint(f)['sha256']}\n" for f in files)
    return {"path": str(path.resolve()), "sha256": hashlib.sha256(lines.encode()).hexdigest(), "shards": len(files)}


def check_resume_config(run_file: Path, cfg, keys, inputs: dict) -> None:
    """A resume must use the inputs and the hyper-parameters of the interrupted run (cadences may change).
    A key the run file lacks (written before the option existed) counts as that option's default."""
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"--resume: {run_file} is missing or unreadable; start the run again without --resume.") from None
    for k, v in inputs.items():
        if saved.get("inputs", {}).get(k) != v:
            raise UserError(f"--resume: --{k} is {v} but the interrupted run used {saved.get('inputs', {}).get(k)}; "
                            "resume with the same inputs.")
    now = cfg.to_dict()
    defaults = type(cfg)().to_dict()
    for k in keys:
        if saved.get(k, defaults.get(k)) != now.get(k):
            raise UserError(f"--resume: --{k.replace('_', '-')} is {now.get(k)!r} but the interrupted run used "
                            f"{saved.get(k, defaults.get(k))!r}; resume with the same settings.")


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of src into dst (same file system: no copy of gigabytes), copying as a fallback."""
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

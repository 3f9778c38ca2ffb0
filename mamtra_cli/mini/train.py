"""Training loop of the mini teacher: a 12-layer all-attention `SpeechLM` with CosyVoice 2 semantics,
trained on the mini corpus with the project's own loss (`SpeechLM.forward_train`) and AdamW.

12 layers so that every hybrid ratio of the paper divides it (1:1, 1:3, 1:5, 1:11). Batches are drawn from
length-sorted buckets (little padding); a fraction of rows are two utterances of the same speaker joined
(text ++ text, speech ++ speech), which is exactly what inference sees: CosyVoice 2 prompts the LM with
[prompt text ++ text] and the prompt's speech tokens, then lets it continue.

Optionally a fraction of the *input* speech tokens are replaced by random codes while the targets stay the
clean tokens (`speech_input_noise`): at inference the LM reads back its own, imperfect tokens, and with clean
inputs alone a small LM learns to copy speech-token statistics instead of following the text.

The learning rate warms up linearly, then follows a cosine from its peak to 10 % of it; its progress is the
larger of step/steps and elapsed/time_budget, so a run cut short by a time budget still anneals. One call is
one such cycle; the best weights by validation loss are kept, and a warm restart is another call on them (with
a fresh optimizer).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass

import torch

from mamtra_cli.data_manifest import Utterance
from mamtra_cli.models.config import ATTENTION, ModelConfig
from mamtra_cli.models.speech_lm import SpeechLM, TrainOutput


def mini_model_config(text_vocab: int, speech_vocab: int, hidden: int = 128, layers: int = 12, heads: int = 4,
                      kv_heads: int = 2, head_dim: int = 32, intermediate: int | None = None) -> ModelConfig:
    """Qwen2-style sizes scaled down; all layers attention (the teacher). rope_theta 10⁴: sequences are short."""
    return ModelConfig(hidden_size=hidden, intermediate_size=intermediate or 3 * hidden,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       text_vocab_size=text_vocab, speech_token_size=speech_vocab,
                       layer_types=[ATTENTION] * layers, rope_theta=10_000.0, max_position_embeddings=2048)


@dataclass
class TrainSettings:
    steps: int | None = 3000  # None: only time_budget_s ends the run (and sets the schedule)
    batch_size: int = 16
    lr: float = 2e-3  # peak, reached after `warmup` steps
    warmup: int = 100
    weight_decay: float = 0.01
    concat_prob: float = 0.25  # rows made of two same-speaker utterances (prompt-continuation practice)
    eval_every: int = 100
    time_budget_s: float | None = None  # stop (and anneal towards it) after this many seconds
    speech_input_noise: float = 0.0  # probability that an input speech token is replaced by a random code
    seed: int = 0  # batch order (random.Random(seed)); the input noise draws from torch seed + 1


def _batches(utts: list[Utterance], s: TrainSettings, rng: random.Random, space_id: int):
    """Endless stream of lists of (text_tokens, speech_tokens) rows from length buckets."""
    by_spk: dict[str, list[Utterance]] = {}
    for u in utts:
        by_spk.setdefault(u.spk or "", []).append(u)
    order = sorted(range(len(utts)), key=lambda i: len(utts[i].speech_tokens))
    while True:
        # Shuffle within windows of 8 batches so a batch holds similar lengths but the epoch order varies.
        window = s.batch_size * 8
        idx = []
        for w in range(0, len(order), window):
            chunk = order[w:w + window]
            rng.shuffle(chunk)
            idx.extend(chunk)
        batches = [idx[i:i + s.batch_size] for i in range(0, len(idx), s.batch_size)]
        rng.shuffle(batches)
        for b in batches:
            rows = []
            for i in b:
                u = utts[i]
                text, speech = list(u.text_tokens), list(u.speech_tokens)
                if rng.random() < s.concat_prob:
                    v = rng.choice(by_spk[u.spk or ""])
                    text, speech = list(v.text_tokens) + [space_id] + text, list(v.speech_tokens) + speech
                rows.append((text, speech))
            yield rows


def _collate(rows):
    t_lens = torch.tensor([len(t) for t, _ in rows])
    s_lens = torch.tensor([len(s) for _, s in rows])
    text = torch.zeros(len(rows), int(t_lens.max()), dtype=torch.long)
    speech = torch.zeros(len(rows), int(s_lens.max()), dtype=torch.long)
    for i, (t, s) in enumerate(rows):
        text[i, :len(t)] = torch.tensor(t)
        speech[i, :len(s)] = torch.tensor(s)
    return text, t_lens, speech, s_lens


def corrupt_speech_tokens(speech: torch.Tensor, prob: float, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(B, S) speech tokens → a copy where each token (padding included, which no row reads) is replaced,
    with probability `prob`, by a code drawn uniformly from [0, vocab)."""
    replace = torch.rand(speech.shape, generator=generator) < prob
    return torch.where(replace, torch.randint(0, vocab, speech.shape, generator=generator), speech)


def loss_with_input_tokens(model: SpeechLM, text, text_lens, speech, speech_lens, input_speech) -> TrainOutput:
    """`forward_train` whose targets come from `speech` but whose speech-token embeddings come from
    `input_speech` (same shape (B, S)); with input_speech = speech it is forward_train itself."""
    _, _, targets = model.unistream_inputs(text, text_lens, speech, speech_lens)
    embeds, _, _ = model.unistream_inputs(text, text_lens, input_speech, speech_lens)
    hidden = model.backbone(embeds)
    return model.loss_from_logits(model.llm_decoder(hidden), targets, hidden)


@torch.no_grad()
def evaluate_loss(model: SpeechLM, utts: list[Utterance], batch_size: int = 32) -> dict:
    model.eval()
    ce, n, correct = 0.0, 0, 0
    for i in range(0, len(utts), batch_size):
        rows = [(u.text_tokens, u.speech_tokens) for u in utts[i:i + batch_size]]
        out = model.forward_train(*_collate(rows))
        ce += float(out.ce_sum)
        n += out.num_tokens
        correct += out.correct
    model.train()
    return {"loss": ce / max(n, 1), "acc": correct / max(n, 1)}


def train_teacher(model: SpeechLM, train: list[Utterance], val: list[Utterance], s: TrainSettings,
                  space_id: int = 1, log=lambda msg: None, on_best=None) -> dict:
    """One cycle: train in place from the model's current weights with a fresh AdamW; at the end the model
    holds the best weights (by validation loss). `on_best(model, metrics)` is called whenever validation
    improves (to save a checkpoint). Returns the metrics; `steps_run` counts optimizer steps."""
    if s.steps is None and not s.time_budget_s:
        raise ValueError("TrainSettings needs steps or time_budget_s (or both).")
    torch.manual_seed(s.seed)
    rng = random.Random(s.seed)
    noise_gen = torch.Generator().manual_seed(s.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.98))
    model.train()
    start = time.time()
    best = {"val_loss": math.inf}
    best_state = None
    history = []
    running = None
    stream = _batches(train, s, rng, space_id)
    steps_run = 0
    for step in itertools.count(1):
        if s.steps is not None and step > s.steps:
            break
        elapsed = time.time() - start
        if s.time_budget_s and elapsed > s.time_budget_s:
            log(f"time budget of {s.time_budget_s:.0f} s reached after {steps_run} steps")
            break
        progress = 0.0 if s.steps is None else step / s.steps
        if s.time_budget_s:
            progress = max(progress, elapsed / s.time_budget_s)
        lr = s.lr * min(1.0, step / max(s.warmup, 1)) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = _collate(next(stream))
        if s.speech_input_noise > 0:
            noisy = corrupt_speech_tokens(batch[2], s.speech_input_noise, model.config.speech_token_size, noise_gen)
            out = loss_with_input_tokens(model, *batch, noisy)
        else:
            out = model.forward_train(*batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_run = step
        running = out.loss.item() if running is None else 0.95 * running + 0.05 * out.loss.item()
        if step % s.eval_every == 0 or step == s.steps:
            m = evaluate_loss(model, val)
            history.append({"step": step, "train_loss": round(running, 4), "val_loss": round(m["loss"], 4),
                            "val_acc": round(m["acc"], 4), "lr": lr, "elapsed_s": round(time.time() - start, 1)})
            log(f"step {step}: train {running:.3f} val {m['loss']:.3f} acc {m['acc']:.3f} lr {lr:.2e} "
                f"({time.time() - start:.0f} s)")
            if m["loss"] < best["val_loss"]:
                best = {"val_loss": m["loss"], "val_acc": m["acc"], "step": step}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if on_best is not None:
                    on_best(model, best)
    # The steps since the last evaluation (a time budget rarely ends on one) may hold the best weights.
    if best_state is None or (val and not (history and history[-1]["step"] == steps_run)):
        final = evaluate_loss(model, val) if val else {"loss": float("nan"), "acc": float("nan")}
        if best_state is None or final["loss"] < best["val_loss"]:
            best = {"val_loss": final["loss"], "val_acc": final["acc"], "step": steps_run}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if on_best is not None:
                on_best(model, best)
    model.load_state_dict(best_state)
    model.eval()
    return {"best": best, "steps_run": steps_run, "seconds": round(time.time() - start, 1), "history": history}

"""Teacher-forced scoring of a speech LM on a data manifest: CosyVoice's cross-entropy (summed over the
speech targets and eos, divided by their count over the whole file) and top-1 accuracy.

Utterances are batched by length (longest first, as CosyVoice's padding does) so that padding is small;
the totals do not depend on the batching because each row's CE is summed separately. `score` is
`mamtra score`: a model and a manifest file in, the numbers out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mamtra_cli.data_manifest import Utterance
from mamtra_cli.errors import UserError
from mamtra_cli.models.speech_lm import SpeechLM


def pad_batch(utts: list[Utterance]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ text (B, T_max), text_lens (B,), speech (B, S_max), speech_lens (B,), right-padded with 0."""
    tl = torch.tensor([len(u.text_tokens) for u in utts])
    sl = torch.tensor([len(u.speech_tokens) for u in utts])
    text = torch.zeros(len(utts), int(tl.max()), dtype=torch.long)
    speech = torch.zeros(len(utts), int(sl.max()), dtype=torch.long)
    for i, u in enumerate(utts):
        text[i, : len(u.text_tokens)] = torch.tensor(u.text_tokens)
        speech[i, : len(u.speech_tokens)] = torch.tensor(u.speech_tokens)
    return text, tl, speech, sl


def check_utterance_lengths(utts: list[Utterance], max_positions: int, source: str = "the data") -> None:
    """Refuse, before any forward pass, an utterance whose teacher-forced sequence (sos + text + task_id +
    speech: 2 + T + S positions) is longer than the model's `max_position_embeddings`: the model was never
    trained at such positions (RoPE would extrapolate silently), so its score would mean nothing, and one
    such utterance in a long manifest would otherwise be found only after everything before it was scored."""
    too_long = [u for u in utts if 2 + len(u.text_tokens) + len(u.speech_tokens) > max_positions]
    if too_long:
        u = max(too_long, key=lambda u: len(u.text_tokens) + len(u.speech_tokens))
        n = 2 + len(u.text_tokens) + len(u.speech_tokens)
        more = f" ({len(too_long)} utterances are too long; this is the longest)" if len(too_long) > 1 else ""
        raise UserError(f"Utterance {u.utt!r} in {source} needs {n} positions (2 + {len(u.text_tokens)} text + "
                        f"{len(u.speech_tokens)} speech tokens) but the model handles at most {max_positions} "
                        f"(max_position_embeddings){more}; drop or split it in the manifest.")


@torch.inference_mode()
def score_utterances(model: SpeechLM, utts: list[Utterance], batch_size: int = 8,
                     progress: Callable[[int], None] | None = None, source: str = "the data",
                     prompt_speech: dict[str, int] | None = None) -> dict:
    """CE and accuracy of `model` on `utts`. `prompt_speech` (utt → P) marks rows whose first P speech tokens
    are a prompt, as in a zero-shot request ([sos, prompt text ++ text, task_id, prompt speech, speech]): those
    P targets are read but not scored, so the numbers are those of the continuation (and its eos) alone."""
    check_utterance_lengths(utts, model.config.max_position_embeddings, source)
    order = sorted(range(len(utts)), key=lambda i: -(len(utts[i].text_tokens) + len(utts[i].speech_tokens)))
    per_utt: dict[str, dict] = {}
    ce_total, tokens_total, correct_total = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        batch = [utts[i] for i in order[start:start + batch_size]]
        prompt_lens = [prompt_speech.get(u.utt, 0) for u in batch] if prompt_speech else None
        out = model.forward_train(*pad_batch(batch), prompt_lens=prompt_lens)
        for j, u in enumerate(batch):
            n = int(out.tokens_per_row[j])
            ce = float(out.ce_per_row[j])
            c = int(out.correct_per_row[j])
            per_utt[u.utt] = {"ce": ce / n, "accuracy": c / n, "tokens": n}
            ce_total += ce
            tokens_total += n
            correct_total += c
        if progress:
            progress(len(batch))
    return {"ce": ce_total / tokens_total, "accuracy": correct_total / tokens_total, "tokens": tokens_total,
            "utterances": len(utts), "ce_sum": ce_total,
            "per_utterance": {u.utt: per_utt[u.utt] for u in utts}}


def score(model: str | Path, data: Path, batch_size: int = 8, config_json: Path | None = None,
          threads: int | None = None, *, console=None) -> dict:
    """`mamtra score`: load `model` (anything `load_teacher` takes: `mini`, a MamTra or CosyVoice 2 dir, an
    llm.pt with `config_json`) and score it on the data manifest `data` (a JSONL file or a folder of shards).
    Returns the result of `mamtra score --json`: ce, accuracy, tokens, utterances, per-utterance numbers and
    the thread count. `console` (rich) shows the progress bar; default stderr."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mamtra_cli.cli import apply_threads, check_threads, count_parameters, stderr_console
    from mamtra_cli.data_manifest import read_manifest
    from mamtra_cli.teachers import load_teacher

    console = console or stderr_console()
    check_threads(threads)
    with console.status("loading model"):
        lm, _ = load_teacher(str(model), config_json)
    n_threads = apply_threads(threads, count_parameters(lm))
    cfg = lm.config
    _, utts = read_manifest(data, text_vocab=cfg.text_vocab_size, speech_vocab=cfg.speech_token_size)
    check_utterance_lengths(utts, cfg.max_position_embeddings, str(data))  # before the progress bar starts
    with Progress(TextColumn("scoring"), BarColumn(), TextColumn("{task.completed}/{task.total} utts"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("score", total=len(utts))
        result = score_utterances(lm, utts, batch_size, progress=lambda n: bar.advance(task, n))
    return {"model": str(model), "data": str(data), **result, "threads": n_threads}

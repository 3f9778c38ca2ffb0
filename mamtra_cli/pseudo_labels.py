"""Sequence-level knowledge distillation data (MambaInLlama's pseudo-label stage): sample speech tokens from a
teacher for many texts and write a standard data manifest that `mamtra distill --data` and `mamtra score
--data` read.

Texts come from a file (one text a line, blank lines skipped) or from the mini voice's sentence grammar
(`mini-grammar`: new sentences drawn with the seed, never one of the mini's 120 held-out test sentences).
`count` utterances are made: the text list is trimmed to `count`, or cycled when shorter (a repeated text is a
new utterance with its own seed, so it gets another sample).

Supported teachers: the mini family only, i.e. the built-in `mini` and any model directory that speaks its
vocabularies (hybrids made from it by transfer/distill; their `text_vocab.json`, else the built-in one). The
text tokens are the mini's `CharTokenizer.encode(text)`, which is what the mini synthesis backend feeds the LM
for a text that it does not split (one sentence of at most 100 characters; longer lines are kept whole here).
CosyVoice 2 teachers are refused for now.

Generation is unprompted (CosyVoice's `inference_sft`-style prefix [sos, text, task_id], no prompt speech)
unless `prompts` names a data manifest of real utterances (speech tokens of the teacher's codec, e.g. the mini's
`demo_distill.jsonl`): then utterance i continues a prompt drawn from it (random.Random(seed)), exactly as a
zero-shot request does — the LM reads [sos, prompt text ++ text, task_id, prompt speech] — and the row written
is the whole sequence (prompt text ++ text, prompt speech ++ sampled speech, the prompt's speaker), so a
student distilled on it practises the context every user request puts it in. Sampling is the mini
backend's (RAS, min 0.5× / max 4× the character count). Utterance i is sampled with seed `seed + i`
(`SpeechLM.generate_batch`), so the output does not depend on the batch size.

An utterance that ends without a stop token (it reached `max_tokens` or the 4×-characters limit) would teach
the student to go on where the teacher did not stop: such "capped" utterances are dropped unless
`keep_capped`, and counted in manifest.json either way (their ids are listed there).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path

from mamtra_cli.errors import UserError

MINI_GRAMMAR = "mini-grammar"
DATA_FILE = "data.jsonl"
HELD_OUT = (20000, 120, 0)  # generate_sentences(...)[1]: the mini voice's held-out test sentences


def held_out_sentences() -> list[str]:
    from mamtra_cli.mini.corpus import generate_sentences

    return generate_sentences(*HELD_OUT)[1]


def grammar_texts(count: int, seed: int) -> tuple[list[str], int]:
    """`count` distinct grammar sentences drawn with `seed`, none of them a held-out test sentence (compared
    after the mini tokenizer's normalisation). Returns (texts, how many held-out sentences were skipped)."""
    from mamtra_cli.mini.corpus import generate_sentences
    from mamtra_cli.mini.text import CharTokenizer

    norm = CharTokenizer().normalize
    held = {norm(s) for s in held_out_sentences()}
    drawn, _ = generate_sentences(count + len(held), 0, seed)  # at most len(held) of them can be excluded
    kept = [s for s in drawn if norm(s) not in held]
    return kept[:count], len(drawn) - len(kept)


def read_texts(path: Path) -> tuple[list[str], str]:
    """Lines of `path` (stripped, blank ones skipped) and the file's sha256."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Texts file {path} does not exist; pass a UTF-8 text file with one text a line, "
                        f"or --texts {MINI_GRAMMAR}.")
    try:
        raw = path.read_bytes()
        lines = [line.strip() for line in raw.decode("utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read texts file {path} as UTF-8 text ({e}); pass one text a line.") from None
    texts = [line for line in lines if line]
    if not texts:
        raise UserError(f"Texts file {path} holds no text (only blank lines); put one text on each line.")
    return texts, hashlib.sha256(raw).hexdigest()


def mini_family(spec: str | Path):
    """(model dir, CharTokenizer, speech tokenizer description) of a mini-family teacher, else a UserError."""
    from mamtra_cli import checkpoints
    from mamtra_cli.mini import BUILTIN_DIR, mini_dir
    from mamtra_cli.mini.backend import MiniBackend
    from mamtra_cli.mini.codec import CODEC_CONFIG, MiniCodec
    from mamtra_cli.mini.text import VOCAB_FILE, CharTokenizer

    model_dir = mini_dir(spec)
    codec_dir = model_dir if (model_dir / CODEC_CONFIG).is_file() else BUILTIN_DIR
    if not (model_dir.is_dir() and checkpoints.is_model_dir(model_dir)
            and MiniBackend.accepts(model_dir, codec_dir)):
        raise UserError(f"Teacher {spec} is not of the mini family; `mamtra pseudo-label` supports only the "
                        "built-in `mini` and models made from it (CosyVoice 2 teachers are not supported yet).")
    tok = CharTokenizer.load(model_dir if (model_dir / VOCAB_FILE).is_file() else codec_dir)
    codec = MiniCodec.load(codec_dir)
    speech = {"name": codec.tokenizer_name(), "sha256": codec.fingerprint(),
              "rate_hz": codec.cfg.token_rate}
    return model_dir, tok, speech


class _Progress:
    """A rich bar on a terminal, else one line on stderr every 10 %."""

    def __init__(self, console, total: int):
        self.console, self.total, self.done, self.next_pct, self.bar = console, total, 0, 10, None
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("pseudo-labelling"), BarColumn(),
                                TextColumn("{task.completed}/{task.total} utts"), TimeRemainingColumn(),
                                console=console, transient=True)
            self.task = self.bar.add_task("pl", total=total)

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar:
            self.bar.advance(self.task, n)
            return
        pct = 100 * self.done // self.total
        if pct >= self.next_pct:
            self.console.print(f"pseudo-label: {self.done}/{self.total} utterances ({pct}%)")
            self.next_pct = (pct // 10 + 1) * 10


def read_prompts(path: Path, text_tokenizer: dict, speech_tokenizer: dict) -> tuple[list, str]:
    """The utterances of data manifest `path` that can prompt a mini-family teacher (they need text and
    speech tokens), and the file's sha256; tokens of another tokenizer are refused."""
    from mamtra_cli.data_manifest import read_manifest

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Prompts manifest {path} does not exist; pass a data manifest (.jsonl) of real "
                        "utterances, e.g. mamtra_cli/builtin/mini/demo_distill.jsonl.")
    header, utts = read_manifest(path, text_tokenizer.get("vocab_size"))
    for kind, theirs, ours in (("text", header.text_tokenizer, text_tokenizer),
                               ("speech", header.speech_tokenizer, speech_tokenizer)):
        if theirs is not None and theirs.get("sha256") != ours.get("sha256"):
            raise UserError(f"Prompts manifest {path} holds tokens of another {kind} tokenizer "
                            f"({theirs.get('name')}) than the teacher's ({ours.get('name')}); make the prompts "
                            "with the teacher's tokenizers.")
    usable = [u for u in utts if u.text_tokens and u.speech_tokens]
    if not usable:
        raise UserError(f"Prompts manifest {path} has no utterance with both text and speech tokens; a prompt "
                        "needs both.")
    return usable, hashlib.sha256(path.read_bytes()).hexdigest()


def pseudo_label(teacher: str | Path, texts: str | Path, count: int, out: Path, batch_size: int = 32,
                 max_tokens: int | None = None, keep_capped: bool = False, seed: int = 0,
                 threads: int | None = None, force: bool = False, prompts: Path | None = None, *,
                 console=None) -> dict:
    """`mamtra pseudo-label`: sample `count` utterances of speech tokens from `teacher` (`mini`, a shipped
    hybrid such as `mini-1-1`, or a model dir of the mini family) for the texts of `texts` (a file, one text
    a line, or `mini-grammar`) and write OUT/data.jsonl (a data manifest whose header names the teacher's
    text and speech tokenizers) and OUT/manifest.json (provenance). Returns what `--json` prints."""
    import torch

    from mamtra_cli import checkpoints
    from mamtra_cli.cli import apply_threads, check_threads, count_parameters, stderr_console
    from mamtra_cli.data_manifest import ManifestHeader, Utterance, write_manifest
    from mamtra_cli.mini.backend import MINI_SAMPLING
    from mamtra_cli.teachers import load_teacher

    console = console or stderr_console()
    if count < 1:
        raise UserError(f"--count must be at least 1 (got {count}); ask for the number of utterances to make.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size}).")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {max_tokens}); leave it out for no cap.")
    check_threads(threads)
    out = Path(out)
    checkpoints.check_output_dir(out, force)
    model_dir, tok, speech_tok = mini_family(teacher)

    if str(texts) == MINI_GRAMMAR:
        lines, excluded = grammar_texts(count, seed)
        source = {"source": MINI_GRAMMAR, "seed": seed, "held_out_excluded": excluded,
                  "held_out": "generate_sentences(20000, 120, 0)[1]"}
    else:
        lines, file_sha = read_texts(Path(texts))
        source = {"source": "file", "path": str(Path(texts).resolve()), "file_sha256": file_sha}
    for i, line in enumerate(lines):
        if not tok.encode(line):
            raise UserError(f"Text {i + 1} of {texts} ({line!r}) has no character the mini tokenizer knows; "
                            "remove that line.")
    chosen = [lines[i % len(lines)] for i in range(count)]
    source.update(lines=len(lines), cycled=count > len(lines), trimmed=count < len(lines),
                  sha256=hashlib.sha256("".join(t + "\n" for t in chosen).encode()).hexdigest())

    with console.status("loading teacher"):
        lm, info = load_teacher(str(teacher))
    n_threads = apply_threads(threads, count_parameters(lm))
    cfg, sampling = lm.config, MINI_SAMPLING
    text_tokens = [tok.encode(t) for t in chosen]
    # the prompt of utterance i (None: unprompted); drawn up front so the output does not depend on batch size
    prompt_of: list = [None] * count
    if prompts is not None:
        import random

        pool, prompts_sha = read_prompts(prompts, tok.describe(), speech_tok)
        rng = random.Random(seed)
        prompt_of = [rng.choice(pool) for _ in range(count)]
        prompt_info = {"path": str(Path(prompts).resolve()), "sha256": prompts_sha, "utterances": len(pool),
                       "draw": "random.Random(seed).choice per utterance",
                       "row": "prompt text ++ text, prompt speech ++ sampled speech, the prompt's spk"}

    speech: list[list[int]] = []
    t0 = time.perf_counter()
    with _Progress(console, count) as progress, torch.inference_mode():
        for start in range(0, count, batch_size):
            reqs = [(t, [], []) if p is None else (t, list(p.text_tokens), list(p.speech_tokens))
                    for t, p in zip(text_tokens[start:start + batch_size], prompt_of[start:start + batch_size])]
            speech += lm.generate_batch(reqs, sampling=sampling, seed=seed + start, max_new_tokens=max_tokens)
            progress.advance(len(reqs))
    seconds = time.perf_counter() - t0
    tokens = sum(len(s) for s in speech)

    kept: list[Utterance] = []
    capped, dropped = [], {"capped": 0, "empty": 0, "too_long": 0}
    for i, (text, t, s, p) in enumerate(zip(chosen, text_tokens, speech, prompt_of)):
        utt = f"pl_{i:06d}" if p is None else f"plp_{i:06d}_{p.utt}"
        limit = int(len(t) * sampling.max_token_text_ratio)
        if max_tokens is not None:
            limit = min(limit, max_tokens)
        is_capped = len(s) >= limit  # generation stops without a stop id only at the limit
        if is_capped:
            capped.append(utt)
        if not s:
            dropped["empty"] += 1
        elif 2 + len(t) + len(s) + (0 if p is None else len(p.text_tokens) + len(p.speech_tokens)) \
                > cfg.max_position_embeddings:
            dropped["too_long"] += 1
        elif is_capped and not keep_capped:
            dropped["capped"] += 1
        elif p is None:
            kept.append(Utterance(utt, t, s, text))
        else:  # the whole prompted sequence, as the LM read and wrote it
            kept.append(Utterance(utt, list(p.text_tokens) + t, list(p.speech_tokens) + s,
                                  None if p.text is None else p.text + text, p.spk))
    if not kept:
        raise UserError(f"All {count} utterances were dropped ({dropped['capped']} reached the cap on speech tokens "
                        "without a stop token); raise --max-tokens or pass --keep-capped.")

    params = {"count": count, "batch_size": batch_size, "max_tokens": max_tokens, "keep_capped": keep_capped,
              "sampling": asdict(sampling),
              "prompt": "none (unprompted: [sos, text, task_id])" if prompts is None else prompt_info,
              "text_tokens": "mini CharTokenizer.encode(text), one line = one utterance (no sentence split)"}
    # `tokens` counts sampled speech tokens only (prompts excluded), so tokens/s is generation speed
    metrics = {"count": count, "kept": len(kept), "dropped": sum(dropped.values()), "dropped_by_reason": dropped,
               "capped": len(capped), "tokens": tokens, "seconds": round(seconds, 3),
               "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None, "threads": n_threads}
    header = ManifestHeader(tok.describe(), speech_tok)
    with checkpoints.staged_output(out, force) as tmp:
        write_manifest(tmp / DATA_FILE, header, kept)
        teacher_info = {k: v for k, v in info.items() if k != "config"}
        manifest = checkpoints.run_manifest(
            "pseudo-label", inputs={"teacher": {"spec": str(teacher), "model_dir": str(model_dir), **teacher_info},
                                    "texts": source},
            parameters=params, outputs={"data": DATA_FILE, "capped_utts": capped,
                                        "text_tokenizer": header.text_tokenizer,
                                        "speech_tokenizer": header.speech_tokenizer},
            metrics=metrics, seed=seed)
        checkpoints.write_json_atomic(tmp / "manifest.json", manifest)
    return {**metrics, "batch_size": batch_size,
            "paths": {"out": str(out), "data": str(out / DATA_FILE), "manifest": str(out / "manifest.json")}}

"""`mamtra pseudo-label`: sequence-level KD data — speech tokens sampled from a teacher for many texts, written
as a data manifest for `distill`/`score` (`mamtra_cli.pseudo_labels.pseudo_label`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def pseudo_label(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: `mini`, a shipped hybrid (`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`), or a model dir made from the mini (the mini family)."),
    texts: str = typer.Option(..., "--texts", help="Text file (one text a line, blank lines skipped) or "
                              "`mini-grammar` (new mini-grammar sentences, never the 120 held-out ones)."),
    count: int = typer.Option(..., "--count", help="Utterances to make (the text list is trimmed or cycled)."),
    out: Path = typer.Option(..., "--out", help="Output directory: data.jsonl + manifest.json."),
    batch_size: int = typer.Option(32, "--batch-size", help="Utterances generated together (the output does not depend on it)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Cap on speech tokens per utterance (default: 4× its characters)."),
    keep_capped: bool = typer.Option(False, "--keep-capped", help="Keep utterances that hit the cap without a stop "
                                     "token (default: drop them; counted in manifest.json either way)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Data manifest of real utterances (e.g. "
                                           "mamtra_cli/builtin/mini/demo_distill.jsonl): each utterance continues "
                                           "one of them, drawn with the seed, as a zero-shot request does; the row "
                                           "written is prompt ++ new text and speech."),
    seed: int = typer.Option(0, "--seed", help="Utterance i samples with seed+i; also draws the mini-grammar sentences."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (counts, tokens/s, paths)."),
) -> None:
    """Sample speech tokens from TEACHER for COUNT texts and write OUT/data.jsonl, a data manifest for distill/score.

    Generation is unprompted ([sos, text, task_id]) unless --prompts; utterances ending without a stop token
    are dropped unless --keep-capped.

    Example: mamtra pseudo-label --teacher mini --texts mini-grammar --count 2000 --out kd-data
    """
    import json

    from mamtra_cli.pseudo_labels import pseudo_label as run

    r = run(teacher, texts, count, out, batch_size=batch_size, max_tokens=max_tokens, keep_capped=keep_capped,
            seed=seed, threads=threads, force=force, prompts=prompts)
    if json_out:
        print(json.dumps(r))
    else:
        print(f"data\t{r['paths']['data']}\ncount\t{r['count']}\nkept\t{r['kept']}\ndropped\t{r['dropped']}\n"
              f"tokens\t{r['tokens']}\ntokens_per_second\t{r['tokens_per_second']}\nthreads\t{r['threads']}")

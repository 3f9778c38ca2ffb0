"""`mamtra build-hybrids`: rebuild the distilled hybrids that ship with the built-in mini voice
(`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`).

    mamtra build-hybrids --out mamtra_cli/builtin/hybrids --force     # the shipped four
    mamtra build-hybrids --out /tmp/hyb --ratios 1:3 --toy             # a smoke test (about a minute)

The steps, the recipe and the resumable --work cache are described in `mamtra_cli.mini.build_hybrids`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamtra_cli.mini.build_hybrids import DEFAULT_WORK, RATIOS, SHIPPED_STEPS, Recipe

_R = Recipe()


def build_hybrids(
    out: Path = typer.Option(..., "--out", help="Directory to create: one packed hybrid per ratio (the layout of "
                             "mamtra_cli/builtin/hybrids/)."),
    work: Path = typer.Option(DEFAULT_WORK, "--work", help="Cache of the phases (pseudo-labels, transferred and "
                              "distilled models). Re-running the same command reuses or resumes what is there."),
    ratios: str = typer.Option(",".join(RATIOS), "--ratios", help="attention:Mamba ratios, comma-separated."),
    count: Optional[int] = typer.Option(None, "--count", min=1, help="Pseudo-labelled training utterances (the "
                                        f"teacher speaks new grammar sentences; default {_R.count}); the 400 "
                                        "shipped real ones are always added."),
    val_count: Optional[int] = typer.Option(None, "--val-count", min=1, help="Pseudo-labelled validation "
                                            f"utterances (other sentences; default {_R.val_count}): they pick "
                                            "each hybrid's weights."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Distillation steps of phase 3 (4096 tokens "
                                        "each) for every ratio. Default: each shipped hybrid's own ("
                                        + ", ".join(f"1:{k} {v}" for k, v in sorted(SHIPPED_STEPS.items()))
                                        + f", the others {_R.steps})."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Peak learning rate of phase 3 (cosine after a linear "
                                       f"warm-up; default {_R.lr})."),
    jobs: int = typer.Option(2, "--jobs", min=1, help="Hybrids distilled (and pseudo-label sets made) side by side, "
                      "one CPU thread each."),
    placement: Optional[str] = typer.Option(None, "--placement", help="Where the attention layers stay, for every "
                                            "ratio: uniform | uniform-first | front | back | importance. Default: "
                                            "each shipped hybrid's own (importance: the layers the teacher misses "
                                            "most); another is named mini-1-K-PLACEMENT (Fig. 4's placements)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the pseudo-labels, the transfer and the distillation."),
    toy: bool = typer.Option(False, "--toy", help="Toy sizes for a smoke test: 16 pseudo-labelled utterances, "
                             "2 steps."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Distil the shipped hybrids of the built-in mini voice: pseudo-label → transfer → distill (Mamba layers
    only, best validation CE) → distill again with prompted practice (joined same-speaker pairs, the teacher
    continuing real prompts) → score → pack (only the tensors not shared with the teacher).

    About 30 minutes per hybrid (600 steps; mini-1-3 trains 1200) plus 20 for the prompted phase (400 steps with
    joined same-speaker pairs and prompted pseudo-labels) on one core of a 2-core CPU, after about 12 minutes of
    pseudo-labels; --jobs 2 runs two at a time (all four: about 2.5 hours)."""
    import json

    from mamtra_cli.mini.build_hybrids import TOY_RECIPE
    from mamtra_cli.mini.build_hybrids import build_hybrids as build

    changes = {k: v for k, v in (("count", count), ("val_count", val_count), ("steps", steps), ("lr", lr))
               if v is not None}
    summary = build(out, work=work, ratios=tuple(r.strip() for r in ratios.split(",") if r.strip()),
                    recipe=TOY_RECIPE if toy else None, recipe_changes=changes, jobs=jobs, seed=seed, force=force,
                    placement=placement)
    if json_out:
        print(json.dumps(summary))
        return
    print(f"teacher (mini)\theld-out CE {summary['teacher_held_out_ce']:.4f}")
    for h in summary["hybrids"]:
        sel = h["selected"] or {}
        print(f"{h['name']}\theld-out CE {h['held_out_ce']:.4f} ({h['ce_vs_teacher']:+.1%} vs teacher)\t"
              f"best val CE {sel.get('val_ce', float('nan')):.4f} at step {sel.get('step')}\t"
              f"{h['bytes']:,} bytes\t{h['seconds']['distill']:.0f} s")
    print(f"wrote {summary['out']} in {summary['seconds']:.0f} s")

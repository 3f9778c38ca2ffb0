"""`mamtra plot-runs`: overlay the learning curves of several distill runs (the paper's Fig. 6: reused vs
Xavier vs Kaiming init; the CE column of Fig. 4) and print a table of initial/final numbers
(`mamtra_cli.learning_curves`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def plot_runs(
    runs: List[Path] = typer.Argument(..., help="Distill output directories (or their metrics.jsonl, or OUT.partial/)."),
    out: Path = typer.Option(..., "--out", help="Image to write (PNG; the suffix picks another format: .svg, .pdf)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated legend labels, one per run (default: "
                                         "each run's model, e.g. \"hybrid 1:1 (6A+6M)\", with its directory name "
                                         "only where two runs share a layout)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the table as one JSON object."),
) -> None:
    """Overlay train KL and validation CE against the step for RUNS into one PNG; print initial/final numbers.

    Example: mamtra plot-runs kd-reused kd-xavier kd-kaiming --labels reused,xavier,kaiming --out fig6.png
    """
    import json

    from mamtra_cli.learning_curves import format_table, plot_runs as plot

    result = plot(runs, out, labels=labels, force=force)
    print(json.dumps(result) if json_out else format_table(result))

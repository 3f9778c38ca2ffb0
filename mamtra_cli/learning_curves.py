"""Learning curves of several distill runs side by side (`mamtra plot-runs`): the paper's Fig. 6 (reused vs
Xavier vs Kaiming init) and the CE column of its Fig. 4. `plot_runs` reads each run's metrics.jsonl, overlays
train KL and validation CE against the step in one image, and returns initial/final numbers per run.
"""

from __future__ import annotations

from pathlib import Path

from mamtra_cli.errors import UserError

FINAL_WINDOW = 10  # final train KL = mean over the last this-many steps (one batch is noisy)


def plot_runs(runs: list[Path], out: Path, labels: str | list[str] | None = None, force: bool = False) -> dict:
    """Overlay the curves of `runs` (distill output directories, their metrics.jsonl, or OUT.partial/) into the
    image `out` (the suffix picks the format: .png, .svg, .pdf; replaced only with `force`). `labels`: one legend
    label per run (a list, or comma-separated); default the model each run trained (`model_labels`).
    Returns {"plot": out, "runs": [{run, path, steps, initial_kl, final_kl, initial_val_ce, final_val_ce}]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mamtra_cli.checkpoints import check_writable_parent, publish_file, temp_sibling_file
    from mamtra_cli.distillation import METRICS_FILE, read_metrics

    runs, out = [Path(r) for r in runs], Path(out)
    if isinstance(labels, str):
        labels = [s.strip() for s in labels.split(",")] if labels else None
    names = list(labels) if labels else model_labels(runs)
    if len(names) != len(runs):
        raise UserError(f"--labels has {len(names)} label(s) for {len(runs)} run(s); give one label per run.")
    if not out.parent.exists():
        raise UserError(f"The directory of --out ({out.parent}) does not exist; create it first.")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the image's file name, e.g. {out / 'runs.png'}.")
    if out.exists() and not force:
        raise UserError(f"Output {out} already exists; pass --force to replace it or choose another --out.")
    check_writable_parent(out)
    fmt_name = out.suffix[1:].lower() or "png"
    supported = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if fmt_name not in supported:
        raise UserError(f"--out {out}: matplotlib cannot write .{fmt_name} images; use one of "
                        f"{', '.join('.' + k for k in sorted(supported))}.")

    rows, curves = [], []
    for run, name in zip(runs, names):
        path = run / METRICS_FILE if run.is_dir() else run
        if not path.is_file():
            raise UserError(f"{run} has no {METRICS_FILE}; pass a directory written by `mamtra distill`.")
        try:
            train, val = read_metrics(path)
        except (ValueError, KeyError) as e:
            raise UserError(f"{path} is not a distill metrics file ({e}).") from None
        if not train:
            raise UserError(f"{path} holds no training steps; did the run start?")
        tail = train[-FINAL_WINDOW:]
        rows.append({"run": name, "path": str(run), "steps": train[-1]["step"],
                     "initial_kl": train[0]["kl"], "final_kl": sum(r["kl"] for r in tail) / len(tail),
                     "initial_val_ce": val[0]["val_ce"] if val else None,
                     "final_val_ce": val[-1]["val_ce"] if val else None})
        curves.append((name, train, val))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, train, val in curves:
        line, = ax1.plot([r["step"] for r in train], [r["kl"] for r in train], label=name, alpha=0.85)
        if val:
            ax2.plot([r["step"] for r in val], [r["val_ce"] for r in val], marker="o", color=line.get_color(),
                     label=name)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("KL(teacher ‖ student) per target token (nats)")
    ax1.set_yscale("log")
    ax1.set_title("training KL")
    ax1.legend()
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("validation CE per target token (nats)")
    ax2.set_title("validation CE")
    ax2.legend()
    fig.tight_layout()
    # A temporary file beside --out, then one exclusive move (replacing only with --force): a reader never
    # sees half an image, and a file another run wrote at --out meanwhile is kept.
    tmp = temp_sibling_file(out)
    try:
        fig.savefig(tmp, dpi=100, format=fmt_name)
        publish_file(tmp, out, force)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)

    return {"plot": str(out), "runs": rows}


def format_table(result: dict) -> str:
    """The rows of `plot_runs` as the tab-separated table `mamtra plot-runs` prints."""
    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    lines = [f"run\tsteps\tinitial_kl\tfinal_kl(mean last {FINAL_WINDOW})\tinitial_val_ce\tfinal_val_ce"]
    for r in result["runs"]:
        lines.append(f"{r['run']}\t{r['steps']}\t{fmt(r['initial_kl'])}\t{fmt(r['final_kl'])}\t"
                     f"{fmt(r['initial_val_ce'])}\t{fmt(r['final_val_ce'])}")
    return "\n".join(lines)


def model_labels(runs: list[Path]) -> list[str]:
    """Legend labels that name the model each run trained ("hybrid 1:3 (3A+9M)"), read from its config.yaml
    (a distill output, or the newest checkpoint of an OUT.partial/); the directory name is added where two
    runs share a layout (Fig. 6 compares inits of one layout), and used alone where no config is found."""
    from mamtra_cli.checkpoints import CONFIG_FILE
    from mamtra_cli.distillation import complete_checkpoints
    from mamtra_cli.models.config import ModelConfig
    from mamtra_cli.profiling import model_label

    found = []
    for run in runs:
        run = Path(run)
        folder = run if run.is_dir() else run.parent
        candidates = [folder / CONFIG_FILE] + [c / CONFIG_FILE for c in reversed(complete_checkpoints(folder))]
        label = None
        for cfg in candidates:
            if cfg.is_file():
                try:
                    label = model_label(ModelConfig.load(cfg).layer_types)
                except UserError:
                    pass
                break
        found.append(label)
    names = [Path(r).name or str(r) for r in runs]
    out = []
    for label, name in zip(found, names):
        if label is None:
            out.append(name)
        elif found.count(label) > 1:
            out.append(f"{label}: {name}")
        else:
            out.append(label)
    return out

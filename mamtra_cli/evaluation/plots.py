"""The evaluation's figures (PNG, written to a temporary file and renamed into place):

- `plot_wer_sim`: WER (mean of utterances) and SIM per system, side by side, unintelligible rows in red;
- `plot_ce_vs_wer`: held-out CE against WER, one point a model, with the least-squares line and Pearson r
  (the paper's Fig. 4: CE predicts intelligibility across ratios and placements).
"""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_wer_sim(result: dict, path: Path) -> Path:
    plt = _pyplot()
    systems = result["systems"]
    names = [s["name"] for s in systems]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(names) + 3), 3.8))
    colors = ["tab:red" if s["unintelligible"] else "tab:blue" for s in systems]
    wers = [s["wer"] or 0.0 for s in systems]
    axes[0].bar(range(len(names)), wers, color=colors)
    axes[0].axhline(result["unintelligible_above_wer"], color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("WER (mean of utterances)")
    axes[0].set_title(f"WER · {result['asr']['name']}")
    for i, w in enumerate(wers):
        axes[0].text(i, w, f"{w:.3f}", ha="center", va="bottom", fontsize=8)
    sims = [s["sim"] for s in systems]
    axes[1].bar(range(len(names)), [v or 0.0 for v in sims], color="tab:green")
    axes[1].set_ylabel("SIM (cosine to prompt)")
    axes[1].set_title("SIM · " + (result["sim_model"]["name"] if result["sim_model"] else "not measured"))
    for i, v in enumerate(sims):
        if v is not None:
            axes[1].text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    fig.suptitle(f"{result['list']}: {result['utterances']} utterances", fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_ce_vs_wer(result: dict, path: Path) -> Path:
    """One panel of held-out CE against WER (a point a model, least-squares line, Pearson r), and a second of
    prompted CE against WER when the models have it."""
    import numpy as np

    plt = _pyplot()
    panels = [("ce", "pearson_ce_wer", f"CE on {Path(result['data']).name}" if result.get("data") else "CE"),
              ("ce_prompted", "pearson_prompted_ce_wer", "prompted CE (rows behind their prompts)")]
    panels = [p for p in panels if sum(s.get(p[0]) is not None and s["wer"] is not None
                                       for s in result["systems"]) >= 1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, r_key, label) in zip(axes[0], panels):
        pts = [(s[key], s["wer"], s["name"]) for s in result["systems"]
               if s.get(key) is not None and s["wer"] is not None]
        x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        ax.scatter(x, y, color="tab:blue")
        for cx, wy, name in pts:
            ax.annotate(name, (cx, wy), textcoords="offset points", xytext=(4, 4), fontsize=8)
        r = result.get(r_key)
        if len(pts) >= 2 and np.std(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 10)
            ax.plot(xs, slope * xs + intercept, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel(f"WER ({result['asr']['name']})")
        ax.set_title(("CE" if key == "ce" else "prompted CE") + " vs WER"
                     + (f" · Pearson r = {r:.3f}" if r is not None else " (r needs ≥ 3 models)"))
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)

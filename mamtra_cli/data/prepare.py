"""`mamtra prepare` as a function: a speech corpus → sharded JSONL data manifests (text + speech tokens).

Output DIR:
  train/shard-NNNNN.jsonl, val/shard-NNNNN.jsonl   data manifests (`mamtra_cli.data_manifest`), each
                     with a header naming the text and speech tokenizer (name + sha256), its shard key
                     and its statistics; `shard-NNNNN.emb.npz` beside them with `embeddings`
  manifest.json      provenance and the summary (written last)

Sources are listed by `mamtra_cli.data.sources`, the speaker split and the shards planned by
`mamtra_cli.data.shards`. Work happens in a sibling folder `.DIR.partial`; each shard file is written
atomically, so a crash never leaves half a shard, and a re-run with the same inputs keeps every shard whose
key still matches. When all is done the folder is renamed to DIR. A re-run on a finished DIR with the same
inputs does nothing. A run that fails before any shard is finished (a front-end model that does not load, in
the parent or in any worker) stops with one sentence and removes `.DIR.partial`, which would hold nothing
worth resuming.

Utterances are tokenized by `jobs` worker processes (spawned, each with its own ONNX sessions), CHUNK
utterances per task; one bad file is skipped and counted, never the end of a long run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from mamtra_cli.data.shards import (PLAN_VERSION, Shard, has_finished_shard, plan_shards, shard_done,
                                    split_speakers, summarize)
from mamtra_cli.data.sources import SOURCES, Item, attach_parquet_audio, list_source

SAMPLE_RATE = 16000
CHUNK = 8  # utterances per task sent to a worker


# ----------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------

# The front end of this process (a pool worker, or the parent with jobs=1): tokenizers and speaker model
# loaded once by `_worker_init`, and the parquet column read last.
_STATE: dict = {}


def _worker_init(cfg: dict, set_torch_threads: bool = True) -> None:
    from mamtra_cli.frontend.speech_tokenizer import SpeakerEmbedder, SpeechTokenizer
    from mamtra_cli.frontend.text import TextTokenizer

    if set_torch_threads:
        import torch

        torch.set_num_threads(1)
    _STATE.clear()
    _STATE["text"] = TextTokenizer.from_dir(cfg["tokenizer_dir"])
    _STATE["speech"] = SpeechTokenizer(cfg["speech_tokenizer"]) if cfg.get("speech_tokenizer") else None
    _STATE["spk"] = SpeakerEmbedder(cfg["campplus"]) if cfg.get("campplus") else None
    _STATE["embeddings"] = bool(cfg.get("embeddings"))
    _STATE["normalize_text"] = bool(cfg.get("normalize_text", True))
    _STATE["parquet"] = (None, None)


def _pool_worker_init(cfg: dict) -> None:
    """`_worker_init` for a worker of the multiprocessing pool. It must not raise: a pool replaces a worker
    whose initializer fails and runs the initializer again, forever (a corrupt speech tokenizer ONNX gave 136
    tracebacks in 10 minutes and never an exit). The failure is kept instead, and the worker's first task
    raises it (`_process_chunk`), which ends the run in the parent with that one sentence."""
    from mamtra_cli.errors import UserError

    try:
        _worker_init(cfg)
    except UserError as e:
        _STATE.clear()
        _STATE["init_error"] = str(e)
    except Exception as e:  # noqa: BLE001 - whatever it is, it must reach the parent as one sentence
        _STATE.clear()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        _STATE["init_error"] = (f"A prepare worker could not load the front-end models ({type(e).__name__}: "
                                f"{first}); check --speech-tokenizer, --campplus and --tokenizer-dir.")


def _parquet_audio(file: str, row: int) -> bytes:
    cached_file, table = _STATE.get("parquet", (None, None))
    if cached_file != file:
        import pyarrow.parquet as pq

        table = pq.read_table(file, columns=["audio_data"]).column("audio_data")
        _STATE["parquet"] = (file, table)
    return table[row].as_py()


def _process_item(it: Item) -> dict:
    """One utterance → {"utt", "ok": True, "utterance": {...}, "seconds", "embedding"} or a skip."""
    from mamtra_cli.errors import UserError
    from mamtra_cli.frontend.audio import load_audio

    def skip(reason, detail=""):
        return {"utt": it.utt, "ok": False, "reason": reason, "detail": detail}

    if it.skip:
        return skip(it.skip, it.detail)
    text_tok = _STATE["text"]
    # Off: only whitespace is collapsed, as CosyVoice's own Kaldi → parquet recipe leaves the text.
    text = text_tok.normalize(it.text or "") if _STATE["normalize_text"] else " ".join((it.text or "").split())
    if not text:
        return skip("empty_transcript")
    text_tokens = text_tok.encode(text, normalize=False)
    if not text_tokens:
        return skip("empty_transcript")
    wav = None
    if it.audio is not None or it.parquet is not None:
        try:
            if it.audio is not None:
                wav = load_audio(it.audio, SAMPLE_RATE)
            else:
                wav = load_audio(_parquet_audio(*it.parquet), SAMPLE_RATE,
                                 name=f"{it.parquet[0]} row {it.parquet[1]} ({it.utt})")
        except UserError as e:
            return skip("unreadable_audio", str(e))
        if wav.size == 0:
            return skip("unreadable_audio", "no samples")
    if it.tokens is not None:
        tokens = it.tokens
        seconds = wav.size / SAMPLE_RATE if wav is not None else len(tokens) / 25.0
    else:
        speech = _STATE["speech"]
        seconds = wav.size / SAMPLE_RATE
        tokens, reason = speech.tokenize_or_reason(wav)
        if tokens is None:
            return skip("too_long" if reason.startswith("longer") else "too_short", reason)
        if not tokens:
            return skip("no_speech_tokens")
    emb = None
    if _STATE["embeddings"]:
        if it.embedding is not None:
            emb = it.embedding
        elif _STATE["spk"] is not None and wav is not None and wav.size >= 400:
            emb = _STATE["spk"].embed(wav).tolist()
        else:
            return skip("too_short", "too short for a speaker embedding")
    utt = {"utt": it.utt, "text_tokens": text_tokens, "speech_tokens": [int(t) for t in tokens],
           "text": text, "spk": it.spk}
    return {"utt": it.utt, "ok": True, "utterance": utt, "seconds": seconds, "embedding": emb}


def _process_chunk(task: tuple) -> tuple:
    if "init_error" in _STATE:  # this worker could not start: stop the run (see _pool_worker_init)
        from mamtra_cli.errors import UserError

        raise UserError(_STATE["init_error"])
    shard_id, items = task
    out = []
    for it in items:
        try:
            out.append(_process_item(it))
        except Exception as e:  # one odd file must not end a long run; it is counted and logged
            out.append({"utt": it.utt, "ok": False, "reason": "error", "detail": f"{type(e).__name__}: {e}"})
    return shard_id, out


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------

def prepare(source: str, input: Path, out: Path, assets: Optional[Path] = None, tokenizer_dir: Optional[Path] = None,
            speech_tokenizer: Optional[Path] = None, campplus: Optional[Path] = None, embeddings: bool = False,
            normalize_text: bool = True, jobs: int = 1, shard_size: int = 1000, val_fraction: float = 0.05,
            seed: int = 0, force: bool = False, *, console=None) -> dict:
    """Tokenize the corpus `input` (layout `source`: libritts, kaldi, cosyvoice-parquet or seedtts) into
    train/val JSONL shards in `out`; returns the summary (utterances, hours, speakers, shards, skips).

    The front end is CosyVoice 2's: the Qwen2 text tokenizer (`tokenizer_dir`, default
    ASSETS/CosyVoice-BlankEN) and speech_tokenizer_v2.onnx (`speech_tokenizer`, default in `assets`), and
    campplus.onnx with `embeddings` (giving `campplus` turns them on). `normalize_text` False only collapses
    whitespace, as CosyVoice's recipes do. `val_fraction` of the speakers (drawn with `seed`) go to val.
    `console` (rich) takes progress and skip messages; default stderr. Bad input raises UserError.
    """
    from rich.console import Console

    from mamtra_cli.checkpoints import (check_writable_parent, file_fingerprint, replace_dir, run_manifest,
                                        write_json_atomic)
    from mamtra_cli.errors import UserError
    from mamtra_cli.frontend.text import NORMALIZATION_VERSION, TextTokenizer

    console = console or Console(stderr=True, highlight=False, soft_wrap=True)  # no 80-column wrap in logs
    t_start = time.time()

    # ---- whole-run checks: nothing is written before these pass ----
    if source not in SOURCES:
        raise UserError(f"Unknown --source {source!r}; choose one of {', '.join(SOURCES)}.")
    if jobs < 1 or shard_size < 1:
        raise UserError("--jobs and --shard-size must be at least 1.")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1).")
    input = Path(input)
    if not input.exists():
        raise UserError(f"Input {input} does not exist; pass the corpus with --input.")
    if assets is not None and not Path(assets).is_dir():
        raise UserError(f"--assets {assets} is not a directory; pass the CosyVoice2-0.5B model folder.")
    tokenizer_dir = tokenizer_dir or (Path(assets) / "CosyVoice-BlankEN" if assets else None)
    if tokenizer_dir is None:
        raise UserError("No text tokenizer: pass --assets COSYVOICE_DIR or --tokenizer-dir.")
    explicit_speech = speech_tokenizer is not None
    speech_tokenizer = speech_tokenizer or (Path(assets) / "speech_tokenizer_v2.onnx" if assets else None)
    if campplus is not None:
        embeddings = True
    campplus = campplus or (Path(assets) / "campplus.onnx" if assets else None)
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"The parent directory of --out ({out.parent}) does not exist; create it first.")
    if out.exists() and not out.is_dir():
        raise UserError(f"Output {out} exists and is not a directory; remove it or choose another --out.")
    check_writable_parent(out)

    text_tok = TextTokenizer.from_dir(tokenizer_dir)

    with console.status("listing utterances"):
        items = list_source(source, input)

    needs_tokenizer = any(it.tokens is None and not it.skip for it in items)
    needs_audio_for_emb = embeddings and any(it.embedding is None and not it.skip for it in items)
    if needs_tokenizer or explicit_speech:
        if speech_tokenizer is None:
            raise UserError("No speech tokenizer: pass --assets COSYVOICE_DIR or --speech-tokenizer FILE.")
        if not Path(speech_tokenizer).is_file():
            raise UserError(f"Speech tokenizer model {speech_tokenizer} does not exist; pass "
                            "speech_tokenizer_v2.onnx with --speech-tokenizer or --assets.")
    if needs_audio_for_emb and (campplus is None or not Path(campplus).is_file()):
        raise UserError(f"Speaker model {campplus or 'campplus.onnx'} does not exist; pass campplus.onnx with "
                        "--campplus or --assets, or drop --embeddings.")
    if source == "cosyvoice-parquet" and embeddings and needs_audio_for_emb:
        items = attach_parquet_audio(items, input)

    with console.status("fingerprinting tokenizers"):
        text_fp = text_tok.fingerprint()
        if speech_tokenizer is not None and Path(speech_tokenizer).is_file():
            fp = file_fingerprint(Path(speech_tokenizer))
            speech_fp = {"name": Path(speech_tokenizer).name, "sha256": fp["sha256"], "bytes": fp["bytes"]}
        else:
            speech_fp = {"name": "precomputed in cosyvoice-parquet", "sha256": None}
            console.print("mamtra prepare: warning: the parquet speech tokens come with no speech tokenizer file; "
                          "the manifests cannot prove which tokenizer made them (pass --speech-tokenizer).")
        camp_fp = None
        if embeddings and campplus is not None and Path(campplus).is_file():
            fp = file_fingerprint(Path(campplus))
            camp_fp = {"name": Path(campplus).name, "sha256": fp["sha256"], "bytes": fp["bytes"]}

    common_key = {"version": PLAN_VERSION, "source": source, "text_tokenizer": text_fp,
                  "speech_tokenizer": speech_fp, "campplus": camp_fp if embeddings else None,
                  "normalization": NORMALIZATION_VERSION if normalize_text else "whitespace-only"}
    val_spk = split_speakers([it.spk for it in items], val_fraction, seed)
    shards = plan_shards(items, val_spk, shard_size, common_key)
    plan_key = hashlib.sha256(json.dumps([sh.key for sh in shards]).encode()).hexdigest()

    # ---- an identical finished output: nothing to do ----
    if out.exists() and not force:
        try:
            old = json.loads((out / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if (old and old.get("stage") == "prepare" and old.get("parameters", {}).get("plan_key") == plan_key
                and all(shard_done(out, sh, embeddings) for sh in shards)):
            summary = dict(old.get("metrics", {}))
            summary.update(out=str(out), shards={"written": 0, "reused": len(shards)}, up_to_date=True)
            return summary
        raise UserError(f"Output {out} already exists and was made from other inputs or settings; "
                        "choose another --out or pass --force to replace it.")

    work = out.with_name(f".{out.name}.partial")
    try:
        work.mkdir(exist_ok=True)
        for split in ("train", "val"):
            (work / split).mkdir(exist_ok=True)
        # Keep finished shards that still match; drop anything else (stale shards, temp files).
        done: dict[str, dict] = {}
        wanted = set()
        for sh in shards:
            wanted.add((sh.split, sh.name))
            h = shard_done(work, sh, embeddings)
            if h is not None:
                done[f"{sh.split}/{sh.name}"] = h
        for split in ("train", "val"):
            for f in (work / split).iterdir():
                stem = f.name.split(".")[0] if not f.name.startswith(".") else None
                if stem is None or (split, stem) not in wanted or f"{split}/{stem}" not in done:
                    f.unlink()
        todo = [sh for sh in shards if f"{sh.split}/{sh.name}" not in done]

        header_base = {"text_tokenizer": text_fp, "speech_tokenizer": speech_fp}
        cfg = {"tokenizer_dir": str(tokenizer_dir),
               "speech_tokenizer": str(speech_tokenizer) if needs_tokenizer else None,
               "campplus": str(campplus) if needs_audio_for_emb else None,
               "embeddings": bool(embeddings), "normalize_text": bool(normalize_text)}
        n_todo = sum(len(sh.items) for sh in todo)
        t_work = time.time()
        _run_shards(todo, work, cfg, jobs, header_base, source, embeddings, console)
        work_seconds = time.time() - t_work

        # ---- summary over every shard (reused ones included) ----
        summary = summarize(work, shards, val_spk, items)
        summary["shards"] = {"written": len(todo), "reused": len(shards) - len(todo)}
        summary["processed_utterances"] = n_todo
        summary["processing_seconds"] = round(work_seconds, 3)
        summary["utterances_per_second"] = round(n_todo / work_seconds, 2) if work_seconds > 0 and n_todo else None
        summary["jobs"] = jobs
        outputs = {split: sorted(f"{split}/{sh.name}.jsonl" for sh in shards if sh.split == split)
                   for split in ("train", "val")}
        manifest = run_manifest(
            "prepare",
            inputs={"input": str(input.resolve()), "source": source, "text_tokenizer": text_fp,
                    "speech_tokenizer": speech_fp, "campplus": camp_fp},
            parameters={"shard_size": shard_size, "val_fraction": val_fraction, "seed": seed,
                        "embeddings": embeddings, "normalize_text": normalize_text, "jobs": jobs,
                        "plan_key": plan_key},
            outputs={**outputs, "val_speakers": sorted(val_spk)},
            metrics={k: v for k, v in summary.items() if k not in ("shards",)},
            seed=seed,
            elapsed_seconds=round(time.time() - t_start, 3),
        )
        write_json_atomic(work / "manifest.json", manifest)
        for split in ("train", "val"):
            if not any((work / split).iterdir()):
                (work / split).rmdir()
        # Exclusive unless --force: an --out another run published meanwhile is not replaced (the work stays in
        # OUT.partial, so a re-run with --force reuses every finished shard).
        replace_dir(work, out, force=force)
        summary["out"] = str(out)
        return summary
    except BaseException:
        # `.OUT.partial/` is the resumable state of an interrupted run: worth keeping only when it holds a
        # finished shard. A run that failed before finishing any (a front-end model that does not load, a bad
        # first file, Ctrl-C in the first minutes) leaves nothing behind.
        if work.is_dir() and not has_finished_shard(work):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _run_shards(todo: list[Shard], work: Path, cfg: dict, jobs: int, header_base: dict, source: str,
                embeddings: bool, console) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    if not todo:
        return
    tasks = []
    for i, sh in enumerate(todo):
        for start in range(0, len(sh.items), CHUNK):
            tasks.append((i, sh.items[start:start + CHUNK]))
        if not sh.items:
            tasks.append((i, []))
    remaining = {i: len(sh.items) for i, sh in enumerate(todo)}
    total = sum(remaining.values())
    t0 = time.time()

    def finish(i: int) -> None:
        sh = todo[i]
        _write_shard(work, sh, header_base, source, embeddings)

    progress = Progress(TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("utts"),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not console.is_terminal, transient=False)
    with progress:
        bar = progress.add_task("prepare", total=total, rate="")

        def consume(result):
            i, outs = result
            sh = todo[i]
            for r in outs:
                if not r["ok"]:
                    detail = f": {r['detail']}" if r.get("detail") else ""
                    console.print(f"mamtra prepare: skip {r['utt']} ({r['reason']}){detail}", markup=False)
            sh.results.extend(outs)
            remaining[i] -= len(outs)
            done_n = total - sum(remaining.values())
            rate = done_n / max(time.time() - t0, 1e-9)
            progress.update(bar, advance=len(outs), rate=f"{rate:.1f} utt/s")
            if remaining[i] == 0:
                finish(i)

        if jobs == 1:
            import torch

            threads = torch.get_num_threads()
            try:
                _worker_init(cfg)
                for t in tasks:
                    consume(_process_chunk(t))
            finally:
                torch.set_num_threads(threads)
                _STATE.clear()
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            # Leaving the `with` (also by the UserError of a worker that could not start) terminates the pool.
            with ctx.Pool(jobs, initializer=_pool_worker_init, initargs=(cfg,)) as pool:
                for result in pool.imap_unordered(_process_chunk, tasks):
                    consume(result)


def _write_shard(work: Path, sh: Shard, header_base: dict, source: str, embeddings: bool) -> None:
    import numpy as np

    from mamtra_cli.data_manifest import ManifestHeader, Utterance, write_manifest

    ok = sorted((r for r in sh.results if r["ok"]), key=lambda r: r["utt"])
    skipped: dict[str, int] = {}
    for r in sh.results:
        if not r["ok"]:
            skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
    stats = {"utterances": len(ok), "seconds": round(sum(r["seconds"] for r in ok), 3),
             "speakers": sorted({r["utterance"]["spk"] for r in ok}), "skipped": skipped}
    header = ManifestHeader(header_base["text_tokenizer"], header_base["speech_tokenizer"],
                            {"shard_key": sh.key, "split": sh.split, "shard": sh.name, "source": source,
                             "stats": stats})
    d = work / sh.split
    if embeddings:
        emb = [r["embedding"] for r in ok]
        arr = np.asarray(emb, dtype=np.float32) if emb else np.zeros((0, 0), np.float32)
        tmp = d / f".{sh.name}.emb.tmp-{os.getpid()}.npz"
        np.savez(tmp, utt=np.asarray([r["utt"] for r in ok], dtype=str), embedding=arr)
        os.replace(tmp, d / f"{sh.name}.emb.npz")
    # The .jsonl goes last: its presence (with the right key) marks the shard finished.
    write_manifest(d / f"{sh.name}.jsonl", header,
                   (Utterance(**r["utterance"]) for r in ok))
    sh.results = []


def format_summary(summary: dict) -> str:
    """The summary `prepare` returns, as the lines `mamtra prepare` prints (tab-separated)."""
    u, h, s = summary["utterances"], summary["hours"], summary["speakers"]
    lines = [
        f"output\t{summary.get('out')}",
        f"utterances\t{u['total']} (train {u['train']}, val {u['val']})",
        f"hours\t{h['total']:.3f} (train {h['train']:.3f}, val {h['val']:.3f})",
        f"speakers\ttrain {s['train']}, val {s['val']}",
        f"shards\t{summary['shards']['written']} written, {summary['shards']['reused']} reused"
        + (" (up to date)" if summary.get("up_to_date") else ""),
    ]
    if summary.get("utterances_per_second"):
        lines.append(f"speed\t{summary['utterances_per_second']:.1f} utterances/s with {summary.get('jobs')} job(s)")
    sk = summary.get("skipped", {})
    lines.append(f"skipped\t{summary.get('skipped_total', 0)}" +
                 ("" if not sk else " (" + ", ".join(f"{k} {v}" for k, v in sk.items()) + ")"))
    return "\n".join(lines)

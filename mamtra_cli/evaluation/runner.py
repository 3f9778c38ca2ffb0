"""`evaluate`: speak every row of an evaluation list with each system, then score it: WER, SIM, and CE.
`evaluate_list` is `mamtra eval`: it loads the list, the recogniser and the speaker model from their names and
calls `evaluate` with a progress display.

A *system* is one row of the report:
  - a model (`--model`): anything `mamtra synth --model` accepts (`mini`, a bundle, a mini voice or hybrid,
    an LM with --assets); row i of the list is spoken with sampling seed `seed + i`, prompted with the row's
    prompt recording and transcript (zero-shot);
  - existing audio (`--wavs DIR`): UTT.wav for every row (e.g. `mamtra synth --list` output, or a ground truth);
  - the ground truth of the list (its fifth field, or espeak-ng for the built-in mini list);
  - the mini codec's resynthesis of that ground truth (encode to 25 Hz tokens, decode with the recording's own
    statistics): the ceiling that any mini-family model can reach.
Every utterance is transcribed by one ASR (`mamtra_cli.evaluation.asr`), scored against the row's text with
one normaliser (`mamtra_cli.evaluation.wer`), and compared with its prompt by one speaker embedder
(`mamtra_cli.evaluation.speaker`). CE of a model on a token manifest (`--data`) comes from `scoring`, twice:
on the manifest's utterances as they are, and *prompted* — each list row whose utterance and prompt recording
are both in the manifest, scored as a zero-shot request meets it ([prompt text ++ text, prompt speech ++ the
row's speech], the prompt read but not scored). Every request is prompted, and a hybrid can be within 1 % of
its teacher on the first and 11 % behind on the second, which is the one that tracks WER.

The output directory is resumable: every finished utterance is one line of `utterances.jsonl` (appended and
flushed as it finishes), keyed by what determines it (system fingerprint, seed, text, prompt, ASR, normaliser,
speaker model); a second run with the same --out reuses matching lines and redoes the rest. A lock file keeps
two runs out of one directory. `summary.json` and the PNGs are rewritten atomically at the end.

    out/utterances.jsonl   per utterance: system, utt, text, hypothesis, errors, WER, SIM, durations, seed, wav
    out/summary.json       per system: WER (mean of utterances, and corpus), SIM, CE, prompted CE, RTF; ASR and
                           SIM named; Pearson r of each CE against WER
    out/wer_sim.png        WER and SIM per system
    out/ce_vs_wer.png      CE and prompted CE against WER with Pearson r (the paper's Fig. 4), when two or more
                           systems have CE
    out/wavs/SYSTEM/UTT.wav   the synthesised (and rendered) audio
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mamtra_cli.errors import UserError
from mamtra_cli.evaluation.lists import EvalList, render_ground_truth
from mamtra_cli.synthesis.references import ListItem

ASR_RATE = 16000
UNINTELLIGIBLE_WER = 0.5  # a row whose mean WER is above this is flagged: most words are not understood
RECORDS_FILE = "utterances.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".eval.lock"


@dataclass
class System:
    name: str  # the row's label
    kind: str  # "model" | "wavs" | "ground-truth" | "codec"
    source: str | None = None  # model spec (for "model") or folder (for "wavs")
    assets: Path | None = None  # --assets for a model that borrows flow/HiFT/codec
    fingerprint: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name).strip("._") or "system"


def parse_systems(models: list[str], wavs: list[str], ground_truth: bool | None, codec: bool,
                  lst: EvalList, assets: Path | None = None, codecs: list[str] = ()) -> list[System]:
    """Rows from the options: --model [NAME=]SPEC, --wavs [NAME=]DIR, the ground truth (None: when the list
    has one and, for a rendered one, espeak-ng is installed), the built-in codec's resynthesis (`codec`) and
    that of other mini codec directories (--codec [NAME=]DIR: codec.yaml + codec.safetensors, e.g. from
    `mamtra build-mini --phase codec`)."""
    from mamtra_cli.mini import is_builtin
    from mamtra_cli.mini.corpus import espeak_path

    systems: list[System] = []

    def split(spec: str, default_name: Callable[[str], str]) -> tuple[str, str]:
        if "=" in spec and not Path(spec).exists():
            name, value = spec.split("=", 1)
            if not name or not value:
                raise UserError(f"{spec!r} must be SPEC or NAME=SPEC.")
            return name, value
        return default_name(spec), spec

    needs_gt_audio = codec or bool(codecs)
    if ground_truth is None:
        ground_truth = lst.has_ground_truth and (not lst.espeak_speakers or espeak_path() is not None)
    if (ground_truth or needs_gt_audio) and not lst.has_ground_truth:
        raise UserError(f"The list {lst.name} has no ground truth (no fifth field gt_wav); drop --ground-truth and "
                        "--codec-resynthesis, or score recordings with --wavs DIR.")
    if (ground_truth or needs_gt_audio) and lst.espeak_speakers and espeak_path() is None:
        raise UserError(f"The ground truth of {lst.name} is rendered by espeak-ng, which is not installed; install "
                        "it (Debian/Ubuntu: `apt-get install espeak-ng`) or pass --no-ground-truth.")
    if ground_truth:
        systems.append(System("ground truth" + (" (espeak-ng)" if lst.espeak_speakers else ""), "ground-truth"))
    if codec:
        systems.append(System("mini codec resynthesis", "codec"))
    for spec in codecs:
        name, value = split(spec, lambda s: f"codec {Path(s).name} resynthesis")
        if not (Path(value) / "codec.yaml").is_file():
            raise UserError(f"--codec {value} is not a mini codec directory (no codec.yaml); pass a mini voice or "
                            "the codec folder of `mamtra build-mini`.")
        systems.append(System(name, "codec", value))
    from mamtra_cli.synthesis.backend import is_bundle

    for spec in models:
        name, value = split(spec, lambda s: s if is_builtin(s) else Path(s).name or s)
        # --assets is for the models that borrow a codec or flow/HiFT; the built-in voice, the shipped hybrids and
        # bundles carry their own, so one --assets serves a mixed row list (`--model mini --model h=DIR --assets mini`)
        self_contained = is_builtin(value) or is_bundle(Path(value))
        systems.append(System(name, "model", value, None if self_contained else assets))
    for spec in wavs:
        name, value = split(spec, lambda s: Path(s).name or s)
        if not Path(value).is_dir():
            raise UserError(f"--wavs {value} is not a directory; pass a folder holding UTT.wav for every row.")
        systems.append(System(name, "wavs", value))
    if not systems:
        raise UserError("Nothing to evaluate: pass --model (a model to synthesise with), --wavs DIR, or keep the "
                        "ground truth.")
    names = [s.name for s in systems]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UserError(f"Two rows are called {dup!r}; name them with NAME=SPEC.")
    return systems


def check_system_inputs(lst: EvalList, systems: list[System], limit: int | None = None,
                        baseline: str | None = None) -> None:
    """Cheap checks before any model loads: `baseline` names one of the systems, and every row has a readable
    UTT.wav in each --wavs folder."""
    import soundfile as sf

    if baseline is not None and baseline not in [s.name for s in systems]:
        raise UserError(f"--baseline {baseline} is not one of the systems evaluated "
                        f"({', '.join(s.name for s in systems)}); give one of their names.")

    items = lst.items[:limit] if limit else lst.items
    for system in systems:
        if system.kind != "wavs":
            continue
        folder = Path(system.source)
        for i, it in enumerate(items):
            path = folder / f"{it.utt}.wav"
            if not path.is_file():
                raise UserError(f"--wavs {folder} has no {it.utt}.wav for row {i + 1} of {lst.name}; every row needs "
                                "one (make them with `mamtra synth --list`).")
            try:
                sf.info(str(path))
            except Exception:
                raise UserError(f"{path} is not readable audio; replace it or remove it from --wavs {folder}.") from None


def _dir_fingerprint(path: Path) -> str:
    """sha256 over the names, sizes and first 16 MiB of the weight and config files of a model directory (or of
    one weights file): enough to tell two models apart without hashing gigabytes."""
    from mamtra_cli.checkpoints import file_fingerprint

    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt", ".yaml", ".onnx", ".json")
        and p.name != "manifest.json")
    h = hashlib.sha256()
    for f in files:
        fp = file_fingerprint(f, limit_bytes=16 << 20)
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{fp['bytes']}:{fp['sha256']}\n".encode())
    return h.hexdigest()


def _fingerprint(system: System) -> dict:
    from mamtra_cli.mini import BUILTIN_DIR, mini_dir

    if system.kind == "model":
        src = mini_dir(system.source)
        fp = {"model": system.source, "sha256": _dir_fingerprint(src) if src.exists() else None}
        if system.assets is not None:
            fp["assets"] = str(system.assets)
        return fp
    if system.kind == "wavs":
        return {"wavs": str(Path(system.source).resolve())}
    if system.kind == "codec":
        folder = Path(system.source) if system.source else BUILTIN_DIR
        return {"codec": _dir_fingerprint(folder / "codec.safetensors"),
                "codec_yaml": _dir_fingerprint(folder / "codec.yaml")}
    import subprocess

    from mamtra_cli.mini.corpus import espeak_path

    exe = espeak_path()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip() if exe else None
    return {"ground_truth": "list", "espeak_ng": version}


class _Lock:
    """An exclusive lock file in the output directory (O_EXCL); a lock left by a dead process is taken over."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                except PermissionError:
                    pass
                raise UserError(f"Another `mamtra eval` (pid {pid}) is writing {self.path.parent}; wait for it or "
                                "choose another --out.") from None
        raise UserError(f"Cannot lock {self.path.parent}; remove {self.path} if no evaluation is running.")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def read_records(path: Path) -> list[dict]:
    """Finished utterances of an earlier run; a torn last line (a killed run) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "key" in rec and "utt" in rec:
            out.append(rec)
    return out


def _to_asr_rate(wav: np.ndarray, sr: int) -> np.ndarray:
    import soxr

    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    return wav if sr == ASR_RATE or wav.size == 0 else soxr.resample(wav, sr, ASR_RATE).astype(np.float32)


def pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1])


def evaluate(lst: EvalList, systems: list[System], out: Path, asr, speaker_model=None, normalizer_name: str | None = None,
             data: Path | None = None, seed: int = 0, limit: int | None = None, max_tokens: int | None = None,
             baseline: str | None = None, log: Callable[[str], None] = lambda m: None,
             progress: Callable[[str, int, int], None] = lambda name, done, total: None) -> dict:
    """Evaluate every system on the first `limit` rows of `lst` into `out` (see the module docstring) and return
    the summary (also written to out/summary.json). `baseline` (a system's name): every other system's WER is
    also given as its difference from that system's on the same rows, with a paired-bootstrap 95 % interval
    (`wer.paired_bootstrap`)."""
    from mamtra_cli.checkpoints import write_json_atomic
    from mamtra_cli.evaluation.speaker import cosine
    from mamtra_cli.evaluation.wer import normalizer, summarize, word_errors
    from mamtra_cli.frontend.audio import load_audio

    items = lst.items[: limit] if limit else lst.items
    check_system_inputs(lst, systems, limit, baseline)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose a folder for the evaluation.")
    out.mkdir(parents=True, exist_ok=True)
    norm_name = normalizer_name or asr.normalizer
    normalize = normalizer(norm_name)
    asr_info, sim_info = asr.describe(), (speaker_model.describe() if speaker_model is not None else None)
    # CE covers the whole manifest and prompted CE every row of the list, whatever --limit (like `mamtra score`)
    ce_by_system = _cross_entropy(systems, data, lst.items, log) if data is not None else {}

    with _Lock(out):
        records_path = out / RECORDS_FILE
        old = {(r["key"], r["utt"]): r for r in read_records(records_path)}
        prompt_embeddings: dict[str, np.ndarray] = {}
        batch_size = max(1, int(getattr(asr, "batch_size", 1)))

        def prompt_embedding(ref: Path) -> np.ndarray:
            from mamtra_cli.frontend.audio import load_audio

            if str(ref) not in prompt_embeddings:
                prompt_embeddings[str(ref)] = speaker_model.embed(load_audio(ref, ASR_RATE))
            return prompt_embeddings[str(ref)]
        summaries = []
        row_wers: dict[str, list[float]] = {}  # system → per-utterance WER in list order (for --baseline)
        with open(records_path, "a", encoding="utf-8") as sink, ThreadPoolExecutor(max_workers=1) as scorer:
            for system in systems:
                system.fingerprint = _fingerprint(system)
                key_src = json.dumps({"system": system.fingerprint, "seed": seed, "max_tokens": max_tokens, "asr": asr_info,
                                      "normalizer": norm_name, "sim": sim_info}, sort_keys=True)
                key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
                done = [old[(key, it.utt)] for it in items if (key, it.utt) in old
                        and old[(key, it.utt)].get("text") == it.text and old[(key, it.utt)].get("prompt_wav") == str(it.ref)]
                done_utts = {r["utt"] for r in done}
                todo = [(i, it) for i, it in enumerate(items) if it.utt not in done_utts]
                if done:
                    log(f"{system.name}: {len(done)} of {len(items)} utterances reused from {records_path}")
                records = {r["utt"]: r for r in done}
                progress(system.name, len(done), len(items))
                if todo:
                    wav_dir = out / "wavs" / system.slug
                    produce = _producer(system, lst, wav_dir, seed, max_tokens)
                    pending: list[Future] = []

                    def score_batch(batch: list[tuple[int, ListItem, np.ndarray, dict]]) -> None:
                        hyps = asr.transcribe([wav16 for _, _, wav16, _ in batch])
                        for (i, it, wav16, made), hyp in zip(batch, hyps):
                            errs = word_errors(it.text, hyp, normalize)
                            rec = {"key": key, "system": system.name, "utt": it.utt, "index": i, "text": it.text,
                                   "hypothesis": hyp, "ref_normalized": normalize(it.text),
                                   "hyp_normalized": normalize(hyp), "substitutions": errs.substitutions,
                                   "deletions": errs.deletions, "insertions": errs.insertions,
                                   "ref_words": errs.ref_words, "wer": errs.wer, "sim": None,
                                   "prompt_wav": str(it.ref), "prompt_text": it.prompt_text, **made}
                            if speaker_model is not None and wav16.size:
                                rec["sim"] = cosine(prompt_embedding(it.ref), speaker_model.embed(wav16))
                            sink.write(json.dumps(rec) + "\n")
                            sink.flush()
                            records[it.utt] = rec
                        progress(system.name, len(records), len(items))

                    # Synthesis runs on this thread while the previous batch is transcribed on the scorer thread:
                    # torch and CTranslate2 both release the GIL, so the two overlap on two cores.
                    batch: list = []
                    for i, it in todo:
                        made = produce(i, it)
                        # Scored as written (16-bit, clipped): the file on disk is what anyone can check again.
                        batch.append((i, it, load_audio(made["wav"], ASR_RATE), made))
                        if len(batch) >= batch_size:
                            pending.append(scorer.submit(score_batch, batch))
                            batch = []
                            while len(pending) > 1:
                                pending.pop(0).result()
                    if batch:
                        pending.append(scorer.submit(score_batch, batch))
                    for f in pending:
                        f.result()
                rows = [records[it.utt] for it in items]
                row_wers[system.name] = [r["wer"] for r in rows]
                summary = _summarize_system(system, rows, summarize, ce_by_system.get(system.name, {}))
                log(f"{system.name}: WER {summary['wer']:.3f}" + (f", SIM {summary['sim']:.3f}" if summary["sim"] is not None else "")
                    + (f", CE {summary['ce']:.3f}" if summary.get("ce") is not None else ""))
                summaries.append(summary)

        if baseline is not None:
            from mamtra_cli.evaluation.wer import paired_bootstrap

            for s in summaries:
                if s["name"] != baseline and items:
                    s["wer_vs_baseline"] = {"baseline": baseline,
                                            **paired_bootstrap(row_wers[s["name"]], row_wers[baseline], seed=seed)}
        ce_points = [(s["ce"], s["wer"]) for s in summaries if s.get("ce") is not None and s["wer"] is not None]
        pce_points = [(s["ce_prompted"], s["wer"]) for s in summaries
                      if s.get("ce_prompted") is not None and s["wer"] is not None]
        result = {
            "list": lst.name, "utterances": len(items), "seed": seed, "max_tokens": max_tokens, "asr": asr_info, "normalizer": norm_name,
            "sim_model": sim_info, "data": str(data) if data is not None else None,
            "wer_definition": "wer = mean of per-utterance WER (Seed-TTS-eval); wer_corpus = all errors / all reference words",
            "unintelligible_above_wer": UNINTELLIGIBLE_WER, "baseline": baseline,
            "systems": summaries,
            "pearson_ce_wer": pearson([c for c, _ in ce_points], [w for _, w in ce_points]),
            "pearson_prompted_ce_wer": pearson([c for c, _ in pce_points], [w for _, w in pce_points]),
            "files": {"utterances": str(records_path), "summary": str(out / SUMMARY_FILE)},
        }
        from mamtra_cli.evaluation.plots import plot_ce_vs_wer, plot_wer_sim

        result["files"]["wer_sim_png"] = str(plot_wer_sim(result, out / "wer_sim.png"))
        if len(ce_points) >= 2:
            result["files"]["ce_vs_wer_png"] = str(plot_ce_vs_wer(result, out / "ce_vs_wer.png"))
        write_json_atomic(out / SUMMARY_FILE, result)
    return result


def _summarize_system(system: System, rows: list[dict], summarize, ce: dict) -> dict:
    """`ce`: {"ce", "ce_prompted"} of a model system ({} when not measured)."""
    from mamtra_cli.evaluation.wer import WordErrors

    errs = [WordErrors(r["substitutions"], r["deletions"], r["insertions"], r["ref_words"], 0) for r in rows]
    s = summarize(errs)
    sims = [r["sim"] for r in rows if r.get("sim") is not None]
    audio = sum(r.get("audio_seconds") or 0.0 for r in rows)
    synth = [r.get("synth_seconds") for r in rows if r.get("synth_seconds") is not None]
    return {
        "name": system.name, "kind": system.kind, "source": system.source, "fingerprint": system.fingerprint,
        "wer": s["wer"], "wer_corpus": s["wer_corpus"], "sim": float(np.mean(sims)) if sims else None,
        "ce": ce.get("ce"), "ce_prompted": ce.get("ce_prompted"), "utterances": s["utterances"], "ref_words": s["ref_words"], "errors": s["errors"],
        "substitutions": s["substitutions"], "deletions": s["deletions"], "insertions": s["insertions"],
        "audio_seconds": round(audio, 3),
        "rtf": round(sum(synth) / audio, 4) if synth and audio else None,
        "unintelligible": s["wer"] is not None and s["wer"] > UNINTELLIGIBLE_WER,
    }


def _producer(system: System, lst: EvalList, wav_dir: Path, seed: int, max_tokens: int | None = None):
    """A function (row index, row) → record fields of the row's audio for one system ("wav": its file,
    "audio_seconds", "seed", "synth_seconds"); audio made here is written to wav_dir/UTT.wav first."""
    from mamtra_cli.synthesis.wavfile import WavWriter

    def save(it: ListItem, wav: np.ndarray, sr: int) -> str:
        wav_dir.mkdir(parents=True, exist_ok=True)
        path = wav_dir / f"{it.utt}.wav"
        with WavWriter(path, sr, force=True) as w:  # a wav of an unfinished earlier run is replaced
            w.write(wav)
        return str(path)

    if system.kind == "wavs":
        folder = Path(system.source)

        def from_wavs(i: int, it: ListItem):
            path = folder / f"{it.utt}.wav"
            if not path.is_file():
                raise UserError(f"--wavs {folder} has no {it.utt}.wav for row {i + 1} of {lst.name}; every row needs "
                                "one (make them with `mamtra synth --list`).")
            import soundfile as sf

            try:
                info = sf.info(str(path))
            except Exception:
                raise UserError(f"{path} is not readable audio; replace it or remove it from --wavs "
                                f"{folder}.") from None
            return {"wav": str(path), "audio_seconds": round(info.frames / info.samplerate, 4), "seed": None}
        return from_wavs

    if system.kind in ("ground-truth", "codec"):
        codec = None
        if system.kind == "codec":
            from mamtra_cli.mini import BUILTIN_DIR
            from mamtra_cli.mini.codec import MiniCodec

            codec = MiniCodec.load(Path(system.source) if system.source else BUILTIN_DIR)

        def from_truth(i: int, it: ListItem):
            got = render_ground_truth(lst, it)
            if got is None:
                raise UserError(f"Row {i + 1} ({it.utt}) of {lst.name} has no ground truth; give every row a gt_wav.")
            wav, sr = got
            t0 = time.perf_counter()
            if codec is not None:
                wav = _to_asr_rate(wav, sr)
                sr = ASR_RATE
                mel, _, stats = codec.features(wav, sr)
                wav = codec.decode(codec.tokens_from_features(mel), stats, seed=seed + i)
                sr = codec.cfg.sample_rate
            spent = time.perf_counter() - t0
            return {"wav": save(it, wav, sr), "audio_seconds": round(wav.size / sr, 4), "seed": seed + i,
                    "synth_seconds": round(spent, 4) if codec is not None else None}
        return from_truth

    from mamtra_cli.synthesis.loading import resolve_backend

    backend = resolve_backend(system.source, system.assets, device="cpu", max_new_tokens=max_tokens)
    prompts: dict[tuple[str, str | None], object] = {}

    def from_model(i: int, it: ListItem):
        t0 = time.perf_counter()
        pkey = (str(it.ref), it.prompt_text)
        if pkey not in prompts:
            prompts[pkey] = backend.prepare_prompt(it.ref, it.prompt_text)
        chunks = list(backend.synthesize(it.text, prompts[pkey], seed=seed + i))
        wav = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        spent = time.perf_counter() - t0
        sr = backend.sample_rate
        return {"wav": save(it, wav, sr), "audio_seconds": round(wav.size / sr, 4), "seed": seed + i,
                "synth_seconds": round(spent, 4)}
    return from_model


def prompted_utterances(items: list[ListItem], utts: list) -> tuple[list, dict[str, int]]:
    """The list's rows as the LM meets them in a zero-shot request: for each row whose utterance and whose
    prompt recording (by file stem) are both in the token manifest, one utterance [prompt text ++ text,
    prompt speech ++ the row's ground-truth speech] and (in the dict) how many leading speech tokens are the
    prompt's, which scoring reads but does not score. Rows without both are left out."""
    from mamtra_cli.data_manifest import Utterance

    by_id = {u.utt: u for u in utts}
    rows, prompt_len = [], {}
    for it in items:
        row, prompt = by_id.get(it.utt), by_id.get(Path(it.ref).stem)
        if row is None or prompt is None or it.prompt_text is None or prompt is row:
            continue
        name = f"prompted_{it.utt}"
        rows.append(Utterance(name, list(prompt.text_tokens) + list(row.text_tokens),
                              list(prompt.speech_tokens) + list(row.speech_tokens), row.text, row.spk))
        prompt_len[name] = len(prompt.speech_tokens)
    return rows, prompt_len


def _cross_entropy(systems: list[System], data: Path, items: list[ListItem], log) -> dict[str, dict]:
    """Teacher-forced CE (CosyVoice's normalisation) of every model system on the token manifest `data`:
    {"ce": on its utterances as they are, "ce_prompted": on the list's rows behind their prompts (the
    continuation only, `prompted_utterances`; None when no row has both in `data`)}."""
    import torch

    from mamtra_cli.data_manifest import read_manifest
    from mamtra_cli.scoring import score_utterances
    from mamtra_cli.teachers import load_teacher

    out = {}
    for s in systems:
        if s.kind != "model":
            continue
        lm, _ = load_teacher(s.source)
        cfg = lm.config
        _, utts = read_manifest(data, text_vocab=cfg.text_vocab_size, speech_vocab=cfg.speech_token_size)
        with torch.inference_mode():
            ce = score_utterances(lm, utts, source=str(data))["ce"]
            prompted, prompt_len = prompted_utterances(items, utts)
            ce_p = (score_utterances(lm, prompted, source=f"{data} behind the list's prompts",
                                     prompt_speech=prompt_len)["ce"] if prompted else None)
        out[s.name] = {"ce": ce, "ce_prompted": ce_p}
        log(f"{s.name}: CE {ce:.4f} on {data} ({len(utts)} utterances)"
            + (f", prompted CE {ce_p:.4f} ({len(prompted)} rows behind their prompts)" if ce_p is not None else ""))
    return out


def format_table(result: dict) -> str:
    """The summary as a Markdown table, with the ASR, normaliser and speaker model named under it."""
    def f(v, digits=3):
        return "n/a" if v is None else f"{v:.{digits}f}"

    base = result.get("baseline")

    def vs(s: dict) -> str:
        d = s.get("wer_vs_baseline")
        if d is None:
            return "(baseline)" if s["name"] == base else "n/a"
        return f"{d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"

    extra = [f"WER − {base} [95 % CI]"] if base else []
    lines = ["| " + " | ".join(["system", "WER", *extra, "WER (corpus)", "SIM", "CE", "prompted CE", "RTF",
                                "utterances", "words"]) + " |",
             "|" + "---|" * (9 + len(extra))]
    for s in result["systems"]:
        flag = " (unintelligible)" if s["unintelligible"] else ""
        cells = [f"{s['name']}{flag}", f(s["wer"]), *([vs(s)] if base else []), f(s["wer_corpus"]), f(s["sim"]),
                 f(s["ce"]), f(s.get("ce_prompted")), f(s["rtf"]), str(s["utterances"]), str(s["ref_words"])]
        lines.append("| " + " | ".join(cells) + " |")
    sim = result["sim_model"]["name"] if result["sim_model"] else "not measured"
    lines += ["", f"list {result['list']} ({result['utterances']} rows) · ASR {result['asr']['name']} · normaliser "
              f"{result['normalizer']} · SIM {sim}" + (f" · CE on {result['data']}" if result["data"] else ""),
              "WER = mean of per-utterance WER (Seed-TTS-eval); WER (corpus) = all errors ÷ all reference words; "
              f"rows above WER {result['unintelligible_above_wer']} are flagged unintelligible"]
    if base:
        lines.append(f"WER − {base}: the mean per-utterance difference on the same rows, 95 % interval from a "
                     "paired bootstrap (10,000 resamples of the rows)")
    if result["data"]:
        lines.append("prompted CE = CE of each row's ground-truth speech tokens behind its own prompt (prompt text and "
                     "speech from the same manifest), as a zero-shot request puts them; the prompt is not scored")
    if result.get("pearson_ce_wer") is not None:
        lines.append(f"Pearson r (CE, WER) = {result['pearson_ce_wer']:.3f}")
    if result.get("pearson_prompted_ce_wer") is not None:
        lines.append(f"Pearson r (prompted CE, WER) = {result['pearson_prompted_ce_wer']:.3f}")
    for k, v in result["files"].items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def evaluate_list(list_spec: str | Path, out: Path, model: list[str] | str = (), wavs: list[str] | str = (),
                  assets: Path | None = None, ground_truth: bool | None = None, codec_resynthesis: bool = False,
                  asr: str = "auto", sim: str = "auto", normalizer: str | None = None, data: str | Path | None = None,
                  limit: int = 0, seed: int = 0, max_tokens: int | None = None, batch_size: int = 1,
                  threads: int = 1, codec: list[str] | str = (), baseline: str | None = None, *,
                  console=None) -> dict:
    """`mamtra eval`: load the list `list_spec` (a Seed-TTS-eval list file, or the built-in `mini-heldout`), the
    recogniser `asr` and the speaker model `sim`, then `evaluate` every system — each `model` ([NAME=]MODEL, as
    `mamtra synth --model`), each `wavs` folder ([NAME=]DIR), the ground truth and, with `codec_resynthesis`,
    the mini codec's resynthesis of it (and that of each other mini codec directory in `codec`) — into `out`. The keyword arguments are the options of `mamtra eval`
    (its --help explains each). Returns the summary (also out/summary.json). `console` (rich) gets the
    progress; default stderr."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mamtra_cli.cli import check_threads
    from mamtra_cli.evaluation.asr import load_asr
    from mamtra_cli.evaluation.lists import load_eval_list
    from mamtra_cli.evaluation.speaker import load_speaker_model
    from mamtra_cli.mini import is_builtin

    console = console or Console(stderr=True, soft_wrap=True)  # a log file gets whole lines, never hard-wrapped ones
    model = [model] if isinstance(model, (str, Path)) else [str(m) for m in model]
    wavs = [wavs] if isinstance(wavs, (str, Path)) else [str(w) for w in wavs]
    assets = None if assets is None else Path(assets)
    data = None if data is None else str(data)
    check_threads(threads)
    torch.set_num_threads(max(1, threads))
    lst = load_eval_list(str(list_spec))
    data_path = None
    if data is not None:
        data_path = lst.data_manifest if data == lst.name and lst.data_manifest else Path(data)
        if not data_path.exists():
            raise UserError(f"--data {data} does not exist; pass a token manifest (JSONL) or the built-in list's name.")
    if assets is not None and not is_builtin(assets) and not assets.is_dir():
        raise UserError(f"--assets {assets} is not a directory; pass mini or a CosyVoice 2 model directory.")
    codec = [codec] if isinstance(codec, (str, Path)) else [str(c) for c in codec]
    systems = parse_systems(model, wavs, ground_truth, codec_resynthesis, lst, assets, codec)
    check_system_inputs(lst, systems, limit or None, baseline)  # before the recogniser loads
    with console.status("loading the recogniser and the speaker model"):
        recogniser = load_asr(asr, threads=max(1, threads), batch_size=batch_size)
        dirs = [Path(a) for a in [assets] if a is not None and not is_builtin(a)]
        dirs += [Path(s.source) for s in systems if s.kind == "model" and not is_builtin(s.source)]
        speaker = load_speaker_model(sim, threads=max(1, threads), candidates=dirs)
    n = min(limit, len(lst.items)) if limit else len(lst.items)
    sim_note = speaker.describe()["name"] if speaker else (
        "not measured (install mamtra[eval] for the GE2E encoder, or pass --sim)" if sim == "auto" else "none")
    console.print(f"{lst.name}: {n} rows × {len(systems)} systems · ASR {recogniser.describe()['name']} · SIM "
                  f"{sim_note}", highlight=False, markup=False)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}
        last_logged: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)
            # Without a terminal the bar is hidden: a line every tenth of the work instead.
            if not console.is_terminal and (done == total or done - last_logged.get(name, 0) >= max(1, total // 10)):
                last_logged[name] = done
                console.print(f"{name}: {done}/{total}", highlight=False)

        result = evaluate(lst, systems, out, recogniser, speaker, normalizer_name=normalizer, data=data_path,
                          seed=seed, limit=limit or None, max_tokens=max_tokens, baseline=baseline,
                          log=lambda m: console.print(m, highlight=False, markup=False), progress=progress)
    return result

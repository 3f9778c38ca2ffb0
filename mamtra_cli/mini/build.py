"""Rebuilding the built-in offline "mini" voice from scratch (corpus → codec → teacher): `build_mini`, the
work of `mamtra build-mini`.

The shipped voice is built in two runs (the README gives the commands):
  a. the defaults: 20,000 training sentences in 8 voices; a k-means codec (512-code codebook over pairs of 50 Hz
     mel frames and a conv decoder) fitted on the first 3,000 of them and used to tokenise all; a 12-layer
     teacher (hidden 128, batch 32, AdamW weight decay 0.05, betas (0.9, 0.98), clip 1.0, 15 % of its input
     speech tokens replaced by random codes) trained in two cosine cycles, 26.5 minutes at peak lr 2.5e-3
     then a warm restart from the best checkpoint for 90 minutes at 1.5e-3, on 2 threads (`threads=2`; the
     default, 0, picks 1 thread for a model this small, which a loaded machine runs faster), validated every
     150 steps on the first 100 training utterances. This was the shipped voice until the FSQ one.
  b. `quantizer="fsq"`, 12 voices, `warm_start=` the output of (a), `cycles=FSQ_WARM_CYCLES`: the learned FSQ
     tokenizer (`mamtra_cli.mini.fsq`: conv encoder/decoder, 3 levels × 8 dims = 6561 codes at 25 Hz, 7000
     steps on the first 3,000 utterances) and a teacher of the same shape started from (a)'s
     (`mamtra_cli.mini.warm_start`: transformer copied, speech tables mapped by code co-occurrence).

Why (Whisper tiny.en WER on the 120-row held-out list; speech itself 0.30): the k-means codec's resynthesis
loses most words (0.74; its teacher 0.78), the FSQ codec keeps most (0.43 with 6561 codes, 0.52 with 729).
But a 12-layer teacher learns FSQ tokens slowly from scratch on 2 cores — 6561 codes at validation CE 7.84
nats (uniform 8.79) after 21 minutes, 729 codes at 4.45 after 15 — where the warm start from the k-means
teacher reached 3.10 on 6561 codes in 80 minutes and speaks the held-out list at WER 0.531.

Phases, each cached in `work` (a phase whose marker records the same parameters is reused, so an
interrupted build resumes; rendering and training are the slow parts):
  1. corpus    espeak-ng speaks the grammar's sentences in `voices` training voices (+ 2 held-out voices for
               the test set and the sample reference)                                   work/corpus/
  2. codec     log-mel features of the first `codec_sentences` training utterances → the FSQ tokenizer
               (or the k-means codebook over frame pairs) → 25 Hz tokens               work/codec/
  3. manifests tokens of every utterance (features computed on the fly, not kept)      work/data/
  4. decoder   k-means only: the codec's conv decoder (centroid mel → normalised log-magnitude), trained on
               the same `codec_sentences` utterances (the FSQ tokenizer decodes itself) work/codec/
  5. teacher   12-layer all-attention SpeechLM on the manifests, one checkpoint per `cycles` cycle (its
               best by validation loss, where the next cycle starts)                    work/teacher/
               With `warm_start`, cycle 1 starts from the donor teacher, its codes mapped by co-occurrence
               on the WARM_MAP_UTTERANCES training utterances after the codec subset.
Output: a model directory (config.yaml, model.safetensors, manifest.json) that also holds text_vocab.json,
codec.yaml, codec.safetensors, sample_voice.wav, sample_voice.txt, demo_distill.jsonl and demo_test.jsonl — the
layout of mamtra_cli/builtin/mini/.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# The k-means voice (the warm start of the shipped one): 26.5 minutes at peak lr 2.5e-3 (150 warm-up steps),
# then a warm restart from that cycle's best weights for 90 minutes at 1.5e-3 (50 warm-up steps; a fresh optimizer).
DEFAULT_CYCLES = "26.5m:2.5e-3:150,90m:1.5e-3:50"
# The shipped FSQ voice, warm-started from a DEFAULT_CYCLES k-means voice: one cycle of 80 minutes at 1.5e-3.
# A warm restart for 30 more minutes at 1e-3 lowered the training voices' validation CE (3.10 → 3.01) but not the
# held-out voices' (5.28 → 5.33; Whisper WER 0.531 → 0.547), so it was not kept.
FSQ_WARM_CYCLES = "80m:1.5e-3:50"
# --toy: two cycles of 15 steps, so that the warm restart is exercised by the smoke test.
TOY_CYCLES = "15:2e-3:5,15:1e-3:5"
TEACHER_WEIGHT_DECAY = 0.05
DEMO_DISTILL = 400  # utterances of `mamtra demo`'s distillation data
KMEANS_ITERS, KMEANS_FRAMES = 25, 150_000
# Warm start: code co-occurrence counted on this many training utterances after the codec subset (about 150,000
# token positions, some 20 per code of a 6561-code tokenizer).
WARM_MAP_UTTERANCES = 2000


def _log(msg: str) -> None:
    print(f"[build-mini] {msg}", file=sys.stderr, flush=True)


def _marker_ok(path: Path, params: dict) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("parameters") == params


def _write_marker(path: Path, params: dict, **extra) -> None:
    path.write_text(json.dumps({"parameters": params, **extra}, indent=1) + "\n")


def _file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _save_weights(module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def _load_weights(module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


def _reuse_module(module, marker: Path, weights: Path, params: dict, name: str, reused: list) -> bool:
    """Load `weights` into `module` (eval mode) if `marker` records `params`; returns whether it did."""
    if not _marker_ok(marker, params):
        return False
    _load_weights(module, weights)
    module.eval()
    _log(f"{name}: reusing")
    reused.append(name)
    return True


# ---------------------------------------------------------------------------------------------- cycles
@dataclass(frozen=True)
class Cycle:
    """One cosine cycle of teacher training: linear warm-up to `peak_lr`, cosine to 10 % of it over the budget
    (minutes of wall clock or optimizer steps, exactly one of them set)."""

    minutes: float | None
    steps: int | None
    peak_lr: float
    warmup: int

    @property
    def budget(self) -> str:
        return f"{self.minutes:g}m" if self.minutes is not None else str(self.steps)

    def describe(self) -> dict:
        return {"budget": self.budget, "peak_lr": self.peak_lr, "warmup": self.warmup}


def parse_cycles(text: str) -> list[Cycle]:
    """'26.5m:2.5e-3:150,90m:1.5e-3:50' → cycles (BUDGET:PEAK_LR:WARMUP, budget `Nm` minutes or `N` steps)."""
    from mamtra_cli.errors import UserError

    cycles = []
    for i, part in enumerate(text.split(","), 1):
        fields = [f.strip() for f in part.split(":")]
        cycle = None
        try:
            if len(fields) == 3:
                budget, lr, warmup = fields
                minutes = float(budget[:-1]) if budget.endswith("m") else None
                cycle = Cycle(minutes, None if minutes is not None else int(budget), float(lr), int(warmup))
        except ValueError:
            pass
        if (cycle is None or not (cycle.minutes is None or (math.isfinite(cycle.minutes) and cycle.minutes > 0))
                or not (cycle.steps is None or cycle.steps > 0)
                or not (math.isfinite(cycle.peak_lr) and cycle.peak_lr > 0) or cycle.warmup < 0):
            raise UserError(f"--cycles {text!r}: cycle {i} ({part.strip()!r}) is not BUDGET:PEAK_LR:WARMUP with a "
                            "positive budget (`26.5m` minutes or `800` steps), a positive peak learning rate "
                            f"and a warm-up of 0 or more steps, e.g. {DEFAULT_CYCLES!r}.")
        cycles.append(cycle)
    return cycles


# ---------------------------------------------------------------------------------------------- codec
def codec_features(codec, corpus_dir: Path, items, log=_log) -> list:
    """Per item: (normalised log-mel (T, n_mels), normalised log-magnitude (T, n_lin)) of its wav."""
    import soundfile as sf

    feats = []
    for i, item in enumerate(items):
        wav, sr = sf.read(str(corpus_dir / item.wav), dtype="float32")
        mel, lin, _ = codec.features(wav, sr)
        feats.append((mel, lin))
        if (i + 1) % 2000 == 0:
            log(f"features: {i + 1}/{len(items)}")
    return feats


def codebook_phase(codec, feats_of_subset, work: Path, params: dict, kmeans_iters: int, kmeans_frames: int,
                   seed: int, reused: list) -> None:
    """Phase 2: k-means over the frame pairs of the codec subset (at most `kmeans_frames` of them, drawn with
    `seed`) → codec.centroids (codebook_size, 2 · n_mels). `feats_of_subset()` gives the subset's features."""
    import torch

    from mamtra_cli.mini.codec import fit_kmeans

    marker, weights = work / "codec" / "codebook.json", work / "codec" / "centroids.safetensors"
    if _marker_ok(marker, params):
        from safetensors.torch import load_file

        codec.centroids = load_file(str(weights))["centroids"]
        _log("codebook: reusing")
        reused.append("codebook")
        return
    pairs = torch.cat([codec.frame_pairs(mel) for mel, _ in feats_of_subset()])
    g = torch.Generator().manual_seed(seed)
    if pairs.shape[0] > kmeans_frames:
        pairs = pairs[torch.randperm(pairs.shape[0], generator=g)[:kmeans_frames]]
    _log(f"codebook: k-means, {codec.cfg.codebook_size} codes over {pairs.shape[0]} frame pairs")
    codec.centroids = fit_kmeans(pairs, codec.cfg.codebook_size, kmeans_iters, seed, log=_log)
    from safetensors.torch import save_file

    save_file({"centroids": codec.centroids.contiguous()}, str(weights))
    _write_marker(marker, params)


def manifests_phase(codec, corpus_dir: Path, work: Path, known_mels: dict, corpus_sha: str, reused: list) -> None:
    """Phase 3: work/data/{train,test}.jsonl with the tokens of every utterance. `known_mels` (utt → mel) saves
    recomputing the codec subset's features; the others are computed one at a time and dropped."""
    import soundfile as sf

    from mamtra_cli.data_manifest import ManifestHeader, Utterance, write_manifest
    from mamtra_cli.mini.corpus import read_corpus_split
    from mamtra_cli.mini.text import CharTokenizer

    params = {"codebook_sha256": codec.fingerprint(), "corpus_sha256": corpus_sha}
    (work / "data").mkdir(exist_ok=True)
    marker = work / "data" / "data.json"
    if _marker_ok(marker, params):
        _log("manifests: reusing")
        reused.append("manifests")
        return
    tok = CharTokenizer()
    header = ManifestHeader(text_tokenizer=tok.describe(),
                            speech_tokenizer={"name": codec.tokenizer_name(),
                                              "sha256": params["codebook_sha256"], "rate_hz": codec.cfg.token_rate})

    def rows(items):
        for i, it in enumerate(items):
            mel = known_mels.get(it.utt)
            if mel is None:
                wav, sr = sf.read(str(corpus_dir / it.wav), dtype="float32")
                mel = codec.features(wav, sr)[0]
            yield Utterance(it.utt, tok.encode(it.text), codec.tokens_from_features(mel), it.text, it.spk)
            if (i + 1) % 2000 == 0:
                _log(f"manifests: {i + 1}/{len(items)}")

    for split in ("train", "test"):
        write_manifest(work / "data" / f"{split}.jsonl", header, rows(read_corpus_split(corpus_dir, split)))
    _write_marker(marker, params)


def decoder_phase(codec, feats_of_subset, work: Path, params: dict, decoder_steps: int, seed: int,
                  reused: list) -> None:
    """Phase 4: codec.decoder, trained on the codec subset (its mel → its linear spectrogram)."""
    from mamtra_cli.mini.codec import CodecDecoder, train_decoder

    marker, weights = work / "codec" / "decoder.json", work / "codec" / "decoder.safetensors"
    codec.decoder = CodecDecoder(codec.cfg)
    if _reuse_module(codec.decoder, marker, weights, params, "decoder", reused):
        return
    feats = feats_of_subset()
    codec.decoder = train_decoder(codec, [m for m, _ in feats], [lin for _, lin in feats], decoder_steps,
                                  seed=seed, log=_log)
    _save_weights(codec.decoder, weights)
    _write_marker(marker, params)


def tokenizer_phase(codec, feats_of_subset, work: Path, params: dict, steps: int, seed: int,
                    reused: list) -> None:
    """Phases 2+4 of an FSQ codec: its encoder/decoder, trained on the codec subset's normalised mel."""
    from mamtra_cli.mini.fsq import train_fsq

    marker, weights = work / "codec" / "fsq.json", work / "codec" / "fsq.safetensors"
    codec.tokenizer = codec.new_tokenizer(codec.cfg)
    if _reuse_module(codec.tokenizer, marker, weights, params, "tokenizer", reused):
        return
    feats = feats_of_subset()
    _log(f"FSQ tokenizer: {codec.cfg.codebook_size} codes ({codec.cfg.fsq_levels} levels × {codec.cfg.fsq_dims} "
         f"dims), {sum(p.numel() for p in codec.tokenizer.parameters()) / 1e6:.2f} M parameters, {steps} steps")
    train_fsq(codec.tokenizer, [m for m, _ in feats], steps, seed=seed, log=_log)
    _save_weights(codec.tokenizer, weights)
    _write_marker(marker, params)


# ---------------------------------------------------------------------------------------------- teacher
def teacher_phase(model, train_utts, val_utts, cycles: list[Cycle], base, ckpt_dir: Path, params: dict,
                  space_id: int, reused: list, init=None) -> list[dict]:
    """Phase 5: the cycles in order, each from the previous one's best weights with a fresh optimizer; cycle
    i's best weights go to ckpt_dir/cycle{i}.safetensors with a marker, so an interrupted build resumes at
    the first unfinished cycle. `base` is the TrainSettings every cycle shares; `init(model)`, if given, sets
    the starting weights of cycle 1 when it is trained (a warm start). Leaves the last cycle's best weights in
    `model`; returns one record per cycle."""
    from dataclasses import replace

    from mamtra_cli.mini.train import train_teacher

    records = []
    retrained = False  # once a cycle is trained anew, the later ones start from other weights
    for i, cycle in enumerate(cycles, 1):
        # A cycle's marker names all cycles up to it: its weights depend on the whole chain.
        cycle_params = {**params, "cycles": [c.describe() for c in cycles[:i]]}
        marker, weights = ckpt_dir / f"cycle{i}.json", ckpt_dir / f"cycle{i}.safetensors"
        if not retrained and _marker_ok(marker, cycle_params):
            _load_weights(model, weights)
            model.eval()
            records.append(json.loads(marker.read_text())["result"])
            _log(f"teacher cycle {i}: reusing")
            reused.append(f"teacher_cycle{i}")
            continue
        budget = f"{cycle.minutes:g} min" if cycle.minutes is not None else f"{cycle.steps} steps"
        _log(f"teacher cycle {i}/{len(cycles)}: {budget} at peak lr {cycle.peak_lr:g}, "
             f"warm-up {cycle.warmup} steps")

        def save_best(m, best, i=i):
            # the best weights so far of the running cycle, in case it is interrupted
            _save_weights(m, ckpt_dir / "best.safetensors")
            (ckpt_dir / "best.json").write_text(json.dumps({"cycle": i, **best}) + "\n")

        if i == 1 and init is not None:
            init(model)
        # Every cycle reuses the seed: the shipped voice's second cycle was a fresh run of the same script
        # (same batch order and noise draws) started from the first cycle's best weights.
        retrained = True
        settings = replace(base, steps=cycle.steps, time_budget_s=cycle.minutes * 60 if cycle.minutes else None,
                           lr=cycle.peak_lr, warmup=cycle.warmup)
        result = train_teacher(model, train_utts, val_utts, settings, space_id=space_id, log=_log,
                               on_best=save_best)
        record = {**cycle.describe(), "steps_run": result["steps_run"], "best": result["best"],
                  "seconds": result["seconds"], "history": result["history"]}
        _save_weights(model, weights)
        _write_marker(marker, cycle_params, result=record)
        records.append(record)
    return records


def warm_start_phase(model, codec, donor_dir: Path, donor_codec, corpus_dir: Path, map_items, val_utts) -> None:
    """Cycle 1's starting weights with --warm-start: count the two codecs' codes on the features of `map_items`,
    then fill `model` from the donor teacher through that map (`mamtra_cli.mini.warm_start`)."""
    import soundfile as sf

    from mamtra_cli.mini.train import evaluate_loss
    from mamtra_cli.mini.warm_start import code_cooccurrence, warm_start

    def mels():
        for it in map_items:
            wav, sr = sf.read(str(corpus_dir / it.wav), dtype="float32")
            yield codec.features(wav, sr)[0]

    _log(f"warm start from {donor_dir}: mapping codes on {len(map_items)} utterances")
    counts = code_cooccurrence(codec, donor_codec, mels(), log=_log)
    warm_start(model, donor_dir, counts)
    seen = int((counts.sum(1) > 0).sum())
    _log(f"warm start: {seen} of {codec.cfg.codebook_size} codes seen; validation loss "
         f"{evaluate_loss(model, val_utts)['loss']:.3f} before training")  # (evaluate_loss leaves it in train mode)


def build_mini(out: Path, work: Path = Path("/tmp/mini_build/work"), sentences: int = 20000, test_sentences: int = 120,
               voices: int = 8, codebook: int = 0, codec_sentences: int = 3000, decoder_steps: int = 1000,
               quantizer: str = "kmeans", fsq_dims: int = 8, tokenizer_steps: int = 7000,
               warm_start: Path | str | None = None, cycles: str = DEFAULT_CYCLES, batch_size: int = 32,
               hidden: int = 128, speech_input_noise: float = 0.15,
               render_jobs: int = 2, threads: int = 0, seed: int = 0, phase: str = "all", toy: bool = False,
               force: bool = False) -> Path | None:
    """Rebuild the mini voice into the model directory `out` (the layout of mamtra_cli/builtin/mini/), caching
    every phase in `work`; returns `out`, or None when `phase` is "codec" or "teacher" (a partial run whose
    results stay in `work` for a final "all" run). `mamtra build-mini --help` explains every parameter.

    Needs espeak-ng on PATH. Progress goes to stderr as `[build-mini] …` lines. Bad values raise UserError.
    """
    import shutil

    import torch

    from mamtra_cli import checkpoints
    from mamtra_cli.data_manifest import read_manifest, write_manifest
    from mamtra_cli.errors import UserError
    from mamtra_cli.mini import corpus as corpus_mod
    from mamtra_cli.mini.codec import CodecConfig, MiniCodec
    from mamtra_cli.mini.text import CharTokenizer
    from mamtra_cli.mini.train import TrainSettings, mini_model_config
    from mamtra_cli.models.speech_lm import SpeechLM

    if phase not in ("all", "codec", "teacher"):
        raise UserError(f"--phase must be all, codec or teacher, not {phase!r}.")
    if toy and cycles == DEFAULT_CYCLES:
        cycles = TOY_CYCLES
    cycle_list = parse_cycles(cycles)
    if codec_sentences < 0:
        raise UserError(f"--codec-sentences must be 0 (all) or more, not {codec_sentences}.")
    if not 0 <= speech_input_noise < 1:
        raise UserError(f"--speech-input-noise must be in [0, 1), not {speech_input_noise}.")
    if corpus_mod.espeak_path() is None:
        raise UserError("espeak-ng is not on PATH; install it (Debian/Ubuntu: `apt-get install espeak-ng`) "
                        "to build the mini voice.")
    if quantizer not in ("fsq", "kmeans"):
        raise UserError(f"--quantizer must be fsq or kmeans, not {quantizer!r}.")
    if toy:
        sentences, test_sentences, voices = min(sentences, 80), min(test_sentences, 6), min(voices, 4)
        codebook = 64 if quantizer == "kmeans" else 0
        decoder_steps, tokenizer_steps, batch_size, hidden = min(decoder_steps, 20), min(tokenizer_steps, 20), 8, 64
    # FSQ: 3 levels in fsq_dims dims (8: 6561 codes, CosyVoice 2's vocabulary); toy: 3 levels in 4 dims = 81 codes.
    # magnitude_power 0.9 for FSQ: its decoded spectra need no sharpening before Griffin-Lim (Whisper WER of the
    # 6561-code codec on 40 held-out rows: 0.47 at the k-means codec's 1.3, 0.39 at 1.0, 0.36 at 0.9, 0.37 at 0.8).
    if not 1 <= fsq_dims <= 10:
        raise UserError(f"--fsq-dims must be between 1 and 10 (3^dims codes), not {fsq_dims}.")
    codec_cfg = (CodecConfig(quantizer="fsq", fsq_dims=4 if toy else fsq_dims, fsq_channels=32 if toy else 192,
                             magnitude_power=0.9)
                 if quantizer == "fsq" else CodecConfig(codebook_size=codebook or 512))
    if quantizer == "fsq":
        codec_cfg.codebook_size = codec_cfg.fsq_levels ** codec_cfg.fsq_dims
        if codebook and codebook != codec_cfg.codebook_size:
            raise UserError(f"--codebook {codebook}: the FSQ tokenizer has {codec_cfg.codebook_size} codes "
                            f"({codec_cfg.fsq_levels} levels × {codec_cfg.fsq_dims} dims); leave --codebook out, "
                            "or pass --quantizer kmeans to choose a k-means codebook size.")
    elif codebook < 0 or codebook == 1:
        raise UserError(f"--codebook must be 2 or more (or 0 for the default 512), not {codebook}.")
    codebook = codec_cfg.codebook_size
    tok = CharTokenizer()
    config = mini_model_config(tok.vocab_size, codebook, hidden=hidden, heads=hidden // 32)
    donor_dir = donor_codec = None
    if warm_start is not None:  # checked now, not after hours of rendering and training
        from mamtra_cli.mini.warm_start import resolve_donor

        donor_dir, donor_codec = resolve_donor(warm_start, config, MiniCodec(codec_cfg))
    if phase == "all":
        checkpoints.check_output_dir(out, force)
    from mamtra_cli.cli import apply_threads

    with torch.device("meta"):  # only counted, to choose the thread count (the rule of `apply_threads`)
        n_params = sum(p.numel() for p in SpeechLM(config).parameters())
    threads = apply_threads(threads, n_params)
    _log(f"{threads} CPU thread(s)")
    t0 = time.time()
    timings = {}
    reused = []  # phases taken from --work instead of being run now (their times are then not this run's)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)

    # 1. corpus
    corpus_dir = work / "corpus"
    marker = corpus_dir / "corpus.json"
    before = marker.stat().st_mtime_ns if marker.is_file() else None
    corpus_mod.build_corpus(corpus_dir, sentences, test_sentences, voices, seed, log=_log, jobs=render_jobs)
    if before is not None and marker.stat().st_mtime_ns == before:
        reused.append("corpus")
    corpus_sha = json.loads(marker.read_text())["sha256"]
    timings["corpus_s"] = round(time.time() - t0, 1)

    # 2.–4. codec: codebook and decoder fitted on the subset, tokens for all
    t = time.time()
    train_items = corpus_mod.read_corpus_split(corpus_dir, "train")
    subset = train_items[:codec_sentences] if codec_sentences else train_items
    n_codec = len(subset)  # the marker records what was used, so 0 and 3000 on 3000 sentences agree
    subset_feats = []  # [(mel (T, n_mels), lin (T, n_lin))] of the subset, computed only when something is fitted

    def feats_of_subset():
        if not subset_feats:
            _log(f"features: {n_codec} codec utterances")
            subset_feats.extend(codec_features(codec, corpus_dir, subset))
        return subset_feats

    codec = MiniCodec(codec_cfg)
    (work / "codec").mkdir(exist_ok=True)
    if codec.is_fsq:  # one network makes and reads the tokens: trained first, whatever the phase
        fsq_params = {"quantizer": "fsq", "levels": codec_cfg.fsq_levels, "dims": codec_cfg.fsq_dims,
                      "channels": codec_cfg.fsq_channels, "steps": tokenizer_steps, "codec_sentences": n_codec,
                      "seed": seed, "corpus_sha256": corpus_sha}
        tokenizer_phase(codec, feats_of_subset, work, fsq_params, tokenizer_steps, seed, reused)
    else:
        codebook_params = {"codebook": codebook, "kmeans_iters": KMEANS_ITERS, "kmeans_frames": KMEANS_FRAMES,
                           "codec_sentences": n_codec, "seed": seed, "corpus_sha256": corpus_sha}
        codebook_phase(codec, feats_of_subset, work, codebook_params, KMEANS_ITERS, KMEANS_FRAMES, seed, reused)
    manifests_phase(codec, corpus_dir, work,
                    {it.utt: mel for it, (mel, _) in zip(subset, subset_feats)}, corpus_sha, reused)
    timings["codebook_s"] = round(time.time() - t, 1)

    t = time.time()
    if codec.is_fsq:
        pass  # the FSQ tokenizer decodes its own tokens: no separate decoder
    elif phase == "teacher":
        _log("decoder: skipped (--phase teacher)")
    else:
        decoder_params = {"decoder_steps": decoder_steps, "seed": seed, "codec_sentences": n_codec,
                          "codebook_sha256": codec.fingerprint()}
        decoder_phase(codec, feats_of_subset, work, decoder_params, decoder_steps, seed, reused)
    subset_feats.clear()
    timings["decoder_s"] = round(time.time() - t, 1)
    if phase == "codec":
        _log("codec phases done (--phase codec)")
        return None

    # 5. teacher
    t = time.time()
    data_header, train_utts = read_manifest(work / "data" / "train.jsonl", tok.vocab_size, codebook)
    # The first 100 utterances (fewer for a small corpus) are the validation set, as for the shipped voice.
    n_val = max(8, min(100, len(train_utts) // 30))
    val_utts, train_utts = train_utts[:n_val], train_utts[n_val:]
    torch.manual_seed(seed)
    model = SpeechLM(config)
    base = TrainSettings(batch_size=batch_size, weight_decay=TEACHER_WEIGHT_DECAY, eval_every=5 if toy else 150,
                         speech_input_noise=speech_input_noise, seed=seed)
    teacher_params = {"batch_size": batch_size, "hidden": hidden, "seed": seed, "weight_decay": base.weight_decay,
                      "concat_prob": base.concat_prob, "speech_input_noise": speech_input_noise,
                      "eval_every": base.eval_every, "val_utterances": n_val,
                      "data_sha256": _file_sha(work / "data" / "train.jsonl")}
    init = None
    if donor_dir is not None:
        map_items = train_items[n_codec:n_codec + WARM_MAP_UTTERANCES] or train_items[:WARM_MAP_UTTERANCES]
        teacher_params["warm_start"] = {"model_sha256": _file_sha(donor_dir / "model.safetensors"),
                                        "codec": donor_codec.fingerprint(), "map_utterances": len(map_items)}
        init = partial(warm_start_phase, codec=codec, donor_dir=donor_dir, donor_codec=donor_codec,
                       corpus_dir=corpus_dir, map_items=map_items, val_utts=val_utts)
    ckpt_dir = work / "teacher"
    ckpt_dir.mkdir(exist_ok=True)
    _log(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
         f"{len(train_utts)} train / {len(val_utts)} val utterances, {len(cycle_list)} cycles")
    cycle_records = teacher_phase(model, train_utts, val_utts, cycle_list, base, ckpt_dir, teacher_params,
                                  tok.index[" "], reused, init=init)
    timings["teacher_s"] = round(time.time() - t, 1)
    if phase == "teacher":
        _log("teacher phase done (--phase teacher)")
        return None

    # 6. assemble the model directory
    test_items = corpus_mod.read_corpus_split(corpus_dir, "test")
    sample = test_items[0]  # spoken by the first held-out voice
    with checkpoints.staged_output(out, force) as tmp:
        tok.save(tmp)
        codec.save(tmp)
        shutil.copyfile(corpus_dir / sample.wav, tmp / "sample_voice.wav")
        (tmp / "sample_voice.txt").write_text(sample.text + "\n")
        # `mamtra demo`'s data: DEMO_DISTILL training utterances drawn with `seed` from the codec subset minus
        # the validation rows (data the teacher saw, as a user's "little data"), and the whole held-out test set.
        pool = train_utts[:max(0, n_codec - n_val)]
        demo = random.Random(seed).sample(pool, min(DEMO_DISTILL, len(pool)))
        write_manifest(tmp / "demo_distill.jsonl", data_header, demo)
        test_header, test_utts = read_manifest(work / "data" / "test.jsonl", tok.vocab_size, codebook)
        write_manifest(tmp / "demo_test.jsonl", test_header, test_utts)
        manifest = checkpoints.run_manifest(
            "build-mini", inputs={"corpus": {"path": str(corpus_dir), "sha256": corpus_sha},
                                  **({"warm_start": {"path": str(donor_dir),
                                                     "sha256": teacher_params["warm_start"]["model_sha256"]}}
                                     if donor_dir is not None else {})},
            parameters={"sentences": sentences, "test_sentences": test_sentences, "voices": voices,
                        "quantizer": quantizer, "codebook": codebook, "codec_sentences": n_codec,
                        **({"tokenizer_steps": tokenizer_steps, "fsq_levels": codec_cfg.fsq_levels,
                            "fsq_dims": codec_cfg.fsq_dims, "fsq_channels": codec_cfg.fsq_channels}
                           if codec.is_fsq else {"kmeans_iters": KMEANS_ITERS, "kmeans_frames": KMEANS_FRAMES,
                                                 "decoder_steps": decoder_steps}),
                        "warm_start": teacher_params.get("warm_start"), "cycles": cycles,
                        "batch_size": batch_size, "hidden": hidden, "layers": config.num_layers,
                        "weight_decay": base.weight_decay, "adam_betas": [0.9, 0.98], "grad_clip": 1.0,
                        "concat_prob": base.concat_prob, "speech_input_noise": speech_input_noise,
                        "eval_every": base.eval_every, "val_utterances": n_val, "threads": threads, "toy": toy},
            outputs={"text_vocab": "text_vocab.json", "codec": ["codec.yaml", "codec.safetensors"],
                     "demo_data": {"demo_distill.jsonl": f"{len(demo)} training utterances (random, seed {seed}, "
                                   f"from the first {n_codec} minus the {n_val} validation rows)",
                                   "demo_test.jsonl": f"the {len(test_utts)} held-out test utterances "
                                   "(held-out voices)"},
                     "sample_voice": {"wav": "sample_voice.wav", "text": sample.text, "spk": sample.spk}},
            metrics={"teacher": cycle_records[-1]["best"], "teacher_cycles": cycle_records,
                     "teacher_steps_run": sum(r["steps_run"] for r in cycle_records), "timings": timings,
                     "phases_reused": reused, "total_s": round(time.time() - t0, 1)},
            seed=seed, text_tokenizer=tok.describe())
        checkpoints.save_model_dir(tmp, config, model.state_dict(), manifest)
    _log(f"done in {time.time() - t0:.0f} s")
    return Path(out)

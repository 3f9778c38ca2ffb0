"""`mamtra build-mini`: rebuild the built-in offline "mini" voice from scratch (corpus → codec → teacher).

    mamtra build-mini --out /tmp/mini_build/mini               # the shipped size (see --help for the time)
    mamtra build-mini --out /tmp/mini_toy --toy                 # toy size, < 2 minutes: a smoke test

Phases, each cached in --work (a phase whose marker records the same parameters is reused, so an
interrupted build resumes; rendering and training are the slow parts):
  1. corpus   espeak-ng speaks the grammar's sentences in --voices training voices (+ 2 held-out voices for
              the test set and the sample reference)                                    work/corpus/
  2. codebook log-mel features, k-means over frame pairs → 25 Hz tokens; data manifests  work/codec/, work/data/
  3. decoder  the codec's conv decoder (centroid mel → normalised log-magnitude)         work/codec/
  4. teacher  12-layer all-attention SpeechLM on the manifests (best val checkpoint)     work/teacher/
Output: a model directory (config.yaml, model.safetensors, manifest.json) that also holds text_vocab.json,
codec.yaml, codec.safetensors, sample_voice.wav and sample_voice.txt — the layout of
mamtra_cli/builtin/mini/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer


def _log(msg: str) -> None:
    typer.echo(f"[build-mini] {msg}", err=True)


def _marker_ok(path: Path, params: dict) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("parameters") == params


def _write_marker(path: Path, params: dict, **extra) -> None:
    path.write_text(json.dumps({"parameters": params, **extra}, indent=1) + "\n")


def fit_codebook_phase(corpus_dir: Path, work: Path, codebook: int, kmeans_iters: int, kmeans_frames: int,
                       seed: int, corpus_sha: str, reused: list | None = None):
    """Phase 2: features of every utterance, k-means codebook, token manifests. Returns (codec, features)."""
    import soundfile as sf
    import torch

    from mamtra_cli.data_manifest import ManifestHeader, Utterance, write_manifest
    from mamtra_cli.mini.codec import CodecConfig, MiniCodec, fit_kmeans
    from mamtra_cli.mini.corpus import read_corpus_split
    from mamtra_cli.mini.text import CharTokenizer

    cfg = CodecConfig(codebook_size=codebook)
    codec = MiniCodec(cfg)
    feats = {}
    for split in ("train", "test"):
        for item in read_corpus_split(corpus_dir, split):
            wav, sr = sf.read(str(corpus_dir / item.wav), dtype="float32")
            mel, lin, _ = codec.features(wav, sr)
            feats[item.utt] = (mel, lin)
    params = {"codebook": codebook, "kmeans_iters": kmeans_iters, "kmeans_frames": kmeans_frames, "seed": seed,
              "corpus_sha256": corpus_sha}
    (work / "codec").mkdir(parents=True, exist_ok=True)
    marker = work / "codec" / "codebook.json"
    if _marker_ok(marker, params):
        from safetensors.torch import load_file

        codec.centroids = load_file(str(work / "codec" / "centroids.safetensors"))["centroids"]
        _log("codebook: reusing")
        if reused is not None:
            reused.append("codebook")
    else:
        train_utts = [it.utt for it in read_corpus_split(corpus_dir, "train")]
        pairs = torch.cat([codec.frame_pairs(feats[u][0]) for u in train_utts])
        g = torch.Generator().manual_seed(seed)
        if pairs.shape[0] > kmeans_frames:
            pairs = pairs[torch.randperm(pairs.shape[0], generator=g)[:kmeans_frames]]
        _log(f"codebook: k-means, {codebook} codes over {pairs.shape[0]} frame pairs")
        codec.centroids = fit_kmeans(pairs, codebook, kmeans_iters, seed, log=_log)
        from safetensors.torch import save_file

        save_file({"centroids": codec.centroids.contiguous()}, str(work / "codec" / "centroids.safetensors"))
        _write_marker(marker, params)

    tok = CharTokenizer()
    header = ManifestHeader(text_tokenizer=tok.describe(),
                            speech_tokenizer={"name": f"mini-codec-kmeans{codebook}",
                                              "sha256": _tensor_sha(codec.centroids), "rate_hz": cfg.token_rate})
    (work / "data").mkdir(exist_ok=True)
    for split in ("train", "test"):
        rows = [Utterance(it.utt, tok.encode(it.text), codec.tokens_from_features(feats[it.utt][0]), it.text, it.spk)
                for it in read_corpus_split(corpus_dir, split)]
        write_manifest(work / "data" / f"{split}.jsonl", header, rows)
    return codec, feats


def _file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tensor_sha(t) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def build_mini(
    out: Path = typer.Option(..., "--out", help="Model directory to create (the layout of mamtra_cli/builtin/mini/)."),
    work: Path = typer.Option(Path("/tmp/mini_build/work"), "--work",
                              help="Cache of the intermediate phases (corpus wavs, features, checkpoints)."),
    sentences: int = typer.Option(3000, help="Training sentences (each spoken once, voices round-robin)."),
    test_sentences: int = typer.Option(120, help="Held-out sentences, spoken by the held-out voices."),
    voices: int = typer.Option(8, help="Training voices (espeak-ng voice, variant, pitch, rate); at most 12."),
    codebook: int = typer.Option(512, help="Codec vocabulary: k-means codes over pairs of 50 Hz mel frames."),
    decoder_steps: int = typer.Option(1000, help="Training steps of the codec decoder."),
    steps: int = typer.Option(3000, help="Training steps of the teacher (batch --batch-size)."),
    batch_size: int = typer.Option(16, help="Teacher batch size (utterances)."),
    hidden: int = typer.Option(128, help="Teacher hidden size (12 layers, head_dim 32, 2 KV heads)."),
    time_budget: float = typer.Option(0.0, "--time-budget", help="Stop teacher training after this many "
                                      "minutes (0 = no limit); the learning-rate schedule anneals towards it."),
    threads: int = typer.Option(1, help="CPU threads for torch (1 leaves the other core of a 2-core box free)."),
    seed: int = typer.Option(0, help="Seed of the sentences, k-means, decoder and teacher."),
    phase: str = typer.Option("all", help="all | codec | teacher. `codec` stops after the decoder and "
                              "`teacher` skips it, so two processes can share a 2-core box; a final `all` "
                              "run with the same options reuses both and writes --out."),
    toy: bool = typer.Option(False, "--toy", help="Toy sizes for a smoke test (< 2 minutes): 80 sentences, "
                             "6 test, 4 voices, 64 codes, 20 decoder steps, 30 teacher steps at hidden 64."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Rebuild the built-in mini voice (synthetic espeak-ng corpus → 25 Hz codec → 12-layer teacher).

    Needs espeak-ng on PATH (Debian/Ubuntu: apt-get install espeak-ng); synthesis with the result does not.
    Times on a 2-core CPU shared with other jobs (load ~6), 1 thread: corpus 3 min, features + codebook
    4 min, decoder 14 min, teacher as long as --time-budget allows (the first trial voice: --time-budget 58,
    1,788 steps, best validation loss at step 1,000); about 80 minutes in all. --toy takes under 2 minutes.
    Prints the output directory.
    """
    import shutil

    import torch

    from mamtra_cli import checkpoints
    from mamtra_cli.data_manifest import read_manifest
    from mamtra_cli.errors import UserError
    from mamtra_cli.mini import corpus as corpus_mod
    from mamtra_cli.mini.codec import CodecDecoder, train_decoder
    from mamtra_cli.mini.text import CharTokenizer
    from mamtra_cli.mini.train import TrainSettings, mini_model_config, train_teacher
    from mamtra_cli.models.speech_lm import SpeechLM

    if corpus_mod.espeak_path() is None:
        raise UserError("espeak-ng is not on PATH; install it (Debian/Ubuntu: `apt-get install espeak-ng`) "
                        "to build the mini voice.")
    if toy:
        sentences, test_sentences, voices, codebook = min(sentences, 80), min(test_sentences, 6), min(voices, 4), 64
        decoder_steps, steps, batch_size, hidden = min(decoder_steps, 20), min(steps, 30), 8, 64
    if phase not in ("all", "codec", "teacher"):
        raise UserError(f"--phase must be all, codec or teacher, not {phase!r}.")
    if phase == "all":
        checkpoints.check_output_dir(out, force)
    torch.set_num_threads(threads)
    t0 = time.time()
    timings = {}
    reused = []  # phases taken from --work instead of being run now (their times are then not this run's)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)

    # 1. corpus
    corpus_dir = work / "corpus"
    marker = corpus_dir / "corpus.json"
    before = marker.stat().st_mtime_ns if marker.is_file() else None
    corpus_mod.build_corpus(corpus_dir, sentences, test_sentences, voices, seed, log=_log)
    if before is not None and marker.stat().st_mtime_ns == before:
        reused.append("corpus")
    corpus_sha = json.loads((corpus_dir / "corpus.json").read_text())["sha256"]
    timings["corpus_s"] = round(time.time() - t0, 1)

    # 2. codebook + manifests
    t = time.time()
    kmeans_frames = 150_000
    codec, feats = fit_codebook_phase(corpus_dir, work, codebook, 25, kmeans_frames, seed, corpus_sha, reused)
    timings["codebook_s"] = round(time.time() - t, 1)

    # 3. decoder
    t = time.time()
    if phase == "teacher":
        codec.decoder = None
    dec_params = {"decoder_steps": decoder_steps, "seed": seed, "codebook_sha256": _tensor_sha(codec.centroids)}
    dec_marker = work / "codec" / "decoder.json"
    if phase == "teacher":
        _log("decoder: skipped (--phase teacher)")
    elif _marker_ok(dec_marker, dec_params):
        from safetensors.torch import load_file

        codec.decoder = CodecDecoder(codec.cfg)
        codec.decoder.load_state_dict(load_file(str(work / "codec" / "decoder.safetensors")))
        codec.decoder.eval()
        _log("decoder: reusing")
        reused.append("decoder")
    else:
        train_ids = [it.utt for it in corpus_mod.read_corpus_split(corpus_dir, "train")]
        codec.decoder = train_decoder(codec, [feats[u][0] for u in train_ids], [feats[u][1] for u in train_ids],
                                      decoder_steps, seed=seed, log=_log)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in codec.decoder.state_dict().items()},
                  str(work / "codec" / "decoder.safetensors"))
        _write_marker(dec_marker, dec_params)
    del feats
    timings["decoder_s"] = round(time.time() - t, 1)
    if phase == "codec":
        _log("codec phases done (--phase codec)")
        return

    # 4. teacher
    t = time.time()
    tok = CharTokenizer()
    _, train_utts = read_manifest(work / "data" / "train.jsonl", tok.vocab_size, codebook)
    n_val = max(8, len(train_utts) // 30)
    val_utts, train_utts = train_utts[:n_val], train_utts[n_val:]
    config = mini_model_config(tok.vocab_size, codebook, hidden=hidden, heads=hidden // 32)
    torch.manual_seed(seed)
    model = SpeechLM(config)
    settings = TrainSettings(steps=steps, batch_size=batch_size, seed=seed,
                             time_budget_s=time_budget * 60 if time_budget else None,
                             eval_every=10 if toy else 100)
    ckpt_dir = work / "teacher"
    ckpt_dir.mkdir(exist_ok=True)

    def save_best(m, best):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(ckpt_dir / "best.safetensors"))
        (ckpt_dir / "best.json").write_text(json.dumps(best) + "\n")

    teacher_params = {"steps": steps, "batch_size": batch_size, "hidden": hidden, "time_budget_min": time_budget,
                      "seed": seed, "lr": settings.lr, "concat_prob": settings.concat_prob,
                      "data_sha256": _file_sha(work / "data" / "train.jsonl")}
    teacher_marker = ckpt_dir / "teacher.json"
    if _marker_ok(teacher_marker, teacher_params):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ckpt_dir / "final.safetensors")))
        model.eval()
        recorded = json.loads(teacher_marker.read_text())
        result, timings["teacher_s"] = recorded["result"], recorded["seconds"]
        _log("teacher: reusing")
        reused.append("teacher")
    else:
        from safetensors.torch import save_file

        _log(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
             f"{len(train_utts)} train / {len(val_utts)} val utterances")
        result = train_teacher(model, train_utts, val_utts, settings, space_id=tok.index[" "], log=_log,
                               on_best=save_best)
        timings["teacher_s"] = round(time.time() - t, 1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt_dir / "final.safetensors"))
        _write_marker(teacher_marker, teacher_params, result=result, seconds=timings["teacher_s"])
    if phase == "teacher":
        _log("teacher phase done (--phase teacher)")
        return

    # 5. assemble the model directory
    test_items = corpus_mod.read_corpus_split(corpus_dir, "test")
    sample = test_items[0]  # spoken by the first held-out voice
    with checkpoints.staged_output(out, force) as tmp:
        tok.save(tmp)
        codec.save(tmp)
        shutil.copyfile(corpus_dir / sample.wav, tmp / "sample_voice.wav")
        (tmp / "sample_voice.txt").write_text(sample.text + "\n")
        manifest = checkpoints.run_manifest(
            "build-mini", inputs={"corpus": {"path": str(corpus_dir), "sha256": corpus_sha}},
            parameters={"sentences": sentences, "test_sentences": test_sentences, "voices": voices,
                        "codebook": codebook, "decoder_steps": decoder_steps, "steps": steps,
                        "batch_size": batch_size, "hidden": hidden, "time_budget_min": time_budget,
                        "threads": threads, "toy": toy, "lr": settings.lr, "concat_prob": settings.concat_prob},
            outputs={"text_vocab": "text_vocab.json", "codec": ["codec.yaml", "codec.safetensors"],
                     "sample_voice": {"wav": "sample_voice.wav", "text": sample.text, "spk": sample.spk}},
            metrics={"teacher": result["best"], "teacher_steps_run": result["steps_run"],
                     "teacher_history": result["history"], "timings": timings, "phases_reused": reused,
                     "total_s": round(time.time() - t0, 1)},
            seed=seed, text_tokenizer=tok.describe())
        checkpoints.save_model_dir(tmp, config, model.state_dict(), manifest)
    _log(f"done in {time.time() - t0:.0f} s")
    typer.echo(str(out))

"""`mamtra build-mini`: rebuild the built-in offline "mini" voice from scratch (corpus → codec → teacher).

    mamtra build-mini --out /tmp/mini_build/kmeans --threads 2  # the k-means voice (about 2.5–3 hours)
    mamtra build-mini --out /tmp/mini_build/mini --work /tmp/mini_build/work-fsq --quantizer fsq --voices 12 \
        --warm-start /tmp/mini_build/kmeans --cycles 80m:1.5e-3:50 --threads 2   # then the shipped one
    mamtra build-mini --out /tmp/mini_toy --toy                 # toy size, < 2 minutes: a smoke test

The recipe, its phases and their cache in --work are described in `mamtra_cli.mini.build`, which does the work.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mamtra_cli.mini.build import DEFAULT_CYCLES, TOY_CYCLES, WARM_MAP_UTTERANCES


def build_mini(
    out: Path = typer.Option(..., "--out", help="Model directory to create (the layout of mamtra_cli/builtin/mini/)."),
    work: Path = typer.Option(Path("/tmp/mini_build/work"), "--work",
                              help="Cache of the intermediate phases (corpus wavs, codec, manifests, checkpoints)."),
    sentences: int = typer.Option(20000, help="Training sentences (each spoken once, voices round-robin)."),
    test_sentences: int = typer.Option(120, help="Held-out sentences, spoken by the held-out voices."),
    voices: int = typer.Option(8, help="Training voices (espeak-ng voice, variant, pitch, rate); at most 12."),
    quantizer: str = typer.Option("kmeans", help="Speech tokenizer: kmeans (the previous voice's codec: k-means "
                                  "over pairs of 50 Hz mel frames and a conv decoder) or fsq (a learned conv "
                                  "encoder/decoder with finite scalar quantisation at 25 Hz, as CosyVoice 2: far more "
                                  "intelligible resynthesis, the shipped voice's codec; its teacher learns from "
                                  "scratch much more slowly, so warm-start it with --warm-start — see "
                                  "`mamtra_cli.mini.build`)."),
    codebook: int = typer.Option(0, help="k-means codes (0: 512); FSQ has 3^--fsq-dims."),
    fsq_dims: int = typer.Option(8, "--fsq-dims", help="FSQ latent dimensions, 3 levels each: 3^8 = 6561 codes "
                                 "(CosyVoice 2's vocabulary size), 3^6 = 729."),
    tokenizer_steps: int = typer.Option(7000, "--tokenizer-steps", help="Training steps of the FSQ tokenizer "
                                        "(7000: about 35 minutes on 2 cores)."),
    warm_start: str = typer.Option(None, "--warm-start", help="Start the teacher from a trained mini teacher on "
                                   "another codec (`mini` or a build-mini output of the same size): its "
                                   "transformer and text tables copied, its speech-code tables mapped through "
                                   f"the two codecs' code co-occurrence on {WARM_MAP_UTTERANCES} training "
                                   "utterances. How the FSQ voice is built (see the README); much faster than a "
                                   "cold start."),
    codec_sentences: int = typer.Option(3000, "--codec-sentences",
                                        help="Fit the codebook and the decoder on the first N training "
                                        "utterances (0 = all); every utterance is tokenised."),
    decoder_steps: int = typer.Option(1000, help="Training steps of the k-means codec's decoder."),
    cycles: str = typer.Option(DEFAULT_CYCLES, "--cycles",
                               help="Teacher training cycles, comma-separated BUDGET:PEAK_LR:WARMUP (budget `Nm` "
                               "minutes or `N` steps): each a linear warm-up and a cosine to 10 % of the peak; "
                               "each after the first starts from the previous one's best weights."),
    batch_size: int = typer.Option(32, help="Teacher batch size (utterances)."),
    hidden: int = typer.Option(128, help="Teacher hidden size (12 layers, head_dim 32, 2 KV heads)."),
    speech_input_noise: float = typer.Option(0.15, "--speech-input-noise",
                                             help="Probability that an input speech token of the teacher is "
                                             "replaced by a random code (the targets stay clean)."),
    render_jobs: int = typer.Option(2, "--render-jobs", help="espeak-ng processes rendering the corpus in "
                                    "parallel; the output does not depend on it."),
    threads: int = typer.Option(0, help="CPU threads for torch (0: automatic — 1 for the mini's small teacher, "
                                "see `mamtra synth --help`; the shipped voice and its k-means donor were built "
                                "with 2, pass --threads 2 to reproduce their minute budgets exactly). Minute budgets "
                                "make the teacher's steps depend on it."),
    seed: int = typer.Option(0, help="Seed of the sentences, k-means, decoder and teacher."),
    phase: str = typer.Option("all", help="all | codec | teacher. `codec` stops after the decoder and "
                              "`teacher` skips it, so two processes can share a 2-core box; a final `all` "
                              "run with the same options reuses both and writes --out."),
    toy: bool = typer.Option(False, "--toy", help="Toy sizes for a smoke test (< 2 minutes): at most 80 "
                             "sentences, 6 test, 4 voices, 64 codes, 20 decoder steps, batch 8, hidden 64 and, "
                             f"unless --cycles is given, cycles {TOY_CYCLES} (in steps)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Rebuild the built-in mini voice (synthetic espeak-ng corpus → 25 Hz codec → 12-layer teacher).

    The defaults build the k-means voice; the shipped FSQ voice is a second run warm-started from it (the two
    commands are in the README and this module's docstring). Needs espeak-ng on PATH (Debian/Ubuntu: apt-get install
    espeak-ng); synthesis with the result does not. Approximate times on a 2-core CPU: corpus rendering
    about 0.18 s per sentence per core (about 30 minutes for 20,000 sentences with --render-jobs 2),
    features + codebook about 5 min, decoder about 14 min, teacher 26.5 + 90 min (the --cycles budgets):
    about 2.5–3 hours in all; the FSQ run: rendering 12 voices about 10 minutes, FSQ tokenizer about 35, teacher
    80 min, about 2 hours. --toy takes under 2 minutes. Prints the output directory.
    """
    from mamtra_cli.mini.build import build_mini as build

    built = build(out, work=work, sentences=sentences, test_sentences=test_sentences, voices=voices,
                  codebook=codebook, codec_sentences=codec_sentences, decoder_steps=decoder_steps, cycles=cycles,
                  quantizer=quantizer, fsq_dims=fsq_dims, tokenizer_steps=tokenizer_steps, warm_start=warm_start,
                  batch_size=batch_size, hidden=hidden, speech_input_noise=speech_input_noise,
                  render_jobs=render_jobs, threads=threads, seed=seed, phase=phase, toy=toy, force=force)
    if built is not None:
        typer.echo(str(built))

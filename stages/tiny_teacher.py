"""`mamtra tiny-teacher`: write a tiny random-weight CosyVoice 2-format teacher directory."""

from __future__ import annotations

from pathlib import Path

import typer


def tiny_teacher(
    out: Path = typer.Option(..., "--out", help="Directory to create (must not exist unless --force)."),
    layers: int = typer.Option(4, help="Number of Qwen2 decoder layers."),
    hidden: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Query heads."),
    kv_heads: int = typer.Option(2, help="Key/value heads (GQA groups); must divide --heads."),
    text_vocab: int = typer.Option(512, help="Rows of the text embedding."),
    speech_tokens: int = typer.Option(100, help="Speech codes; the decoder gets 3 more classes (eos, ..., fill)."),
    seed: int = typer.Option(0, help="Seed of the random weights (the output is deterministic from it)."),
    sample_data: int = typer.Option(0, "--sample-data", help="Also write data/train.jsonl and data/val.jsonl "
                                    "with this many utterances sampled from the teacher (90/10 split)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Write a tiny random-weight CosyVoice 2-format teacher directory, for trying the pipeline and for tests.

    The directory has the files of a real CosyVoice 2 model's speech LM (cosyvoice2.yaml, llm.pt,
    CosyVoice-BlankEN/config.json) and can be passed wherever a teacher is expected. Prints its path.
    """
    from mamtra_cli import checkpoints
    from mamtra_cli.teachers.tiny import make_tiny_cosyvoice2_dir

    intermediate = max(8, (hidden * 11) // 4)  # Qwen2.5-0.5B's 4864/896 is ~5.4; 176/64 = 2.75 keeps it tiny
    params = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
              "intermediate": intermediate, "text_vocab": text_vocab, "speech_tokens": speech_tokens}
    with checkpoints.staged_output(out, force) as tmp:
        make_tiny_cosyvoice2_dir(tmp, seed=seed, **params)
        manifest = checkpoints.run_manifest(
            "tiny-teacher", inputs={}, parameters=params, seed=seed,
            outputs={"llm_pt": "llm.pt", "config_json": "CosyVoice-BlankEN/config.json",
                     "yaml": "cosyvoice2.yaml"})
        if sample_data:
            from mamtra_cli.data_manifest import ManifestHeader, write_manifest
            from mamtra_cli.teachers import load_teacher
            from mamtra_cli.teachers.tiny import sample_teacher_data

            model, _ = load_teacher(tmp)
            utts = sample_teacher_data(model, sample_data, seed=seed)
            n_val = max(1, len(utts) // 10)
            header = ManifestHeader(text_tokenizer={"name": "random-ids"},
                                    speech_tokenizer={"name": f"tiny-teacher-seed{seed}"})
            (tmp / "data").mkdir()
            write_manifest(tmp / "data" / "train.jsonl", header, utts[n_val:])
            write_manifest(tmp / "data" / "val.jsonl", header, utts[:n_val])
            manifest["outputs"]["data"] = {"train": len(utts) - n_val, "val": n_val}
        checkpoints.write_json_atomic(tmp / checkpoints.MANIFEST_FILE, manifest)
    typer.echo(str(out))

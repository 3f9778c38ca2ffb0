"""The stage tests' harness: run a `mamtra` command in-process, read its one error line, and make the tiny
CosyVoice-format triple most stage tests start from (teacher T, its 1:1 hybrid S, data sampled from T)."""

from __future__ import annotations

from pathlib import Path

import torch

from mamtra_cli.cli import main
from mamtra_cli.data_manifest import Utterance, write_manifest
from mamtra_cli.teachers import load_teacher


def run(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `mamtra ARGS`, with whatever earlier commands printed dropped first."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    """The single `mamtra: error:` line of `err` (asserts there is exactly one and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("mamtra: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def make_tiny_triple(root: Path, utterances: int = 6, max_new_tokens: int = 12, val: int = 0) -> Path:
    """root/T: a 2-layer random CosyVoice-format teacher (hidden 32, text vocab 64, 20 speech tokens);
    root/S: its 1:1 hybrid; root/train.jsonl (and root/val.jsonl with the last `val` utterances): token
    sequences sampled from T for random texts (seed 0)."""
    assert main(["tiny-teacher", "--out", str(root / "T"), "--layers", "2", "--hidden", "32",
                 "--text-vocab", "64", "--speech-tokens", "20"]) == 0
    assert main(["transfer", "--teacher", str(root / "T"), "--ratio", "1:1", "--out", str(root / "S")]) == 0
    teacher, _ = load_teacher(root / "T")
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
             for _ in range(utterances)]
    speech = teacher.generate_batch([(t, [], []) for t in texts], seed=0, max_new_tokens=max_new_tokens)
    utts = [Utterance(f"u{i}", t, s or [0]) for i, (t, s) in enumerate(zip(texts, speech))]
    write_manifest(root / "train.jsonl", None, utts[: len(utts) - val])
    if val:
        write_manifest(root / "val.jsonl", None, utts[len(utts) - val:])
    return root


def tiny_arch_yaml(layers: int) -> str:
    """A profile architecture file (the `--arch PATH` format of profiles/arch/) for a tiny Qwen2-shaped model."""
    return f"""name: tiny
config:
  hidden_size: 32
  intermediate_size: 48
  num_attention_heads: 4
  num_key_value_heads: 2
  head_dim: 8
  text_vocab_size: 64
  speech_token_size: 20
  num_layers: {layers}
"""

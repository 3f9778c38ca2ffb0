"""Bad options and damaged inputs are one sentence on stderr and exit code 2, never a traceback, and are
caught before anything is written (issue 14); plus `synth --max-tokens` honoured by the mini voice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from mamtra_cli.data_manifest import Utterance, write_manifest
from tests.stages.harness import make_tiny_triple, one_error, run
from mamtra_cli.mini import BUILTIN_DIR


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny CosyVoice-format teacher T, its 1:1 hybrid S (a MamTra model dir) and data sampled from T."""
    root = tmp_path_factory.mktemp("errors")
    make_tiny_triple(root)
    return root


def distill_args(root: Path, out: Path) -> list:
    return ["distill", "--teacher", root / "T", "--student", root / "S", "--data", root / "train.jsonl",
            "--out", out, "--batch-tokens", "64", "--device", "cpu", "--threads", "1", "--save-every", "0",
            "--eval-every", "0"]


# ------------------------------------------------------------------------------------------ --threads, --device
def test_negative_threads_is_one_sentence_in_every_stage(dirs, tmp_path, capsys):
    arch = "cosyvoice2-0.5b"
    commands = {
        "score": ["score", "--model", dirs / "S", "--data", dirs / "train.jsonl"],
        "distill": distill_args(dirs, tmp_path / "kd")[:-8] + ["--device", "cpu"],
        "cache-growth": ["profile", "cache-growth", "--arch", arch, "--out", tmp_path / "p"],
        "vram": ["profile", "vram", "--arch", arch, "--out", tmp_path / "p"],
        "speed": ["profile", "speed", "--arch", arch, "--out", tmp_path / "p"],
        "scan": ["profile", "scan"],
        "synth": ["synth", "Hello.", "--out", tmp_path / "x.wav"],
    }
    for name, args in commands.items():
        code, _, err = run(capsys, *args, "--threads", "-2")
        assert code == 2 and "--threads" in one_error(err) and "-2" in err, (name, err)
    assert list(tmp_path.iterdir()) == []  # nothing was created, not even --out's folder or OUT.partial


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps"])
def test_unknown_device_is_one_sentence(dirs, tmp_path, capsys, device):
    commands = [
        ["profile", "vram", "--arch", "cosyvoice2-0.5b", "--device", device],
        ["profile", "speed", "--arch", "cosyvoice2-0.5b", "--device", device],
        distill_args(dirs, tmp_path / "kd")[:-8] + ["--device", device],
        ["synth", "Hello.", "--out", tmp_path / "x.wav", "--device", device],
    ]
    for args in commands:
        code, _, err = run(capsys, *args)
        assert code == 2 and f"Unknown --device '{device}'" in one_error(err), (args[:2], err)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ distill
@pytest.mark.parametrize("bad", [["--lr", "-1"], ["--lr", "nan"], ["--weight-decay", "-0.1"], ["--betas", "0.9,1.5"],
                                 ["--kl-weight", "0", "--ce-weight", "0"], ["--clip", "-1"]])
def test_distill_bad_hyperparameters_leave_nothing_behind(dirs, tmp_path, capsys, bad):
    out = tmp_path / "kd"
    code, _, err = run(capsys, *distill_args(dirs, out), "--max-steps", "1", *bad)
    assert code == 2 and bad[0] in one_error(err)
    # AdamW used to refuse --lr -1 only after OUT.partial/ existed, which then blocked the next run.
    assert list(tmp_path.iterdir()) == []
    code, _, err = run(capsys, *distill_args(dirs, out), "--max-steps", "1", "--lr", "1e-3")
    assert code == 0, err


def test_distill_warns_when_warmup_exceeds_max_steps(dirs, tmp_path, capsys):
    code, _, err = run(capsys, *distill_args(dirs, tmp_path / "kd"), "--max-steps", "2", "--warmup", "50",
                       "--lr", "1e-3")
    assert code == 0, err
    assert "warning: --warmup 50 exceeds --max-steps 2" in err
    code, _, err = run(capsys, *distill_args(dirs, tmp_path / "kd2"), "--max-steps", "2", "--warmup", "1")
    assert code == 0 and "warning" not in err


# ------------------------------------------------------------------------------------------ --out
def test_read_only_parent_of_out_is_one_sentence(dirs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root (or on a file system without permissions): a read-only folder is writable")
        code, _, err = run(capsys, "transfer", "--teacher", dirs / "T", "--ratio", "1:1", "--out", locked / "h")
        assert code == 2 and "permission denied" in one_error(err)
        code, _, err = run(capsys, "profile", "cache-growth", "--arch", "cosyvoice2-0.5b",
                           "--out", locked / "sub" / "prof")
        assert code == 2 and "permission denied" in one_error(err)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_synth_out_that_is_a_directory_is_one_sentence(tmp_path, capsys):
    if not (BUILTIN_DIR / "model.safetensors").is_file():
        pytest.skip("no built-in mini voice")
    code, _, err = run(capsys, "synth", "Hello.", "--out", tmp_path, "--force", "--threads", "1")
    assert code == 2 and "is a directory" in one_error(err)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ damaged config.yaml
@pytest.mark.parametrize("field, value, needle", [
    ("hidden_size", "abc", "field hidden_size is 'abc'"),
    ("num_attention_heads", -4, "field num_attention_heads is -4"),
    ("rope_theta", "fast", "field rope_theta is 'fast'"),
    ("layer_types", ["attention", "mamba", "attention"], "layer_types lists 3 layer(s) but derived.num_layers says 2"),
    ("layer_types", ["attention", "lstm"], "layer_types holds 'lstm'"),
    ("mamba", {"d_conv": -1}, "field mamba.d_conv is -1"),
])
def test_damaged_config_yaml_names_file_and_field(dirs, tmp_path, capsys, field, value, needle):
    model = tmp_path / "S"
    model.mkdir()
    for f in (dirs / "S").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    cfg = yaml.safe_load((model / "config.yaml").read_text())
    cfg[field] = {**cfg["mamba"], **value} if field == "mamba" else value
    (model / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "score", "--model", model, "--data", dirs / "train.jsonl")
    line = one_error(err)
    assert code == 2 and str(model / "config.yaml") in line and needle in line


# ------------------------------------------------------------------------------------------ score: too long
def test_score_refuses_an_utterance_longer_than_the_model_positions(dirs, tmp_path, capsys):
    model = tmp_path / "S"
    model.mkdir()
    for f in (dirs / "S").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    cfg = yaml.safe_load((model / "config.yaml").read_text())
    cfg["max_position_embeddings"] = 12
    (model / "config.yaml").write_text(yaml.safe_dump(cfg))
    data = tmp_path / "data.jsonl"
    write_manifest(data, None, [Utterance("short", [1, 2], [3, 4]), Utterance("long-one", [1, 2, 3], [5] * 8),
                                Utterance("longest", [1] * 4, [5] * 9)])
    code, out, err = run(capsys, "score", "--model", model, "--data", data, "--json")
    line = one_error(err)
    assert code == 2 and out == ""
    assert "'longest'" in line and "15 positions" in line and "at most 12" in line and "2 utterances" in line


# ------------------------------------------------------------------------------------------ synth --max-tokens
def test_synth_max_tokens_caps_the_mini_voice(tmp_path, capsys):
    if not (BUILTIN_DIR / "model.safetensors").is_file():
        pytest.skip("no built-in mini voice")
    wav = tmp_path / "x.wav"
    code, out, err = run(capsys, "synth", "Hello there, how are you doing today?", "--out", wav,
                         "--max-tokens", "5", "--threads", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert 0 < result["stages"]["tokens"] <= 5  # 53 before the cap reached the mini backend
    assert result["backend"]["max_new_tokens"] == 5
    assert result["audio_seconds"] <= 5 / 25 + 1e-6  # 25 Hz tokens

"""A first run as fast as documented and as plain as promised (issue 14): the thread-count rule, `synth` on the
mini voice with no options, `--model` mistakes named first, the mini voice on a GPU machine, `--out -`."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from mamtra_cli import cli
from mamtra_cli.cli import SMALL_MODEL_PARAMETERS, default_threads, main
from mamtra_cli.errors import UserError
from mamtra_cli.mini import BUILTIN_DIR

needs_mini = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(),
                                reason="the built-in mini voice is not in this checkout (mamtra build-mini)")


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ the thread rule
def test_default_threads_rule():
    # small models (the mini voice: 2.5 M parameters) get one thread, whatever the machine
    assert default_threads(2_500_000, torch_default=16, cpus=16) == 1
    assert default_threads(SMALL_MODEL_PARAMETERS - 1, torch_default=8, cpus=8) == 1
    # larger ones torch's default, never more than the CPUs this process may use
    assert default_threads(500_000_000, torch_default=16, cpus=2) == 2
    assert default_threads(500_000_000, torch_default=4, cpus=64) == 4
    assert default_threads(SMALL_MODEL_PARAMETERS, torch_default=3, cpus=3) == 3
    # unknown model size: the cap alone; and never 0
    assert default_threads(None, torch_default=8, cpus=2) == 2
    assert default_threads(None, torch_default=0, cpus=0) == 1


def test_apply_threads_explicit_wins_and_is_checked(monkeypatch):
    monkeypatch.setattr(cli, "_TORCH_DEFAULT_THREADS", 2)
    before = torch.get_num_threads()
    try:
        assert cli.apply_threads(3, parameters=1000) == 3 and torch.get_num_threads() == 3
        assert cli.apply_threads(0, parameters=1000) == 1 and torch.get_num_threads() == 1
        assert cli.apply_threads(None, parameters=10**9) == min(2, cli.usable_cpus())
        with pytest.raises(UserError, match="--threads"):
            cli.apply_threads(-1)
    finally:
        torch.set_num_threads(before)


@needs_mini
def test_synth_without_threads_uses_one_thread_for_the_mini_voice(tmp_path, capsys, monkeypatch):
    # As if torch's default were 2 threads (what a 2-core machine gives): the old code used it.
    monkeypatch.setattr(cli, "_TORCH_DEFAULT_THREADS", 2)
    torch.set_num_threads(2)
    code, out, err = run(capsys, "synth", "Hello, how are you doing today?", "--out", tmp_path / "h.wav", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["threads"] == 1 and torch.get_num_threads() == 1
    assert result["backend"]["lm"]["parameters"] < SMALL_MODEL_PARAMETERS
    assert "1 thread" in err


# ------------------------------------------------------------------------------------------ --model named first
@needs_mini
def test_synth_missing_model_is_named_not_pass_ref(tmp_path, capsys):
    code, out, err = run(capsys, "synth", "Hello.", "--model", tmp_path / "nope", "--out", tmp_path / "x.wav")
    lines = [line for line in err.splitlines() if line.startswith("mamtra: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert str(tmp_path / "nope") in lines[0] and "does not exist" in lines[0] and "--ref" not in lines[0]
    assert out == "" and not (tmp_path / "x.wav").exists()


def test_auto_device_picks_the_cpu_for_the_mini_backend(monkeypatch):
    """On a GPU machine `auto` must not become cuda for the mini voice (CPU only); explicit cuda is refused."""
    from mamtra_cli.synthesis.loading import default_backend, synthesis_device, uses_mini_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as parse_device sees it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert uses_mini_backend(None, None) and uses_mini_backend("mini", None)
    assert synthesis_device(None, None, "auto") == "cpu"
    assert synthesis_device("mini", None, "AUTO") == "cpu"
    assert synthesis_device(None, None, "cpu") == "cpu"
    with pytest.raises(UserError, match="runs on the CPU"):
        synthesis_device(None, None, "cuda")
    with pytest.raises(UserError, match="Unknown --device"):
        synthesis_device(None, None, "tpu")
    if (BUILTIN_DIR / "codec.yaml").is_file():
        assert default_backend("auto").describe()["device"] == "cpu"
        with pytest.raises(UserError, match="runs on the CPU"):
            default_backend("cuda")


def test_auto_device_for_a_cosyvoice_model_still_takes_the_gpu(tmp_path, monkeypatch):
    from mamtra_cli.synthesis.loading import synthesis_device

    (tmp_path / "bundle").mkdir()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert synthesis_device(str(tmp_path / "bundle"), None, "auto") == "cuda"


# ------------------------------------------------------------------------------------------ --out -
@needs_mini
def test_synth_out_dash_writes_only_the_wav_to_stdout(tmp_path):
    cmd = [sys.executable, "-m", "mamtra_cli", "synth", "Good morning.", "--out", "-", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout[:4] == b"RIFF" and r.stdout[8:12] == b"WAVE"
    wav, sr = sf.read(io.BytesIO(r.stdout))
    assert sr == 16000 and wav.size / sr > 0.3 and np.abs(wav).max() > 0.01
    assert b"RTF" in r.stderr  # the report went to stderr
    assert list(tmp_path.iterdir()) == []  # no file named "-", no temporary file


@needs_mini
def test_synth_out_dash_with_json_is_refused_before_any_work(tmp_path, capsys):
    code, out, err = run(capsys, "synth", "Hello.", "--out", "-", "--json")
    assert code == 2 and out == "" and "--json" in err and err.count("\n") == 1

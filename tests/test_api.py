"""The Python API (`mamtra_cli.api`): the README's hello example as written, synthesis as arrays, streams and
files, the pipeline functions on a tiny teacher, the commands' defaults, and an `import mamtra_cli` without torch."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from rich.console import Console

import mamtra_cli
from mamtra_cli.api import COMMANDS
from mamtra_cli.mini import BUILTIN_DIR

ROOT = Path(__file__).resolve().parents[1]
HELLO = "Hello, how are you doing today?"
needs_mini = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(),
                                reason="the built-in mini voice is not in this checkout (mamtra build-mini)")
QUIET = Console(stderr=True, quiet=True)


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):text.index("## Commands")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@needs_mini
def test_readme_hello_example_runs_as_written(tmp_path):
    code = readme_python_blocks()[0]
    assert len(code.strip().splitlines()) == 3 and HELLO in code
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wav, sr = sf.read(str(tmp_path / "hello.wav"), dtype="float32")
    # the mini voice speaks at 16 kHz; the sentence takes about 2.2 s (25 Hz tokens, 56 of them with seed 0)
    assert sr == 16000 and 1.0 < wav.size / sr < 6.0 and np.abs(wav).max() > 0.01


@needs_mini
def test_synthesize_stream_and_save_agree(tmp_path):
    tts = mamtra_cli.load("mini", threads=1)
    assert isinstance(tts, mamtra_cli.Synthesizer) and tts.sample_rate == 16000
    audio, sr = tts.synthesize(HELLO, seed=3)
    assert audio.dtype == np.float32 and audio.ndim == 1 and sr == 16000 and 1.0 < audio.size / sr < 6.0
    streamed = np.concatenate([np.asarray(c, dtype=np.float32) for c in tts.stream(HELLO, seed=3)])
    assert streamed.shape == audio.shape and np.allclose(streamed, audio, atol=1e-5)  # same seed, same tokens
    report = tts.save(HELLO, tmp_path / "hello.wav", seed=3)
    assert report["samples"] == audio.size and report["sample_rate"] == 16000 and report["mode"] == "zero-shot"
    wav, wav_sr = sf.read(str(tmp_path / "hello.wav"), dtype="float32")
    assert wav_sr == 16000 and np.abs(wav - np.clip(audio, -1, 1)).max() < 1e-3  # 16-bit PCM of the same audio
    with pytest.raises(mamtra_cli.UserError, match="already exists"):
        tts.save(HELLO, tmp_path / "hello.wav")
    with pytest.raises(mamtra_cli.UserError, match="empty"):
        tts.synthesize("  ")
    with pytest.raises(mamtra_cli.UserError, match="does not exist"):
        tts.synthesize(HELLO, ref=tmp_path / "no-such-voice.wav")


def test_load_names_a_missing_model_in_one_sentence(tmp_path):
    with pytest.raises(mamtra_cli.UserError, match="does not exist"):
        mamtra_cli.load(str(tmp_path / "nothing-here"))


def test_pipeline_functions_on_a_tiny_teacher(tmp_path):
    teacher = mamtra_cli.tiny_teacher(tmp_path / "teacher", layers=4, hidden=32, heads=4, kv_heads=2,
                                      text_vocab=40, speech_tokens=20, sample_data=12)
    assert (teacher / "llm.pt").is_file() and (teacher / "data" / "val.jsonl").is_file()
    hybrid = mamtra_cli.transfer(teacher, tmp_path / "hybrid", attention_layers=[1, 3], console=QUIET)
    assert hybrid["layer_types"] == ["mamba", "attention", "mamba", "attention"]
    assert hybrid["placement"] == "explicit" and (tmp_path / "hybrid" / "model.safetensors").is_file()
    scored = mamtra_cli.score(tmp_path / "hybrid", teacher / "data" / "val.jsonl", console=QUIET)
    assert scored["utterances"] >= 1 and np.isfinite(scored["ce"]) and 0.0 <= scored["accuracy"] <= 1.0
    kd = mamtra_cli.distill(teacher, tmp_path / "hybrid", teacher / "data" / "train.jsonl", tmp_path / "kd",
                            val=teacher / "data" / "val.jsonl", max_steps=2, lr=1e-3, warmup=0, save_every=0,
                            eval_every=0, console=QUIET)
    assert kd["steps"] == 2 and np.isfinite(kd["val_ce"]) and (tmp_path / "kd" / "metrics.jsonl").is_file()
    with pytest.raises(mamtra_cli.UserError, match="--grad-accum must be at least 1"):
        mamtra_cli.distill(teacher, tmp_path / "hybrid", teacher / "data" / "train.jsonl", tmp_path / "kd2",
                           grad_accum=0, console=QUIET)
    growth = mamtra_cli.profile_cache_growth(model=[str(teacher), str(tmp_path / "kd")], lengths="4,16",
                                             dtype="fp32", console=QUIET)
    assert [m["name"] for m in growth["models"]] == ["teacher", "kd"]
    assert all(r["measured_bytes"] == r["analytic_bytes"] for m in growth["models"] for r in m["rows"])


def _command_defaults(stage) -> dict:
    """{parameter: default} of a typer stage function (options given as defaults or as Annotated metadata)."""
    out = {}
    for name, p in inspect.signature(stage).parameters.items():
        default = p.default
        if hasattr(default, "default"):  # typer.Option(...) / typer.Argument(...) as the default value
            default = default.default
        out[name] = inspect.Parameter.empty if default is Ellipsis else default
    return out


@pytest.mark.parametrize("api_name", sorted(COMMANDS))
def test_api_functions_take_the_commands_options_with_their_defaults(api_name):
    module, attr = COMMANDS[api_name].split(":")
    stage = getattr(import_module(f"mamtra_cli.stages.{module}"), attr)
    command = _command_defaults(stage)
    function = {n: p.default for n, p in inspect.signature(getattr(mamtra_cli, api_name)).parameters.items()}
    # synth's TEXT, --ref, --out, --list … belong to the calls on the Synthesizer, not to `load`
    names = set(command) & set(function) if api_name == "load" else set(command) - {"json_out"}
    assert names and names <= set(function), f"{api_name} lacks {sorted(names - set(function))}"
    for name in sorted(names):
        want, got = command[name], function[name]
        if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
            want, got = list(want), list(got)
        assert got == want, f"{api_name}({name}=…): default {got!r}, but `mamtra` uses {want!r}"


def test_import_is_light_and_names_resolve_lazily():
    code = ("import sys, mamtra_cli; names = dir(mamtra_cli); "
            "print('torch' in sys.modules, 'load' in names, 'profile_vram' in names)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", "True", "True"]
    assert mamtra_cli.transfer.__module__ == "mamtra_cli.weight_transfer"  # the library function itself, no copy
    with pytest.raises(AttributeError):
        mamtra_cli.no_such_function  # noqa: B018


def test_api_docstring_lists_every_export():
    from mamtra_cli import api

    doc = api.__doc__
    missing = [n for n in api.__all__ if n not in ("Synthesizer", "UserError") and f"{n}(" not in doc]
    assert not missing, missing


def test_no_library_module_shadows_an_api_name():
    """Importing a submodule sets it as an attribute of its package: a module `mamtra_cli.NAME` would replace the
    API function `mamtra_cli.NAME` as soon as anything imports it (it happened to `pseudo_label`)."""
    import importlib.util

    from mamtra_cli import api

    clashes = [name for name in api._EXPORTS if importlib.util.find_spec(f"mamtra_cli.{name}") is not None]
    assert clashes == []

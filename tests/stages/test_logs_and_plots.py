"""What a run leaves in a log and on a plot (issue 14): whole lines when stderr is not a terminal, progress
lines during distillation, rounded numbers, legends that name models, and `profile speed` keeping its own
results when the optional transformers comparison fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mamtra_cli import profiling as P
from mamtra_cli.cli import main
from tests.stages.harness import make_tiny_triple, run, tiny_arch_yaml
from mamtra_cli.models.config import ATTENTION, MAMBA

TINY_ARCH = tiny_arch_yaml(4)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    make_tiny_triple(root)
    return root


def distill(root, out, *extra):
    return ["distill", "--teacher", root / "T", "--student", root / "S", "--data", root / "train.jsonl",
            "--val", root / "train.jsonl", "--out", out, "--max-steps", "3", "--save-every", "0", "--eval-every",
            "0", "--warmup", "0", "--batch-tokens", "60", "--device", "cpu", "--threads", "1", *extra]


# ------------------------------------------------------------------------------------------ logs
def test_messages_are_not_hard_wrapped_when_stderr_is_a_file(dirs, tmp_path):
    out = tmp_path / ("a-long-folder-name-" * 4) / "hybrid-with-a-long-name"
    assert len(str(out)) > 100
    r = subprocess.run([sys.executable, "-m", "mamtra_cli", "transfer", "--teacher", str(dirs / "T"), "--ratio",
                        "1:1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wrote = [line for line in r.stderr.splitlines() if line.startswith("wrote")]
    assert len(wrote) == 1 and str(out) in wrote[0] and "Mamba layers" in wrote[0], r.stderr


def test_distill_prints_progress_lines_and_rounded_numbers_without_a_terminal(dirs, tmp_path, capsys):
    code, out, err = run(capsys, *distill(dirs, tmp_path / "kd"))
    assert code == 0, err
    steps = [line for line in err.splitlines() if line.startswith("distill: step")]
    assert steps[0].startswith("distill: step 1/3 ") and steps[-1].startswith("distill: step 3/3 ")
    assert "loss" in steps[0] and "tokens/s" in steps[0]
    final = next(line for line in err.splitlines() if line.startswith("wrote"))
    val_ce = final.rsplit("val CE ", 1)[1]
    assert len(val_ce.split(".")[1]) == 4, final  # rounded, not 1.2345678901234
    table = dict(line.split("\t") for line in out.splitlines())
    assert len(table["train_loss"]) <= 8 and table["threads"] == "1"
    manifest = json.loads((tmp_path / "kd" / "manifest.json").read_text())
    assert manifest["threads"] == 1


def test_run_manifest_paths_are_rebased(tmp_path):
    """The demo's stages record its temporary directory; after the move their JSON files name --out."""
    from mamtra_cli.checkpoints import rebase_recorded_paths, write_json_atomic

    tmp, final = tmp_path / ".demo.tmp-1-ab", tmp_path / "demo"
    (tmp / "hybrid").mkdir(parents=True)
    write_json_atomic(tmp / "hybrid" / "manifest.json",
                      {"command": f"mamtra transfer --out {tmp}/hybrid", "inputs": {"p": [str(tmp / "x")]},
                       "n": 3})
    rebase_recorded_paths(tmp, [(str(tmp), str(final))])
    m = json.loads((tmp / "hybrid" / "manifest.json").read_text())
    assert m == {"command": f"mamtra transfer --out {final}/hybrid", "inputs": {"p": [str(final / "x")]}, "n": 3}


# ------------------------------------------------------------------------------------------ legends
def test_model_labels():
    A, M = ATTENTION, MAMBA
    assert P.model_label([A] * 12) == "teacher (12 attention)"
    assert P.model_label([M, A] * 6) == "hybrid 1:1 (6A+6M)"
    assert P.model_label([M, M, M, A] * 3) == "hybrid 1:3 (3A+9M)"
    assert P.model_label([A] * 5 + [M] * 7) == "hybrid (5A+7M)"
    assert P.model_label([M] * 4) == "all Mamba (4M)"


def test_plot_runs_legend_names_the_model_not_the_folder(dirs, tmp_path, capsys):
    for name in ("kd-a", "kd-b"):
        assert main([str(a) for a in distill(dirs, tmp_path / name)]) == 0
    code, out, err = run(capsys, "plot-runs", tmp_path / "kd-a", "--out", tmp_path / "one.png", "--json")
    assert code == 0, err
    assert [r["run"] for r in json.loads(out)["runs"]] == ["hybrid 1:1 (1A+1M)"]
    # two runs of one layout stay distinct: the folder is added
    code, out, err = run(capsys, "plot-runs", tmp_path / "kd-a", tmp_path / "kd-b", "--out", tmp_path / "two.png",
                         "--json")
    assert code == 0, err
    assert [r["run"] for r in json.loads(out)["runs"]] == ["hybrid 1:1 (1A+1M): kd-a", "hybrid 1:1 (1A+1M): kd-b"]


def test_profile_png_legends_name_models(tmp_path, capsys, monkeypatch):
    arch = tmp_path / "tiny.yaml"
    arch.write_text(TINY_ARCH)
    seen = []
    original = P.plot_lines

    def recording(path, series, *args, **kwargs):  # the real plot, with its legend entries noted
        seen.append(list(series))
        return original(path, series, *args, **kwargs)

    monkeypatch.setattr(P, "plot_lines", recording)
    code, _, err = run(capsys, "profile", "cache-growth", "--arch", arch, "--ratio", "1:1,1:3", "--lengths", "8,16",
                       "--fill", "synthetic", "--dtype", "fp32", "--out", tmp_path / "p")
    assert code == 0, err
    assert seen == [["teacher (4 attention)", "hybrid 1:1 (2A+2M)", "hybrid 1:3 (1A+3M)"]]
    assert (tmp_path / "p" / "cache_growth.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ profile speed
FAKE_TRANSFORMERS = '''
"""A stand-in for transformers whose Qwen2 fails at the second measured point (as an API change would)."""
import torch

__version__ = "99.0-standin"
calls = {"prefills": 0}


class Qwen2Config:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _Out:
    def __init__(self, past):
        self.past_key_values = past


class Qwen2ForCausalLM(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        if past_key_values is None:
            calls["prefills"] += 1
            if calls["prefills"] == 2:
                raise TypeError("crop() got an unexpected keyword argument")
            return _Out({"tokens": input_ids.shape[1]})
        x = self.proj(torch.zeros(input_ids.shape[0], self.proj.in_features))
        return _Out(past_key_values)
'''


def test_profile_speed_keeps_its_results_when_the_transformers_reference_fails(tmp_path, capsys, monkeypatch):
    if "transformers" in sys.modules or __import__("importlib").util.find_spec("transformers") is not None:
        pytest.skip("a real transformers is installed; the stand-in would not be imported")
    pkg = tmp_path / "site" / "transformers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_TRANSFORMERS))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    arch = tmp_path / "tiny.yaml"
    arch.write_text(TINY_ARCH)
    code, out, err = run(capsys, "profile", "speed", "--arch", arch, "--ratio", "1:1", "--batch", "1",
                         "--contexts", "8,16", "--decode-steps", "2", "--repeats", "2", "--prefill-chunk", "4",
                         "--device", "cpu", "--out", tmp_path / "p", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert len(res["rows"]) == 4  # 2 models × 2 contexts, all measured
    assert [(r["context"], r["batch"]) for r in res["reference"]] == [(8, 1)]  # measured before the failure
    note = next(n for n in res["notes"] if "transformers" in n)
    assert "failed after 1 of 2 points" in note and "TypeError" in note
    saved = json.loads((tmp_path / "p" / "speed.json").read_text())
    assert saved["reference"] == res["reference"] and (tmp_path / "p" / "speed.png").stat().st_size > 0
    sys.modules.pop("transformers", None)

"""Damaged inputs are one sentence naming the file and exit 2 (issue 14): an unsafe pickle posing as a
checkpoint, the files a `distill --resume` reads, and weights holding NaN in `score` and `synth`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamtra_cli import distillation as kd
from mamtra_cli.checkpoints import WEIGHTS_FILE, load_foreign_checkpoint
from mamtra_cli.cli import main
from tests.stages.harness import make_tiny_triple, one_error, run
from mamtra_cli.errors import UserError
from mamtra_cli.mini import BUILTIN_DIR


class Payload:
    """Unpickling this would create the file `marker` (a stand-in for any code an attacker wants run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny CosyVoice-format teacher T (llm.pt), its 1:1 hybrid S and data; a finished distill run whose
    checkpoint step-000001 the resume tests copy into a fresh OUT.partial/."""
    root = tmp_path_factory.mktemp("damaged")
    make_tiny_triple(root)
    assert main(distill_args(root, root / "run1")) == 0
    return root


def distill_args(root: Path, out: Path) -> list[str]:
    return [str(a) for a in ["distill", "--teacher", root / "T", "--student", root / "S", "--data",
                             root / "train.jsonl", "--out", out, "--max-steps", "2", "--save-every", "1",
                             "--eval-every", "0", "--warmup", "0", "--batch-tokens", "60", "--device", "cpu",
                             "--threads", "1"]]


def interrupted_run(root: Path, out: Path) -> Path:
    """OUT.partial/ as a run killed after its checkpoint at step 1 leaves it; returns that checkpoint."""
    partial = kd.partial_dir(out)
    shutil.copytree(root / "run1" / "checkpoints" / "step-000001", partial / "checkpoints" / "step-000001")
    rows = [json.loads(line) for line in (root / "run1" / kd.METRICS_FILE).read_text().splitlines()]
    (partial / kd.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= 1))
    cfg = kd.DistillConfig(warmup=0, max_steps=2, batch_tokens=60, save_every=1, eval_every=0)
    inputs = {k: str((root / v).resolve()) for k, v in (("teacher", "T"), ("student", "S"), ("data", "train.jsonl"))}
    (partial / kd.RUN_FILE).write_text(json.dumps({**cfg.to_dict(), "inputs": inputs}))
    return partial / "checkpoints" / "step-000001"


# ------------------------------------------------------------------------------------------ unsafe pickle
def test_unsafe_pickle_is_named_as_such_and_never_runs(dirs, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "extra": Payload(marker)}, evil)
    with pytest.raises(UserError) as e:
        load_foreign_checkpoint(evil, "pass the original llm.pt")
    msg = str(e.value)
    assert "unsafe pickle" in msg and "weights-only" in msg and "not a valid pickle" not in msg
    assert "original checkpoint" in msg and "re-save only the weights" in msg and str(evil) in msg
    assert not marker.exists()
    # the same through a stage: a CosyVoice directory whose llm.pt carries code
    teacher = tmp_path / "T"
    shutil.copytree(dirs / "T", teacher)
    sd = torch.load(teacher / "llm.pt", weights_only=True)
    torch.save({**sd, "extra": Payload(marker)}, teacher / "llm.pt")
    code, out, err = run(capsys, "score", "--model", teacher, "--data", dirs / "train.jsonl")
    assert code == 2 and out == "" and "unsafe pickle" in one_error(err) and "llm.pt" in err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ distill --resume
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    path.write_bytes(b"\x17garbage, not what was written" * 10)


def _nan(path: Path) -> None:
    state = load_file(str(path))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    save_file(state, str(path))


@pytest.mark.parametrize("file, damage, needle", [
    (WEIGHTS_FILE, _truncate, "Cannot read weights"),
    (WEIGHTS_FILE, _garble, "Cannot read weights"),
    (WEIGHTS_FILE, _nan, "non-finite"),
    (kd.TRAINER_STATE_FILE, _truncate, "Cannot read"),
    (kd.TRAINER_STATE_FILE, _garble, "Cannot read"),
])
def test_resume_with_a_damaged_checkpoint_file_is_one_sentence(dirs, tmp_path, capsys, file, damage, needle):
    out = tmp_path / "run2"
    ckpt = interrupted_run(dirs, out)
    damage(ckpt / file)
    code, stdout, err = run(capsys, *distill_args(dirs, out), "--resume")
    line = one_error(err)
    assert code == 2 and stdout == "" and needle in line and str(ckpt / file) in line
    assert "--resume" in line  # and what to do about it
    assert not out.exists() and ckpt.is_dir()  # the interrupted run's state is left as it was


def test_resume_with_a_garbled_metrics_line_is_one_sentence(dirs, tmp_path, capsys):
    out = tmp_path / "run2"
    interrupted_run(dirs, out)
    metrics = kd.partial_dir(out) / kd.METRICS_FILE
    metrics.write_text("{not json\n" + metrics.read_text())
    code, _, err = run(capsys, *distill_args(dirs, out), "--resume")
    line = one_error(err)
    assert code == 2 and "Line 1" in line and str(metrics) in line


def test_resume_drops_a_torn_last_metrics_line_and_finishes(dirs, tmp_path, capsys):
    """A run killed while appending leaves a last line without its newline: that row is later than the
    checkpoint, so the resume drops it rather than refusing to continue."""
    out = tmp_path / "run2"
    interrupted_run(dirs, out)
    metrics = kd.partial_dir(out) / kd.METRICS_FILE
    metrics.write_text(metrics.read_text() + '{"kind": "train", "step": 2, "lo')
    code, _, err = run(capsys, *distill_args(dirs, out), "--resume")
    assert code == 0, err
    rows = [json.loads(line) for line in (out / kd.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]


# ------------------------------------------------------------------------------------------ NaN weights
def test_score_refuses_weights_with_nan_naming_the_model(dirs, tmp_path, capsys):
    bad = tmp_path / "S_nan"
    shutil.copytree(dirs / "S", bad)
    _nan(bad / WEIGHTS_FILE)
    code, out, err = run(capsys, "score", "--model", bad, "--data", dirs / "train.jsonl", "--json")
    line = one_error(err)
    assert code == 2 and out == "" and str(bad) in line and "non-finite" in line


def test_distill_refuses_a_student_with_nan(dirs, tmp_path, capsys):
    bad = tmp_path / "S_nan"
    shutil.copytree(dirs / "S", bad)
    _nan(bad / WEIGHTS_FILE)
    args = distill_args(dirs, tmp_path / "kd")
    args[args.index("--student") + 1] = str(bad)
    code, _, err = run(capsys, *args)
    assert code == 2 and str(bad) in one_error(err) and "non-finite" in err
    assert not (tmp_path / "kd").exists() and not kd.partial_dir(tmp_path / "kd").exists()


@pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(), reason="no built-in mini voice")
def test_synth_refuses_a_mini_model_with_nan(tmp_path, capsys):
    hybrid = tmp_path / "h"
    assert main(["transfer", "--teacher", "mini", "--ratio", "1:1", "--out", str(hybrid)]) == 0
    _nan(hybrid / WEIGHTS_FILE)
    code, out, err = run(capsys, "synth", "Hello.", "--model", hybrid, "--assets", "mini", "--out",
                         tmp_path / "x.wav", "--json")
    line = one_error(err)
    assert code == 2 and out == "" and str(hybrid) in line and "non-finite" in line
    assert not (tmp_path / "x.wav").exists()

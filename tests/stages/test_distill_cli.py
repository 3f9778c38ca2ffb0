"""End-to-end `mamtra distill`: tiny teacher → transfer → distill → score; two gloo processes under
torchrun equal one process on the same global batches; a SIGKILLed run resumed from its checkpoint ends
bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mamtra_cli import distillation as kd
from mamtra_cli.cli import main
from tests.stages.harness import make_tiny_triple

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    """Tiny CosyVoice-format teacher, its 1:1 student, and data sampled from the teacher."""
    root = tmp_path_factory.mktemp("distill_e2e")
    make_tiny_triple(root, utterances=16, max_new_tokens=16, val=4)
    return root


def common(root: Path) -> list[str]:
    return ["--teacher", str(root / "T"), "--student", str(root / "S"), "--data", str(root / "train.jsonl"),
            "--batch-tokens", "64", "--warmup", "2", "--lr", "3e-3", "--device", "cpu", "--threads", "1",
            "--train", "all"]


def weights(d: Path) -> dict:
    return load_file(str(d / "model.safetensors"))


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def test_distill_then_score_and_distill_again(setup_dirs, tmp_path, capsys):
    root = setup_dirs
    out = tmp_path / "kd"
    assert main(["distill", *common(root), "--val", str(root / "val.jsonl"), "--out", str(out),
                 "--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("config.yaml", "model.safetensors", "manifest.json", "metrics.jsonl", "loss.png",
                 "checkpoints/step-000002/COMPLETE"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "distill" and manifest["metrics"]["steps"] == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [0, 2, 4]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert {"step", "epoch", "lr", "loss", "kl", "ce", "grad_norm", "tokens_per_s"} <= set(rows[1])
    # the final model is a valid `score` input, and its score is the run's final validation CE
    assert main(["score", "--model", str(out), "--data", str(root / "val.jsonl"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["ce"] == pytest.approx(summary["val_ce"], rel=1e-6)
    assert scored["ce"] < rows[0]["val_ce"]  # it learned something
    # …and a valid `distill --student`
    assert main(["distill", *common(root)[:2], "--student", str(out), *common(root)[4:], "--out",
                 str(tmp_path / "kd2"), "--max-steps", "1", "--save-every", "0"]) == 0
    # plot-runs overlays both
    assert main(["plot-runs", str(out), str(tmp_path / "kd2"), "--labels", "a,b", "--out",
                 str(tmp_path / "runs.png"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["run"] for r in table["runs"]] == ["a", "b"] and (tmp_path / "runs.png").stat().st_size > 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(setup_dirs, tmp_path):
    root = setup_dirs
    args = [*common(root), "--max-steps", "3", "--save-every", "0", "--grad-accum", "2"]
    assert main(["distill", *args, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "mamtra_cli", "distill", *args, "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    steps = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "train"] == [1, 2, 3]


def test_sigkill_then_resume_is_bit_identical(setup_dirs, tmp_path):
    root = setup_dirs
    args = [*common(root), "--max-steps", "24", "--save-every", "3", "--eval-every", "0"]
    cmd = [sys.executable, "-m", "mamtra_cli", "distill", *args]

    assert main(["distill", *args, "--out", str(tmp_path / "full")]) == 0  # uninterrupted, in this process

    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not kd.complete_checkpoints(kd.partial_dir(out)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    saved = kd.complete_checkpoints(kd.partial_dir(out))
    assert saved and saved[-1].name != "step-000024"

    other_lr = [a if a != "3e-3" else "1e-3" for a in args]
    assert main(["distill", *other_lr, "--out", str(out), "--resume"]) == 2  # settings must match the killed run

    resumed = subprocess.run([*cmd, "--out", str(out), "--resume"], env=env(), capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = weights(tmp_path / "full"), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, 25))  # no duplicated steps from the killed try

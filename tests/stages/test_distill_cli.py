"""End-to-end `mamtra distill`: tiny teacher → transfer → distill → score; two gloo processes under
torchrun equal one process on the same global batches; a SIGKILLed run resumed from its checkpoint ends
bit-identical to an uninterrupted one; the recipe options (--stages, --select, --patience, repeated --data)
from the command line, and their one-sentence refusals."""

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
from tests.stages.harness import make_tiny_triple, one_error, run

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


# ------------------------------------------------------------------------------------------ the recipe options
def recipe_args(root: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in ["distill", "--teacher", root / "T", "--student", root / "S", "--out", out,
                             "--batch-tokens", "64", "--warmup", "0", "--device", "cpu", "--threads", "1",
                             "--save-every", "0", *extra]]


def test_stages_best_and_patience_from_the_command_line(setup_dirs, tmp_path, capsys):
    root = setup_dirs
    out = tmp_path / "kd"
    code, stdout, err = run(capsys, *recipe_args(root, out, "--data", root / "train.jsonl", "--val",
                                                 root / "val.jsonl", "--stages", "mamba:2,all:2:1e-2",
                                                 "--eval-every", "1", "--patience", "3", "--json"))
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_ce"] for r in rows if r["kind"] == "val"}
    best = min(vals, key=lambda k: (vals[k], k))
    assert summary["selected"] == {"rule": "best val CE", "step": best, "val_ce": vals[best]}
    assert summary["last_val_ce"] == vals[4] and summary["steps"] == 4 and not summary["stopped_early"]
    assert [(st["train"], st["start"], st["end"]) for st in summary["stages"]] == [("mamba", 0, 2), ("all", 2, 4)]
    assert [r["lr"] for r in rows if r["kind"] == "train"][2] == pytest.approx(1e-2)  # stage 2's own lr
    params = json.loads((out / "manifest.json").read_text())["parameters"]
    assert params["stages"] == [["mamba", 2, None], ["all", 2, 1e-2]] and params["train"] is None
    assert params["select"] == "best" and params["patience"] == 3
    # the plain (non --json) output prints dicts and lists as JSON
    code, stdout, err = run(capsys, *recipe_args(root, tmp_path / "kd2", "--data", root / "train.jsonl",
                                                 "--max-steps", "1", "--select", "last"))
    assert code == 0, err
    fields = dict(line.split("\t", 1) for line in stdout.strip().splitlines())
    assert json.loads(fields["selected"]) == {"rule": "last", "step": 1, "val_ce": None}
    assert fields["utterances"] == "12" and fields["stopped_early"] == "False"


def test_several_data_manifests(setup_dirs, tmp_path, capsys):
    from mamtra_cli.data_manifest import ManifestHeader, read_manifest, write_manifest

    root = setup_dirs
    _, utts = read_manifest(root / "train.jsonl")
    real, pseudo = tmp_path / "real.jsonl", tmp_path / "pseudo.jsonl"
    write_manifest(real, ManifestHeader(speech_tokenizer={"name": "s3", "sha256": "aa"}), utts[:5])
    write_manifest(pseudo, ManifestHeader(speech_tokenizer={"name": "s3", "sha256": "aa"}), utts[5:])
    out = tmp_path / "kd"
    code, stdout, err = run(capsys, *recipe_args(root, out, "--data", real, "--data", pseudo, "--max-steps", "2",
                                                 "--json"))
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["utterances"] == len(utts) == 12
    data = json.loads((out / "manifest.json").read_text())["inputs"]["data"]
    assert [(d["path"], d["utterances"]) for d in data] == [(str(real.resolve()), 5), (str(pseudo.resolve()), 7)]
    assert all(len(d["sha256"]) == 64 for d in data) and data[0]["sha256"] != data[1]["sha256"]

    other = tmp_path / "other.jsonl"
    write_manifest(other, ManifestHeader(speech_tokenizer={"name": "s3-v2", "sha256": "bb"}), utts[5:])
    code, stdout, err = run(capsys, *recipe_args(root, tmp_path / "kd2", "--data", real, "--data", other))
    line = one_error(err)
    assert code == 2 and "different speech tokenizers" in line and str(other) in line
    assert not (tmp_path / "kd2").exists() and not kd.partial_dir(tmp_path / "kd2").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--select", "best"], "--select best"),
    (["--patience", "2"], "--patience"),
    (["--stages", "mamba:2", "--train", "all"], "--train"),
    (["--stages", "mamba:2", "--max-steps", "3"], "--max-steps"),
    (["--stages", "mamba:2", "--epochs", "1"], "--epochs"),
    (["--stages", "mamba"], "TRAIN:STEPS"),
    (["--stages", "mamba:0"], "at least 1 step"),
    (["--stages", "mamba:2,no.such.*:2"], "matches no parameter"),
    (["--select", "worst", "--val", "VAL"], "--select"),
    (["--min-delta", "-0.1", "--val", "VAL"], "--min-delta"),
    (["--data", "DATA"], "given twice"),
])
def test_bad_recipe_options_are_one_sentence(setup_dirs, tmp_path, capsys, extra, needle):
    root = setup_dirs
    extra = [str(root / "val.jsonl") if a == "VAL" else str(root / "train.jsonl") if a == "DATA" else a
             for a in extra]
    out = tmp_path / "kd"
    code, stdout, err = run(capsys, *recipe_args(root, out, "--data", root / "train.jsonl", *extra))
    assert code == 2 and stdout == "" and needle in one_error(err), err
    assert not out.exists() and not kd.partial_dir(out).exists()

"""Nothing already written is overwritten without --force, not even by a run that started before it existed
(issue 14): stage outputs are published with an exclusive rename, wavs and profile/plot files with an
exclusive link/rename, and a clash is one sentence with exit code 2 that leaves the other run's output and no
temporary file behind. --force still replaces."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mamtra_cli import checkpoints
from mamtra_cli import profiling as P
from mamtra_cli.errors import UserError
from mamtra_cli.synthesis.wavfile import WavWriter
from mamtra_cli.teachers.tiny import make_tiny_cosyvoice2_dir
from tests.stages.harness import one_error as one_error_line, run, tiny_arch_yaml


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files/directories (ours are .NAME.tmp-… and .NAME.old-…)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(params=["renameat2", "portable"])
def rename_path(request, monkeypatch):
    """Run a test with Linux's renameat2(RENAME_NOREPLACE) and again with the portable fallback (as on a file
    system or libc without it), so both ways of publishing are exercised on this machine."""
    if request.param == "portable":
        monkeypatch.setattr(checkpoints, "_renameat2", lambda src, dst: False)
    elif not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    return request.param


def make_intruder(target: Path, kind: str) -> None:
    """What another run could have put at `target` meanwhile."""
    if kind == "empty dir":  # a plain rename(2) would silently replace an empty directory on Linux
        target.mkdir()
    elif kind == "dir":
        target.mkdir()
        (target / "manifest.json").write_text('{"stage": "other run"}')
    else:
        target.write_text("other run")


def intruder_intact(target: Path, kind: str) -> bool:
    if kind == "empty dir":
        return target.is_dir() and list(target.iterdir()) == []
    if kind == "dir":
        return json.loads((target / "manifest.json").read_text()) == {"stage": "other run"}
    return target.read_text() == "other run"


# ------------------------------------------------------------------------------------------ directories
@pytest.mark.parametrize("kind", ["empty dir", "dir", "file"])
def test_staged_output_keeps_an_output_that_appeared_meanwhile(tmp_path, rename_path, kind):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="appeared while this stage was running"):
        with checkpoints.staged_output(out) as tmp:
            (tmp / "manifest.json").write_text('{"stage": "this run"}')
            make_intruder(out, kind)  # after the up-front check, before the rename
    assert intruder_intact(out, kind)
    assert leftovers(tmp_path) == []  # this run's temporary directory is gone


def test_staged_output_with_force_replaces_and_cleans_up(tmp_path, rename_path):
    out = tmp_path / "out"
    make_intruder(out, "dir")
    with checkpoints.staged_output(out, force=True) as tmp:
        (tmp / "manifest.json").write_text('{"stage": "this run"}')
    assert json.loads((out / "manifest.json").read_text()) == {"stage": "this run"}
    assert leftovers(tmp_path) == []  # the old output moved aside was removed last


@pytest.mark.parametrize("is_dir", [True, False])
def test_rename_noreplace(tmp_path, rename_path, is_dir):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src.mkdir(), (src / "f").write_text("new")) if is_dir else src.write_text("new")
    dst.write_text("old")
    with pytest.raises(FileExistsError):
        checkpoints.rename_noreplace(src, dst)
    assert dst.read_text() == "old" and src.exists()
    dst.unlink()
    checkpoints.rename_noreplace(src, dst)
    assert not src.exists() and ((dst / "f") if is_dir else dst).read_text() == "new"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_cosyvoice2_dir(tmp_path_factory.mktemp("race") / "teacher", layers=2, hidden=32, heads=4,
                                    kv_heads=2, intermediate=64, text_vocab=40, speech_tokens=20, seed=0)


@pytest.mark.parametrize("kind", ["empty dir", "dir"])
def test_transfer_does_not_replace_an_output_published_while_it_ran(teacher_dir, tmp_path, capsys, monkeypatch,
                                                                    kind):
    """The real `mamtra transfer`; another run's output appears at --out while this one writes its files."""
    out = tmp_path / "hybrid"
    save = checkpoints.save_model_dir

    def save_then_other_run_publishes(directory, *args, **kwargs):
        save(directory, *args, **kwargs)
        make_intruder(out, kind)

    monkeypatch.setattr(checkpoints, "save_model_dir", save_then_other_run_publishes)
    code, _, err = run(capsys, "transfer", "--teacher", teacher_dir, "--ratio", "1:1", "--out", out)
    assert code == 2 and "appeared while" in one_error_line(err) and "--force" in err
    assert intruder_intact(out, kind)
    assert leftovers(tmp_path) == []


def test_second_transfer_to_the_same_out_is_refused_and_force_replaces(teacher_dir, tmp_path, capsys):
    out = tmp_path / "hybrid"
    assert run(capsys, "transfer", "--teacher", teacher_dir, "--ratio", "1:1", "--out", out)[0] == 0
    first = (out / "manifest.json").read_text()
    code, _, err = run(capsys, "transfer", "--teacher", teacher_dir, "--ratio", "1:1", "--seed", "1",
                       "--out", out)
    assert code == 2 and "already exists" in one_error_line(err)
    assert (out / "manifest.json").read_text() == first
    assert run(capsys, "transfer", "--teacher", teacher_dir, "--ratio", "1:1", "--seed", "1", "--out", out,
               "--force")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ wav files
def test_wav_writer_keeps_a_file_that_appeared_meanwhile(tmp_path, rename_path):
    target = tmp_path / "out.wav"
    with pytest.raises(UserError, match="appeared while"):
        with WavWriter(target, 16000) as w:
            w.write(np.zeros(160, dtype=np.float32))
            target.write_text("other run")
    assert target.read_text() == "other run"
    assert leftovers(tmp_path) == []


def test_wav_writer_force_replaces_and_refuses_a_directory(tmp_path):
    target = tmp_path / "out.wav"
    target.write_text("old")
    with pytest.raises(UserError, match="already exists"):
        WavWriter(target, 16000).__enter__()
    with WavWriter(target, 16000, force=True) as w:
        w.write(np.zeros(160, dtype=np.float32))
    assert target.read_bytes()[:4] == b"RIFF" and w.samples == 160
    with pytest.raises(UserError, match="is a directory"):
        with WavWriter(tmp_path, 16000, force=True):
            pass
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ profile --out
TINY_ARCH = tiny_arch_yaml(2)


def test_profile_out_needs_force_to_replace_its_files(tmp_path, capsys):
    arch = tmp_path / "tiny.yaml"
    arch.write_text(TINY_ARCH)
    out = tmp_path / "prof"
    args = ["profile", "cache-growth", "--arch", arch, "--ratio", "1:1", "--lengths", "4,8", "--dtype", "fp32",
            "--fill", "synthetic", "--out", out, "--json"]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    files = json.loads(stdout)["files"]
    assert sorted(Path(f).name for f in files.values()) == ["cache_growth.csv", "cache_growth.json",
                                                           "cache_growth.png"]
    (out / "cache_growth.json").write_text("kept")
    code, _, err = run(capsys, *args)
    assert code == 2 and "cache_growth.csv already exists" in one_error_line(err) and "--force" in err
    assert (out / "cache_growth.json").read_text() == "kept"
    # another profile's files may share the folder
    assert run(capsys, "profile", "vram", "--arch", arch, "--ratio", "1:1", "--lengths", "8", "--batch", "1",
               "--prompt-tokens", "4", "--dtype", "fp32", "--device", "cpu", "--threads", "1", "--out", out)[0] == 0
    code, _, err = run(capsys, *args, "--force")
    assert code == 0, err
    assert json.loads((out / "cache_growth.json").read_text())["models"]
    assert (out / "vram.csv").is_file() and leftovers(out) == []
    # --out naming a file, not a folder
    code, _, err = run(capsys, *args[:-3], "--out", out / "cache_growth.csv")
    assert code == 2 and "is a file" in one_error_line(err)


def test_write_results_takes_back_its_files_when_another_run_wins(tmp_path, rename_path):
    out = tmp_path / "prof"

    def plot_while_another_run_publishes(png: Path) -> None:
        png.write_bytes(b"png of this run")
        (out / "speed.png").write_text("other run")

    with pytest.raises(UserError, match="appeared while"):
        P.write_results(out, "speed", [{"a": 1}], {"rows": []}, plot_while_another_run_publishes)
    assert sorted(p.name for p in out.iterdir()) == ["speed.png"]  # our csv/json taken back, no temp files
    assert (out / "speed.png").read_text() == "other run"


# ------------------------------------------------------------------------------------------ plot-runs --out
def test_plot_runs_out_needs_force_and_must_be_a_file(tmp_path, capsys):
    run_dir = tmp_path / "kd"
    run_dir.mkdir()
    rows = [{"kind": "train", "step": s, "kl": 1.0 / s, "ce": 2.0, "loss": 3.0, "lr": 1e-3} for s in range(1, 5)]
    rows.append({"kind": "val", "step": 4, "val_ce": 2.5, "val_accuracy": 0.1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "fig.png"
    assert run(capsys, "plot-runs", run_dir, "--out", png)[0] == 0
    first = png.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    png.write_bytes(b"kept")
    code, _, err = run(capsys, "plot-runs", run_dir, "--out", png)
    assert code == 2 and "already exists" in one_error_line(err) and png.read_bytes() == b"kept"
    assert run(capsys, "plot-runs", run_dir, "--out", png, "--force")[0] == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run(capsys, "plot-runs", run_dir, "--out", tmp_path)
    assert code == 2 and "is a directory" in one_error_line(err)
    code, _, err = run(capsys, "plot-runs", run_dir, "--out", tmp_path / "fig.notaformat")
    assert code == 2 and "cannot write .notaformat" in one_error_line(err)
    assert leftovers(tmp_path) == []

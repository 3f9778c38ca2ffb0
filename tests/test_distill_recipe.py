"""The distillation recipe of issue 13, on the tiny teacher/hybrid/data triple: best-checkpoint selection by
held-out CE (--select best|last), early stopping (--patience/--min-delta), staged training in one run
(--stages mamba:N,all:M) with resume in the middle of a stage, and several --data manifests. The library
function `distillation.distill` is called directly; the CLI's side is in tests/stages/test_distill_cli.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from mamtra_cli import distillation as kd
from mamtra_cli.data_manifest import read_manifest
from mamtra_cli.errors import UserError
from mamtra_cli.models.speech_lm import load_model_dir
from mamtra_cli.scoring import score_utterances
from tests.stages.harness import make_tiny_triple

QUIET = Console(quiet=True)
# lr 3e-2 (cosine over 8 steps, all parameters) lowers the tiny student's val CE for three steps, then raises
# it: the last weights are not the best ones, as in the over-fitting 120-step demo run.
HIGH_LR = 3e-2


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    make_tiny_triple(root, utterances=16, max_new_tokens=16, val=4)
    return root


def run_kd(root: Path, out: Path, **kw) -> dict:
    args = dict(val=root / "val.jsonl", batch_tokens=64, warmup=0, lr=HIGH_LR, schedule="cosine", train="all",
                device="cpu", threads=1, save_every=0, eval_every=1, console=QUIET)
    args.update(kw)
    if args.get("stages") is not None:
        args.pop("train")  # --stages replaces --train
    data = args.pop("data", root / "train.jsonl")
    return kd.distill(root / "T", root / "S", data, out, **args)


def rows(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / kd.METRICS_FILE).read_text().splitlines()) if r["kind"] == kind]


def weights(d: Path) -> dict:
    return load_file(str(d / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def val_ce(model_dir: Path, root: Path) -> float:
    _, utts = read_manifest(root / "val.jsonl")
    with torch.no_grad():
        return score_utterances(load_model_dir(model_dir).eval(), utts, batch_size=8)["ce"]


@pytest.fixture(scope="module")
def reference(triple, tmp_path_factory):
    """8 steps at HIGH_LR, --select last, val CE at every step, a checkpoint at every step."""
    out = tmp_path_factory.mktemp("ref") / "last"
    summary = run_kd(triple, out, max_steps=8, save_every=1, select="last")
    return out, summary


# ------------------------------------------------------------------------------------------ selection
def test_select_best_ships_the_best_evaluation_and_last_the_last(triple, reference, tmp_path):
    last_out, last = reference
    vals = [r["val_ce"] for r in rows(last_out, "val")]
    assert [r["step"] for r in rows(last_out, "val")] == list(range(9))
    best_step = min(range(9), key=lambda i: (vals[i], i))
    assert 0 < best_step < 8 and vals[8] > vals[best_step], vals  # the setting must over-shoot

    out = tmp_path / "best"
    s = run_kd(triple, out, max_steps=8, save_every=1)  # --select defaults to best with --val
    assert s["selected"] == {"rule": "best val CE", "step": best_step, "val_ce": vals[best_step]}
    assert s["val_ce"] == vals[best_step] and s["last_val_ce"] == vals[8] and s["steps"] == 8
    assert not s["stopped_early"] and s["stopped_at"] is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selected"] == s["selected"] and manifest["metrics"]["selected"] == s["selected"]
    assert manifest["parameters"]["select"] == "best"
    # OUT holds the weights of the best step (its checkpoint), not the last, and scores what was recorded
    assert same(weights(out), weights(out / "checkpoints" / f"step-{best_step:06d}"))
    assert not same(weights(out), weights(last_out))
    assert val_ce(out, triple) == pytest.approx(vals[best_step], abs=1e-6)
    assert rows(out, "val")[best_step]["improved"] and rows(out, "val")[-1]["best_step"] == best_step
    assert not kd.partial_dir(out).exists()

    # --select last: the last step's weights (the same run, step for step)
    assert last["selected"] == {"rule": "last", "step": 8, "val_ce": vals[8]} and last["val_ce"] == vals[8]
    assert same(weights(out / "checkpoints" / "step-000007"), weights(last_out / "checkpoints" / "step-000007"))
    assert val_ce(last_out, triple) == pytest.approx(vals[8], abs=1e-6)


def test_untrained_student_is_shipped_with_a_warning_when_it_is_best(triple, tmp_path, capsys):
    s = run_kd(triple, tmp_path / "kd", lr=0.1, max_steps=3)
    assert s["selected"]["step"] == 0 and s["last_val_ce"] > s["val_ce"]
    assert same(weights(tmp_path / "kd"), weights(triple / "S"))
    assert "untrained student (step 0)" in capsys.readouterr().err


def test_min_delta_makes_small_gains_no_improvement(triple, reference, tmp_path):
    vals = [r["val_ce"] for r in rows(reference[0], "val")]
    gains = [vals[0] - v for v in vals[1:]]
    delta = max(gains) + 1e-3  # no evaluation beats step 0 by that much
    s = run_kd(triple, tmp_path / "kd", max_steps=8, min_delta=delta)
    assert s["selected"]["step"] == 0
    assert [r["improved"] for r in rows(tmp_path / "kd", "val")] == [True] + [False] * 8


# ------------------------------------------------------------------------------------------ early stopping
def expected_stop(vals: list[float], patience: int, min_delta: float = 0.0) -> int | None:
    """The step the patience rule stops at, for val CEs at steps 0, 1, 2, …"""
    best, bad = None, 0
    for step, v in enumerate(vals):
        if best is None or v < best - min_delta:
            best, bad = v, 0
        else:
            bad += 1
            if bad >= patience:
                return step
    return None


@pytest.mark.parametrize("patience", [1, 2])
def test_patience_stops_at_the_step_the_val_curve_dictates(triple, reference, tmp_path, patience):
    ref_out, _ = reference
    ref_vals = [r["val_ce"] for r in rows(ref_out, "val")]
    stop = expected_stop(ref_vals, patience)
    assert stop is not None and stop < 8, ref_vals  # the setting must trigger it
    out = tmp_path / "kd"
    s = run_kd(triple, out, max_steps=8, patience=patience)
    assert s["steps"] == stop and s["stopped_early"] and s["stopped_at"] == stop
    assert [r["val_ce"] for r in rows(out, "val")] == ref_vals[:stop + 1]  # no extra evaluation at the end
    # the cosine schedule still spans the planned 8 steps: the full run's learning rates, step for step
    assert [r["lr"] for r in rows(out, "train")] == [r["lr"] for r in rows(ref_out, "train")][:stop]
    best = min(range(stop + 1), key=lambda i: (ref_vals[i], i))
    assert s["selected"]["step"] == best and same(weights(out), weights(ref_out / f"checkpoints/step-{best:06d}"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stopped_early"] is True and manifest["stopped_at"] == stop


# ------------------------------------------------------------------------------------------ stages
def test_stages_train_mamba_first_then_everything(triple, tmp_path):
    out = tmp_path / "kd"
    s = run_kd(triple, out, val=None, stages="mamba:3,all:3", save_every=1, warmup=2, schedule="linear", lr=3e-3)
    assert s["steps"] == 6 and s["selected"] == {"rule": "last", "step": 6, "val_ce": None}
    assert [(st["train"], st["start"], st["end"]) for st in s["stages"]] == [("mamba", 0, 3), ("all", 3, 6)]
    init, after1, final = weights(triple / "S"), weights(out / "checkpoints/step-000003"), weights(out)
    frozen = [k for k in init if ".mamba." not in k]
    assert frozen and any(".attn" in k or "self_attn" in k for k in frozen)
    assert all(torch.equal(init[k], after1[k]) for k in frozen)  # stage 1: attention & co. bit-identical
    assert any(not torch.equal(init[k], after1[k]) for k in init if ".mamba." in k)
    changed = [k for k in frozen if not torch.equal(after1[k], final[k])]
    assert any("attn" in k for k in changed)  # stage 2 trains the attention layers too
    train = rows(out, "train")
    assert [r["stage"] for r in train] == [0, 0, 0, 1, 1, 1]
    # every stage has its own warm-up and schedule over its own steps
    lrs = [kd.lr_at(i, 3e-3, 2, 3, "linear") for i in range(3)]
    assert [r["lr"] for r in train] == pytest.approx(lrs + lrs)
    state = torch.load(out / "checkpoints/step-000004" / kd.TRAINER_STATE_FILE, weights_only=True)
    assert state["stage"] == 1 and state["stage_start"] == 3
    n_all = sum(1 for _ in load_model_dir(triple / "S").parameters())
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == n_all  # a fresh AdamW over all
    state3 = torch.load(out / "checkpoints/step-000003" / kd.TRAINER_STATE_FILE, weights_only=True)
    assert sum(len(g["params"]) for g in state3["optimizer"]["param_groups"]) < n_all


def test_patience_ends_the_stage_and_the_next_one_starts_a_fresh_count(triple, tmp_path):
    """lr 0.1 makes every step worse than step 0: patience 2 ends stage 1 after two steps; stage 2 gets its own
    two evaluations (a count carried over would end it after one) and then stops too."""
    out = tmp_path / "kd"
    s = run_kd(triple, out, lr=0.1, schedule="constant", stages="all:4,mamba:4", patience=2, select="last")
    vals = [r["val_ce"] for r in rows(out, "val")]
    assert all(v > vals[0] for v in vals[1:]), vals
    assert [(st["start"], st["end"], st["stopped_early"]) for st in s["stages"]] == [(0, 2, True), (2, 4, True)]
    assert s["steps"] == 4 and s["stopped_early"] and s["stopped_at"] == 4
    assert [r["stage"] for r in rows(out, "train")] == [0, 0, 1, 1]
    assert [r["bad_evals"] for r in rows(out, "val")] == [0, 1, 2, 1, 2]


def crash_at(monkeypatch, step: int) -> None:
    """Make the next run raise just before its optimizer step `step` (after everything up to step-1 was done)."""
    real = kd.Distiller.train_step

    def step_or_crash(self, micro):
        if self.step == step - 1:
            raise RuntimeError("simulated crash")
        return real(self, micro)

    monkeypatch.setattr(kd.Distiller, "train_step", step_or_crash)


def test_resume_in_the_middle_of_stage_two_is_bit_identical(triple, tmp_path, monkeypatch):
    kw = dict(stages="mamba:3,all:4", save_every=2, eval_every=1, warmup=1, schedule="cosine")
    full = run_kd(triple, tmp_path / "full", **kw)

    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        crash_at(m, 6)  # steps 1-5 done, checkpoints at 2 and 4 (inside stage 2), best at step ≤ 5 written
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_kd(triple, out, **kw)
    partial = kd.partial_dir(out)
    assert [c.name for c in kd.complete_checkpoints(partial)] == ["step-000002", "step-000004"]
    state = torch.load(partial / "checkpoints/step-000004" / kd.TRAINER_STATE_FILE, weights_only=True)
    assert state["stage"] == 1 and state["stage_start"] == 3 and state["best"] is not None
    assert (partial / kd.BEST_DIR / f"step-{state['best']['step']:06d}" / "model.safetensors").is_file()
    with pytest.raises(UserError, match="--stages"):  # a resume must keep the stages
        run_kd(triple, out, **{**kw, "stages": "mamba:3,all:5"}, resume=True)

    resumed = run_kd(triple, out, **kw, resume=True)
    assert same(weights(out), weights(tmp_path / "full"))
    assert resumed["selected"] == full["selected"] and resumed["last_val_ce"] == full["last_val_ce"]
    assert resumed["stages"] == full["stages"]
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows(out, "train") + rows(out, "val")]
    want = [{k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in rows(tmp_path / "full", "train") + rows(tmp_path / "full", "val")]
    assert strip == want


def test_resume_keeps_the_patience_count(triple, reference, tmp_path, monkeypatch):
    """Patience 2 stops the reference curve at step 5 after a bad evaluation at step 4; a run interrupted before
    step 5 and resumed from its step-4 checkpoint must still stop at 5 (a count restarted at 0 would stop at 6)."""
    ref_vals = [r["val_ce"] for r in rows(reference[0], "val")]
    assert expected_stop(ref_vals, 2) == 5 and expected_stop(ref_vals[:5], 1) == 4, ref_vals
    out = tmp_path / "kd"
    with monkeypatch.context() as m:
        crash_at(m, 5)
        with pytest.raises(RuntimeError):
            run_kd(triple, out, max_steps=8, save_every=2, patience=2)
    s = run_kd(triple, out, max_steps=8, save_every=2, patience=1 + 1, resume=True)
    assert s["steps"] == 5 and s["stopped_at"] == 5 and s["selected"]["step"] == 3
    assert same(weights(out), weights(reference[0] / "checkpoints/step-000003"))


def test_resume_without_the_best_weights_is_one_sentence(triple, tmp_path, monkeypatch):
    out = tmp_path / "kd"
    with monkeypatch.context() as m:
        crash_at(m, 4)
        with pytest.raises(RuntimeError):
            run_kd(triple, out, max_steps=6, save_every=3)
    shutil.rmtree(kd.partial_dir(out) / kd.BEST_DIR)
    with pytest.raises(UserError, match="best so far") as e:
        run_kd(triple, out, max_steps=6, save_every=3, resume=True)
    assert "\n" not in str(e.value)


def test_best_weights_are_pruned_to_what_a_resume_can_need(triple, tmp_path, monkeypatch):
    out = tmp_path / "kd"
    with monkeypatch.context() as m:
        crash_at(m, 8)
        with pytest.raises(RuntimeError):
            run_kd(triple, out, max_steps=8, save_every=2)
    partial = kd.partial_dir(out)
    kept = sorted(int(p.name[5:]) for p in (partial / kd.BEST_DIR).iterdir())
    named = {json.loads((c / "manifest.json").read_text())["outputs"]["best_step"]
             for c in kd.complete_checkpoints(partial)}
    vals = [r["val_ce"] for r in rows(partial, "val")]
    current = min(range(len(vals)), key=lambda i: (vals[i], i))
    assert set(kept) <= named | {current} and current in kept


# ------------------------------------------------------------------------------------------ data
def test_two_manifests_train_like_their_concatenation(triple, tmp_path):
    lines = (triple / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:7]))
    (tmp_path / "b.jsonl").write_text("".join(lines[7:]))
    both = run_kd(triple, tmp_path / "two", data=[tmp_path / "a.jsonl", tmp_path / "b.jsonl"], max_steps=3)
    one = run_kd(triple, tmp_path / "one", max_steps=3)
    assert both["utterances"] == one["utterances"] == len(lines) == 12
    assert same(weights(tmp_path / "two"), weights(tmp_path / "one"))
    data = json.loads((tmp_path / "two" / "manifest.json").read_text())["inputs"]["data"]
    assert [(d["path"], d["sha256"], d["utterances"]) for d in data] == [
        (str((tmp_path / n).resolve()), hashlib.sha256((tmp_path / n).read_bytes()).hexdigest(), u)
        for n, u in (("a.jsonl", 7), ("b.jsonl", 5))]


# ------------------------------------------------------------------------------------------ checks
def test_parse_stages():
    assert kd.parse_stages("mamba:2000,all:1000:3e-5") == (("mamba", 2000, None), ("all", 1000, 3e-5))
    assert kd.parse_stages("backbone.layers.1.*:5") == (("backbone.layers.1.*", 5, None),)
    for bad in ("mamba", "mamba:x", ":3", "mamba:3,", "all:3:fast"):
        with pytest.raises(UserError, match="TRAIN:STEPS"):
            kd.parse_stages(bad)


@pytest.mark.parametrize("over, needle", [
    (dict(stages=(("mamba", 0, None),)), "at least 1 step"),
    (dict(stages=(("mamba", 3, -1.0),)), "learning rate"),
    (dict(stages=(("mamba", 3, None),), max_steps=5), "--max-steps"),
    (dict(stages=(("mamba", 3, None),), epochs=1), "--epochs"),
    (dict(select="worst"), "--select"),
    (dict(patience=-1), "--patience"),
    (dict(min_delta=float("nan")), "--min-delta"),
])
def test_config_refuses_bad_recipe_values(over, needle):
    with pytest.raises(UserError, match=needle):
        kd.DistillConfig(**over).check()


def test_config_warns_about_patience_without_evaluations_and_short_stages():
    w = kd.DistillConfig(patience=2, eval_every=0, warmup=10, stages=(("mamba", 5, None), ("all", 20, None))).check()
    assert any("--eval-every" in x for x in w) and any("mamba:5" in x for x in w)


def test_distiller_needs_val_for_best_and_patience(triple, tmp_path):
    from mamtra_cli.teachers import load_teacher

    teacher, _ = load_teacher(triple / "T")
    _, utts = read_manifest(triple / "train.jsonl")
    for cfg in (kd.DistillConfig(select="best"), kd.DistillConfig(patience=1)):
        d = kd.Distiller(cfg, teacher, load_model_dir(triple / "S"), utts, None, tmp_path)
        with pytest.raises(UserError, match="needs --val"):
            d.setup()

"""`mamtra build-hybrids` at toy size, as a user runs it (a fresh process): pseudo-label → transfer → distill
(Mamba layers only, best val CE) → distill again with joined same-speaker pairs and prompted pseudo-labels (the
prompted phase) → score → pack. The packed hybrid holds exactly the Mamba tensors, materialises
bit-identically to the distilled model, and its manifest lists commands that rebuild it; a second run reuses
every phase of its --work cache."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from mamtra_cli import checkpoints
from mamtra_cli.data_manifest import read_manifest
from mamtra_cli.mini import BUILTIN_DIR
from tests.stages.harness import one_error, run

pytestmark = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(),
                                reason="the built-in mini voice is not in this checkout (mamtra build-mini)")


def build(out, work, *extra):
    cmd = [sys.executable, "-m", "mamtra_cli", "build-hybrids", "--out", str(out), "--work", str(work),
           "--ratios", "1:3", "--toy", "--json", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), r.stderr


def test_build_hybrids_toy_end_to_end(tmp_path, monkeypatch):
    from mamtra_cli.mini import hybrids

    out, work = tmp_path / "hybrids", tmp_path / "work"
    summary, err = build(out, work)
    (row,) = summary["hybrids"]
    assert row["name"] == "mini-1-3" and row["selected"]["rule"] == "best val CE"
    assert row["held_out_ce"] > 0 and summary["teacher_held_out_ce"] > 0
    assert sorted(p.name for p in (out / "mini-1-3").iterdir()) == [
        "config.yaml", "manifest.json", "own_weights.safetensors"]

    # only the Mamba mixers trained, so only they are stored: everything else is the teacher's
    kd = work / "mini-1-3" / "kd-prompted"
    assert row["selected_prompted"]["rule"] != row["selected"]["rule"]  # the prompted phase keeps its last step
    own = load_file(str(out / "mini-1-3" / hybrids.OWN_WEIGHTS))
    full = load_file(str(kd / checkpoints.WEIGHTS_FILE))
    assert own and all(".mamba." in k for k in own)
    assert sorted(own) == sorted(k for k in full if ".mamba." in k)
    assert row["bytes"] < 0.25 * (kd / checkpoints.WEIGHTS_FILE).stat().st_size

    # addressed by name, it is the distilled model bit for bit
    monkeypatch.setattr(hybrids, "HYBRIDS_DIR", out)
    monkeypatch.setenv("MAMTRA_CACHE_DIR", str(tmp_path / "cache"))
    made = load_file(str(hybrids.materialize("mini-1-3") / checkpoints.WEIGHTS_FILE))
    assert sorted(made) == sorted(full) and all(hybrids.same_bits(made[k], full[k]) for k in full)

    # the manifest records the commands, the recipe and the data hashes
    manifest = json.loads((out / "mini-1-3" / "manifest.json").read_text())
    steps = [c.split()[1] if c.startswith("mamtra ") else c.split()[0] for c in manifest["commands"]]
    assert steps == ["pseudo-label"] * 4 + ["(joined:", "score", "transfer", "distill", "distill", "score"]
    assert all("--prompts" in c for c in manifest["commands"][2:4]) and "--prompts" not in manifest["commands"][0]
    prompted = manifest["commands"][8]
    assert f"--student {work / 'mini-1-3' / 'kd'} " in prompted and "joined/train.jsonl" in prompted
    assert "plp-train/data.jsonl" in prompted and "plp-train" not in manifest["commands"][7]
    _, plp = read_manifest(work / "plp-train" / "data.jsonl")
    assert len(plp) == 6 and all(u.utt.startswith("plp_") and u.spk for u in plp)
    _, val = read_manifest(work / "joined" / "val.jsonl")  # pseudo-labels + joined pairs + prompted pseudo-labels
    assert sum(u.utt.startswith("plp_") for u in val) == 3 and sum(u.utt.startswith("joined-val") for u in val) == 4
    assert manifest["parameters"]["recipe"]["train"] == "mamba" and manifest["base"]["name"] == "mini"
    assert manifest["rebuild"] == "mamtra build-hybrids --ratios 1:3 --toy --out DIR" and row["steps"] == 2
    # 1:3 keeps the attention layers the teacher leans on most, probed on the real utterances
    transfer_cmd = manifest["commands"][6]
    assert "--placement importance" in transfer_cmd and "--probe-data" in transfer_cmd
    assert manifest["parameters"]["placement"] == "importance"
    probe = checkpoints.read_manifest(work / "mini-1-3" / "init")["parameters"]["probe"]
    ranked = sorted(probe["layers"], key=lambda r: (-r["ce_increase"], r["layer"]))
    assert row["attention_layers"] == sorted(r["layer"] for r in ranked[:3]) and probe["utterances"] == 400
    assert all(len(manifest["inputs"][k]["sha256"]) == 64 for k in ("real_data", "pseudo_train", "pseudo_val",
                                                                   "joined_train", "joined_val",
                                                                   "prompted_pseudo_train", "prompted_pseudo_val"))
    assert manifest["metrics"]["held_out_ce"] == pytest.approx(row["held_out_ce"], abs=1e-4)

    # a second run with the same settings reuses the pseudo-labels, the transfer and both distillations
    before = (kd / checkpoints.WEIGHTS_FILE).stat().st_mtime_ns
    again, err2 = build(out, work, "--force")
    assert (kd / checkpoints.WEIGHTS_FILE).stat().st_mtime_ns == before
    assert "$ mamtra distill" not in err2 and "$ mamtra transfer" not in err2
    assert again["hybrids"][0]["held_out_ce"] == pytest.approx(row["held_out_ce"], abs=1e-9)


@pytest.mark.parametrize("args, expect", [
    (["--ratios", "1:7"], "does not divide"),  # 12 layers are not a multiple of 8
    (["--ratios", "1:3,1:3"], "twice"),
    (["--ratios", "2:3"], "1:k"),
    (["--placement", "middle"], "Unknown --placement"),
])
def test_bad_ratios_are_one_sentence_before_any_work(args, expect, tmp_path, capsys):
    code, _, err = run(capsys, "build-hybrids", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"),
                       "--toy", *args)
    assert code == 2 and expect in one_error(err)
    assert not (tmp_path / "w" / "pl-train").exists() and not (tmp_path / "o").exists()


def test_a_placement_other_than_the_shipped_one_is_named():
    from mamtra_cli.mini.build_hybrids import hybrid_name

    assert hybrid_name("1:3") == hybrid_name("1:3", "importance") == "mini-1-3"
    assert hybrid_name("1:1") == hybrid_name("1:1", "importance") == "mini-1-1"
    assert hybrid_name("1:1", "uniform") == "mini-1-1-uniform"
    assert hybrid_name("1:3", "uniform") == "mini-1-3-uniform"
    assert hybrid_name("1:3", "front") == "mini-1-3-front"


def test_each_shipped_hybrid_has_its_recipe_and_changes_apply_on_top_of_it():
    from dataclasses import asdict, replace

    from mamtra_cli.mini.build_hybrids import SHIPPED_STEPS, Recipe, _recipe_options, shipped_recipe

    assert SHIPPED_STEPS and all(v != Recipe().steps for v in SHIPPED_STEPS.values())
    for k in (1, 3, 5, 11):
        r = shipped_recipe(f"1:{k}")
        assert r == replace(Recipe(), steps=SHIPPED_STEPS.get(k, Recipe().steps))
        assert _recipe_options(asdict(r), f"1:{k}") == ""  # the shipped recipe needs no option to rebuild
    k = next(iter(SHIPPED_STEPS))
    changed = asdict(replace(shipped_recipe(f"1:{k}"), count=100, lr=1e-3))
    assert _recipe_options(changed, f"1:{k}") == " --count 100 --lr 0.001"  # the steps stay the shipped ones
    assert _recipe_options(asdict(Recipe()), f"1:{k}") == f" --steps {Recipe().steps}"


def test_joined_pairs_join_two_utterances_of_one_speaker():
    from mamtra_cli.data_manifest import Utterance
    from mamtra_cli.mini.build_hybrids import joined_pairs

    utts = [Utterance(f"u{i}", [i, i], [100 + i] * (i + 1), f"t{i}", "a" if i < 3 else "b") for i in range(5)]
    utts.append(Utterance("lonely", [9], [9], "t9", "c"))  # the only utterance of its speaker: never joined
    utts.append(Utterance("nobody", [8], [8], "t8", None))
    rows = joined_pairs(utts, 40, seed=3, space_id=1)
    by_id = {u.utt: u for u in utts}
    assert len(rows) == 40 and len({r.utt for r in rows}) == 40
    for r in rows:
        a, b = (by_id[x] for x in r.utt.split("_", 2)[2].split("+"))
        assert a is not b and a.spk == b.spk == r.spk
        assert r.text_tokens == a.text_tokens + [1] + b.text_tokens and r.speech_tokens == a.speech_tokens + b.speech_tokens
        assert r.text == f"{a.text} {b.text}"
    assert {r.spk for r in rows} == {"a", "b"}
    assert [r.utt for r in joined_pairs(utts, 40, seed=3, space_id=1)] == [r.utt for r in rows]
    assert [r.utt for r in joined_pairs(utts, 40, seed=4, space_id=1)] != [r.utt for r in rows]

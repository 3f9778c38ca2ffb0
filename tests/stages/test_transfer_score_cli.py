"""transfer and score from the command line, on a tiny CosyVoice-format teacher, plus their bad inputs."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mamtra_cli.cli import main
from mamtra_cli.teachers.tiny import make_tiny_cosyvoice2_dir

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cv2-tiny"  # in the repository: never skipped


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_cosyvoice2_dir(tmp_path_factory.mktemp("cli") / "teacher", layers=12, hidden=32, heads=4,
                                    kv_heads=2, intermediate=64, text_vocab=80, speech_tokens=30, seed=1)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    lines = []
    for i in range(5):
        t = torch.randint(0, 80, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        s = torch.randint(0, 30, (int(torch.randint(3, 25, (1,), generator=g)),), generator=g).tolist()
        lines.append(json.dumps({"utt": f"u{i}", "text_tokens": t, "speech_tokens": s}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_transfer_all_paper_ratios_then_score(teacher_dir, data_file, tmp_path, capsys):
    code, out, _ = run(["score", "--model", teacher_dir, "--data", data_file, "--json"], capsys)
    assert code == 0
    teacher_score = json.loads(out)
    assert teacher_score["utterances"] == 5 and set(teacher_score["per_utterance"]) == {f"u{i}" for i in range(5)}
    for k, n_attn in [(1, 6), (3, 3), (5, 2), (11, 1)]:
        out_dir = tmp_path / f"h1-{k}"
        code, out, _ = run(["transfer", "--teacher", teacher_dir, "--ratio", f"1:{k}", "--out", out_dir, "--json"],
                           capsys)
        assert code == 0
        summary = json.loads(out)
        assert len(summary["attention_layers"]) == n_attn
        manifest = json.loads((out_dir / "manifest.json").read_text())
        assert manifest["stage"] == "transfer" and manifest["seed"] == 0
        assert manifest["inputs"]["teacher"]["llm_pt"]["sha256"]
        assert len(manifest["outputs"]["layers"]) == 12
        code, out, _ = run(["score", "--model", out_dir, "--data", data_file, "--json"], capsys)
        assert code == 0
        s = json.loads(out)
        assert s["tokens"] == teacher_score["tokens"] and s["ce"] > 0
        assert s["ce"] != teacher_score["ce"]  # the Mamba layers really changed the model


def test_transfer_with_profile_needs_24_layers(teacher_dir, tmp_path, capsys):
    code, _, err = run(["transfer", "--teacher", teacher_dir, "--profile", "mamtra-1-5", "--out", tmp_path / "x"],
                       capsys)
    assert code == 2 and "24 layers" in err and "Traceback" not in err


def test_score_cosyvoice_fixture_matches_reference(capsys):
    ref = json.loads((FIXTURE / "reference.json").read_text())
    code, out, _ = run(["score", "--model", FIXTURE, "--data", FIXTURE / "data.jsonl", "--json"], capsys)
    assert code == 0
    s = json.loads(out)
    assert s["tokens"] == 108
    assert s["ce"] == pytest.approx(4.650946, abs=2e-6)
    assert s["per_utterance"]["u2"]["ce"] == pytest.approx(4.643942356, abs=2e-6)
    assert s["accuracy"] == pytest.approx(1 / 108)
    assert "batch_loss" in json.dumps(ref)


def _corrupt_llm(teacher_dir, tmp_path, mutate):
    d = tmp_path / "bad"
    shutil.copytree(teacher_dir, d)
    sd = torch.load(d / "llm.pt", weights_only=True)
    mutate(sd)
    torch.save(sd, d / "llm.pt")
    return d


def test_bad_inputs_exit_2_with_one_sentence(teacher_dir, data_file, tmp_path, capsys):
    cases = []
    cases.append((["transfer", "--teacher", tmp_path / "nope", "--ratio", "1:1", "--out", tmp_path / "o1"],
                  "does not exist"))
    missing = _corrupt_llm(teacher_dir, tmp_path, lambda sd: sd.pop("llm_decoder.bias"))
    cases.append((["transfer", "--teacher", missing, "--ratio", "1:1", "--out", tmp_path / "o2"], "llm_decoder.bias"))
    cfg_dir = tmp_path / "badcfg"
    shutil.copytree(teacher_dir, cfg_dir)
    cj = cfg_dir / "CosyVoice-BlankEN" / "config.json"
    c = json.loads(cj.read_text())
    c["hidden_size"] = 48
    cj.write_text(json.dumps(c))
    cases.append((["transfer", "--teacher", cfg_dir, "--ratio", "1:1", "--out", tmp_path / "o3"], "config"))
    cases.append((["transfer", "--teacher", teacher_dir, "--ratio", "1-1", "--out", tmp_path / "o4"], "ratio"))
    cases.append((["transfer", "--teacher", teacher_dir, "--ratio", "1:4", "--out", tmp_path / "o5"], "divide"))
    cases.append((["transfer", "--teacher", teacher_dir, "--attention-layers", "1,40", "--out", tmp_path / "o6"],
                  "out of range"))
    cases.append((["transfer", "--teacher", teacher_dir, "--ratio", "1:1", "--init", "zeros", "--out",
                   tmp_path / "o7"], "init"))
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    cases.append((["transfer", "--teacher", teacher_dir, "--ratio", "1:1", "--out", existing], "--force"))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(data_file.read_text().splitlines()[0] + "\n{not json\n")
    cases.append((["score", "--model", teacher_dir, "--data", bad_jsonl], "line 2"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases.append((["score", "--model", teacher_dir, "--data", empty], "no utterances"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(data_file.read_text().splitlines()[0] + "\n\n")
    cases.append((["score", "--model", teacher_dir, "--data", blank], "line 2"))
    oor = tmp_path / "oor.jsonl"
    oor.write_text(json.dumps({"utt": "x", "text_tokens": [1], "speech_tokens": [30]}) + "\n")
    cases.append((["score", "--model", teacher_dir, "--data", oor], "speech token id 30"))
    for args, needle in cases:
        code, out, err = run(args, capsys)
        assert code == 2, (args, err)
        assert needle in err, (needle, err)
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert (existing / "keep.txt").read_text() == "precious"
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no temp dirs left behind

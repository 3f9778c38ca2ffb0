"""Attention → Mamba transfer: layouts, which layers change, bit-identical copies, the C/B/x/out mapping."""

import pytest
import torch

from mamtra_cli.errors import UserError
from mamtra_cli.teachers import load_teacher
from mamtra_cli.teachers.tiny import make_tiny_cosyvoice2_dir
from mamtra_cli.weight_transfer import (attention_layers_for, in_proj_slices, parse_layer_list, parse_ratio,
                                 transfer)


def test_paper_layouts_for_24_layers():
    assert attention_layers_for(24, 1, "uniform") == list(range(1, 24, 2))
    assert attention_layers_for(24, 3, "uniform") == [3, 7, 11, 15, 19, 23]
    assert attention_layers_for(24, 5, "uniform") == [5, 11, 17, 23]
    assert attention_layers_for(24, 11, "uniform") == [11, 23]
    assert attention_layers_for(24, 3, "uniform-first") == [0, 4, 8, 12, 16, 20]
    assert attention_layers_for(24, 5, "front") == [0, 1, 2, 3]
    assert attention_layers_for(24, 5, "back") == [20, 21, 22, 23]


@pytest.mark.parametrize("bad", ["2:1", "1-3", "1:", "", "one:three", "1:x"])
def test_bad_ratio_strings(bad):
    with pytest.raises(UserError, match="ratio"):
        parse_ratio(bad)


def test_ratio_must_divide_and_indices_in_range():
    with pytest.raises(UserError, match="does not divide"):
        attention_layers_for(24, 4, "uniform")
    with pytest.raises(UserError, match="out of range"):
        parse_layer_list("3,24", 24)
    with pytest.raises(UserError, match="placement"):
        attention_layers_for(24, 1, "middle")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = make_tiny_cosyvoice2_dir(tmp_path_factory.mktemp("t") / "cv2", layers=4, hidden=32, heads=4, kv_heads=2,
                                 intermediate=64, text_vocab=50, speech_tokens=20, seed=3)
    model, _ = load_teacher(d)
    return model


def test_reused_transfer_copies_and_maps_weights(teacher):
    student, records = transfer(teacher, [1, 3], init="reused", seed=0)
    assert student.config.layer_types == ["mamba", "attention", "mamba", "attention"]
    assert [r["type"] for r in records] == student.config.layer_types
    t, s = teacher.state_dict(), student.state_dict()
    # Everything outside the new mixers is bit-identical to the teacher.
    for name, tensor in s.items():
        if ".mamba." not in name:
            assert torch.equal(tensor, t[name]), name
    sl = in_proj_slices(student.config)
    for i in (0, 2):
        m = student.backbone.layers[i].mamba
        a = teacher.backbone.layers[i].self_attn
        w, b = m.in_proj.weight, m.in_proj.bias
        assert torch.equal(w[sl["C"]], a.q_proj.weight) and torch.equal(b[sl["C"]], a.q_proj.bias)
        assert torch.equal(w[sl["B"]], a.k_proj.weight) and torch.equal(b[sl["B"]], a.k_proj.bias)
        assert torch.equal(w[sl["x"]], a.v_proj.weight) and torch.equal(b[sl["x"]], a.v_proj.bias)
        assert torch.equal(m.out_proj.weight, a.o_proj.weight)
        # Q/K/V biases are non-zero in the teacher, so dropping them (MambaInLlama's pitfall) would show.
        assert a.q_proj.bias.abs().sum() > 0
        assert torch.equal(b[sl["z"]], torch.zeros_like(b[sl["z"]]))
        dt = torch.nn.functional.softplus(m.dt_bias)
        assert ((dt >= 1e-4 * 0.99) & (dt <= 0.1 * 1.01)).all()
        assert ((-torch.exp(m.A_log) <= -1) & (-torch.exp(m.A_log) >= -16)).all()
        assert torch.equal(m.D, torch.ones_like(m.D))


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_ablation_inits_draw_fresh_projections(teacher, init):
    student, _ = transfer(teacher, [1, 3], init=init, seed=0)
    sl = in_proj_slices(student.config)
    m, a = student.backbone.layers[0].mamba, teacher.backbone.layers[0].self_attn
    assert not torch.equal(m.in_proj.weight[sl["C"]], a.q_proj.weight)
    assert not torch.equal(m.out_proj.weight, a.o_proj.weight)
    # MLP and norms still copied
    assert torch.equal(student.backbone.layers[0].mlp.up_proj.weight, teacher.backbone.layers[0].mlp.up_proj.weight)


def test_transfer_is_seeded(teacher):
    a, _ = transfer(teacher, [3], seed=5)
    b, _ = transfer(teacher, [3], seed=5)
    c, _ = transfer(teacher, [3], seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.layers.0.mamba.dt_bias"], sc["backbone.layers.0.mamba.dt_bias"])


def test_unknown_init(teacher):
    with pytest.raises(UserError, match="init"):
        transfer(teacher, [1], init="orthogonal")


def test_importance_placement_keeps_the_layers_with_the_largest_ce_increase():
    records = [{"layer": i, "ce": 0.0, "ce_increase": inc} for i, inc in enumerate([3.0, 0.5, 2.0, 2.0, -0.1, 4.0])]
    assert attention_layers_for(6, 1, "importance", records) == [0, 2, 5]  # 2 and 3 tie: the lower index
    assert attention_layers_for(6, 2, "importance", records) == [0, 5]
    assert attention_layers_for(6, 5, "importance", records) == [5]
    with pytest.raises(UserError, match="--probe-data"):
        attention_layers_for(6, 1, "importance")


def _speech_rows(n, seed):
    from mamtra_cli.data_manifest import Utterance

    g = torch.Generator().manual_seed(seed)
    return [Utterance(f"u{i}", torch.randint(0, 50, (5 + i,), generator=g).tolist(),
                      torch.randint(0, 20, (8 + 2 * i,), generator=g).tolist()) for i in range(n)]


def test_layer_importance_measures_each_layer_replaced_alone(teacher):
    """A layer whose attention output projection is zero adds nothing to the residual stream, and neither does
    the Mamba transferred from it (out_proj ← W_O = 0): replacing it alone must leave CE exactly as it was.
    Every other record is the CE of the teacher with that one layer transferred, scored independently."""
    import copy

    from mamtra_cli.scoring import score_utterances
    from mamtra_cli.weight_transfer import layer_importance

    t = copy.deepcopy(teacher)
    with torch.no_grad():
        t.backbone.layers[2].self_attn.o_proj.weight.zero_()
    utts = _speech_rows(6, 1)
    records = layer_importance(t, utts, seed=4)
    assert [r["layer"] for r in records] == [0, 1, 2, 3]
    base = score_utterances(t, utts)["ce"]
    assert abs(records[2]["ce_increase"]) < 1e-5 and records[2]["ce"] == pytest.approx(base, abs=1e-5)
    for r in records:
        assert r["ce_increase"] == pytest.approx(r["ce"] - base, abs=1e-9)
    one, _ = transfer(t, [0, 2, 3], init="reused", seed=4)
    assert records[1]["ce"] == pytest.approx(score_utterances(one, utts)["ce"], abs=1e-6)
    assert max(abs(r["ce_increase"]) for r in records) > 1e-3  # the other layers do change the model


def test_transfer_cli_importance_records_the_probe(tmp_path, capsys):
    import json

    from mamtra_cli.checkpoints import read_manifest
    from mamtra_cli.data_manifest import write_manifest, ManifestHeader
    from mamtra_cli.teachers.tiny import make_tiny_cosyvoice2_dir
    from tests.stages.harness import one_error, run

    d = make_tiny_cosyvoice2_dir(tmp_path / "cv2", layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64,
                                 text_vocab=50, speech_tokens=20, seed=3)
    data = tmp_path / "probe.jsonl"
    write_manifest(data, ManifestHeader(), _speech_rows(5, 2))
    code, out, err = run(capsys, "transfer", "--teacher", str(d), "--ratio", "1:1", "--placement", "importance",
                         "--probe-data", str(data), "--out", str(tmp_path / "h"), "--threads", "1", "--json")
    assert code == 0, err
    summary = json.loads(out)
    ranked = sorted(summary["importance"], key=lambda r: (-r["ce_increase"], r["layer"]))
    assert summary["attention_layers"] == sorted(r["layer"] for r in ranked[:2])
    manifest = read_manifest(tmp_path / "h")
    assert manifest["parameters"]["probe"]["layers"] == summary["importance"]
    assert manifest["parameters"]["probe"]["utterances"] == 5 and manifest["parameters"]["placement"] == "importance"
    code, _, err = run(capsys, "transfer", "--teacher", str(d), "--ratio", "1:1", "--placement", "importance",
                       "--out", str(tmp_path / "h2"), "--threads", "1")
    assert code == 2 and "--probe-data" in one_error(err) and not (tmp_path / "h2").exists()
    code, _, err = run(capsys, "transfer", "--teacher", str(d), "--ratio", "1:1", "--probe-data", str(data),
                       "--out", str(tmp_path / "h3"), "--threads", "1")
    assert code == 2 and "importance" in one_error(err)

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

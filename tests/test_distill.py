"""Unit tests of the distillation library: masked KD loss, token-bucket batching, LR schedules,
--train selection, and the CLI's error paths (exit 2, nothing written)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mamtra_cli import distillation as kd
from mamtra_cli.cli import main
from mamtra_cli.data_manifest import Utterance, write_manifest
from mamtra_cli.errors import UserError
from mamtra_cli.models.config import ModelConfig
from mamtra_cli.models.speech_lm import IGNORE_ID, SpeechLM
from mamtra_cli.scoring import pad_batch
from mamtra_cli.weight_transfer import transfer

TEXT_VOCAB, SPEECH = 64, 20


def tiny_teacher(seed: int = 0, **over) -> SpeechLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               text_vocab_size=TEXT_VOCAB, speech_token_size=SPEECH, layer_types=["attention"] * 2)
    cfg.update(over)
    return SpeechLM(ModelConfig(**cfg)).eval()


def random_utts(n: int, seed: int = 0, text=(2, 6), speech=(3, 12)) -> list[Utterance]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(text[0], text[1] + 1, (1,), generator=g))
        s = int(torch.randint(speech[0], speech[1] + 1, (1,), generator=g))
        out.append(Utterance(f"u{i}", torch.randint(0, TEXT_VOCAB, (t,), generator=g).tolist(),
                             torch.randint(0, SPEECH, (s,), generator=g).tolist()))
    return out


# ------------------------------------------------------------------------------------------------ loss
def test_masked_kl_equals_per_position_manual_computation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 7, 5, generator=g)
    t = torch.randn(2, 7, 5, generator=g)
    targets = torch.tensor([[-1, -1, 3, 1, 0, -1, -1], [-1, 2, 2, 4, 1, 0, 3]])
    temp = 2.0
    kl_sum, ce_sum = kd.kd_loss_terms(s, t, targets, temp)
    kl_ref, ce_ref = 0.0, 0.0
    for b in range(2):
        for pos in range(7):
            if targets[b, pos] == IGNORE_ID:
                continue
            pt = [math.exp(v / temp) for v in t[b, pos].tolist()]
            ps = [math.exp(v / temp) for v in s[b, pos].tolist()]
            pt = [v / sum(pt) for v in pt]
            ps = [v / sum(ps) for v in ps]
            kl_ref += sum(a * (math.log(a) - math.log(c)) for a, c in zip(pt, ps))
            raw = [math.exp(v) for v in s[b, pos].tolist()]
            ce_ref += -math.log(raw[int(targets[b, pos])] / sum(raw))
    assert float(kl_sum) == pytest.approx(kl_ref, rel=1e-5)
    assert float(ce_sum) == pytest.approx(ce_ref, rel=1e-5)
    n = int((targets != IGNORE_ID).sum())
    loss = kd.kd_loss(kl_sum, ce_sum, n, kl_weight=0.5, ce_weight=0.25, temperature=temp)
    assert float(loss) == pytest.approx((0.5 * temp ** 2 * kl_ref + 0.25 * ce_ref) / n, rel=1e-5)


def test_ignored_positions_do_not_change_the_loss():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    targets = torch.tensor([[-1, 1, 2, -1, -1, -1], [-1, -1, 0, 4, 4, -1]])
    before = kd.kd_loss_terms(s, t, targets)
    ignored = targets == IGNORE_ID
    s2, t2 = s.clone(), t.clone()
    s2[ignored] = torch.randn(int(ignored.sum()), 5, generator=g) * 10
    t2[ignored] = torch.randn(int(ignored.sum()), 5, generator=g) * 10
    after = kd.kd_loss_terms(s2, t2, targets)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_padding_and_text_do_not_leak_into_speech_logits():
    """An utterance's target logits are the same alone and right-padded beside a longer one, and only its
    speech targets (S + eos) are scored."""
    lm = tiny_teacher()
    a, b = random_utts(2, seed=3, speech=(3, 4))[0], random_utts(1, seed=4, speech=(12, 12))[0]
    alone, ta = kd.speech_logits(lm, *pad_batch([a]))
    both, tb = kd.speech_logits(lm, *pad_batch([a, b]))
    n = len(a.speech_tokens) + 1
    assert alone.shape[0] == n and ta.tolist() == a.speech_tokens + [SPEECH]
    torch.testing.assert_close(both[:n], alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ batching
def test_token_batches_deterministic_complete_and_within_budget():
    lengths = [5 + (i * 7) % 23 for i in range(57)] + [90]  # the last is longer than the budget
    a = kd.token_batches(lengths, 60, seed=3, epoch=0)
    assert a == kd.token_batches(lengths, 60, seed=3, epoch=0)
    assert a != kd.token_batches(lengths, 60, seed=3, epoch=1)
    assert a != kd.token_batches(lengths, 60, seed=4, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    for b in a:
        assert sum(lengths[i] for i in b) <= 60 or len(b) == 1
    assert [57] in a


def test_token_batches_bucket_by_length():
    lengths = [int(x) for x in torch.randint(4, 100, (200,), generator=torch.Generator().manual_seed(0))]
    batches = kd.token_batches(lengths, 300, seed=0, epoch=0, pool_size=1000)
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    # one pool: batches are runs of the sorted lengths, so their length ranges do not interleave
    for (lo1, hi1), (lo2, hi2) in zip(spans, spans[1:]):
        assert hi1 <= lo2
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.15 * sum(lengths)


def test_rank_slices_partition_the_global_batch():
    batch = list(range(11))
    slices = [kd.rank_slice(batch, r, 3) for r in range(3)]
    assert sorted(sum(slices, [])) == batch
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


# ------------------------------------------------------------------------------------------------ schedules
def test_schedules():
    lr = 1e-3
    assert kd.lr_at(0, lr, 4, 20, "cosine") == pytest.approx(lr / 4)
    assert kd.lr_at(3, lr, 4, 20, "cosine") == pytest.approx(lr)
    assert kd.lr_at(4, lr, 4, 20, "cosine") == pytest.approx(lr)
    assert kd.lr_at(12, lr, 4, 20, "cosine") == pytest.approx(lr / 2)
    assert kd.lr_at(20, lr, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert kd.lr_at(12, lr, 4, 20, "linear") == pytest.approx(lr / 2)
    assert kd.lr_at(19, lr, 4, 20, "constant") == lr
    assert kd.lr_at(0, lr, 0, 20, "linear") == lr
    with pytest.raises(UserError, match="--schedule"):
        kd.lr_at(0, lr, 0, 10, "step")


# ------------------------------------------------------------------------------------------------ selection
def test_train_mamba_freezes_everything_else(tmp_path):
    teacher = tiny_teacher()
    student, _ = transfer(teacher, [1])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = kd.DistillConfig(train="mamba", lr=1e-2, warmup=0, max_steps=3, batch_tokens=80, save_every=0,
                           eval_every=0, weight_decay=0.1)
    d = kd.Distiller(cfg, teacher, student, random_utts(12), None, tmp_path)
    d.setup()
    d.train()
    after = student.state_dict()
    assert d.trainable and all(".mamba." in n for n in d.trainable)
    for k in before:
        if ".mamba." not in k:
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if ".mamba." in k)


def test_train_glob_selection():
    student, _ = transfer(tiny_teacher(), [1])
    names = kd.select_trainable(student, "backbone.layers.1.*")
    assert names and all(n.startswith("backbone.layers.1.") for n in names)
    assert all(p.requires_grad == n.startswith("backbone.layers.1.") for n, p in student.named_parameters())
    with pytest.raises(UserError, match="matches no parameter"):
        kd.select_trainable(student, "nothing.*")
    with pytest.raises(UserError, match="no Mamba layers"):
        kd.select_trainable(tiny_teacher(), "mamba")


def test_grad_accum_equals_one_big_batch(tmp_path):
    """Loss normalised by the step's target count: 2 micro-batches give the gradient of their union."""
    teacher = tiny_teacher()
    utts = random_utts(6)
    grads = []
    for micro in ([[0, 1, 2, 3, 4, 5]], [[0, 1, 2], [3, 4, 5]]):
        student, _ = transfer(teacher, [1])
        d = kd.Distiller(kd.DistillConfig(train="all", lr=0.0, warmup=0, clip=0, max_steps=1), teacher, student,
                         utts, None, tmp_path)
        d.setup()
        d.optimizer.step = lambda: None  # keep the gradients
        d.optimizer.zero_grad = lambda set_to_none=True: None
        d.train_step(micro)
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ CLI errors
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_err")
    from mamtra_cli import checkpoints

    teacher = tiny_teacher()
    for name, lm in (("T", teacher), ("T_other", tiny_teacher(speech_token_size=SPEECH + 5))):
        (root / name).mkdir()
        checkpoints.save_model_dir(root / name, lm.config, lm.state_dict(), {"stage": "test"})
    student, _ = transfer(teacher, [1])
    (root / "S").mkdir()
    checkpoints.save_model_dir(root / "S", student.config, student.state_dict(), {"stage": "transfer"})
    write_manifest(root / "train.jsonl", None, random_utts(8))
    return root


def run_cli(args, capsys):
    rc = main(["distill", *map(str, args)])
    return rc, capsys.readouterr().err


def test_cli_error_paths(dirs, tmp_path, capsys):
    base = ["--teacher", dirs / "T", "--student", dirs / "S", "--data", dirs / "train.jsonl"]
    out = tmp_path / "out"

    rc, err = run_cli(["--teacher", dirs / "T_other", "--student", dirs / "S", "--data", dirs / "train.jsonl",
                       "--out", out], capsys)
    assert rc == 2 and "different speech vocabularies" in err

    bad = tmp_path / "bad.jsonl"
    write_manifest(bad, None, [*random_utts(2), Utterance("x", [1, 2], [3, SPEECH + 1])])
    rc, err = run_cli([*base[:4], "--data", bad, "--out", out], capsys)
    assert rc == 2 and "line 3" in err and "speech token id" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = run_cli([*base[:4], "--data", empty, "--out", out], capsys)
    assert rc == 2 and "holds no utterances" in err

    rc, err = run_cli([*base, "--out", out, "--resume"], capsys)
    assert rc == 2 and "no complete checkpoint" in err

    rc, err = run_cli([*base, "--out", out, "--train", "no.such.*"], capsys)
    assert rc == 2 and "matches no parameter" in err

    rc, err = run_cli([*base, "--out", out, "--dtype", "bf16", "--device", "cpu"], capsys)
    assert rc == 2 and "CUDA" in err
    assert not out.exists() and not kd.partial_dir(out).exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_cli([*base, "--out", out], capsys)
    assert rc == 2 and "--force" in err and (out / "keep.txt").read_text() == "mine"

    out2 = tmp_path / "out2"
    kd.partial_dir(out2).mkdir()
    rc, err = run_cli([*base, "--out", out2], capsys)
    assert rc == 2 and "--resume" in err


def test_trainer_state_loads_with_weights_only(dirs, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["distill", "--teacher", str(dirs / "T"), "--student", str(dirs / "S"), "--data",
               str(dirs / "train.jsonl"), "--out", str(out), "--max-steps", "2", "--save-every", "1",
               "--batch-tokens", "60", "--warmup", "0", "--device", "cpu", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    state = torch.load(out / "checkpoints/step-000001" / kd.TRAINER_STATE_FILE, weights_only=True)
    assert state["step"] == 1 and state["position"] == {"epoch": 0, "step_in_epoch": 1}
    assert {"optimizer", "rng", "schedule"} <= set(state)
    # the recipe's state (stage, its start, the stage log with its None end, the best so far) is plain data too
    assert state["stage"] == 0 and state["stage_start"] == 0 and state["best"] is None and state["bad_evals"] == 0
    assert state["stage_log"] == [{"stage": 0, "train": "mamba", "start": 0, "end": None, "stopped_early": False}]
    assert summary["selected"] == {"rule": "last", "step": 2, "val_ce": None} and summary["utterances"] == 8
    assert (out / "checkpoints/step-000001" / kd.COMPLETE_MARKER).is_file()
    assert not kd.partial_dir(out).exists()

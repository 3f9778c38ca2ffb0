"""The mini teacher's training loop: input speech-token noise leaves the targets clean, and a cycle runs from
the weights it is given. Tiny models (2 layers, hidden 32), no corpus."""

import random

import pytest
import torch

from mamtra_cli.data_manifest import Utterance
from mamtra_cli.mini import train as train_mod
from mamtra_cli.mini.train import (TrainSettings, _collate, corrupt_speech_tokens, evaluate_loss,
                                   loss_with_input_tokens, mini_model_config, train_teacher)
from mamtra_cli.models.speech_lm import IGNORE_ID, SpeechLM

SPEECH_VOCAB = 16


def _model(seed=0) -> SpeechLM:
    torch.manual_seed(seed)
    return SpeechLM(mini_model_config(12, SPEECH_VOCAB, hidden=32, layers=2, heads=1, kv_heads=1))


def _utts(n=24, seed=0) -> list[Utterance]:
    r = random.Random(seed)
    return [Utterance(f"u{i}", [r.randrange(1, 12) for _ in range(r.randint(3, 8))],
                      [r.randrange(SPEECH_VOCAB) for _ in range(r.randint(4, 12))], spk=f"s{i % 2}")
            for i in range(n)]


def _batch(utts):
    return _collate([(u.text_tokens, u.speech_tokens) for u in utts])


def test_clean_inputs_reproduce_forward_train():
    model = _model().eval()
    batch = _batch(_utts(6))
    ref = model.forward_train(*batch)
    out = loss_with_input_tokens(model, *batch, batch[2])
    torch.testing.assert_close(out.loss, ref.loss)
    assert torch.equal(out.targets, ref.targets)


def test_noisy_inputs_keep_clean_targets_and_change_the_loss():
    model = _model().eval()
    batch = _batch(_utts(6))
    ref = model.forward_train(*batch)
    noisy = corrupt_speech_tokens(batch[2], 0.5, SPEECH_VOCAB, torch.Generator().manual_seed(1))
    assert not torch.equal(noisy, batch[2])
    out = loss_with_input_tokens(model, *batch, noisy)
    assert torch.equal(out.targets, ref.targets)  # what is predicted never sees the noise
    assert (out.targets != IGNORE_ID).sum() == ref.num_tokens
    assert abs(out.loss.item() - ref.loss.item()) > 1e-4


@pytest.mark.parametrize("prob", [0.15, 0.5])
def test_noise_changes_about_the_requested_fraction_of_speech_embeddings(prob):
    model = _model().eval()
    utts = _utts(64, seed=2)
    text, t_lens, speech, s_lens = _batch(utts)
    noisy = corrupt_speech_tokens(speech, prob, SPEECH_VOCAB, torch.Generator().manual_seed(3))
    assert noisy.min() >= 0 and noisy.max() < SPEECH_VOCAB
    clean_emb, _, _ = model.unistream_inputs(text, t_lens, speech, s_lens)
    noisy_emb, _, _ = model.unistream_inputs(text, t_lens, noisy, s_lens)
    changed = total = 0
    for i in range(len(utts)):
        start, n = 2 + int(t_lens[i]), int(s_lens[i])  # sos, text, task_id, then the speech tokens
        assert torch.equal(clean_emb[i, :start], noisy_emb[i, :start])  # text side untouched
        diff = (clean_emb[i, start:start + n] != noisy_emb[i, start:start + n]).any(-1)
        changed += int(diff.sum())
        total += n
    # A replacement draws the same code again with probability 1/vocab, so the visible rate is lower.
    expected = prob * (1 - 1 / SPEECH_VOCAB)
    assert abs(changed / total - expected) < 0.06, (changed, total)
    # Seeded: the same generator state gives the same corruption.
    again = corrupt_speech_tokens(speech, prob, SPEECH_VOCAB, torch.Generator().manual_seed(3))
    assert torch.equal(again, noisy)


def test_noisy_cycle_keeps_its_best_weights_and_a_second_cycle_continues_from_them():
    torch.set_num_threads(1)
    train, val = _utts(32, seed=4), _utts(8, seed=5)
    model = _model()
    settings = TrainSettings(steps=6, batch_size=4, lr=3e-3, warmup=2, eval_every=3, speech_input_noise=0.15)
    first = train_teacher(model, train, val, settings)
    assert first["steps_run"] == 6 and [h["step"] for h in first["history"]] == [3, 6]
    assert evaluate_loss(model, val)["loss"] == pytest.approx(first["best"]["val_loss"], rel=1e-6)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    second = train_teacher(model, train, val, TrainSettings(steps=4, batch_size=4, lr=1e-3, warmup=1,
                                                            eval_every=2, speech_input_noise=0.15))
    assert second["steps_run"] == 4 and [h["step"] for h in second["history"]] == [2, 4]
    # Training a fresh model instead gives other weights: the second cycle started from the first's.
    fresh = _model()
    train_teacher(fresh, train, val, TrainSettings(steps=4, batch_size=4, lr=1e-3, warmup=1, eval_every=2,
                                                   speech_input_noise=0.15))
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_time_budget_alone_ends_a_cycle(monkeypatch):
    torch.set_num_threads(1)
    clock = iter(range(1000))  # every time.time() call in the loop advances one second
    monkeypatch.setattr(train_mod.time, "time", lambda: float(next(clock)))
    model = _model()
    result = train_teacher(model, _utts(16), _utts(8, seed=1),
                           TrainSettings(steps=None, time_budget_s=3.5, batch_size=4, eval_every=100))
    assert result["steps_run"] == 3 and result["best"]["step"] == 3 and result["history"] == []
    with pytest.raises(ValueError, match="steps or time_budget_s"):
        train_teacher(model, [], [], TrainSettings(steps=None, time_budget_s=None))

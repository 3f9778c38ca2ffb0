"""Warm start of a mini teacher on a new codec (`mamtra_cli.mini.warm_start`): the code map and the weights."""

import math

import pytest
import torch

from mamtra_cli.mini.codec import CodecConfig, MiniCodec
from mamtra_cli.mini.train import mini_model_config
from mamtra_cli.mini.warm_start import (check_same_frames, code_cooccurrence, mapped_state, resolve_donor,
                                        warm_start)
from mamtra_cli.models.speech_lm import SpeechLM


def _save_teacher(path, speech_vocab, hidden=32, seed=0):
    from mamtra_cli import checkpoints

    torch.manual_seed(seed)
    model = SpeechLM(mini_model_config(49, speech_vocab, hidden=hidden, layers=2, heads=1, kv_heads=1))
    path.mkdir()
    checkpoints.save_model_dir(path, model.config, model.state_dict(),
                               checkpoints.run_manifest("test", inputs={}, parameters={}))
    return model


def test_mapped_state_mixes_code_rows_by_cooccurrence_and_copies_special_rows():
    torch.manual_seed(0)
    v_old, v_new, h = 4, 3, 5
    old = {"speech_embedding.weight": torch.randn(v_old + 3, h), "llm_decoder.weight": torch.randn(v_old + 3, h),
           "llm_decoder.bias": torch.randn(v_old + 3)}
    counts = torch.tensor([[0.0, 6.0, 0, 0],  # new code 0 always sits on old code 1
                           [1.0, 3.0, 0, 0],
                           [0.0, 0, 0, 0]], dtype=torch.float64)  # new code 2 never seen
    new = mapped_state(old, counts)
    emb, w, b = new["speech_embedding.weight"], new["llm_decoder.weight"], new["llm_decoder.bias"]
    assert emb.shape == (v_new + 3, h) and w.shape == (v_new + 3, h) and b.shape == (v_new + 3,)
    torch.testing.assert_close(emb[0], old["speech_embedding.weight"][1])
    old_emb = old["speech_embedding.weight"]
    torch.testing.assert_close(emb[1], 0.25 * old_emb[0] + 0.75 * old_emb[1])
    torch.testing.assert_close(emb[2], old["speech_embedding.weight"][:v_old].mean(0))  # unseen: the mean row
    torch.testing.assert_close(w[1], 0.25 * old["llm_decoder.weight"][0] + 0.75 * old["llm_decoder.weight"][1])
    for key in old:  # eos, S+1, fill copied
        torch.testing.assert_close(new[key][v_new:], old[key][v_old:])
    # bias: mixed old bias + log(prior · V) with add-one smoothing over 10 counted positions
    prior = torch.tensor([7.0, 5.0, 1.0]) / 13.0
    torch.testing.assert_close(b[0], old["llm_decoder.bias"][1] + math.log(prior[0] * 3))
    torch.testing.assert_close(b[2], old["llm_decoder.bias"][:v_old].mean() + math.log(prior[2] * 3))


def _save_codec(path, codebook_size):
    from mamtra_cli.mini.codec import CodecDecoder

    cfg = CodecConfig(codebook_size=codebook_size)
    MiniCodec(cfg, torch.randn(codebook_size, 2 * cfg.n_mels), CodecDecoder(cfg)).save(path)


def test_warm_start_copies_the_backbone_and_refuses_another_shape(tmp_path):
    from mamtra_cli.errors import UserError

    donor = _save_teacher(tmp_path / "donor", speech_vocab=8)
    _save_codec(tmp_path / "donor", 8)
    counts = torch.rand(5, 8, dtype=torch.float64)
    torch.manual_seed(1)
    model = SpeechLM(mini_model_config(49, 5, hidden=32, layers=2, heads=1, kv_heads=1))
    new_codec = MiniCodec(CodecConfig(codebook_size=5))
    donor_dir, donor_codec = resolve_donor(tmp_path / "donor", model.config, new_codec)
    assert donor_dir == tmp_path / "donor" and donor_codec.cfg.codebook_size == 8
    warm_start(model, donor_dir, counts)
    got, ref = model.state_dict(), donor.state_dict()
    for key, value in ref.items():
        if key.startswith(("speech_embedding", "llm_decoder")):
            assert got[key].shape[0] == 5 + 3
        else:
            assert torch.equal(got[key], value), key
    torch.testing.assert_close(got["speech_embedding.weight"][:5],
                               (counts / counts.sum(1, keepdim=True)).float() @ ref["speech_embedding.weight"][:8])

    other = mini_model_config(49, 5, hidden=64, layers=2, heads=2, kv_heads=1)
    with pytest.raises(UserError, match="hidden_size is 32"):
        resolve_donor(tmp_path / "donor", other, new_codec)
    _save_codec(tmp_path / "donor", 9)
    with pytest.raises(UserError, match="inconsistent"):
        resolve_donor(tmp_path / "donor", model.config, new_codec)
    with pytest.raises(UserError, match="not a mini voice directory"):
        resolve_donor(tmp_path, model.config, new_codec)


def test_cooccurrence_counts_aligned_codes_and_frame_settings_must_match():
    from mamtra_cli.errors import UserError

    torch.manual_seed(0)
    a = MiniCodec(CodecConfig(codebook_size=4), centroids=torch.randn(4, 2 * 80))
    b = MiniCodec(CodecConfig(codebook_size=3), centroids=torch.randn(3, 2 * 80))
    mels = [torch.randn(11, 80), torch.randn(6, 80)]
    counts = code_cooccurrence(a, b, mels)
    assert counts.shape == (4, 3) and counts.sum() == 6 + 3  # ceil(11 / 2) + ceil(6 / 2) positions
    manual = torch.zeros(4, 3, dtype=torch.float64)
    for mel in mels:
        for i, j in zip(a.tokens_from_features(mel), b.tokens_from_features(mel)):
            manual[i, j] += 1
    assert torch.equal(counts, manual)
    check_same_frames(a, b, "x")
    with pytest.raises(UserError, match="hop_length 160"):
        check_same_frames(a, MiniCodec(CodecConfig(codebook_size=3, hop_length=160)), "--warm-start y")

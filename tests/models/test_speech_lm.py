"""The speech LM: cached decode vs full forward, padding isolation, layout/loss, generation, cache sizes."""

import pytest
import torch

from mamtra_cli.models.cache import HybridCache, analytic_cache_bytes
from mamtra_cli.models.config import ModelConfig
from mamtra_cli.models.speech_lm import IGNORE_ID, SpeechLM

LAYOUTS = {
    "attention": ["attention"] * 4,
    "hybrid": ["mamba", "attention", "mamba", "attention"],
    "all-mamba": ["mamba"] * 3,
}


def make_model(layer_types, seed=0, chunk_size=8, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
               text_vocab_size=60, speech_token_size=40, layer_types=layer_types, rope_theta=1e4)
    cfg.update(kw)
    config = ModelConfig(**cfg)
    config.mamba.chunk_size = chunk_size
    model = SpeechLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
        for layer in model.backbone.layers:
            if hasattr(layer, "mamba"):
                layer.mamba.reset_ssm_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_decode_equals_full_forward(layout):
    model = make_model(LAYOUTS[layout])
    x = torch.randn(2, 29, 48)  # longer than several SSD chunks (8)
    with torch.no_grad():
        full = model.forward_embeds(x)
        cache = model.new_cache(2)
        parts = [model.forward_embeds(x[:, :11], None, cache)]  # prefill, non-multiple of the chunk size
        parts.append(model.forward_embeds(x[:, 11:14], None, cache))  # a multi-token chunk on top of a cache
        for t in range(14, 29):
            parts.append(model.forward_embeds(x[:, t:t + 1], None, cache))
    stepped = torch.cat(parts, dim=1)
    assert cache.length == 29
    torch.testing.assert_close(stepped, full, atol=2e-5, rtol=1e-4)
    # A wrong cache (e.g. a position offset of one) must be detectable at this tolerance.
    assert (full[:, 1:] - full[:, :-1]).abs().max() > 1e-2


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_left_padded_batch_matches_each_row_alone(layout):
    model = make_model(LAYOUTS[layout])
    lens = [17, 9, 4]
    seqs = [torch.randn(n, 48) for n in lens]
    L = max(lens)
    batch = torch.full((3, L, 48), 7.0)  # garbage in the padding: it must not leak anywhere
    mask = torch.zeros(3, L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        batch[i, L - len(s):] = s
        mask[i, L - len(s):] = True
    with torch.no_grad():
        cache = model.new_cache(3)
        out = model.forward_embeds(batch, mask, cache)
        nxt = torch.randn(3, 1, 48)
        step = model.forward_embeds(nxt, None, cache)
        for i, s in enumerate(seqs):
            alone_cache = model.new_cache(1)
            alone = model.forward_embeds(s[None], None, alone_cache)
            torch.testing.assert_close(out[i, L - len(s):], alone[0], atol=2e-5, rtol=1e-4)
            alone_step = model.forward_embeds(nxt[i:i + 1], None, alone_cache)
            torch.testing.assert_close(step[i], alone_step[0], atol=2e-5, rtol=1e-4)


def test_right_padding_in_training_batch_does_not_change_rows():
    model = make_model(LAYOUTS["hybrid"])
    g = torch.Generator().manual_seed(1)
    utts = [(torch.randint(0, 60, (n,), generator=g), torch.randint(0, 40, (m,), generator=g))
            for n, m in [(5, 12), (9, 20), (3, 7)]]
    text = torch.zeros(3, 9, dtype=torch.long)
    speech = torch.zeros(3, 20, dtype=torch.long)
    for i, (t, s) in enumerate(utts):
        text[i, :len(t)], speech[i, :len(s)] = t, s
    tl = torch.tensor([len(t) for t, _ in utts])
    sl = torch.tensor([len(s) for _, s in utts])
    with torch.no_grad():
        out = model.forward_train(text, tl, speech, sl)
        ce_rows = []
        for i, (t, s) in enumerate(utts):
            alone = model.forward_train(t[None], tl[i:i + 1], s[None], sl[i:i + 1])
            assert alone.num_tokens == len(s) + 1
            torch.testing.assert_close(out.ce_per_row[i], alone.ce_sum, atol=1e-4, rtol=1e-5)
            ce_rows.append(alone.ce_sum)
    # loss = CE summed over all targets of the batch / their count (not a mean of per-utterance means)
    assert out.num_tokens == int(sl.sum()) + 3
    torch.testing.assert_close(out.loss, sum(ce_rows) / out.num_tokens, atol=1e-5, rtol=1e-5)


def test_unistream_layout_and_targets():
    model = make_model(LAYOUTS["attention"])
    text = torch.tensor([[3, 4, 5]])
    speech = torch.tensor([[7, 8]])
    embeds, lengths, targets = model.unistream_inputs(text, torch.tensor([3]), speech, torch.tensor([2]))
    assert lengths.tolist() == [7]
    assert targets.tolist() == [[IGNORE_ID] * 4 + [7, 8, model.config.eos_id]]
    w = model
    torch.testing.assert_close(embeds[0, 0], w.llm_embedding.weight[0])  # sos
    torch.testing.assert_close(embeds[0, 1:4], w.text_embedding.weight[[3, 4, 5]])
    torch.testing.assert_close(embeds[0, 4], w.llm_embedding.weight[1])  # task_id
    torch.testing.assert_close(embeds[0, 5:7], w.speech_embedding.weight[[7, 8]])


def test_prompt_speech_is_read_but_not_scored():
    # a row whose first P speech tokens are a prompt: its targets start at speech token P, the inputs are the
    # same, and the loss covers the continuation + eos alone (P beyond the speech = nothing but eos)
    model = make_model(LAYOUTS["hybrid"])
    text = torch.tensor([[3, 4, 5], [6, 7, 0]])
    speech = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 0]])
    tl, sl = torch.tensor([3, 2]), torch.tensor([4, 3])
    plain_emb, _, plain = model.unistream_inputs(text, tl, speech, sl)
    emb, _, targets = model.unistream_inputs(text, tl, speech, sl, prompt_lens=[2, 5])
    torch.testing.assert_close(emb, plain_emb)
    eos = model.config.eos_id
    assert targets[0].tolist() == [IGNORE_ID] * 6 + [9, 10, eos]
    assert targets[1].tolist() == [IGNORE_ID] * 6 + [eos, IGNORE_ID, IGNORE_ID]  # 2 + 2 + 3 of 9 positions
    full = model.forward_train(text, tl, speech, sl)
    out = model.forward_train(text, tl, speech, sl, prompt_lens=[2, 5])
    logp = full.logits.float().log_softmax(-1)
    assert out.tokens_per_row.tolist() == [3, 1]
    torch.testing.assert_close(out.ce_per_row[0], -(logp[0, 6, 9] + logp[0, 7, 10] + logp[0, 8, eos]))
    torch.testing.assert_close(out.ce_per_row[1], -logp[1, 6, eos])
    zero = model.forward_train(text, tl, speech, sl, prompt_lens=[0, 0])
    torch.testing.assert_close(zero.ce_per_row, full.ce_per_row)


def test_generate_is_seeded_and_batch_rows_equal_single_runs():
    model = make_model(LAYOUTS["hybrid"])
    req = ([1, 2, 3, 4], [5, 6], [7, 8, 9])
    a = model.generate(*req, seed=11)
    b = model.generate(*req, seed=11)
    c = model.generate(*req, seed=12)
    assert a == b and a != c
    n_new_text = len(req[0])
    assert 2 * n_new_text <= len(a) <= 20 * n_new_text  # min/max length ratios
    assert all(0 <= t < model.config.speech_token_size for t in a)
    other = ([9, 8, 7], [], [])
    batch = model.generate_batch([req, other], seed=11)
    assert batch[0] == a
    assert batch[1] == model.generate_batch([other], seed=12)[0]


def test_generate_stops_on_eos_when_it_dominates():
    model = make_model(LAYOUTS["hybrid"])
    with torch.no_grad():
        model.llm_decoder.bias.zero_()
        model.llm_decoder.bias[model.config.eos_id] = 50.0  # eos is certain once allowed
    out = model.generate([1, 2, 3], seed=0)
    assert len(out) == 2 * 3  # eos is rejected until the minimum length, then taken at once


def test_cache_bytes_match_analytic_formula():
    model = make_model(LAYOUTS["hybrid"])
    with torch.no_grad():
        cache = model.new_cache(2, dtype=torch.bfloat16)
        model.to(torch.bfloat16).forward_embeds(torch.randn(2, 13, 48, dtype=torch.bfloat16), None, cache)
    rep = cache.report()
    expect = analytic_cache_bytes(model.config, 13, batch=2, bytes_per_element=2)
    assert rep.attention_bytes == expect["attention_bytes"] and rep.mamba_bytes == expect["mamba_bytes"]
    assert rep.attention_layers == 2 and rep.mamba_layers == 2
    assert cache.allocated_nbytes() >= cache.nbytes()


def test_cache_sizes_at_cosyvoice2_dims():
    """DESIGN.md's numbers: teacher bf16 KV 12,288 B per token; a Mamba layer 123,904 B at any length."""
    base = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                head_dim=64, text_vocab_size=151936, speech_token_size=6561)
    teacher = ModelConfig(**base, layer_types=["attention"] * 24)
    assert analytic_cache_bytes(teacher, 1)["total_bytes"] == 12288
    hybrid = ModelConfig(**base, layer_types=["mamba", "attention"] * 12)
    cache = HybridCache(hybrid, 1, torch.bfloat16)
    per_layer = dict(cache.report().per_layer)
    assert per_layer["mamba"] == 123904
    assert cache.layers[0].conv_state.shape == (1, 1152, 4)
    assert cache.layers[0].ssm_state.shape == (1, 14, 64, 64)


def test_bf16_forward_runs_and_stays_close_to_fp32():
    model = make_model(LAYOUTS["hybrid"])
    x = torch.randn(1, 20, 48)
    with torch.no_grad():
        ref = model.forward_embeds(x)
        low = model.to(torch.bfloat16).forward_embeds(x.to(torch.bfloat16)).float()
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()

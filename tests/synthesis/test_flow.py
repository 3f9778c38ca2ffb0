"""Parity of our CosyVoice 2 flow model with CosyVoice's own numbers (tests/fixtures/cv2-flow-hift).

The fixture holds a tiny random-weight `flow.pt` and arrays that CosyVoice's code computed from it
(float32, CPU, 1 thread). Tolerance: atol 1e-5 (the README's measured thread-count noise is <= 7.2e-7).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mamtra_cli.errors import UserError
from mamtra_cli.synthesis.flow import (
    FlowConfig,
    FlowModel,
    FlowTrace,
    decoder_noise,
    load_flow,
    read_flow_yaml,
)

# In the repository (README.md there says how it was made), so a fresh clone runs these tests, never skips them.
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cv2-flow-hift"
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The references were computed with 1 intra-op thread; on a shared 2-core box this is also faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ref(name: str) -> np.ndarray:
    return np.load(FIXTURE / f"{name}.npy")


def assert_close(actual: torch.Tensor, name: str, atol: float = ATOL) -> None:
    expected = ref(name)
    got = actual.detach().cpu().numpy().reshape(expected.shape)
    diff = float(np.abs(got - expected).max())
    assert diff <= atol, f"{name}: max abs diff {diff:.3e} > {atol}"


@pytest.fixture(scope="module")
def model() -> FlowModel:
    return load_flow(FIXTURE / "flow.pt", FIXTURE / "cosyvoice2.yaml")


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in np.load(FIXTURE / "flow_inputs.npz").items()}


def call_args(inp: dict[str, torch.Tensor]) -> tuple:
    return (inp["token"], inp["token_len"], inp["prompt_token"], inp["prompt_token_len"],
            inp["prompt_feat"], inp["prompt_feat_len"], inp["embedding"])


@pytest.fixture(scope="module")
def traced(model, inputs):
    trace = FlowTrace()
    mel, extra = model.inference(*call_args(inputs), streaming=False, finalize=True, trace=trace)
    return mel, extra, trace


# ---------------------------------------------------------------------------------------------------
# config and loading
# ---------------------------------------------------------------------------------------------------


def test_config_from_shapes_and_yaml(model):
    c = model.config
    assert (c.vocab_size, c.input_size, c.spk_embed_dim, c.output_size) == (100, 32, 16, 80)
    assert (c.encoder_output_size, c.encoder_attention_heads, c.encoder_linear_units) == (32, 2, 64)
    assert (c.encoder_num_blocks, c.encoder_num_up_blocks, c.encoder_lookahead) == (2, 4, 3)
    assert c.estimator_channels == (32,)
    assert (c.estimator_num_heads, c.estimator_attention_head_dim, c.estimator_inner_dim) == (4, 16, 64)
    assert (c.estimator_n_blocks, c.estimator_num_mid_blocks) == (1, 2)
    assert (c.encoder_static_chunk_size, c.estimator_static_chunk_size) == (25, 50)  # 50 = !ref expression
    assert (c.inference_cfg_rate, c.sigma_min, c.n_timesteps, c.t_scheduler) == (0.7, 1e-6, 10, "cosine")


def test_keys_match_cosyvoice_names(model):
    keys = json.loads((FIXTURE / "flow_keys.json").read_text())["keys"]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == [k["key"] for k in keys]  # same names, same order
    assert all(ours[k["key"]] == k["shape"] for k in keys)


def test_yaml_reader_resolves_refs():
    flow = read_flow_yaml(FIXTURE / "cosyvoice2.yaml")
    assert flow["spk_embed_dim"] == 16
    assert flow["decoder"]["estimator"]["static_chunk_size"] == 50
    assert flow["decoder"]["cfm_params"]["content"]["inference_cfg_rate"] == 0.7


def test_loads_without_yaml():
    # Shapes alone give every width; the estimator's head split defaults to CosyVoice 2's 64-wide heads.
    c = load_flow(FIXTURE / "flow.pt").config
    assert c.encoder_attention_heads == 2 and c.estimator_inner_dim == 64
    assert (c.estimator_num_heads, c.estimator_attention_head_dim) == (1, 64)


# ---------------------------------------------------------------------------------------------------
# stage-by-stage parity
# ---------------------------------------------------------------------------------------------------


def test_conditioning_stages(model, inputs):
    c = model.condition(*call_args(inputs))
    assert_close(c.encoder_out, "flow_encoder_out")
    assert_close(c.h, "flow_h")
    assert_close(c.mu, "flow_mu")
    assert_close(c.spks, "flow_spks")
    assert_close(c.cond, "flow_cond", atol=0.0)
    assert (c.mel_len1, c.mel_len2) == (20, 40)


def test_noise_bit_equal_and_global_rng_untouched():
    state = torch.get_rng_state()
    z = decoder_noise(80, 15000, 0)[:, :, :60]
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(z.numpy(), ref("flow_noise"))


def test_estimator_step1(model):
    # Step 1 = the estimator at t = 0 on z; row 0 conditional, row 1 all-zero conditions.
    z = torch.from_numpy(ref("flow_noise"))
    mu = torch.from_numpy(ref("flow_mu"))
    spks = torch.from_numpy(ref("flow_spks"))
    cond = torch.from_numpy(ref("flow_cond"))
    x = torch.cat([z, z])
    mask = torch.ones(2, 1, 60)
    with torch.no_grad():
        out = model.estimator_forward(x, mask, torch.cat([mu, 0 * mu]), torch.zeros(2),
                                      torch.cat([spks, 0 * spks]), torch.cat([cond, 0 * cond]))
        v, raw = model.decoder.guided_velocity(z, mask[:1], mu, torch.zeros(1), spks, cond)
    assert_close(out, "flow_step1_dphi")
    assert_close(raw, "flow_step1_dphi")
    t_span = model.decoder.t_span(10, z)
    assert_close(z + (t_span[1] - t_span[0]) * v, "flow_euler_step1")


def test_euler_step_formula_on_reference_arrays(model):
    # CFG combination + Euler update applied to CosyVoice's own dphi reproduce its x1 exactly.
    z = torch.from_numpy(ref("flow_noise"))
    dphi = torch.from_numpy(ref("flow_step1_dphi"))
    t_span = model.decoder.t_span(10, z)
    w = model.config.inference_cfg_rate
    x1 = z + (t_span[1] - t_span[0]) * ((1.0 + w) * dphi[:1] - w * dphi[1:])
    assert_close(x1, "flow_euler_step1", atol=0.0)


def test_solver_trace(traced):
    _, _, trace = traced
    assert len(trace.t_in) == 10 and len(trace.dphi) == 10 and len(trace.trajectory) == 11
    assert_close(torch.stack([t[0] for t in trace.t_in]), "flow_t_in")
    assert all(float(t[0]) == float(t[1]) for t in trace.t_in)
    assert_close(trace.dphi[0], "flow_step1_dphi")
    assert_close(trace.trajectory[0], "flow_noise", atol=0.0)
    assert_close(trace.trajectory[1], "flow_euler_step1")
    assert_close(torch.cat(trace.trajectory), "flow_traj")


def test_mel(traced):
    mel, extra, _ = traced
    assert mel.shape == (1, 80, 40) and mel.dtype == torch.float32 and extra is None
    assert_close(mel, "flow_mel")


def test_streaming_mel(model, inputs):
    mel, _ = model.inference(*call_args(inputs), streaming=True, finalize=True)
    assert_close(mel, "flow_mel_streaming")
    # the masks really change the result (README: 0.0159 from the non-streaming mel)
    assert float(np.abs(mel.numpy() - ref("flow_mel")).max()) > 1e-3


def test_streaming_chunk_not_finalized(model, inputs):
    args = list(call_args(inputs))
    args[0] = inputs["token"][:, :18]  # 15 new tokens + 3 look-ahead tokens of context
    args[1] = torch.tensor([18], dtype=torch.int32)
    mel, _ = model.inference(*args, streaming=True, finalize=False)
    assert mel.shape == (1, 80, 30)
    assert_close(mel, "flow_mel_stream_chunk")


# ---------------------------------------------------------------------------------------------------
# error paths
# ---------------------------------------------------------------------------------------------------


def _fixture_state() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "flow.pt", weights_only=True)


def _write(sd, tmp_path: Path) -> Path:
    p = tmp_path / "flow.pt"
    torch.save(sd, p)
    return p


@pytest.mark.parametrize("key", ["decoder.estimator.final_proj.bias", "input_embedding.weight",
                                 "encoder.up_encoders.3.norm_ff.weight"])
def test_missing_key(tmp_path, key):
    sd = _fixture_state()
    del sd[key]
    p = _write(sd, tmp_path)
    with pytest.raises(UserError) as e:
        load_flow(p, FIXTURE / "cosyvoice2.yaml")
    msg = str(e.value)
    assert "missing key" in msg and str(p) in msg


def test_missing_key_is_named(tmp_path):
    sd = _fixture_state()
    del sd["decoder.estimator.final_proj.bias"]
    with pytest.raises(UserError, match=r"missing key\(s\) decoder\.estimator\.final_proj\.bias"):
        load_flow(_write(sd, tmp_path), FIXTURE / "cosyvoice2.yaml")


def test_unexpected_key(tmp_path):
    sd = _fixture_state()
    sd["decoder.estimator.extra_layer.weight"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"unexpected key\(s\) decoder\.estimator\.extra_layer\.weight"):
        load_flow(_write(sd, tmp_path), FIXTURE / "cosyvoice2.yaml")


def test_wrong_shape(tmp_path):
    sd = _fixture_state()
    sd["encoder_proj.weight"] = torch.zeros(80, 31)
    with pytest.raises(UserError, match=r"wrong shape\(s\) encoder_proj\.weight \[80, 31\] \(expected \[80, 32\]\)"):
        load_flow(_write(sd, tmp_path), FIXTURE / "cosyvoice2.yaml")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_flow(tmp_path / "nope.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(UserError, match="Cannot read"):
        load_flow(bad)
    notsd = tmp_path / "list.pt"
    torch.save([1, 2, 3], notsd)
    with pytest.raises(UserError, match="not a state_dict"):
        load_flow(notsd)


def test_yaml_head_split_conflict(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text((FIXTURE / "cosyvoice2.yaml").read_text().replace("num_heads: 4 ", "num_heads: 3 "))
    with pytest.raises(UserError, match="heads"):
        load_flow(FIXTURE / "flow.pt", y)


# ---------------------------------------------------------------------------------------------------
# a second, differently sized model round-trips through flow.pt (+ yaml)
# ---------------------------------------------------------------------------------------------------

_OTHER_YAML = """\
spk_embed_dim: 12
chunk_size: 10
token_mel_ratio: 2
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 48
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    vocab_size: 37
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 48
        attention_heads: 4
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                t_scheduler: 'cosine'
                inference_cfg_rate: 0.7
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            channels: [16, 24]
            attention_head_dim: 32
            n_blocks: 2
            num_mid_blocks: 1
            num_heads: 2
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
"""


def test_other_sizes_round_trip(tmp_path):
    cfg = FlowConfig(input_size=48, vocab_size=37, spk_embed_dim=12, encoder_input_size=48,
                     encoder_output_size=48, encoder_attention_heads=4, encoder_linear_units=96,
                     encoder_num_blocks=1, encoder_static_chunk_size=10, estimator_channels=(16, 24),
                     estimator_attention_head_dim=32, estimator_num_heads=2, estimator_n_blocks=2,
                     estimator_num_mid_blocks=1, estimator_static_chunk_size=20)
    torch.manual_seed(3)
    original = FlowModel(cfg).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.05 * torch.randn_like(p))  # LayerNorm ones/zeros and default init are too tame
    path = tmp_path / "flow.pt"
    torch.save(original.state_dict(), path)
    yaml_path = tmp_path / "cosyvoice2.yaml"
    yaml_path.write_text(_OTHER_YAML)

    loaded = load_flow(path, yaml_path)
    assert loaded.config == cfg
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    assert len(loaded.encoder.up_encoders) == 4 and len(loaded.encoder.encoders) == 1
    assert loaded.decoder.estimator.down_blocks[0][1][0].attn1.to_q.weight.shape == (64, 16)  # inner 64 != 16

    g = torch.Generator().manual_seed(5)
    args = (torch.randint(0, 37, (1, 7), generator=g), torch.tensor([7]), torch.randint(0, 37, (1, 4), generator=g),
            torch.tensor([4]), torch.randn(1, 8, 80, generator=g), torch.tensor([8]), torch.randn(1, 12, generator=g))
    for streaming in (False, True):
        a, _ = original.inference(*args, streaming=streaming)
        b, _ = loaded.inference(*args, streaming=streaming)
        assert a.shape == (1, 80, 14) and torch.equal(a, b) and torch.isfinite(a).all()
    chunk, _ = loaded.inference(*args, streaming=True, finalize=False)
    assert chunk.shape == (1, 80, 8)

    # without the yaml the shapes still load; only the estimator's head split falls back to 64-wide heads
    bare = load_flow(path)
    assert (bare.config.estimator_num_heads, bare.config.estimator_attention_head_dim) == (1, 64)
    assert bare.config.encoder_attention_heads == 4  # encoder heads come from pos_bias_u's shape

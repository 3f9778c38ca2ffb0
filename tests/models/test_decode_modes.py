"""Decode modes (`--decode auto|dynamic|static|graph`) end to end, and the fused Mamba decode step.

1. `resolve_decode`: auto = graph on CUDA, dynamic elsewhere; graph off CUDA and unknown values are one-sentence
   UserErrors (exit 2 in the commands).
2. `SpeechLM.generate`: "auto" on a CPU is the dynamic path; "graph" keeps its captured step for the next call
   of the same batch size and length bucket (checked on a CPU with an eager stand-in for the CUDA graph).
3. The commands: `synth --decode static` speaks the same wav samples as `--decode dynamic` (the built-in mini
   voice, fixed seed, --max-tokens 20: the static step draws the same tokens exactly, see
   test_static_decode.py); `profile speed` / `profile vram` time and measure the chosen path and report it.
4. The fused Mamba decode step (`kernels.fused_state_step`, `Mamba2Mixer._fused_step`): with stand-ins for
   mamba-ssm 2.3's `selective_state_update` and causal-conv1d's `causal_conv1d_update` (their signatures and
   semantics, computed in PyTorch) patched in as if on CUDA, one decode step equals the pure step to 1e-6 in
   float32, outputs and in-place state updates alike.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mamtra_cli.errors import UserError
from mamtra_cli.models import kernels
from mamtra_cli.models.cache import MambaCache
from mamtra_cli.models.decode_mode import resolve_decode
from mamtra_cli.models.mamba2 import Mamba2Mixer
from tests.models.test_device_contracts import FakeSelectiveStateUpdate, small_config
from tests.models.test_speech_lm import LAYOUTS, make_model
from tests.stages.harness import one_error, run, tiny_arch_yaml

REQUESTS = [([1, 2, 3, 4], [5, 6], [7, 8, 9]), ([9, 8, 7], [], [])]


# ---------------------------------------------------------------- 1. the mode


def test_auto_is_graph_on_cuda_and_dynamic_elsewhere():
    assert resolve_decode("auto", "cpu") == "dynamic"
    assert resolve_decode(None, torch.device("cpu")) == "dynamic"
    assert resolve_decode("AUTO", "cuda") == "graph"
    assert resolve_decode("auto", torch.device("cuda", 1)) == "graph"
    assert resolve_decode("auto", "cuda:0") == "graph"
    for mode in ("dynamic", "static"):
        assert resolve_decode(mode, "cpu") == resolve_decode(f" {mode.upper()} ", "cuda") == mode
    assert resolve_decode("graph", "cuda:1") == "graph"


def test_graph_off_cuda_and_unknown_modes_are_one_sentence_errors():
    with pytest.raises(UserError) as e:
        resolve_decode("graph", "cpu")
    msg = str(e.value)
    assert "CUDA" in msg and "cpu" in msg and msg.count(". ") == 0 and msg.endswith(".") and "\n" not in msg
    with pytest.raises(UserError, match="Unknown --decode 'fast'; use auto, dynamic, static or graph."):
        resolve_decode("fast", "cuda")


# ---------------------------------------------------------------- 2. generate


def test_generate_auto_on_cpu_is_the_dynamic_path():
    model = make_model(LAYOUTS["hybrid"])
    ref = model.generate_batch(REQUESTS, seed=3)
    assert model.generate_batch(REQUESTS, seed=3, decode="auto") == ref
    assert model.generate(*REQUESTS[0], seed=3, decode="auto") == ref[0]
    assert getattr(model, "_graph_slot", None) is None  # nothing was captured or kept


class EagerGraph:
    """CPU stand-in for `GraphedDecodeStep`: same constructor and call, the eager static step inside; counts
    how often a graph would have been captured."""

    made: list = []

    def __init__(self, model, cache, warmup: int = 3):
        assert cache.tokens > 0  # captured after the prefill, as on a GPU
        self.model, self.cache = model, cache
        EagerGraph.made.append(cache)

    def __call__(self, tokens):
        return self.model.decode_step(tokens, self.cache)


def test_graph_decode_is_captured_once_per_batch_and_length_bucket(monkeypatch):
    from mamtra_cli.models import cuda_graph

    monkeypatch.setattr(cuda_graph, "GraphedDecodeStep", EagerGraph)
    EagerGraph.made = []
    model = make_model(LAYOUTS["hybrid"])
    ref = model.generate_batch(REQUESTS, seed=11, decode="static")
    assert model.generate_batch(REQUESTS, seed=11, decode="graph") == ref
    assert len(EagerGraph.made) == 1 and EagerGraph.made[0].max_length == 256  # rounded up to the bucket
    # The next request of the same batch size reuses graph and cache (emptied in place), with the same tokens.
    assert model.generate_batch(REQUESTS, seed=11, decode="graph") == ref
    other = [(r[0][::-1], [], r[2]) for r in REQUESTS]
    assert model.generate_batch(other, seed=2, decode="graph") == model.generate_batch(other, seed=2, decode="static")
    assert len(EagerGraph.made) == 1
    # Another batch size: a new capture, and only the newest graph is kept.
    alone = model.generate(*REQUESTS[1], seed=5, decode="graph")
    assert alone == model.generate(*REQUESTS[1], seed=5)
    assert len(EagerGraph.made) == 2 and model._graph_slot[1] is EagerGraph.made[1]


# ---------------------------------------------------------------- 3. the commands

needs_mini = pytest.mark.skipif(
    not __import__("mamtra_cli.mini", fromlist=["BUILTIN_DIR"]).BUILTIN_DIR.joinpath("model.safetensors").is_file(),
    reason="the built-in mini voice is not in this checkout (mamtra build-mini)")


def read_samples(path):
    import wave

    import numpy as np

    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), w.getframerate()


@needs_mini
def test_synth_static_speaks_the_same_samples_as_dynamic(tmp_path, capsys):
    """Same seed, same tokens (static decode draws exactly the dynamic tokens here), same 16-bit samples."""
    import numpy as np

    reports = {}
    for mode in ("dynamic", "static"):
        code, out, err = run(capsys, "synth", "Hello, how are you doing today?", "--decode", mode, "--seed", "3",
                             "--max-tokens", "20", "--threads", "1", "--out", tmp_path / f"{mode}.wav", "--json")
        assert code == 0, err
        reports[mode] = json.loads(out)
    assert reports["static"]["decode"] == reports["static"]["backend"]["decode"] == "static"
    assert reports["dynamic"]["decode"] == "dynamic"
    assert reports["static"]["stages"]["tokens"] == reports["dynamic"]["stages"]["tokens"] == 20
    a, sr_a = read_samples(tmp_path / "static.wav")
    b, sr_b = read_samples(tmp_path / "dynamic.wav")
    assert sr_a == sr_b and a.size > 0 and np.array_equal(a, b)


@needs_mini
def test_synth_decode_auto_on_cpu_reports_dynamic(tmp_path, capsys):
    code, out, err = run(capsys, "synth", "Hello.", "--max-tokens", "5", "--out", tmp_path / "a.wav", "--json")
    assert code == 0, err
    assert json.loads(out)["decode"] == "dynamic"


def test_synth_decode_graph_on_cpu_exits_2_in_one_sentence(tmp_path, capsys):
    code, _, err = run(capsys, "synth", "Hello.", "--decode", "graph", "--out", tmp_path / "g.wav")
    assert code == 2
    assert "--decode graph" in one_error(err) and "CUDA" in one_error(err)
    assert not (tmp_path / "g.wav").exists()


def test_load_refuses_graph_on_cpu_before_loading():
    import mamtra_cli

    with pytest.raises(UserError, match="CUDA"):
        mamtra_cli.load(decode="graph")


@pytest.fixture
def tiny_arch(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(tiny_arch_yaml(4))
    return str(p)


SPEED = ["profile", "speed", "--ratio", "1:1", "--batch", "1,2", "--contexts", "16", "--decode-steps", "3",
         "--repeats", "2", "--prefill-chunk", "4", "--threads", "1"]


def test_profile_speed_static_runs_and_reports_the_mode(tiny_arch, capsys):
    code, out, err = run(capsys, *SPEED, "--arch", tiny_arch, "--decode", "static", "--json")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["decode"] == "static" and "static decode" in res["notes"][0]
    assert len(res["rows"]) == 4
    for r in res["rows"]:
        assert r["decode"] == "static" and r["decode_tokens_per_s"] > 0 and len(r["decode_samples_ms"]) == 2
    code, out, err = run(capsys, *SPEED, "--arch", tiny_arch, "--json")  # auto on a CPU
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["decode"] == "dynamic"


def test_profile_speed_and_vram_refuse_graph_on_cpu(tiny_arch, capsys):
    for cmd in (SPEED, ["profile", "vram", "--ratio", "1:0", "--lengths", "64"]):
        code, _, err = run(capsys, *cmd, "--arch", tiny_arch, "--decode", "graph")
        assert code == 2 and "CUDA" in one_error(err)


def test_profile_speed_graph_path_with_an_eager_stand_in(tiny_arch, monkeypatch):
    """The "graph" branch of `profile speed` (CUDA only) run on a CPU: one capture per model, batch and
    context, and the steps decoded on it."""
    from rich.console import Console

    from mamtra_cli.models import cuda_graph, decode_mode
    from mamtra_cli.profiling.speed import profile_speed

    monkeypatch.setattr(cuda_graph, "GraphedDecodeStep", EagerGraph)
    monkeypatch.setattr(decode_mode, "resolve_decode", lambda decode, device: "graph")
    EagerGraph.made = []
    res = profile_speed(arch=tiny_arch, ratio="1:1", batch="1,2", contexts="8,16", decode_steps=3, repeats=2,
                        prefill_chunk=4, threads=1, console=Console(quiet=True))
    assert res["decode"] == "graph" and {r["decode"] for r in res["rows"]} == {"graph"}
    assert len(EagerGraph.made) == 2 * 2 * 2  # models × batches × contexts
    # each capture's cache is back at its context after the timed rounds (rewound after every round)
    assert sorted(c.tokens for c in EagerGraph.made) == [8] * 4 + [16] * 4


def test_profile_vram_static_measures_the_static_cache(tiny_arch, capsys):
    code, out, err = run(capsys, "profile", "vram", "--arch", tiny_arch, "--ratio", "1:1", "--lengths", "64",
                         "--prompt-tokens", "4", "--batch", "2", "--dtype", "fp32", "--threads", "1",
                         "--decode", "static", "--json")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    from mamtra_cli import profiling as P
    from mamtra_cli.models.cache import analytic_cache_bytes

    assert res["decode"] == "static"
    for r in res["rows"]:
        cfg = P.arch_config(tiny_arch) if r["model"] == "teacher" else P.hybrid_config(P.arch_config(tiny_arch), 1)
        assert r["decode"] == "static" and r["peak_bytes"] > 0
        assert r["cache_bytes"] == analytic_cache_bytes(cfg, 64, 2, 4)["total_bytes"]


def test_static_lm_workload_fills_and_decodes_to_the_total():
    """The `profile vram` workload of the static path, in this process: prompt prefill, fill (both kinds),
    decode steps; the cache ends at the total length with the analytic size."""
    from mamtra_cli import profiling as P
    from mamtra_cli.models.cache import analytic_cache_bytes
    from mamtra_cli.profiling.vram import StaticLMWorkload

    cfg = small_config(layer_types=["mamba", "attention"])
    spec = P.ModelSpec(name="t", config=cfg, source="test")
    for fill in ("synthetic", "prefill"):
        w = StaticLMWorkload(batch=2, prompt_tokens=3, total_tokens=11, decode_steps=2, fill=fill, chunk=4,
                             dtype="fp32")
        w.setup(spec, "cpu")
        r = w.run()
        assert r["tokens"] == 11
        assert r["cache_bytes"] == analytic_cache_bytes(cfg, 11, 2, 4)["total_bytes"]
        assert r["cache_allocated_bytes"] == r["cache_bytes"]  # preallocated to exactly the total


# ---------------------------------------------------------------- 4. the fused Mamba step


class RecordingSSU(FakeSelectiveStateUpdate):
    """mamba-ssm 2.3's `selective_state_update` (the stand-in of test_device_contracts.py: signature, shape
    asserts, stride reads, float32 math, state updated in place), recording what each call passed."""

    def __call__(self, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                 state_batch_indices=None):
        self.passed = getattr(self, "passed", []) + [{"state": state, "z": z, "dt_softplus": dt_softplus}]
        return super().__call__(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                state_batch_indices=state_batch_indices)


class FakeConvUpdate:
    """Stand-in for causal-conv1d's `causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
    cache_seqlens=None, conv_state_indices=None)` (1.4+; the CUDA op's checks included): x (batch, dim) or
    (batch, dim, seqlen); conv_state (batch, dim, state_len ≥ width − 1) in x's dtype, updated in place —
    shifted left by seqlen with x appended; out = the depthwise conv of the last `width` inputs (+ bias),
    SiLU'd when activation is "silu"/"swish", computed in float32 and returned in x's dtype."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                 conv_state_indices=None):
        if activation not in (None, "silu", "swish"):
            raise NotImplementedError("activation must be None, silu, or swish")
        assert cache_seqlens is None and conv_state_indices is None  # we never pass them
        unsqueeze = x.dim() == 2
        if unsqueeze:
            x = x.unsqueeze(-1)
        batch, dim, seqlen = x.shape
        width = weight.shape[1]
        state_len = conv_state.shape[-1]
        assert conv_state.dtype == x.dtype and conv_state.shape == (batch, dim, state_len)
        assert state_len >= width - 1 and weight.shape == (dim, width) and 2 <= width <= 4
        if bias is not None:
            assert bias.dtype == weight.dtype and bias.shape == (dim,) and bias.stride(-1) == 1
        self.calls.append({"conv_state": conv_state, "activation": activation})
        x_new = torch.cat([conv_state, x], dim=-1).float()  # (batch, dim, state_len + seqlen)
        conv_state.copy_(x_new[:, :, -state_len:])
        out = F.conv1d(x_new, weight.float().unsqueeze(1), None if bias is None else bias.float(),
                       groups=dim)[:, :, -seqlen:]
        if activation is not None:
            out = F.silu(out)
        out = out.to(x.dtype)
        return out.squeeze(-1) if unsqueeze else out


@pytest.fixture
def fused_kernels(monkeypatch):
    """Both step kernels patched in as if mamba-ssm 2.3 and causal-conv1d imported and the tensors were on
    CUDA. Only the decode step may run under this (the prefill kernels are absent)."""
    ssu, conv = RecordingSSU(), FakeConvUpdate()
    fakes = {"selective_state_update": ssu, "causal_conv1d_update": conv}
    monkeypatch.setattr(kernels, "_on_cuda", lambda *tensors: True)
    monkeypatch.setattr(kernels, "_have_mamba", lambda: True)
    monkeypatch.setattr(kernels, "_have_conv", lambda: True)
    monkeypatch.setattr(kernels, "_get", lambda name: fakes.get(name))
    return ssu, conv


def _mixer_and_caches(dtype=torch.float32, batch=3, **cfg):
    torch.manual_seed(0)
    c = small_config(**cfg)
    mixer = Mamba2Mixer(c).eval()
    with torch.no_grad():
        mixer.in_proj.weight.normal_(0, 0.3)
        mixer.in_proj.bias.normal_(0, 0.3)
        mixer.out_proj.weight.normal_(0, 0.3)
        mixer.reset_ssm_parameters(torch.Generator().manual_seed(1))
        mixer.D.normal_(1.0, 0.5)  # not the init's 1: D·x must really be fused
        mixer.norm.weight.normal_(1.0, 0.2)
    mixer = mixer.to(dtype)

    def cache():
        m = MambaCache(batch, mixer.conv_dim, c.mamba.d_conv, c.num_attention_heads, c.head_dim, c.head_dim,
                       dtype, "cpu")
        g = torch.Generator().manual_seed(2)
        m.ssm_state.copy_(torch.randn(m.ssm_state.shape, generator=g))
        m.conv_state.copy_(torch.randn(m.conv_state.shape, generator=g))
        return m

    return mixer, cache(), cache(), c


def assert_close_to_scale(got, want, tol):
    """max |got − want| ≤ tol · max |want|: float32 agreement to `tol` relative to the tensor's scale (the
    layer output sums many products through out_proj, so an element near zero may differ by an ulp of the
    large terms it cancels, more than `tol` of its own size)."""
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert got.shape == want.shape and err <= tol * scale, f"max error {err:.3g} > {tol:g} × scale {scale:.3g}"


@pytest.mark.parametrize("n_kv", [2, 6], ids=["gqa", "mha"])
def test_fused_step_equals_pure_step_float32(fused_kernels, n_kv):
    """Three decode steps through the fused kernels (stand-ins) equal the pure step in float32: the conv and
    SSM states element by element to 1e-6 (abs + rel), updated in place in the cache's own tensors; the layer
    output to 1e-6 of its scale."""
    ssu, conv = fused_kernels
    mixer, fused_cache, pure_cache, c = _mixer_and_caches(num_key_value_heads=n_kv)
    ptrs = (fused_cache.ssm_state.data_ptr(), fused_cache.conv_state.data_ptr())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in range(3):
            u = torch.randn(3, 1, c.hidden_size, generator=g)
            mixer.use_kernels = True
            y_fused = mixer(u, None, fused_cache)
            mixer.use_kernels = False  # the pure path: unfused, no kernel called
            y_pure = mixer(u, None, pure_cache)
            assert len(ssu.passed) == len(conv.calls) == t + 1
            assert_close_to_scale(y_fused, y_pure, 1e-6)
            torch.testing.assert_close(fused_cache.ssm_state, pure_cache.ssm_state, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(fused_cache.conv_state, pure_cache.conv_state, atol=1e-6, rtol=1e-6)
    assert (fused_cache.ssm_state.data_ptr(), fused_cache.conv_state.data_ptr()) == ptrs
    # what the kernels got: the cache's own state tensors; dt_bias + softplus, D and the z gate fused
    for call in ssu.calls:
        assert call["tie_hdim"] is True  # one decay per head
        assert call["dt_bias"] is not None and call["D"] is not None
        torch.testing.assert_close(call["dt_bias"][:, 0], mixer.dt_bias)
        torch.testing.assert_close(call["D"][:, 0], mixer.D)
    for call in ssu.passed:
        assert call["state"] is fused_cache.ssm_state and call["dt_softplus"] is True
        assert call["z"] is not None and call["z"].shape == (3, c.num_attention_heads, c.head_dim)
    assert all(call["conv_state"] is fused_cache.conv_state and call["activation"] == "silu"
               for call in conv.calls)


def test_fused_step_bf16_close_to_pure(fused_kernels):
    """bf16: the kernel keeps y in float32 until the gate, the pure path rounds y + D·x to bf16 first; they
    agree to bf16 rounding."""
    mixer, fused_cache, pure_cache, c = _mixer_and_caches(torch.bfloat16)
    u = torch.randn(3, 1, c.hidden_size, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.no_grad():
        y_fused = mixer(u, None, fused_cache)
        mixer.use_kernels = False
        y_pure = mixer(u, None, pure_cache)
    assert y_fused.dtype == torch.bfloat16 and fused_cache.ssm_state.dtype == torch.bfloat16
    torch.testing.assert_close(y_fused, y_pure, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(fused_cache.ssm_state, pure_cache.ssm_state, atol=2e-2, rtol=2e-2)


def test_fused_state_step_reference_equals_the_stand_in(monkeypatch):
    """`fused_state_step`'s own PyTorch fallback (used when no kernel) computes what the kernel does: on the
    same inputs it equals the stand-in, and `inplace=False` leaves the caller's state alone."""
    g = torch.Generator().manual_seed(5)
    b, h, p, n = 2, 6, 8, 5
    state = torch.randn(b, h, p, n, generator=g)
    x, z = torch.randn(b, h, p, generator=g), torch.randn(b, h, p, generator=g)
    dt, dt_bias = torch.randn(b, h, generator=g), torch.randn(h, generator=g)
    A, D = -torch.rand(h, generator=g) * 3 - 0.2, torch.randn(h, generator=g)
    B, C = torch.randn(b, h, n, generator=g), torch.randn(b, h, n, generator=g)
    before = state.clone()
    y_ref, s_ref = kernels.fused_state_step(state, x, dt, dt_bias, A, B, C, D, z, use_kernels=False)
    assert torch.equal(state, before) and s_ref is not state
    fake = FakeSelectiveStateUpdate()
    monkeypatch.setattr(kernels, "_on_cuda", lambda *tensors: True)
    monkeypatch.setattr(kernels, "_have_mamba", lambda: True)
    monkeypatch.setattr(kernels, "_get", lambda name: fake if name == "selective_state_update" else None)
    y, s = kernels.fused_state_step(state, x, dt, dt_bias, A, B, C, D, z, inplace=True)
    assert s is state and len(fake.calls) == 1
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s, s_ref, atol=1e-6, rtol=1e-6)


def test_whole_model_decode_step_with_fused_kernels_equals_pure(monkeypatch):
    """`SpeechLM.decode_step` of a hybrid with the fused step kernels (stand-ins) equals the pure decode."""
    ssu, conv = RecordingSSU(), FakeConvUpdate()
    model = make_model(LAYOUTS["hybrid"])
    prompt = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fused, pure = model.new_static_cache(2, 12), model.new_static_cache(2, 12)
        model.forward_embeds(prompt, None, fused)  # prefill: pure, before the patch
        model.forward_embeds(prompt, None, pure)
        ids = [torch.tensor([i, 2 * i + 1]) for i in range(4)]
        expected = [model.decode_step(t, pure) for t in ids]
        fakes = {"selective_state_update": ssu, "causal_conv1d_update": conv}
        with monkeypatch.context() as m:
            m.setattr(kernels, "_on_cuda", lambda *tensors: True)
            m.setattr(kernels, "_have_mamba", lambda: True)
            m.setattr(kernels, "_have_conv", lambda: True)
            m.setattr(kernels, "_get", lambda name: fakes.get(name))
            got = [model.decode_step(t, fused) for t in ids]
    assert len(ssu.calls) == len(conv.calls) == 4 * 2  # two Mamba layers, four steps
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_cpu_decode_takes_the_unfused_pure_path(monkeypatch):
    """Without CUDA tensors nothing is fused or imported: the CPU step is exactly the old one."""
    calls = []
    monkeypatch.setattr(kernels, "_get", lambda name: calls.append(name))
    mixer, cache, _, c = _mixer_and_caches()
    with torch.no_grad():
        mixer(torch.randn(3, 1, c.hidden_size), None, cache)
    assert calls == []
    assert not kernels.fused_step_available(cache.ssm_state, cache.ssm_state[:, :, :, 0])


# ---------------------------------------------------------------- GPU (real kernels where installed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_step_on_cuda_equals_pure_step(dtype):
    """With mamba-ssm / causal-conv1d installed the real kernels run; without them this checks the pure path
    on the GPU. Compared with use_kernels=False (the unfused pure step)."""
    mixer, fused_cache, pure_cache, c = _mixer_and_caches(dtype)
    mixer = mixer.cuda()
    for m in (fused_cache, pure_cache):
        m.ssm_state, m.conv_state = m.ssm_state.cuda(), m.conv_state.cuda()
    g = torch.Generator().manual_seed(7)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    with torch.no_grad():
        for _ in range(4):
            u = torch.randn(3, 1, c.hidden_size, generator=g).to("cuda", dtype)
            mixer.use_kernels = True
            y_fused = mixer(u, None, fused_cache)
            mixer.use_kernels = False
            y_pure = mixer(u, None, pure_cache)
            torch.testing.assert_close(y_fused, y_pure, **tol)
            torch.testing.assert_close(fused_cache.ssm_state, pure_cache.ssm_state, **tol)
            torch.testing.assert_close(fused_cache.conv_state, pure_cache.conv_state, **tol)

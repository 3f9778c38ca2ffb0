"""SSD scan, decode step and causal conv against naive float64 references (kernels.py and ssd.py)."""

import math
import sys

import pytest
import torch

from mamtra_cli.models import kernels
from mamtra_cli.models.kernels import (
    causal_conv,
    causal_conv_step,
    chunk_scan,
    kernel_report,
    state_step,
)
from mamtra_cli.models.ssd import ssd_chunked, ssd_sequential_reference, ssd_step

# (nheads, headdim, dstate): one head, a few heads, a 14-head layout like Qwen2.5-0.5B's but tiny;
# headdim != dstate everywhere so a transposed state would not go unnoticed.
HEAD_CONFIGS = [(1, 8, 16), (4, 16, 8), (14, 4, 6)]
SEQLENS = [1, 7, 63, 64, 65, 200]
CHUNKS = [16, 64]
# Relative tolerance on max|err| / max|ref| per input dtype.
TOL = {torch.float64: 1e-12, torch.float32: 5e-6, torch.bfloat16: 1e-2}


def make_inputs(batch, seqlen, nheads, headdim, dstate, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, nheads, headdim, generator=g, dtype=torch.float64)
    # Mamba's usual dt range, log-uniform in [1e-3, 0.2]: per-step decays from ~1 down to ~0.1, so
    # states carry across many chunks and the inter-chunk path matters.
    dt = torch.exp(torch.empty(batch, seqlen, nheads, dtype=torch.float64).uniform_(math.log(1e-3), math.log(0.2), generator=g))
    A = -torch.empty(nheads, dtype=torch.float64).uniform_(0.5, 8.0, generator=g)
    B = torch.randn(batch, seqlen, nheads, dstate, generator=g, dtype=torch.float64) / math.sqrt(dstate)
    C = torch.randn(batch, seqlen, nheads, dstate, generator=g, dtype=torch.float64) / math.sqrt(dstate)
    # A stays float32 as an nn.Parameter would (A = -exp(A_log) in float32), except in float64 runs.
    a_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(dtype), dt.to(dtype), A.to(a_dtype), B.to(dtype), C.to(dtype)


def rel_err(got, ref):
    ref = ref.to(torch.float64)
    return ((got.to(torch.float64) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def random_state(batch, nheads, headdim, dstate, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, nheads, headdim, dstate, generator=g)


# ---------------------------------------------------------------- chunked scan and step vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=lambda c: "h%d-p%d-n%d" % c)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_chunked_matches_reference(seqlen, chunk, heads, dtype):
    x, dt, A, B, C = make_inputs(2, seqlen, *heads, dtype=dtype)
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size=chunk)
    # For bf16 the reference sees the same bf16-rounded inputs, so only the algorithm is compared.
    y_ref, state_ref = ssd_sequential_reference(x, dt, A, B, C)
    assert y.shape == x.shape and y.dtype == dtype
    assert state.shape == (2, heads[0], heads[1], heads[2])
    assert state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(y, y_ref) < TOL[dtype]
    # The state is never rounded to bf16, so it is held to the float32 tolerance.
    assert rel_err(state, state_ref) < TOL[torch.float64 if dtype == torch.float64 else torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=lambda c: "h%d-p%d-n%d" % c)
@pytest.mark.parametrize("seqlen", [1, 65])
def test_step_matches_reference(seqlen, heads, dtype):
    x, dt, A, B, C = make_inputs(2, seqlen, *heads, dtype=dtype)
    s0 = random_state(2, *heads)
    state = s0.to(torch.float64) if dtype == torch.float64 else s0
    ys = []
    for t in range(seqlen):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        assert y_t.dtype == dtype and state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        ys.append(y_t)
    y_ref, state_ref = ssd_sequential_reference(x, dt, A, B, C, initial_state=s0)
    assert rel_err(torch.stack(ys, 1), y_ref) < TOL[dtype]
    assert rel_err(state, state_ref) < TOL[torch.float64 if dtype == torch.float64 else torch.float32]


def test_step_with_bf16_state_stays_close():
    # A bf16 decode cache rounds the state every step; the drift over 100 steps must stay small.
    x, dt, A, B, C = make_inputs(1, 100, 4, 8, 16, dtype=torch.bfloat16)
    state = torch.zeros(1, 4, 8, 16, dtype=torch.bfloat16)
    for t in range(100):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
    assert state.dtype == torch.bfloat16
    y_ref, state_ref = ssd_sequential_reference(x, dt, A, B, C)
    assert rel_err(state, state_ref) < 2e-2
    assert rel_err(y_t, y_ref[:, -1]) < 2e-2


@pytest.mark.parametrize("method", ["loop", "matrix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_inter_chunk_methods_agree_with_reference(method, dtype):
    x, dt, A, B, C = make_inputs(2, 150, 4, 8, 16, dtype=dtype)
    s0 = random_state(2, 4, 8, 16).to(dtype)
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size=16, initial_state=s0, inter_chunk=method)
    y_ref, state_ref = ssd_sequential_reference(x, dt, A, B, C, initial_state=s0)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(state, state_ref) < TOL[dtype]


def test_half_precision_input():
    x, dt, A, B, C = make_inputs(1, 70, 4, 8, 16, dtype=torch.float16)
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size=16)
    y_ref, state_ref = ssd_sequential_reference(x, dt, A, B, C)
    assert y.dtype == torch.float16 and state.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-3
    assert rel_err(state, state_ref) < TOL[torch.float32]


def test_large_decay_does_not_overflow():
    # dt·A of -50 per step: within-chunk exponent differences reach thousands. The masked upper
    # triangle must not produce inf/NaN, and the state is essentially the last step's input.
    x, dt, A, B, C = make_inputs(1, 40, 2, 4, 4, dtype=torch.float32)
    dt = torch.full_like(dt, 5.0)
    A = torch.tensor([-10.0, -10.0])
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size=16)
    y_ref, state_ref = ssd_sequential_reference(x, dt, A, B, C)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(state, state_ref) < TOL[torch.float32]


def test_chunked_gradients_match_reference():
    inputs = [t.requires_grad_() for t in make_inputs(1, 40, 2, 4, 6, dtype=torch.float64)]
    s0 = random_state(1, 2, 4, 6).double().requires_grad_()
    w = torch.randn(1, 40, 2, 4, dtype=torch.float64)
    y, state = ssd_chunked(*inputs, chunk_size=16, initial_state=s0)
    grads = torch.autograd.grad((y * w).sum() + state.sum(), inputs + [s0])
    y_ref, state_ref = ssd_sequential_reference(*inputs, initial_state=s0)
    grads_ref = torch.autograd.grad((y_ref * w).sum() + state_ref.sum(), inputs + [s0])
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        assert rel_err(g, g_ref) < 1e-9


# ---------------------------------------------------------------- state hand-over and dt == 0


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("split", [1, 37, 64])
def test_split_sequence_equals_whole(split, chunk):
    x, dt, A, B, C = make_inputs(2, 130, 4, 8, 16)
    s0 = random_state(2, 4, 8, 16)
    y_ref, state_ref = ssd_sequential_reference(x, dt, A, B, C, initial_state=s0)
    first = [t[:, :split] for t in (x, dt, B, C)]
    second = [t[:, split:] for t in (x, dt, B, C)]

    y1, mid = ssd_chunked(first[0], first[1], A, first[2], first[3], chunk_size=chunk, initial_state=s0)
    # Second piece by the chunked scan...
    y2, end = ssd_chunked(second[0], second[1], A, second[2], second[3], chunk_size=chunk, initial_state=mid)
    assert rel_err(torch.cat([y1, y2], 1), y_ref) < TOL[torch.float32]
    assert rel_err(end, state_ref) < TOL[torch.float32]
    # ...and by stepping, as decoding after a prefill would.
    state, ys = mid, []
    for t in range(second[0].shape[1]):
        y_t, state = ssd_step(state, second[0][:, t], second[1][:, t], A, second[2][:, t], second[3][:, t])
        ys.append(y_t)
    assert rel_err(torch.stack(ys, 1), y_ref[:, split:]) < TOL[torch.float32]
    assert rel_err(state, state_ref) < TOL[torch.float32]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_zero_dt_positions_are_skipped(chunk):
    x, dt, A, B, C = make_inputs(2, 100, 4, 8, 16, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    # The same positions for both batch rows, so "removing" them gives a rectangular batch.
    skip = torch.rand(100, generator=g) < 0.3
    skip[[0, 63, 64, 99]] = True  # chunk edges and both ends
    dt = dt.clone()
    dt[:, skip] = 0.0
    s0 = random_state(2, 4, 8, 16).double()
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size=chunk, initial_state=s0)
    keep = ~skip
    y_kept, state_kept = ssd_sequential_reference(x[:, keep], dt[:, keep], A, B[:, keep], C[:, keep], initial_state=s0)
    assert rel_err(state, state_kept) < TOL[torch.float64]
    assert rel_err(y[:, keep], y_kept) < TOL[torch.float64]
    # The state does change at kept positions, so the check above is not vacuous.
    assert (state - s0).abs().max() > 1e-3


def test_step_with_zero_dt_leaves_state_unchanged():
    x, dt, A, B, C = make_inputs(2, 1, 4, 8, 16)
    s0 = random_state(2, 4, 8, 16)
    _, s1 = ssd_step(s0, x[:, 0], torch.zeros_like(dt[:, 0]), A, B[:, 0], C[:, 0])
    assert torch.equal(s1, s0)
    _, s2 = ssd_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    assert not torch.equal(s2, s0)


def test_shape_errors():
    x, dt, A, B, C = make_inputs(1, 10, 4, 8, 16)
    with pytest.raises(ValueError, match="dt"):
        ssd_chunked(x, dt[:, :, :2], A, B, C)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, initial_state=torch.zeros(1, 4, 16, 8))


# ---------------------------------------------------------------- causal conv


def naive_causal_conv(x, weight, bias, state=None):
    """out[b, t, c] = bias[c] + sum_k w[c, k] * hist[b, t + k, c], hist = last width-1 state inputs ++ x."""
    b, l, ch = x.shape
    width = weight.shape[-1]
    prefix = torch.zeros(b, width - 1, ch, dtype=torch.float64) if state is None else state[:, :, 1:].transpose(1, 2).double()
    hist = torch.cat([prefix, x.double()], 1)
    w = weight[:, 0, :].double()
    out = torch.zeros(b, l, ch, dtype=torch.float64)
    for t in range(l):
        for k in range(width):
            out[:, t] += w[:, k] * hist[:, t + k]
    return out + bias.double()


def conv_params(ch=6, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ch, 1, width, generator=g), torch.randn(ch, generator=g)


@pytest.mark.parametrize("seqlen", [1, 3, 4, 9])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv_matches_naive(seqlen, with_state):
    weight, bias = conv_params()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, seqlen, 6, generator=g)
    state = torch.randn(2, 6, 4, generator=g) if with_state else None
    out, final = causal_conv(x, weight, bias, state)
    assert out.shape == x.shape and final.shape == (2, 6, 4)
    assert torch.allclose(out.double(), naive_causal_conv(x, weight, bias, state), atol=1e-5)
    # Final state = the last 4 inputs, reaching into the earlier state (or zeros) when seqlen < 4.
    before = torch.zeros(2, 6, 4) if state is None else state
    expect = torch.cat([before, x.transpose(1, 2)], -1)[:, :, -4:]
    assert torch.equal(final, expect)


def test_causal_conv_matches_nn_conv1d():
    # The module the mixer actually holds: nn.Conv1d(groups=channels, padding=width-1), truncated.
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 11, 6)
    with torch.no_grad():
        expect = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)
        out, _ = causal_conv(x, conv.weight, conv.bias)
    assert torch.allclose(out, expect, atol=1e-6)


@pytest.mark.parametrize("split", [1, 2, 5])
def test_causal_conv_split_equals_whole(split):
    weight, bias = conv_params()
    x = torch.randn(2, 12, 6)
    out, final = causal_conv(x, weight, bias)
    out1, mid = causal_conv(x[:, :split], weight, bias)
    out2, end = causal_conv(x[:, split:], weight, bias, mid)
    assert torch.allclose(torch.cat([out1, out2], 1), out, atol=1e-6)
    assert torch.equal(end, final)


def test_causal_conv_step_equals_full():
    weight, bias = conv_params()
    x = torch.randn(2, 10, 6)
    state0 = torch.randn(2, 6, 4)
    out, final = causal_conv(x, weight, bias, state0)
    state, outs = state0, []
    for t in range(10):
        o, state = causal_conv_step(x[:, t], state, weight, bias)
        outs.append(o)
    assert torch.allclose(torch.stack(outs, 1), out, atol=1e-6)
    assert torch.equal(state, final)
    # The input state is not modified in place.
    before = state0.clone()
    o, s = causal_conv_step(x[:, 0], state0, weight, bias)
    assert torch.equal(state0, before) and not torch.equal(s, state0)


def test_causal_conv_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        causal_conv(torch.randn(1, 5, 6), torch.randn(6, 4), torch.randn(6))


# ---------------------------------------------------------------- dispatch and kernel guards


def test_dispatch_falls_back_on_cpu():
    x, dt, A, B, C = make_inputs(1, 50, 4, 8, 16)
    s0 = random_state(1, 4, 8, 16)
    y, state = chunk_scan(x, dt, A, B, C, 16, initial_state=s0)
    y_ref, state_ref = ssd_chunked(x, dt, A, B, C, chunk_size=16, initial_state=s0)
    assert torch.equal(y, y_ref) and torch.equal(state, state_ref)
    y1, s1 = state_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    y1_ref, s1_ref = ssd_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    assert torch.equal(y1, y1_ref) and torch.equal(s1, s1_ref)


def test_kernel_report_shape():
    rep = kernel_report()
    assert set(rep) == {"cuda", "mamba_ssm", "causal_conv1d"}
    for pkg in ("mamba_ssm", "causal_conv1d"):
        assert isinstance(rep[pkg]["available"], bool)
        # Unavailable always comes with a reason; available never does.
        assert (rep[pkg]["error"] is None) == rep[pkg]["available"]
    assert kernels.HAVE_MAMBA_KERNELS == rep["mamba_ssm"]["available"]
    assert kernels.HAVE_CONV_KERNELS == rep["causal_conv1d"]["available"]


@pytest.fixture
def fresh_kernel_cache(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_errors", {})
    for name in list(sys.modules):
        if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
            monkeypatch.delitem(sys.modules, name)


class _BrokenCudaFinder:
    """Import hook that fails like a CUDA extension with a missing shared library."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
            raise OSError(f"lib{name}.so: cannot open shared object file")
        return None


def test_broken_kernel_install_is_reported_not_raised(fresh_kernel_cache, monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_BrokenCudaFinder()] + sys.meta_path)
    rep = kernel_report()
    assert rep["mamba_ssm"]["available"] is False and "OSError" in rep["mamba_ssm"]["error"]
    assert rep["causal_conv1d"]["available"] is False and "cannot open" in rep["causal_conv1d"]["error"]
    assert kernels.HAVE_MAMBA_KERNELS is False and kernels.HAVE_CONV_KERNELS is False
    x, dt, A, B, C = make_inputs(1, 5, 2, 4, 4)
    y, _ = chunk_scan(x, dt, A, B, C, 16)
    assert y.shape == x.shape


def test_missing_kernel_package_is_reported(fresh_kernel_cache, monkeypatch):
    # None in sys.modules makes `import mamba_ssm` raise ModuleNotFoundError.
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    rep = kernel_report()
    assert rep["mamba_ssm"]["available"] is False
    assert rep["mamba_ssm"]["error"].startswith("ModuleNotFoundError")


def test_kernels_can_be_disabled_by_environment(fresh_kernel_cache, monkeypatch):
    imported = []

    class _Recorder:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
                imported.append(name)
            return None

    monkeypatch.setattr(sys, "meta_path", [_Recorder()] + sys.meta_path)
    monkeypatch.setenv("MAMTRA_KERNELS", "0")
    rep = kernel_report()
    assert imported == []  # not even attempted
    assert rep["mamba_ssm"] == {"available": False, "error": "disabled by MAMTRA_KERNELS=0"}
    assert rep["causal_conv1d"]["error"] == "disabled by MAMTRA_KERNELS=0"


# ---------------------------------------------------------------- CUDA

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("method", ["loop", "matrix"])
def test_pure_path_on_cuda(method):
    x, dt, A, B, C = make_inputs(2, 200, 14, 16, 8)
    s0 = random_state(2, 14, 16, 8)
    dev = [t.cuda() for t in (x, dt, A, B, C)]
    y, state = ssd_chunked(*dev, chunk_size=64, initial_state=s0.cuda(), inter_chunk=method)
    y_ref, state_ref = ssd_sequential_reference(x, dt, A, B, C, initial_state=s0)
    assert y.is_cuda
    # TF32 matmuls, if enabled, are what would loosen this; the default keeps float32.
    assert rel_err(y.cpu(), y_ref) < 1e-4
    assert rel_err(state.cpu(), state_ref) < 1e-4


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.HAVE_MAMBA_KERNELS and kernels.HAVE_CONV_KERNELS),
    reason="needs the mamba_ssm and causal_conv1d CUDA kernels",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_match_pure_path(dtype):
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    x, dt, A, B, C = (t.cuda() for t in make_inputs(2, 200, 14, 64, 64, dtype=dtype))
    s0 = random_state(2, 14, 64, 64).cuda()
    y_k, s_k = chunk_scan(x, dt, A, B, C, 64, initial_state=s0, use_kernels=True)
    y_p, s_p = chunk_scan(x, dt, A, B, C, 64, initial_state=s0, use_kernels=False)
    assert rel_err(y_k.cpu(), y_p.cpu()) < tol and rel_err(s_k.cpu(), s_p.cpu()) < tol

    y1_k, s1_k = state_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], use_kernels=True)
    y1_p, s1_p = state_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], use_kernels=False)
    assert rel_err(y1_k.cpu(), y1_p.cpu()) < tol and rel_err(s1_k.cpu(), s1_p.cpu()) < 1e-3

    weight, bias = (t.cuda().to(dtype) for t in conv_params(ch=64, width=4))
    xc = torch.randn(2, 30, 64, device="cuda", dtype=dtype)
    st = torch.randn(2, 64, 4, device="cuda", dtype=dtype)
    o_k, f_k = causal_conv(xc, weight, bias, st, use_kernels=True)
    o_p, f_p = causal_conv(xc, weight, bias, st, use_kernels=False)
    assert rel_err(o_k.cpu(), o_p.cpu()) < tol and torch.equal(f_k, f_p)
    ot_k, st_k = causal_conv_step(xc[:, 0], st, weight, bias, use_kernels=True)
    ot_p, st_p = causal_conv_step(xc[:, 0], st, weight, bias, use_kernels=False)
    assert rel_err(ot_k.cpu(), ot_p.cpu()) < tol and torch.equal(st_k, st_p)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_inplace_decode_steps_equal_pure_steps(state_dtype):
    """The decode cache is updated in place for speed; it must compute exactly what the pure step does."""
    from mamtra_cli.models.kernels import causal_conv_step, state_step

    g = torch.Generator().manual_seed(3)
    b, h, p, n, L = 2, 4, 8, 6, 9
    state_pure = torch.randn(b, h, p, n, generator=g).to(state_dtype)
    state_inpl = state_pure.clone()
    conv_pure = torch.randn(b, 10, 4, generator=g).to(state_dtype)
    conv_inpl = conv_pure.clone()
    w, bias = torch.randn(10, 1, 4, generator=g).to(state_dtype), torch.randn(10, generator=g).to(state_dtype)
    A = -torch.rand(h, generator=g) - 0.5
    for _ in range(L):
        x = torch.randn(b, h, p, generator=g).to(state_dtype)
        dt = torch.rand(b, h, generator=g)
        B, C = torch.randn(b, h, n, generator=g), torch.randn(b, h, n, generator=g)
        y1, state_pure = state_step(state_pure, x, dt, A, B, C)
        y2, same = state_step(state_inpl, x, dt, A, B, C, inplace=True)
        assert same is state_inpl
        assert torch.equal(y1, y2)
        xc = torch.randn(b, 10, generator=g).to(state_dtype)
        o1, conv_pure = causal_conv_step(xc, conv_pure, w, bias)
        o2, same_conv = causal_conv_step(xc, conv_inpl, w, bias, inplace=True)
        assert same_conv is conv_inpl
        torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    assert torch.equal(state_pure, state_inpl) and torch.equal(conv_pure, conv_inpl)

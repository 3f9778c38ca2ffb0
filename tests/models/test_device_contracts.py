"""Contracts that only break on a GPU machine, checked on the CPU.

1. Random init must never hand a generator to a tensor on another device (CUDA refuses a CPU generator:
   "Expected a 'cuda' device type for generator but found 'cpu'"; `profile vram/speed` crashed on it).
   A dispatch mode that applies CUDA's rule to every device, plus models built on the `meta` device, shows
   the mismatch without CUDA.
2. Our call of mamba-ssm's `selective_state_update` must satisfy the 2.3.x wrapper, which reads strides of
   `dt_bias` and `D` even when they are None. A stand-in with that wrapper's signature, shape checks and
   stride reads, computing the step in plain PyTorch, takes the kernel's place in `kernels.state_step`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mamtra_cli.models import kernels
from mamtra_cli.models.config import ModelConfig
from mamtra_cli.models.mamba2 import Mamba2Mixer
from mamtra_cli.models.ssd import ssd_step


def small_config(**kw) -> ModelConfig:
    cfg = dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
               text_vocab_size=60, speech_token_size=40, layer_types=["mamba", "attention"], rope_theta=1e4)
    cfg.update(kw)
    return ModelConfig(**cfg)


# ---------------------------------------------------------------- 1. generator device


class GeneratorDeviceCheck(TorchDispatchMode):
    """Raise, as CUDA does, when a random op's generator lives on another device than the tensor it fills.

    CPU and meta tensors accept any generator, so without this the bug is invisible off-GPU. Every aten op
    that takes a `generator` keyword (uniform_, normal_, rand, randint, multinomial, ...) is checked
    against the devices of its outputs."""

    def __init__(self):
        super().__init__()
        self.checked = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        gen = kwargs.get("generator")
        if gen is not None:
            self.checked += 1
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != gen.device.type:
                    raise RuntimeError(f"{func}: Expected a '{t.device.type}' device type for generator but "
                                       f"found '{gen.device.type}'")
        return out


def test_generator_check_catches_a_cross_device_draw():
    """The check itself: the pattern of the old init (a CPU generator filling a non-CPU tensor) is caught."""
    g = torch.Generator().manual_seed(0)
    with GeneratorDeviceCheck() as check:
        torch.empty(3).uniform_(-1, 1, generator=g)  # same device: fine
        with pytest.raises(RuntimeError, match="Expected a 'meta' device type for generator but found 'cpu'"):
            torch.empty(3, device="meta").uniform_(-1, 1, generator=g)
    assert check.checked == 2


def test_ssm_init_with_cpu_generator_on_a_non_cpu_mixer():
    """A mixer on another device (meta here, CUDA on the H200) is initialised from a CPU generator."""
    with torch.device("meta"):
        mixer = Mamba2Mixer(small_config())
    with GeneratorDeviceCheck() as check:
        mixer.reset_ssm_parameters(torch.Generator().manual_seed(0))
    assert check.checked >= 4  # dt, A, conv weight, conv bias were all drawn under the check


def test_random_model_builds_on_a_non_cpu_device():
    """The crash of `profile vram` / `profile speed --device cuda`: `build_random_model` on a GPU."""
    from mamtra_cli.profiling import build_random_model

    cfg = small_config(layer_types=["mamba", "attention", "mamba"])
    with GeneratorDeviceCheck() as check:
        model = build_random_model(cfg, torch.float32, device="meta", seed=0)
    assert check.checked > 0
    assert model.backbone.layers[0].mamba.conv1d.weight.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ssm_init_values_do_not_depend_on_the_device(dtype):
    """Built on meta and materialised, or built on the CPU: the same seed gives the same bits. And the
    values are those of the original in-place init (the draws and their order did not change), so models
    written by `transfer` before the fix are reproduced exactly."""
    cfg = small_config()
    cpu = Mamba2Mixer(cfg).to(dtype)
    cpu.reset_ssm_parameters(torch.Generator().manual_seed(5))
    with torch.device("meta"):
        other = Mamba2Mixer(cfg)
    other = other.to_empty(device="cpu").to(dtype)
    other.reset_ssm_parameters(torch.Generator().manual_seed(5))
    for name, p in cpu.named_parameters():
        if name.startswith(("in_proj", "out_proj")):
            continue  # not touched by the SSM init
        assert torch.equal(p, dict(other.named_parameters())[name]), name

    # The original sequence of draws, written out: rand(n_h), uniform(A range), conv weight, conv bias.
    g = torch.Generator().manual_seed(5)
    m = cfg.mamba
    u = torch.rand(cfg.num_attention_heads, generator=g)
    a = torch.empty(cfg.num_attention_heads).uniform_(m.A_init_min, m.A_init_max, generator=g)
    w = torch.empty_like(cpu.conv1d.weight)
    bound = 1.0 / (w.shape[1] * w.shape[2]) ** 0.5
    w.uniform_(-bound, bound, generator=g)
    wb = torch.empty_like(cpu.conv1d.bias).uniform_(-bound, bound, generator=g)
    assert torch.equal(cpu.A_log, torch.log(a).to(dtype))
    assert torch.equal(cpu.conv1d.weight, w) and torch.equal(cpu.conv1d.bias, wb)
    dt = torch.exp(u * (math.log(m.dt_max) - math.log(m.dt_min)) + math.log(m.dt_min)).clamp(min=m.dt_init_floor)
    assert torch.equal(cpu.dt_bias, (dt + torch.log(-torch.expm1(-dt))).to(dtype))  # inverse softplus of dt


# ---------------------------------------------------------------- 2. selective_state_update call contract


def _kernel_launch(*args):
    return args


class FakeSelectiveStateUpdate:
    """Stand-in for mamba-ssm 2.3.x `mamba_ssm.ops.triton.selective_state_update.selective_state_update`.

    Same signature and defaults, same reshaping and shape assertions, and the same stride reads as the
    wrapper does before launching its Triton kernel (written from the 2.3.0-2.3.2 source; including the two
    that fail for a None `dt_bias` / `D`). The step itself is computed here in float32 PyTorch, as the
    kernel does: dt (+ dt_bias, softplus if asked), state ← state·exp(A·dt) + dt·B·x, out = state·C (+ D·x)
    (· silu(z)); the state is updated in place in its own dtype."""

    def __init__(self):
        self.calls = []

    def __call__(self, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                 state_batch_indices=None):
        has_heads = state.dim() > 3
        if state.dim() == 3:
            state = state.unsqueeze(1)
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if dt.dim() == 2:
            dt = dt.unsqueeze(1)
        if A.dim() == 2:
            A = A.unsqueeze(0)
        if B.dim() == 2:
            B = B.unsqueeze(1)
        if C.dim() == 2:
            C = C.unsqueeze(1)
        if D is not None and D.dim() == 1:
            D = D.unsqueeze(0)
        if z is not None and z.dim() == 2:
            z = z.unsqueeze(1)
        if dt_bias is not None and dt_bias.dim() == 1:
            dt_bias = dt_bias.unsqueeze(0)
        _, nheads, dim, dstate = state.shape
        batch = x.shape[0]
        assert x.shape == (batch, nheads, dim)
        assert dt.shape == x.shape
        assert A.shape == (nheads, dim, dstate)
        ngroups = B.shape[1]
        assert nheads % ngroups == 0
        assert B.shape == (batch, ngroups, dstate)
        assert C.shape == B.shape
        if D is not None:
            assert D.shape == (nheads, dim)
        if z is not None:
            assert z.shape == x.shape
        if dt_bias is not None:
            assert dt_bias.shape == (nheads, dim)
        assert state_batch_indices is None  # we never pass it
        z_strides = (z.stride(0), z.stride(1), z.stride(2)) if z is not None else (0, 0, 0)
        # The two expressions of the 2.3.x wrapper that assume dt_bias / D exist: `tie_hdim` evaluates
        # dt_bias.stride(-1) whenever A and dt have zero strides (our scalar-per-head layout), and the kernel
        # arguments unpack `*(D.stride(0), D.stride(1)) if D is not None else 0`, i.e. `*0` for a None D.
        tie_hdim = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0
        # A call, as in the wrapper (the starred conditional is only valid syntax in an argument list).
        launch_args = _kernel_launch(
            state.stride(0), state.stride(1), state.stride(2), state.stride(3),
            x.stride(0), x.stride(1), x.stride(2),
            dt.stride(0), dt.stride(1), dt.stride(2),
            *(dt_bias.stride(0), dt_bias.stride(1)) if dt_bias is not None else 0,
            A.stride(0), A.stride(1), A.stride(2),
            B.stride(0), B.stride(1), B.stride(2),
            C.stride(0), C.stride(1), C.stride(2),
            *(D.stride(0), D.stride(1)) if D is not None else 0,
            z_strides[0], z_strides[1], z_strides[2],
            tie_hdim,
        )
        self.calls.append({"tie_hdim": tie_hdim, "n_args": len(launch_args), "D": D, "dt_bias": dt_bias})

        # (batch, nheads, dim[, dstate]) float32 computation; B, C expanded from groups to heads.
        rep = nheads // ngroups
        Bh = B.float().repeat_interleave(rep, dim=1)  # (batch, nheads, dstate)
        Ch = C.float().repeat_interleave(rep, dim=1)
        d = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
        if dt_softplus:
            d = torch.where(d <= 20.0, F.softplus(d), d)
        dA = torch.exp(A.float() * d[..., None])  # (batch, nheads, dim, dstate)
        new = state.float() * dA + (d[..., None] * Bh[:, :, None, :]) * x.float()[..., None]
        state.copy_(new)
        out = (new * Ch[:, :, None, :]).sum(-1)  # (batch, nheads, dim)
        if D is not None:
            out = out + x.float() * D.float()
        if z is not None:
            out = out * F.silu(z.float())
        out = out.to(x.dtype)
        return out if has_heads else out.squeeze(1)


@pytest.fixture
def fake_mamba_kernels(monkeypatch):
    """Route `kernels.state_step` to the stand-in, as if mamba-ssm 2.3 imported and the tensors were on CUDA."""
    fake = FakeSelectiveStateUpdate()
    monkeypatch.setattr(kernels, "_on_cuda", lambda *tensors: True)
    monkeypatch.setattr(kernels, "_have_mamba", lambda: True)
    monkeypatch.setattr(kernels, "_get", lambda name: fake if name == "selective_state_update" else None)
    return fake


def step_inputs(b=2, h=6, p=8, n=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(b, h, p, n, generator=g).to(dtype)
    x = torch.randn(b, h, p, generator=g).to(dtype)
    dt = torch.rand(b, h, generator=g) * 0.2  # softplus'ed already (float32, as the mixer makes it)
    A = -torch.rand(h, generator=g) * 4 - 0.5
    B = torch.randn(b, h, n, generator=g).to(dtype)
    C = torch.randn(b, h, n, generator=g).to(dtype)
    return state, x, dt, A, B, C


def test_fake_kernel_rejects_calls_without_dt_bias_and_D():
    """The stand-in is faithful to the failure of crash (ii): without dt_bias and D it raises."""
    fake = FakeSelectiveStateUpdate()
    state, x, dt, A, B, C = step_inputs()
    b, h, p, n = state.shape
    with pytest.raises(AttributeError, match="stride"):
        fake(state, x, dt[:, :, None].expand(b, h, p), A[:, None, None].expand(h, p, n), B, C)
    zero = torch.zeros(h, p)
    with pytest.raises(TypeError):  # `*0`: a None D with a dt_bias given
        fake(state, x, dt[:, :, None].expand(b, h, p), A[:, None, None].expand(h, p, n), B, C, dt_bias=zero)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_step_calls_selective_state_update_as_mamba_ssm_23_needs(fake_mamba_kernels, inplace, dtype):
    state, x, dt, A, B, C = step_inputs(dtype=dtype)
    ref_state = state.clone()
    y_ref, s_ref = ssd_step(ref_state, x, dt, A, B, C)
    y, s = kernels.state_step(state, x, dt, A, B, C, use_kernels=True, inplace=inplace)
    assert len(fake_mamba_kernels.calls) == 1  # the kernel branch was taken, not the pure fallback
    call = fake_mamba_kernels.calls[0]
    # D and dt_bias were passed, as float32 zeros on x's device; zero strides keep one decay per head
    for t in (call["D"], call["dt_bias"]):
        assert t is not None and t.dtype == torch.float32 and t.device == x.device and not t.any()
    assert call["tie_hdim"] is True
    assert (s is state) == inplace
    if not inplace:
        assert torch.equal(state, ref_state)  # the caller's state is untouched
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert y.dtype == x.dtype and s.dtype == state.dtype
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(s, s_ref, **tol)


def test_mixer_decode_through_the_kernel_contract_equals_pure_path(fake_mamba_kernels):
    """A whole Mamba layer's decode step with the kernel branch (stand-in) equals the pure-PyTorch branch."""
    from mamtra_cli.models.cache import MambaCache

    torch.manual_seed(0)
    cfg = small_config()
    mixer = Mamba2Mixer(cfg).eval()
    mixer.reset_ssm_parameters(torch.Generator().manual_seed(1))
    u = torch.randn(2, 1, cfg.hidden_size)

    def cache():
        c = MambaCache(2, mixer.conv_dim, cfg.mamba.d_conv, cfg.num_attention_heads, cfg.head_dim, cfg.head_dim,
                       torch.float32, "cpu")
        c.ssm_state.normal_(generator=torch.Generator().manual_seed(2))
        return c

    with torch.no_grad():
        ck, cp = cache(), cache()
        yk = mixer(u, None, ck)
        assert len(fake_mamba_kernels.calls) == 1
        mixer.use_kernels = False
        yp = mixer(u, None, cp)
    assert len(fake_mamba_kernels.calls) == 1
    torch.testing.assert_close(yk, yp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ck.ssm_state, cp.ssm_state, atol=1e-5, rtol=1e-5)

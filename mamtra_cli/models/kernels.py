"""Optional CUDA accelerators for the Mamba-2 mixer, with pure-PyTorch fallbacks.

The kernels come from two optional packages (the `mamtra[cuda]` extra):

- `mamba_ssm`: `mamba_chunk_scan_combined` (chunked SSD prefill) and `selective_state_update` (one
  decoding step; `fused_state_step` also folds dt_bias + softplus, D·x and the silu(z) gate into it);
- `causal_conv1d`: `causal_conv1d_fn` (prefill) and `causal_conv1d_update` (one decoding step, with the
  SiLU that follows the conv fused in).

Neither is ever required. They are imported lazily, on first use, and any import failure is recorded
rather than raised: mamba-ssm 2.3 raises ModuleNotFoundError from its own `__init__` on machines without
its CUDA build, and a broken CUDA install can surface as OSError (missing .so) or RuntimeError (Triton
finding no driver). A kernel is used only when it imported AND the tensors live on CUDA AND the call is
within what the kernel supports; everything else takes the pure-PyTorch path, which has the same contract.

Setting the environment variable MAMTRA_KERNELS=0 before first use skips both imports (reported as
disabled): the pure path on a machine that has the kernels, e.g. to compare the two in one run.

Module attributes `HAVE_MAMBA_KERNELS` and `HAVE_CONV_KERNELS` are computed on first access.
`kernel_report()` says what is available and, if not, why.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ssd import ssd_chunked, ssd_step

__all__ = [
    "HAVE_MAMBA_KERNELS",
    "HAVE_CONV_KERNELS",
    "chunk_scan",
    "state_step",
    "fused_step_available",
    "fused_state_step",
    "causal_conv",
    "causal_conv_step",
    "kernel_report",
]

# Failures an optional-accelerator import may raise; anything else is a bug and propagates.
_IMPORT_ERRORS = (ImportError, OSError, RuntimeError)

_lock = threading.Lock()
_loaded: Dict[str, Any] = {}  # name -> callable, filled once by _load()
_errors: Dict[str, str] = {}  # package -> "ExceptionType: message"

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _load() -> None:
    with _lock:
        if "_done" in _loaded:
            return
        if os.environ.get("MAMTRA_KERNELS", "").strip() == "0":
            for package in ("mamba_ssm", "causal_conv1d"):
                _errors[package] = "disabled by MAMTRA_KERNELS=0"
            _loaded["_done"] = True
            return
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            _loaded["mamba_chunk_scan_combined"] = mamba_chunk_scan_combined
            _loaded["selective_state_update"] = selective_state_update
        except _IMPORT_ERRORS as e:
            _errors["mamba_ssm"] = f"{type(e).__name__}: {e}"
        try:
            from causal_conv1d import causal_conv1d_fn, causal_conv1d_update

            _loaded["causal_conv1d_fn"] = causal_conv1d_fn
            _loaded["causal_conv1d_update"] = causal_conv1d_update
        except _IMPORT_ERRORS as e:
            _errors["causal_conv1d"] = f"{type(e).__name__}: {e}"
        _loaded["_done"] = True


def _get(name: str) -> Optional[Callable[..., Any]]:
    _load()
    return _loaded.get(name)


def _have_mamba() -> bool:
    return _get("mamba_chunk_scan_combined") is not None and _get("selective_state_update") is not None


def _have_conv() -> bool:
    return _get("causal_conv1d_fn") is not None and _get("causal_conv1d_update") is not None


def __getattr__(name: str) -> Any:
    # Lazy module attributes: importing this module must stay cheap and must never fail.
    if name == "HAVE_MAMBA_KERNELS":
        return _have_mamba()
    if name == "HAVE_CONV_KERNELS":
        return _have_conv()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_report() -> Dict[str, Any]:
    """What accelerators are usable here, and why not where they are not.

    Returns a dict: {"cuda": bool, "mamba_ssm": {"available": bool, "error": str | None},
    "causal_conv1d": {...}}. Kernels are only used on CUDA tensors, so with cuda False nothing is
    accelerated even when the packages import.
    """
    _load()
    return {
        "cuda": torch.cuda.is_available(),
        "mamba_ssm": {"available": _have_mamba(), "error": _errors.get("mamba_ssm")},
        "causal_conv1d": {"available": _have_conv(), "error": _errors.get("causal_conv1d")},
    }


def _on_cuda(*tensors: Optional[Tensor]) -> bool:
    return all(t is None or t.is_cuda for t in tensors)


def chunk_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Optional[Tensor] = None,
    use_kernels: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Chunked SSD scan; same contract as `ssd.ssd_chunked`.

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads), already softplus'ed; A: (nheads,);
    B, C: (batch, seqlen, nheads, dstate) (one group per head); initial_state: (batch, nheads, headdim,
    dstate) or None. Returns y (batch, seqlen, nheads, headdim) in x.dtype and the final state
    (batch, nheads, headdim, dstate) in float32.
    """
    if (
        use_kernels
        and _on_cuda(x, dt, A, B, C, initial_state)
        and x.dtype in _KERNEL_DTYPES
        and _have_mamba()
    ):
        kernel = _get("mamba_chunk_scan_combined")
        # dt is already softplus'ed: no dt_bias, no dt_softplus, and the default dt_limit (0, inf)
        # means no clamping. The kernel keeps its states in float32.
        y, final_state = kernel(
            x.contiguous(),
            dt.contiguous(),
            A.float().contiguous(),
            B.contiguous(),
            C.contiguous(),
            chunk_size,
            initial_states=None if initial_state is None else initial_state.float().contiguous(),
            return_final_states=True,
        )
        return y, final_state.float()
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state)


def state_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    use_kernels: bool = True,
    inplace: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One decoding step; same contract as `ssd.ssd_step` (the input state is modified only when inplace).

    state: (batch, nheads, headdim, dstate); x: (batch, nheads, headdim); dt: (batch, nheads);
    A: (nheads,); B, C: (batch, nheads, dstate). Returns y (batch, nheads, headdim) in x.dtype and the
    new state in state.dtype.
    """
    if fused_step_available(state, x, use_kernels) and _on_cuda(dt, A, B, C):
        kernel = _get("selective_state_update")
        b, h, p, n = state.shape
        # The kernel takes per-(head, headdim) dt and per-(head, headdim, dstate) A; zero-stride
        # expands are what it expects for a scalar-per-head A (it then computes one decay per head).
        dt_e = dt[:, :, None].expand(b, h, p)
        A_e = A.float()[:, None, None].expand(h, p, n)
        # mamba-ssm 2.3.x reads `dt_bias.stride(-1)` and unpacks `*(D.stride(0), D.stride(1))` whether or
        # not they were passed, so leaving them out raises (AttributeError / TypeError). Our dt is already
        # biased and softplus'ed and the mixer adds D·x itself, so both are zeros: one 0-dim float32 zero
        # on x's device, expanded to (h, p) with zero strides (stride(-1) == 0 keeps the kernel's
        # one-decay-per-head path). The kernel reads both as float32.
        zero = torch.zeros((), dtype=torch.float32, device=x.device).expand(h, p)
        new_state = state if inplace else state.clone()  # the kernel updates its state argument in place
        y = kernel(new_state, x, dt_e, A_e, B, C, D=zero, z=None, dt_bias=zero, dt_softplus=False)
        return y, new_state
    return ssd_step(state, x, dt, A, B, C, inplace=inplace)


def fused_step_available(state: Tensor, x: Tensor, use_kernels: bool = True) -> bool:
    """Whether `fused_state_step` would run mamba-ssm's kernel for this state and input (CUDA tensors of a
    kernel dtype, mamba-ssm imported, kernels not turned off). The mixer takes its fused decode tail only
    then; elsewhere (CPU, MAMTRA_KERNELS=0) it keeps its unfused pure-PyTorch step, numerics unchanged."""
    return (
        use_kernels
        and _on_cuda(state, x)  # first: on a CPU nothing else is evaluated (no import, traceable)
        and state.dtype in _KERNEL_DTYPES
        and x.dtype in _KERNEL_DTYPES
        and _have_mamba()
    )


def fused_state_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    dt_bias: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor,
    use_kernels: bool = True,
    inplace: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One decoding step of the Mamba-2 mixer from its raw projections to the gated output, in one kernel on
    CUDA (mamba-ssm's `selective_state_update` with dt_bias, dt_softplus=True, D and z), else in PyTorch:

        dt' = softplus(dt + dt_bias);  state ← exp(dt'·A)·state + dt'·x ⊗ B;  y = (state·C + D·x) · silu(z)

    state: (batch, nheads, headdim, dstate), modified only when inplace; x, z: (batch, nheads, headdim);
    dt: (batch, nheads), before bias and softplus; dt_bias, A, D: (nheads,) (A negative: −exp(A_log));
    B, C: (batch, nheads, dstate) (mamba-ssm wants B and C of one shape, and our C has a row per head).
    Returns y (batch, nheads, headdim) in x.dtype, computed in float32 (as the kernel does), and the new
    state in state.dtype (`state` itself when inplace).
    """
    b, h, p, n = state.shape
    if use_kernels and fused_step_available(state, x) and _on_cuda(dt, dt_bias, A, B, C, D, z):
        kernel = _get("selective_state_update")
        # One value per head for dt, dt_bias and A, expanded with zero strides over headdim (and dstate):
        # mamba-ssm's wrapper then takes its one-decay-per-head path (tie_hdim), the layout it expects for a
        # scalar-per-head A. D is read per (head, headdim) and expanded the same way.
        dt_e = dt[:, :, None].expand(b, h, p)
        bias_e = dt_bias[:, None].expand(h, p)
        A_e = A.float()[:, None, None].expand(h, p, n)
        D_e = D[:, None].expand(h, p)
        new_state = state if inplace else state.clone()  # the kernel updates its state argument in place
        y = kernel(new_state, x, dt_e, A_e, B, C, D=D_e, z=z, dt_bias=bias_e, dt_softplus=True)
        return y, new_state
    # Pure reference (the kernel's float32 math, step by step).
    dtf = F.softplus(dt.float() + dt_bias.float())  # (b, h)
    y, new_state = ssd_step(state, x, dtf, A, B, C, inplace=inplace)
    y = (y.float() + x.float() * D.float()[:, None]) * F.silu(z.float())
    return y.to(x.dtype), new_state


def _conv_kernel_ok(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Optional[Tensor]) -> bool:
    return (
        _on_cuda(x, weight, bias, conv_state)
        and 2 <= weight.shape[-1] <= 4  # the widths causal_conv1d compiles
        and x.dtype in _KERNEL_DTYPES
        and weight.dtype in _KERNEL_DTYPES
        and (bias is None or bias.dtype == weight.dtype)
        and _have_conv()
    )


def _check_conv(xBC: Tensor, weight: Tensor, conv_state: Optional[Tensor]) -> None:
    channels = xBC.shape[-1]
    if weight.dim() != 3 or weight.shape[:2] != (channels, 1):
        raise ValueError(f"weight must be ({channels}, 1, width), got {tuple(weight.shape)}")
    if conv_state is not None and conv_state.shape != (xBC.shape[0], channels, weight.shape[-1]):
        raise ValueError(
            f"conv_state must be {(xBC.shape[0], channels, weight.shape[-1])}, got {tuple(conv_state.shape)}"
        )


def causal_conv(
    xBC: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    initial_conv_state: Optional[Tensor] = None,
    use_kernels: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Depthwise causal conv1d over time, before the activation (the caller applies SiLU).

    xBC: (batch, seqlen, channels); weight: (channels, 1, width) as nn.Conv1d(groups=channels) stores it;
    bias: (channels,) or None; initial_conv_state: (batch, channels, width) holding the last `width`
    inputs seen, most recent at index -1 (mamba-ssm's inference-cache convention), or None for zeros.

    Returns out (batch, seqlen, channels) in xBC.dtype and the final conv state (batch, channels,
    width): the last `width` inputs, reaching back into the initial state (or zeros) when seqlen < width;
    in the initial state's dtype, else xBC's.
    """
    _check_conv(xBC, weight, initial_conv_state)
    b, l, ch = xBC.shape
    width = weight.shape[-1]
    state_dtype = xBC.dtype if initial_conv_state is None else initial_conv_state.dtype
    x_t = xBC.transpose(1, 2)  # (b, ch, l)
    if initial_conv_state is None:
        history = x_t.new_zeros(b, ch, width)
    else:
        history = initial_conv_state.to(xBC.dtype)
    # The state is cheap to form in PyTorch for either path: the last `width` inputs.
    final_state = torch.cat([history, x_t], dim=-1)[:, :, -width:].to(state_dtype)

    if use_kernels and _conv_kernel_ok(xBC, weight, bias, initial_conv_state):
        kernel = _get("causal_conv1d_fn")
        # causal_conv1d only accepts initial_states with the channel-last layout: x with
        # stride(1) == 1 (a transposed contiguous (b, l, ch) tensor) and initial_states of
        # shape (b, ch, width-1) with stride(1) == 1.
        x_cl = xBC.contiguous().transpose(1, 2)
        init = None
        if initial_conv_state is not None:
            init = history[:, :, 1:].transpose(1, 2).contiguous().transpose(1, 2)
        out = kernel(x_cl, weight[:, 0, :], bias, initial_states=init)
        return out.transpose(1, 2).to(xBC.dtype), final_state

    cdt = torch.promote_types(xBC.dtype, weight.dtype)
    padded = torch.cat([history[:, :, 1:], x_t], dim=-1).to(cdt)  # (b, ch, width-1+l)
    out = F.conv1d(padded, weight.to(cdt), None if bias is None else bias.to(cdt), groups=ch)
    return out.transpose(1, 2).to(xBC.dtype), final_state


def causal_conv_step(
    x_t: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    use_kernels: bool = True,
    inplace: bool = False,
    activation: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """One token of `causal_conv` (the input state is modified only when inplace).

    x_t: (batch, channels); conv_state: (batch, channels, width), most recent input at index -1;
    weight: (channels, 1, width); bias: (channels,) or None; activation: None or "silu" (applied to the
    output, fused into causal_conv1d's kernel on CUDA). Returns out_t (batch, channels) in x_t.dtype and the
    rolled state (same shape and dtype as conv_state).
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    _check_conv(x_t[:, None, :], weight, conv_state)
    if use_kernels and _conv_kernel_ok(x_t, weight, bias, conv_state) and conv_state.dtype == x_t.dtype:
        kernel = _get("causal_conv1d_update")
        new_state = conv_state if inplace else conv_state.clone()  # the kernel updates it in place
        # Our state keeps the last `width` inputs (newest last); causal_conv1d takes any state_len ≥ width − 1,
        # shifts it by one, appends x and convolves the last `width` inputs: the same update.
        out = kernel(x_t, new_state, weight[:, 0, :], bias, activation=activation)
        return out, new_state
    out, new_state = _conv_step_pure(x_t, conv_state, weight, bias, inplace)
    return (out if activation is None else F.silu(out)), new_state


def _conv_step_pure(x_t: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                    inplace: bool) -> Tuple[Tensor, Tensor]:
    cdt = torch.promote_types(torch.promote_types(x_t.dtype, weight.dtype), conv_state.dtype)
    if inplace and conv_state.dtype == x_t.dtype:
        # Shift the window left by one and put the newest input last, without allocating a new state.
        conv_state.copy_(conv_state.roll(-1, dims=-1))
        conv_state[:, :, -1] = x_t
        out = (conv_state.to(cdt) * weight[:, 0, :].to(cdt)).sum(-1)
        if bias is not None:
            out = out + bias.to(cdt)
        return out.to(x_t.dtype), conv_state
    new_state = torch.cat([conv_state[:, :, 1:], x_t[:, :, None].to(conv_state.dtype)], dim=-1)
    # The newest input enters at full precision, as it does in `causal_conv`.
    window = torch.cat([conv_state[:, :, 1:].to(cdt), x_t[:, :, None].to(cdt)], dim=-1)
    out = (window * weight[:, 0, :].to(cdt)).sum(-1)
    if bias is not None:
        out = out + bias.to(cdt)
    return out.to(x_t.dtype), new_state

"""Pure-PyTorch state-space computation for Mamba-2 layers with a scalar A per head.

The recurrence, for every head h (ngroups == nheads in our layout, so B and C carry one row per head):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * (x_t ⊗ B_t)        state: (headdim, dstate)
    y_t = h_t · C_t                                            output: (headdim,)

There is no D term here: the mixer adds D·x itself.

Three ways to compute it:

- `ssd_chunked` — prefill/training. The "state space duality" (SSD) chunked algorithm: inside a chunk the
  SSM is a masked quadratic form (like causal linear attention with a decay mask); between chunks only the
  (headdim × dstate) states are carried.
- `ssd_step` — one decoding step of the recurrence.
- `ssd_sequential_reference` — a naive float64 time loop, the ground truth for tests.

Shape letters used below: b batch, l seqlen, h nheads, p headdim, n dstate, c number of chunks,
q chunk_size. Internally tensors are laid out chunk-major, (b, c, h, q, ...): every matmul is then one
batched call over contiguous matrices, and the per-chunk slices of the inter-chunk loop are contiguous.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ssd_chunked", "ssd_step", "ssd_sequential_reference"]


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    # float32 is the floor: bf16/fp16 cumulative sums and exponentials lose far too much precision.
    # float64 inputs stay float64 so that tests can check the algorithm itself tightly.
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, l, h, _ = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:3] != (b, l, h):
        raise ValueError(f"B must be ({b}, {l}, {h}, dstate), got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")


def _carry_states_sequential(chunk_states: Tensor, chunk_log_decay: Tensor, state0: Tensor) -> Tuple[Tensor, Tensor]:
    """States entering each chunk, by a loop over chunks.

    chunk_states: (b, c, h, p, n) — each chunk's own contribution, as if it had started from zero.
    chunk_log_decay: (b, c, h) — sum of dt·A over the chunk.
    state0: (b, h, p, n).
    Returns (entering (b, c, h, p, n), final (b, h, p, n)).
    """
    decay = torch.exp(chunk_log_decay)[..., None, None]
    entering = []
    s = state0
    for k in range(chunk_states.shape[1]):
        entering.append(s)
        # Out of place on purpose: autograd must see every intermediate state.
        s = torch.addcmul(chunk_states[:, k], s, decay[:, k])
    return torch.stack(entering, dim=1), s


def _stable_segsum(v: Tensor) -> Tensor:
    """out[..., i, j] = sum(v[..., j+1 : i+1]) for i >= j, -inf above the diagonal.

    Summing the masked copies directly (rather than differencing one long cumsum) avoids the
    cancellation between two large cumulative sums, which matters across many chunks.
    """
    k = v.shape[-1]
    rep = v[..., None, :].expand(*v.shape, k).transpose(-1, -2)  # rep[..., i, j] = v[..., i]
    strict = torch.ones(k, k, dtype=torch.bool, device=v.device).tril(-1)
    seg = torch.cumsum(rep.masked_fill(~strict, 0.0), dim=-2)
    return seg.masked_fill(~strict.logical_or(torch.eye(k, dtype=torch.bool, device=v.device)), float("-inf"))


def _carry_states_matrix(chunk_states: Tensor, chunk_log_decay: Tensor, state0: Tensor) -> Tuple[Tensor, Tensor]:
    """Same contract as `_carry_states_sequential`, as one (c+1)×(c+1) decay-matrix product.

    One big matmul instead of c small steps; it does O(c²·p·n) work instead of O(c·p·n), which is
    why the loop is the default on CPU (see `ssd_chunked`).
    """
    b, c, h, p, n = chunk_states.shape
    all_states = torch.cat([state0[:, None], chunk_states], dim=1).transpose(1, 2).reshape(b, h, c + 1, p * n)
    log_decay = torch.nn.functional.pad(chunk_log_decay.transpose(1, 2), (1, 0))  # (b, h, c+1)
    mix = torch.exp(_stable_segsum(log_decay))  # (b, h, c+1, c+1)
    carried = torch.matmul(mix, all_states).reshape(b, h, c + 1, p, n).transpose(1, 2)
    return carried[:, :-1], carried[:, -1]


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    initial_state: Optional[Tensor] = None,
    *,
    inter_chunk: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Chunked SSD scan.

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads), already softplus'ed, >= 0. dt == 0 makes a position a no-op
            (the state passes through unchanged and the position contributes nothing).
        A: (nheads,), negative.
        B, C: (batch, seqlen, nheads, dstate).
        chunk_size: positions per chunk; seqlen need not be a multiple of it.
        initial_state: (batch, nheads, headdim, dstate) or None (zeros).
        inter_chunk: how states are carried across chunks: "loop" (sequential over chunks),
            "matrix" (one decay-matrix product) or "auto" (loop on CPU, matrix elsewhere).

    Returns:
        y: (batch, seqlen, nheads, headdim) in x.dtype.
        final_state: (batch, nheads, headdim, dstate), float32 (float64 if any input is float64).
    """
    _check_shapes(x, dt, A, B, C)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if inter_chunk not in ("auto", "loop", "matrix"):
        raise ValueError(f"inter_chunk must be 'auto', 'loop' or 'matrix', got {inter_chunk!r}")
    out_dtype = x.dtype
    cdt = _compute_dtype(x, dt, A, B, C, initial_state)
    b, l, h, p = x.shape
    n = B.shape[-1]
    q = chunk_size
    c = -(-l // q)
    pad = c * q - l

    def chunked(t: Tensor) -> Tensor:
        # (b, l, h, ...) -> (b, c, h, q, ...)
        t = t.to(cdt)
        if pad:
            # Zero padding; zero dt in particular makes the padded steps leave the state alone.
            t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        t = t.reshape(b, c, q, *t.shape[2:])
        return t.transpose(2, 3).contiguous()

    xc = chunked(x)  # (b, c, h, q, p)
    Bc = chunked(B)  # (b, c, h, q, n)
    Cc = chunked(C)  # (b, c, h, q, n)
    dtc = chunked(dt)  # (b, c, h, q)
    a_cum = torch.cumsum(dtc * A.to(cdt)[:, None], dim=-1)  # (b, c, h, q), non-increasing along q

    # Intra-chunk decay mask L[i, j] = exp(a_cum[i] - a_cum[j]) for j <= i, else 0. The cumsum restarts
    # every chunk, so both terms stay small and their difference is accurate. The upper triangle is
    # set to 0 before exp (its true values are >= 0 and may overflow) and zeroed after: filling it with
    # -inf instead is equivalent but exp(-inf) takes a slow path on CPU (measured ~8x slower).
    upper = torch.ones(q, q, dtype=torch.bool, device=x.device).triu(1)
    seg = (a_cum[..., :, None] - a_cum[..., None, :]).masked_fill_(upper, 0.0)
    # The quadratic form y_i = sum_j (C_i·B_j) L_ij dt_j x_j, with dt_j folded into L's columns.
    weights = torch.matmul(Cc, Bc.transpose(-1, -2))  # (b, c, h, q, q)
    weights = weights.mul_(torch.exp_(seg)).mul_(dtc[..., None, :]).masked_fill_(upper, 0.0)
    y = torch.matmul(weights, xc)  # (b, c, h, q, p)
    del weights, seg

    # Each chunk's own end state, as if it had started from zero.
    to_end = torch.exp(a_cum[..., -1:] - a_cum) * dtc  # (b, c, h, q)
    chunk_states = torch.matmul((xc * to_end[..., None]).transpose(-1, -2), Bc)  # (b, c, h, p, n)

    if initial_state is None:
        state0 = torch.zeros(b, h, p, n, dtype=cdt, device=x.device)
    else:
        if initial_state.shape != (b, h, p, n):
            raise ValueError(f"initial_state must be {(b, h, p, n)}, got {tuple(initial_state.shape)}")
        state0 = initial_state.to(cdt)

    method = inter_chunk
    if method == "auto":
        # Measured on CPU (2 cores, h=14, p=n=64, 1k-8k tokens): the loop beats the matrix form at every
        # length, and it has no cancellation issue. On GPU one matmul beats c tiny kernel launches.
        method = "loop" if x.device.type == "cpu" else "matrix"
    carry = _carry_states_sequential if method == "loop" else _carry_states_matrix
    entering, final_state = carry(chunk_states, a_cum[..., -1], state0)

    # Contribution of the state entering each chunk: y_i += exp(a_cum[i]) * (state · C_i).
    from_prev = torch.matmul(Cc, entering.transpose(-1, -2))  # (b, c, h, q, p)
    y = torch.addcmul(y, from_prev, torch.exp(a_cum)[..., None])

    y = y.transpose(2, 3).reshape(b, c * q, h, p)[:, :l]
    return y.to(out_dtype), final_state


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             inplace: bool = False) -> Tuple[Tensor, Tensor]:
    """One recurrent decoding step: state ← exp(dt·A)·state + dt·x ⊗ B; y = state · C.

    Args:
        state: (batch, nheads, headdim, dstate), any float dtype.
        x: (batch, nheads, headdim).
        dt: (batch, nheads), softplus'ed.
        A: (nheads,).
        B, C: (batch, nheads, dstate).
        inplace: update `state` itself (the decode cache) instead of returning a fresh tensor.

    Returns:
        y: (batch, nheads, headdim) in x.dtype.
        new_state: same shape and dtype as state (`state` itself when inplace).

    Decode is memory-bound: the state (3.7 MB at batch 16 in fp32) is the only large tensor, so the update
    touches it as few times as possible — one scale, one batched rank-1 update (baddbmm), one read for y —
    instead of materialising the outer product x ⊗ B and adding it in a separate pass.
    """
    cdt = _compute_dtype(state, x, dt, A, B, C)
    b, h, p, n = state.shape
    dtf = dt.to(cdt)
    decay = torch.exp(dtf * A.to(cdt))[..., None, None]  # (b, h, 1, 1)
    if inplace and state.dtype == cdt:
        new = state.mul_(decay)
    else:
        new = state.to(cdt) * decay  # one pass: read the state, write the scaled copy in the compute dtype
    flat = new.view(b * h, p, n)
    xdt = (x.to(cdt) * dtf[..., None]).reshape(b * h, p, 1)
    flat.baddbmm_(xdt, B.to(cdt).reshape(b * h, 1, n))
    y = torch.bmm(flat, C.to(cdt).reshape(b * h, n, 1)).view(b, h, p)
    if new.dtype != state.dtype:
        new = state.copy_(new) if inplace else new.to(state.dtype)
    return y.to(x.dtype), new


def ssd_sequential_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Naive time loop in float64: the ground truth for tests (slow; not for real use).

    Shapes as in `ssd_chunked`. Returns (y (batch, seqlen, nheads, headdim), final_state
    (batch, nheads, headdim, dstate)), both float64.
    """
    _check_shapes(x, dt, A, B, C)
    f = torch.float64
    b, l, h, p = x.shape
    n = B.shape[-1]
    x, dt, A, B, C = (t.to(f) for t in (x, dt, A, B, C))
    s = torch.zeros(b, h, p, n, dtype=f, device=x.device) if initial_state is None else initial_state.to(f).clone()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        s = decay[:, :, None, None] * s + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append((s * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y, s

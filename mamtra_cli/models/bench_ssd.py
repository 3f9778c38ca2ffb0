"""Timing of the chunked SSD scan against a step-by-step scan, at CosyVoice 2 sizes.

The sequential baseline is what a naive implementation would do for prefill: call the one-token
recurrence (`ssd_step`) in a Python loop over time. Nothing is printed here; callers format the rows.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

from .ssd import ssd_chunked, ssd_step

__all__ = ["bench_scan"]


def _inputs(length: int, nheads: int, headdim: int, dstate: int, batch: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(batch, length, nheads, headdim, generator=g)
    # Mamba's dt init range (log-uniform in [1e-3, 0.1]) and A = -U(1, 16), as after a fresh init.
    dt = torch.exp(torch.empty(batch, length, nheads).uniform_(math.log(1e-3), math.log(0.1), generator=g))
    A = -torch.empty(nheads).uniform_(1.0, 16.0, generator=g)
    B = torch.randn(batch, length, nheads, dstate, generator=g) / math.sqrt(dstate)
    C = torch.randn(batch, length, nheads, dstate, generator=g) / math.sqrt(dstate)
    return tuple(t.to(device) for t in (x.to(dtype), dt.to(dtype), A, B.to(dtype), C.to(dtype)))


def _sequential(x, dt, A, B, C):
    b, l, h, p = x.shape
    state = torch.zeros(b, h, p, B.shape[-1], dtype=torch.float32, device=x.device)
    ys = []
    for t in range(l):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _time_ms(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def bench_scan(
    lengths: Sequence[int] = (256, 512, 1024, 2048, 4096),
    nheads: int = 14,
    headdim: int = 64,
    dstate: int = 64,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    *,
    chunk_size: int = 64,
    device: str = "cpu",
) -> List[Dict[str, float]]:
    """Time `ssd_chunked` against a Python loop of `ssd_step`, under torch.no_grad().

    Defaults are one Mamba-2 layer of the CosyVoice 2 LM (14 heads, headdim = dstate = 64). Each length
    gets one untimed warm-up of both, then `repeats` interleaved timings (chunked, sequential,
    chunked, ...) so that a change in machine load hits both alike; the medians are reported.

    Returns one dict per length: {"length", "chunked_ms", "sequential_ms", "speedup"}, where
    speedup = sequential_ms / chunked_ms.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    rows = []
    with torch.no_grad():
        for length in lengths:
            x, dt, A, B, C = _inputs(length, nheads, headdim, dstate, batch, dtype, device)
            chunked = lambda: ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size)  # noqa: E731
            sequential = lambda: _sequential(x, dt, A, B, C)  # noqa: E731
            chunked()
            sequential()
            t_chunked, t_seq = [], []
            for _ in range(repeats):
                t_chunked.append(_time_ms(chunked, device))
                t_seq.append(_time_ms(sequential, device))
            c_ms, s_ms = statistics.median(t_chunked), statistics.median(t_seq)
            rows.append({"length": length, "chunked_ms": c_ms, "sequential_ms": s_ms, "speedup": s_ms / c_ms})
    return rows

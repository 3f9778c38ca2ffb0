"""Timing of one decode step: the dynamic-cache step (reference) against the static-cache step, eager, and
(optionally) compiled with `torch.compile` or replayed as a CUDA graph.

All variants start from the same prefilled prompt and decode the same token ids, so they do the same work
(the static step attends over all `max_length` slots, masked). Times are per step, median over `steps`
steps, after `warmup` steps; CUDA work is synchronised around each timed step. Nothing is printed here;
callers format the rows.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["bench_decode"]


def _time_steps(step: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, warmup: int, steps: int) -> float:
    """Median seconds of `step(ids[i])` over `steps` calls after `warmup` calls; ids: (warmup+steps, B)."""
    cuda = ids.is_cuda
    times: List[float] = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(ids[i])
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def bench_decode(model, batch: int = 1, prompt: int = 64, steps: int = 32, warmup: int = 4,
                 max_length: int | None = None, variants: Sequence[str] = ("dynamic", "static"),
                 seed: int = 0) -> Dict[str, float]:
    """Seconds per decode step for each of `variants`: "dynamic" (forward_embeds on a HybridCache),
    "static" (decode_step on a StaticHybridCache), "compiled" (decode_step under
    torch.compile(fullgraph=True, dynamic=False), compile time excluded), "graph" (CUDA graph replay).

    model: a SpeechLM in eval mode on its device and dtype. max_length defaults to prompt + warmup + steps.
    """
    device = model.llm_decoder.weight.device
    g = torch.Generator().manual_seed(seed)
    n = warmup + steps
    max_length = max_length or prompt + n
    embeds = model.speech_embedding(torch.randint(0, model.config.speech_token_size, (batch, prompt),
                                                  generator=g).to(device))
    ids = torch.randint(0, model.config.speech_token_size, (n, batch), generator=g).to(device)
    out: Dict[str, float] = {}
    for name in variants:
        if name == "dynamic":
            cache = model.new_cache(batch)
            model.forward_embeds(embeds, None, cache)

            def step(tok, cache=cache):
                h = model.forward_embeds(model.speech_embedding(tok)[:, None], None, cache)[:, -1]
                return model.llm_decoder(h)
        else:
            cache = model.new_static_cache(batch, max_length)
            model.forward_embeds(embeds, None, cache)
            if name == "static":
                def step(tok, cache=cache):
                    return model.decode_step(tok, cache)
            elif name == "compiled":
                compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
                saved = cache.snapshot()
                compiled(ids[0], cache)  # compile here, untimed; then undo the step
                cache.restore(saved)

                def step(tok, cache=cache, compiled=compiled):
                    return compiled(tok, cache)
            elif name == "graph":
                from mamtra_cli.models.cuda_graph import GraphedDecodeStep

                step = GraphedDecodeStep(model, cache)
            else:
                raise ValueError(f"unknown variant {name!r}")
        out[name] = _time_steps(step, ids, warmup, steps)
    return out

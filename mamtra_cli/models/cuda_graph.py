"""Replay `SpeechLM.decode_step` as a CUDA graph: one launch per token instead of hundreds.

At batch 1 decode is bound by the CPU issuing kernels (an H200 measured 12.9 ms per eager step of the
24-layer teacher against 1.94 ms for a static-KV step replayed as a graph). The static step has fixed
shapes, fixed addresses (the `StaticHybridCache` tensors, updated in place) and no host synchronisation,
which is what capture needs. The graph bakes in the cache it was captured on and the model's weights: reuse
that cache (`StaticHybridCache.reset()` / `load()` between requests, both in place) and do not move or
replace the weights afterwards.

CUDA only. The eager `decode_step` is the reference; `tests/models/test_static_decode.py` compares the two
on a GPU (marked `gpu`).
"""

from __future__ import annotations

import torch

from mamtra_cli.models.cache import StaticHybridCache

__all__ = ["GraphedDecodeStep"]


class GraphedDecodeStep:
    """`step(tokens)` ≡ `model.decode_step(tokens, cache)` for (B,) int64 speech-token ids, replayed from a
    CUDA graph. Returns the logits (B, C) in a buffer that the next call overwrites (clone to keep them).

    Capture needs a few eager warm-up steps (cuBLAS handles, Triton compilation of mamba-ssm kernels);
    they run on the real cache and the cache is restored afterwards, so constructing this object does not
    advance the cache."""

    def __init__(self, model, cache: StaticHybridCache, warmup: int = 3):
        if not torch.cuda.is_available() or cache.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device and a StaticHybridCache on it "
                               f"(cache is on {cache.device}); use model.decode_step on other devices.")
        if model.llm_decoder.weight.device != cache.device:
            raise RuntimeError(f"model on {model.llm_decoder.weight.device}, cache on {cache.device}")
        # Warm-up steps write K/V slots past the fill (restored as unfilled afterwards); on CUDA a write past
        # max_length is a device-side assert that ends the process, so check the room here (host read, once).
        room = cache.max_length - cache.tokens
        if room < 1:
            raise RuntimeError(f"the static cache is full ({cache.max_length} slots); make it longer")
        warmup = max(1, min(warmup, room))
        self.model, self.cache = model, cache
        self.graph = torch.cuda.CUDAGraph()
        # inference_mode: no autograd records, and in-place updates are allowed whether the cache tensors
        # were made inside inference mode (generate) or outside it.
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=cache.device)  # (B,) input slot
        with torch.inference_mode():
            saved = cache.snapshot()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                for _ in range(warmup):
                    model.decode_step(self.tokens, cache)
            torch.cuda.current_stream().wait_stream(side)
            cache.restore(saved)
            # Capture records kernels without running them, so the cache is not advanced here either.
            with torch.cuda.graph(self.graph):
                self.logits = model.decode_step(self.tokens, cache)  # (B, C), a graph-owned buffer

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B,) int64 (any device); advances the cache by one token like `decode_step`."""
        with torch.inference_mode():  # the slot may be an inference tensor (made inside generate's mode)
            self.tokens.copy_(tokens, non_blocking=True)
        self.graph.replay()
        return self.logits

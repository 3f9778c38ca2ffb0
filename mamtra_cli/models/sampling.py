"""CosyVoice 2's token sampling: repetition-aware sampling (RAS) over nucleus sampling.

nucleus: walk the tokens by descending probability, keeping them while the probability mass kept so far is
below top_p and fewer than top_k are kept; draw from the kept ones in proportion to their probability.
RAS: if the drawn token already occurs at least win_size·tau_r times among the last win_size decoded
tokens, draw again from the full distribution instead (this breaks the loops AR speech LMs fall into).
Before the minimum length, stop tokens are rejected and the draw repeated (as CosyVoice's `sampling_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    min_token_text_ratio: float = 2.0  # min speech tokens = ratio × new text tokens (eos rejected before)
    max_token_text_ratio: float = 20.0  # hard stop after ratio × new text tokens
    max_trials: int = 100  # rejection attempts before min length; then stop ids are masked out


def nucleus_sample(logp: torch.Tensor, top_p: float, top_k: int, generator: torch.Generator) -> int:
    """logp: (C,) log-probabilities (float32)."""
    probs = logp.float().softmax(-1)
    sorted_p, sorted_idx = probs.sort(descending=True, stable=True)
    mass_before = sorted_p.cumsum(0) - sorted_p  # probability kept before taking token i
    keep = (mass_before < top_p) & (torch.arange(sorted_p.numel(), device=probs.device) < top_k)
    keep[0] = True
    kept_p = sorted_p[keep]
    choice = torch.multinomial(kept_p.cpu(), 1, replacement=True, generator=generator).item()
    return int(sorted_idx[keep][choice])


def random_sample(logp: torch.Tensor, generator: torch.Generator) -> int:
    probs = logp.float().softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, replacement=True, generator=generator).item())


def ras_sample(logp: torch.Tensor, decoded: list[int], cfg: SamplingConfig, generator: torch.Generator) -> int:
    token = nucleus_sample(logp, cfg.top_p, cfg.top_k, generator)
    recent = decoded[-cfg.win_size:]
    if sum(1 for t in recent if t == token) >= cfg.win_size * cfg.tau_r:
        token = random_sample(logp, generator)
    return token


def sample_next(logp: torch.Tensor, decoded: list[int], cfg: SamplingConfig, generator: torch.Generator,
                first_stop_id: int, allow_stop: bool) -> int:
    """One draw with CosyVoice's rejection of stop ids (ids ≥ first_stop_id) before the minimum length."""
    for _ in range(cfg.max_trials):
        token = ras_sample(logp, decoded, cfg, generator)
        if allow_stop or token < first_stop_id:
            return token
    masked = logp.clone()
    masked[first_stop_id:] = float("-inf")
    return ras_sample(masked, decoded, cfg, generator)

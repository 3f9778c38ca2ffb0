"""Which decode path the speech LM takes after the prefill (`--decode` of `mamtra synth`, `profile speed` and
`profile vram`, and `decode=` of `mamtra_cli.load` and the profile functions).

- "dynamic": `forward_embeds` on a growing `HybridCache` (the reference path; the fastest on a CPU);
- "static": `SpeechLM.decode_step` on a preallocated `StaticHybridCache` (fixed shapes, no host sync);
- "graph": that static step captured once as a CUDA graph and replayed (CUDA only);
- "auto": "graph" on a CUDA device, "dynamic" elsewhere.

All three draw the same tokens up to float rounding of the logits. Importing this module costs nothing (no
torch), so stages can use the help text at import time.
"""

from __future__ import annotations

from mamtra_cli.errors import UserError

DECODE_MODES = ("dynamic", "static", "graph")

DECODE_HELP = ("Decode path after the prefill: auto (graph on CUDA, dynamic on a CPU), dynamic (growing cache), "
               "static (preallocated cache, fixed-shape step) or graph (the static step replayed as a CUDA "
               "graph; CUDA only).")


def resolve_decode(decode: str | None, device) -> str:
    """`decode` ("auto", "dynamic", "static" or "graph", any case; None = auto) for a model on `device` (a
    torch.device or a string such as "cpu", "cuda", "cuda:1") → "dynamic", "static" or "graph".

    A UserError (one sentence) for an unknown value and for "graph" off CUDA."""
    value = "auto" if decode is None else str(decode).strip().lower()
    kind = str(getattr(device, "type", device)).strip().lower().partition(":")[0]
    if value == "auto":
        return "graph" if kind == "cuda" else "dynamic"
    if value not in DECODE_MODES:
        raise UserError(f"Unknown --decode {decode!r}; use auto, dynamic, static or graph.")
    if value == "graph" and kind != "cuda":
        raise UserError(f"--decode graph replays CUDA graphs and needs a CUDA device, but this runs on {kind}; "
                        "use --decode auto, dynamic or static.")
    return value

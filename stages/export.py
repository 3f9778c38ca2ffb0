"""`mamtra export`: pack a speech LM with CosyVoice 2's flow, HiFT and front end into one self-contained bundle
(`mamtra_cli.synthesis.export`, which describes the bundle and its dtypes)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mamtra_cli.cli import THREADS_HELP


def export(
    model: str = typer.Option(..., "--model", help="Speech LM: `mini`, a shipped hybrid (`mini-1-1`, `mini-1-3`, `mini-1-5`, `mini-1-11`), a MamTra model dir "
                              "(transfer/distill output), a CosyVoice 2 dir or its llm.pt."),
    assets: Optional[Path] = typer.Option(None, "--assets", help="CosyVoice 2 model dir with flow.pt, hift.pt, "
                                          "campplus.onnx, speech_tokenizer_v2.onnx, CosyVoice-BlankEN/ "
                                          "(default: --model, when it is such a directory)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write."),
    dtype: str = typer.Option("auto", "--dtype", help="LM weight dtype: bf16 | fp16 | fp32 | auto (bf16 for "
                              "CosyVoice 2 bundles; fp32 for mini-voice bundles, which run on CPUs)."),
    flow_dtype: str = typer.Option("fp32", "--flow-dtype", help="Flow weight dtype: fp32 (safe default) | bf16 | fp16."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Write a self-contained synthesis bundle: LM + flow + HiFT + front-end files + bundle.yaml + manifest.json.

    With a model made from the built-in mini voice (--assets mini, or a mini voice dir) the bundle is a mini
    voice directory instead: LM + character vocabulary + codec + sample voice, which `mamtra synth --model`
    and `mamtra distill --teacher` read like the built-in one.

    Example: mamtra export --model hybrid-1-5 --assets CosyVoice2-0.5B --out hybrid-1-5.bundle
             mamtra export --model mini-hybrid-1-1 --assets mini --out mini-hybrid.bundle
    """
    import json

    from mamtra_cli.synthesis.export import export as write_bundle

    summary = write_bundle(model, out, assets=assets, dtype=dtype, flow_dtype=flow_dtype, threads=threads,
                           force=force)
    print(json.dumps(summary) if json_out else str(out))

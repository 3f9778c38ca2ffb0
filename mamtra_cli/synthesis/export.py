"""Writing self-contained synthesis bundles: `export`, the work of `mamtra export`.

A CosyVoice 2 bundle (layout in mamtra_cli/synthesis/backend.py, "Bundles") is all `mamtra synth --model BUNDLE`
needs: the LM, CosyVoice 2's flow, HiFT and front-end files, bundle.yaml and manifest.json — no CosyVoice
directory, no HyperPyYAML, no pickles (weights are safetensors; the configs plain YAML).

Dtypes: the LM is stored in `dtype` (bf16 by default). The flow stays fp32 unless `flow_dtype` says
otherwise: CosyVoice's own fp16 flow is known to produce NaN/silence, and the flow is small next to the LM.
HiFT is always stored in fp32 (its STFT runs in fp32 anyway).

A model made from the built-in mini voice gives a mini bundle instead: the layout of mamtra_cli/builtin/mini/
(LM + character vocabulary + codec + sample voice), which `mamtra synth --model` and `mamtra distill
--teacher` read like the built-in voice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def export(model: str | Path, out: Path, assets: Optional[Path] = None, dtype: str = "auto", flow_dtype: str = "fp32",
           threads: Optional[int] = None, force: bool = False, *, console=None) -> dict:
    """Write the bundle `out` for the speech LM `model` (a MamTra model dir, a CosyVoice 2 dir or its llm.pt, or
    a built-in name: `mini` or a shipped hybrid such as `mini-1-1`, which gives a mini bundle)
    with the flow, HiFT and front end of `assets` (a CosyVoice 2 dir; default `model` when it is one; `mini` or
    a mini voice dir for a model made from the mini voice). `dtype`: LM weights, bf16 | fp16 | fp32 | auto
    (bf16 for CosyVoice 2 bundles, fp32 for mini bundles). Returns the summary `mamtra export --json` prints.
    `console` (rich) gets progress and the final line; default stderr."""
    import shutil

    import yaml
    from safetensors.torch import save_file

    from mamtra_cli import __version__, checkpoints
    from mamtra_cli.cli import apply_threads, check_threads, count_parameters, stderr_console
    from mamtra_cli.errors import UserError
    from mamtra_cli.synthesis import backend as B
    from mamtra_cli.synthesis.flow import load_flow
    from mamtra_cli.synthesis.hift import export_state_dict, load_hift
    from mamtra_cli.teachers import load_teacher

    console = console or stderr_console()
    check_threads(threads)
    model, out = str(model), Path(out)
    assets = None if assets is None else Path(assets)
    mini_assets = _mini_assets(model, assets)
    if mini_assets is not None:
        return _export_mini(model, mini_assets, out, "fp32" if dtype == "auto" else dtype, force, console, threads)
    dtype = "bf16" if dtype == "auto" else dtype
    lm_dtype = B.parse_dtype(dtype, "--dtype")
    f_dtype = B.parse_dtype(flow_dtype, "--flow-dtype")
    if assets is None:
        if B.has_cosyvoice2_assets(Path(model)):
            assets = Path(model)
        else:
            raise UserError(f"--model {model} holds only a speech LM; pass --assets with the CosyVoice 2 model "
                            "directory that provides flow.pt, hift.pt and the front-end files (or --assets mini "
                            "for a model made from the built-in mini voice).")
    B.check_cosyvoice2_assets(assets)
    checkpoints.check_output_dir(out, force)
    yaml_path = assets / "cosyvoice2.yaml"
    yaml_path = yaml_path if yaml_path.is_file() else None

    with console.status("loading LM, flow and HiFT"):
        lm, lm_info = load_teacher(model)
        flow = load_flow(assets / "flow.pt", yaml_path)
        hift = load_hift(assets / "hift.pt", yaml_path)
    n_threads = apply_threads(threads, count_parameters(lm, flow, hift))
    if lm.config.speech_token_size != flow.config.vocab_size:
        raise UserError(f"The LM {model} has {lm.config.speech_token_size} speech tokens but {assets / 'flow.pt'} "
                        f"{flow.config.vocab_size}; export an LM together with the CosyVoice directory it came from.")
    sampling = B.sampling_from_cosyvoice_yaml(yaml_path)

    front_files = ["campplus.onnx", "speech_tokenizer_v2.onnx", "CosyVoice-BlankEN/vocab.json",
                   "CosyVoice-BlankEN/merges.txt", "CosyVoice-BlankEN/tokenizer_config.json"]
    spec = {
        "format": B.BUNDLE_FORMAT,
        "version": B.BUNDLE_VERSION,
        "sample_rate": int(hift.cfg.sampling_rate),
        "lm": "lm",
        "lm_dtype": dtype,
        "flow": {"weights": "flow.safetensors", "dtype": flow_dtype, "config": flow.config.to_dict()},
        "hift": {"weights": "hift.safetensors", "dtype": "fp32", "weight_norm_naming": "parametrizations",
                 "config": _hift_config_dict(hift.cfg)},
        "frontend": {"tokenizer_dir": "CosyVoice-BlankEN", "speech_tokenizer": "speech_tokenizer_v2.onnx",
                     "campplus": "campplus.onnx"},
        "sampling": {k: getattr(sampling, k) for k in ("top_p", "top_k", "win_size", "tau_r",
                                                       "min_token_text_ratio", "max_token_text_ratio")},
        "streaming": {"token_hop_len": B.TOKEN_HOP_LEN, "token_max_hop_len": B.TOKEN_MAX_HOP_LEN,
                      "mel_cache_len": B.MEL_CACHE_LEN},
    }

    with console.status(f"writing bundle {out}"), checkpoints.staged_output(out, force) as tmp:
        lm_sd = {k: (v.to(lm_dtype) if v.is_floating_point() else v) for k, v in lm.state_dict().items()}
        lm_manifest = checkpoints.run_manifest("export", inputs={"model": lm_info}, parameters={"dtype": dtype})
        (tmp / "lm").mkdir()
        checkpoints.save_model_dir(tmp / "lm", lm.config, lm_sd, lm_manifest)
        save_file({k: v.detach().to(f_dtype).contiguous() for k, v in flow.state_dict().items()},
                  str(tmp / "flow.safetensors"), metadata={"format": "pt", "mamtra": __version__})
        save_file({k: v.detach().float().contiguous() for k, v in export_state_dict(hift).items()},
                  str(tmp / "hift.safetensors"), metadata={"format": "pt", "mamtra": __version__})
        for rel in front_files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(assets / rel, tmp / rel)
        (tmp / B.BUNDLE_FILE).write_text(
            "# MamTra synthesis bundle (written by `mamtra export`); plain YAML.\n"
            + yaml.safe_dump(spec, sort_keys=False))
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fp = checkpoints.file_fingerprint(f)
            files[f.relative_to(tmp).as_posix()] = {"bytes": fp["bytes"], "sha256": fp["sha256"]}
        manifest = checkpoints.run_manifest(
            "export",
            inputs={"model": lm_info, "assets": str(Path(assets).resolve()),
                    "flow": checkpoints.file_fingerprint(assets / "flow.pt"),
                    "hift": checkpoints.file_fingerprint(assets / "hift.pt")},
            parameters={"dtype": dtype, "flow_dtype": flow_dtype},
            outputs={"bundle": B.BUNDLE_FILE}, files=files)
        checkpoints.write_json_atomic(tmp / checkpoints.MANIFEST_FILE, manifest)
        total = sum(v["bytes"] for v in files.values())

    summary = {"out": str(out), "files": len(files) + 1, "bytes": total, "lm_dtype": dtype,
               "flow_dtype": flow_dtype, "layer_types": "".join("A" if t == "attention" else "M"
                                                                for t in lm.config.layer_types),
               "threads": n_threads}
    console.print(f"[green]wrote[/green] {out}: {len(files) + 1} files, {total / 2**20:.1f} MiB "
                  f"(LM {dtype}, flow {flow_dtype}, HiFT fp32)")
    return summary


def _mini_assets(model: str, assets: Optional[Path]) -> Optional[Path]:
    """The mini voice directory whose codec and vocabulary the exported LM speaks, or None for CosyVoice 2.
    `mini` names the built-in voice and `mini-1-1`, … its shipped hybrids (`mamtra_cli.mini.mini_dir`); a
    directory holding codec.yaml is a mini voice (or a mini bundle)."""
    from mamtra_cli.mini import is_builtin, mini_dir
    from mamtra_cli.mini.codec import CODEC_CONFIG

    for candidate in (assets, model):
        if candidate is None:
            continue
        if is_builtin(candidate):
            return mini_dir(candidate)
        if (Path(candidate) / CODEC_CONFIG).is_file():
            return Path(candidate)
    return None


def _export_mini(model: str, assets: Path, out: Path, dtype: str, force: bool, console,
                 threads: Optional[int] = None) -> dict:
    """A mini bundle: the layout of mamtra_cli/builtin/mini/ (config.yaml, model.safetensors, manifest.json,
    text_vocab.json, codec.yaml, codec.safetensors, sample_voice.wav/.txt) with the given LM."""
    import shutil

    from mamtra_cli import checkpoints
    from mamtra_cli.errors import UserError
    from mamtra_cli.mini.backend import MiniBackend
    from mamtra_cli.mini.codec import CODEC_CONFIG, CODEC_WEIGHTS
    from mamtra_cli.mini.text import VOCAB_FILE
    from mamtra_cli.synthesis import backend as B
    from mamtra_cli.teachers import load_teacher

    lm_dtype = B.parse_dtype(dtype, "--dtype")
    if not (assets / CODEC_WEIGHTS).is_file() or not (assets / VOCAB_FILE).is_file():
        raise UserError(f"{assets} is not a complete mini voice (it needs {CODEC_CONFIG}, {CODEC_WEIGHTS} and "
                        f"{VOCAB_FILE}); rebuild it with `mamtra build-mini`.")
    checkpoints.check_output_dir(out, force)
    lm, lm_info = load_teacher(model)
    from mamtra_cli.cli import apply_threads, count_parameters

    n_threads = apply_threads(threads, count_parameters(lm))
    if not MiniBackend.accepts_config(lm.config, assets):
        raise UserError(f"The LM {model} (text vocab {lm.config.text_vocab_size}, speech vocab "
                        f"{lm.config.speech_token_size}) was not made from the mini voice in {assets}; export it "
                        "with the CosyVoice 2 directory it came from (--assets).")
    with console.status(f"writing bundle {out}"), checkpoints.staged_output(out, force) as tmp:
        for name in (VOCAB_FILE, CODEC_CONFIG, CODEC_WEIGHTS, "sample_voice.wav", "sample_voice.txt"):
            if (assets / name).is_file():
                shutil.copyfile(assets / name, tmp / name)
        state = {k: (v.to(lm_dtype) if v.is_floating_point() else v) for k, v in lm.state_dict().items()}
        files = {}
        for f in sorted(p for p in tmp.iterdir() if p.is_file()):
            fp = checkpoints.file_fingerprint(f)
            files[f.name] = {"bytes": fp["bytes"], "sha256": fp["sha256"]}
        manifest = checkpoints.run_manifest(
            "export", inputs={"model": lm_info, "assets": str(Path(assets).resolve())},
            parameters={"dtype": dtype, "format": "mini"}, files=files)
        checkpoints.save_model_dir(tmp, lm.config, state, manifest)
        total = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        n_files = sum(1 for p in tmp.iterdir() if p.is_file())
    layers = "".join("A" if t == "attention" else "M" for t in lm.config.layer_types)
    console.print(f"[green]wrote[/green] {out}: mini bundle, {n_files} files, {total / 2**20:.1f} MiB (LM {dtype})")
    return {"out": str(out), "format": "mini", "files": n_files, "bytes": total, "lm_dtype": dtype,
            "layer_types": layers, "threads": n_threads}


def _hift_config_dict(cfg) -> dict:
    import dataclasses

    d = dataclasses.asdict(cfg)
    return {k: ([list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v)
            for k, v in d.items()}

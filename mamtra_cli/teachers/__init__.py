"""Teachers: the pretrained speech LMs that transfer copies from and distill learns from.

`load_teacher(spec)` accepts
  - a built-in name: `mini` (the mini voice's teacher) or a shipped hybrid of it (`mini-1-1`, …),
  - a MamTra model directory (config.yaml + model.safetensors + manifest.json),
  - a CosyVoice 2 model directory (llm.pt + CosyVoice-BlankEN/config.json, cosyvoice2.yaml optional),
  - an llm.pt file (its Qwen2 config.json via `config_json`, or CosyVoice-BlankEN/config.json beside it),
and returns the model in eval mode plus an info dict for manifests.
"""

from __future__ import annotations

from pathlib import Path

from mamtra_cli.errors import UserError


def _load_builtin(name: str):
    """Models shipped inside the package, addressed by name (`mamtra_cli.mini.is_builtin`): the mini teacher
    (`mamtra_cli/builtin/mini/`, made by `mamtra build-mini`) and its shipped hybrids (materialised from
    `mamtra_cli/builtin/hybrids/<name>/` on first use)."""
    from mamtra_cli import checkpoints
    from mamtra_cli.mini import BUILTIN_DIR, mini_dir
    from mamtra_cli.models.speech_lm import load_model_dir

    if not checkpoints.is_model_dir(BUILTIN_DIR):
        raise UserError(f"The built-in {name} model is not shipped in this version; build one with "
                        f"`mamtra build-mini --out DIR` and pass --teacher DIR.")
    path = mini_dir(name)
    info = {"format": "mamtra-builtin", "name": name, "path": str(path),
            "weights": checkpoints.file_fingerprint(path / checkpoints.WEIGHTS_FILE)}
    model = load_model_dir(path).eval()
    checkpoints.check_finite_weights(model, f"The built-in {name} model ({path})")
    return model, info


def load_teacher(spec, config_json: Path | None = None):
    """Load a teacher: returns `(SpeechLM in eval mode, info dict)`. Anything that is not a usable
    teacher raises `UserError` naming what was expected."""
    from mamtra_cli import checkpoints
    from mamtra_cli.mini import is_builtin

    if is_builtin(spec):
        return _load_builtin(str(spec))
    path = Path(spec)
    expected = ("a CosyVoice 2 model directory (llm.pt and CosyVoice-BlankEN/config.json), an llm.pt file "
                "with its Qwen2 config.json, or a MamTra model directory")
    if not path.exists():
        raise UserError(f"Teacher {path} does not exist; pass {expected}.")

    if path.is_dir() and checkpoints.is_model_dir(path):
        if config_json is not None:
            raise UserError(f"{path} is a MamTra model directory, which carries its own config.yaml; "
                            "drop the Qwen2 config.json argument.")
        checkpoints.check_model_dir(path)
        from mamtra_cli.models.speech_lm import load_model_dir

        model = load_model_dir(path)
        info = {
            "format": "mamtra",
            "path": str(path.resolve()),
            "weights": checkpoints.file_fingerprint(path / checkpoints.WEIGHTS_FILE,
                                                    limit_bytes=64 * 1024 * 1024),
            "manifest_stage": checkpoints.read_manifest(path).get("stage"),
        }
    elif (path.is_dir() and (path / "llm.pt").is_file()) or path.is_file():
        if path.is_file() and path.suffix in (".safetensors", ".yaml", ".yml", ".json", ".onnx"):
            raise UserError(f"Teacher {path} is a {path.suffix} file; pass {expected}.")
        from mamtra_cli.models.speech_lm import model_from_state_dict
        from mamtra_cli.teachers.cosyvoice2 import load_cosyvoice2_lm

        config, state_dict, info = load_cosyvoice2_lm(path, config_json)
        # llm.pt is memory-mapped: copy the tensors so the model never reads a file that may change under it
        # (a model adopting mmap-backed storage dies with SIGBUS when the file is rewritten).
        state_dict = {k: v.clone() for k, v in state_dict.items()}
        # Keys and shapes were checked against config.json already; a mismatch here is a naming bug.
        model = model_from_state_dict(config, state_dict, str(path))
        info["path"] = str(path.resolve())
    elif path.is_dir():
        raise UserError(f"{path} is neither a CosyVoice 2 model directory (no llm.pt) nor a MamTra model "
                        f"directory (no config.yaml + model.safetensors); pass {expected}.")
    else:
        raise UserError(f"Teacher {path} is not a file or directory; pass {expected}.")
    model.eval()
    # Every stage that reads a model through here (score, distill, transfer, export, profile, synth with
    # --assets) refuses NaN/inf weights in one sentence instead of printing NaN scores or training to NaN.
    checkpoints.check_finite_weights(model, f"Model {spec}")
    info["config"] = model.config.to_dict() if hasattr(model, "config") else None
    return model, info

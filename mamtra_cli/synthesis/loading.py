"""Which synthesis backend a `--model` / `--assets` pair names, and the sample voice that comes with it.

Used by `mamtra synth`, `mamtra eval`, `profile vram --bundle` and the Python API alike, so that a model name
means the same thing everywhere: `mini` (or nothing) is the built-in voice, a shipped hybrid's name (`mini-1-1`,
…) its materialised mini voice directory (`mamtra_cli.mini.mini_dir`), a mini voice directory or mini bundle is
the mini backend, a `mamtra export` bundle is self-contained, and an LM with `--assets` borrows the
flow, HiFT and front end of a CosyVoice 2 directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mamtra_cli.errors import UserError


def check_model_exists(model: Optional[str]) -> None:
    """A --model that names nothing is the first thing to report: every later message (no sample voice, pass
    --ref, pass --assets) would only send the user after the wrong problem."""
    from mamtra_cli.mini import is_builtin

    if model is not None and not is_builtin(model) and not Path(model).exists():
        raise UserError(f"Model {model} does not exist; pass a bundle from `mamtra export`, a mini voice "
                        "directory, or a model directory with --assets (or drop --model for the built-in mini voice).")


def uses_mini_backend(model: Optional[str], assets: Optional[Path]) -> bool:
    """True if --model / --assets choose the mini backend (CPU only), decided from the files alone, without
    loading any weights (a shipped hybrid is materialised once, then read from the cache); the same decision
    as `resolve_backend`."""
    from mamtra_cli.mini import mini_dir

    if model is None or model == "mini":
        return True
    path = mini_dir(model)
    codec_dir = path if assets is None else mini_dir(assets)
    if not (path.is_dir() and (codec_dir / "codec.yaml").is_file()):
        return False
    from mamtra_cli.mini.backend import MiniBackend

    return MiniBackend.accepts(path, codec_dir)


def synthesis_device(model: Optional[str], assets: Optional[Path], device: str = "auto") -> str:
    """--device for synthesis with --model / --assets → "cpu", "cuda" or "cuda:N".

    "auto" means the best device *for this backend*: the mini voice runs on the CPU only, so auto picks the
    CPU for it even on a GPU machine (turning auto into cuda first and refusing it afterwards made `synth`
    unusable there without --device cpu); CosyVoice 2 models take the GPU when one is usable. Only an
    explicit --device cuda with the mini voice is an error."""
    from mamtra_cli.cli import parse_device

    requested = str(device).strip().lower()
    if uses_mini_backend(model, assets):
        if requested == "auto":
            return "cpu"
        chosen = parse_device(device)  # unknown values are reported as such first
        if chosen != "cpu":
            raise UserError(f"The mini voice runs on the CPU; drop --device {device} (or use --device cpu).")
        return chosen
    return parse_device(device)


def resolve_backend(model: Optional[str], assets: Optional[Path], device: str = "cpu", lm_dtype=None,
                    max_new_tokens: Optional[int] = None):
    """The synthesis backend for --model / --assets.

    - no --model: the built-in mini voice (`mamtra_cli/builtin/mini/`, `--model mini` names it too);
    - --model MINI_DIR (a `mamtra build-mini` voice or a mini bundle from `mamtra export`), a shipped hybrid
      (`mini-1-1`, …), or a hybrid made from the mini with --assets mini / --assets MINI_DIR: the mini backend
      (CPU, 16 kHz);
    - --model BUNDLE (a `mamtra export` output): everything from the bundle;
    - --model LM --assets COSYVOICE2_DIR: the LM from a MamTra model dir / CosyVoice 2 dir / llm.pt, the rest
      from the CosyVoice 2 directory; --model COSYVOICE2_DIR alone uses that directory for both.
    """
    from mamtra_cli.checkpoints import check_finite_weights

    if str(device).strip().lower() == "auto":
        device = synthesis_device(model, assets, device)
    backend = _build_backend(model, assets, device, lm_dtype, max_new_tokens)
    # Weights with NaN/inf (a damaged or diverged model) would speak silence or noise with no error at all.
    check_finite_weights(backend.lm, f"The speech LM of {model or 'the built-in mini voice'}")
    return backend


def _build_backend(model: Optional[str], assets: Optional[Path], device: str, lm_dtype,
                   max_new_tokens: Optional[int]):
    from mamtra_cli.mini import is_builtin, mini_dir
    from mamtra_cli.synthesis import backend as B

    if model is None or model == "mini":
        if assets is not None and str(assets) != "mini":  # `--assets mini` names the codec it already has
            raise UserError("The built-in mini voice carries its own codec; drop --assets.")
        return default_backend(device, lm_dtype, max_new_tokens)
    check_model_exists(model)
    if assets is not None and is_builtin(assets):
        assets = mini_dir(assets)
    path = mini_dir(model)
    if B.is_bundle(path):
        if assets is not None:
            raise UserError(f"{model} is a bundle and carries its own flow, HiFT and front end; drop --assets.")
        return B.CosyVoice2Backend.from_bundle(path, device=device, lm_dtype=lm_dtype, max_new_tokens=max_new_tokens)
    # A mini voice directory (`mamtra build-mini`) holds its LM, character vocabulary and codec together;
    # a hybrid made from it (transfer/distill) borrows the codec with --assets MINI_DIR.
    voice_dir = path if assets is None else assets
    if path.is_dir() and (Path(voice_dir) / "codec.yaml").is_file():
        from mamtra_cli.mini.backend import MiniBackend

        if MiniBackend.accepts(path, voice_dir):
            _check_cpu_only(device)
            return MiniBackend(path, codec_dir=voice_dir, dtype=lm_dtype, max_new_tokens=max_new_tokens)
    if assets is None:
        if B.has_cosyvoice2_assets(path):
            assets = path
        else:
            raise UserError(f"{model} is not a bundle; pass --assets with a CosyVoice 2 model directory for the "
                            f"flow, HiFT and front end, or make a bundle with `mamtra export --model {model}`.")
    return B.CosyVoice2Backend.from_dirs(model, assets, device=device, lm_dtype=lm_dtype,
                                         max_new_tokens=max_new_tokens)


def default_backend(device: str, lm_dtype=None, max_new_tokens: Optional[int] = None):
    """The built-in mini voice when the package ships one (`mamtra_cli/builtin/mini/`); `max_new_tokens` caps
    the speech tokens of each sentence, as with every other backend."""
    from mamtra_cli.mini import BUILTIN_DIR

    if (BUILTIN_DIR / "codec.yaml").is_file():
        from mamtra_cli.mini.backend import MiniBackend

        _check_cpu_only(device)
        return MiniBackend(dtype=lm_dtype, max_new_tokens=max_new_tokens)
    raise UserError("This version ships no default voice: pass --model BUNDLE (from `mamtra export`), "
                    "--model LM_DIR --assets COSYVOICE2_DIR, or a voice made by `mamtra build-mini`.")


def _check_cpu_only(device: str) -> None:
    """The mini backend runs on the CPU: "auto" means the CPU for it, an explicit GPU is refused."""
    if str(device).strip().lower() not in ("cpu", "auto"):
        raise UserError(f"The mini voice runs on the CPU; drop --device {device} (or use --device cpu).")


def default_reference(model: Optional[str], assets: Optional[Path]) -> Optional[tuple[Path, Optional[str]]]:
    """(wav, transcript) of the sample voice that ships with a mini voice: the built-in one when no --model
    is given, else the mini dir/bundle of --model or --assets. None when there is none (CosyVoice 2)."""
    from mamtra_cli.mini import BUILTIN_DIR, mini_dir

    check_model_exists(model)
    candidates = []
    if model is None or model == "mini":
        candidates.append(BUILTIN_DIR)
    else:
        candidates.append(mini_dir(model))
        if assets is not None:
            candidates.append(mini_dir(assets))
    for d in candidates:
        wav = d / "sample_voice.wav"
        if wav.is_file() and (d / "codec.yaml").is_file():
            txt = d / "sample_voice.txt"
            return wav, (txt.read_text().strip() or None) if txt.is_file() else None
    return None


def voice_reference(model: Optional[str], assets: Optional[Path], ref: Optional[Path] = None,
                    ref_text: Optional[str] = None) -> tuple[Path, Optional[str]]:
    """(wav, transcript) to speak in: `ref` and `ref_text` as given, or else the sample voice of --model /
    --assets with its transcript (unless `ref_text` is given); a UserError when there is none. The wav is
    checked (exists, readable, at most 30 s) before any model is loaded."""
    from mamtra_cli.synthesis.references import check_reference

    if ref is None:
        default = default_reference(model, assets)
        if default is None:
            who = f"Model {model}" if model else "This installation's default voice"
            raise UserError(f"{who} comes with no sample voice; pass --ref with a reference voice wav "
                            "(a few seconds of speech).")
        ref, default_text = default
        ref_text = default_text if ref_text is None else ref_text
    check_reference(Path(ref))
    return Path(ref), ref_text

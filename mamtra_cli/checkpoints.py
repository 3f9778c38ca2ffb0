"""Model directories and atomic stage outputs.

A model directory (the output of transfer/distill, the input of score/distill/export) holds:
  config.yaml        the full architecture (`ModelConfig`), enough to rebuild the model
  model.safetensors  the weights
  manifest.json      what made it; written last, so a directory without it is incomplete

Stages write into a temporary sibling directory and rename it into place at the end (`staged_output`),
so an interrupted stage never leaves a half-written directory that looks finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

from mamtra_cli import __version__
from mamtra_cli.errors import UserError

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


def file_fingerprint(path: Path, limit_bytes: int | None = None) -> dict:
    """sha256 (of the whole file, or of its first `limit_bytes`), size and name: enough to tell two
    teachers apart in a manifest without hashing gigabytes when a prefix will do."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        remaining = size if limit_bytes is None else min(size, limit_bytes)
        while remaining > 0:
            block = f.read(min(1 << 20, remaining))
            if not block:
                break
            h.update(block)
            remaining -= len(block)
    out = {"path": str(path.resolve()), "bytes": size, "sha256": h.hexdigest()}
    if limit_bytes is not None and size > limit_bytes:
        out["sha256_of_first_bytes"] = limit_bytes
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_manifest(stage: str, inputs: dict, parameters: dict, outputs: dict | None = None,
                 metrics: dict | None = None, seed: int | None = None, **extra) -> dict:
    """The provenance record of one stage run (manifest.json)."""
    m = {
        "stage": stage,
        "tool": "mamtra",
        "version": __version__,
        "created_utc": utc_now(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "inputs": inputs,
        "parameters": parameters,
        "outputs": outputs or {},
        "metrics": metrics or {},
        "seed": seed,
    }
    m.update(extra)
    return m


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless --force (checked before any work is done)."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"Output {out} already exists; choose another --out or pass --force to replace it.")
    if out.exists() and not out.is_dir():
        raise UserError(f"Output {out} exists and is not a directory; remove it or choose another --out.")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"The parent of --out ({out.parent}) is not a directory; choose another --out.")


@contextlib.contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success, atomically replace `out` with it.

    On any exception the temporary directory is removed and `out` (if it existed) is untouched.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(src: Path, out: Path) -> None:
    """Rename the finished directory `src` to `out`, replacing an old `out` so that at every instant one
    complete directory exists (the old one is moved aside first and removed last)."""
    src, out = Path(src), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(src, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, out)


def load_foreign_checkpoint(path: Path, fix: str):
    """`torch.load` a checkpoint we did not write (CosyVoice's llm.pt, flow.pt, hift.pt): weights_only=True
    (no code runs from the pickle) and memory-mapped, falling back to a plain read for the legacy non-zip
    format, which cannot be mapped. Any failure is one UserError sentence ending in `fix`."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist or is not a file; {fix}.")
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a real pickle that would run or build foreign objects
            culprit = str(e).split("Unsupported global:", 1)[-1].strip().splitlines()[0][:120]
            raise UserError(f"{path} holds more than plain tensors ({culprit}), so it is not loaded "
                            f"(weights_only=True); {fix}.") from None
        raise UserError(f"Cannot read {path} as a PyTorch checkpoint (not a valid pickle); {fix}.") from None
    except Exception as e:  # noqa: BLE001 - zip, EOF, format errors: all mean "not a usable checkpoint"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0].rstrip(".")
        raise UserError(f"Cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {first[:200]}); "
                        f"{fix}.") from None


def save_model_dir(directory: Path, config, state_dict: dict, manifest: dict) -> None:
    """Write config.yaml, model.safetensors and (last) manifest.json into `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config.save(directory / CONFIG_FILE)
    # safetensors refuses tensors that share storage (tied weights) and non-contiguous views.
    tensors = {k: v.detach().contiguous().clone() if _shares_storage(v, state_dict) else v.detach().contiguous()
               for k, v in state_dict.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "mamtra": __version__})
    write_json_atomic(directory / MANIFEST_FILE, manifest)


def _shares_storage(t, state_dict) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in state_dict.values() if v.untyped_storage().data_ptr() == ptr) > 1


def is_model_dir(path: Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def check_model_dir(path: Path) -> None:
    """Name the missing file and how to make it (litgpt's checkpoint-dir check)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"Model directory {path} does not exist; create one with `mamtra transfer --out {path}`.")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass a model directory written by `mamtra transfer`.")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path} has no {name}; it is not a MamTra model directory "
                            "(make one with `mamtra transfer`).")
    if not (path / MANIFEST_FILE).is_file():
        raise UserError(f"{path} has no {MANIFEST_FILE}, so the stage that wrote it did not finish; "
                        "re-run that stage.")


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((Path(path) / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def state_dict_problems(expected: dict, state: dict, ignore: tuple[str, ...] = ()) -> str | None:
    """Compare a checkpoint's tensors with what a model expects ({name: tensor or shape}).

    Returns None when keys and shapes agree, else one clause naming the first few missing keys, unexpected
    keys and shape mismatches (with counts), for the caller's one-sentence UserError."""

    def few(items: list[str], n: int = 3) -> str:
        return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")

    def shape(v) -> tuple:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = [k for k in expected if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in expected and k not in ignore]
    wrong = [f"{k} {list(shape(state[k]))} (expected {list(shape(expected[k]))})"
             for k in expected if k in state and shape(state[k]) != shape(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) {few(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} wrong shape(s) {few(wrong)}")
    return "; ".join(parts) or None

"""Hybrids of the built-in mini voice shipped inside the package (`mini-1-1`, `mini-1-3`, …), stored as the
difference from the mini teacher they were distilled from, and materialised into full mini voice directories
on first use.

Everything under `mamtra_cli/builtin/` must stay under 40 MB and the mini voice alone takes 27 MB, so a hybrid
ships only the tensors it does not share with the teacher (its Mamba layers, and whatever distillation
changed). `builtin/hybrids/NAME/` holds
  config.yaml              the hybrid's ModelConfig, as `mamtra transfer` / `mamtra distill` wrote it
  own_weights.safetensors  the tensors whose key is not in the teacher or whose value differs from it (in any
                           element, bit for bit, or in shape or dtype), stored exactly as the hybrid had them
  manifest.json            the producer's record (commands, seeds, data, metrics), with
                           "base": {"name": "mini", "weights_sha256": sha256 of builtin/mini/model.safetensors}

`materialize(NAME)` writes teacher tensors ∪ own tensors (bit-identical to the distilled model) into a cached
mini voice directory (config.yaml, model.safetensors, manifest.json, and links to the teacher's codec, character
vocabulary and sample voice), which every command then reads as it reads any mini voice directory.
`mamtra_cli.mini.mini_dir` / `is_builtin` are the one place a name becomes that directory.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from mamtra_cli.checkpoints import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from mamtra_cli.errors import UserError
from mamtra_cli.mini import BUILTIN_DIR

HYBRIDS_DIR = BUILTIN_DIR.parent / "hybrids"
OWN_WEIGHTS = "own_weights.safetensors"
SHIPPED_FILES = (CONFIG_FILE, OWN_WEIGHTS, MANIFEST_FILE)
# The rest of a mini voice directory, shared with the teacher (linked, not copied).
VOICE_FILES = ("codec.yaml", "codec.safetensors", "text_vocab.json", "sample_voice.wav", "sample_voice.txt")
BASE_NAME = "mini"
REBUILD_HINT = "reinstall MamTra or rebuild the hybrids with `mamtra build-hybrids`"


def builtin_hybrid_names() -> list[str]:
    """Names of the shipped hybrids (subfolders of HYBRIDS_DIR holding the three files), in ratio order:
    mini-1-1, mini-1-3, mini-1-5, mini-1-11."""
    if not HYBRIDS_DIR.is_dir():
        return []
    names = [p.name for p in HYBRIDS_DIR.iterdir()
             if p.is_dir() and not p.name.startswith(".") and all((p / f).is_file() for f in SHIPPED_FILES)]
    return sorted(names, key=lambda n: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", n)])


# ---------------------------------------------------------------------------------------------- packing
def pack_hybrid(model_dir: Path, out_dir: Path, base_dir: Path = BUILTIN_DIR, manifest: dict | None = None,
                force: bool = False) -> dict:
    """Store the MamTra model directory `model_dir` (a hybrid distilled from the mini teacher in `base_dir`) as a
    shipped hybrid in `out_dir`: config.yaml, own_weights.safetensors (only the tensors not shared with the
    base) and manifest.json (`manifest`, the producer's record, plus "base" and "own_weights"). Written into a
    temporary sibling and renamed into place. Returns {"out", "own_tensors", "own_bytes", "shared_tensors",
    "model_bytes", "base_sha256"}."""
    from mamtra_cli import __version__, checkpoints
    from mamtra_cli.mini.backend import MiniBackend

    model_dir, out_dir, base_dir = Path(model_dir), Path(out_dir), Path(base_dir)
    checkpoints.check_model_dir(model_dir)
    if not MiniBackend.accepts(model_dir, base_dir):
        raise UserError(f"{model_dir} does not speak the vocabularies of the mini voice in {base_dir}; pack only "
                        "hybrids made from that mini teacher.")
    fix = "re-create the model directory"
    state = checkpoints.load_weights_file(model_dir / WEIGHTS_FILE, fix)
    base = checkpoints.load_weights_file(base_dir / WEIGHTS_FILE, "pass the mini voice the hybrid was made from")
    problems = checkpoints.state_dict_problems(expected_state(model_dir / CONFIG_FILE), state)
    if problems:
        raise UserError(f"{model_dir / WEIGHTS_FILE} does not match its config.yaml: {problems}; {fix}.")
    own = {k: v.contiguous() for k, v in state.items() if k not in base or not same_bits(v, base[k])}
    base_sha = file_sha256(base_dir / WEIGHTS_FILE)
    record = dict(manifest or {})
    record["base"] = {"name": BASE_NAME, "weights_sha256": base_sha}
    with checkpoints.staged_output(out_dir, force) as tmp:
        shutil.copyfile(model_dir / CONFIG_FILE, tmp / CONFIG_FILE)
        checkpoints.save_safetensors(own, tmp / OWN_WEIGHTS, {"format": "pt", "mamtra": __version__,
                                                               "base_weights_sha256": base_sha})
        os.chmod(tmp / OWN_WEIGHTS, 0o644)  # shipped in the package: readable by every user of an installation
        record["own_weights"] = {"tensors": len(own), "bytes": (tmp / OWN_WEIGHTS).stat().st_size,
                                 "sha256": file_sha256(tmp / OWN_WEIGHTS)}
        checkpoints.write_json_atomic(tmp / MANIFEST_FILE, record)
    return {"out": str(out_dir), "own_tensors": len(own), "own_bytes": record["own_weights"]["bytes"],
            "shared_tensors": len(state) - len(own), "model_bytes": (model_dir / WEIGHTS_FILE).stat().st_size,
            "base_sha256": base_sha}


def same_bits(a, b) -> bool:
    """True if the tensors `a` and `b` are identical bit for bit (dtype, shape and every byte: unlike
    torch.equal, -0.0 ≠ 0.0 and a NaN equals the same NaN)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def expected_state(config_path: Path) -> dict:
    """{key: meta tensor} of the model that `config_path` describes (its keys and shapes; nothing allocated)."""
    import torch

    from mamtra_cli.models.config import ModelConfig
    from mamtra_cli.models.speech_lm import SpeechLM

    with torch.device("meta"):
        return SpeechLM(ModelConfig.load(config_path)).state_dict()


# ---------------------------------------------------------------------------------------------- materialising
def cache_root() -> Path:
    """$MAMTRA_CACHE_DIR, else $XDG_CACHE_HOME/mamtra, else ~/.cache/mamtra."""
    if os.environ.get("MAMTRA_CACHE_DIR"):
        return Path(os.environ["MAMTRA_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mamtra"
    return Path.home() / ".cache" / "mamtra"


def materialize(name: str) -> Path:
    """The full mini voice directory of the shipped hybrid `name`, built on first use under
    cache_root()/builtin/NAME-KEY (KEY: the first 16 hex digits of a sha256 over the own weights' sha256, the
    teacher weights' sha256 and config.yaml, so a changed hybrid or teacher gets a new directory) and reused
    afterwards. Two processes may race: both build, one rename wins and the other uses the winner's directory.
    A cache root that cannot be written is replaced by a temporary directory for this process (one warning)."""
    src = HYBRIDS_DIR / name
    if not all((src / f).is_file() for f in SHIPPED_FILES):
        raise UserError(f"{name} is not a built-in hybrid (no {', '.join(SHIPPED_FILES)} in {src}); "
                        f"use one of: {', '.join(builtin_hybrid_names()) or 'none are installed'}.")
    try:
        shipped = json.loads((src / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"The manifest of built-in hybrid {name} ({src / MANIFEST_FILE}) is unreadable; "
                        f"{REBUILD_HINT}.") from None
    base_sha = file_sha256(BUILTIN_DIR / WEIGHTS_FILE)
    base_record = shipped.get("base") if isinstance(shipped, dict) else None
    want = base_record.get("weights_sha256") if isinstance(base_record, dict) else None
    if want != base_sha:
        raise UserError(f"Built-in hybrid {name} was distilled from another mini voice (base weights sha256 "
                        f"{str(want)[:12]}…, the installed mini voice has {base_sha[:12]}…); {REBUILD_HINT}.")
    own_sha = file_sha256(src / OWN_WEIGHTS)
    key = hashlib.sha256(f"{own_sha}\n{base_sha}\n".encode() + (src / CONFIG_FILE).read_bytes()).hexdigest()[:16]
    record = {"name": name, "key": key, "hybrid_dir": str(src), "own_weights_sha256": own_sha,
              "base_dir": str(BUILTIN_DIR), "base_weights_sha256": base_sha}

    root = cache_root()
    try:
        return _materialize_into(root / "builtin" / f"{name}-{key}", src, shipped, record)
    except OSError as e:
        fallback = _process_temp_root()
        if str(root) not in _warned:
            _warned.add(str(root))
            print(f"mamtra: warning: cannot write the cache {root} ({e.strerror or e}); built-in hybrid {name} "
                  f"is materialised in {fallback} for this run only (set MAMTRA_CACHE_DIR to a writable folder).",
                  file=sys.stderr)
        return _materialize_into(fallback / "builtin" / f"{name}-{key}", src, shipped, record)


def _materialize_into(target: Path, src: Path, shipped: dict, record: dict) -> Path:
    from mamtra_cli import checkpoints

    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build(tmp, src, shipped, record)
        try:
            checkpoints.rename_noreplace(tmp, target)
        except FileExistsError:
            if _is_complete(target):  # another process won the race with the same content
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            checkpoints.replace_dir(tmp, target, force=True)  # a damaged cache entry: replace it
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(d: Path) -> bool:
    """A cache entry is complete when every file is there (links resolving) and the weights have the size the
    entry recorded (a truncated file is rebuilt, not loaded)."""
    if not (d.is_dir() and all((d / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE))):
        return False
    try:
        made = json.loads((d / MANIFEST_FILE).read_text())["materialized_from"]
        if (d / WEIGHTS_FILE).stat().st_size != made["weights_bytes"]:
            return False
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return all((d / f).is_file() for f in VOICE_FILES if (BUILTIN_DIR / f).is_file())


def _build(tmp: Path, src: Path, shipped: dict, record: dict) -> None:
    """Write config.yaml, model.safetensors (teacher ∪ own tensors, checked against the config), the voice
    files (links) and manifest.json (last) into `tmp`."""
    from mamtra_cli import __version__, checkpoints

    own = checkpoints.load_weights_file(src / OWN_WEIGHTS, REBUILD_HINT)
    base = checkpoints.load_weights_file(BUILTIN_DIR / WEIGHTS_FILE, REBUILD_HINT)
    expected = expected_state(src / CONFIG_FILE)
    # Teacher tensors the hybrid no longer has (the attention weights of its Mamba layers) are left out;
    # an own tensor the config does not know, or a key neither file has, is an error.
    state = {k: own[k] if k in own else base[k] for k in expected if k in own or k in base}
    state.update({k: v for k, v in own.items() if k not in expected})
    problems = checkpoints.state_dict_problems(expected, state)
    if problems:
        raise UserError(f"Built-in hybrid {record['name']} does not match its config.yaml ({problems}); "
                        f"{REBUILD_HINT}.")
    shutil.copyfile(src / CONFIG_FILE, tmp / CONFIG_FILE)
    checkpoints.save_safetensors({k: v.contiguous() for k, v in state.items()}, tmp / WEIGHTS_FILE,
                                 {"format": "pt", "mamtra": __version__})
    for f in VOICE_FILES:
        if not (BUILTIN_DIR / f).is_file():
            continue
        try:
            os.symlink(BUILTIN_DIR / f, tmp / f)
        except OSError:  # no symlinks here (some Windows setups, some network file systems)
            shutil.copyfile(BUILTIN_DIR / f, tmp / f)
    made = {**record, "weights_bytes": (tmp / WEIGHTS_FILE).stat().st_size, "created_utc": checkpoints.utc_now()}
    checkpoints.write_json_atomic(tmp / MANIFEST_FILE, {**shipped, "materialized_from": made})


# ---------------------------------------------------------------------------------------------- helpers
_SHA_CACHE: dict[tuple, str] = {}
_TEMP_ROOT: Path | None = None
_warned: set[str] = set()  # cache roots already warned about (one line per process)


def file_sha256(path: Path) -> str:
    """sha256 of a whole file, remembered for this process while its size and mtime stay the same (a command
    resolves a hybrid name several times)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _process_temp_root() -> Path:
    """A temporary cache root for this process, removed when it exits."""
    global _TEMP_ROOT
    if _TEMP_ROOT is None:
        _TEMP_ROOT = Path(tempfile.mkdtemp(prefix="mamtra-cache-"))
        atexit.register(shutil.rmtree, _TEMP_ROOT, True)
    return _TEMP_ROOT

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
import secrets
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
        "command": " ".join([_program_name(), *sys.argv[1:]]),
        "inputs": inputs,
        "parameters": parameters,
        "outputs": outputs or {},
        "metrics": metrics or {},
        "seed": seed,
    }
    m.update(extra)
    return m


def _program_name() -> str:
    """`mamtra`, also when run as `python -m mamtra_cli[.cli]` (the demo and the profile workers start stages
    that way; argv[0] is then a file of the package), so that the recorded command can be run again as is."""
    name = Path(sys.argv[0]).name
    if name in ("cli.py", "__main__.py") and Path(sys.argv[0]).parent.name == "mamtra_cli":
        return "mamtra"
    return name


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def rebase_recorded_paths(directory: Path, renames: list[tuple[str, str]]) -> None:
    """Rewrite, in every JSON file under `directory` (manifest.json and other results), each string that
    contains an `old` of `renames` [(old, new), …] with `new` in its place, in that order.

    For a tree whose stages ran inside a temporary directory that is then renamed to its final name (the
    demo runs every stage inside its staged output): their manifests recorded the temporary paths (in the
    command line, in resolved input paths), which would name a directory that no longer exists."""
    def fix(value):
        if isinstance(value, str):
            for old, new in renames:
                value = value.replace(old, new)
            return value
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {fix(k): fix(v) for k, v in value.items()}
        return value

    for path in sorted(Path(directory).rglob("*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not one of ours: leave it as it is
        fixed = fix(obj)
        if fixed != obj:
            write_json_atomic(path, fixed)


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless --force (checked before any work is done).

    This is the early, friendly check; the one that holds is made again at the moment of publishing
    (`replace_dir`), because another run may create `out` while this one is working."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"Output {out} already exists; choose another --out or pass --force to replace it.")
    if out.exists() and not out.is_dir():
        raise UserError(f"Output {out} exists and is not a directory; remove it or choose another --out.")
    check_writable_parent(out)


def check_writable_parent(out: Path) -> None:
    """The folder that will receive `out` (its parent, or the nearest existing ancestor, which
    `staged_output` creates the rest under) must be a directory this user can write in; otherwise a
    stage would fail with a PermissionError traceback after all its work."""
    out = Path(out)
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"The parent of {out} ({parent}) is not a directory; choose another output path.")
    anc = parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{anc} is not a directory, so {out} cannot be created there; choose another output path.")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"Cannot write in {anc} (permission denied), so {out} cannot be created; choose an "
                        "output path in a folder you can write to.")


@contextlib.contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success, move it to `out` (`replace_dir`).

    On any exception the temporary directory is removed and `out` (if it existed) is untouched. Without
    `force`, an `out` that appeared while the stage ran (another run with the same --out) is not replaced:
    this run fails with a UserError and its temporary directory is removed.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(out, "tmp")
    try:
        yield tmp
        replace_dir(tmp, out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fresh_sibling(out: Path, kind: str) -> Path:
    """Create and return a new hidden directory beside `out`, unique to this call: two runs (or two stages
    in one process) writing the same --out must never share, or delete, each other's temporary directory."""
    while True:
        cand = out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            cand.mkdir()
            return cand
        except FileExistsError:
            continue


def replace_dir(src: Path, out: Path, force: bool = False) -> None:
    """Move the finished directory `src` to `out`.

    Without `force` the move is exclusive (`rename_noreplace`): if `out` exists at that instant, nothing is
    replaced and a UserError is raised (the caller removes `src`). An existence check made earlier is not
    enough: another run may have published the same --out in between.
    With `force` an old `out` is replaced so that at every instant one complete directory exists (the old one
    is moved aside first and removed last)."""
    src, out = Path(src), Path(out)
    if not force:
        try:
            rename_noreplace(src, out)
        except FileExistsError:
            raise UserError(f"Output {out} appeared while this stage was running (another run with the same "
                            "--out?); it was left untouched and this run's result discarded — choose another "
                            "--out or pass --force to replace it.") from None
        return
    old = _fresh_sibling(out, "old")
    old.rmdir()  # only the unique name is wanted; os.replace below needs it free
    try:
        os.replace(out, old)
    except FileNotFoundError:  # nothing to replace (or it vanished since the check)
        old = None
    try:
        os.replace(src, out)
    except OSError as e:
        # Something new took `out` between the two renames: keep that, and put the old output back beside it
        # rather than delete it.
        where = ""
        if old is not None:
            try:
                rename_noreplace(old, out)
                old = None
            except OSError:
                where = f" (the previous output is kept in {old})"
        raise UserError(f"Could not move the result into {out} ({e.strerror or e}){where}; another process is "
                        "writing there — run again when it has finished.") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def temp_sibling_file(path: Path) -> Path:
    """A hidden temporary name beside the file `path` (same folder, so the final move is a rename on one file
    system), unique per call, keeping `path`'s suffix (writers such as matplotlib pick the format from it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def publish_file(tmp: Path, path: Path, force: bool) -> None:
    """Move the finished temporary file `tmp` to `path`. Without `force` the move is exclusive: a `path`
    that appeared since the command checked (another run writing the same output) is kept, `tmp` is removed
    and a UserError raised. With `force` an existing file is replaced atomically (os.replace)."""
    tmp, path = Path(tmp), Path(path)
    try:
        if path.is_dir():
            raise UserError(f"Output {path} is a directory; give a file name, or remove the directory.")
        if force:
            os.replace(tmp, path)
            return
        try:
            rename_noreplace(tmp, path)
        except FileExistsError:
            raise UserError(f"Output {path} appeared while this command was writing it (another run with the "
                            "same output?); it was left untouched and this result discarded — pass --force to "
                            "overwrite it or choose another output path.") from None
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- exclusive rename
_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100  # linux/fcntl.h
_renameat2_fn = None  # resolved once: the libc function, or False when this libc has none


def _renameat2(src: Path, dst: Path) -> bool:
    """Linux renameat2(RENAME_NOREPLACE): True if done; False if unavailable here (no such libc function,
    kernel or file-system support), so the caller must use the portable way. FileExistsError if `dst` exists."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc ≥ 2.28, musl ≥ 1.2.2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
            except (AttributeError, OSError):
                pass
    if not _renameat2_fn:
        return False
    import ctypes
    import errno

    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    # EINVAL: this file system does not support the flag; ENOSYS: a kernel older than 3.15 (or a seccomp
    # filter) lacks the system call. Both mean: do it the portable way.
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename the file or directory `src` to `dst` only if `dst` does not exist, as one decision: raise
    FileExistsError otherwise, leaving both as they were. `src` and `dst` must be on one file system.

    - Linux: renameat2(RENAME_NOREPLACE), atomic in the kernel.
    - Windows: os.rename already refuses an existing target.
    - Elsewhere (or a file system without RENAME_NOREPLACE), portably: a plain rename is *not* exclusive on
      POSIX — it replaces a file, and also an existing empty directory — so the target name is first claimed
      with an operation that is exclusive everywhere: a hard link for a file (os.link fails on an existing
      name; the file then has both names and `src` is unlinked, so no empty or partial file is ever seen at
      `dst`), os.mkdir for a directory (then a rename onto that empty directory, which we created, replaces
      it atomically; if another process filled it meanwhile the rename fails and its content is kept).
    """
    src, dst = Path(src), Path(dst)
    if _renameat2(src, dst):
        return
    if os.name == "nt":
        os.rename(src, dst)  # FileExistsError if dst exists
        return
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)  # FileExistsError if dst exists: the exclusive step
        try:
            os.rename(src, dst)
        except OSError as e:
            raise FileExistsError(e.errno, f"{dst} was filled by another process", str(dst)) from None
        return
    try:
        os.link(src, dst, follow_symlinks=False)  # FileExistsError if dst exists: the exclusive step
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this file system (FAT, some network mounts): claim the name with O_EXCL instead,
        # then replace our own empty placeholder atomically.
        os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(src, dst)
        return
    os.unlink(src)


def load_foreign_checkpoint(path: Path, fix: str, mmap: bool = True):
    """`torch.load` a checkpoint we did not write (CosyVoice's llm.pt, flow.pt, hift.pt) or a pickle of our own
    that must hold plain tensors only (distill's trainer_state.pt): weights_only=True (no code runs from the
    pickle) and, by default, memory-mapped, falling back to a plain read for the legacy non-zip format, which
    cannot be mapped. Any failure is one UserError sentence ending in `fix`."""
    import pickle
    import re

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist or is not a file; {fix}.")
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        # torch's wording changes between versions ("Unsupported global: GLOBAL x.y" up to 2.5, "Weights only
        # load failed … Trying to load unsupported GLOBAL x.y whose module x is blocked" since): recognise the
        # refusal by either phrase, and name the offending global when the message has one.
        # A pickle naming a global (a function or class to import and call) is one that would run code; other
        # refusals ("Unsupported operand 23") mean bytes that are no pickle at all: a damaged file.
        found = re.search(r"GLOBAL\s+([\w.]+)", text)
        if found or "unsupported global" in text.lower():
            culprit = f" (it asks for {found.group(1)})" if found else ""
            raise UserError(f"{path} holds more than plain tensors: it is an unsafe pickle with Python code or "
                            f"objects{culprit} that a weights-only load refuses, because loading them could run code "
                            "on this machine; use the original checkpoint file, or re-save only the weights "
                            f"(torch.save(model.state_dict(), ...)) from a copy you trust — {fix}.") from None
        raise UserError(f"Cannot read {path} as a PyTorch checkpoint (the file is damaged or is not a PyTorch "
                        f"checkpoint); {fix}.") from None
    except Exception as e:  # noqa: BLE001 - zip, EOF, format errors: all mean "not a usable checkpoint"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0].rstrip(".")
        raise UserError(f"Cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {first[:200]}); "
                        f"{fix}.") from None


def load_weights_file(path: Path, fix: str, device="cpu") -> dict:
    """The tensors of one of our safetensors files, copied out of the memory map (so that rewriting the file
    later cannot SIGBUS the model using them). A missing, truncated or garbled file is one UserError sentence
    naming it and ending in `fix`, never a SafetensorError traceback."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Weights file {path} does not exist; {fix}.")
    try:
        return {k: v.clone() for k, v in load_file(str(path), device=str(device)).items()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, header JSON errors: all "damaged"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"Cannot read weights {path} ({first}); the file is damaged or truncated — {fix}.") from None


def check_finite_weights(model, what: str, fix: str = "use an earlier checkpoint or re-create the model") -> None:
    """Refuse a model with a NaN or infinite parameter or buffer: it would score NaN, speak noise or train to
    NaN without any error. `what` names the model for the one-sentence UserError ("Model DIR"), `fix` ends it."""
    import torch

    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise UserError(f"{what} has {bad} non-finite value(s) (NaN or inf) in {name}; its weights are "
                                f"damaged or diverged — {fix}.")


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """safetensors' `save_file`, byte-reproducible: it writes the metadata from a Rust HashMap, whose order
    changes from process to process (two packs of the same weights had different sha256s). The header
    (8-byte little-endian length, then compact JSON) is rewritten in place with the metadata keys sorted: same
    length, same tensor entries and offsets, so nothing else in the file moves."""
    import struct

    from safetensors.torch import save_file

    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        body = raw.rstrip(b" ")  # the header is space-padded to a multiple of 8 bytes
        header = json.loads(body)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) == len(body) and canonical != body:
            f.seek(8)
            f.write(canonical)


def save_model_dir(directory: Path, config, state_dict: dict, manifest: dict) -> None:
    """Write config.yaml, model.safetensors and (last) manifest.json into `directory`."""
    directory = Path(directory)
    config.save(directory / CONFIG_FILE)
    # safetensors refuses tensors that share storage (tied weights) and non-contiguous views.
    tensors = {k: v.detach().contiguous().clone() if _shares_storage(v, state_dict) else v.detach().contiguous()
               for k, v in state_dict.items()}
    save_safetensors(tensors, directory / WEIGHTS_FILE, {"format": "pt", "mamtra": __version__})
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

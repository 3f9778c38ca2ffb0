"""Planning the shards of `mamtra prepare` and reading finished ones back.

The split is by speaker: with the seed, a shuffled list of the speakers gives round(val_fraction × n)
speakers (at least 1 when val_fraction > 0 and there are 2+ speakers, never all) to val. Each split's
utterances, sorted by id, are cut into shards of `shard_size`; a shard's key hashes its utterances (their
files' size and mtime included), the tokenizers and the settings, so a re-run can tell a finished shard that
still matches from one that must be redone. A shard is finished when its `.jsonl` (written last, atomically)
carries that key in its header.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mamtra_cli.data.sources import Item

PLAN_VERSION = 1  # part of every shard key: bump it when a manifest line would come out differently


@dataclass
class Shard:
    """The utterances of one output file `SPLIT/NAME.jsonl`, the key that says what made it, and the worker
    results collected for it until it is written."""

    split: str  # "train" | "val"
    name: str  # shard-NNNNN
    items: list  # [Item], sorted by utt
    key: str = ""
    results: list = field(default_factory=list)


def split_speakers(speakers: list[str], val_fraction: float, seed: int) -> set[str]:
    """The val speakers (see the module docstring); the same set whatever the order of `speakers`."""
    spk = sorted(set(speakers))
    if val_fraction <= 0 or len(spk) < 2:
        return set()
    n_val = min(len(spk) - 1, max(1, round(val_fraction * len(spk))))
    random.Random(seed).shuffle(spk)
    return set(spk[:n_val])


def plan_shards(items: list[Item], val_spk: set[str], shard_size: int, common_key: dict) -> list[Shard]:
    """Train then val shards of at most `shard_size` utterances each, keyed by `common_key` (tokenizers,
    settings) and their utterances."""
    shards = []
    for split in ("train", "val"):
        mine = sorted((it for it in items if (it.spk in val_spk) == (split == "val")), key=lambda it: it.utt)
        for k, start in enumerate(range(0, len(mine), shard_size)):
            sh = Shard(split, f"shard-{k:05d}", mine[start:start + shard_size])
            blob = json.dumps([common_key, split, sh.name, [it.key_fields() for it in sh.items]],
                              sort_keys=True, ensure_ascii=False)
            sh.key = hashlib.sha256(blob.encode()).hexdigest()
            shards.append(sh)
    return shards


def shard_header(path: Path) -> Optional[dict]:
    """The header record of a manifest shard, or None when `path` is missing or holds none."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        obj = json.loads(first)
        return obj if isinstance(obj, dict) and "mamtra_manifest" in obj else None
    except (OSError, json.JSONDecodeError):
        return None


def shard_done(directory: Path, sh: Shard, embeddings: bool) -> Optional[dict]:
    """The header of a finished shard with the right key, else None."""
    path = directory / sh.split / f"{sh.name}.jsonl"
    h = shard_header(path) if path.is_file() else None
    if not h or h.get("shard_key") != sh.key:
        return None
    if embeddings and not (directory / sh.split / f"{sh.name}.emb.npz").is_file():
        return None
    return h


def has_finished_shard(work: Path) -> bool:
    """True if `work` holds a shard whose .jsonl (written last, atomically) marks it finished."""
    return any(f.is_file() for split in ("train", "val") for f in (work / split).glob("shard-*.jsonl"))


def summarize(work: Path, shards: list[Shard], val_spk: set[str], items: list[Item]) -> dict:
    utts = {"train": 0, "val": 0}
    seconds = {"train": 0.0, "val": 0.0}
    spks = {"train": set(), "val": set()}
    skipped: dict[str, int] = {}
    for sh in shards:
        h = shard_header(work / sh.split / f"{sh.name}.jsonl") or {}
        st = h.get("stats", {})
        utts[sh.split] += st.get("utterances", 0)
        seconds[sh.split] += st.get("seconds", 0.0)
        spks[sh.split].update(st.get("speakers", []))
        for k, v in st.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + v
    total_s = seconds["train"] + seconds["val"]
    return {
        "utterances": {"train": utts["train"], "val": utts["val"], "total": utts["train"] + utts["val"]},
        "hours": {"train": round(seconds["train"] / 3600, 4), "val": round(seconds["val"] / 3600, 4),
                  "total": round(total_s / 3600, 4)},
        "speakers": {"train": len(spks["train"]), "val": len(spks["val"])},
        "listed_utterances": len(items),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
    }

"""Decode-time cache size against sequence length, teacher vs hybrids (the paper's Fig. 5; `mamtra profile
cache-growth`), measured on a real `HybridCache` after real forward passes and checked against the analytic
size; and the exact crossover length from which a hybrid's cache is the smaller.
"""

from __future__ import annotations

from pathlib import Path

from mamtra_cli import profiling as P
from mamtra_cli.errors import UserError


class CacheAccountingError(RuntimeError):
    """The cache a real run produced does not have the size the architecture implies: a bug, not bad input."""


def crossover_tokens(teacher_cfg, hybrid_cfg, batch: int = 1, bytes_per_element: int = 2) -> int | None:
    """Smallest length T ≥ 1 at which the hybrid's cache is strictly smaller than the teacher's, or None if
    it never is. With per-token KV bytes a_t, a_h and constant Mamba bytes m_t, m_h (all from
    `analytic_cache_bytes`), hybrid(T) < teacher(T) ⇔ (a_t − a_h)·T > m_h − m_t, so
    T* = ⌊(m_h − m_t) / (a_t − a_h)⌋ + 1. For a 1:k hybrid of an all-attention teacher this is
    ⌊mamba_layer_bytes / kv_bytes_per_token_per_layer⌋ + 1, whatever k: 243 for CosyVoice 2 (123,904 / 512
    = 242 exactly, where the two are equal)."""
    from mamtra_cli.models.cache import analytic_cache_bytes

    t1 = analytic_cache_bytes(teacher_cfg, 1, batch, bytes_per_element)
    h1 = analytic_cache_bytes(hybrid_cfg, 1, batch, bytes_per_element)
    da = t1["attention_bytes"] - h1["attention_bytes"]  # per-token KV bytes saved
    dm = h1["mamba_bytes"] - t1["mamba_bytes"]  # constant state bytes added
    if da <= 0:
        return 1 if dm < 0 else None
    if dm < 0:
        return 1
    return dm // da + 1


def profile_cache_growth(model: list[str] | None = None, arch: str | None = None, ratio: str = "1:1,1:3,1:5,1:11",
                         lengths: str = "128,512,1024,2048,4096,8192", batch: int = 1, dtype: str = "bf16",
                         fill: str = "prefill", decode_steps: int = 2, chunk: int = 512, out: Path | None = None,
                         seed: int = 0, threads: int | None = None, force: bool = False, *, console=None) -> dict:
    """Cache bytes against tokens for `model`s (anything `load_teacher` takes), or for random-weight models of
    the arch profile `arch` (the teacher and one hybrid per `ratio`); the keyword arguments are the options
    of `mamtra profile cache-growth` (its --help explains the method). With `out`, writes cache_growth.csv,
    .json and .png there. Returns the result `--json` prints; a measurement that disagrees with the formula
    raises CacheAccountingError."""
    import torch

    from mamtra_cli.cli import check_threads, stderr_console
    from mamtra_cli.models.cache import analytic_cache_bytes

    console = console or stderr_console()
    out = None if out is None else Path(out)
    check_threads(threads)
    P.check_results_out(out, "cache_growth", force)  # before minutes of measuring, not after
    torch_dtype = P.parse_dtype(dtype)
    if fill not in ("prefill", "synthetic"):
        raise UserError(f"Unknown --fill {fill!r}; use prefill or synthetic.")
    wanted = sorted(set(P.parse_int_list(lengths, "--lengths")))
    specs = P.resolve_specs(model, arch, ratio, seed)
    n_threads = P.apply_profile_threads(threads, specs)
    bpe = torch.tensor([], dtype=torch_dtype).element_size()
    teacher = next((s for s in specs if all(t == "attention" for t in s.config.layer_types)), None)

    crossovers = {}
    if teacher is not None:
        for s in specs:
            if s is not teacher:
                crossovers[s.name] = crossover_tokens(teacher.config, s.config, batch, bpe)
    verify = sorted({t for c in crossovers.values() if c is not None for t in (c - 1, c) if t >= 1})
    all_lengths = sorted(set(wanted) | set(verify))

    measured: dict[str, dict[int, dict]] = {}
    for s in specs:
        with console.status(f"building {s.name} ({s.layout})"):
            lm = s.build(torch_dtype)
        cache = lm.new_cache(batch, torch_dtype)
        g = torch.Generator().manual_seed(seed)
        measured[s.name] = {}
        for n in all_lengths:
            with console.status(f"{s.name}: {fill} to {n} tokens"):
                how = P.grow_cache(lm, cache, n, decode_steps, fill, chunk, g)
            rep = cache.report()
            ana = analytic_cache_bytes(s.config, n, batch, bpe)
            if rep.tokens != n or (rep.attention_bytes, rep.mamba_bytes) != (ana["attention_bytes"], ana["mamba_bytes"]):
                raise CacheAccountingError(
                    f"{s.name} at {n} tokens (batch {batch}, {dtype}): HybridCache.report() says "
                    f"{rep.tokens} tokens, attention {rep.attention_bytes:,} B + Mamba {rep.mamba_bytes:,} B = "
                    f"{rep.total_bytes:,} B but analytic_cache_bytes says attention {ana['attention_bytes']:,} B + "
                    f"Mamba {ana['mamba_bytes']:,} B = {ana['total_bytes']:,} B")
            measured[s.name][n] = {"tokens": n, "measured_bytes": rep.total_bytes,
                                   "attention_bytes": rep.attention_bytes, "mamba_bytes": rep.mamba_bytes,
                                   "analytic_bytes": ana["total_bytes"], "allocated_bytes": cache.allocated_nbytes(),
                                   "mb": P.mb(rep.total_bytes), **how}
        console.print(f"[green]{s.name}[/green] ({s.layout}): measured = analytic at {len(all_lengths)} lengths")
        del lm, cache

    cross_out = {}
    for name, c in crossovers.items():
        entry = {"tokens": c, "verified": None}
        if c is not None and teacher is not None:
            after = measured[name][c]["measured_bytes"] < measured[teacher.name][c]["measured_bytes"]
            before = c == 1 or measured[name][c - 1]["measured_bytes"] >= measured[teacher.name][c - 1]["measured_bytes"]
            entry["verified"] = bool(after and before)
            entry["measured"] = {str(t): {"hybrid_bytes": measured[name][t]["measured_bytes"],
                                          "teacher_bytes": measured[teacher.name][t]["measured_bytes"]}
                                 for t in (c - 1, c) if t >= 1}
            if not entry["verified"]:
                raise CacheAccountingError(f"crossover of {name}: formula says {c} tokens but measured caches "
                                           f"disagree: {entry['measured']}")
        cross_out[name] = entry

    notes = [f"lengths reached by {'prefill chunks of ' + str(chunk) + ' tokens' if fill == 'prefill' else 'synthetic K/V fill (no compute)'}"
             f" + {decode_steps} real decode step(s) at each length"]
    if (n := P.text_embedding_note(specs)):
        notes.append(n)
    ref = specs[0].config
    result = {
        "dtype": dtype, "batch": batch, "fill": fill, "decode_steps": decode_steps, "lengths": wanted,
        "kv_bytes_per_token_per_attention_layer": 2 * ref.num_key_value_heads * ref.head_dim * bpe * batch,
        "mamba_bytes_per_layer": analytic_cache_bytes(hybrid_like(ref), 0, batch, bpe)["mamba_bytes_per_layer"],
        "models": [{"name": s.name, "layout": s.layout, "source": s.source,
                    "attention_layers": len(s.config.attention_layers), "mamba_layers": len(s.config.mamba_layers),
                    "rows": [measured[s.name][n] for n in wanted]} for s in specs],
        "crossover": cross_out, "notes": notes, "threads": n_threads,
    }
    if out is not None:
        labels = P.legend_labels(specs)
        rows = [{"model": s.name, "layout": s.layout, "tokens": n, "cache_mb": measured[s.name][n]["mb"],
                 "cache_bytes": measured[s.name][n]["measured_bytes"],
                 "analytic_bytes": measured[s.name][n]["analytic_bytes"]} for s in specs for n in wanted]
        P.write_results(out, "cache_growth", rows, result,
                        lambda png: P.plot_lines(png,
                                 {labels[s.name]: (wanted, [measured[s.name][n]["mb"] for n in wanted])
                                  for s in specs},
                                 "sequence length (tokens)", f"decode cache (MB, {dtype}, batch {batch})",
                                 "Cache growth: teacher vs hybrids", note="; ".join(notes)), force=force)
    return result


def format_table(result: dict, out: Path | None = None) -> str:
    """The result of `profile_cache_growth` as the table `mamtra profile cache-growth` prints."""
    names = [m["name"] for m in result["models"]]
    mb = {m["name"]: {r["tokens"]: r["mb"] for r in m["rows"]} for m in result["models"]}
    lines = ["tokens\t" + "\t".join(f"{n} MB" for n in names)]
    for n in result["lengths"]:
        lines.append(f"{n}\t" + "\t".join(f"{mb[s][n]:.3f}" for s in names))
    for name, e in result["crossover"].items():
        if e["tokens"] is None:
            lines.append(f"crossover {name}: never below the teacher")
        else:
            lines.append(f"crossover {name}: below the teacher from {e['tokens']} tokens (verified by measurement: "
                         f"{'yes' if e['verified'] else 'no'})")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    if out is not None:
        lines.append(f"wrote {Path(out) / 'cache_growth.csv'}, {Path(out) / 'cache_growth.png'}")
    return "\n".join(lines)


def hybrid_like(config):
    """`config` with every layer Mamba: only used to state the size of one Mamba layer's state."""
    return config.with_layer_types(["mamba"] * config.num_layers)

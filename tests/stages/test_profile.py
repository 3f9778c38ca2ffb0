"""`mamtra profile …`: cache sizes measured on real runs equal the analytic ones (tiny models and the real
CosyVoice 2 layer sizes in bf16), the crossover formula, the peak-memory worker, GPU planning arithmetic,
error exits, and JSON/CSV/PNG outputs of the stages on tiny models."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from mamtra_cli import profiling as P
from mamtra_cli.cli import main
from mamtra_cli.models.cache import HybridCache, analytic_cache_bytes
from mamtra_cli.models.config import ATTENTION, MAMBA
from mamtra_cli.profiling.cache_growth import crossover_tokens
from mamtra_cli.profiling.vram import eval_list_lengths, estimate_speech_tokens, estimate_text_tokens, plan_on_gpu
from tests.stages.harness import tiny_arch_yaml

TINY_ARCH = tiny_arch_yaml(4)


@pytest.fixture
def tiny_arch(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_ARCH)
    return str(p)


def run_json(argv, capsys) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ cache growth
def test_cache_growth_tiny_measured_equals_analytic_and_writes_files(tiny_arch, tmp_path, capsys):
    out = tmp_path / "cg"
    res = run_json(["profile", "cache-growth", "--arch", tiny_arch, "--ratio", "1:1,1:3", "--lengths", "8,40",
                    "--dtype", "fp32", "--chunk", "16", "--out", str(out), "--json"], capsys)
    assert [m["name"] for m in res["models"]] == ["teacher", "1:1", "1:3"]
    assert [m["layout"] for m in res["models"]] == ["AAAA", "MAMA", "MMMA"]
    for m in res["models"]:
        cfg = P.hybrid_config(P.arch_config(tiny_arch), {"teacher": 0, "1:1": 1, "1:3": 3}[m["name"]]) \
            if m["name"] != "teacher" else P.arch_config(tiny_arch)
        for row in m["rows"]:
            assert row["measured_bytes"] == row["analytic_bytes"] == analytic_cache_bytes(cfg, row["tokens"], 1, 4)["total_bytes"]
    # KV per token per layer = 2·2·8·4 = 128 B; one Mamba layer = (2·16 + 32)·4·4 + 4·8·8·4 = 2048 B → T* = 17
    assert res["kv_bytes_per_token_per_attention_layer"] == 128
    assert res["mamba_bytes_per_layer"] == 2048
    assert res["crossover"]["1:1"]["tokens"] == res["crossover"]["1:3"]["tokens"] == 17
    assert res["crossover"]["1:1"]["verified"] is True
    rows = list(csv.DictReader(open(out / "cache_growth.csv")))
    assert len(rows) == 6 and {r["model"] for r in rows} == {"teacher", "1:1", "1:3"}
    assert (out / "cache_growth.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "cache_growth.json").read_text())["lengths"] == [8, 40]


def test_real_cosyvoice2_sizes_bf16():
    """Teacher KV 12,288 B per token and 123,904 B per Mamba layer, from HybridCache built off the arch."""
    teacher = P.arch_config("cosyvoice2-0.5b")
    hybrid = P.hybrid_config(teacher, 1)
    g = torch.Generator().manual_seed(0)
    t_cache = HybridCache(teacher, 1, torch.bfloat16)
    P.synthetic_fill(t_cache, 10, g)
    assert t_cache.report().attention_bytes == 10 * 12_288
    h_cache = HybridCache(hybrid, 1, torch.bfloat16)
    P.synthetic_fill(h_cache, 10, g)
    rep = h_cache.report()
    assert {n for t, n in rep.per_layer if t == MAMBA} == {123_904}
    assert rep.mamba_bytes == 12 * 123_904 and rep.attention_bytes == 10 * 12 * 512
    for k in (1, 3, 5, 11):
        assert crossover_tokens(teacher, P.hybrid_config(teacher, k), 1, 2) == 243


def test_small_real_model_run_at_real_dims_bf16():
    """A 2-layer model with CosyVoice 2's real layer sizes, run for real (prefill + decode) in bf16."""
    full = P.arch_config("cosyvoice2-0.5b")
    for types in ([ATTENTION, ATTENTION], [MAMBA, ATTENTION]):
        cfg = full.with_layer_types(types)
        lm = P.build_random_model(cfg, torch.bfloat16, text_rows=P.SHRUNK_TEXT_ROWS)
        cache = lm.new_cache(1)
        P.grow_cache(lm, cache, 7, 2, "prefill", 3, torch.Generator().manual_seed(0))
        rep = cache.report()
        expected = [7 * 512 if t == ATTENTION else 123_904 for t in types]
        assert [n for _, n in rep.per_layer] == expected
        assert rep.total_bytes == analytic_cache_bytes(cfg, 7, 1, 2)["total_bytes"]


def test_crossover_formula_matches_brute_force(tiny_arch):
    teacher = P.arch_config(tiny_arch)
    for batch, bpe in ((1, 4), (3, 2)):
        for k in (1, 3):
            hybrid = P.hybrid_config(teacher, k)
            c = crossover_tokens(teacher, hybrid, batch, bpe)
            size = lambda cfg, t: analytic_cache_bytes(cfg, t, batch, bpe)["total_bytes"]  # noqa: E731
            first = next(t for t in range(1, 1000) if size(hybrid, t) < size(teacher, t))
            assert c == first
    assert crossover_tokens(teacher, teacher) is None


# ------------------------------------------------------------------------------------------ vram
def test_vram_worker_subprocess_reports_positive_peak(tiny_arch):
    spec = P.resolve_specs(None, tiny_arch, "1:1")[0]
    kwargs = {"batch": 8, "prompt_tokens": 8, "total_tokens": 2048, "decode_steps": 2, "dtype": "fp32"}
    m = P.measure_peak(spec, "lm", kwargs, device="cpu", threads=1, timeout=120)
    cache = analytic_cache_bytes(spec.config, 2048, 8, 4)["total_bytes"]  # 8.4 MB
    assert m["method"] == "rss" and m["baseline_bytes"] > 0
    assert m["cache_bytes"] == cache
    assert m["workload_peak_bytes"] >= 0.9 * cache


def test_gpu_planning_arithmetic():
    gpu = {"name": "toy", "memory_gib": 1, "bandwidth_gb_s": 100}
    plan = plan_on_gpu(gpu, weight_resident_bytes=2**29, weight_read_bytes=10**8, per_stream_bytes=2**20,
                       cache_bytes_per_stream=10**6, batch=4)
    assert plan["max_streams"] == 512  # (2^30 − 2^29) / 2^20
    assert plan["floor_ms_per_step"] == pytest.approx((10**8 + 4 * 10**6) / 100e9 * 1e3)
    assert plan["floor_tokens_per_s"] == pytest.approx(4 / (1.04e8 / 100e9))


def test_eval_list_length_rule(tmp_path):
    assert estimate_text_tokens("abcdefgh") == 2 and estimate_text_tokens("你好") == 2
    assert estimate_speech_tokens("a" * 30) == 50  # 30 chars / 15 per s × 25 Hz
    lst = tmp_path / "meta.lst"
    lst.write_text("u1|" + "b" * 15 + "|missing.wav|" + "a" * 30 + "\n")
    (u,) = eval_list_lengths(lst)
    # 2 + ⌈45/4⌉ text tokens + prompt speech 25 (15 chars) ; new speech 50
    assert (u["prompt_tokens"], u["new_tokens"], u["total_tokens"]) == (2 + 12 + 25, 50, 2 + 12 + 25 + 50)


def test_vram_cli_json_and_files(tiny_arch, tmp_path, capsys):
    out = tmp_path / "vr"
    # one model (1:0 is the teacher itself) keeps this to a single worker process
    res = run_json(["profile", "vram", "--gpu", "a6000", "--arch", tiny_arch, "--ratio", "1:0", "--lengths", "512",
                    "--prompt-tokens", "4", "--batch", "4", "--dtype", "fp32", "--threads", "1", "--out", str(out),
                    "--json"], capsys)
    assert res["gpu"]["memory_gib"] == 48 and [r["model"] for r in res["rows"]] == ["teacher"]
    (r,) = res["rows"]
    weights = P.weight_bytes(P.arch_config(tiny_arch), 4)
    assert r["peak_bytes"] > 0 and r["weights_bytes"] == weights["resident_bytes"]
    assert r["cache_bytes"] == analytic_cache_bytes(P.arch_config(tiny_arch), 512, 4, 4)["total_bytes"]
    assert r["plan_max_streams"] == int((48 * 2**30 - weights["resident_bytes"]) // (r["peak_bytes"] / 4))
    assert r["peak_ratio_vs_first"] == 1.0
    for name in ("vram.csv", "vram.json", "vram.png"):
        assert (out / name).stat().st_size > 0


def test_unknown_gpu_exits_2_with_known_names(tiny_arch, capsys):
    assert main(["profile", "vram", "--gpu", "nosuchcard", "--arch", tiny_arch]) == 2
    err = capsys.readouterr().err
    assert "nosuchcard" in err and "a6000" in err and "h100" in err


def test_model_and_arch_are_exclusive(tiny_arch, capsys):
    assert main(["profile", "cache-growth", "--arch", tiny_arch, "--model", "x"]) == 2


# ------------------------------------------------------------------------------------------ speed
def test_speed_tiny_positive_numbers(tiny_arch, capsys):
    res = run_json(["profile", "speed", "--arch", tiny_arch, "--ratio", "1:1", "--batch", "1,2", "--contexts", "16",
                    "--decode-steps", "2", "--repeats", "2", "--prefill-chunk", "4", "--json"], capsys)
    assert res["bandwidth"]["read_gb_s"] > 0 and res["bandwidth"]["copy_gb_s"] > 0
    assert len(res["rows"]) == 4
    for r in res["rows"]:
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and 0 < r["fraction_of_floor"]
        assert len(r["decode_samples_ms"]) == 2
    if not res["reference"]:
        assert any("transformers" in n for n in res["notes"])


def test_truncate_cache_restores_length(tiny_arch):
    cfg = P.arch_config(tiny_arch)
    lm = P.build_random_model(cfg, torch.float32)
    cache = lm.new_cache(2)
    g = torch.Generator().manual_seed(0)
    P.synthetic_fill(cache, 10, g)
    P.decode_steps(lm, cache, 3, g)
    P.truncate_cache(cache, 10)
    assert cache.length == 10 and cache.report().attention_bytes == analytic_cache_bytes(cfg, 10, 2, 4)["attention_bytes"]
    assert cache.next_position.tolist() == [10, 10]

"""Shared machinery of the `mamtra profile …` runs: which models to profile, how to build them, the
workloads that are measured, and how memory, time and bandwidth are measured and written out. The runs
themselves, one module per command, each returning its `--json` result and formatting its table:
`cache_growth`, `vram`, `speed`, `scan`; `__main__` is the CPU peak-memory worker.

Models. `--model DIR …` takes anything `load_teacher` accepts (a built-in name such as `mini-1-1` is resolved
to its directory here, so the worker processes read a path). `--arch NAME --ratio 1:1,1:3` builds
architecture-identical models with random weights and nothing on disk: the teacher (all attention) from
`profiles/arch/NAME.yaml` (or a YAML path) and one hybrid per ratio with `uniform` placement (the layouts
of `profiles/layouts/`). Random init is cheap: modules are created on the meta device and materialised
with `to_empty`, then filled in place (normal(0, 0.02) for matrices, zeros for biases, ones for norms,
Mamba's own init for dt/A/D/conv); nothing stays on meta. The text embedding (151,936 × 896 in CosyVoice 2)
is never read by these workloads — they feed speech-token embeddings — so arch models are built with it
shrunk to `SHRUNK_TEXT_ROWS` rows and every stage says so; weight-byte figures always use the full table.

Workloads (the extension point). A workload is an object with `setup(spec, device)`, which loads
or builds everything that stays resident (weights: counted in the baseline, not in the peak), and
`run() -> dict`, the synthesis-time work whose peak memory is measured. `LMWorkload` is the speech LM's
part of zero-shot synthesis (prompt prefill + decode to a total length). A later end-to-end `synth`
pipeline plugs in by defining a class with the same two methods (LM + flow + HiFT, say) and passing it,
or its `"module:Class"` path, to `measure_peak`; `profile vram` needs no change beyond choosing it.
The CPU path runs each measurement in a fresh `python -m mamtra_cli.profiling` worker process, so a
workload must be constructible from JSON keyword arguments (a dataclass is).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mamtra_cli.errors import UserError
from mamtra_cli.models.cache import AttentionCache, HybridCache, MambaCache
from mamtra_cli.models.config import ATTENTION, ModelConfig

SHRUNK_TEXT_ROWS = 16  # rows kept of the never-read text embedding in --arch models
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------- parsing
def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"Unknown --dtype {name!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(t) for t in str(text).replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UserError(f"Bad {option} {text!r}; give comma-separated positive integers, e.g. 512,2048.") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"Bad {option} {text!r}; give comma-separated positive integers, e.g. 512,2048.")
    return values


# ---------------------------------------------------------------------------------------------- model specs
@dataclass
class ModelSpec:
    """One model to profile. `config` is the full architecture (text embedding included) that byte counts
    use; an arch model is built from it with random weights, a path model is loaded with `load_teacher`."""

    name: str  # table label: "teacher", "1:3", or the directory name
    config: ModelConfig
    source: str  # "arch:cosyvoice2-0.5b (random weights)" or the path
    path: str | None = None
    text_rows: int | None = None  # rows of the text embedding actually built (None = all)
    seed: int = 0

    @property
    def layout(self) -> str:
        return "".join("A" if t == ATTENTION else "M" for t in self.config.layer_types)

    def build(self, dtype: torch.dtype, device="cpu"):
        """The model, in eval mode, in `dtype` on `device`."""
        if self.path is not None:
            from mamtra_cli.teachers import load_teacher

            model, _ = load_teacher(self.path)
            return model.to(device=device, dtype=dtype).eval()
        return build_random_model(self.config, dtype, device, self.seed, self.text_rows)

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.config.to_dict(), "source": self.source, "path": self.path,
                "text_rows": self.text_rows, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(name=d["name"], config=ModelConfig.from_dict(d["config"]), source=d["source"], path=d["path"],
                   text_rows=d["text_rows"], seed=d["seed"])


def arch_config(name_or_path: str) -> ModelConfig:
    """The all-attention teacher config of an arch profile (`profiles/arch/*.yaml` or a YAML path)."""
    from mamtra_cli import profiles

    prof = profiles.load("arch", name_or_path)
    cfg = dict(prof.get("config") or {})
    n = cfg.pop("num_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise UserError(f"Arch profile {name_or_path!r} needs config.num_layers (a positive integer).")
    cfg["layer_types"] = [ATTENTION] * n
    return ModelConfig.from_dict(cfg, source=f"arch profile {name_or_path!r}")


def hybrid_config(teacher: ModelConfig, k: int) -> ModelConfig:
    """1:k hybrid of `teacher` with uniform placement (attention last in each group of k+1)."""
    from mamtra_cli.weight_transfer import attention_layers_for, layer_types_from

    n = teacher.num_layers
    return teacher.with_layer_types(layer_types_from(n, attention_layers_for(n, k, "uniform")))


def resolve_specs(models: list[str] | str | Path | None, arch: str | None, ratios: str | None, seed: int = 0,
                  shrink_text: bool = True) -> list[ModelSpec]:
    """The models of one profiling run: `--model` paths (one, or a list), or `--arch` + `--ratio` (teacher
    first)."""
    from mamtra_cli.weight_transfer import parse_ratio

    if isinstance(models, (str, Path)):
        models = [models]
    models = [str(m) for m in models] if models else None

    if bool(models) == (arch is not None):
        raise UserError("Give either --model DIR (repeatable) or --arch NAME [--ratio 1:1,1:3,…], not both "
                        "and not neither.")
    if models:
        from mamtra_cli.mini import is_builtin, mini_dir
        from mamtra_cli.teachers import load_teacher

        specs = []
        for m in models:
            model, _ = load_teacher(m)  # validates now; built again (in the right dtype) when measured
            path = str(mini_dir(m)) if is_builtin(m) else m
            specs.append(ModelSpec(name=Path(m).name or str(m), config=model.config, source=str(m), path=path))
            del model
        return specs
    teacher = arch_config(arch)
    rows = SHRUNK_TEXT_ROWS if shrink_text else None
    src = f"arch:{arch} (random weights)"
    specs = [ModelSpec("teacher", teacher, src, text_rows=rows, seed=seed)]
    for r in (ratios or "").replace(" ", "").split(","):
        if not r:
            continue
        k = parse_ratio(r)
        if k == 0:
            continue  # 1:0 is the teacher itself
        specs.append(ModelSpec(f"1:{k}", hybrid_config(teacher, k), src, text_rows=rows, seed=seed))
    return specs


def model_label(layer_types: list[str]) -> str:
    """What a model is, for legends and tables: "teacher (12 attention)", "hybrid 1:1 (6A+6M)",
    "hybrid (5A+7M)" when the counts make no 1:k ratio, "all Mamba (12M)". A file or directory name says
    nothing about the model (`hybrid.bundle`, `step-000060`), the layout does."""
    n_a = sum(1 for t in layer_types if t == ATTENTION)
    n_m = len(layer_types) - n_a
    if n_m == 0:
        return f"teacher ({n_a} attention)"
    if n_a == 0:
        return f"all Mamba ({n_m}M)"
    ratio = f" 1:{n_m // n_a}" if n_m % n_a == 0 else ""
    return f"hybrid{ratio} ({n_a}A+{n_m}M)"


def legend_labels(specs: list[ModelSpec]) -> dict[str, str]:
    """{spec name: legend label}: the model's `model_label`, with its name added only where two models of
    one run share a layout (a hybrid before and after distillation), so that every line stays distinct."""
    labels = {s.name: model_label(s.config.layer_types) for s in specs}
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {name: (f"{label}: {name}" if counts[label] > 1 else label) for name, label in labels.items()}


def apply_profile_threads(threads: int | None, specs: list[ModelSpec]) -> int:
    """--threads of a profile stage (the CLI's rule, `mamtra_cli.cli.apply_threads`) for the largest model
    profiled, counted on the meta device (no weights are built for this)."""
    from mamtra_cli.cli import apply_threads

    return apply_threads(threads, max((weight_bytes(s.config, 1)["parameters"] for s in specs), default=None))


def text_embedding_note(specs: list[ModelSpec]) -> str | None:
    shrunk = [s for s in specs if s.text_rows is not None and s.text_rows < s.config.text_vocab_size]
    if not shrunk:
        return None
    return (f"text embedding built with {shrunk[0].text_rows} of {shrunk[0].config.text_vocab_size} rows "
            "(never read by these workloads: they feed speech-token embeddings); weight bytes count the full table")


@torch.no_grad()
def build_random_model(config: ModelConfig, dtype: torch.dtype, device="cpu", seed: int = 0,
                       text_rows: int | None = None):
    """An architecture-identical SpeechLM with cheap random weights (see the module docstring)."""
    from mamtra_cli.models.mamba2 import Mamba2Mixer
    from mamtra_cli.models.speech_lm import SpeechLM

    build_cfg = config if text_rows is None else dataclasses.replace(config, text_vocab_size=text_rows)
    with torch.device("meta"):
        model = SpeechLM(build_cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias") or p.dim() < 2:
            p.zero_()
        else:
            # generate in fp32 on CPU row block by row block: no full-size fp32 copy of a bf16 table
            for i in range(0, p.shape[0], 4096):
                block = torch.empty(p[i:i + 4096].shape).normal_(0.0, 0.02, generator=g)
                p[i:i + 4096].copy_(block)
    for m in model.modules():
        if isinstance(m, Mamba2Mixer):
            m.reset_ssm_parameters(g)
    # buffers came from meta as garbage: rebuild the RoPE table
    model.backbone.rotary = model.backbone.rotary.__class__(config.head_dim, config.rope_theta).to(device)
    return model.eval()


def weight_bytes(config: ModelConfig, bytes_per_element: int) -> dict:
    """Exact parameter bytes of the full model (counted on a meta copy) and the bytes one decode step reads:
    everything but the text embedding and all but one row per stream of the speech embedding (the step
    reads every backbone matrix and the whole `llm_decoder`)."""
    from mamtra_cli.models.speech_lm import SpeechLM

    with torch.device("meta"):
        model = SpeechLM(config)
    total = sum(p.numel() for p in model.parameters())
    unread = model.text_embedding.weight.numel() + model.speech_embedding.weight.numel() + \
        model.llm_embedding.weight.numel()
    return {"parameters": total, "resident_bytes": total * bytes_per_element,
            "read_per_step_bytes": (total - unread) * bytes_per_element}


# ---------------------------------------------------------------------------------------------- cache filling
def speech_embeds(model, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L, H) embeddings of random speech tokens: what the LM reads while it decodes."""
    ids = torch.randint(0, model.config.speech_token_size, (batch, length), generator=generator)
    return model.speech_embedding(ids.to(model.llm_decoder.weight.device))


@torch.inference_mode()
def prefill(model, cache: HybridCache, tokens: int, chunk: int, generator: torch.Generator) -> None:
    """Real forward passes over `tokens` new positions, `chunk` at a time (chunked prefill)."""
    done = 0
    while done < tokens:
        n = min(chunk, tokens - done)
        model.forward_embeds(speech_embeds(model, cache.batch, n, generator), None, cache)
        done += n


@torch.inference_mode()
def decode_steps(model, cache: HybridCache, steps: int, generator: torch.Generator) -> None:
    """`steps` real one-token decode steps (greedy on the `llm_decoder` logits)."""
    ids = torch.randint(0, model.config.speech_token_size, (cache.batch,), generator=generator)
    device = model.llm_decoder.weight.device
    for _ in range(steps):
        h = model.forward_embeds(model.speech_embedding(ids.to(device))[:, None], None, cache)[:, -1]
        ids = model.llm_decoder(h).argmax(-1)


@torch.inference_mode()
def synthetic_fill(cache: HybridCache, tokens: int, generator: torch.Generator, chunk: int = 256) -> None:
    """Grow `cache` by `tokens` positions without running the model: random K/V appended through the
    attention caches' own `append` (same storage growth as decoding), random Mamba states (their size never
    changes), and the position bookkeeping the backbone would do. The work of a later decode step depends
    on the cache's size only, so decode timings and memory after this fill are those of a real cache."""
    done = 0
    while done < tokens:
        n = min(chunk, tokens - done)
        for layer in cache.layers:
            if isinstance(layer, AttentionCache):
                b, n_kv, d = layer.shape
                kv = torch.randn(2, b, n_kv, n, d, generator=generator).to(device=layer.device, dtype=layer.dtype)
                layer.append(kv[0], kv[1])
        done += n
        cache.key_mask = torch.cat(
            [cache.key_mask, torch.ones(cache.batch, n, dtype=torch.bool, device=cache.device)], dim=1)
        cache.next_position = cache.next_position + n
    for layer in cache.layers:
        if isinstance(layer, MambaCache) and tokens:
            layer.ssm_state.copy_(0.1 * torch.randn(layer.ssm_state.shape, generator=generator))
            layer.conv_state.copy_(torch.randn(layer.conv_state.shape, generator=generator))


def truncate_cache(cache, length: int) -> None:
    """Drop attention K/V and positions past `length` (Mamba states are constant in size and simply keep
    evolving): lets every timing repeat run at the same context length."""
    drop = cache.length - length
    if drop <= 0:
        return
    for layer in cache.layers:
        if isinstance(layer, AttentionCache):
            layer.length = length
    cache.key_mask = cache.key_mask[:, :length]
    cache.next_position = cache.next_position - drop


def grow_cache(model, cache: HybridCache, target: int, decode: int, fill: str, chunk: int,
               generator: torch.Generator) -> dict:
    """Bring `cache` to `target` tokens: prefill chunks (`fill="prefill"`) or a synthetic fill
    (`fill="synthetic"`) up to `target - decode`, then `decode` real decode steps. Returns what was done."""
    if fill not in ("prefill", "synthetic"):
        raise UserError(f"Unknown --fill {fill!r}; use prefill or synthetic.")
    need = target - cache.length
    if need < 0:
        raise ValueError(f"cache already holds {cache.length} tokens > target {target}")
    steps = min(decode, need)
    ahead = need - steps
    if fill == "prefill":
        prefill(model, cache, ahead, chunk, generator)
    else:
        synthetic_fill(cache, ahead, generator)
    decode_steps(model, cache, steps, generator)
    return {"filled": ahead, "decoded": steps}


# ---------------------------------------------------------------------------------------------- workloads
@dataclass
class LMWorkload:
    """The speech LM's share of zero-shot synthesis for `batch` streams: a real prefill of a
    `prompt_tokens` prompt ([sos, text, task_id, prompt speech]), the cache fast-forwarded to
    `total_tokens - decode_steps` (`fill`: "synthetic" = no compute, "prefill" = chunked real forwards),
    then `decode_steps` real decode steps. Peak = weights-excluded cache + activations at `total_tokens`."""

    batch: int
    prompt_tokens: int
    total_tokens: int
    decode_steps: int = 2
    fill: str = "synthetic"
    chunk: int = 64
    dtype: str = "bf16"
    seed: int = 0

    name = "lm"

    def setup(self, spec: ModelSpec, device) -> None:
        self.model = spec.build(parse_dtype(self.dtype), device)
        self.config = spec.config
        # Warm-up on a throwaway one-stream cache: one-time runtime allocations (kernel libraries' scratch,
        # lazily imported code paths) then belong to the baseline, not to the measured peak.
        g = torch.Generator().manual_seed(self.seed + 1)
        warm = self.model.new_cache(1)
        prefill(self.model, warm, 4, 4, g)
        decode_steps(self.model, warm, 2, g)
        del warm

    def run(self) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        cache = self.model.new_cache(self.batch)
        prompt = min(self.prompt_tokens, self.total_tokens)
        prefill(self.model, cache, prompt, max(prompt, 1), g)
        grow_cache(self.model, cache, self.total_tokens, self.decode_steps, self.fill, self.chunk, g)
        rep = cache.report()
        return {"cache_bytes": rep.total_bytes, "cache_allocated_bytes": cache.allocated_nbytes(),
                "tokens": rep.tokens}


@dataclass
class SynthesisWorkload:
    """End-to-end synthesis through a `SynthesisBackend` — a bundle from `mamtra export` (front end → LM →
    flow → HiFT) or a mini voice directory: prompt preparation from `ref`, then `text` to audio. The
    backend's weights are loaded in `setup` and a short warm-up sentence runs there, so the measured peak is
    what one utterance's work adds on top (caches, activations, audio buffers)."""

    text: str
    ref: str
    ref_text: str | None = None
    seed: int = 0
    max_new_tokens: int | None = None

    name = "synth"

    def setup(self, spec: ModelSpec, device) -> None:
        from mamtra_cli.synthesis.loading import resolve_backend

        self.backend = resolve_backend(spec.path, None, device=str(device), max_new_tokens=self.max_new_tokens)
        mods = [m for m in vars(self.backend).values() if isinstance(m, torch.nn.Module)]
        self.weights_bytes = sum(t.numel() * t.element_size() for m in mods for t in m.state_dict().values())
        prompt = self.backend.prepare_prompt(Path(self.ref), self.ref_text)
        for _ in self.backend.synthesize("Hello.", prompt, seed=self.seed):
            pass

    def run(self) -> dict:
        tokens0 = self.backend.stats.tokens
        prompt = self.backend.prepare_prompt(Path(self.ref), self.ref_text)
        samples = sum(len(chunk) for chunk in self.backend.synthesize(self.text, prompt, seed=self.seed))
        return {"cache_bytes": 0, "samples": samples, "audio_seconds": samples / self.backend.sample_rate,
                "tokens": self.backend.stats.tokens - tokens0, "weights_bytes": self.weights_bytes}


WORKLOADS: dict[str, type] = {"lm": LMWorkload, "synth": SynthesisWorkload}


def resolve_workload(ref: str) -> type:
    """A registered workload name, or "module:Class"."""
    if ref in WORKLOADS:
        return WORKLOADS[ref]
    if ":" in ref:
        mod, _, attr = ref.partition(":")
        return getattr(importlib.import_module(mod), attr)
    raise UserError(f"Unknown workload {ref!r}; known: {', '.join(WORKLOADS)} (or module:Class).")


# ---------------------------------------------------------------------------------------------- peak memory
def _proc_status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the baseline RSS holds live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cpu_worker(payload: dict) -> dict:
    """Inside the fresh worker process: build, settle, reset the peak mark, run, read the peak."""
    torch.set_num_threads(payload.get("threads") or torch.get_num_threads())
    spec = ModelSpec.from_dict(payload["spec"])
    workload = resolve_workload(payload["workload"])(**payload["kwargs"])
    workload.setup(spec, "cpu")
    gc.collect()
    _malloc_trim()
    exact = _reset_peak_rss()
    baseline = _proc_status_kib("VmRSS") * 1024
    if not exact:  # fall back to the lifetime peak: an upper bound (it includes the build)
        baseline_hwm = _proc_status_kib("VmHWM") * 1024
    t0 = time.perf_counter()
    result = workload.run()
    seconds = time.perf_counter() - t0
    peak = _proc_status_kib("VmHWM") * 1024
    return {"device": "cpu", "method": "rss" if exact else "rss-lifetime", "baseline_bytes": baseline,
            "peak_bytes": peak, "workload_peak_bytes": peak - baseline,
            "baseline_was_peak": (not exact) and peak == baseline_hwm, "seconds": seconds, **result}


def _cuda_measure(spec: ModelSpec, workload) -> dict:
    device = torch.device("cuda")
    workload.setup(spec, device)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_alloc, base_res = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    t0 = time.perf_counter()
    result = workload.run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_alloc, peak_res = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    out = {"device": "cuda", "method": "cuda-allocator", "baseline_bytes": base_alloc, "peak_bytes": peak_alloc,
           "workload_peak_bytes": peak_alloc - base_alloc, "reserved_peak_bytes": peak_res,
           "workload_reserved_bytes": peak_res - base_res, "seconds": seconds, **result}
    del workload
    gc.collect()
    torch.cuda.empty_cache()
    return out


def measure_peak(spec: ModelSpec, workload: str | type, kwargs: dict, device: str = "cpu",
                 threads: int | None = None, timeout: float | None = None) -> dict:
    """Peak memory of one workload on one model.

    CUDA: in this process, `max_memory_allocated` (and `_reserved`) after `reset_peak_memory_stats`, minus
    what is allocated after `setup` (the weights).
    CPU: a fresh `python -m mamtra_cli.profiling` process per call. After imports and `setup` the worker
    returns freed heap to the OS (`malloc_trim`), resets the kernel's peak-RSS mark
    (`/proc/self/clear_refs` ← 5) and reads VmRSS as the baseline; glibc runs with a fixed 64 KiB mmap
    threshold so freed tensors leave RSS; after
    `run()` it reads VmHWM. workload_peak_bytes = VmHWM − baseline: the extra resident memory the work
    needed at its worst moment (cache + activations + allocator slack), weights and runtime excluded."""
    ref = workload if isinstance(workload, str) else f"{workload.__module__}:{workload.__name__}"
    if device.startswith("cuda"):
        return _cuda_measure(spec, resolve_workload(ref)(**kwargs))
    payload = {"spec": spec.to_dict(), "workload": ref, "kwargs": kwargs, "threads": threads}
    env = dict(os.environ)
    # Fixed glibc thresholds: blocks ≥ 64 KiB are mmap'ed and unmapped on free (no dynamic threshold that
    # would park freed tensors in the heap), so RSS follows the live tensors rather than allocator history.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    # The folder that holds mamtra_cli/ (this file is mamtra_cli/profiling/__init__.py), so that the worker
    # imports this very copy of the package.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "mamtra_cli.profiling"], input=json.dumps(payload),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"profiling worker failed (exit {proc.returncode}) for {spec.name}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device="cpu") -> float:
    """Seconds of one call, synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return statistics.median(values)


@torch.inference_mode()
def measure_bandwidth(mib: int = 256, repeats: int = 5, device="cpu") -> dict:
    """Memory bandwidth of this machine, GB/s (1e9 B/s): median of `repeats` timings of a `mib` MiB copy
    (counted as read + write) and of a sum (read only). Far above cache sizes, so it is DRAM/HBM."""
    n = mib * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    src.sum()
    copy_s = median([time_call(lambda: dst.copy_(src), device) for _ in range(repeats)])
    sum_s = median([time_call(lambda: src.sum(), device) for _ in range(repeats)])
    nbytes = n * 4
    return {"copy_gb_s": 2 * nbytes / copy_s / 1e9, "read_gb_s": nbytes / sum_s / 1e9, "buffer_mib": mib}


# ---------------------------------------------------------------------------------------------- outputs
def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


RESULT_SUFFIXES = ("csv", "json", "png")  # the files write_results makes: STEM.csv, STEM.json, STEM.png


def check_results_out(out: Path | None, stem: str, force: bool) -> None:
    """--out DIR of a profile, checked before anything is measured: DIR may exist (several profiles share
    one folder), but this profile's STEM.csv/json/png in it are only replaced with --force."""
    from mamtra_cli.checkpoints import check_writable_parent

    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; --out names a folder for {stem}.csv, {stem}.json and "
                        f"{stem}.png — choose another --out.")
    for suffix in RESULT_SUFFIXES:
        path = out / f"{stem}.{suffix}"
        if path.is_dir():
            raise UserError(f"{path} is a directory, where this profile writes a file; remove it or choose "
                            "another --out.")
        if (path.exists() or path.is_symlink()) and not force:
            raise UserError(f"{path} already exists; pass --force to replace this profile's results or "
                            "choose another --out.")
    check_writable_parent(out / f"{stem}.csv")


def write_results(out: Path, stem: str, rows: list[dict], result: dict, plot: Callable[[Path], None],
                  force: bool = False) -> None:
    """A profile's files in `out`: STEM.csv (the rows), STEM.json (the result) and STEM.png (`plot(path)`);
    their paths are then recorded in result["files"] for --json.

    All three are written to temporary files first and then moved into place one by one, so no reader ever
    sees a half-written file; without `force` each move is exclusive, and if one of the names was taken
    meanwhile (another run with the same --out) the files this call already published are taken back and
    a UserError is raised, leaving the other run's files as they are."""
    from mamtra_cli.checkpoints import publish_file, temp_sibling_file

    out = Path(out)
    check_results_out(out, stem, force)
    out.mkdir(parents=True, exist_ok=True)
    finals = {suffix: out / f"{stem}.{suffix}" for suffix in RESULT_SUFFIXES}
    tmps = {suffix: temp_sibling_file(path) for suffix, path in finals.items()}
    published: list[Path] = []
    try:
        write_csv(tmps["csv"], rows)
        write_json(tmps["json"], result)
        plot(tmps["png"])
        for suffix in RESULT_SUFFIXES:
            publish_file(tmps[suffix], finals[suffix], force)
            published.append(finals[suffix])
    except UserError:
        if not force:
            for path in published:  # ours, moved in a moment ago: a set from two runs would mislead
                path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    result["files"] = {suffix: str(path) for suffix, path in finals.items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
               title: str, logx: bool = False, note: str | None = None) -> None:
    """One line per series name: {name: (xs, ys)}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    _finish(plt, fig, ax, path, xlabel, ylabel, title, note)


def plot_bars(path: Path, groups: list[str], series: dict[str, list[float]], xlabel: str, ylabel: str,
              title: str, note: str | None = None) -> None:
    """Grouped bars: one group per entry of `groups`, one bar per series name in each group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) * max(1, len(series)) / 2), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (name, ys) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.grid(True, axis="y", alpha=0.3)
    _finish(plt, fig, ax, path, xlabel, ylabel, title, note)


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str, note: str | None) -> None:
    """Labels, legend and the optional footnote every profile figure has; then write the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mb(nbytes: float) -> float:
    """Bytes → MB (1e6), the unit of the tables and figures."""
    return nbytes / 1e6

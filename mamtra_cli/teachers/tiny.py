"""A tiny CosyVoice 2-format teacher with random weights, for trying the pipeline and for tests.

`make_tiny_cosyvoice2_dir` writes the same files, in the same formats, as a real CosyVoice 2 model
directory holds for its speech LM:

    cosyvoice2.yaml                 HyperPyYAML with CosyVoice's tags (llm section, sizes substituted)
    llm.pt                          torch.save of a Qwen2LM state_dict in CosyVoice's naming,
                                    incl. the tied llm.model.lm_head.weight
    CosyVoice-BlankEN/config.json   a Qwen2Config as transformers' save_pretrained writes it
    CosyVoice-BlankEN/generation_config.json
    CosyVoice-BlankEN/model.safetensors
                                    "base" Qwen2 weights, drawn independently: as in the real model they
                                    differ from llm.pt, which replaces them

Weights: norms 1 + 0.1·randn, everything else N(0, 0.02), in CosyVoice's parameter order, from one
generator seeded with `seed` (deterministic). `write_tiny_teacher` is `mamtra tiny-teacher`: such a
directory with a manifest, and optionally data manifests sampled from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mamtra_cli.errors import UserError

_YAML_TEMPLATE = """\
# Tiny random-weight CosyVoice 2 speech LM written by MamTra (`mamtra tiny-teacher`).
# Same HyperPyYAML layout as a CosyVoice 2 training config; only the LM-related parts are kept.
__set_seed1: !apply:random.seed [{seed}]
__set_seed2: !apply:numpy.random.seed [{seed}]
__set_seed3: !apply:torch.manual_seed [{seed}]

# fixed params
sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

# stream related params
chunk_size: 25 # tokens per streaming chunk
num_decoding_left_chunks: -1

# speech LM: Qwen2LM on a Qwen2 backbone (CosyVoice-BlankEN)
llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {speech_tokens}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

# flow and hift are not part of this tiny teacher; only values the LM side refers to are kept.
mel_chunk_size: !ref <chunk_size> * <token_mel_ratio>

# data pipeline (as in CosyVoice's config; the functions are named, never called here)
parquet_opener: !name:cosyvoice.dataset.processor.parquet_opener
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
tokenize: !name:cosyvoice.dataset.processor.tokenize
    get_tokenizer: !ref <get_tokenizer>
    allowed_special: !ref <allowed_special>
filter: !name:cosyvoice.dataset.processor.filter
    max_length: 6000
    min_length: 100
    token_max_length: 200
    token_min_length: 1
shuffle: !name:cosyvoice.dataset.processor.shuffle
    shuffle_size: 1000
sort: !name:cosyvoice.dataset.processor.sort
    sort_size: 500
batch: !name:cosyvoice.dataset.processor.batch
    batch_type: 'dynamic'
    max_frames_in_batch: 2000
padding: !name:cosyvoice.dataset.processor.padding
    use_spk_embedding: False

data_pipeline: [
    !ref <parquet_opener>,
    !ref <tokenize>,
    !ref <filter>,
    !ref <shuffle>,
    !ref <sort>,
    !ref <batch>,
    !ref <padding>,
]

# llm train conf
train_conf:
    optim: adam
    optim_conf:
        lr: 1e-5
    scheduler: constantlr
    scheduler_conf:
        warmup_steps: 2500
    max_epoch: 200
    grad_clip: 5
    accum_grad: 2
    log_interval: 100
    save_per_step: -1
"""


def _qwen_config(*, hidden, layers, heads, kv_heads, intermediate, text_vocab, rope_theta, rms_norm_eps,
                 head_dim) -> dict:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": None,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 4096,
        "max_window_layers": layers,
        "model_type": "qwen2",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": text_vocab,
    }
    cfg = {k: v for k, v in cfg.items() if not (k.endswith("_token_id") and v is None)}
    if head_dim is not None:
        cfg["head_dim"] = head_dim
        cfg = dict(sorted(cfg.items()))
    return cfg


def _random_state_dict(shapes: dict, generator) -> dict:
    import torch

    out = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float32)
        if "norm" in name:
            t = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            t.normal_(0.0, 0.02, generator=generator)
        out[name] = t
    return out


def make_tiny_cosyvoice2_dir(out: Path, *, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                             intermediate: int = 176, text_vocab: int = 512, speech_tokens: int = 100,
                             rope_theta: float = 1e6, rms_norm_eps: float = 1e-6, head_dim: int | None = None,
                             seed: int = 0) -> Path:
    """Write a CosyVoice 2-format LM directory with random weights into `out` (created if needed) and
    return `out`. Deterministic from `seed`."""
    import torch
    from safetensors.torch import save_file

    from mamtra_cli.teachers.cosyvoice2 import (CV_LM_HEAD, CV_PREFIX, LLM_PT_NAME, QWEN_DIR_NAME, YAML_NAME,
                                                _expected_shapes)

    for name, v in (("hidden", hidden), ("layers", layers), ("heads", heads), ("kv_heads", kv_heads),
                    ("intermediate", intermediate), ("text_vocab", text_vocab), ("speech_tokens", speech_tokens)):
        if not isinstance(v, int) or v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer (got {v!r}).")
    if heads % kv_heads:
        raise UserError(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads}).")
    if head_dim is None:
        if hidden % heads:
            raise UserError(f"--hidden ({hidden}) must be divisible by --heads ({heads}).")
        d = hidden // heads
    else:
        d = head_dim
    if d % 2:
        raise UserError(f"The head dimension ({d}) must be even for RoPE; change --hidden or --heads.")

    out = Path(out)
    (out / QWEN_DIR_NAME).mkdir(parents=True, exist_ok=True)
    qcfg = _qwen_config(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                        text_vocab=text_vocab, rope_theta=float(rope_theta), rms_norm_eps=float(rms_norm_eps),
                        head_dim=head_dim)
    (out / QWEN_DIR_NAME / "config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    (out / QWEN_DIR_NAME / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "transformers_version": "4.51.3"}, indent=2) + "\n")
    (out / YAML_NAME).write_text(_YAML_TEMPLATE.format(seed=seed, hidden=hidden, speech_tokens=speech_tokens))

    q = {"hidden_size": hidden, "intermediate_size": intermediate, "head_dim": d, "num_attention_heads": heads,
         "num_key_value_heads": kv_heads, "num_hidden_layers": layers}
    shapes = _expected_shapes(q, text_vocab, speech_tokens + 3)
    shapes.pop(CV_LM_HEAD)
    g = torch.Generator().manual_seed(int(seed))
    sd = _random_state_dict(shapes, g)
    # Re-insert the tied lm_head at its place (after the final norm), sharing the embedding's storage.
    ordered = {}
    for k, v in sd.items():
        ordered[k] = v
        if k == CV_PREFIX + "norm.weight":
            ordered[CV_LM_HEAD] = sd[CV_PREFIX + "embed_tokens.weight"]
    torch.save(ordered, out / LLM_PT_NAME)

    # The "base" BlankEN weights in transformers' naming (tied lm_head omitted, as save_pretrained does).
    g_base = torch.Generator().manual_seed(int(seed) + 1)
    base_shapes = {k[len("llm.model."):]: s for k, s in shapes.items() if k.startswith(CV_PREFIX)}
    base = _random_state_dict(base_shapes, g_base)
    save_file(base, str(out / QWEN_DIR_NAME / "model.safetensors"), metadata={"format": "pt"})
    return out


def sample_teacher_data(model, n_utterances: int, seed: int = 0, min_text: int = 3, max_text: int = 12,
                        max_speech: int = 120) -> list:
    """Utterances whose speech tokens the teacher itself sampled (RAS, CosyVoice's settings) for random
    text: data "sampled from the teacher", on which a distilled student can match it exactly.
    Returns `data_manifest.Utterance`s."""
    import torch

    from mamtra_cli.data_manifest import Utterance
    from mamtra_cli.models.sampling import SamplingConfig

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_vocab_size
    texts = [torch.randint(0, vocab, (int(torch.randint(min_text, max_text + 1, (1,), generator=g)),),
                           generator=g).tolist() for _ in range(n_utterances)]
    sampling = SamplingConfig(max_token_text_ratio=max(2.0, max_speech / max_text))
    utts = []
    for start in range(0, n_utterances, 16):
        chunk = texts[start:start + 16]
        speech = model.generate_batch([(t, [], []) for t in chunk], sampling, seed=seed + start,
                                      max_new_tokens=max_speech)
        for i, (t, s) in enumerate(zip(chunk, speech)):
            if s:
                utts.append(Utterance(utt=f"tiny{start + i:05d}", text_tokens=t, speech_tokens=s))
    return utts


def write_tiny_teacher(out: Path, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                       text_vocab: int = 512, speech_tokens: int = 100, seed: int = 0, sample_data: int = 0,
                       force: bool = False) -> Path:
    """`mamtra tiny-teacher`: `make_tiny_cosyvoice2_dir` into the directory `out` (written through a temporary
    sibling, with a manifest.json), plus, with `sample_data` N > 0, data/train.jsonl and data/val.jsonl with N
    utterances sampled from the teacher (a 90/10 split). Returns `out`."""
    from mamtra_cli import checkpoints
    from mamtra_cli.data_manifest import ManifestHeader, write_manifest
    from mamtra_cli.teachers import load_teacher

    intermediate = max(8, (hidden * 11) // 4)  # Qwen2.5-0.5B's 4864/896 is ~5.4; 176/64 = 2.75 keeps it tiny
    params = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
              "intermediate": intermediate, "text_vocab": text_vocab, "speech_tokens": speech_tokens}
    with checkpoints.staged_output(out, force) as tmp:
        make_tiny_cosyvoice2_dir(tmp, seed=seed, **params)
        manifest = checkpoints.run_manifest(
            "tiny-teacher", inputs={}, parameters=params, seed=seed,
            outputs={"llm_pt": "llm.pt", "config_json": "CosyVoice-BlankEN/config.json",
                     "yaml": "cosyvoice2.yaml"})
        if sample_data:
            model, _ = load_teacher(tmp)
            utts = sample_teacher_data(model, sample_data, seed=seed)
            n_val = max(1, len(utts) // 10)
            header = ManifestHeader(text_tokenizer={"name": "random-ids"},
                                    speech_tokenizer={"name": f"tiny-teacher-seed{seed}"})
            (tmp / "data").mkdir()
            write_manifest(tmp / "data" / "train.jsonl", header, utts[n_val:])
            write_manifest(tmp / "data" / "val.jsonl", header, utts[:n_val])
            manifest["outputs"]["data"] = {"train": len(utts) - n_val, "val": n_val}
        checkpoints.write_json_atomic(tmp / checkpoints.MANIFEST_FILE, manifest)
    return Path(out)

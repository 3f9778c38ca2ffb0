"""Tiny stand-ins, in the real file formats, for CosyVoice 2's front-end assets.

- `write_qwen2_tokenizer(dir)`: vocab.json / merges.txt / tokenizer_config.json in the Qwen2 format
  (byte-level BPE over the GPT-2 byte↔unicode alphabet, merges learnt from a small corpus here).
- `write_speech_tokenizer_onnx(path)`: inputs feats float32 [B, 128, T] and feats_length int32 [B];
  takes every 4th mel frame (100 Hz → 25 Hz), projects it with a fixed random MatMul and argmaxes →
  int64 tokens [B, ceil(T/4)].
- `write_campplus_onnx(path)`: input float32 [B, T, 80]; mean over time, MatMul to 192 → [B, 192].
- `write_assets(dir)`: a CosyVoice-2-shaped model directory holding all three.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

CORPUS = ("the quick brown fox jumps over the lazy dog. hello world, this is speech. "
          "she sells sea shells by the sea shore! the speech tokenizer reads the world's words. "
          "Mamba and attention, together: a hybrid speaks as well as the teacher.")
QWEN2_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable unicode map (written from its definition)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _words(text: str) -> list[str]:
    """Rough GPT-2 style pieces: a word with its leading space."""
    out, cur = [], ""
    for ch in text:
        if ch == " " and cur:
            out.append(cur)
            cur = " "
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def learn_bpe(corpus: str = CORPUS, n_merges: int = 60) -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(sorted(b2u))}
    words = Counter(tuple(b2u[b] for b in w.encode("utf-8")) for w in _words(corpus))
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return vocab, merges


def write_qwen2_tokenizer(directory: Path, pad_vocab_to: int | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = learn_bpe()
    if pad_vocab_to:
        i = 0
        while len(vocab) < pad_vocab_to:
            vocab[f"\u0100unused{i}"] = len(vocab)
            i += 1
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                          encoding="utf-8")
    n = len(vocab)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(n + k): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
            for k, t in enumerate(QWEN2_ADDED)},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": "",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if not (directory / "config.json").exists():  # never clobber a real Qwen2 config of an LM written first
        (directory / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"],
                                                           "vocab_size": 151936}), encoding="utf-8")
    return directory


def _save(model, path: Path) -> Path:
    import onnx

    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_speech_tokenizer_onnx(path: Path, n_mels: int = 128, codebook: int = 6561, seed: int = 0,
                                dynamic_batch: bool = True) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_mels, 64)).astype(np.float32)
    # Map the 64 argmax classes onto spread-out codes of a 6561-entry codebook.
    codes = (np.arange(64, dtype=np.int64) * 101) % codebook
    b = "batch" if dynamic_batch else 1
    feats = helper.make_tensor_value_info("feats", TensorProto.FLOAT, [b, n_mels, "T"])
    lens = helper.make_tensor_value_info("feats_length", TensorProto.INT32, [b])
    out = helper.make_tensor_value_info("indices", TensorProto.INT64, [b, "T4"])
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(codes, "codes"),
             numpy_helper.from_array(np.array([0], np.int64), "start"),
             numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "end"),
             numpy_helper.from_array(np.array([2], np.int64), "axis"),
             numpy_helper.from_array(np.array([4], np.int64), "step")]
    nodes = [
        helper.make_node("Slice", ["feats", "start", "end", "axis", "step"], ["strided"]),
        helper.make_node("Transpose", ["strided"], ["frames"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["frames", "W"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["cls"], axis=2, keepdims=0),
        helper.make_node("Gather", ["codes", "cls"], ["indices"], axis=0),
    ]
    graph = helper.make_graph(nodes, "s3tokenizer_standin", [feats, lens], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="mamtra-tests")
    model.ir_version = 8
    return _save(model, path)


def write_campplus_onnx(path: Path, n_mels: int = 80, dim: int = 192, seed: int = 1) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_mels, dim)) / np.sqrt(n_mels)).astype(np.float32)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "T", n_mels])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", dim])
    nodes = [helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["output"])]
    graph = helper.make_graph(nodes, "campplus_standin", [x], [y], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="mamtra-tests")
    model.ir_version = 8
    return _save(model, path)


def write_assets(directory: Path) -> Path:
    """A stand-in CosyVoice2-0.5B directory: CosyVoice-BlankEN/, speech_tokenizer_v2.onnx, campplus.onnx."""
    directory = Path(directory)
    write_qwen2_tokenizer(directory / "CosyVoice-BlankEN")
    write_speech_tokenizer_onnx(directory / "speech_tokenizer_v2.onnx")
    write_campplus_onnx(directory / "campplus.onnx")
    return directory

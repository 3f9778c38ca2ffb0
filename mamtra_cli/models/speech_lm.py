"""The speech LM with CosyVoice 2 (`Qwen2LM`) semantics on a hybrid backbone.

Tables: `text_embedding` (the Qwen2 text table), `llm_embedding` (row 0 = sos, row 1 = task_id),
`speech_embedding` (S speech codes + eos S, S+1, fill S+2), `llm_decoder` (Linear H → S+3, with bias)
on the final-normed hidden state.

Unistream training layout for T text and S speech tokens (length 1 + T + 1 + S):
    inputs  [sos, text…, task_id, speech…]
    targets [ignore × (1+T), speech…, eos]
Loss = CE summed over non-ignored targets ÷ their count (over the whole batch: a per-token mean).

Inference: input [sos, prompt_text ++ text, task_id, prompt_speech…]; between min and max length
(ratios × new text tokens) sample with RAS; stop on any stop id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mamtra_cli.errors import UserError
from mamtra_cli.models.backbone import HybridBackbone
from mamtra_cli.models.cache import HybridCache, StaticHybridCache
from mamtra_cli.models.config import ModelConfig
from mamtra_cli.models.sampling import SamplingConfig, sample_next

IGNORE_ID = -1
SOS, TASK_ID = 0, 1  # rows of llm_embedding


@dataclass
class TrainOutput:
    loss: torch.Tensor  # scalar, ce_sum / num_tokens
    acc: torch.Tensor  # scalar, correct / num_tokens
    logits: torch.Tensor  # (B, L, C)
    targets: torch.Tensor  # (B, L), IGNORE_ID where no target
    hidden: torch.Tensor  # (B, L, H) final-normed
    ce_sum: torch.Tensor  # scalar
    num_tokens: int
    correct: int
    ce_per_row: torch.Tensor  # (B,) summed CE of each utterance
    tokens_per_row: torch.Tensor  # (B,)
    correct_per_row: torch.Tensor  # (B,)


class SpeechLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.text_embedding = nn.Embedding(config.text_vocab_size, h)
        self.llm_embedding = nn.Embedding(2, h)
        self.speech_embedding = nn.Embedding(config.decoder_classes, h)
        self.backbone = HybridBackbone(config)
        self.llm_decoder = nn.Linear(h, config.decoder_classes, bias=True)

    # ---------------------------------------------------------------- layout
    def unistream_inputs(self, text_tokens, text_lens, speech_tokens, speech_lens, prompt_lens=None):
        """Right-padded batch → (inputs_embeds (B, L, H), lengths (B,), targets (B, L)).

        text_tokens (B, T_max), speech_tokens (B, S_max) LongTensors; *_lens (B,). prompt_lens (B,) or None:
        row i's first prompt_lens[i] speech tokens are a prompt, as in a zero-shot request ([sos, prompt text ++
        text, task_id, prompt speech, speech]): they are read but are not targets (IGNORE_ID), so a loss covers
        the continuation and its eos alone."""
        b = text_tokens.shape[0]
        device = self.text_embedding.weight.device
        text_tokens, speech_tokens = text_tokens.to(device), speech_tokens.to(device)
        text_lens, speech_lens = text_lens.tolist(), speech_lens.tolist()
        prompt_lens = [0] * b if prompt_lens is None else [int(p) for p in prompt_lens]
        lengths = [2 + t + s for t, s in zip(text_lens, speech_lens)]
        L = max(lengths)
        text_emb = self.text_embedding(text_tokens)  # (B, T_max, H)
        speech_emb = self.speech_embedding(speech_tokens.clamp(min=0))  # (B, S_max, H)
        sos = self.llm_embedding.weight[SOS]
        task = self.llm_embedding.weight[TASK_ID]
        rows, targets = [], torch.full((b, L), IGNORE_ID, dtype=torch.long, device=device)
        for i in range(b):
            t, s = text_lens[i], speech_lens[i]
            row = torch.cat([sos[None], text_emb[i, :t], task[None], speech_emb[i, :s]], dim=0)
            rows.append(F.pad(row, (0, 0, 0, L - row.shape[0])))
            p = min(prompt_lens[i], s)
            targets[i, 1 + t + p: 1 + t + s] = speech_tokens[i, p:s]  # speech target k sits at 1 + t + k
            targets[i, 1 + t + s] = self.config.eos_id
        return torch.stack(rows), torch.tensor(lengths, device=device), targets

    def forward_embeds(self, inputs_embeds, attention_mask=None, cache: HybridCache | None = None):
        return self.backbone(inputs_embeds, attention_mask, cache)

    def forward_train(self, text_tokens, text_lens, speech_tokens, speech_lens, prompt_lens=None) -> TrainOutput:
        """Teacher-forced loss of a right-padded batch; `prompt_lens` as in `unistream_inputs`."""
        embeds, _, targets = self.unistream_inputs(text_tokens, text_lens, speech_tokens, speech_lens, prompt_lens)
        # Right padding needs no mask: every real position precedes the padding of its row, and both
        # attention (causal) and Mamba (causal scan) only look back, so padding cannot reach a real target.
        hidden = self.backbone(embeds)
        logits = self.llm_decoder(hidden)
        return self.loss_from_logits(logits, targets, hidden)

    @staticmethod
    def loss_from_logits(logits, targets, hidden=None) -> TrainOutput:
        valid = targets != IGNORE_ID
        logp = logits.float().log_softmax(-1)
        nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid  # (B, L)
        ce_per_row = nll.sum(1)
        tokens_per_row = valid.sum(1)
        correct_mask = (logits.argmax(-1) == targets) & valid
        correct_per_row = correct_mask.sum(1)
        n = int(tokens_per_row.sum())
        ce_sum = ce_per_row.sum()
        correct = int(correct_per_row.sum())
        return TrainOutput(loss=ce_sum / max(n, 1), acc=torch.tensor(correct / max(n, 1)), logits=logits,
                           targets=targets, hidden=hidden, ce_sum=ce_sum, num_tokens=n, correct=correct,
                           ce_per_row=ce_per_row, tokens_per_row=tokens_per_row, correct_per_row=correct_per_row)

    # ---------------------------------------------------------------- inference
    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> HybridCache:
        p = self.llm_decoder.weight
        return HybridCache(self.config, batch_size, dtype or p.dtype, p.device)

    def new_static_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> StaticHybridCache:
        """A `StaticHybridCache` for `decode_step`; max_length = prompt + new tokens (every slot is attended)."""
        p = self.llm_decoder.weight
        return StaticHybridCache(self.config, batch_size, max_length, dtype or p.dtype, p.device)

    def decode_step(self, tokens_or_embeds: torch.Tensor, cache: StaticHybridCache) -> torch.Tensor:
        """One decode step on a static cache → logits (B, C) of the next token, in the model's dtype.

        tokens_or_embeds: (B,) int64 speech-token ids (looked up in `speech_embedding`) or embeddings
        (B, H) / (B, 1, H). Fixed shapes, no host synchronisation: capturable as a CUDA graph
        (`cuda_graph.GraphedDecodeStep`) and traceable by `torch.compile(fullgraph=True)`. Equals
        `llm_decoder(forward_embeds(x, None, dynamic_cache)[:, -1])` with the same cache contents.
        """
        x = tokens_or_embeds
        if not x.is_floating_point():  # a dtype test: fixed for a given call site, no data read
            x = self.speech_embedding(x)
        x = x.reshape(x.shape[0], 1, -1)  # (B, 1, H)
        return self.llm_decoder(self.backbone.decode_step(x, cache)[:, 0])

    def inference_prefix(self, text_tokens: torch.Tensor, prompt_speech_tokens: torch.Tensor | None = None):
        """text_tokens (1, T) (prompt text ++ new text), prompt_speech_tokens (1, P) → (1, 1+T+1+P, H)."""
        device = self.text_embedding.weight.device
        parts = [self.llm_embedding.weight[SOS][None, None], self.text_embedding(text_tokens.to(device)),
                 self.llm_embedding.weight[TASK_ID][None, None]]
        if prompt_speech_tokens is not None and prompt_speech_tokens.numel():
            parts.append(self.speech_embedding(prompt_speech_tokens.to(device)))
        return torch.cat(parts, dim=1)

    @torch.inference_mode()
    def generate(self, text_tokens: list[int], prompt_text_tokens: list[int] = (),
                 prompt_speech_tokens: list[int] = (), sampling: SamplingConfig | None = None, seed: int = 0,
                 max_new_tokens: int | None = None, on_token=None, decode: str = "dynamic") -> list[int]:
        """One utterance; `on_token(token)` is called as each speech token is decided (streaming)."""
        return self.generate_batch([(list(text_tokens), list(prompt_text_tokens), list(prompt_speech_tokens))],
                                   sampling, seed, max_new_tokens,
                                   on_token=None if on_token is None else (lambda _i, t: on_token(t)), decode=decode)[0]

    @torch.inference_mode()
    def generate_batch(self, requests: list[tuple[list[int], list[int], list[int]]],
                       sampling: SamplingConfig | None = None, seed: int = 0, max_new_tokens: int | None = None,
                       on_token=None, cache_dtype: torch.dtype | None = None,
                       decode: str = "dynamic") -> list[list[int]]:
        """requests: (text, prompt_text, prompt_speech) token lists. Prompts are left-padded into one batch;
        row i samples with its own generator seeded `seed + i`, so it draws exactly what it would alone.
        Returns the speech tokens of each row (stop id excluded).

        decode: how each token's logits are computed after the prefill. "dynamic": `forward_embeds` on a
        growing `HybridCache` (the reference); "static": `decode_step` on a `StaticHybridCache` sized to
        the prompt + the longest allowed output; "graph": that step replayed as a CUDA graph (CUDA only; the
        graph and its cache are kept for the next call of the same batch size and a length in the same
        256-slot bucket, so consecutive sentences capture once); "auto": "graph" on CUDA, else "dynamic".
        All three draw the same tokens up to float rounding of the logits."""
        if decode not in ("dynamic", "static", "graph", "auto"):
            raise ValueError(f"decode must be 'auto', 'dynamic', 'static' or 'graph', got {decode!r}")
        if decode == "auto":
            from mamtra_cli.models.decode_mode import resolve_decode

            decode = resolve_decode("auto", self.llm_decoder.weight.device)
        cfg = sampling or SamplingConfig()
        b = len(requests)
        if b == 0:
            return []
        for text, _, _ in requests:
            if not text:
                raise UserError("Cannot synthesise an empty text (no text tokens); give some text.")
        prefixes = [self.inference_prefix(torch.tensor([pt + t], dtype=torch.long),
                                          torch.tensor([ps], dtype=torch.long) if ps else None)[0]
                    for t, pt, ps in requests]
        L = max(p.shape[0] for p in prefixes)
        embeds = torch.stack([F.pad(p, (0, 0, L - p.shape[0], 0)) for p in prefixes])  # left padding
        mask = torch.zeros(b, L, dtype=torch.bool, device=embeds.device)
        for i, p in enumerate(prefixes):
            mask[i, L - p.shape[0]:] = True
        min_len = [int(len(t) * cfg.min_token_text_ratio) for t, _, _ in requests]
        max_len = [int(len(t) * cfg.max_token_text_ratio) for t, _, _ in requests]
        if max_new_tokens is not None:
            max_len = [min(m, max_new_tokens) for m in max_len]
        gens = [torch.Generator().manual_seed(seed + i) for i in range(b)]

        step = None
        if decode == "dynamic":
            cache = self.new_cache(b, cache_dtype)
        elif decode == "static":
            # Every row stops by max(max_len) tokens: at most that many decode steps follow the prefill.
            cache = self.new_static_cache(b, L + max(max(max_len), 1), cache_dtype)
        else:
            cache, step = self._graphed_step(b, L + max(max(max_len), 1), cache_dtype)
        hidden = self.backbone(embeds, mask, cache)[:, -1]  # (B, H)
        logits = self.llm_decoder(hidden)  # (B, C)
        if decode == "graph" and step is None:
            from mamtra_cli.models.cuda_graph import GraphedDecodeStep

            step = GraphedDecodeStep(self, cache)
            self._graph_slot = (self._graph_key(b, cache.max_length, cache.dtype), cache, step)
        elif decode == "static":
            step = lambda ids: self.decode_step(ids, cache)  # noqa: E731
        out: list[list[int]] = [[] for _ in range(b)]
        done = [m <= 0 for m in max_len]
        stop = self.config.stop_ids
        while not all(done):
            logp = logits.float().log_softmax(-1).cpu()  # (B, C)
            next_tokens = []
            for i in range(b):
                if done[i]:
                    next_tokens.append(self.config.eos_id)
                    continue
                tok = sample_next(logp[i], out[i], cfg, gens[i], stop[0], allow_stop=len(out[i]) >= min_len[i])
                if tok in stop:
                    done[i] = True
                else:
                    out[i].append(tok)
                    if on_token is not None:
                        on_token(i, tok)
                    if len(out[i]) >= max_len[i]:
                        done[i] = True
                next_tokens.append(tok)
            if all(done):
                break
            ids = torch.tensor(next_tokens, dtype=torch.long, device=embeds.device)
            if step is None:
                logits = self.llm_decoder(self.backbone(self.speech_embedding(ids)[:, None], None, cache)[:, -1])
            else:
                logits = step(ids)
        return out

    _GRAPH_BUCKET = 256  # static-cache lengths of "graph" decoding are rounded up to this many slots

    def _graphed_step(self, batch: int, length: int, dtype: torch.dtype | None):
        """(static cache, graphed step or None) for a "graph" decode of `batch` rows and up to `length` tokens.

        The last graph is kept with its cache (`_graph_slot`) and reused, emptied in place, when the batch,
        dtype and length bucket match: capture (warm-up steps + recording) then happens once per bucket, not
        once per sentence. Otherwise a new cache is returned and the caller captures after the prefill (the
        warm-up needs a filled cache); the old graph and cache are dropped first, so that only one is held."""
        dtype = dtype or self.llm_decoder.weight.dtype
        max_length = -(-length // self._GRAPH_BUCKET) * self._GRAPH_BUCKET
        slot = getattr(self, "_graph_slot", None)
        if slot is not None and slot[0] == self._graph_key(batch, max_length, dtype):
            _, cache, step = slot
            cache.reset()  # same addresses: the captured graph stays valid; prefill then loads in place
            return cache, step
        self._graph_slot = None
        return self.new_static_cache(batch, max_length, dtype), None

    def _graph_key(self, batch: int, max_length: int, dtype: torch.dtype) -> tuple:
        # The weights' address too: a graph replays the tensors it was captured on, so moved or replaced
        # weights must not reuse it.
        w = self.llm_decoder.weight
        return batch, max_length, dtype, w.device, w.data_ptr()


def parameter_counts(model: SpeechLM) -> dict:
    """Parameters by kind: attention mixers, Mamba mixers, MLPs, norms, embeddings/head."""
    counts = {"attention": 0, "mamba": 0, "mlp": 0, "norm": 0, "embeddings_and_head": 0}
    for name, p in model.named_parameters():
        if ".self_attn." in name:
            counts["attention"] += p.numel()
        elif ".mamba." in name:
            counts["mamba"] += p.numel()
        elif ".mlp." in name:
            counts["mlp"] += p.numel()
        elif "norm" in name:
            counts["norm"] += p.numel()
        else:
            counts["embeddings_and_head"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def load_model_dir(path: Path, device="cpu", dtype: torch.dtype | None = None) -> SpeechLM:
    """A MamTra model directory (config.yaml + model.safetensors) → SpeechLM in eval mode, strict keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mamtra_cli.checkpoints import CONFIG_FILE, WEIGHTS_FILE, check_model_dir

    path = Path(path)
    check_model_dir(path)
    config = ModelConfig.load(path / CONFIG_FILE)
    try:
        # load_file memory-maps the file; copy so that rewriting the file later cannot SIGBUS this model.
        state = {k: v.clone() for k, v in load_file(str(path / WEIGHTS_FILE), device=str(device)).items()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"Cannot read weights {path / WEIGHTS_FILE} ({e}); the file is damaged, re-create it.") from None
    model = model_from_state_dict(config, state, str(path / WEIGHTS_FILE), device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def model_from_state_dict(config: ModelConfig, state: dict, source: str, device="cpu") -> SpeechLM:
    """Build on the meta device and adopt the given tensors (no random init of a 0.5B model that is
    overwritten at once); strict keys and shapes."""
    with torch.device("meta"):
        model = SpeechLM(config)
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE inverse frequencies) are not in the file: rebuild them for real.
    model.backbone.rotary = type(model.backbone.rotary)(config.head_dim, config.rope_theta).to(device)
    return model


def check_state_dict(model: nn.Module, state: dict, source: str) -> None:
    """One sentence naming missing/unexpected keys or wrong shapes."""
    from mamtra_cli.checkpoints import state_dict_problems

    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise UserError(f"{source} does not match its config: {problems}; "
                        "re-create the directory with `mamtra transfer`.")

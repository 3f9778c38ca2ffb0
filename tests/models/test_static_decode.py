"""The static-cache decode step (fast path) against the dynamic-cache decode (reference path).

`SpeechLM.decode_step` on a `StaticHybridCache` must give the logits of `forward_embeds` on a `HybridCache`
with the same history, for every layout; it must trace into one graph (`torch.compile(fullgraph=True)`, the
CPU stand-in for CUDA-graph capture: a graph break there is a host sync or a Python branch on data), and
the graph replayed on a GPU must equal the eager step.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mamtra_cli.models.cache import HybridCache, StaticHybridCache, analytic_cache_bytes
from tests.models.test_speech_lm import LAYOUTS, make_model

H = 48  # make_model's hidden size
ATOL, RTOL = 2e-5, 1e-4


def dynamic_logits(model, x, cache):
    """Reference: one token (B, 1, H) through the dynamic path → (B, C)."""
    return model.llm_decoder(model.forward_embeds(x, None, cache)[:, -1])


def prefilled_pair(model, prompt, mask=None, max_length=40):
    """The same prompt prefilled into a dynamic and a static cache (the static one through `forward`)."""
    b = prompt.shape[0]
    dyn = model.new_cache(b)
    static = model.new_static_cache(b, max_length)
    with torch.no_grad():
        h_dyn = model.forward_embeds(prompt, mask, dyn)
        h_static = model.forward_embeds(prompt, mask, static)
    torch.testing.assert_close(h_static, h_dyn, atol=0, rtol=0)  # the same reference computation
    return dyn, static


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_static_step_equals_dynamic_step(layout):
    model = make_model(LAYOUTS[layout])
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(2, 11, H, generator=g)  # 11: not a multiple of the SSD chunk (8)
    dyn, static = prefilled_pair(model, prompt, max_length=32)
    assert static.tokens == 11 and static.key_mask[:, :11].all() and not static.key_mask[:, 11:].any()
    spread = 0.0
    with torch.no_grad():
        for t in range(15):
            if t % 2:  # token ids (the generation path) and embeddings (the distillation/test path) alternate
                ids = torch.randint(0, model.config.speech_token_size, (2,), generator=g)
                x = model.speech_embedding(ids)[:, None]
                got = model.decode_step(ids, static)
            else:
                x = torch.randn(2, 1, H, generator=g)
                got = model.decode_step(x, static)
            ref = dynamic_logits(model, x, dyn)
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
            spread = max(spread, (ref[0] - ref[1]).abs().max().item())
    assert static.tokens == dyn.length == 26
    assert torch.equal(static.next_position, dyn.next_position)
    # The comparison can fail: logits of different rows differ far beyond the tolerance.
    assert spread > 1e-2
    # The states themselves agree (attention K/V slot by slot, Mamba states)
    for s_layer, d_layer in zip(static.layers, dyn.layers):
        if hasattr(s_layer, "k"):
            torch.testing.assert_close(s_layer.k[:, :, :26], d_layer.k[:, :, :26], atol=ATOL, rtol=RTOL)
            assert not s_layer.k[:, :, 26:].any()
        else:
            torch.testing.assert_close(s_layer.ssm_state, d_layer.ssm_state, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("layout", ["attention", "hybrid"])
def test_static_step_after_left_padded_prefill(layout):
    """Batched prompts of different lengths: padding slots stay masked in every later step."""
    model = make_model(LAYOUTS[layout])
    g = torch.Generator().manual_seed(4)
    lens, L = [9, 4, 6], 9
    prompt = torch.full((3, L, H), 5.0)  # garbage in the padding
    mask = torch.zeros(3, L, dtype=torch.bool)
    for i, n in enumerate(lens):
        prompt[i, L - n:] = torch.randn(n, H, generator=g)
        mask[i, L - n:] = True
    dyn, static = prefilled_pair(model, prompt, mask, max_length=20)
    assert static.next_position.tolist() == lens
    with torch.no_grad():
        for _ in range(6):
            x = torch.randn(3, 1, H, generator=g)
            torch.testing.assert_close(model.decode_step(x, static), dynamic_logits(model, x, dyn),
                                       atol=ATOL, rtol=RTOL)


def test_prefill_chunk_between_static_steps_and_reset():
    """A multi-token chunk after static steps goes through the reference path and the static step carries
    on from it; `reset` empties the cache in place (same addresses) and a rerun gives the same logits."""
    model = make_model(LAYOUTS["hybrid"])
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(1, 20, H, generator=g)
    with torch.no_grad():
        full = model.llm_decoder(model.forward_embeds(xs))  # (1, 20, C), no cache at all
        static = model.new_static_cache(1, 24)
        ptrs = [t.data_ptr() for t in static._state_tensors()]

        def run():
            out = [model.llm_decoder(model.forward_embeds(xs[:, :7], None, static))]
            out += [model.decode_step(xs[:, t], static)[:, None] for t in range(7, 10)]
            out.append(model.llm_decoder(model.forward_embeds(xs[:, 10:14], None, static)))
            out += [model.decode_step(xs[:, t], static)[:, None] for t in range(14, 20)]
            return torch.cat(out, dim=1)

        first = run()
        static.reset()
        assert static.tokens == 0 and not static.key_mask.any()
        second = run()
    torch.testing.assert_close(first, full, atol=ATOL, rtol=RTOL)
    assert torch.equal(first, second)
    assert [t.data_ptr() for t in static._state_tensors()] == ptrs  # nothing was reallocated


def test_decode_step_updates_the_cache_in_place():
    """What a CUDA graph relies on: the step writes into the cache's tensors, never rebinds or reallocates."""
    model = make_model(LAYOUTS["hybrid"])
    static = model.new_static_cache(2, 8)
    tensors = {id(t): t.data_ptr() for t in static._state_tensors()}
    kv = [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in static.layers if hasattr(layer, "k")]
    before = [t.clone() for t in static._state_tensors()]
    with torch.no_grad():
        model.decode_step(torch.tensor([3, 4]), static)
    assert {id(t): t.data_ptr() for t in static._state_tensors()} == tensors
    assert kv == [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in static.layers if hasattr(layer, "k")]
    changed = [not torch.equal(a, b) for a, b in zip(before, static._state_tensors())]
    assert all(changed)  # length, key_mask, next_position and both Mamba states of both Mamba layers moved


def test_static_cache_report_matches_dynamic_and_analytic():
    model = make_model(LAYOUTS["hybrid"]).to(torch.bfloat16)
    with torch.no_grad():
        dyn = model.new_cache(2)
        static = model.new_static_cache(2, 30)
        x = torch.randn(2, 13, H, dtype=torch.bfloat16)
        model.forward_embeds(x, None, dyn)
        model.forward_embeds(x, None, static)
        model.decode_step(torch.tensor([1, 2]), static)
        model.forward_embeds(model.speech_embedding(torch.tensor([[1], [2]])), None, dyn)
    rep, ref = static.report(), dyn.report()
    assert rep.to_dict() == ref.to_dict()
    expect = analytic_cache_bytes(model.config, 14, batch=2, bytes_per_element=2)
    assert rep.attention_bytes == expect["attention_bytes"] and rep.mamba_bytes == expect["mamba_bytes"]
    assert static.nbytes() == rep.total_bytes
    # allocated: all 30 slots of K/V, plus the Mamba states
    full = analytic_cache_bytes(model.config, 30, batch=2, bytes_per_element=2)
    assert static.allocated_nbytes() == full["total_bytes"]


def test_static_cache_guards():
    model = make_model(LAYOUTS["attention"])
    static = model.new_static_cache(1, 4)
    with pytest.raises(ValueError, match="4 slots"):
        with torch.no_grad():
            model.forward_embeds(torch.randn(1, 5, H), None, static)
    with pytest.raises(ValueError):
        StaticHybridCache(model.config, 1, 0, torch.float32)
    other = HybridCache(make_model(LAYOUTS["hybrid"]).config, 1, torch.float32)
    with pytest.raises(ValueError, match="layouts"):
        static.load(other)


@pytest.mark.parametrize("layout", ["attention", "hybrid"])
def test_generation_with_static_decode_draws_the_same_tokens(layout):
    """generate_batch(decode="static") is the reference generation with only the step swapped: a batch of
    left-padded prompts draws token for token what the dynamic cache draws."""
    model = make_model(LAYOUTS[layout])
    requests = [([1, 2, 3, 4], [5, 6], [7, 8, 9]), ([9, 8, 7], [], [])]
    ref = model.generate_batch(requests, seed=11)
    got = model.generate_batch(requests, seed=11, decode="static")
    assert got == ref
    assert all(len(r) >= 6 for r in ref)  # several decode steps were compared
    assert model.generate(*requests[0], seed=11, decode="static") == ref[0]
    with pytest.raises(ValueError, match="decode"):
        model.generate_batch(requests, decode="fast")


def test_graph_helper_refuses_cpu():
    from mamtra_cli.models.cuda_graph import GraphedDecodeStep

    model = make_model(LAYOUTS["hybrid"])
    with pytest.raises(RuntimeError, match="CUDA"):
        GraphedDecodeStep(model, model.new_static_cache(1, 8))


# ---------------------------------------------------------------- host synchronisation and torch.compile


class HostReadCheck(TorchDispatchMode):
    """Records the aten ops of a run that read tensor data back to the host. On CUDA each of these blocks
    the CPU until the GPU catches up, and each is illegal inside CUDA-graph capture; on the CPU they are
    invisible, so they are caught here by name. `.item()`, `int(t)`, `bool(t)` and `if t:` all end in
    `_local_scalar_dense`; the others have outputs whose size depends on data. A copy to another device
    (`_to_copy` with a device) is recorded too."""

    SYNCING = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "nonzero_static", "masked_select",
               "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "equal", "allclose",
               "bincount", "histc", "tolist"}

    def __init__(self):
        super().__init__()
        self.found, self.ops = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in self.SYNCING or (name == "_to_copy" and kwargs.get("device") is not None):
            self.found.append(str(func))
        return func(*args, **kwargs)


def test_host_read_check_sees_item_and_branches():
    """The check itself catches the usual ways a step reads the length back."""
    t = torch.tensor(3)
    for read in (lambda: t.item(), lambda: int(t), lambda: bool(t > 2), lambda: torch.nonzero(t)):
        with HostReadCheck() as check:
            read()
        assert check.found, read


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decode_step_never_reads_back_to_the_host(layout):
    model = make_model(LAYOUTS[layout])
    _, static = prefilled_pair(model, torch.randn(2, 3, H), max_length=8)
    with torch.no_grad():
        for ids in (torch.tensor([1, 2]), torch.randn(2, 1, H)):
            with HostReadCheck() as check:
                model.decode_step(ids, static)
            assert check.ops > 50 and check.found == []


def _compiled_vs_eager(backend: str, layout: str, steps: int = 4):
    import torch._dynamo

    torch._dynamo.reset()
    model = make_model(LAYOUTS[layout])
    g = torch.Generator().manual_seed(6)
    prompt = torch.randn(2, 5, H, generator=g)
    _, eager_cache = prefilled_pair(model, prompt, max_length=16)
    _, compiled_cache = prefilled_pair(model, prompt, max_length=16)
    step = torch.compile(model.decode_step, backend=backend, fullgraph=True, dynamic=False)
    # error_on_recompile: a step that guarded on the length (a Python int of it, a shape) would retrace
    # at the second call; one trace must serve every position.
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(steps):
            ids = torch.randint(0, model.config.speech_token_size, (2,), generator=g)
            torch.testing.assert_close(step(ids, compiled_cache), model.decode_step(ids, eager_cache),
                                       atol=ATOL, rtol=RTOL)
    assert compiled_cache.tokens == eager_cache.tokens == 5 + steps


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decode_step_traces_into_one_graph(layout):
    """Dynamo with fullgraph=True raises on any graph break (Python branches it cannot trace, unsupported
    calls), and with error_on_recompile on any guard that the next position would fail: the step is one
    graph for every position. Eager backend: checks the trace quickly, no code generation. (Dynamo in
    torch 2.13 traces `int(t)` of an input without a break, so host reads are checked separately above.)"""
    _compiled_vs_eager("eager", layout)


@pytest.mark.slow
def test_decode_step_compiled_with_inductor_equals_eager():
    """The generated code itself (inductor, C++ on the CPU) gives the eager step's logits."""
    _compiled_vs_eager("inductor", "hybrid", steps=3)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_graph_replay_equals_eager_step(layout):
    from mamtra_cli.models.cuda_graph import GraphedDecodeStep

    model = make_model(LAYOUTS[layout]).cuda()
    g = torch.Generator().manual_seed(7)
    prompt = torch.randn(2, 9, H, generator=g).cuda()
    with torch.inference_mode():
        eager = model.new_static_cache(2, 32)
        graphed = model.new_static_cache(2, 32)
        model.forward_embeds(prompt, None, eager)
        model.forward_embeds(prompt, None, graphed)
        step = GraphedDecodeStep(model, graphed)
        assert graphed.tokens == 9  # warm-up and capture did not advance the cache
        for _ in range(12):
            ids = torch.randint(0, model.config.speech_token_size, (2,), generator=g).cuda()
            torch.testing.assert_close(step(ids).clone(), model.decode_step(ids, eager), atol=1e-4, rtol=1e-4)
        assert graphed.tokens == eager.tokens == 21


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generation_with_cuda_graph_draws_the_same_tokens():
    model = make_model(LAYOUTS["hybrid"]).cuda()
    requests = [([1, 2, 3, 4], [5, 6], [7, 8, 9]), ([9, 8, 7], [], [])]
    ref = model.generate_batch(requests, seed=11, decode="static")
    assert model.generate_batch(requests, seed=11, decode="graph") == ref


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eager_static_step_never_synchronises_on_cuda():
    model = make_model(LAYOUTS["hybrid"]).cuda()
    with torch.inference_mode():
        cache = model.new_static_cache(1, 16)
        model.forward_embeds(torch.randn(1, 4, H, device="cuda"), None, cache)
        ids = torch.tensor([3], device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                model.decode_step(ids, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert cache.tokens == 7

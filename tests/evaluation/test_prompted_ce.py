"""Prompted CE (`mamtra eval --data`): each list row's ground-truth speech scored behind its own prompt, the
prompt read but not scored — checked against a log-softmax computed by hand from one full forward."""

from __future__ import annotations

import pytest
import torch

from mamtra_cli.data_manifest import read_manifest
from mamtra_cli.evaluation.lists import load_eval_list
from mamtra_cli.evaluation.runner import prompted_utterances
from mamtra_cli.mini import BUILTIN_DIR
from mamtra_cli.models.speech_lm import load_model_dir
from mamtra_cli.scoring import score_utterances

pytestmark = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(),
                                reason="the built-in mini voice is not in this checkout (mamtra build-mini)")


@pytest.fixture(scope="module")
def heldout():
    items = load_eval_list("mini-heldout").items
    _, utts = read_manifest(BUILTIN_DIR / "demo_test.jsonl")
    return items, utts


def test_rows_are_prompt_then_row(heldout):
    items, utts = heldout
    by_id = {u.utt: u for u in utts}
    rows, prompt_len = prompted_utterances(items, utts)
    assert len(rows) == len(items) == 120
    for it, r in zip(items, rows):
        row, prompt = by_id[it.utt], by_id[it.ref.stem]
        assert prompt.utt != row.utt and prompt.text.lower().rstrip(".?!") in it.prompt_text.lower()
        assert r.text_tokens == prompt.text_tokens + row.text_tokens
        assert r.speech_tokens == prompt.speech_tokens + row.speech_tokens
        assert prompt_len[r.utt] == len(prompt.speech_tokens) > 0
    # a row whose prompt recording is not in the manifest is left out
    assert prompted_utterances(items[:3], [by_id[items[0].utt]])[0] == []


def test_only_the_continuation_is_scored(heldout):
    items, utts = heldout
    rows, prompt_len = prompted_utterances(items[:3], utts)
    lm = load_model_dir(BUILTIN_DIR)
    with torch.inference_mode():
        got = score_utterances(lm, rows, batch_size=2, prompt_speech=prompt_len)
        nll, n = 0.0, 0
        for r in rows:  # one row alone, its continuation's targets and eos picked by hand
            t, s, p = len(r.text_tokens), len(r.speech_tokens), prompt_len[r.utt]
            embeds, _, _ = lm.unistream_inputs(torch.tensor([r.text_tokens]), torch.tensor([t]),
                                               torch.tensor([r.speech_tokens]), torch.tensor([s]))
            logp = lm.llm_decoder(lm.backbone(embeds))[0].float().log_softmax(-1)  # (1+T+1+S, C)
            want = r.speech_tokens[p:] + [lm.config.eos_id]
            # the token at speech position k is predicted from position 1 + T + k (task id at 1 + T)
            nll -= sum(float(logp[1 + t + k, tok]) for k, tok in zip(range(p, s + 1), want))
            n += len(want)
        unprompted = score_utterances(lm, rows, batch_size=2)
    assert got["tokens"] == n and got["ce"] == pytest.approx(nll / n, rel=1e-5)
    assert unprompted["tokens"] > n  # without the mask the prompt's tokens count too
